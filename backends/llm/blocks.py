"""KV-cache blocks: who holds which block, and the prefix cache over full blocks (torch-free).

Blocks are numbered 1..num_blocks; block 0 is the null block (zeroed, never handed out) that padded gather indices
point at, so a masked key/value is always a finite zero. A block has a reference count: a sequence's block table
holds one reference per block, and a prefix-cached block may be in several tables at once.

Prefix cache: every full block of a sequence's tokens gets a hash chained over the previous block's hash, its
tokens and the **content identity of the adapter stack** it was computed with (digest of the weights the forward
used, and each scale), never the adapter's name: an adapter rewritten on disk has other weights, so its blocks get
other hashes and a request never reads KV computed by the old files (vLLM keys on the name, vllm#30931). A block
whose last reference goes stays cached (evictable) until its memory is needed: allocation takes never-hashed free
blocks first, then evicts the least recently released cached block (LRU).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Sequence

NULL_BLOCK = 0


def adapter_identity(pairs: Sequence[tuple[bytes, float]]) -> bytes:
    """The identity of a LoRA stack for the prefix cache: (content digest, scale) per adapter, in order; scale-0
    adapters add nothing to the forward, so they are left out (a stack of only scale-0 adapters is the base)."""
    return b"".join(digest + repr(float(scale)).encode() + b";" for digest, scale in pairs if scale != 0)


def block_hashes(tokens: Sequence[int], block_size: int, identity: bytes) -> list[bytes]:
    """One hash per full block of `tokens`, each chained over the one before."""
    hashes: list[bytes] = []
    parent = identity
    for start in range(0, len(tokens) - block_size + 1, block_size):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(b"".join(t.to_bytes(4, "little", signed=False) for t in tokens[start:start + block_size]))
        parent = h.digest()
        hashes.append(parent)
    return hashes


@dataclass
class PrefixStats:
    queries: int = 0  # prompt tokens looked up (vllm:prefix_cache_queries)
    hits: int = 0  # of those, tokens found cached (vllm:prefix_cache_hits)


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("a block pool needs at least one block")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self._free: deque[int] = deque(range(1, num_blocks + 1))  # never hashed (or unhashed): taken first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # hashed, unreferenced; oldest release first
        self._refs = [0] * (num_blocks + 1)
        self._by_hash: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self.stats = PrefixStats()

    @property
    def num_free(self) -> int:
        """Blocks an allocation can get now (free or evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def usage(self) -> float:
        """Share of the blocks held by sequences (vllm:kv_cache_usage_perc; cached unreferenced blocks are free)."""
        return self.num_used / self.num_blocks

    @property
    def num_cached(self) -> int:
        return len(self._hash_of)

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks (refcount 1), or ValueError when fewer are free (callers check `num_free` first)."""
        if n > self.num_free:
            raise ValueError(f"{n} KV blocks wanted, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                del self._by_hash[self._hash_of.pop(block)]
            self._refs[block] = 1
            out.append(block)
        return out

    def match(self, hashes: Sequence[bytes], max_blocks: int) -> list[int]:
        """The cached blocks of the longest cached prefix of `hashes` (at most `max_blocks`), each referenced once
        more; counts the lookup in `stats` (in tokens)."""
        found: list[int] = []
        if self.prefix_caching:
            for h in hashes[:max_blocks]:
                block = self._by_hash.get(h)
                if block is None:
                    break
                found.append(block)
        for block in found:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
        return found

    def count_lookup(self, queried_tokens: int, hit_tokens: int) -> None:
        self.stats.queries += queried_tokens
        self.stats.hits += hit_tokens

    def cache(self, block: int, block_hash: bytes) -> None:
        """Publish a full block under its hash (a block already published under another hash keeps it; a hash
        already held by another block leaves this one private)."""
        if self.prefix_caching and block not in self._hash_of and block_hash not in self._by_hash:
            self._by_hash[block_hash] = block
            self._hash_of[block] = block_hash

    def release(self, blocks: Sequence[int], keep_cached: bool = True) -> None:
        """Drop one reference per block (a block table's, newest block first so the prefix is evicted last).
        `keep_cached=False` (the sequence failed: its KV may be garbage) unpublishes the blocks it frees."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            if block in self._hash_of and keep_cached:
                self._evictable[block] = None
                continue
            if block in self._hash_of:
                del self._by_hash[self._hash_of.pop(block)]
            self._free.append(block)

    def reset_prefix_cache(self) -> int:
        """Forget every cached unreferenced block (vLLM's /reset_prefix_cache); returns how many."""
        count = len(self._evictable)
        for block in list(self._evictable):
            del self._by_hash[self._hash_of.pop(block)]
            self._free.append(block)
        self._evictable.clear()
        return count
