"""Rank 0's bookkeeping of the paged KV cache: which blocks each sequence holds, which are free,
and which full blocks can be reused by a later sequence with the same prefix (prefix caching).

A full block is known by a key: the hash of its parent block's key and its own token ids, so a
key names a whole prefix. Blocks are reference counted; a block whose sequences all finished
goes to the back of the free list with its key kept, and is reused on a hit until it reaches
the front and is taken for new tokens (least recently used first). Every hit is checked against
the block's token ids, so a hash collision costs a miss, never a wrong answer.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class Block:
    id: int
    refs: int = 0
    key: bytes | None = None  # set once the block is full and its K/V are written
    token_ids: list[int] = field(default_factory=list)


def block_key(parent: bytes | None, token_ids: list[int]) -> bytes:
    return hashlib.blake2b((parent or b"") + array("q", token_ids).tobytes(), digest_size=16).digest()


class BlockManager:
    """``num_blocks`` blocks of ``block_size`` tokens. A sequence here is anything with
    ``token_ids_all`` and ``tokens(start, end)`` (its prompt and generated tokens), ``num_tokens``,
    ``block_table`` and ``num_computed``."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.block_size, self.prefix_caching = block_size, prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # front: evict first
        self.by_key: dict[bytes, int] = {}
        self.hits = self.queries = 0  # prompt tokens found cached / looked up

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _take(self) -> Block:
        block = self.blocks[self.free.popitem(last=False)[0]]
        if block.key is not None and self.by_key.get(block.key) == block.id:
            del self.by_key[block.key]  # evicted: its prefix is forgotten
        block.key, block.token_ids, block.refs = None, [], 1
        return block

    def _cached(self, key: bytes, token_ids: list[int]) -> Block | None:
        bid = self.by_key.get(key)
        if bid is None:
            return None
        block = self.blocks[bid]
        return block if block.token_ids == token_ids else None

    def cached_prefix(self, token_ids: list[int]) -> list[Block]:
        """The cached blocks that hold a prefix of ``token_ids``, leaving at least its last token
        to compute (its logits are needed)."""
        found: list[Block] = []
        if not self.prefix_caching:
            return found
        key = None
        bs = self.block_size
        for i in range((len(token_ids) - 1) // bs):
            piece = token_ids[i * bs:(i + 1) * bs]
            key = block_key(key, piece)
            block = self._cached(key, piece)
            if block is None:
                break
            found.append(block)
        return found

    def can_allocate(self, token_ids: list[int], reserve: int = 0, use_cache: bool = True) -> bool:
        hit = self.cached_prefix(token_ids) if use_cache else []
        new = self.blocks_for(len(token_ids)) - len(hit)
        reusable_free = sum(1 for b in hit if b.refs == 0)  # a hit on a free block takes it off the free list
        return self.num_free - reusable_free >= new + reserve

    def allocate(self, seq, use_cache: bool = True) -> None:
        """Blocks for all of ``seq``'s tokens so far: cached ones where its prefix is known (unless
        not ``use_cache``: every token is then computed), new ones for the rest. Sets
        ``seq.num_computed`` to the tokens found cached."""
        if seq.block_table:
            raise RuntimeError("allocate() on a sequence that holds blocks")
        ids = seq.token_ids_all
        hit = self.cached_prefix(ids) if use_cache else []
        for block in hit:
            if block.refs == 0:
                del self.free[block.id]
            block.refs += 1
        seq.block_table = [b.id for b in hit] + [self._take().id for _ in range(self.blocks_for(len(ids)) - len(hit))]
        seq.num_computed = len(hit) * self.block_size
        self.hits += seq.num_computed
        self.queries += len(ids)

    def can_append(self, seq, tokens: int = 1) -> bool:
        return self.num_free >= self.blocks_for(seq.num_computed + tokens) - len(seq.block_table)

    def append(self, seq, tokens: int = 1) -> None:
        """Room for ``tokens`` more tokens after ``seq.num_computed``."""
        for _ in range(self.blocks_for(seq.num_computed + tokens) - len(seq.block_table)):
            seq.block_table.append(self._take().id)

    def commit(self, seq) -> None:
        """Give keys to ``seq``'s blocks that are now full and computed, so later prompts can reuse them."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        key = None
        for i in range(min(seq.num_computed, seq.num_tokens) // bs):
            block = self.blocks[seq.block_table[i]]
            if block.key is None:
                piece = seq.tokens(i * bs, (i + 1) * bs)
                block.key = block_key(key, piece)
                block.token_ids = piece
                self.by_key.setdefault(block.key, block.id)
            key = block.key

    def free_seq(self, seq) -> None:
        """Give back ``seq``'s blocks; the full ones keep their keys until they are taken again."""
        for bid in reversed(seq.block_table):  # a prefix's tail is evicted before its head
            block = self.blocks[bid]
            block.refs -= 1
            if block.refs == 0:
                self.free[bid] = None
                if block.key is None or self.by_key.get(block.key) != block.id:
                    block.key, block.token_ids = None, []
                    self.free.move_to_end(bid, last=False)  # nothing to reuse in it: taken first
        seq.block_table = []
        seq.num_computed = 0
