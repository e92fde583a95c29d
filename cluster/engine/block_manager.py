"""KV-cache blocks: who holds which, and the prefix cache.

Two pools when the model has sliding-window layers: the full-attention layers keep every block of a sequence,
the sliding layers only the blocks that the window of the next query can still reach. A long context then
costs full-attention layers only.

Prefix caching: a full, computed block is named by a hash chained over all tokens up to its end, so equal
names mean equal keys and values in every layer. Freed blocks keep their name and stay findable until the
pool needs them back, least recently used first.

A prefix hit of k blocks lets a new sequence start at position P = k * block_size. The full layers need
blocks 0..k-1; the sliding layers need the blocks covering their window before P, [P - window + 1, P). Those
cannot be recomputed alone (a sliding layer's keys depend on every layer below it, so on the whole prefix),
so a hit counts only if the sliding pool still holds them too; otherwise the hit is shortened until it does.
The sliding pool is small, and a long prefill passes many of its blocks behind the window. Only a few windows
are worth keeping for later hits: the one before the prompt's last block boundary (a chat's next turn re-renders
the reply, so its match usually ends where the previous prompt did) and the one before the sequence's end. Every
other sliding block goes to the front of the pool's LRU when freed, so those windows outlive them.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from array import array

from gptoss_serve.cluster.engine.sequence import NO_BLOCK, Sequence


class BlockPool:
    """A fixed number of blocks with reference counts, and an LRU of free blocks that still hold a cached
    (hashed) prefix."""

    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.hashes: list[bytes | None] = [None] * num_blocks
        self._free_uncached = collections.deque(range(num_blocks))
        self._free_cached: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
        self._by_hash: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free_uncached) + len(self._free_cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._by_hash)

    def lookup(self, block_hash: bytes) -> int | None:
        return self._by_hash.get(block_hash)

    def allocate(self) -> int:
        """A free block, evicting the least recently used cached one if no uncached block is free."""
        if self._free_uncached:
            block = self._free_uncached.popleft()
        else:
            block, _ = self._free_cached.popitem(last=False)
            del self._by_hash[self.hashes[block]]
            self.hashes[block] = None
        self.ref_counts[block] = 1
        return block

    def acquire(self, block: int) -> None:
        """One more holder of a cached block (taking it off the free LRU if nobody held it)."""
        if self.ref_counts[block] == 0:
            del self._free_cached[block]
        self.ref_counts[block] += 1

    def release(self, block: int, evict_first: bool = False) -> None:
        """evict_first: a cached block that is unlikely to be asked for again goes to the front of the LRU."""
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            if self.hashes[block] is not None:
                self._free_cached[block] = None
                if evict_first:
                    self._free_cached.move_to_end(block, last=False)
            else:
                self._free_uncached.append(block)

    def register(self, block: int, block_hash: bytes) -> None:
        """Names a computed block; a second block with the same content stays unnamed (freed plainly)."""
        if self.hashes[block] is None and block_hash not in self._by_hash:
            self.hashes[block] = block_hash
            self._by_hash[block_hash] = block

    def forget_free_cached(self) -> None:
        """Drops every free block's name (a prefix-cache reset); blocks in use keep theirs."""
        for block in self._free_cached:
            del self._by_hash[self.hashes[block]]
            self.hashes[block] = None
            self._free_uncached.append(block)
        self._free_cached.clear()

    def is_free(self, block: int) -> bool:
        return self.ref_counts[block] == 0


@dataclasses.dataclass
class PrefixHit:
    num_tokens: int = 0
    full_blocks: list[int] = dataclasses.field(default_factory=list)  # blocks 0..k-1
    sliding_blocks: dict[int, int] = dataclasses.field(default_factory=dict)  # block index -> sliding block


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, sliding_window: int = 0,
                 num_sliding_blocks: int | None = None, enable_prefix_caching: bool = True):
        """num_sliding_blocks: a separate pool for the sliding layers (None: they share the full pool)."""
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.full = BlockPool(num_blocks)
        self.sliding = BlockPool(num_sliding_blocks) if num_sliding_blocks is not None else None
        if self.sliding is not None and sliding_window <= 0:
            raise ValueError("a sliding pool needs a positive sliding_window")
        self.enable_prefix_caching = enable_prefix_caching
        self.num_prefix_queried_tokens = 0
        self.num_prefix_hit_tokens = 0

    # Prefix cache ------------------------------------------------------------------------------------------
    def find_prefix(self, seq: Sequence) -> PrefixHit:
        """The longest usable cached prefix of a sequence that holds no blocks yet (at least one token is
        always left to compute, for its logits)."""
        if not self.enable_prefix_caching or seq.block_ids:
            return PrefixHit()
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hashes = self._block_hashes(seq, max_blocks)
        full_blocks = []
        for block_hash in hashes[:max_blocks]:
            block = self.full.lookup(block_hash)
            if block is None:
                break
            full_blocks.append(block)
        k = len(full_blocks)
        if self.sliding is None:
            return PrefixHit(k * self.block_size, full_blocks)
        while k > 0:
            sliding_blocks = {}
            for i in range(self._first_window_block(k * self.block_size), k):
                block = self.sliding.lookup(hashes[i])
                if block is None:
                    k = i  # every longer hit whose window reaches block i fails as well
                    break
                sliding_blocks[i] = block
            else:
                return PrefixHit(k * self.block_size, full_blocks[:k], sliding_blocks)
        return PrefixHit()

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Names the sequence's blocks that became full and computed in the last step."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        hashes = self._block_hashes(seq, num_full)
        for i in range(seq.num_cached_blocks, num_full):
            self.full.register(seq.block_ids[i], hashes[i])
            if self.sliding is not None and seq.sliding_block_ids[i] != NO_BLOCK:
                self.sliding.register(seq.sliding_block_ids[i], hashes[i])
        seq.num_cached_blocks = max(seq.num_cached_blocks, num_full)

    def _block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        hashes, bs = seq.block_hashes, self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            digest = hashlib.blake2b(hashes[-1] if hashes else b"", digest_size=16)
            digest.update(array("q", seq.token_ids[i * bs:(i + 1) * bs]).tobytes())
            hashes.append(digest.digest())
        return hashes

    # Allocation ---------------------------------------------------------------------------------------------
    def _first_window_block(self, first_query_position: int) -> int:
        """The first block a sliding layer reads for a chunk whose first query sits at this position."""
        return max(0, first_query_position - self.sliding_window + 1) // self.block_size

    def allocate(self, seq: Sequence, num_new_tokens: int, hit: PrefixHit | None = None) -> bool:
        """Blocks for the sequence's next `num_new_tokens` tokens (after the prefix hit, if any). Returns False,
        changing nothing but freeing blocks behind the window, when a pool is short."""
        hit = hit or PrefixHit()
        start = max(hit.num_tokens, seq.num_computed_tokens)
        num_blocks = -(-(start + num_new_tokens) // self.block_size)
        num_full_new = num_blocks - len(seq.block_ids) - len(hit.full_blocks)
        if num_full_new + sum(self.full.is_free(b) for b in hit.full_blocks) > self.full.num_free:
            return False
        if self.sliding is not None:
            self._free_behind_window(seq, start)
            first = self._first_window_block(start)
            missing = [i for i in range(first, num_blocks) if i not in hit.sliding_blocks
                       and (i >= len(seq.sliding_block_ids) or seq.sliding_block_ids[i] == NO_BLOCK)]
            revived = sum(self.sliding.is_free(b) for b in hit.sliding_blocks.values())
            if len(missing) + revived > self.sliding.num_free:
                return False

        for block in hit.full_blocks:
            self.full.acquire(block)
        seq.block_ids.extend(hit.full_blocks)
        seq.block_ids.extend(self.full.allocate() for _ in range(max(0, num_full_new)))
        if self.sliding is not None:
            table = seq.sliding_block_ids
            table.extend([NO_BLOCK] * (num_blocks - len(table)))
            for i, block in hit.sliding_blocks.items():
                self.sliding.acquire(block)
                table[i] = block
            for i in missing:
                table[i] = self.sliding.allocate()
        if hit.num_tokens:
            seq.num_computed_tokens, seq.num_cached_blocks = hit.num_tokens, len(hit.full_blocks)
        return True

    def _free_behind_window(self, seq: Sequence, first_query_position: int) -> None:
        """Releases the sliding blocks that no query from this position on reads."""
        table = seq.sliding_block_ids
        end = min(self._first_window_block(first_query_position), len(table))
        for i in range(seq.num_sliding_blocks_freed, end):  # blocks before are freed already
            if table[i] != NO_BLOCK:
                self.sliding.release(table[i], evict_first=not self._worth_keeping(seq, i))
                table[i] = NO_BLOCK
        seq.num_sliding_blocks_freed = max(seq.num_sliding_blocks_freed, end)

    def _worth_keeping(self, seq: Sequence, i: int) -> bool:
        """Whether sliding block i lies in the window before the prompt's last block boundary or before the last
        computed one: where a later prompt's prefix hit most likely ends."""
        bs = self.block_size
        ends = (seq.num_prompt_tokens // bs * bs, seq.num_computed_tokens // bs * bs)
        return any(self._first_window_block(end) <= i < end // bs for end in ends)

    def record_admission(self, seq: Sequence, hit: PrefixHit) -> None:
        seq.num_prefix_hit_tokens = hit.num_tokens
        self.num_prefix_queried_tokens += seq.num_tokens
        self.num_prefix_hit_tokens += hit.num_tokens

    def free(self, seq: Sequence) -> None:
        """Gives back all of a sequence's blocks. Full pool: the last first, so a cached prefix outlives its tail.
        Sliding pool: the windows worth keeping as the most recently used blocks, the others to the LRU's front."""
        for block in reversed(seq.block_ids):
            self.full.release(block)
        for i, block in enumerate(seq.sliding_block_ids):
            if block != NO_BLOCK:
                self.sliding.release(block, evict_first=not self._worth_keeping(seq, i))
        seq.block_ids, seq.sliding_block_ids = [], []
        seq.num_cached_blocks = seq.num_sliding_blocks_freed = 0

    # Stats -------------------------------------------------------------------------------------------------
    @property
    def usage(self) -> float:
        """Fraction of full-attention blocks held by sequences (free cached blocks count as free)."""
        return self.full.num_used / self.full.num_blocks

    @property
    def sliding_usage(self) -> float:
        return self.sliding.num_used / self.sliding.num_blocks if self.sliding is not None else self.usage

    @property
    def prefix_hit_rate(self) -> float:
        return self.num_prefix_hit_tokens / self.num_prefix_queried_tokens if self.num_prefix_queried_tokens else 0.0
