"""Prompt-prefix fingerprints for routing: what a request starts with, and what a replica recently held.

A prompt is cut into blocks of `ROUTING_BLOCK_TOKENS` (the engine's KV block) and named by a hash chained over
every token up to the block's end, as the engine names its prefix-cache blocks: equal hashes mean equal
prefixes. The ingress hashes each prompt once (`prefix_block_hashes`); the router matches those hashes against

- what it routed itself a moment ago (`RoutedPrefixes`, exact, fresh, only this router's traffic), and
- what each replica reports every `stats_period_s` (`PrefixSummary` -> a `BloomFilter` of the prefix blocks it
  served recently, sized like its KV cache: a compact summary, no per-request round trip).

Both keep a prompt's blocks so that block 0 outlives block k (inserted last, evicted last), as in the engine's
cache, where a prefix outlives its tail: the blocks a replica holds of one prompt are then always a prefix of
it, and a match is found by binary search.
"""

from __future__ import annotations

import collections
import hashlib
import time
from array import array
from typing import Callable, Hashable, Iterable, Sequence

import numpy as np

ROUTING_BLOCK_TOKENS = 16  # the engine's KV block: hashes name what a prefix-cache hit can reuse
MAX_ROUTING_BLOCKS = 1024  # the first 16k tokens of a prompt decide where it goes
BLOOM_BITS_PER_KEY = 10  # about 1% false positives with 4 probes
BLOOM_NUM_PROBES = 4


def prefix_block_hashes(token_ids: Sequence[int], block_tokens: int = ROUTING_BLOCK_TOKENS,
                        max_blocks: int = MAX_ROUTING_BLOCKS) -> tuple[int, ...]:
    """The chained 64-bit hash of each full block of the prompt (a partial last block is not cached)."""
    num_blocks = min(len(token_ids) // block_tokens, max_blocks)
    hashes, previous = [], b""
    for i in range(num_blocks):
        digest = hashlib.blake2b(previous, digest_size=8)
        digest.update(array("q", token_ids[i * block_tokens:(i + 1) * block_tokens]).tobytes())
        previous = digest.digest()
        hashes.append(int.from_bytes(previous, "little"))
    return tuple(hashes)


def key_hash(key: str) -> int:
    """A 64-bit hash of a string key (a response id), for the same Bloom filter as prefix blocks."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8, person=b"gptoss-key").digest(), "little")


def matched_blocks(hashes: Sequence[int], contains: Callable[[int], bool]) -> int:
    """How many leading blocks `contains` holds, assuming the held blocks of a prompt form a prefix of it.

    A binary search, then a check of eight blocks it skipped: a Bloom filter's false positive can send the search
    past the end of the held prefix, and then a scan from block 0 finds the end instead."""
    low, high = 0, len(hashes)  # blocks [0, low) are held; [high, len) are not
    while low < high:
        middle = (low + high) // 2
        if contains(hashes[middle]):
            low = middle + 1
        else:
            high = middle
    if all(contains(hashes[low * j // 8]) for j in range(8) if low):
        return low
    return next((i for i, block_hash in enumerate(hashes) if not contains(block_hash)), len(hashes))


class BloomFilter:
    """A set of 64-bit hashes in `len(bits) * 8` bits: no false negatives, ~1% false positives."""

    def __init__(self, bits: bytes, num_probes: int = BLOOM_NUM_PROBES):
        self.bits = bits
        self.num_probes = num_probes
        self._num_bits = len(bits) * 8

    @classmethod
    def build(cls, hashes: Sequence[int], bits_per_key: int = BLOOM_BITS_PER_KEY,
              num_probes: int = BLOOM_NUM_PROBES) -> "BloomFilter":
        num_bytes = max(64, -(-len(hashes) * bits_per_key // 8))
        keys = np.fromiter(hashes, dtype=np.uint64, count=len(hashes))
        positions = _probe_positions(keys, num_probes, num_bytes * 8)  # [num_keys * num_probes]
        bits = np.zeros(num_bytes, dtype=np.uint8)
        np.bitwise_or.at(bits, positions >> 3, (1 << (positions & 7)).astype(np.uint8))
        return cls(bits.tobytes(), num_probes)

    def __contains__(self, key: int) -> bool:
        low, high = key & 0xFFFFFFFF, (key >> 32) | 1
        for i in range(self.num_probes):
            position = (low + i * high) % self._num_bits
            if not self.bits[position >> 3] & (1 << (position & 7)):
                return False
        return True


def _probe_positions(keys: np.ndarray, num_probes: int, num_bits: int) -> np.ndarray:
    """Double hashing, as in `BloomFilter.__contains__` (numbers kept below 2**64 to stay exact in uint64)."""
    low = (keys & np.uint64(0xFFFFFFFF)) % np.uint64(num_bits)
    high = ((keys >> np.uint64(32)) | np.uint64(1)) % np.uint64(num_bits)
    probes = np.arange(num_probes, dtype=np.uint64)[None, :]
    return ((low[:, None] + probes * high[:, None]) % np.uint64(num_bits)).reshape(-1).astype(np.int64)


class PrefixSummary:
    """A replica's recently served prefix blocks (and stored response ids), least recently used dropped beyond
    `capacity`; summarized as a Bloom filter for the router."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._keys: collections.OrderedDict[int, None] = collections.OrderedDict()  # least recent first
        self._bloom: BloomFilter | None = None

    def __len__(self) -> int:
        return len(self._keys)

    def add_prompt(self, hashes: Sequence[int]) -> None:
        self.add(reversed(hashes))  # block 0 becomes the most recent, evicted last

    def add(self, keys: Iterable[int]) -> None:
        for key in keys:
            self._keys[key] = None
            self._keys.move_to_end(key)
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)
        self._bloom = None

    def bloom(self) -> BloomFilter:
        if self._bloom is None:
            self._bloom = BloomFilter.build(list(self._keys))
        return self._bloom


class RoutedPrefixes:
    """The router's own memory: which replica it last sent each prefix block (and response id) to, and when.

    Exact and immediate, unlike the replicas' summaries, which arrive every few seconds; entries older than
    `ttl_s` are ignored because by then the replica's own summary covers them (or the block is gone there).
    """

    def __init__(self, max_keys: int, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.max_keys = max_keys
        self.ttl_s = ttl_s
        self._clock = clock
        self._owner: collections.OrderedDict[int, tuple[Hashable, float]] = collections.OrderedDict()

    def record(self, hashes: Sequence[int], replica: Hashable, keys: Iterable[int] = ()) -> None:
        now = self._clock()
        for key in [*keys, *reversed(hashes)]:
            self._owner[key] = (replica, now)
            self._owner.move_to_end(key)
        while len(self._owner) > self.max_keys:
            self._owner.popitem(last=False)

    def owner(self, key: int) -> Hashable | None:
        entry = self._owner.get(key)
        if entry is None or self._clock() - entry[1] > self.ttl_s:
            return None
        return entry[0]

    def matched_blocks(self, hashes: Sequence[int]) -> dict[Hashable, int]:
        """Leading blocks of the prompt known to be on each replica (a replica that served block i of this chain
        served blocks 0..i too)."""
        matched: dict[Hashable, int] = {}
        for i, block_hash in enumerate(hashes):
            if block_hash not in self._owner:
                break  # later blocks of a chain are recorded with it and dropped before it
            replica = self.owner(block_hash)
            if replica is not None:
                matched[replica] = i + 1
        return matched
