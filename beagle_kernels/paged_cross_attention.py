"""Paged block cross-attention for the Beagle draft layer, and its PyTorch reference.

Queries are the draft's rows (many per request in the first pass after verification, one per request
in draft steps); keys and values are read from vLLM's paged cache through the block table, so both
physical layouts (GPU token-major "NHD", CPU head-major "HND") work without copies: the kernel only
sees strides. Row `i` of a request whose query chunk has `q_len` rows and whose context holds
`seq_len` positions sits at position `p = seq_len - q_len + i` and sees keys `j <= p` (causal, Beagle's
"concat" mode); with `kv_limit` it sees only keys `j < kv_limit[request]` as well (the paper's
"no-concat" mode: true states only). Rows that belong to no request, and rows that see no key, get
zeros. GQA with any ratio; fp32/fp16/bf16 storage with fp32 accumulation.

Shapes: q [T, heads, D]; key_cache/value_cache [num_blocks, block_size, kv_heads, D] views (any
strides); block_table [R, max_blocks] int32; query_start_loc [R + 1] int32; seq_lens [R] int32;
kv_limit [R] int32 or None. Output [T, heads, D] in q's dtype.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import dot_config


@triton.jit
def _paged_cross_attention_kernel(
    q_ptr, o_ptr, k_ptr, v_ptr, block_table_ptr, query_start_ptr, seq_lens_ptr, kv_limit_ptr, num_requests,
    stride_qt, stride_qh, stride_qd, stride_ot, stride_oh, stride_od,
    stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
    stride_table, scale, split_keys, part_ptr, stat_ptr, num_heads,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LIMIT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, SPLITS: tl.constexpr,
):
    # A program takes up to BLOCK_Q query rows of one request and the GROUP query heads that share
    # one KV head: BLOCK_Q * GROUP_P2 rows of the tl.dot tile, so K/V are read once for all of them.
    # Request r owns tiles [qsl[r] // BLOCK_Q + r, qsl[r + 1] // BLOCK_Q + r + 1); some are empty.
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    lo = num_requests * 0  # a tensor from the start: the loop carries it
    hi = num_requests
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_ptr + mid) // BLOCK_Q + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    request = lo - 1
    q_start = tl.load(query_start_ptr + request)
    q_end = tl.load(query_start_ptr + request + 1)
    seq_len = tl.load(seq_lens_ptr + request)
    first_row = q_start + (tile - (q_start // BLOCK_Q + request)) * BLOCK_Q

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = first_row + offs_m // GROUP_P2
    heads = kv_head * GROUP + offs_m % GROUP_P2
    m_mask = (rows < q_end) & (offs_m % GROUP_P2 < GROUP) & (offs_m < BLOCK_Q * GROUP_P2)
    d_mask = offs_d < HEAD_DIM
    # Row at position p sees keys j <= p (and j < kv_limit in true-states mode).
    visible = seq_len - (q_end - q_start) + (rows - q_start) + 1
    if HAS_LIMIT:
        visible = tl.minimum(visible, tl.load(kv_limit_ptr + request))
    visible = tl.where(m_mask, visible, 0)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=m_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    q = (q * scale).to(DOT_DTYPE)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # With SPLITS > 1 each program takes `split_keys` of the keys (flash-decoding), so that small
    # batches with long contexts still fill the GPU; partial results are merged afterwards.
    first = split * split_keys
    last = tl.minimum(tl.max(visible, 0), first + split_keys)
    row_last = tl.minimum(visible, last)
    for start in range(first, last, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < last
        block = tl.load(block_table_ptr + request * stride_table + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
        slot = offs_n % PAGE
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + block[:, None] * stride_kb + slot[:, None] * stride_ks + kv_head * stride_kh
                    + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        # Upcast first: the interpreter computes wrongly on bf16.
        s = tl.dot(q, tl.trans(k.to(tl.float32).to(DOT_DTYPE)), input_precision=PRECISION)
        s = tl.where(offs_n[None, :] < row_last[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see none of these keys yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + block[:, None] * stride_vb + slot[:, None] * stride_vs + kv_head * stride_vh
                    + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(tl.float32).to(DOT_DTYPE), input_precision=PRECISION)
        m_i = m_new
    out_mask = m_mask[:, None] & d_mask[None, :]
    if SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 out.to(o_ptr.dtype.element_ty), mask=out_mask)
    else:
        # Partials: [rows, heads, SPLITS, BLOCK_D] unnormalised sums and [rows, heads, SPLITS, 2] (max, sum).
        index = (rows * num_heads + heads) * SPLITS + split
        tl.store(part_ptr + index[:, None] * BLOCK_D + offs_d[None, :], acc, mask=out_mask)
        tl.store(stat_ptr + index * 2, m_i, mask=m_mask)
        tl.store(stat_ptr + index * 2 + 1, l_i, mask=m_mask)


@functools.lru_cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def paged_cross_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                          block_table: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                          kv_limit: torch.Tensor | None = None, scale: float | None = None,
                          out: torch.Tensor | None = None, max_seq_len: int | None = None,
                          max_query_len: int | None = None, num_splits: int | None = None,
                          block_n: int = 64) -> torch.Tensor:
    """See the module docstring. `max_seq_len` and `max_query_len` (bounds known on the host, as vLLM's
    metadata has them) size the tiles and key splits without a device sync; `num_splits` forces the
    number of splits."""
    num_rows, num_heads, head_dim = q.shape
    num_kv_heads, page = key_cache.shape[2], key_cache.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    group = num_heads // num_kv_heads
    num_requests = seq_lens.shape[0]
    out = torch.empty_like(q) if out is None else out
    if num_rows == 0:
        return out
    dot_dtype, precision = dot_config(key_cache.dtype)
    block_d = triton.next_power_of_2(head_dim)
    group_p2 = triton.next_power_of_2(group)
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    block_q = min(triton.next_power_of_2(max(max_query_len, 1)), max(1, 64 // group_p2))
    num_tiles = num_rows // block_q + num_requests
    if num_splits is None:
        num_splits = 1
        if q.is_cuda:
            max_seq_len = int(seq_lens.max()) if max_seq_len is None else max_seq_len
            busy = triton.cdiv(num_rows, block_q) * num_kv_heads
            wanted = triton.cdiv(2 * _multiprocessors(q.device), busy)
            num_splits = max(1, min(wanted, triton.cdiv(max_seq_len, 4 * block_n)))
    if num_splits > 1:
        max_seq_len = int(seq_lens.max()) if max_seq_len is None else max_seq_len
        split_keys = triton.cdiv(triton.cdiv(max_seq_len, num_splits), block_n) * block_n
        part = torch.empty(num_rows, num_heads, num_splits, block_d, dtype=torch.float32, device=q.device)
        stat = torch.empty(num_rows, num_heads, num_splits, 2, dtype=torch.float32, device=q.device)
    else:
        split_keys, part, stat = 2**30, q, q  # unused
    _paged_cross_attention_kernel[(num_tiles, num_kv_heads, num_splits)](
        q, out, key_cache, value_cache, block_table, query_start_loc, seq_lens,
        kv_limit if kv_limit is not None else seq_lens, num_requests,
        *q.stride(), *out.stride(), *key_cache.stride(), *value_cache.stride(), block_table.stride(0),
        head_dim ** -0.5 if scale is None else scale, split_keys, part, stat, num_heads,
        GROUP=group, GROUP_P2=group_p2, BLOCK_Q=block_q, BLOCK_M=max(16, block_q * group_p2), HEAD_DIM=head_dim,
        BLOCK_D=block_d, PAGE=page, BLOCK_N=block_n, HAS_LIMIT=kv_limit is not None, DOT_DTYPE=dot_dtype,
        PRECISION=precision, SPLITS=num_splits,
    )
    if num_splits > 1:
        split_max, split_sum = stat[..., 0], stat[..., 1]
        # Rows that see no key have -inf everywhere: their weights come out NaN, then 0.
        weight = torch.exp(split_max - split_max.amax(-1, keepdim=True)).nan_to_num(0.0)
        total = (split_sum * weight).sum(-1, keepdim=True)
        merged = (part[..., :head_dim] * weight[..., None]).sum(-2) / torch.where(total > 0, total, 1.0)
        out.copy_(merged)
    # Rows past the last request (padding) belong to no program.
    padding = torch.arange(num_rows, device=q.device) >= query_start_loc[-1]
    out.masked_fill_(padding[:, None, None], 0.0)
    return out


def paged_cross_attention_ref(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                              block_table: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                              kv_limit: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """The same contract in plain PyTorch, one request at a time, in float32."""
    num_rows, num_heads, head_dim = q.shape
    page, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    out = torch.zeros(num_rows, num_heads, head_dim, dtype=torch.float32, device=q.device)
    for r in range(len(seq_lens)):
        start, end, seq_len = int(query_start_loc[r]), int(query_start_loc[r + 1]), int(seq_lens[r])
        if end == start or seq_len == 0:
            continue
        positions = torch.arange(seq_len, device=q.device)
        blocks = block_table[r, positions // page].long()
        k = key_cache[blocks, positions % page].float().repeat_interleave(num_heads // num_kv_heads, dim=1)
        v = value_cache[blocks, positions % page].float().repeat_interleave(num_heads // num_kv_heads, dim=1)
        row_pos = seq_len - (end - start) + torch.arange(end - start, device=q.device)
        visible = positions[None, :] <= row_pos[:, None]
        if kv_limit is not None:
            visible &= positions[None, :] < int(kv_limit[r])
        scores = torch.einsum("thd,shd->hts", q[start:end].float(), k) * scale
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
        out[start:end] = torch.einsum("hts,shd->thd", probs, v)
    return out.to(q.dtype)
