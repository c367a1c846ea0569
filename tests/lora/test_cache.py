"""Tiered LoRA cache: LRU in both tiers, byte budget, pinning, single-flight loads, in-use protection, counters."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from backends.errors import InvalidArgument
from backends.lora.adapters.files import AdapterError
from backends.lora.manager.cache import NoFreeSlot
from backends.lora.manager.request import AdapterRef
from backends.lora.store.ids import stable_lora_int_id
from tools.fixtures.adapters import ALL_PROJECTIONS, counting_cache, make_random_adapter, tiny_llama


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [make_random_adapter(tiny_llama, root / f"a{i}", seed=i, r=4, lora_alpha=8,
                                target_modules=ALL_PROJECTIONS) for i in range(5)]


def refs(folders):
    return [AdapterRef(stable_lora_int_id(str(f)), f.name, str(f)) for f in folders]




def test_host_tier_is_lru(folders):
    cache, loader = counting_cache(max_cpu_loras=3)
    a, b, c, d, _ = refs(folders)
    for r in (a, b, c, a, d):  # d evicts b, the least recently used (a was touched again)
        cache.get(r)
    assert cache.host_ids() == [c.int_id, a.int_id, d.int_id]
    cache.get(b)
    assert loader.calls == ["a0", "a1", "a2", "a3", "a1"]
    s = cache.stats()
    assert (s.misses, s.hits, s.loads, s.host_evictions) == (5, 1, 5, 2)
    assert s.bytes_loaded > 0 and s.load_seconds > 0


def test_byte_budget_bounds_host_tier(folders):
    one = counting_cache()[0].get(refs(folders)[0]).nbytes
    cache, _ = counting_cache(max_cpu_loras=5, max_cpu_bytes=int(2.5 * one))
    for r in refs(folders):
        cache.get(r)
    assert len(cache.host_ids()) == 2 and cache.host_bytes <= 2.5 * one


def test_single_flight_load(folders):
    cache, loader = counting_cache(delay=0.3)
    ref = refs(folders)[0]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: cache.get(ref), range(8)))
    assert loader.calls == ["a0"]
    assert all(r is results[0] for r in results)


def test_failed_load_is_reported_to_every_waiter_and_retried_later(tmp_path, folders):
    cache, loader = counting_cache(delay=0.2)
    broken = AdapterRef(1, "broken", str(tmp_path))  # a folder without adapter_config.json
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(cache.get, broken) for _ in range(4)]
    for f in futures:
        with pytest.raises(AdapterError, match="adapter_config.json is missing"):
            f.result()
    assert loader.calls == ["broken"]
    with pytest.raises(AdapterError):
        cache.get(broken)
    assert loader.calls == ["broken", "broken"] and cache.stats().load_failures == 2


def test_device_slots_hold_weights_and_evict_lru_when_free(folders):
    cache, _ = counting_cache(max_loras=2, max_cpu_loras=4)
    a, b, c, *_ = refs(folders)
    assert cache.acquire([a, b, a]) == [0, 1, 0]
    layer = cache.context.layers["model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(layer.lora_A[1, :4], cache.get(b).modules[layer.name].A)
    assert torch.count_nonzero(layer.lora_A[1, 4:]) == 0  # rank 4 zero-padded to max_rank 8
    with pytest.raises(NoFreeSlot):
        cache.acquire([c])  # both slots in use by the "running" batch
    cache.release([a, b, a])
    cache.acquire([b])
    cache.release([b])
    assert cache.acquire([c]) == [0]  # a was least recently used
    assert cache.device_ids() == [b.int_id, c.int_id] and cache.stats().device_evictions == 1
    torch.testing.assert_close(layer.lora_A[0, :4], cache.get(c).modules[layer.name].A)


def test_more_distinct_adapters_than_slots_in_one_batch_is_refused(folders):
    cache, _ = counting_cache(max_loras=2)
    with pytest.raises(InvalidArgument, match="3 distinct LoRA adapters in one batch, max_loras is 2"):
        cache.acquire(refs(folders)[:3])
    assert cache.acquire(refs(folders)[:2]) == [0, 1]  # nothing was left half-acquired


def test_pinned_adapters_are_never_evicted_and_overpinning_fails(folders):
    cache, loader = counting_cache(max_loras=2, max_cpu_loras=2)
    a, b, c, d, _ = refs(folders)
    cache.pin(a)
    for r in (b, c, d, b, c, d):
        with cache.activate([r]):
            pass
    assert a.int_id in cache.host_ids() and a.int_id in cache.device_ids()
    assert loader.calls.count("a0") == 1
    cache.pin(b)  # two pinned fill both slots: allowed, but nothing else can run now
    with pytest.raises(NoFreeSlot):
        cache.acquire([c])
    with pytest.raises(InvalidArgument, match="cannot pin LoRA adapter 'a2': 2 adapters are pinned already"):
        cache.pin(c)


def test_in_use_adapter_survives_concurrent_churn(folders):
    cache, _ = counting_cache(max_loras=3, max_cpu_loras=3)
    a, *others = refs(folders)
    slot = cache.acquire([a])[0]
    expected = cache.context.layers["model.layers.1.mlp.down_proj"].lora_B[slot].clone()
    errors = []

    def churn(r):
        for _ in range(10):
            try:
                with cache.activate([r]):
                    pass
            except NoFreeSlot:
                pass
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=churn, args=(r,)) for r in others]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert cache.slot_of(a.int_id) == slot
    assert torch.equal(cache.context.layers["model.layers.1.mlp.down_proj"].lora_B[slot], expected)
    cache.release([a])


def test_remove_frees_both_tiers_but_not_while_running(folders):
    cache, _ = counting_cache()
    a = refs(folders)[0]
    slot = cache.acquire([a])[0]
    with pytest.raises(Exception, match="in use by a running batch"):
        cache.remove(a.int_id)
    cache.release([a])
    assert cache.remove(a.int_id)
    assert a.int_id not in cache.host_ids() and cache.slot_of(a.int_id) is None
    assert torch.count_nonzero(cache.context.layers["model.layers.0.self_attn.q_proj"].lora_A[slot]) == 0


def test_a_freed_slot_is_reused_lowest_first(folders):
    """The dense decode shrink reads every slot between the lowest and highest in use: new adapters must fill the
    lowest free slot, not the one freed last."""
    cache, _ = counting_cache(max_loras=4, max_cpu_loras=4)
    a, b, c, d = refs(folders)[:4]
    assert [cache.acquire([r])[0] for r in (a, b, c)] == [0, 1, 2]
    cache.release([a, b, c])
    assert cache.remove(a.int_id) and cache.remove(c.int_id)  # frees 0, then 2
    assert cache.acquire([d])[0] == 0
