"""The host-memory KV tier's bookkeeping: which evicted cached blocks have a copy in host memory, and where.

With `--kv-offload-gib N` the runner keeps a pool of host slots (pinned memory, one block each). A cached block
evicted from the device pool is copied into a slot instead of being forgotten; a later prefix lookup that finds
its key here copies it back into a free device block instead of recomputing it:

    device pool (block_pool.py) --evict--> offload: device block -> host slot    (the step's plan.kv_offloads)
    prefix lookup misses on device, hits here --> restore: host slot -> device block  (plan.kv_restores)

The slots are reused least recently offloaded first. Every copy is queued on the device's stream before the
step's forward pass (offloads, then restores), so each is ordered after everything it depends on. A slot
restored from is reused only from the next step on, so that no offload of the same step overwrites it first.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.engine.core.block_pool import BlockKey


class HostTier:
    """Host slots holding copies of evicted cached blocks, by key."""

    def __init__(self, num_slots: int):
        """Args: num_slots: blocks the host tier holds (its memory over the bytes of one block)."""
        self.num_slots = num_slots
        self._entries: OrderedDict[BlockKey, tuple[int, int]] = OrderedDict()  # key -> (slot, serial), oldest first
        self._free_slots: deque[int] = deque(range(num_slots))
        self._released: list[int] = []  # slots restored from this step: free from the next one

    @property
    def num_used(self) -> int:
        """Slots holding a block (or restored from this step)."""
        return self.num_slots - len(self._free_slots)

    def offload(self, key: BlockKey, serial: int) -> int | None:
        """Keep an evicted block: the slot its copy goes to (the oldest copy makes room), or None if no slot is free
        (every slot was restored from this step)."""
        if not self._free_slots and self._entries:
            _, (slot, _) = self._entries.popitem(last=False)
            self._free_slots.append(slot)
        if not self._free_slots:
            return None
        slot = self._free_slots.popleft()
        self._entries[key] = (slot, serial)
        return slot

    def restore(self, key: BlockKey) -> tuple[int, int] | None:
        """Take the copy of `key`'s block: (its slot, the block's serial), or None if the tier has none."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._released.append(entry[0])
        return entry

    def end_step(self) -> None:
        """The step's plan is final: slots restored from in it may be reused."""
        self._free_slots.extend(self._released)
        self._released.clear()

    def clear(self) -> None:
        """Forget every copy (a failed step may not have made the copies it planned)."""
        self._entries.clear()
        self._free_slots = deque(range(self.num_slots))
        self._released.clear()
