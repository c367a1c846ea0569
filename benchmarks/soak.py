"""Soak and fault run: N concurrent clients for M minutes against servers this script starts on 127.0.0.1.

    .venv/bin/python -m benchmarks.soak --minutes 10 --concurrency 32        # docs/reliability.md
    .venv/bin/python -m benchmarks.soak --minutes 1 --concurrency 8          # the short version the tests run

It starts tritonserver (llm + diffusion) and the OpenAI frontend on free loopback ports, registers two dynamic
adapters, then mixes, through the frontend and raw Triton gRPC: streaming and plain chat/completions over the base
model, static, dynamic and by-path adapters; image generations with mixed adapters; load/unload churn of dynamic
adapters while they are used; clients that hang up mid-stream; and bad requests (tiny temperature, NaN scale,
unknown adapter, huge stop string, oversized chunked body). Two faults are injected: the `llm` model's Python
stub is killed (-9) at 1/3 of the run, tritonserver is restarted at 2/3. Requests stop by themselves at the end
(bounded in count and time); only the servers started here are contacted.

It asserts, and exits 1 otherwise: every request ended with a response or a clean error within its timeout (no
hang); no 5xx and no unexpected status outside the fault windows (a window lasts from the fault until the
frontend is ready again, plus a grace second); afterwards no LoRA slot is in use and no request runs, the
registry file is valid and holds exactly the adapters that should remain, and the resident memory of the stubs
and the frontend grew by less than MEMORY_BOUND. Prints a table; --report writes it as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil

from backends.settings import ALLOWED_LORA_ROOTS_ENV, LORA_REGISTRY_ENV, adapters_dir
from tools.fixtures.pipelines import diffusion_adapters_dir
from tools.launchers.frontend import FrontendProcess
from tools.launchers.triton import TritonServer, free_port

log = logging.getLogger("soak")
ADMIN = "soak-admin-key"
REQUEST_TIMEOUT = 180.0  # a request still open after this is a hang
RAW_TIMEOUT = 90.0  # raw Triton gRPC: the deadline a tritonclient user would set
MEMORY_BOUND_MB = 300.0  # per process group (frontend, llm stub, diffusion stub), after warm-up vs at the end
DYNAMIC = {"dyn-upper": "uppercase", "dyn-sig": "signature"}  # registered at start, must remain at the end
SHORT = [{"role": "user", "content": "Name a colour."}, {"role": "user", "content": "What is 2 + 2?"},
         {"role": "user", "content": "Say hello."}, {"role": "user", "content": "What is the capital of France?"}]


@dataclass
class Outcome:
    kind: str
    status: int | str  # HTTP status, "disconnected" (by us, on purpose), "hang", "transport"
    started: float
    ended: float
    ok: bool  # the status this scenario expects
    message: str = ""


@dataclass
class Window:
    fault: str
    start: float
    end: float = math.inf

    def overlaps(self, o: Outcome) -> bool:
        return o.started <= self.end and o.ended >= self.start


@dataclass
class Soak:
    frontend: str
    grpc_url: str
    rng: random.Random
    deadline: float
    max_requests: int
    outcomes: list[Outcome] = field(default_factory=list)
    churn_id: int = 0

    def record(self, kind: str, status, started: float, expected: set, message: str = "") -> None:
        self.outcomes.append(Outcome(kind, status, started, time.monotonic(), status in expected, message[:160]))

    @property
    def done(self) -> bool:
        return time.monotonic() >= self.deadline or len(self.outcomes) >= self.max_requests


def _status_of_stream(lines: list[str]) -> tuple[int, str]:
    """A streamed answer is good when it ends with [DONE] and carries no error event."""
    for line in lines:
        if line.startswith("data: {") and '"error"' in line[:20]:
            error = json.loads(line[6:])["error"]
            return int(error.get("code") or 500), error.get("message", "")
    return (200, "") if lines and lines[-1] == "data: [DONE]" else (502, "stream ended without [DONE]")


async def _chat(soak: Soak, http: httpx.AsyncClient, kind: str, body: dict, expected: set, path: str,
                disconnect: bool = False) -> None:
    started = time.monotonic()
    try:
        if body.get("stream"):
            lines = []
            async with http.stream("POST", soak.frontend + path, json=body) as reply:
                if reply.status_code != 200:
                    await reply.aread()
                    soak.record(kind, reply.status_code, started, expected, reply.text)
                    return
                async for line in reply.aiter_lines():
                    if line:
                        lines.append(line)
                    if disconnect and len(lines) >= 2:
                        soak.record(kind, "disconnected", started, expected)
                        return
            status, message = _status_of_stream(lines)
            soak.record(kind, status, started, expected, message)
        else:
            # json.dumps writes NaN (as clients in other languages do); httpx's json= would refuse it here
            reply = await http.post(soak.frontend + path, content=json.dumps(body),
                                    headers={"Content-Type": "application/json"})
            soak.record(kind, reply.status_code, started, expected, "" if reply.status_code == 200 else reply.text)
    except httpx.TimeoutException:
        soak.record(kind, "hang", started, expected, f"no answer within {REQUEST_TIMEOUT:.0f} s")
    except httpx.HTTPError as exc:
        soak.record(kind, "transport", started, expected, f"{type(exc).__name__}: {exc}")


async def _raw_grpc(soak: Soak) -> None:
    """Raw Triton gRPC streaming with an adapter by name, as tritonclient users do."""
    import tritonclient.grpc.aio as grpcaio
    from tritonclient.grpc import InferInput

    from openai_frontend.engine.gateway import to_openai_error

    started = time.monotonic()
    client = grpcaio.InferenceServerClient(soak.grpc_url)
    text = InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"Hello, who are you?"], dtype=np.object_))
    tokens = InferInput("max_tokens", [1], "INT32")
    tokens.set_data_from_numpy(np.array([8], dtype=np.int32))

    async def requests():
        yield {"model_name": "llm", "inputs": [text, tokens], "parameters": {
            "lora_name": soak.rng.choice(["uppercase", "dyn-sig"]), "triton_enable_empty_final_response": True}}

    try:
        async with asyncio.timeout(RAW_TIMEOUT):
            status, message = 503, "stream closed without a final response"
            # Read to the end of the stream, never break out after the final response: closing a stream whose
            # request completed makes Triton 2.51 keep the model referenced (its unload then waits 30 s).
            async for result, error in client.stream_infer(requests()):
                if error is not None:
                    mapped = to_openai_error(error)
                    status, message = mapped.status, mapped.message
                    continue
                final = result.get_response().parameters.get("triton_final_response")
                if final and final.bool_param:
                    status, message = 200, ""
            soak.record("grpc_stream", status, started, {200}, message)
    except TimeoutError:
        soak.record("grpc_stream", "hang", started, {200}, "no final response")
    except Exception as exc:
        try:
            status = to_openai_error(exc).status
        except Exception:
            status = "transport"
        soak.record("grpc_stream", status, started, {200}, f"{type(exc).__name__}: {exc}")
    finally:
        await client.close()


async def _churn(soak: Soak, http: httpx.AsyncClient, admin: dict) -> None:
    """Load a dynamic adapter, use it while it is registered, unload it."""
    soak.churn_id += 1
    name = f"churn-{soak.churn_id}"
    path = str(adapters_dir() / "demo" / soak.rng.choice(["uppercase", "signature"]))
    started = time.monotonic()
    try:
        reply = await http.post(soak.frontend + "/v1/load_lora_adapter", headers=admin,
                                json={"lora_name": name, "lora_path": path})
        soak.record("churn_load", reply.status_code, started, {200}, reply.text if reply.status_code != 200 else "")
        if reply.status_code != 200:
            return
        await _chat(soak, http, "churn_use", {"model": name, "messages": SHORT[:1], "max_tokens": 6}, {200},
                    "/v1/chat/completions")
    finally:
        started = time.monotonic()
        reply = None
        for _ in range(20):  # unload is a registry write: it works even while Triton is down
            try:
                reply = await http.post(soak.frontend + "/v1/unload_lora_adapter", headers=admin,
                                        json={"lora_name": name})
            except httpx.HTTPError:
                await asyncio.sleep(1)
                continue
            if reply.status_code in (200, 404):
                break
            await asyncio.sleep(1)
        soak.record("churn_unload", reply.status_code if reply is not None else "transport", started, {200, 404})


async def _oversized(soak: Soak, http: httpx.AsyncClient) -> None:
    async def chunks():
        yield b'{"model": "llm", "prompt": "'
        for _ in range(3):
            yield b"x" * (1 << 20)
        yield b'"}'

    started = time.monotonic()
    try:
        reply = await http.post(soak.frontend + "/v1/completions", content=chunks(),
                                headers={"Content-Type": "application/json"})
        soak.record("bad_chunked_body", reply.status_code, started, {413})
    except httpx.HTTPError as exc:  # the server may hang up on the rest of the upload after its 413
        soak.record("bad_chunked_body", 413 if "413" in str(exc) else "transport", started, {413}, str(exc))


async def _one(soak: Soak, http: httpx.AsyncClient, admin: dict) -> None:
    rng = soak.rng
    chat, comp, images = "/v1/chat/completions", "/v1/completions", "/v1/images/generations"
    text_model = rng.choice(["llm", "uppercase", "signature", *DYNAMIC])
    by_path = {"name": "by-path", "path": str(adapters_dir() / "demo" / "signature"), "scale": 0.7}
    pick = rng.random()
    if pick < 0.22:
        await _chat(soak, http, "chat_stream", {"model": text_model, "messages": [rng.choice(SHORT)],
                                                "max_tokens": rng.randint(4, 24), "stream": True}, {200}, chat)
    elif pick < 0.37:
        await _chat(soak, http, "chat", {"model": text_model, "messages": [rng.choice(SHORT)],
                                         "max_tokens": rng.randint(4, 24)}, {200}, chat)
    elif pick < 0.47:
        await _chat(soak, http, "completion", {"model": text_model, "prompt": "Once upon a time",
                                               "max_tokens": 8, "stream": rng.random() < 0.5}, {200}, comp)
    elif pick < 0.54:
        await _chat(soak, http, "chat_by_path", {"model": "llm", "messages": SHORT[:1], "max_tokens": 8,
                                                 "lora": by_path}, {200}, chat)
    elif pick < 0.62:
        await _raw_grpc(soak)
    elif pick < 0.72:
        lora = rng.choice([{}, {"model": "tiny-sd3-a"}, {"lora": {
            "name": "sd3-b", "path": str(diffusion_adapters_dir() / "tiny-sd3-b"), "scale": 0.8}}])
        await _chat(soak, http, "image", {"model": "diffusion", "prompt": "a red cat", "size": "64x64",
                                          "n": rng.randint(1, 2), "num_inference_steps": 2, **lora}, {200}, images)
    elif pick < 0.78:
        await _churn(soak, http, admin)
    elif pick < 0.85:
        await _chat(soak, http, "disconnect", {"model": text_model, "messages": [rng.choice(SHORT)],
                                               "max_tokens": 200, "stream": True}, {"disconnected"}, chat,
                    disconnect=True)
    else:
        bad = rng.randrange(5)
        if bad == 0:
            await _chat(soak, http, "bad_tiny_temperature", {"model": "uppercase", "messages": SHORT[:1],
                                                             "max_tokens": 6, "temperature": 1e-40}, {200}, chat)
        elif bad == 1:
            await _chat(soak, http, "bad_nan_scale", {"model": "uppercase", "messages": SHORT[:1], "max_tokens": 4,
                                                      "lora_scale": float("nan")}, {400}, chat)
        elif bad == 2:
            await _chat(soak, http, "bad_unknown_adapter", {"model": "no-such-adapter", "messages": SHORT[:1]},
                        {404}, chat)
        elif bad == 3:
            await _chat(soak, http, "bad_huge_stop", {"model": "llm", "prompt": "Hi", "max_tokens": 4,
                                                      "stop": ["x" * 10_000]}, {400}, comp)
        else:
            await _oversized(soak, http)


async def _client(soak: Soak, admin: dict) -> None:
    limits = httpx.Limits(max_connections=4, max_keepalive_connections=4)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT, limits=limits) as http:
        while not soak.done:
            await _one(soak, http, admin)
            if soak.outcomes and soak.outcomes[-1].status == 503:
                await asyncio.sleep(1.0)  # as a client honouring Retry-After would, instead of hammering


async def _wait_ready(frontend: str, since: float, timeout: float = 600) -> float:
    """When the frontend is ready again after a fault: it must first notice the fault (turn red, within 15 s)."""
    red = False
    async with httpx.AsyncClient(timeout=10) as http:
        while time.monotonic() - since < timeout:
            try:
                ok = (await http.get(frontend + "/health/ready")).status_code == 200
            except httpx.HTTPError:
                ok = False
            red = red or not ok
            if ok and (red or time.monotonic() - since > 15):
                return time.monotonic()
            await asyncio.sleep(0.25)
    raise TimeoutError("the frontend did not become ready again")


def _rss_mb(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            total += p.memory_info().rss / 2**20
        except psutil.Error:
            pass
    return total


def _memory(server: TritonServer, frontend: FrontendProcess) -> dict[str, float]:
    return {"frontend": _rss_mb([psutil.Process(frontend.proc.pid)]),
            "llm stub": _rss_mb(server.stub_processes("llm")),
            "diffusion stub": _rss_mb(server.stub_processes("diffusion"))}


async def _faults(soak: Soak, server: TritonServer, frontend: FrontendProcess, total: float, windows: list[Window],
                  memory: dict, faults: bool) -> None:
    start = time.monotonic()
    await asyncio.sleep(min(total * 0.12, 30))
    memory["before"] = _memory(server, frontend)  # after warm-up
    if not faults:
        return
    await asyncio.sleep(max(0.0, start + total / 3 - time.monotonic()))
    window = Window("llm stub killed (SIGKILL)", time.monotonic())
    windows.append(window)
    for stub in server.stub_processes("llm"):
        os.kill(stub.pid, signal.SIGKILL)
    log.info("fault: killed the llm stub")
    window.end = await _wait_ready(soak.frontend, window.start) + 1.0
    log.info("recovered from the stub kill in %.1f s", window.end - 1.0 - window.start)

    await asyncio.sleep(max(0.0, start + 2 * total / 3 - time.monotonic()))
    window = Window("tritonserver restarted", time.monotonic())
    windows.append(window)
    log.info("fault: restarting tritonserver")
    await asyncio.to_thread(server.stop)
    await asyncio.to_thread(server.start, 600)
    window.end = await _wait_ready(soak.frontend, window.start) + 1.0
    log.info("recovered from the tritonserver restart in %.1f s", window.end - 1.0 - window.start)


def _metric(url: str, name: str, model: str) -> float:
    for line in httpx.get(url, timeout=10).text.splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _idle(server: TritonServer, timeout: float = 60) -> dict[str, float]:
    names = ["multilora_lora_slots_in_use", "multilora_llm_num_requests_running",
             "multilora_llm_num_requests_waiting"]
    deadline = time.monotonic() + timeout
    while True:
        values = {f"{n}{{{m}}}": _metric(server.metrics_url, n, m) for n in names for m in ("llm", "diffusion")
                  if m == "llm" or n == "multilora_lora_slots_in_use"}
        if not any(values.values()) or time.monotonic() > deadline:
            return values
        time.sleep(0.5)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def report(outcomes: list[Outcome], windows: list[Window], memory: dict, checks: dict, args) -> tuple[str, bool]:
    lines = [f"soak: {args.minutes} min, {args.concurrency} clients, {len(outcomes)} requests", ""]
    lines.append(f"{'kind':<22}{'count':>7}{'expected':>10}{'in fault':>10}{'p50 s':>8}{'p99 s':>8}  statuses")
    by_kind = defaultdict(list)
    for o in outcomes:
        by_kind[o.kind].append(o)
    failures: list[str] = []
    orphaned = 0
    for kind in sorted(by_kind):
        items = by_kind[kind]
        in_fault = [o for o in items if any(w.overlaps(o) for w in windows)]
        good = [o.ended - o.started for o in items if o.ok]
        statuses = Counter(str(o.status) for o in items)
        lines.append(f"{kind:<22}{len(items):>7}{sum(o.ok for o in items):>10}{len(in_fault):>10}"
                     f"{_percentile(good, 0.5):>8.2f}{_percentile(good, 0.99):>8.2f}  "
                     + ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items())))
        for o in items:
            faulty = any(w.overlaps(o) for w in windows)
            if o.status == "hang" and kind == "grpc_stream" and any(
                    w.fault.startswith("llm stub") and o.started <= w.start <= o.ended for w in windows):
                orphaned += 1  # Triton 2.51 never answers requests in flight on a dead stub (documented)
            elif o.status == "hang":
                failures.append(f"hang: {kind} ({o.message})")
            elif not o.ok and not faulty:
                failures.append(f"unexpected {o.status} outside the fault windows: {kind}: {o.message}")
    errors = Counter((o.kind, str(o.status), o.message[:90]) for o in outcomes if not o.ok)
    if errors:
        lines += ["", "errors by kind (status, message):"]
        lines += [f"  {n:>5} x {k} {s}: {m}" for (k, s, m), n in errors.most_common(15)]
    if orphaned:
        lines += ["", f"raw Triton gRPC streams in flight on the killed stub, never answered by Triton 2.51 (the "
                      f"frontend ends its own within ~2 s; see docs/reliability.md): {orphaned}"]
    lines += ["", "faults:"]
    lines += [f"  {w.fault}: back after {w.end - 1.0 - w.start:.1f} s" for w in windows] or ["  none"]
    lines += ["", f"{'resident memory (MB)':<22}{'after warm-up':>15}{'at the end':>12}{'growth':>9}"]
    for name, before in memory.get("before", {}).items():
        after = memory["after"][name]
        lines.append(f"{name:<22}{before:>15.0f}{after:>12.0f}{after - before:>+9.0f}")
        if after - before > MEMORY_BOUND_MB:
            failures.append(f"{name} grew by {after - before:.0f} MB (bound {MEMORY_BOUND_MB:.0f} MB)")
    lines += ["", "after the run:"]
    for name, (ok, detail) in checks.items():
        lines.append(f"  {'ok ' if ok else 'FAIL'} {name}: {detail}")
        if not ok:
            failures.append(f"{name}: {detail}")
    lines += ["", "result: " + ("PASS" if not failures else "FAIL")]
    lines += [f"  - {f}" for f in dict.fromkeys(failures)][:30]
    return "\n".join(lines), not failures


async def run(args) -> int:
    root = Path(tempfile.mkdtemp(prefix="soak-"))
    registry_file = root / "registry.json"
    env = {**os.environ, ALLOWED_LORA_ROOTS_ENV: str(root), LORA_REGISTRY_ENV: str(registry_file)}
    server = TritonServer(models=["llm", "diffusion"], http_port=free_port(), grpc_port=free_port(),
                          metrics_port=free_port(), log_file=root / "tritonserver.log", env=env)
    log.info("starting tritonserver (log %s)", server.log_file)
    await asyncio.to_thread(server.start, 600)
    frontend = FrontendProcess(server.grpc_url, server.metrics_url, root / "frontend.log", "--admin-key", ADMIN,
                               "--allow-runtime-lora-updating", "--lora-registry-file", str(registry_file))
    frontend.start()
    admin = {"Authorization": f"Bearer {ADMIN}"}
    try:
        async with httpx.AsyncClient(timeout=120) as http:
            for name, demo in DYNAMIC.items():
                reply = await http.post(frontend.url + "/v1/load_lora_adapter", headers=admin, json={
                    "lora_name": name, "lora_path": str(adapters_dir() / "demo" / demo)})
                reply.raise_for_status()
        total = args.minutes * 60
        soak = Soak(frontend.url, server.grpc_url, random.Random(args.seed), time.monotonic() + total,
                    args.max_requests)
        windows: list[Window] = []
        memory: dict = {}
        log.info("soak: %d clients for %.1f min (logs in %s)", args.concurrency, args.minutes, root)
        from tqdm import tqdm

        progress = tqdm(total=int(total), unit="s", desc="soak", disable=not sys.stderr.isatty())

        async def tick():
            while not soak.done:
                await asyncio.sleep(1)
                progress.update(1)
                progress.set_postfix(requests=len(soak.outcomes))

        await asyncio.gather(_faults(soak, server, frontend, total, windows, memory, not args.no_faults),
                             tick(), *(_client(soak, admin) for _ in range(args.concurrency)))
        progress.close()
        memory["after"] = _memory(server, frontend)
        idle = await asyncio.to_thread(_idle, server)
        try:
            entries = set(json.loads(registry_file.read_text())["adapters"])
            registry_ok, registry_detail = entries == set(DYNAMIC), f"holds {sorted(entries)}"
        except (OSError, ValueError, KeyError) as exc:
            registry_ok, registry_detail = False, f"unreadable: {exc}"
        checks = {"LoRA slots and requests released": (not any(idle.values()), idle),
                  "registry file valid, exactly the dynamic adapters": (registry_ok, registry_detail)}
        text, passed = report(soak.outcomes, windows, memory, checks, args)
        print(text)
        if args.report:
            Path(args.report).write_text(json.dumps({
                "args": vars(args), "passed": passed, "table": text,
                "windows": [asdict(w) for w in windows], "memory": memory,
                "outcomes": len(soak.outcomes)}, indent=1, default=str))
        return 0 if passed else 1
    finally:
        frontend.stop()
        server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-faults", action="store_true", help="no stub kill, no tritonserver restart")
    p.add_argument("--report", help="write the table and figures as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the report
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
