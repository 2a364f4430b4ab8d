"""Prefix caching's bookkeeping: full blocks are found again by content, salts isolate, the last token is always
computed, eviction is least recently freed first (tails before heads), and an evicted block is never served."""

from server.engine.core.kv_cache_manager import KVCacheManager

BLOCK = 4


def written(kv: KVCacheManager, request_id: str, tokens: list[int], salt: str | None = None) -> None:
    """Allocate blocks for `tokens` and cache them as a finished step would."""
    assert kv.allocate_slots(request_id, len(tokens))
    kv.cache_full_blocks(request_id, lambda start, end: tokens[start:end], len(tokens), salt)
    kv.check_invariants()


def test_a_second_request_takes_the_cached_blocks_of_its_shared_prefix():
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK, prefix_caching=True)
    first = list(range(100, 110))  # 10 tokens: two full blocks and a partial one
    written(kv, "a", first)
    table_a = list(kv.block_table("a"))
    kv.free("a")
    assert kv.num_cached_blocks == 2 and kv.num_free_blocks == 16  # cached blocks still count as free
    second = first[:8] + [7, 7, 7, 7, 7]
    assert kv.take_cached_prefix("b", second, None) == 8
    assert kv.block_table("b") == table_a[:2]
    assert kv.num_cached_blocks == 0 and kv.num_used_blocks == 2  # held again
    kv.check_invariants()
    different = first[:4] + [9] + first[5:]  # the second block differs: only the first is shared
    assert kv.take_cached_prefix("c", different, None) == 4
    kv.check_invariants()


def test_the_last_token_is_always_computed_and_salts_isolate():
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK, prefix_caching=True)
    tokens = list(range(50, 58))  # exactly two blocks
    written(kv, "a", tokens, salt="tenant-1")
    kv.free("a")
    assert kv.take_cached_prefix("same", tokens, "tenant-1") == 4  # the 8th token's logits are needed
    assert kv.take_cached_prefix("other", tokens + [1], "tenant-2") == 0
    assert kv.take_cached_prefix("none", tokens + [1], None) == 0
    kv.check_invariants()


def test_eviction_takes_fresh_blocks_first_then_the_least_recently_freed_tail_first():
    kv = KVCacheManager(num_blocks=4, block_size=BLOCK, prefix_caching=True)
    tokens = list(range(200, 212))  # three full blocks
    written(kv, "a", tokens)
    kv.free("a")
    assert kv.num_cached_blocks == 3
    assert kv.allocate_slots("b", 4)  # the one fresh block: nothing evicted
    assert kv.take_cached_prefix("probe", tokens + [0], None) == 12
    kv.free("probe")
    assert kv.allocate_slots("c", 4)  # evicts a's last block (freed first: tails before heads)
    assert kv.take_cached_prefix("probe", tokens + [0], None) == 8
    kv.free("probe")
    kv.check_invariants()


def test_an_evicted_and_rewritten_block_is_never_served():
    kv = KVCacheManager(num_blocks=3, block_size=BLOCK, prefix_caching=True)
    old = list(range(300, 312))
    written(kv, "a", old)
    kv.free("a")
    new = list(range(400, 412))  # needs all three blocks: every one of a's is evicted and rewritten
    written(kv, "b", new)
    kv.free("b")
    assert kv.take_cached_prefix("old", old + [0], None) == 0
    assert kv.take_cached_prefix("new", new + [0], None) == 12
    kv.free("new")
    # a chain whose head was evicted cannot be found through its tail either
    written(kv, "c", [1, 2, 3, 4, 5, 6, 7, 8])
    kv.free("c")
    assert kv.allocate_slots("d", 4)  # evicts the least recently freed: c's tail first ... then its head
    assert kv.allocate_slots("e", 8)
    kv.free("d")
    kv.free("e")
    assert kv.take_cached_prefix("probe", [1, 2, 3, 4, 5, 6, 7, 8, 9], None) == 0
    kv.check_invariants()


def test_without_prefix_caching_nothing_is_kept():
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK)
    tokens = list(range(10, 30))
    written(kv, "a", tokens)
    kv.free("a")
    assert kv.num_cached_blocks == 0
    assert kv.take_cached_prefix("b", tokens, None) == 0 and not kv.has_blocks("b")
