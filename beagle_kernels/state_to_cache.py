"""Fused state-to-cache write for the Beagle draft layer, and its PyTorch reference.

From the states `h` of the rows: RMS-normalise, project to K and V with the draft's weights, rotate K
(neox-style RoPE at each row's position) and write K and V into vLLM's paged cache at the slot
mapping, in one kernel. Rows with slot -1 are skipped. The normalisation's 1/rms is a per-row factor,
so it is applied after the projection: the state is read once.

Shapes: states [T, H]; norm_weight [H]; k_weight/v_weight [kv_heads * D, H]; positions [T];
inv_freq [D / 2] float32; slot_mapping [T] (int32 or int64); key_cache/value_cache
[num_blocks, block_size, kv_heads, D] views with any strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import dot_config


@triton.jit
def _state_to_cache_kernel(
    x_ptr, norm_ptr, wk_ptr, wv_ptr, pos_ptr, inv_freq_ptr, slot_ptr, k_ptr, v_ptr,
    num_rows, hidden, eps, rope_scale,
    stride_xt, stride_xh, stride_wko, stride_wki, stride_wvo, stride_wvi,
    stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
    HALF: tl.constexpr, PAGE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    kv_head = tl.program_id(1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < num_rows
    offs_c = tl.arange(0, HALF)
    # Output channels of this head: the first and second halves, which RoPE pairs up.
    rows_lo = kv_head * 2 * HALF + offs_c
    rows_hi = rows_lo + HALF

    sq = tl.zeros([BLOCK_T], tl.float32)
    k_lo = tl.zeros([BLOCK_T, HALF], tl.float32)
    k_hi = tl.zeros([BLOCK_T, HALF], tl.float32)
    v_lo = tl.zeros([BLOCK_T, HALF], tl.float32)
    v_hi = tl.zeros([BLOCK_T, HALF], tl.float32)
    for h0 in range(0, hidden, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < hidden
        x = tl.load(x_ptr + offs_t[:, None] * stride_xt + offs_h[None, :] * stride_xh,
                    mask=t_mask[:, None] & h_mask[None, :], other=0.0).to(tl.float32)
        sq += tl.sum(x * x, 1)
        xw = (x * tl.load(norm_ptr + offs_h, mask=h_mask, other=0.0).to(tl.float32)[None, :]).to(DOT_DTYPE)
        w_mask = h_mask[None, :]
        wk_lo = tl.load(wk_ptr + rows_lo[:, None] * stride_wko + offs_h[None, :] * stride_wki, mask=w_mask, other=0.0)
        wk_hi = tl.load(wk_ptr + rows_hi[:, None] * stride_wko + offs_h[None, :] * stride_wki, mask=w_mask, other=0.0)
        wv_lo = tl.load(wv_ptr + rows_lo[:, None] * stride_wvo + offs_h[None, :] * stride_wvi, mask=w_mask, other=0.0)
        wv_hi = tl.load(wv_ptr + rows_hi[:, None] * stride_wvo + offs_h[None, :] * stride_wvi, mask=w_mask, other=0.0)
        # Upcast first: the interpreter computes wrongly on bf16.
        k_lo += tl.dot(xw, tl.trans(wk_lo.to(tl.float32).to(DOT_DTYPE)), input_precision=PRECISION)
        k_hi += tl.dot(xw, tl.trans(wk_hi.to(tl.float32).to(DOT_DTYPE)), input_precision=PRECISION)
        v_lo += tl.dot(xw, tl.trans(wv_lo.to(tl.float32).to(DOT_DTYPE)), input_precision=PRECISION)
        v_hi += tl.dot(xw, tl.trans(wv_hi.to(tl.float32).to(DOT_DTYPE)), input_precision=PRECISION)

    inv_rms = (1.0 / tl.sqrt(sq / hidden + eps))[:, None]
    k_lo, k_hi, v_lo, v_hi = k_lo * inv_rms, k_hi * inv_rms, v_lo * inv_rms, v_hi * inv_rms
    pos = tl.load(pos_ptr + offs_t, mask=t_mask, other=0).to(tl.float32)
    angle = pos[:, None] * tl.load(inv_freq_ptr + offs_c)[None, :]
    cos = tl.cos(angle) * rope_scale
    sin = tl.sin(angle) * rope_scale
    k_lo, k_hi = k_lo * cos - k_hi * sin, k_hi * cos + k_lo * sin

    slot = tl.load(slot_ptr + offs_t, mask=t_mask, other=-1).to(tl.int64)
    keep = (t_mask & (slot >= 0))[:, None]
    block = slot // PAGE
    offset = slot % PAGE
    k_base = k_ptr + block[:, None] * stride_kb + offset[:, None] * stride_ks + kv_head * stride_kh
    v_base = v_ptr + block[:, None] * stride_vb + offset[:, None] * stride_vs + kv_head * stride_vh
    k_ty = k_ptr.dtype.element_ty
    v_ty = v_ptr.dtype.element_ty
    tl.store(k_base + offs_c[None, :] * stride_kd, k_lo.to(k_ty), mask=keep)
    tl.store(k_base + (HALF + offs_c)[None, :] * stride_kd, k_hi.to(k_ty), mask=keep)
    tl.store(v_base + offs_c[None, :] * stride_vd, v_lo.to(v_ty), mask=keep)
    tl.store(v_base + (HALF + offs_c)[None, :] * stride_vd, v_hi.to(v_ty), mask=keep)


def write_states_to_cache(states: torch.Tensor, norm_weight: torch.Tensor, eps: float, k_weight: torch.Tensor,
                          v_weight: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                          slot_mapping: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                          rope_scale: float = 1.0, block_t: int = 16, block_h: int = 64) -> None:
    num_rows, hidden = states.shape
    page, num_kv_heads, head_dim = key_cache.shape[1:]
    half = head_dim // 2
    if head_dim % 2 or half & (half - 1) or half < 16:
        raise ValueError(f"head_dim {head_dim}: the fused write needs head_dim / 2 a power of two, at least 16")
    if k_weight.shape != (num_kv_heads * head_dim, hidden):
        raise ValueError(f"k_weight has shape {tuple(k_weight.shape)}, expected {(num_kv_heads * head_dim, hidden)}")
    if num_rows == 0:
        return
    dot_dtype, precision = dot_config(states.dtype)
    grid = (triton.cdiv(num_rows, block_t), num_kv_heads)
    _state_to_cache_kernel[grid](
        states, norm_weight, k_weight, v_weight, positions, inv_freq, slot_mapping, key_cache, value_cache,
        num_rows, hidden, eps, rope_scale,
        *states.stride(), *k_weight.stride(), *v_weight.stride(), *key_cache.stride(), *value_cache.stride(),
        HALF=half, PAGE=page, BLOCK_T=block_t, BLOCK_H=block_h, DOT_DTYPE=dot_dtype, PRECISION=precision,
    )


def write_states_to_cache_ref(states: torch.Tensor, norm_weight: torch.Tensor, eps: float, k_weight: torch.Tensor,
                              v_weight: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                              slot_mapping: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                              rope_scale: float = 1.0) -> None:
    """The same contract in plain PyTorch, in float32."""
    page, num_kv_heads, head_dim = key_cache.shape[1:]
    x = states.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()
    k = (x @ k_weight.float().T).view(-1, num_kv_heads, head_dim)
    v = (x @ v_weight.float().T).view(-1, num_kv_heads, head_dim)
    angle = positions.float()[:, None] * inv_freq.float()[None, :]
    cos, sin = (angle.cos() * rope_scale)[:, None, :], (angle.sin() * rope_scale)[:, None, :]
    lo, hi = k[..., : head_dim // 2], k[..., head_dim // 2:]
    k = torch.cat([lo * cos - hi * sin, hi * cos + lo * sin], dim=-1)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    key_cache[slots // page, slots % page] = k[keep].to(key_cache.dtype)
    value_cache[slots // page, slots % page] = v[keep].to(value_cache.dtype)
