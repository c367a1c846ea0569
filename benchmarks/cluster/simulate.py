"""Discrete-event simulation of N replicas of our `llm` model behind a router: how far does LoRA serving scale out?

    .venv/bin/python -m benchmarks.cluster.simulate                           # N = 1..16, 1.5-2 minutes, one core
    .venv/bin/python -m benchmarks.cluster.simulate --replicas 1 2 4 8 16 --adapters 2000 --alpha 0.8
    .venv/bin/python -m benchmarks.cluster.simulate --validate                # the fit against a real engine burst

What one replica does is our engine, step by step (`backends/llm/engine.py`): each step admits waiting requests
with our own scheduler (`backends.llm.scheduler.Scheduler`, imported: FCFS within `max_num_seqs`, the padded
prefill budget `max_num_batched_tokens` and the LoRA slots, with its bounded bypass), acquires their adapters
through a two-tier LRU like `backends/lora/manager/cache.py` (`max_loras` device slots, `max_cpu_loras` host copies; a
host miss is a cold load from disk, a host hit is a host -> slot copy; loads run on the engine thread and stall the
step), prefills the admitted prompts in one left-padded forward (first token), then decodes one token for every
running sequence. Step times come from least-squares fits to one replica's measured profile
(`benchmarks/cluster/replica_profile.py`, default `docs/data/replica_profile.csv`): decode time vs batch size, distinct
adapters in the batch and tokens in context; prefill time vs padded tokens; cold and warm load times.

Traffic: Poisson arrivals at a fixed load per replica (so the total rate grows with N); each request's adapter
drawn from a power law over `--adapters` adapters (share of the i-th most popular ~ 1/i^alpha, S-LoRA's
synthetic traces), prompt and output lengths uniform in [8, 512] tokens (S-LoRA's synthetic workload ranges).

Routing policies:
- `round-robin`;
- `least-queue`: the replica with the fewest outstanding requests as the router itself counts them (exact, like
  a load balancer's least-request; ties at random);
- `epp`: the Gateway API Inference Extension endpoint picker (now llm-d's router,
  github.com/llm-d/llm-d-inference-scheduler, pkg/epp/framework/plugins/scheduling/scorer/): the weighted sum of
  `queue-scorer` ((max - q) / (max - min) over the candidates' waiting queues, 1 when all are equal),
  `kv-cache-utilization-scorer` (1 - KV usage) and `lora-affinity-scorer` (1.0 when the adapter is running on the
  pod, 0.8 when the pod's running + waiting adapters are fewer than its max_lora, 0.6 when it is only waiting
  there, else 0), weights 1/1/1 (the scorers' default weight; the prefix-cache scorer has no signal here), the
  max-score picker with random tie-break. It reads the metrics our server publishes after each engine step and
  each admission (`vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`, `vllm:lora_requests_info`), scraped
  every 50 ms (the picker's default refresh interval), so its view is up to a step plus a scrape old;
- `epp-residency` (ours, not upstream): `epp` whose LoRA score also gives 0.9 to a pod holding the adapter in a
  device slot or its host cache, from the residency gauge issue 15 adds; shows what that gauge could buy;
- `adapter-hash` (a reference, not upstream): each adapter has a home replica by rendezvous hashing and goes
  there unless its outstanding requests exceed 1.25 x the mean (+1), then to the next replica in its hash order
  (consistent hashing with bounded loads, Mirrokni, Thorup and Zadimoghaddam 2018): sharding the adapters over
  the replicas' caches, the placement the picker's scorers do not attempt.

Measured per (policy, N), in a window after a warm-up: at saturation (offered load `--overload` x N x one
replica's capacity) the throughput in requests/s and output tokens/s, and its ratio to N x one replica's; at
`--rho` x that capacity per replica, TTFT p50/p99 (arrival to first token) and cold adapter loads per 1,000
requests. One replica's capacity is found first the same way (N = 1, saturated). Deterministic for a --seed:
every policy sees the same trace for a given N. Prints a table, writes CSV and PNG under --out.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import heapq
import math
import random
import statistics
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from backends.llm.scheduler import Scheduler, SchedulerLimits, Take
from backends.settings import REPO_ROOT

DEFAULT_PROFILE = REPO_ROOT / "docs" / "data" / "replica_profile.csv"
POLICIES = ("round-robin", "least-queue", "epp", "epp-residency", "adapter-hash")
HASH_LOAD_BOUND = 1.25  # adapter-hash: a replica takes a request while its load <= 1.25 x the mean (+1)
SCRAPE_S = 0.05  # the endpoint picker's default --refresh-metrics-interval (50 ms)

# -- service-time model: least squares on the profile ------------------------------------------------------------
# decode: B rows, k distinct adapters, ctx = tokens in context summed over the rows; prefill: `rows` prompts
# left-padded to width w (T = rows x w padded tokens), lora = any row has an adapter. All times in ms.
# log2(B): a CPU step's cost per row falls as the batch grows (the profile: B=1 -> 2 costs +4%, 16 -> 32 +34%);
# with it the decode fit's R^2 goes from 0.958 to 0.987 on the measured profile.
DECODE_FEATURES: dict[str, Callable[[float, float, float], float]] = {
    "1": lambda B, k, ctx: 1.0,
    "B": lambda B, k, ctx: B,
    "log2B": lambda B, k, ctx: math.log2(B),
    "ctx/1k": lambda B, k, ctx: ctx / 1000.0,
    "lora": lambda B, k, ctx: 1.0 if k else 0.0,
    "k": lambda B, k, ctx: k,
}
PREFILL_FEATURES: dict[str, Callable[[float, float, float], float]] = {
    "1": lambda T, w, lora: 1.0,
    "T": lambda T, w, lora: T,
    "T*w/1k": lambda T, w, lora: T * w / 1000.0,
    "lora*T": lambda T, w, lora: T if lora else 0.0,
}


@dataclass
class Fit:
    coef: dict[str, float]
    r2: float
    max_rel_err: float
    points: int
    dropped: list[str] = field(default_factory=list)  # features whose coefficient came out negative


def least_squares(xs: Sequence[Sequence[float]], ys: Sequence[float], names: Sequence[str]) -> Fit:
    """Ordinary least squares; a feature whose coefficient comes out negative (an unphysical negative cost) is
    dropped and the rest refitted (a simple non-negative least squares)."""
    X, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    keep = list(range(len(names)))
    dropped: list[str] = []
    while True:
        beta, *_ = np.linalg.lstsq(X[:, keep], y, rcond=None)
        negative = [i for i, b in zip(keep, beta) if b < 0 and names[i] != "1"]
        if not negative:
            break
        worst = min(negative, key=lambda i: beta[keep.index(i)])
        keep.remove(worst)
        dropped.append(names[worst])
    coef = {n: 0.0 for n in names}
    for i, b in zip(keep, beta):
        coef[names[i]] = float(b)
    pred = X[:, keep] @ beta
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum()) or 1.0
    rel = float(np.max(np.abs(pred - y) / np.maximum(y, 1e-9))) if len(y) else 0.0
    return Fit(coef, 1.0 - ss_res / ss_tot, rel, len(y), dropped)


@dataclass
class ServiceModel:
    """One replica's timings (ms) and limits, as the simulation uses them."""

    decode: Fit
    prefill: Fit
    cold_load_ms: float  # disk -> host -> device slot
    warm_load_ms: float  # host -> device slot
    max_loras: int = 16
    max_cpu_loras: int = 64
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 1024
    kv_slots: int = 32  # KV-cache slots: the KV-usage metric is running / kv_slots
    # LoRACache.acquire does not touch the host LRU when the adapter already has a slot, so a hot adapter ages
    # out of host memory while it sits in a slot; True simulates touching it (a what-if, not our code today).
    touch_host_on_slot_hit: bool = False

    def decode_s(self, batch: int, k: int, ctx: float) -> float:
        c = self.decode.coef  # DECODE_FEATURES written out: this runs once per simulated step
        ms = (c["1"] + c["B"] * batch + c["log2B"] * math.log2(batch) + c["ctx/1k"] * ctx / 1000.0
              + (c["lora"] if k else 0.0) + c["k"] * k)
        return max(0.0, ms) / 1e3

    def prefill_s(self, rows: int, width: int, lora: bool) -> float:
        c = self.prefill.coef
        T = rows * width
        return max(0.0, sum(c[n] * f(T, width, lora) for n, f in PREFILL_FEATURES.items())) / 1e3


def read_profile(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(row: dict, key: str, default: float = 0.0) -> float:
    value = row.get(key)
    return float(value) if value not in (None, "") else default


def fit_profile(rows: list[dict]) -> ServiceModel:
    """The service model from profile rows (the CSV of `benchmarks.cluster.replica_profile`)."""
    dec = [r for r in rows if r["kind"] == "decode"]
    pre = [r for r in rows if r["kind"] == "prefill"]
    if not dec or not pre:
        raise ValueError("the profile needs decode and prefill rows")
    dx = [[f(_num(r, "batch"), _num(r, "distinct_adapters"), _num(r, "batch") * _num(r, "context_tokens"))
           for f in DECODE_FEATURES.values()] for r in dec]
    px = [[f(_num(r, "padded_tokens"), _num(r, "prompt_tokens"), _num(r, "distinct_adapters") > 0)
           for f in PREFILL_FEATURES.values()] for r in pre]
    loads = {r["kind"]: _num(r, "ms") for r in rows if r["kind"].startswith("load_")}
    if "load_cold" not in loads or "load_warm" not in loads:
        raise ValueError("the profile needs load_cold and load_warm rows")
    limits = rows[0]
    return ServiceModel(
        decode=least_squares(dx, [_num(r, "ms") for r in dec], list(DECODE_FEATURES)),
        prefill=least_squares(px, [_num(r, "ms") for r in pre], list(PREFILL_FEATURES)),
        cold_load_ms=loads["load_cold"], warm_load_ms=loads["load_warm"],
        max_loras=int(_num(limits, "max_loras", 16)), max_cpu_loras=int(_num(limits, "max_cpu_loras", 64)),
        max_num_seqs=int(_num(limits, "max_num_seqs", 32)),
        max_num_batched_tokens=int(_num(limits, "max_num_batched_tokens", 1024)),
        kv_slots=int(_num(limits, "max_num_seqs", 32)),
    )


# -- workload ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    adapters: int = 1000
    alpha: float = 1.0  # popularity of the i-th adapter ~ 1 / i^alpha
    prompt: tuple[int, int] = (8, 512)
    output: tuple[int, int] = (8, 512)
    base_share: float = 0.0  # requests for the base model (no adapter)


class Request:
    # num_prompt_tokens, adapter_keys, bypassed_steps: what backends.llm.scheduler.Scheduler reads
    __slots__ = ("rid", "arrival", "adapter", "num_prompt_tokens", "output", "adapter_keys", "bypassed_steps",
                 "replica", "first", "finish", "load", "done_step")

    def __init__(self, rid: int, arrival: float, adapter: int | None, prompt: int, output: int):
        self.rid, self.arrival, self.adapter = rid, arrival, adapter
        self.num_prompt_tokens, self.output = prompt, output
        self.adapter_keys = frozenset() if adapter is None else frozenset((adapter,))
        self.bypassed_steps = 0
        self.replica = -1
        self.first = self.finish = None
        self.load = ""  # "" (slot hit or no adapter), "warm" (host -> slot) or "cold" (disk -> host -> slot)
        self.done_step = -1


def make_trace(rate: float, duration: float, workload: Workload, seed: int) -> list[Request]:
    """Poisson arrivals at `rate` per second over `duration` seconds."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) ** workload.alpha for i in range(workload.adapters)]
    total = sum(weights)
    cumulative, acc = [], 0.0
    for w in weights:
        acc += w / total
        cumulative.append(acc)
    out: list[Request] = []
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return out
        adapter = None
        if rng.random() >= workload.base_share:
            adapter = min(bisect.bisect_left(cumulative, rng.random()), workload.adapters - 1)
        out.append(Request(len(out), t, adapter, rng.randint(*workload.prompt), rng.randint(*workload.output)))


# -- one replica ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Published:
    """The metrics a replica exposes: our engine's observer reports them after each step and right after it
    admits requests (`LLMEngine._report_queue`)."""

    time: float
    waiting: int
    kv_usage: float
    active: frozenset  # adapters of running requests (vllm:lora_requests_info running_lora_adapters)
    queued: frozenset  # adapters of waiting requests (waiting_lora_adapters)
    resident: frozenset  # adapters in device slots or host cache (the residency gauge)


class Replica:
    def __init__(self, index: int, model: ServiceModel, window: tuple[float, float], publishes: bool = True,
                 keep_resident: bool = False):
        self.index, self.model, self.window = index, model, window
        self.publishes, self.keep_resident = publishes, keep_resident
        limits = SchedulerLimits(max_num_seqs=min(model.max_num_seqs, model.kv_slots),
                                 max_num_batched_tokens=model.max_num_batched_tokens)
        self.scheduler = Scheduler(limits, lambda adapters: len(adapters) <= model.max_loras)
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}
        self.active: dict[int, int] = {}  # adapter -> running requests using it (= slots in use)
        self.queued: dict[int, int] = {}  # adapter -> waiting requests
        self.slots: OrderedDict[int, None] = OrderedDict()  # device slots, LRU order
        self.host: OrderedDict[int, None] = OrderedDict()  # host cache, LRU order
        self.finishing: dict[int, list[Request]] = {}  # step number -> requests that finish at its end
        self.step = 0
        self.busy = False
        self.batch = 0  # rows decoded in the current step
        self.admitted = 0
        self.ctx = 0  # tokens in context over the running requests
        self.outstanding = 0  # routed here and not finished (the least-queue router's own count)
        self.history: deque[Published] = deque(maxlen=64)
        self.history.append(Published(0.0, 0, 0.0, frozenset(), frozenset(), frozenset()))
        # counters over the measurement window
        self.tokens = 0
        self.cold = self.warm = self.admissions = 0
        self.steps = 0
        self.batch_sum = self.k_sum = 0
        self.cold_total = 0
        self.tokens_total = 0
        self.max_batch = self.max_k = 0

    # -- adapters: backends/lora/manager/cache.py's two tiers ---------------------------------------------------------
    def _acquire(self, adapter: int) -> tuple[float, str]:
        """Seconds the engine thread spends putting `adapter` in a slot, and which load it was."""
        if adapter in self.slots:  # a slot hit touches the device LRU only (LoRACache.acquire)
            self.slots.move_to_end(adapter)
            if self.model.touch_host_on_slot_hit and adapter in self.host:
                self.host.move_to_end(adapter)
            return 0.0, ""
        if adapter in self.host:
            self.host.move_to_end(adapter)
            cost, kind = self.model.warm_load_ms / 1e3, "warm"
        else:
            self.host[adapter] = None
            while len(self.host) > self.model.max_cpu_loras:
                self.host.popitem(last=False)
            cost, kind = self.model.cold_load_ms / 1e3, "cold"
        if len(self.slots) >= self.model.max_loras:  # evict the least recently used slot no running batch holds
            victim = next(a for a in self.slots if a not in self.active)
            del self.slots[victim]
        self.slots[adapter] = None
        return cost, kind

    def _in_window(self, t: float) -> bool:
        return self.window[0] <= t < self.window[1]

    # -- engine steps --------------------------------------------------------------------------------------------
    def enqueue(self, request: Request) -> None:
        self.waiting.append(request)
        self.outstanding += 1
        if request.adapter is not None:
            self.queued[request.adapter] = self.queued.get(request.adapter, 0) + 1

    def start_step(self, t: float, finished: list[Request]) -> float:
        """Admit, load, prefill, decode; returns when the step ends. Requests done at their prefill (one output
        token) go to `finished`."""
        # Scheduler.admit returns nothing (and counts no bypass) when no request waits or no sequence is free
        admitted = []
        if self.waiting and len(self.running) < self.scheduler.limits.max_num_seqs:
            budget, widest = self.scheduler.limits.max_num_batched_tokens, 0

            def take(r) -> Take:  # the profile's prefill: the admitted prompts padded into one forward
                nonlocal widest
                width = max(widest, r.num_prompt_tokens)
                if admitted and width * (len(admitted) + 1) > budget:
                    return Take.STOP
                admitted.append(r)
                widest = width
                return Take.ADMITTED

            self.scheduler.admit(self.waiting, self.running.values(), take)
        if admitted:
            n = len(admitted)
            if all(self.waiting[i] is admitted[i] for i in range(n)):
                for _ in range(n):
                    self.waiting.popleft()
            else:
                chosen = {r.rid for r in admitted}
                self.waiting = deque(r for r in self.waiting if r.rid not in chosen)
        load = 0.0
        lora = False
        width = 0
        counted = self._in_window(t)
        for r in admitted:
            width = max(width, r.num_prompt_tokens)
            if r.adapter is not None:
                lora = True
                a = r.adapter
                left = self.queued[a] - 1
                if left:
                    self.queued[a] = left
                else:
                    del self.queued[a]
                cost, r.load = self._acquire(a)
                load += cost
                self.active[a] = self.active.get(a, 0) + 1
                if r.load == "cold":
                    self.cold_total += 1
                if counted:
                    self.cold += r.load == "cold"
                    self.warm += r.load == "warm"
        first = t + load + (self.model.prefill_s(len(admitted), width, lora) if admitted else 0.0)
        if counted:
            self.admissions += len(admitted)
        for r in admitted:
            r.first = first
            if r.output <= 1:
                self._finish(r, first)
                finished.append(r)
                continue
            self.running[r.rid] = r
            r.done_step = self.step + r.output - 2  # the prefill gave token 1, each decode step one more
            self.finishing.setdefault(r.done_step, []).append(r)
            self.ctx += r.num_prompt_tokens + 1
        if admitted and self.publishes:  # the engine reports right after admitting (loads done, before prefill)
            self.publish(t + load)
        self.admitted = len(admitted)
        self.batch = len(self.running)
        decode = self.model.decode_s(self.batch, len(self.active), self.ctx) if self.batch else 0.0
        if admitted:
            self.max_batch = max(self.max_batch, self.batch + sum(r.output <= 1 for r in admitted))
        self.max_k = max(self.max_k, len(self.active))
        if counted and self.batch:
            self.steps += 1
            self.batch_sum += self.batch
            self.k_sum += len(self.active)
        self.busy = True
        return first + decode

    def _finish(self, r: Request, t: float) -> None:
        r.finish = t
        self.outstanding -= 1
        if r.adapter is not None:
            left = self.active[r.adapter] - 1
            if left:
                self.active[r.adapter] = left
            else:
                del self.active[r.adapter]

    def end_step(self, t: float) -> list[Request]:
        """The step's tokens are out: retire finished requests, publish metrics. Returns the finished ones."""
        self.ctx += self.batch
        self.tokens_total += self.batch + self.admitted
        if self._in_window(t):
            self.tokens += self.batch + self.admitted
        done = self.finishing.pop(self.step, [])
        for r in done:
            del self.running[r.rid]
            self.ctx -= r.num_prompt_tokens + r.output
            self._finish(r, t)
        self.step += 1
        self.busy = False
        if self.publishes:
            self.publish(t)
        return done

    def publish(self, t: float) -> None:
        resident = frozenset(self.slots) | frozenset(self.host) if self.keep_resident else frozenset()
        self.history.append(Published(t, len(self.waiting), len(self.running) / self.model.kv_slots,
                                      frozenset(self.active), frozenset(self.queued), resident))

    def seen_at(self, t: float) -> Published:
        """The newest metrics published at or before `t` (what a scrape at `t` read)."""
        for p in reversed(self.history):
            if p.time <= t:
                return p
        return self.history[0]

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)


# -- routers -------------------------------------------------------------------------------------------------------
def lora_affinity(adapter: int | None, m: Published, max_loras: int, residency: bool) -> float:
    """llm-d's lora-affinity-scorer (pkg/epp/framework/plugins/scheduling/scorer/loraaffinity), plus, with
    `residency`, 0.9 for a pod that holds the adapter in a slot or its host cache (not upstream)."""
    if adapter in m.active:
        return 1.0
    if residency and adapter in m.resident:
        return 0.9
    if len(m.active) + len(m.queued) < max_loras:
        return 0.8
    if adapter in m.queued:
        return 0.6
    return 0.0


def _mix(adapter: int, replica: int) -> int:
    """A fixed 64-bit hash of (adapter, replica) (splitmix64's finaliser): the same order on every run."""
    z = (adapter * 0x9E3779B97F4A7C15 + replica * 0xBF58476D1CE4E5B9 + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


class Router:
    def __init__(self, policy: str, replicas: list[Replica], seed: int, scrape_s: float = SCRAPE_S,
                 weights: tuple[float, float, float] = (1.0, 1.0, 1.0), hash_bound: float = HASH_LOAD_BOUND):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; one of {', '.join(POLICIES)}")
        self.policy, self.replicas = policy, replicas
        self.rng = random.Random(seed)
        self.scrape_s, self.weights, self.hash_bound = scrape_s, weights, hash_bound
        self.next = 0
        self._order: dict[int, list[int]] = {}  # adapter-hash: each adapter's replicas in preference order

    def pick(self, request: Request, t: float) -> int:
        n = len(self.replicas)
        if n == 1:
            return 0
        if self.policy == "round-robin":
            pick, self.next = self.next, (self.next + 1) % n
            return pick
        if self.policy == "least-queue" or (self.policy == "adapter-hash" and request.adapter is None):
            loads = [r.outstanding for r in self.replicas]
            low = min(loads)
            return self.rng.choice([i for i, q in enumerate(loads) if q == low])
        if self.policy == "adapter-hash":
            order = self._order.get(request.adapter)
            if order is None:
                order = self._order[request.adapter] = sorted(range(n), key=lambda i: _mix(request.adapter, i))
            bound = self.hash_bound * (sum(r.outstanding for r in self.replicas) + 1) / n
            return next((i for i in order if self.replicas[i].outstanding + 1 <= bound), order[0])
        scraped = math.floor(t / self.scrape_s) * self.scrape_s if self.scrape_s > 0 else t
        seen = [r.seen_at(scraped) for r in self.replicas]
        qs = [m.waiting for m in seen]
        qmin, qmax = min(qs), max(qs)
        wq, wkv, wl = self.weights
        residency = self.policy == "epp-residency"
        max_loras = self.replicas[0].model.max_loras
        scores = []
        for m in seen:
            queue = 1.0 if qmax == qmin else (qmax - m.waiting) / (qmax - qmin)
            scores.append(wq * queue + wkv * (1.0 - m.kv_usage)
                          + wl * lora_affinity(request.adapter, m, max_loras, residency))
        best = max(scores)
        return self.rng.choice([i for i, s in enumerate(scores) if s >= best - 1e-12])


# -- the cluster ---------------------------------------------------------------------------------------------------
@dataclass
class Result:
    policy: str
    replicas: int
    offered_rps: float
    window_s: float
    requests: int  # arrived in the window
    completed_rps: float
    tokens_per_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    cold_per_1k: float
    warm_per_1k: float
    mean_batch: float
    mean_distinct_adapters: float
    unfinished: int  # arrived in the window, no first token by the end
    held_per_1k: float  # requests of the window that hit the scheduler's bypass limit (LoRA slots full)
    cold_total: int = 0


def simulate(model: ServiceModel, replicas: int, policy: str, trace: list[Request], warmup: float,
             duration: float, seed: int = 0, scrape_s: float = SCRAPE_S, drain: bool = True,
             weights: tuple[float, float, float] = (1.0, 1.0, 1.0), max_time: float | None = None,
             record: dict | None = None, hash_bound: float = HASH_LOAD_BOUND) -> Result:
    """Run `trace` (fresh copies of its requests) through `replicas` replicas; measure over [warmup, duration).
    With `drain`, runs on after the last arrival until every request of the window has finished (TTFT of all of
    them), up to `max_time` (default 4 x duration). `record` (a dict) receives the simulated requests and
    replicas."""
    reqs = [Request(r.rid, r.arrival, r.adapter, r.num_prompt_tokens, r.output) for r in trace]
    window = (warmup, duration)
    reps = [Replica(i, model, window, publishes=policy.startswith("epp"), keep_resident=policy == "epp-residency")
            for i in range(replicas)]
    if record is not None:
        record.update(requests=reqs, replicas=reps)
    router = Router(policy, reps, seed, scrape_s, weights, hash_bound)
    events: list[tuple[float, int, int]] = []  # (time, tie-break, replica): step ends
    seq = 0
    limit = max_time if max_time is not None else 4 * duration
    measured = [r for r in reqs if warmup <= r.arrival < duration]
    pending = len(measured) if drain else 0
    completed = 0
    i = 0
    finished: list[Request] = []

    def start(rep: Replica, t: float) -> None:
        nonlocal seq
        end = rep.start_step(t, finished)
        seq += 1
        heapq.heappush(events, (end, seq, rep.index))

    def retire(done: Iterable[Request]) -> None:
        nonlocal completed, pending
        for r in done:
            if warmup <= r.finish < duration:
                completed += 1
            if drain and warmup <= r.arrival < duration:
                pending -= 1

    while True:
        t_arrival = reqs[i].arrival if i < len(reqs) else math.inf
        t_event = events[0][0] if events else math.inf
        if t_arrival == math.inf and t_event == math.inf:
            break
        if t_arrival <= t_event:
            r = reqs[i]
            i += 1
            rep = reps[router.pick(r, r.arrival)]
            r.replica = rep.index
            rep.enqueue(r)
            if not rep.busy:
                start(rep, r.arrival)
        else:
            t, _, idx = heapq.heappop(events)
            rep = reps[idx]
            retire(rep.end_step(t))
            if rep.has_work:
                start(rep, t)
        if finished:
            retire(finished)
            finished.clear()
        now = min(t_arrival, t_event)
        if now >= duration and (not drain or pending <= 0):
            break
        if now >= limit:
            break
    span = duration - warmup
    ttfts = sorted(r.first - r.arrival for r in measured if r.first is not None)
    admissions = sum(rep.admissions for rep in reps)
    steps = sum(rep.steps for rep in reps)
    return Result(
        policy=policy, replicas=replicas, offered_rps=len(reqs) / duration if duration else 0.0, window_s=span,
        requests=len(measured), completed_rps=completed / span, tokens_per_s=sum(rep.tokens for rep in reps) / span,
        ttft_p50_s=_quantile(ttfts, 0.5), ttft_p99_s=_quantile(ttfts, 0.99),
        cold_per_1k=1000.0 * sum(rep.cold for rep in reps) / admissions if admissions else 0.0,
        warm_per_1k=1000.0 * sum(rep.warm for rep in reps) / admissions if admissions else 0.0,
        mean_batch=sum(rep.batch_sum for rep in reps) / steps if steps else 0.0,
        mean_distinct_adapters=sum(rep.k_sum for rep in reps) / steps if steps else 0.0,
        unfinished=sum(1 for r in measured if r.first is None),
        held_per_1k=1000.0 * sum(1 for r in measured if r.bypassed_steps > SchedulerLimits().max_bypass_steps)
        / len(measured) if measured else 0.0,
        cold_total=sum(rep.cold_total for rep in reps),
    )


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def capacity_guess(model: ServiceModel, workload: Workload) -> float:
    """Requests/s of one replica if every step decoded a full batch of distinct adapters (a first guess only)."""
    batch = min(model.max_num_seqs, model.kv_slots)
    k = min(batch, model.max_loras) if workload.base_share < 1 else 0
    mean_out = sum(workload.output) / 2
    mean_in = sum(workload.prompt) / 2
    step = model.decode_s(batch, k, batch * (mean_in + mean_out / 2))
    prefill_per_request = model.prefill_s(1, int(mean_in), k > 0)
    return 1.0 / (mean_out * step / batch + prefill_per_request)


def one_replica_capacity(model: ServiceModel, workload: Workload, seed: int, duration: float, warmup: float,
                         overload: float) -> float:
    """Requests/s one replica completes when saturated: offered `overload` x a first guess, doubled until the
    replica completes clearly less than it is offered (its queue grows)."""
    rate = overload * capacity_guess(model, workload)
    for _ in range(6):
        trace = make_trace(rate, duration, workload, seed)
        one = simulate(model, 1, "round-robin", trace, warmup, duration, seed, drain=False)
        if one.completed_rps < 0.9 * rate:
            return one.completed_rps
        rate *= 2
    raise RuntimeError(f"one replica kept up with {rate / 2:.1f} req/s: the service model looks wrong")


# -- driver --------------------------------------------------------------------------------------------------------
def run_grid(model: ServiceModel, workload: Workload, replicas: Sequence[int], policies: Sequence[str],
             seed: int, duration: float, warmup: float, overload: float, rho: float, scrape_s: float = SCRAPE_S,
             weights: tuple[float, float, float] = (1.0, 1.0, 1.0), hash_bound: float = HASH_LOAD_BOUND,
             progress=None) -> tuple[float, float, list[dict]]:
    """The reference rate (one replica's saturated capacity, `one_replica_capacity`), then for every N and policy
    a saturation run at `overload` x that rate per replica and a latency run at `rho` x that rate per replica.
    Scaling = throughput / (N x one replica's throughput at the same per-replica offered load: the N = 1
    saturation run, the same for every policy). Returns (reference rate, one replica's throughput, rows)."""
    capacity = one_replica_capacity(model, workload, seed, duration, warmup, overload)

    def sat_trace(n: int) -> list[Request]:
        return make_trace(overload * capacity * n, duration, workload, seed * 1000 + n)

    one = simulate(model, 1, "round-robin", sat_trace(1), warmup, duration, seed + 1, scrape_s, drain=False)
    rows = []
    for n in replicas:
        saturating = sat_trace(n)
        load_trace = make_trace(rho * capacity * n, duration, workload, seed * 1000 + n + 500)
        for policy in policies:
            sat = simulate(model, n, policy, saturating, warmup, duration, seed + n, scrape_s, drain=False,
                           weights=weights, hash_bound=hash_bound)
            at = simulate(model, n, policy, load_trace, warmup, duration, seed + n, scrape_s, drain=True,
                          weights=weights, hash_bound=hash_bound)
            rows.append({
                "policy": policy, "replicas": n,
                "sat_offered_rps": round(sat.offered_rps, 4), "sat_rps": round(sat.completed_rps, 4),
                "sat_tok_s": round(sat.tokens_per_s, 2),
                "scaling": round(sat.completed_rps / (n * one.completed_rps), 4),
                "sat_cold_per_1k": round(sat.cold_per_1k, 2), "sat_mean_batch": round(sat.mean_batch, 2),
                "sat_mean_adapters": round(sat.mean_distinct_adapters, 2),
                "load_offered_rps": round(at.offered_rps, 4), "load_rps": round(at.completed_rps, 4),
                "load_tok_s": round(at.tokens_per_s, 2), "ttft_p50_s": round(at.ttft_p50_s, 3),
                "ttft_p99_s": round(at.ttft_p99_s, 3), "cold_per_1k": round(at.cold_per_1k, 2),
                "warm_per_1k": round(at.warm_per_1k, 2), "load_mean_batch": round(at.mean_batch, 2),
                "load_mean_adapters": round(at.mean_distinct_adapters, 2), "load_requests": at.requests,
                "load_unfinished": at.unfinished, "held_per_1k": round(at.held_per_1k, 2),
            })
            if progress is not None:
                progress()
    return capacity, one.completed_rps, rows


def validate(model: ServiceModel, rows: list[dict]) -> dict | None:
    """Replays the profile's engine burst (all requests at t=0, cold cache) through one simulated replica."""
    burst = [r for r in rows if r["kind"] == "engine_request"]
    if not burst:
        return None
    trace = [Request(i, 0.0, int(_num(r, "adapter")), int(_num(r, "prompt_tokens")), int(_num(r, "output_tokens")))
             for i, r in enumerate(burst)]
    sim = [Request(r.rid, r.arrival, r.adapter, r.num_prompt_tokens, r.output) for r in trace]
    rep = Replica(0, model, (0.0, math.inf), publishes=False)
    for r in sim:
        rep.enqueue(r)
    t, finished = 0.0, []
    while rep.has_work:
        t = rep.start_step(t, finished)
        rep.end_step(t)
    measured_end = max(_num(r, "finish_ms") for r in burst) / 1e3
    return {
        "requests": len(burst), "output_tokens": sum(r.output for r in trace),
        "measured_makespan_s": measured_end, "simulated_makespan_s": max(r.finish for r in sim),
        "measured_ttft_p50_s": statistics.median(_num(r, "ttft_ms") for r in burst) / 1e3,
        "simulated_ttft_p50_s": statistics.median(r.first for r in sim),
        "measured_finish_mean_s": statistics.mean(_num(r, "finish_ms") for r in burst) / 1e3,
        "simulated_finish_mean_s": statistics.mean(r.finish for r in sim),
    }


def print_model(console, model: ServiceModel, source: Path) -> None:
    from rich.table import Table

    table = Table(title=f"service model fitted from {source}")
    for c in ("part", "coefficients (ms)", "R^2", "max rel. err", "points", "dropped (negative)"):
        table.add_column(c)
    for name, fit in (("decode step", model.decode), ("prefill", model.prefill)):
        table.add_row(name, ", ".join(f"{k}: {v:.4g}" for k, v in fit.coef.items()), f"{fit.r2:.3f}",
                      f"{fit.max_rel_err:.1%}", str(fit.points), ", ".join(fit.dropped) or "-")
    table.add_row("adapter loads", f"cold (disk->host->slot) {model.cold_load_ms:.1f}, warm (host->slot) "
                  f"{model.warm_load_ms:.1f}", "", "", "", "")
    table.add_row("limits", f"max_loras {model.max_loras}, max_cpu_loras {model.max_cpu_loras}, max_num_seqs "
                  f"{model.max_num_seqs}, max_num_batched_tokens {model.max_num_batched_tokens}", "", "", "", "")
    console.print(table)


def main() -> None:
    from rich.console import Console
    from rich.table import Table
    from tqdm import tqdm

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", type=Path, default=DEFAULT_PROFILE)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench_out" / "cluster")
    p.add_argument("--replicas", type=int, nargs="+", default=list(range(1, 17)))
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--adapters", type=int, default=1000)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--prompt", type=int, nargs=2, default=[8, 512], metavar=("MIN", "MAX"))
    p.add_argument("--output", type=int, nargs=2, default=[8, 512], metavar=("MIN", "MAX"))
    p.add_argument("--base-share", type=float, default=0.0, help="share of requests for the base model")
    p.add_argument("--duration", type=float, default=1100.0, help="simulated seconds of arrivals per run")
    p.add_argument("--warmup", type=float, default=500.0,
                   help="simulated seconds before the measurement window (long enough to fill the host caches)")
    p.add_argument("--overload", type=float, default=1.5, help="saturation runs: offered load / capacity")
    p.add_argument("--rho", type=float, default=0.8, help="latency runs: offered load / capacity, per replica")
    p.add_argument("--scrape-ms", type=float, default=SCRAPE_S * 1e3, help="metrics refresh of the picker")
    p.add_argument("--weights", type=float, nargs=3, default=[1.0, 1.0, 1.0], metavar=("QUEUE", "KV", "LORA"),
                   help="epp scorer weights")
    p.add_argument("--hash-bound", type=float, default=HASH_LOAD_BOUND,
                   help="adapter-hash: load bound as a multiple of the mean (large = pure sharding)")
    p.add_argument("--max-loras", type=int, help="override the profile's max_loras")
    p.add_argument("--max-cpu-loras", type=int, help="override the profile's max_cpu_loras")
    p.add_argument("--cold-load-ms", type=float, help="override the measured cold load (e.g. an S3 download)")
    p.add_argument("--touch-host-on-slot-hit", action="store_true",
                   help="what-if: a slot hit also refreshes the adapter in the host LRU (LoRACache does not today)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--validate", action="store_true", help="only replay the profile's engine burst and compare")
    args = p.parse_args()
    console = Console(width=170)

    rows = read_profile(args.profile)
    model = fit_profile(rows)
    if args.max_loras:
        model.max_loras = args.max_loras
    if args.max_cpu_loras:
        model.max_cpu_loras = args.max_cpu_loras
    if args.cold_load_ms is not None:
        model.cold_load_ms = args.cold_load_ms
    model.touch_host_on_slot_hit = args.touch_host_on_slot_hit
    print_model(console, model, args.profile)
    check = validate(model, rows)
    if check:
        console.print("engine burst replayed on one simulated replica: " + ", ".join(
            f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in check.items()))
    if args.validate:
        return

    workload = Workload(args.adapters, args.alpha, tuple(args.prompt), tuple(args.output), args.base_share)
    started = time.perf_counter()
    bar = tqdm(total=len(args.replicas) * len(args.policies), desc="simulating", unit="run")
    capacity, one, results = run_grid(model, workload, args.replicas, args.policies, args.seed, args.duration,
                                 args.warmup, args.overload, args.rho, args.scrape_ms / 1e3, tuple(args.weights),
                                 args.hash_bound, progress=bar.update)
    bar.close()
    elapsed = time.perf_counter() - started

    table = Table(title=f"{args.adapters} adapters, alpha {args.alpha}, prompts {args.prompt[0]}-{args.prompt[1]}, "
                        f"outputs {args.output[0]}-{args.output[1]} tokens; reference rate (one replica saturated) "
                        f"{capacity:.3f} req/s; saturation = {args.overload}x, load = {args.rho}x it per replica; "
                        f"one replica at saturation {one:.3f} req/s; simulated in {elapsed:.0f} s")
    for c in ("policy", "N", "sat req/s", "sat tok/s", "vs N x one", "load req/s", "TTFT p50 s", "TTFT p99 s",
              "cold /1k", "warm /1k", "held /1k", "batch", "adapters/step"):
        table.add_column(c, justify="right")
    for r in sorted(results, key=lambda r: (POLICIES.index(r["policy"]), r["replicas"])):
        table.add_row(r["policy"], str(r["replicas"]), f"{r['sat_rps']:.2f}", f"{r['sat_tok_s']:.0f}",
                      f"{r['scaling']:.2f}", f"{r['load_rps']:.2f}", f"{r['ttft_p50_s']:.2f}",
                      f"{r['ttft_p99_s']:.2f}", f"{r['cold_per_1k']:.0f}", f"{r['warm_per_1k']:.0f}",
                      f"{r['held_per_1k']:.1f}",
                      f"{r['load_mean_batch']:.1f}", f"{r['load_mean_adapters']:.1f}")
    console.print(table)
    summarize(console, results)

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "cluster.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    meta = {"reference_rate_rps": capacity, "one_replica_saturated_rps": one, "workload": asdict(workload),
            "seed": args.seed, "duration": args.duration, "warmup": args.warmup, "overload": args.overload,
            "rho": args.rho, "scrape_ms": args.scrape_ms, "weights": args.weights, "hash_bound": args.hash_bound,
            "max_loras": model.max_loras, "max_cpu_loras": model.max_cpu_loras,
            "touch_host_on_slot_hit": model.touch_host_on_slot_hit, "decode": asdict(model.decode),
            "prefill": asdict(model.prefill), "cold_load_ms": model.cold_load_ms, "warm_load_ms": model.warm_load_ms,
            "validation": check}
    (args.out / "cluster_meta.txt").write_text("\n".join(f"{k}: {v}" for k, v in meta.items()) + "\n")
    plot(results, one, args.out / "cluster.png")
    console.print(f"wrote {args.out / 'cluster.csv'}, {args.out / 'cluster.png'} and {args.out / 'cluster_meta.txt'}")


def summarize(console, results: list[dict]) -> None:
    """The issue's targets, read off the results."""
    by = {(r["policy"], r["replicas"]): r for r in results}
    for policy in ("epp", "epp-residency"):
        ours = [r for r in results if r["policy"] == policy]
        if not ours:
            continue
        worst = min(ours, key=lambda r: r["scaling"])
        console.print(f"{policy}: saturation throughput >= 0.9 x N x one replica's for every N: "
                      f"{'yes' if worst['scaling'] >= 0.9 else 'NO'} (lowest {worst['scaling']:.2f} at "
                      f"N={worst['replicas']})")
        for n in sorted({r["replicas"] for r in ours}):
            rr = by.get(("round-robin", n))
            if rr and n == 8:
                mine = by[(policy, n)]["cold_per_1k"]
                ratio = rr["cold_per_1k"] / mine if mine else math.inf
                console.print(f"{policy}: cold loads per 1k at N=8: {mine:.0f} vs round-robin "
                              f"{rr['cold_per_1k']:.0f} ({ratio:.2f}x fewer; target 3x)")


def plot(results: list[dict], one: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    policies = [p for p in POLICIES if any(r["policy"] == p for r in results)]
    ns = sorted({r["replicas"] for r in results})
    for policy in policies:
        rows = sorted((r for r in results if r["policy"] == policy), key=lambda r: r["replicas"])
        x = [r["replicas"] for r in rows]
        axes[0][0].plot(x, [r["sat_rps"] for r in rows], "o-", ms=3, label=policy)
        axes[0][1].plot(x, [r["scaling"] for r in rows], "o-", ms=3, label=policy)
        axes[1][0].plot(x, [r["ttft_p99_s"] for r in rows], "o-", ms=3, label=policy)
        axes[1][1].plot(x, [r["cold_per_1k"] for r in rows], "o-", ms=3, label=policy)
    axes[0][0].plot(ns, [n * one for n in ns], "k:", lw=1, label="N x one replica")
    axes[0][0].plot(ns, [0.9 * n * one for n in ns], color="grey", ls="--", lw=1, label="0.9 x N x one")
    axes[0][1].axhline(0.9, color="grey", ls="--", lw=1)
    axes[1][0].set_yscale("log")
    titles = ("saturation throughput (req/s)", "throughput / (N x one replica's)",
              "TTFT p99 (s) at the latency load", "cold adapter loads per 1,000 requests")
    for ax, title in zip(axes.flat, titles):
        ax.set_title(title)
        ax.set_xlabel("replicas (N)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    axes[1][1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
