"""The paged KV cache's bookkeeping: a pool of fixed-size blocks and one block table per request.

    pool:        [b0][b1][b2][b3][b4][b5][b6][b7]      refcount per block; free list of refcount-0 blocks
    request r0:  block table [b3, b0, b6]    -> positions 0..15 in b3, 16..31 in b0, 32..47 in b6
    request r1:  block table [b3, b2]        -> b3 shared with r0 (refcount 2), e.g. a common prefix

Blocks are reference counted (block_pool.py) so that beam search and prefix caching can share them;
a block returns to the free list when its last owner lets go. Allocation and release are O(1) per
block. This module only does accounting; the tensors live in the model runner.

Prefix caching: once a step has written a request's block full, the block is cached under its content
(`cache_full_blocks`); a request being admitted takes the cached blocks of its longest cached prefix
(`take_cached_prefix`) and computes only the rest. The last token is always computed (its logits are
needed), so at most (num_tokens - 1) // block_size blocks are taken:

    request r2 (prompt of 40 tokens, block_size 16):  [b3][b0] cached (32 tokens), [new] computes 32..39

Copy-on-write: a request about to write into a block it shares (the partly filled last block that
beams of one request inherited from their parent) first gets its own copy of that block:

    before:  beam a [b3, b0]   beam b [b3, b0]       b0 shared, holds positions 16..21 of both
    write:   beam a [b3, b5]   beam b [b3, b0]       b5 = copy of b0; a writes position 22 into b5
"""

from __future__ import annotations

from collections.abc import Callable

from engine_builder.arithmetic import ceil_div
from server.engine.core.block_pool import ROOT_SERIAL, BlockPool
from server.engine.step_plan import PLACEHOLDER, BlockCopy, KVTransfer


class KVCacheManager:
    """Owns the block pool and every request's block table."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False, num_host_blocks: int = 0):
        """Create an empty pool.

        Args:
            num_blocks: blocks in the pool (at least 1).
            block_size: tokens per block (at least 1).
            prefix_caching: keep full blocks for reuse by later requests with the same prefix.
            num_host_blocks: with prefix caching, evicted cached blocks kept in host memory (host_tier.py).
        """
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks {num_blocks} must be at least 1")
        if block_size < 1:
            raise ValueError(f"block_size {block_size} must be at least 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, prefix_caching, num_host_blocks)
        self._tables: dict[str, list[int]] = {}
        self._serials: dict[str, list[int]] = {}  # per request, the cache serials of its leading full blocks

    @property
    def prefix_caching(self) -> bool:
        return self.pool.caching

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (cached ones included)."""
        return self.pool.num_free

    @property
    def num_cached_blocks(self) -> int:
        """Free blocks kept only by the prefix cache (reused on a hit, evicted when a block is needed)."""
        return self.pool.num_cached_free

    @property
    def num_host_blocks_used(self) -> int:
        """Blocks the host tier holds copies of."""
        return 0 if self.pool.host is None else self.pool.host.num_used

    def take_transfers(self) -> list[KVTransfer]:
        """The host tier's copies the next plan must run first (block_pool.py)."""
        return self.pool.take_transfers()

    def forget_host_copies(self) -> None:
        """After a failed step: the host tier's copies may not exist, so none is used."""
        self.pool.forget_host_copies()

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.pool.num_free

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0.0 to 1.0."""
        return self.num_used_blocks / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return ceil_div(num_tokens, self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        """The request's block ids in position order (empty if it holds none). Do not modify."""
        return self._tables.get(request_id, [])

    def has_blocks(self, request_id: str) -> bool:
        return request_id in self._tables

    def allocate_slots(self, request_id: str, num_tokens: int) -> bool:
        """Grow the request's block table so it covers its first `num_tokens` tokens.

        All or nothing: when the free blocks do not suffice, nothing is allocated.

        Args:
            request_id: the request.
            num_tokens: tokens its blocks must hold after this call (computed plus this step's new ones).

        Returns:
            True if its table now covers num_tokens, False if there were not enough free blocks.
        """
        table = self._tables.get(request_id)
        num_held = len(table) if table is not None else 0
        num_new = self.num_blocks_for(num_tokens) - num_held
        if num_new <= 0:
            return True
        if num_new > self.pool.num_free:
            return False
        if table is None:
            table = self._tables[request_id] = []
        for _ in range(num_new):
            table.append(self.pool.allocate())
        return True

    def prepare_write(self, request_id: str, num_computed_tokens: int, num_tokens: int) -> list[BlockCopy] | None:
        """Grow the request's table to cover `num_tokens` and make the blocks it will write its own.

        The step writes positions num_computed_tokens .. num_tokens - 1; every block of that range that
        is shared with another request is replaced by a fresh copy (copy-on-write). All or nothing.

        Args:
            request_id: the request.
            num_computed_tokens: positions already written (the first position this step writes).
            num_tokens: tokens its blocks must hold after this call.

        Returns:
            The block copies to perform before the forward pass (often empty), or None when there were
            not enough free blocks (then nothing changed).
        """
        table = self._tables.get(request_id, [])
        first = num_computed_tokens // self.block_size
        shared = [i for i in range(first, len(table)) if self.pool.ref_counts[table[i]] > 1]
        num_new = max(0, self.num_blocks_for(num_tokens) - len(table))
        if not shared and num_new == 0:
            return []  # a decode within its last block: nothing to allocate or copy
        if num_new + len(shared) > self.pool.num_free:
            return None
        copies = []
        for index in shared:
            block = self.pool.allocate()
            self.pool.release(table[index])
            copies.append(BlockCopy(src=table[index], dst=block))
            table[index] = block
        if not self.allocate_slots(request_id, num_tokens):
            raise AssertionError("blocks were counted as free but could not be allocated")
        return copies

    def reassign(self, sources: dict[str, str]) -> None:
        """Give each request the block table of its source, shared; then release the tables they held.

        All new tables are taken before any old one is released, so a request may take the table of one
        whose own table is being replaced (beams of one request continuing from each other's blocks).

        Args:
            sources: request id -> id of the request whose current table it takes (possibly itself).
        """
        tables = {child: list(self.block_table(parent)) for child, parent in sources.items()}
        serials = {child: list(self._serials.get(parent, [])) for child, parent in sources.items()}
        for table in tables.values():
            for block in table:
                self.pool.retain(block)
        for child, table in tables.items():
            self.free(child)
            if table:
                self._tables[child] = table
                self._serials[child] = serials[child]

    def fork(self, parent_id: str, child_id: str) -> None:
        """Give `child_id` the same blocks as `parent_id`, shared (reference counts go up).

        Args:
            parent_id: a request holding blocks.
            child_id: a request holding none.
        """
        if child_id in self._tables:
            raise ValueError(f"request {child_id!r} already holds KV blocks")
        table = list(self.block_table(parent_id))
        for block in table:
            self.pool.retain(block)
        self._tables[child_id] = table
        self._serials[child_id] = list(self._serials.get(parent_id, []))

    def free(self, request_id: str) -> None:
        """Release the request's blocks; each returns to the pool when no one else shares it.

        Blocks are released last-position first, so that the prefix cache evicts tails before heads.
        A request that holds no blocks is ignored.
        """
        self._serials.pop(request_id, None)
        table = self._tables.pop(request_id, None)
        if table is None:
            return
        for block in reversed(table):
            self.pool.release(block)

    def take_cached_prefix(self, request_id: str, token_ids: list[int], salt: str | None) -> int:
        """Give a request that holds no blocks the cached blocks of its longest cached prefix.

        Args:
            request_id: the request (holding no blocks).
            token_ids: its tokens so far (prompt, and output after a preemption).
            salt: its cache salt (blocks are shared only between requests with the same salt).

        Returns:
            Tokens covered by the blocks it took (a multiple of block_size, below len(token_ids)); 0 without caching.
        """
        if not self.prefix_caching:
            return 0
        assert request_id not in self._tables, f"request {request_id!r} already holds blocks"
        size, serial = self.block_size, ROOT_SERIAL
        table: list[int] = []
        serials: list[int] = []
        for start in range(0, len(token_ids) - 1 - size + 1, size):  # full blocks, the last token left out
            key = (serial, tuple(token_ids[start : start + size]), salt)
            block = self.pool.find(key)
            if block is not None:
                self.pool.retain(block)
            else:
                block = self.pool.restore(key)  # from the host tier, held once
                if block is None:
                    break
            serial = self.pool.serial(block)
            table.append(block)
            serials.append(serial)
        if table:
            self._tables[request_id] = table
            self._serials[request_id] = serials
        return len(table) * size

    def cache_full_blocks(self, request_id: str, token_ids: Callable[[int, int], list[int]], num_written: int,
                          salt: str | None) -> None:
        """Cache the request's blocks that the first `num_written` tokens fill, once a step has written them.

        Args:
            request_id: the request.
            token_ids: (start, end) -> its tokens [start, end) (those written are known, none a placeholder).
            num_written: tokens whose K/V are in its blocks now.
            salt: its cache salt.
        """
        table = self._tables.get(request_id)
        if not self.prefix_caching or table is None:
            return
        serials = self._serials.setdefault(request_id, [])
        size = self.block_size
        for index in range(len(serials), min(num_written // size, len(table))):
            tokens = tuple(token_ids(index * size, (index + 1) * size))
            if PLACEHOLDER in tokens:
                return  # not known on the host yet (never expected: written tokens were resolved)
            previous = serials[-1] if serials else ROOT_SERIAL
            serials.append(self.pool.cache(table[index], (previous, tokens, salt)))

    def check_invariants(self) -> None:
        """Assert the bookkeeping is consistent (used by tests after every step).

        Every block's reference count equals the number of tables holding it; the free list holds
        exactly the blocks with count 0, each once; no table holds a block twice.
        """
        owners = [0] * self.num_blocks
        for request_id, table in self._tables.items():
            assert len(set(table)) == len(table), f"request {request_id!r} holds a block twice: {table}"
            for block in table:
                owners[block] += 1
        self.pool.check_invariants(owners)
        for request_id, serials in self._serials.items():
            assert len(serials) <= len(self._tables.get(request_id, [])), f"{request_id!r} caches blocks it lacks"
        if not self._tables:
            assert self.pool.num_free == self.num_blocks, "no request holds blocks but some are not free"
