"""Block pool accounting: allocation rounds up to blocks, is all-or-nothing, shares by reference count."""

import pytest

from server.engine.core.kv_cache_manager import KVCacheManager


def test_allocation_covers_tokens_and_grows_only_at_block_boundaries():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    assert kv.allocate_slots("a", 5)
    assert len(kv.block_table("a")) == 2
    table = list(kv.block_table("a"))
    assert kv.allocate_slots("a", 8)  # still inside the second block
    assert kv.block_table("a") == table
    assert kv.allocate_slots("a", 9)  # crosses into a third block
    assert kv.block_table("a")[:2] == table and len(kv.block_table("a")) == 3
    assert kv.num_used_blocks == 3 and kv.num_free_blocks == 5
    assert kv.usage == pytest.approx(3 / 8)
    kv.check_invariants()


def test_allocation_is_all_or_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    assert kv.allocate_slots("a", 12)
    assert not kv.allocate_slots("b", 8)  # needs 2, one free
    assert not kv.has_blocks("b")
    assert kv.num_free_blocks == 1
    kv.check_invariants()


def test_free_returns_every_block_and_blocks_are_reused():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    assert kv.allocate_slots("a", 8)
    kv.free("a")
    assert kv.num_free_blocks == 4
    kv.check_invariants()
    assert kv.allocate_slots("b", 8)
    assert sorted(kv.block_table("b")) == [0, 1, 2, 3]
    kv.free("unknown")  # ignored
    kv.check_invariants()


def test_shared_blocks_are_freed_only_when_the_last_owner_lets_go():
    kv = KVCacheManager(num_blocks=6, block_size=4)
    assert kv.allocate_slots("parent", 8)
    kv.fork("parent", "child")
    assert kv.block_table("child") == kv.block_table("parent")
    assert kv.num_used_blocks == 2
    kv.check_invariants()
    assert kv.allocate_slots("child", 12)  # the child grows on its own block
    kv.free("parent")
    assert kv.num_used_blocks == 3  # shared blocks are still the child's
    kv.check_invariants()
    kv.free("child")
    assert kv.num_free_blocks == 6
    kv.check_invariants()
    with pytest.raises(ValueError):
        kv.allocate_slots("x", 4)
        kv.fork("parent2", "x")


def test_check_invariants_catches_corruption():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    assert kv.allocate_slots("a", 4)
    kv._tables["b"] = list(kv.block_table("a"))  # owned twice without a reference
    with pytest.raises(AssertionError):
        kv.check_invariants()
    kv = KVCacheManager(num_blocks=4, block_size=4)
    assert kv.allocate_slots("a", 4)
    kv.pool._fresh.append(kv.block_table("a")[0])  # on the free list while held
    with pytest.raises(AssertionError):
        kv.check_invariants()


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="num_kv_blocks"):
        KVCacheManager(num_blocks=0, block_size=4)
    with pytest.raises(ValueError, match="block_size"):
        KVCacheManager(num_blocks=4, block_size=0)


def test_a_write_into_a_shared_partly_filled_block_copies_it_first():
    kv = KVCacheManager(num_blocks=6, block_size=4)
    assert kv.allocate_slots("parent", 6)  # positions 0..5: block 0 full, block 1 half filled
    kv.reassign({"a": "parent", "b": "parent"})
    kv.free("parent")
    shared = list(kv.block_table("a"))
    assert kv.block_table("b") == shared
    copies = kv.prepare_write("a", 6, 7)  # a writes position 6, inside the shared block 1
    assert copies is not None
    assert [(c.src, c.dst) for c in copies] == [(shared[1], kv.block_table("a")[1])]
    assert kv.block_table("a")[0] == shared[0] and kv.block_table("a")[1] != shared[1]
    assert kv.prepare_write("b", 6, 9) == []  # b is now block 1's only owner and grows into a new block
    assert kv.block_table("b")[:2] == shared
    kv.check_invariants()
    assert kv.prepare_write("b", 9, 40) is None  # all or nothing
    kv.check_invariants()
    for request_id in ("a", "b"):
        kv.free(request_id)
    assert kv.num_free_blocks == 6
    kv.check_invariants()


def test_reassign_lets_requests_swap_and_drop_tables_without_freeing_shared_blocks_early():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    assert kv.allocate_slots("a", 4) and kv.allocate_slots("b", 4)
    table_a, table_b = list(kv.block_table("a")), list(kv.block_table("b"))
    kv.reassign({"a": "b", "b": "b"})  # a continues from b; a's old blocks are pruned
    assert kv.block_table("a") == kv.block_table("b") == table_b
    assert kv.num_used_blocks == 2 and all(block not in kv.block_table("a") for block in table_a)
    kv.check_invariants()
