"""Self-healing of Triton models whose Python-backend process died (OOM killer, segfault, poisoned CUDA context)
or whose engine thread stopped.

Triton 2.51 keeps such a model READY and answers every request with "Stub process ... is not healthy", forever,
and never answers the requests that were in flight. The supervisor notices (each error a request meets, and a
cheap probe per model every `interval_s`: a request with the `multilora_probe` parameter, answered by the model
without any model work), ends the in-flight requests of that model at once with a retryable 503, and reloads the
model through Triton's model control (unload, then load: a plain load of a loaded model is a no-op), with
exponential backoff and at most `max_restarts` restarts per `window_s`. Past the cap the model stays down and the
log says why. While a model is restarting or down, its requests get 503 + Retry-After and /health/ready is 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from backends.protocol import PROBE_PARAMETER
from openai_frontend.engine.catalog import LLM
from openai_frontend.errors import OpenAIError

log = logging.getLogger(__name__)

OK, RESTARTING, FAILED = "ok", "restarting", "failed"


@dataclass
class ModelHealth:
    state: str = OK
    reason: str = ""
    since: float = 0.0
    restarts: deque = field(default_factory=deque)  # monotonic times of restarts within the window


@dataclass(frozen=True)
class SupervisorConfig:
    interval_s: float = 2.0  # between probes of every ready model
    probe_timeout_s: float = 60.0  # a busy model may answer late; only a dead one answers "not healthy"
    max_restarts: int = 3  # per model within window_s; then the model stays down
    window_s: float = 600.0
    backoff_s: float = 2.0  # first retry delay when a reload fails; doubles


class Supervisor:
    def __init__(self, gateway, catalog, metrics, config: SupervisorConfig = SupervisorConfig()):
        self.gateway = gateway
        self.catalog = catalog
        self.metrics = metrics
        self.config = config
        self.health: dict[str, ModelHealth] = {}
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None
        gateway.on_model_dead = self.report_dead
        catalog.supervisor = self

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._probe_loop(), name="model-supervisor")

    async def stop(self) -> None:
        for task in [self._loop_task, *self._tasks]:
            if task is not None:
                task.cancel()
        for task in [self._loop_task, *self._tasks]:
            if task is not None:
                with contextlib.suppress(BaseException):
                    await task

    # -- what the routes ask ---------------------------------------------------------------------------------
    def state(self, model: str) -> str:
        return self.health.get(model, ModelHealth()).state

    def unavailable(self, model: str) -> OpenAIError | None:
        """The 503 for requests to a model that is restarting or down, else None."""
        health = self.health.get(model)
        if health is None or health.state == OK:
            return None
        if health.state == RESTARTING:
            return OpenAIError(503, f"model '{model}' is restarting after its process stopped ({health.reason}); "
                                    f"retry shortly", headers={"Retry-After": "5"})
        return OpenAIError(503, f"model '{model}' is down: it stopped {len(health.restarts)} times within "
                                f"{self.config.window_s:.0f} s and is not restarted again ({health.reason}); an "
                                f"operator must reload it", headers={"Retry-After": "60"})

    def snapshot(self) -> dict[str, list[str]]:
        return {state: sorted(n for n, h in self.health.items() if h.state == state) for state in (RESTARTING, FAILED)}

    def reset(self, model: str) -> None:
        """An operator reloaded the model by hand: it is healthy again, with a fresh restart budget."""
        self.health.pop(model, None)

    # -- detection -------------------------------------------------------------------------------------------
    def report_dead(self, model: str, reason: str) -> None:
        health = self.health.setdefault(model, ModelHealth())
        if health.state != OK:
            return
        health.state, health.reason, health.since = RESTARTING, reason, time.monotonic()
        self.gateway.model_died(model, reason)
        task = asyncio.create_task(self._recover(model), name=f"restart-{model}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            bases = await self._bases()  # none while Triton itself is down: nothing to restart from here
            await asyncio.gather(*(self.probe(base) for name, base in bases.items() if self.state(name) == OK),
                                 return_exceptions=True)

    async def probe(self, base) -> bool:
        """True when the model answered the probe; a dead model is reported by the gateway on the way."""
        try:
            async with asyncio.timeout(self.config.probe_timeout_s):
                if base.kind == LLM:
                    async for _ in self.gateway.generate(base.name, {"text_input": "probe"}, {PROBE_PARAMETER: True}):
                        pass
                else:
                    await self.gateway.images(base.name, {"prompt": "probe"}, {PROBE_PARAMETER: True})
            return True
        except (OpenAIError, TimeoutError) as exc:
            log.debug("probe of %s: %s", base.name, exc)
            return False

    # -- recovery --------------------------------------------------------------------------------------------
    async def _recover(self, model: str) -> None:
        health = self.health[model]
        backoff = self.config.backoff_s
        while True:
            try:
                ready = any(m.name == model and m.state == "READY" for m in await self.gateway.index())
            except OpenAIError as exc:  # Triton itself is down or restarting: wait for it, no restart counted
                log.info("model '%s': Triton is unavailable (%s); waiting", model, exc.message)
                await asyncio.sleep(self.config.interval_s)
                continue
            if not ready:  # a dead process leaves its model READY: anything else was unloaded on purpose
                log.info("model '%s' is not loaded any more; not restarting it", model)
                self.health.pop(model, None)
                return
            bases = await self._bases()
            if model in bases and await self.probe(bases[model]):  # e.g. Triton was restarted meanwhile
                health.state, health.reason = OK, ""
                log.info("model '%s' answers again without a restart", model)
                return
            now = time.monotonic()
            while health.restarts and now - health.restarts[0] > self.config.window_s:
                health.restarts.popleft()
            if len(health.restarts) >= self.config.max_restarts:
                health.state = FAILED
                log.error("model '%s' stopped again (%s) after %d restarts within %.0f s: not restarting it any "
                          "more; it stays unready until an operator reloads it (POST /v1/models/%s/load)",
                          model, health.reason, len(health.restarts), self.config.window_s, model)
                self.gateway.model_died(model, health.reason)
                return
            health.restarts.append(now)
            self.metrics.restarts.labels(model).inc()
            log.warning("model '%s' stopped (%s): restarting it (unload + load), restart %d of at most %d per "
                        "%.0f s", model, health.reason, len(health.restarts), self.config.max_restarts,
                        self.config.window_s)
            try:
                await self.gateway.unload(model)
                await self.gateway.load(model)
                bases = await self._bases()
                if model in bases and await self.probe(bases[model]):
                    health.state, health.reason = OK, ""
                    log.info("model '%s' is serving again, %.1f s after it stopped", model,
                             time.monotonic() - health.since)
                    return
                log.error("model '%s' did not come back after its reload; retrying in %.0f s", model, backoff)
            except OpenAIError as exc:
                log.error("reloading model '%s' failed: %s; retrying in %.0f s", model, exc.message, backoff)
            self.gateway.model_died(model, health.reason)
            await asyncio.sleep(backoff)
            backoff *= 2

    async def _bases(self) -> dict:
        try:
            return await self.catalog.bases(fresh=True)
        except OpenAIError:
            return {}
