"""The KV block pool: reference counts, the free blocks, and the prefix cache over them.

A block no request holds is free. With prefix caching, a free block that still holds a full block of some
prompt stays findable by the content it holds (its key) until a new block is needed and nothing else is free:

    held:       refcount > 0                 (by requests; read only when shared)
    fresh:      free, holds nothing findable  -> taken first
    evictable:  free, still cached by key     -> taken last, least recently freed first (LRU); taking one
                                                 evicts it (its key is forgotten)

With a host tier (host_tier.py) an evicted block is copied to host memory first and can be restored from there.

A block's key is (the serial of the block before it in its prompt, its token ids, the request's cache salt).
Serials are handed out once per cached block and never reused, so a key names one exact token sequence from the
prompt's start: a block whose predecessor was evicted can no longer be found (its key names a serial no block
has), and equal keys compare their token ids exactly (no hash collision can make two prompts share a block).
"""

from __future__ import annotations

from collections import OrderedDict, deque

from server.engine.core.host_tier import HostTier
from server.engine.step_plan import KVTransfer

ROOT_SERIAL = 0  # the "block before" the first block of every prompt

BlockKey = tuple[int, tuple[int, ...], str | None]  # (previous block's serial, token ids, cache salt)


class BlockPool:
    """Blocks 0..num_blocks-1, their reference counts, and (when caching) the cached full blocks by key."""

    def __init__(self, num_blocks: int, caching: bool, num_host_slots: int = 0):
        """Args: num_blocks: blocks in the pool; caching: keep full blocks findable by key (prefix caching);
        num_host_slots: blocks the host tier keeps of evicted cached blocks (0: none)."""
        self.num_blocks = num_blocks
        self.caching = caching
        self.host = HostTier(num_host_slots) if caching and num_host_slots > 0 else None
        self._transfers: list[KVTransfer] = []  # host tier copies planned since take_transfers, in order
        self.ref_counts = [0] * num_blocks
        self._fresh: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # least recently freed first
        self._key_of: list[BlockKey | None] = [None] * num_blocks
        self._serial_of = [ROOT_SERIAL] * num_blocks
        self._by_key: dict[BlockKey, int] = {}
        self._next_serial = ROOT_SERIAL + 1

    @property
    def num_free(self) -> int:
        """Blocks no request holds (cached ones included: they are taken when needed)."""
        return len(self._fresh) + len(self._evictable)

    @property
    def num_cached_free(self) -> int:
        """Free blocks still findable in the prefix cache (held only by the cache)."""
        return len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Blocks findable in the prefix cache, held or not."""
        return len(self._by_key)

    def allocate(self) -> int:
        """Take a free block (fresh first, else evict the least recently freed cached one) with refcount 1."""
        if self._fresh:
            block = self._fresh.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            key = self._key_of[block]
            assert key is not None, "an evictable block is cached"
            del self._by_key[key]
            self._key_of[block] = None
            slot = None if self.host is None else self.host.offload(key, self._serial_of[block])
            if slot is not None:
                self._transfers.append(KVTransfer(to_host=True, block=block, slot=slot))
        self.ref_counts[block] = 1
        return block

    def retain(self, block: int) -> None:
        """One more holder of `block` (a cached block found free leaves the evictable list)."""
        if self.ref_counts[block] == 0:
            del self._evictable[block]
        self.ref_counts[block] += 1

    def release(self, block: int) -> None:
        """One holder less; a block nobody holds becomes free (evictable if it is cached)."""
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"block {block} released more often than held"
        if self.ref_counts[block] == 0:
            if self._key_of[block] is not None:
                self._evictable[block] = None
            else:
                self._fresh.append(block)

    def find(self, key: BlockKey) -> int | None:
        """The cached block holding exactly `key`'s content, or None."""
        return self._by_key.get(key)

    def restore(self, key: BlockKey) -> int | None:
        """A device block holding `key`'s content copied back from the host tier (held once, cached), or None when
        the tier has no copy or no device block is free."""
        if self.host is None or not self.num_free:
            return None
        entry = self.host.restore(key)
        if entry is None:
            return None
        slot, serial = entry
        block = self.allocate()
        self._key_of[block], self._serial_of[block] = key, serial
        self._by_key[key] = block
        self._transfers.append(KVTransfer(to_host=False, block=block, slot=slot))
        return block

    def take_transfers(self) -> list[KVTransfer]:
        """The host tier's copies planned since the last call, in the order they must run (a block evicted and
        restored into within one step is offloaded first); the step's plan is final."""
        transfers, self._transfers = self._transfers, []
        if self.host is not None:
            self.host.end_step()
        return transfers

    def forget_host_copies(self) -> None:
        """Drop the host tier's copies (a failed step may not have made the copies it planned)."""
        if self.host is not None:
            self.host.clear()
        self._transfers = []

    def serial(self, block: int) -> int:
        """The serial of a cached block (what the key of the block after it names)."""
        return self._serial_of[block]

    def cache(self, block: int, key: BlockKey) -> int:
        """Make a held, fully written block findable by `key`.

        Args:
            block: the block (held by the caller).
            key: its content's key.

        Returns:
            The serial the next block's key names: this block's, or that of the block already cached with the same
            content (written by a request that ran alongside); then `block` itself stays uncached.
        """
        assert self.ref_counts[block] > 0, "only a held block is cached"
        existing = self._by_key.get(key)
        if existing is not None:
            return self._serial_of[existing]
        if self._key_of[block] is not None:  # already cached under another key: keep it (shared beam block)
            return self._serial_of[block]
        self._key_of[block] = key
        self._serial_of[block] = self._next_serial
        self._next_serial += 1
        self._by_key[key] = block
        return self._serial_of[block]

    def check_invariants(self, holders: list[int]) -> None:
        """Assert the pool is consistent with `holders` (per block, the number of tables holding it)."""
        assert holders == self.ref_counts, "reference counts differ from the block tables"
        free = list(self._fresh) + list(self._evictable)
        assert len(set(free)) == len(free), "a block is free twice"
        assert set(free) == {b for b, count in enumerate(self.ref_counts) if count == 0}, (
            "the free blocks differ from the blocks nobody holds")
        assert all(self._key_of[b] is not None for b in self._evictable), "an evictable block is not cached"
        assert all(self._key_of[b] is None for b in self._fresh), "a fresh block is still cached"
        assert all(self._key_of[b] == key for key, b in self._by_key.items()), "the key map and the blocks differ"
