"""The native forward pass's paged KV cache (after nano-vllm's ``block_manager.py``): per layer one keys
and one values tensor of ``[blocks, kv_heads, BLOCK, head_dim]``, sized by a budget of memory
(``kv_cache_memory``), and which blocks hold which sequence's columns (its block table row,
``Sequence.blocks``). Blocks are counted references: a prompt in the prefix cache and the sequences that
start with it share its whole blocks.

The tensors are allocated once and not written until used, so the memory they take is what the batch
has used at most: the lowest free block is always taken first, which keeps that set small.
"""

from __future__ import annotations

import heapq

import torch

BLOCK = 16  # columns (tokens) a block holds: a power of two, at least 16 (kernels/forward.cpp)


def blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK)


class BlockPool:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, budget: int,
                 device: torch.device | str = "cpu"):
        self.block_bytes = 2 * layers * kv_heads * BLOCK * head_dim * torch.empty(0, dtype=dtype).element_size()
        self.num_blocks = max(1, budget // self.block_bytes)
        shape = (self.num_blocks, kv_heads, BLOCK, head_dim)
        self.kv = [(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
                   for _ in range(layers)]
        self.free = list(range(self.num_blocks))  # a heap: the lowest free block first
        self.refs = [0] * self.num_blocks

    @classmethod
    def for_model(cls, model, budget: int) -> BlockPool:
        """A pool for a ``lean.LeanCausalLM`` on its dtype and device, within ``budget`` bytes."""
        return cls(len(model.layers), model.kv_heads, model.head_dim, model.norm.dtype, budget, model.norm.device)

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def capacity(self) -> int:
        """Tokens the whole pool holds."""
        return self.num_blocks * BLOCK

    @property
    def used_bytes(self) -> int:
        return (self.num_blocks - len(self.free)) * self.block_bytes

    def allocate(self, n: int) -> list[int]:
        """``n`` free blocks, each with one reference; the caller checks :attr:`num_free` first."""
        if n > len(self.free):
            raise MemoryError(f"{n} KV cache blocks asked for, {len(self.free)} free")
        blocks = [heapq.heappop(self.free) for _ in range(n)]
        for b in blocks:
            self.refs[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            self.refs[b] += 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                heapq.heappush(self.free, b)

    def table(self, seqs: list, device: torch.device | str = "cpu") -> torch.Tensor:
        """The block table of ``seqs``: row i is ``seqs[i].blocks``, padded with -1 (no block)."""
        width = max(len(s.blocks) for s in seqs)
        return torch.tensor([s.blocks + [-1] * (width - len(s.blocks)) for s in seqs], dtype=torch.long, device=device)
