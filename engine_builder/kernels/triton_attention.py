"""Triton paged attention for a flattened batch of prompt chunks and decode tokens.

One program serves (request, tile of query tokens, KV head, KV split). Its rows are the
(query token, query head) pairs that share that KV head, so the KV tiles are read once for the
whole GQA group:

    row m  ->  query token  tile * BLOCK_Q + m // GROUP,   query head  kv_head * GROUP + m % GROUP

Keys are walked in tiles of BLOCK_N positions, each position looked up through the block table
(block = table[pos // block_size], offset = pos % block_size), with an online softmax. Long
contexts are split into NUM_SPLITS ranges computed in parallel; a second kernel merges them.

An FP8 cache (KV_FP8, kernels/kv_cache.py) is read as stored: its tiles are converted to float16 for tl.dot (one
conversion instruction per pair on Hopper, and exact: every e4m3 value is a float16; bfloat16 takes several), with
the query (clamped to float16's range) and the softmax weights in float16 too; k_scale is folded into the softmax
scale and v_scale multiplies the accumulated output, so the scales cost nothing per key. Or the dots take the
tiles as they are (FP8_QK, FP8_PV: FP8 tensor-core dots, as FlashAttention-3 and TensorRT-LLM's FP8 attention do):
the query quantized to e4m3 with one scale per row, the softmax weights scaled by 256 into e4m3's range.

The default launch choices are the winners of benchmarks/attention_kernel.py on an H200 (RESULTS.md, 2026-12-04).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine_builder.forward_batch import AttentionMetadata


# Arguments that change from step to step are not specialised on (Triton would otherwise compile a new
# variant when, say, the token count becomes a multiple of 16: a pause of a second in the middle of serving).
@triton.jit(do_not_specialize=["num_tokens", "stride_table"])
def _attention_kernel(
    query_ptr, key_cache_ptr, value_cache_ptr, out_ptr, partial_ptr, stats_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_ptr,
    scale, v_scale, num_tokens,
    stride_q_token, stride_q_head,
    stride_c_block, stride_c_pos, stride_c_head,
    stride_o_token, stride_o_head,
    stride_table,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    PRECISION: tl.constexpr, KV_FP8: tl.constexpr, K_ROWS: tl.constexpr, FP16_TILES: tl.constexpr,
    FP8_QK: tl.constexpr, FP8_PV: tl.constexpr,
):
    request = tl.program_id(0)
    tile = tl.program_id(1) // NUM_SPLITS
    split = tl.program_id(1) % NUM_SPLITS
    kv_head = tl.program_id(2)
    query_start = tl.load(query_start_ptr + request)
    query_len = tl.load(query_start_ptr + request + 1) - query_start
    if tile * BLOCK_Q >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + request)
    context_len = seq_len - query_len

    rows = tl.arange(0, BLOCK_M)
    token = tile * BLOCK_Q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (token < query_len)
    dims = tl.arange(0, HEAD_DIM_P2)
    dim_ok = dims < HEAD_DIM
    q = tl.load(
        query_ptr + (query_start + token)[:, None] * stride_q_token + head[:, None] * stride_q_head + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :], other=0.0,
    )
    if FP16_TILES:  # an FP8 cache's tiles become float16; so does the query, clamped to float16's range
        q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
    tile_dtype = q.dtype  # what FP8 tiles are converted to when a dot does not take them as they are
    row_scale = tl.full([BLOCK_M], 1.0, tl.float32)
    if FP8_QK:  # the query in e4m3 too, one scale per row (its largest magnitude maps to 448): K tiles unconverted
        q = q.to(tl.float32)
        row_scale = tl.maximum(tl.max(tl.abs(q), 1), 1e-30) / 448.0
        q = (q / row_scale[:, None]).to(tl.float8e4nv)
    row_scale = row_scale * scale
    position = context_len + token  # absolute position of each row's query token

    # Keys this tile needs: up to its last query token; this split takes one contiguous share.
    keys_needed = tl.minimum(seq_len, context_len + (tile + 1) * BLOCK_Q)
    per_split = tl.cdiv(tl.cdiv(keys_needed, NUM_SPLITS), BLOCK_N) * BLOCK_N
    key_begin = split * per_split
    key_end = tl.minimum(keys_needed, key_begin + per_split)

    m_i = tl.full([BLOCK_M], -1e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P2], tl.float32)
    for start in range(key_begin, key_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < key_end
        blocks = tl.load(block_tables_ptr + request * stride_table + cols // PAGE, mask=col_ok, other=0)
        offsets = blocks.to(tl.int64) * stride_c_block + (cols % PAGE) * stride_c_pos + kv_head * stride_c_head
        if K_ROWS:  # [BLOCK_N, HEAD_DIM] as stored (each position's dims contiguous), transposed for the dot
            k = tl.load(key_cache_ptr + offsets[:, None] + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :],
                        other=0.0)
            if KV_FP8 and not FP8_QK:
                k = k.to(tile_dtype)  # float16 under FP16_TILES, else the query's dtype
            k = tl.trans(k)
        else:
            k = tl.load(key_cache_ptr + offsets[None, :] + dims[:, None], mask=col_ok[None, :] & dim_ok[:, None],
                        other=0.0)
            if KV_FP8 and not FP8_QK:
                k = k.to(tile_dtype)
        if FP8_QK:
            scores = tl.dot(q, k) * row_scale[:, None]
        else:
            scores = tl.dot(q, k, input_precision=PRECISION) * row_scale[:, None]
        visible = col_ok[None, :] & (cols[None, :] <= position[:, None])
        scores = tl.where(visible, scores, -1e30)
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        p = tl.exp(scores - m_new[:, None])
        p = tl.where(visible, p, 0.0)
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            value_cache_ptr + offsets[:, None] + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :], other=0.0
        )
        if FP8_PV:  # the weights (in [0, 1]) times 256 in e4m3, V tiles unconverted; the 256 is divided out below
            acc = acc * alpha[:, None] + tl.dot((p * 256.0).to(tl.float8e4nv), v)
        else:
            if KV_FP8:
                v = v.to(tile_dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    if FP8_PV:
        acc = acc * (v_scale / 256.0)
    elif KV_FP8:
        acc = acc * v_scale  # sum of p * (v_fp8 * v_scale): the scale factors out

    out_rows = (query_start + token)[:, None] * stride_o_token + head[:, None] * stride_o_head
    if NUM_SPLITS == 1:
        out = acc / tl.maximum(l_i, 1e-30)[:, None]
        tl.store(
            out_ptr + out_rows + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :]
        )
    else:
        # partial: [NUM_SPLITS, num_tokens, num_heads, HEAD_DIM_P2] float32;
        # stats: [NUM_SPLITS, num_tokens, num_heads, 2]
        flat = (query_start + token) * (tl.num_programs(2) * GROUP) + head
        partial_rows = split * num_tokens * tl.num_programs(2) * GROUP + flat
        tl.store(partial_ptr + partial_rows[:, None] * HEAD_DIM_P2 + dims[None, :], acc, mask=row_ok[:, None])
        tl.store(stats_ptr + partial_rows * 2, m_i, mask=row_ok)
        tl.store(stats_ptr + partial_rows * 2 + 1, l_i, mask=row_ok)


@triton.jit(do_not_specialize=["num_rows"])
def _merge_splits_kernel(
    partial_ptr, stats_ptr, out_ptr, num_rows, num_heads, stride_o_token, stride_o_head,
    NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr,
):
    row = tl.program_id(0)  # token * num_heads + head
    dims = tl.arange(0, HEAD_DIM_P2)
    m_max = tl.full([1], -1e30, tl.float32)
    for split in range(NUM_SPLITS):
        m_max = tl.maximum(m_max, tl.load(stats_ptr + (split * num_rows + row) * 2 + tl.zeros([1], tl.int32)))
    total = tl.zeros([1], tl.float32)
    acc = tl.zeros([HEAD_DIM_P2], tl.float32)
    for split in range(NUM_SPLITS):
        base = split * num_rows + row
        m = tl.load(stats_ptr + base * 2 + tl.zeros([1], tl.int32))
        weight = tl.exp(m - m_max)
        total += tl.load(stats_ptr + base * 2 + 1 + tl.zeros([1], tl.int32)) * weight
        acc += tl.load(partial_ptr + base * HEAD_DIM_P2 + dims) * weight
    out = acc / tl.maximum(total, 1e-30)
    token = row // num_heads
    head = row % num_heads
    tl.store(
        out_ptr + token * stride_o_token + head * stride_o_head + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dims < HEAD_DIM,
    )


@dataclass(frozen=True, slots=True)
class AttentionLaunch:
    """The attention kernel's launch choices (benchmarks/attention_kernel.py sweeps them; None: the defaults)."""

    block_n: int | None = None  # key positions per tile (None: _default_block_n)
    block_q: int | None = None  # query tokens per program of a prompt chunk (its rows: block_q x the GQA group)
    num_warps: int = 4
    num_stages: int = 3
    k_rows: bool = True  # load K tiles as stored and transpose them in registers, not transposed from memory
    fp16_tiles: bool = True  # a bfloat16 query over an FP8 cache: tiles and query in float16 for the dots
    fp8_qk: bool = False  # over an FP8 cache: the query quantized per row to e4m3, Q·K as an FP8 dot
    fp8_pv: bool = False  # over an FP8 cache: the softmax weights in e4m3, P·V as an FP8 dot


def _default_block_n(block_q: int, kv_fp8: bool) -> int:
    """Key positions per tile: 64 for decode; for prompt chunks 32, or 128 over an FP8 cache (H200 sweep)."""
    if block_q == 1:
        return 64
    return 128 if kv_fp8 else 32


def _num_splits(metadata: AttentionMetadata, num_requests: int, num_kv_heads: int) -> int:
    """Split the keys when there are few programs and long contexts (decode of small batches)."""
    if metadata.max_query_len != 1:
        return 1
    programs = num_requests * num_kv_heads
    splits = 1
    while programs * splits < 264 and metadata.max_seq_len // (splits * 2) >= 64 and splits < 16:
        splits *= 2
    return splits


def paged_attention_triton(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    num_splits: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    launch: AttentionLaunch | None = None,
) -> torch.Tensor:
    """Same contract as kernels.paged_attention.paged_attention, computed by Triton kernels."""
    launch = launch or AttentionLaunch()
    kv_fp8 = key_cache.dtype == torch.float8_e4m3fn
    num_tokens, num_heads, head_dim = query.shape
    num_requests = metadata.seq_lens.shape[0]
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    if num_tokens == 0:
        return out
    if metadata.max_query_len == 1:
        block_q = 1
    else:
        block_q = launch.block_q or max(1, 64 // group)
    block_m = max(16, triton.next_power_of_2(block_q * group))
    head_dim_p2 = triton.next_power_of_2(head_dim)
    splits = num_splits or _num_splits(metadata, num_requests, num_kv_heads)
    num_tiles = triton.cdiv(metadata.max_query_len, block_q)
    if splits > 1:
        partial = torch.empty((splits, num_tokens, num_heads, head_dim_p2), dtype=torch.float32, device=query.device)
        stats = torch.empty((splits, num_tokens, num_heads, 2), dtype=torch.float32, device=query.device)
    else:
        partial = stats = out  # unused
    grid = (num_requests, num_tiles * splits, num_kv_heads)
    _attention_kernel[grid](
        query, key_cache, value_cache, out, partial, stats,
        metadata.block_tables, metadata.seq_lens, metadata.query_start_loc,
        scale * k_scale, v_scale, num_tokens,
        query.stride(0), query.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        out.stride(0), out.stride(1),
        metadata.block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_P2=head_dim_p2, PAGE=metadata.block_size,
        BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=launch.block_n or _default_block_n(block_q, kv_fp8),
        NUM_SPLITS=splits, PRECISION="ieee" if query.dtype == torch.float32 else "tf32", KV_FP8=kv_fp8,
        K_ROWS=launch.k_rows, FP16_TILES=kv_fp8 and launch.fp16_tiles and query.dtype == torch.bfloat16,
        FP8_QK=kv_fp8 and launch.fp8_qk, FP8_PV=kv_fp8 and launch.fp8_pv,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    if splits > 1:
        _merge_splits_kernel[(num_tokens * num_heads,)](
            partial, stats, out, num_tokens * num_heads, num_heads, out.stride(0), out.stride(1),
            NUM_SPLITS=splits, HEAD_DIM=head_dim, HEAD_DIM_P2=head_dim_p2,
        )
    return out
