"""The cluster simulation's mechanics (benchmarks/cluster/simulate.py) on tiny configurations: fits, conservation,
cache tiers, routing. Pure Python, no model: a few seconds."""

from __future__ import annotations

import csv
import math
from dataclasses import asdict

import pytest

from benchmarks.cluster.simulate import (
    DECODE_FEATURES,
    POLICIES,
    Fit,
    Published,
    Replica,
    Request,
    Router,
    ServiceModel,
    Workload,
    fit_profile,
    lora_affinity,
    make_trace,
    one_replica_capacity,
    read_profile,
    simulate,
    validate,
)

DECODE = {"1": 30.0, "B": 2.0, "log2B": 0.0, "ctx/1k": 2.0, "lora": 10.0, "k": 1.5}
PREFILL = {"1": 25.0, "T": 0.6, "T*w/1k": 0.2, "lora*T": 0.05}


def model(decode=DECODE, prefill=PREFILL, cold=30.0, warm=5.0, **limits) -> ServiceModel:
    return ServiceModel(Fit(dict(decode), 1.0, 0.0, 0), Fit(dict(prefill), 1.0, 0.0, 0), cold, warm, **limits)


SMALL = dict(max_loras=4, max_cpu_loras=8, max_num_seqs=8, kv_slots=8, max_num_batched_tokens=256)
SKEWED = Workload(adapters=40, alpha=1.0, prompt=(8, 64), output=(4, 32))


def write_profile(path, decode: dict, prefill: dict, cold: float, warm: float) -> None:
    """A profile CSV in benchmarks.cluster.replica_profile's layout whose times follow the given coefficients
    exactly."""
    limits = {"max_loras": 16, "max_cpu_loras": 64, "max_num_seqs": 32, "max_num_batched_tokens": 1024}
    rows = []
    for batch in (1, 2, 4, 8, 16, 32):
        for k in (0, 1, 4, 8, 16):
            for ctx in (128, 512):
                if k <= batch:
                    ms = (decode["1"] + decode["B"] * batch + decode["log2B"] * math.log2(batch)
                          + decode["ctx/1k"] * batch * ctx / 1000 + decode["lora"] * (k > 0) + decode["k"] * k)
                    rows.append({"kind": "decode", "batch": batch, "distinct_adapters": k, "context_tokens": ctx,
                                 "ms": ms, **limits})
    for n, t in ((1, 16), (1, 64), (1, 256), (1, 1024), (4, 64), (4, 256), (8, 128), (16, 64)):
        for lora in (False, True):
            T = n * t
            ms = prefill["1"] + prefill["T"] * T + prefill["T*w/1k"] * T * t / 1000 + prefill["lora*T"] * T * lora
            rows.append({"kind": "prefill", "rows": n, "prompt_tokens": t, "padded_tokens": T,
                         "distinct_adapters": min(n, 16) if lora else 0, "ms": ms, **limits})
    rows += [{"kind": "load_cold", "ms": cold, **limits}, {"kind": "load_warm", "ms": warm, **limits}]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)


def test_fit_recovers_known_parameters(tmp_path):
    decode = {"1": 41.0, "B": 3.3, "log2B": 6.5, "ctx/1k": 1.7, "lora": 12.0, "k": 0.9}
    prefill = {"1": 18.0, "T": 0.71, "T*w/1k": 0.35, "lora*T": 0.08}
    write_profile(tmp_path / "p.csv", decode, prefill, cold=27.5, warm=4.25)
    fitted = fit_profile(read_profile(tmp_path / "p.csv"))
    assert fitted.decode.coef == pytest.approx(decode, rel=1e-6)
    assert fitted.prefill.coef == pytest.approx(prefill, rel=1e-6)
    assert fitted.decode.r2 == pytest.approx(1.0) and fitted.prefill.r2 == pytest.approx(1.0)
    assert (fitted.cold_load_ms, fitted.warm_load_ms) == (27.5, 4.25)
    assert (fitted.max_loras, fitted.max_cpu_loras, fitted.max_num_seqs) == (16, 64, 32)
    # and the model evaluates what it was fitted on (decode_s writes the features out by hand: keep them equal)
    assert fitted.decode_s(8, 4, 8 * 512) * 1e3 == pytest.approx(41 + 3.3 * 8 + 6.5 * 3 + 1.7 * 8 * 512 / 1000 + 12
                                                                  + 0.9 * 4)
    for batch, k, ctx in ((1, 0, 10), (5, 1, 700), (32, 16, 9000)):
        by_features = sum(fitted.decode.coef[n] * f(batch, k, ctx) for n, f in DECODE_FEATURES.items())
        assert fitted.decode_s(batch, k, ctx) * 1e3 == pytest.approx(by_features)


def test_fit_drops_a_negative_cost(tmp_path):
    """A feature the data says costs less than nothing is dropped, not used to predict negative times."""
    write_profile(tmp_path / "p.csv", {"1": 30.0, "B": 2.0, "log2B": 3.0, "ctx/1k": 1.0, "lora": 10.0, "k": -0.5},
                  dict(PREFILL), 30.0, 5.0)
    fitted = fit_profile(read_profile(tmp_path / "p.csv"))
    assert "k" in fitted.decode.dropped and fitted.decode.coef["k"] == 0.0
    assert all(v >= 0 for v in fitted.decode.coef.values())


def test_every_request_completes_once_and_tokens_add_up():
    m = model(**SMALL)
    trace = make_trace(6.0, 60.0, SKEWED, seed=3)
    for policy in POLICIES:
        record: dict = {}
        simulate(m, 3, policy, trace, warmup=0.0, duration=60.0, seed=1, record=record)
        reqs, reps = record["requests"], record["replicas"]
        assert len(reqs) == len(trace)
        assert all(r.finish is not None and r.arrival <= r.first <= r.finish for r in reqs), policy
        assert all(0 <= r.replica < 3 for r in reqs)
        # each request was routed, admitted and retired exactly once: nothing is left anywhere
        assert all(not rep.waiting and not rep.running and not rep.active and not rep.queued for rep in reps)
        assert all(rep.outstanding == 0 and rep.ctx == 0 and not rep.finishing for rep in reps)
        assert sum(rep.tokens_total for rep in reps) == sum(r.output for r in trace)
        # the engine's limits held at every step
        assert max(rep.max_batch for rep in reps) <= SMALL["max_num_seqs"]
        assert max(rep.max_k for rep in reps) <= SMALL["max_loras"]
        assert all(len(rep.host) <= SMALL["max_cpu_loras"] and len(rep.slots) <= SMALL["max_loras"] for rep in reps)


def test_one_request_timeline_is_the_service_model():
    """Cold load + prefill, then one decode step per further token (context cost off, so each step is equal)."""
    m = model(decode={**DECODE, "ctx/1k": 0.0})
    record: dict = {}
    simulate(m, 1, "round-robin", [Request(0, 1.0, 7, 100, 5)], warmup=0.0, duration=2.0, record=record)
    r = record["requests"][0]
    first = 1.0 + m.cold_load_ms / 1e3 + m.prefill_s(1, 100, True)
    assert r.first == pytest.approx(first) and r.load == "cold"
    assert r.finish == pytest.approx(first + 4 * m.decode_s(1, 1, 0))


def test_host_and_slot_tiers():
    """A slot hit is free, a host hit costs the warm load, a miss the cold one; LRU eviction in both tiers."""
    rep = Replica(0, model(max_loras=2, max_cpu_loras=3), (0.0, 1e9))
    assert rep._acquire(1) == (0.03, "cold")
    assert rep._acquire(1) == (0.0, "")
    rep._acquire(2)
    rep._acquire(3)  # evicts slot of 1 (least recently used, not running), host holds 1, 2, 3
    assert list(rep.slots) == [2, 3] and list(rep.host) == [1, 2, 3]
    assert rep._acquire(1) == (0.005, "warm")
    rep._acquire(4)  # host over 3: 1 was touched by its warm load, so 2 goes
    assert list(rep.host) == [3, 1, 4]
    rep.active = {1: 1, 4: 1}  # both slots held by running requests: never evicted
    with pytest.raises(StopIteration):
        rep._acquire(5)


def test_single_adapter_no_cold_loads_after_warmup():
    one = Workload(adapters=1, alpha=1.0, prompt=(8, 64), output=(4, 32))
    m = model(**SMALL)
    trace = make_trace(8.0, 60.0, one, seed=0)
    for policy in POLICIES:
        res = simulate(m, 4, policy, trace, warmup=10.0, duration=60.0, seed=0)
        assert res.cold_per_1k == 0 and res.warm_per_1k == 0, policy
        assert 1 <= res.cold_total <= 4  # each replica that got traffic loaded it once
        assert res.requests > 300


def test_one_replica_all_policies_agree():
    m = model(**SMALL)
    trace = make_trace(5.0, 40.0, SKEWED, seed=2)
    results = [asdict(simulate(m, 1, p, trace, warmup=5.0, duration=40.0, seed=9)) for p in POLICIES]
    for r in results:
        r.pop("policy")
    assert all(r == results[0] for r in results[1:])
    assert results[0]["cold_per_1k"] > 0  # the trace did exercise the cache


def test_affinity_routing_gives_fewer_cold_loads_on_a_skewed_trace():
    m = model(**SMALL)
    capacity = one_replica_capacity(m, SKEWED, 0, 60.0, 10.0, 1.5)
    cold = {p: 0.0 for p in POLICIES}
    for seed in range(3):
        trace = make_trace(0.7 * 4 * capacity, 100.0, SKEWED, seed)
        for p in POLICIES:
            cold[p] += simulate(m, 4, p, trace, warmup=20.0, duration=100.0, seed=seed).cold_per_1k
    assert cold["epp"] < 0.92 * cold["round-robin"]
    assert cold["epp-residency"] < cold["epp"]


def test_deterministic_for_a_seed():
    m = model(**SMALL)
    a = simulate(m, 3, "epp", make_trace(6.0, 30.0, SKEWED, 5), 5.0, 30.0, seed=5)
    b = simulate(m, 3, "epp", make_trace(6.0, 30.0, SKEWED, 5), 5.0, 30.0, seed=5)
    c = simulate(m, 3, "epp", make_trace(6.0, 30.0, SKEWED, 6), 5.0, 30.0, seed=5)
    assert asdict(a) == asdict(b)
    assert asdict(a) != asdict(c)


def test_saturation_throughput_scales_with_replicas():
    """Offered well above capacity, N replicas complete about N times one replica's requests."""
    m = model(**SMALL)
    capacity = one_replica_capacity(m, SKEWED, 0, 60.0, 10.0, 1.5)
    res = simulate(m, 4, "round-robin", make_trace(1.5 * 4 * capacity, 60.0, SKEWED, 1), 10.0, 60.0, drain=False)
    assert 0.85 < res.completed_rps / (4 * capacity) < 1.15
    assert res.unfinished > 0  # it was saturated: requests were still waiting at the end


def test_lora_affinity_scores_follow_upstream():
    state = Published(0.0, 0, 0.0, frozenset({1, 2}), frozenset({3}), frozenset({4}))
    assert lora_affinity(1, state, 4, residency=False) == 1.0  # running there
    assert lora_affinity(3, state, 4, residency=False) == 0.8  # 2 running + 1 waiting < 4 slots: capacity
    assert lora_affinity(4, state, 3, residency=False) == 0.0  # full, neither running nor waiting
    assert lora_affinity(3, state, 3, residency=False) == 0.6  # full, but waiting there
    assert lora_affinity(4, state, 3, residency=True) == 0.9  # resident in its caches (our variant)


def test_epp_prefers_the_replica_running_the_adapter_and_reads_scraped_metrics():
    m = model(**SMALL)
    reps = [Replica(i, m, (0.0, 1e9)) for i in range(3)]
    reps[2].history.append(Published(0.10, 0, 0.0, frozenset({7}), frozenset(), frozenset()))
    router = Router("epp", reps, seed=0, scrape_s=0.05)
    # at t=0.12 the last scrape (t=0.10) saw adapter 7 running on replica 2
    assert {router.pick(Request(0, 0.12, 7, 10, 10), 0.12) for _ in range(20)} == {2}
    # at t=0.09 the scrape at 0.05 predates it: all replicas score the same, ties go at random
    assert len({router.pick(Request(0, 0.09, 7, 10, 10), 0.09) for _ in range(50)}) == 3
    # a long waiting queue outweighs the affinity
    reps[2].history.append(Published(0.15, 9, 0.9, frozenset({7}), frozenset(), frozenset()))
    assert router.pick(Request(0, 0.2, 7, 10, 10), 0.2) != 2


def test_validate_replays_an_engine_burst():
    rows = [{"kind": "engine_request", "prompt_tokens": "40", "output_tokens": "3", "adapter": "0",
             "ttft_ms": "100", "finish_ms": "300"},
            {"kind": "engine_request", "prompt_tokens": "20", "output_tokens": "5", "adapter": "1",
             "ttft_ms": "100", "finish_ms": "500"}]
    m = model(decode={**DECODE, "ctx/1k": 0.0})
    out = validate(m, rows)
    first = 2 * m.cold_load_ms / 1e3 + m.prefill_s(2, 40, True)
    assert out["simulated_ttft_p50_s"] == pytest.approx(first)
    assert out["simulated_makespan_s"] == pytest.approx(first + 2 * m.decode_s(2, 2, 0) + 2 * m.decode_s(1, 1, 0))
    assert out["measured_makespan_s"] == pytest.approx(0.5)


def test_adapter_hash_keeps_an_adapter_home_until_it_is_overloaded():
    m = model(**SMALL)
    reps = [Replica(i, m, (0.0, 1e9)) for i in range(4)]
    router = Router("adapter-hash", reps, seed=0)
    homes = {a: router.pick(Request(0, 0.0, a, 10, 10), 0.0) for a in range(40)}
    assert len(set(homes.values())) == 4  # the adapters spread over all replicas
    assert all(router.pick(Request(0, 0.0, a, 10, 10), 0.0) == homes[a] for a in range(40))  # and stay put
    reps[homes[0]].outstanding = 10  # far above 1.25 x the mean: the next replica in its order takes it
    assert router.pick(Request(0, 0.0, 0, 10, 10), 0.0) != homes[0]


def test_a_replica_publishes_its_admissions_before_the_prefill():
    """As the engine reports right after admitting: a router sees the new adapter running before its first token."""
    m = model(**SMALL)
    rep = Replica(0, m, (0.0, 1e9))
    rep.enqueue(Request(0, 0.0, 5, 50, 10))
    end = rep.start_step(0.0, [])
    admitted_at = m.cold_load_ms / 1e3
    assert rep.seen_at(admitted_at).active == frozenset({5}) and rep.seen_at(admitted_at).kv_usage == 1 / 8
    assert rep.seen_at(admitted_at / 2).active == frozenset()  # not before the loads are done
    rep.end_step(end)
    assert rep.seen_at(end).time == end
