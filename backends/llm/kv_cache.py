"""Paged KV cache: fixed-size blocks of token keys/values within a memory budget, and each sequence's block table.

Every layer owns one `keys` and one `values` pool `[(num_blocks + 1) * block_size, kv_heads, head_dim]` (token-major:
token t of block b sits at row b * block_size + t), allocated zeroed at load and never reallocated, so every step
writes and reads fixed addresses (what the CUDA-graph decode step needs). A sequence holds a list of blocks (its
block table) covering its tokens; it takes a block when it crosses a block boundary and gives them all back when it
leaves, so nothing of anyone else's cache moves on join or leave and no sequence reserves `max_model_len` tokens.
Which block is whose, and the prefix cache over full blocks, is `blocks.BlockPool`'s job; the forward's reads and
writes through the block tables are `paged_attention`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backends.llm.blocks import BlockPool

MiB = 1 << 20
DEFAULT_BLOCK_SIZE = 16  # vLLM's default on GPU: fine-grained prefix sharing, little waste per sequence


@dataclass(frozen=True)
class KVShape:
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, config, dtype: torch.dtype) -> "KVShape":
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(int(config.num_hidden_layers), int(kv_heads), int(head_dim), dtype)

    @property
    def bytes_per_token(self) -> int:
        """Keys and values of one token in every layer."""
        return self.num_layers * 2 * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()


def plan_num_blocks(shape: KVShape, block_size: int, budget_bytes: int) -> int:
    """How many blocks of `block_size` tokens the budget holds; a budget below one block is a clear error."""
    per_block = shape.bytes_per_token * block_size
    blocks = budget_bytes // per_block
    if blocks < 1:
        raise ValueError(
            f"the KV-cache budget of {budget_bytes / MiB:.2f} MiB cannot hold one block of {block_size} tokens: "
            f"that needs {per_block / MiB:.2f} MiB ({shape.bytes_per_token} bytes per token); raise "
            f"kv_cache_memory_bytes or lower block_size"
        )
    return int(blocks)


class PagedKVCache:
    def __init__(self, shape: KVShape, num_blocks: int, block_size: int, device: torch.device | str,
                 prefix_caching: bool = True):
        self.shape, self.num_blocks, self.block_size = shape, num_blocks, block_size
        self.device = torch.device(device)
        # + the null block 0 (what padded reads see) and a trash block (where padded rows of a graph step write)
        rows = (num_blocks + 2) * block_size
        self.trash_row = (num_blocks + 1) * block_size
        # Zeroed, not empty: padded reads land on the null block, and 0 x NaN from stale memory would be NaN.
        dims = (rows, shape.kv_heads, shape.head_dim)
        self.keys = [torch.zeros(dims, dtype=shape.dtype, device=self.device) for _ in range(shape.num_layers)]
        self.values = [torch.zeros(dims, dtype=shape.dtype, device=self.device) for _ in range(shape.num_layers)]
        self.pool = BlockPool(num_blocks, block_size, prefix_caching)

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_size * self.shape.bytes_per_token

    @property
    def num_tokens(self) -> int:
        """Tokens the whole cache holds: the most one sequence can ever have."""
        return self.num_blocks * self.block_size

    @property
    def usage(self) -> float:
        return self.pool.usage

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
