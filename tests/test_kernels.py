"""Each Triton kernel against its PyTorch reference, on fresh random inputs with poisoned outputs.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest); with a GPU and the interpreter
off, the same tests run the compiled kernels on it.
"""

import os
import zlib

import pytest
import torch

from beagle_kernels.paged_cross_attention import paged_cross_attention, paged_cross_attention_ref
from beagle_kernels.state_to_cache import write_states_to_cache, write_states_to_cache_ref

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
# Largest allowed error per storage dtype: one rounding of the output plus fp32 accumulation order.
TOL = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
PAGE = 16
GQA = [(4, 4), (6, 2), (8, 1)]  # (query heads, KV heads): ratios 1, 3, 8


def seeded(*case):
    """A generator of random inputs, different for every case and the same on every run."""
    return torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))


def make_cache(num_blocks, kv_heads, head_dim, dtype, layout, device=DEVICE):
    """K and V views of one vLLM-style cache, [blocks, page, kv_heads, D], poisoned with NaN.

    vLLM's logical per-layer cache is [blocks, kv_heads, page, 2 * D] (K then V in the last dim);
    GPU backends store it token-major (NHD), CPU_ATTN head-major (HND).
    """
    if layout == "NHD":
        logical = torch.full((num_blocks, PAGE, kv_heads, 2 * head_dim), float("nan"), dtype=dtype,
                             device=device).permute(0, 2, 1, 3)
    else:
        logical = torch.full((num_blocks, kv_heads, PAGE, 2 * head_dim), float("nan"), dtype=dtype, device=device)
    return logical[..., :head_dim].transpose(1, 2), logical[..., head_dim:].transpose(1, 2)


def batch(requests, extra_rows, gen, device=DEVICE):
    """Block table and metadata for requests given as (query rows, context length incl. those rows)."""
    pages = [-(-seq // PAGE) for _, seq in requests]
    num_blocks = sum(pages) + 3
    physical = torch.randperm(num_blocks, generator=gen)  # scattered, not in order
    table = torch.zeros(len(requests), max(pages) + 1, dtype=torch.int32)
    used = 0
    for r, n in enumerate(pages):
        table[r, :n] = physical[used:used + n].int()
        used += n
    q_lens = torch.tensor([q for q, _ in requests])
    query_start_loc = torch.cat([torch.zeros(1, dtype=torch.int64), q_lens.cumsum(0)]).int()
    seq_lens = torch.tensor([s for _, s in requests], dtype=torch.int32)
    num_rows = int(query_start_loc[-1]) + extra_rows
    return num_blocks, table.to(device), query_start_loc.to(device), seq_lens.to(device), num_rows


# (query rows, context length): a one-token context, rows across page boundaries, a chunk that is
# its whole context (prefill), an empty padded request, single decode rows, a chunk longer than one
# row tile of the kernel.
REQUESTS = [(1, 1), (3, 40), (5, 5), (0, 0), (1, 33), (2, 17), (19, 50)]


def check_attention(layout, heads, kv_heads, head_dim, dtype, true_states_only, **kernel_args):
    gen = seeded(layout, heads, head_dim, dtype, true_states_only, kernel_args)
    num_blocks, table, qsl, seq_lens, num_rows = batch(REQUESTS, extra_rows=2, gen=gen)
    key_cache, value_cache = make_cache(num_blocks, kv_heads, head_dim, dtype, layout)
    for r, (_, seq) in enumerate(REQUESTS):  # fill only the live slots: NaN anywhere else must stay unread
        for pos in range(seq):
            block, slot = int(table[r, pos // PAGE]), pos % PAGE
            key_cache[block, slot] = torch.randn(kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
            value_cache[block, slot] = torch.randn(kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    q = torch.randn(num_rows, heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    # True-states mode: keys before the request's query chunk only; 0 for the prefill chunk (no key).
    kv_limit = (seq_lens - (qsl[1:] - qsl[:-1])).int() if true_states_only else None

    out = torch.full_like(q, float("nan"))
    paged_cross_attention(q, key_cache, value_cache, table, qsl, seq_lens, kv_limit=kv_limit, out=out, **kernel_args)
    expected = paged_cross_attention_ref(q, key_cache, value_cache, table, qsl, seq_lens, kv_limit=kv_limit)
    assert not out.isnan().any(), "every output element must be written"
    torch.testing.assert_close(out.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])
    assert (out[qsl[-1]:] == 0).all(), "padding rows are zero"


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("heads, kv_heads", GQA)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("true_states_only", [False, True])
def test_paged_cross_attention(layout, heads, kv_heads, head_dim, dtype, true_states_only):
    check_attention(layout, heads, kv_heads, head_dim, dtype, true_states_only)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("heads, kv_heads", GQA)
@pytest.mark.parametrize("true_states_only", [False, True])
def test_paged_cross_attention_split_keys(layout, heads, kv_heads, true_states_only):
    """Keys in 16-key splits over 3 programs per row, merged: some splits see nothing, some rows see no key."""
    check_attention(layout, heads, kv_heads, 64, torch.float32, true_states_only, num_splits=3, block_n=16)


def test_reference_matches_dense_attention_of_the_block():
    """The paged reference is the block's dense causal attention once the pages are gathered."""
    from vllm_beagle.block import masked_attention

    gen = torch.Generator().manual_seed(0)
    num_blocks, table, qsl, seq_lens, num_rows = batch([(4, 37)], extra_rows=0, gen=gen, device="cpu")
    key_cache, value_cache = make_cache(num_blocks, 2, 64, torch.float32, "HND", device="cpu")
    k, v = torch.randn(37, 2, 64, generator=gen), torch.randn(37, 2, 64, generator=gen)
    pos = torch.arange(37)
    key_cache[table[0, pos // PAGE].long(), pos % PAGE] = k
    value_cache[table[0, pos // PAGE].long(), pos % PAGE] = v
    q = torch.randn(4, 6, 64, generator=gen)
    rows = torch.arange(33, 37)
    dense = masked_attention(q, k, v, pos[None, :] <= rows[:, None]).view(4, 6, 64)
    torch.testing.assert_close(paged_cross_attention_ref(q, key_cache, value_cache, table, qsl, seq_lens), dense)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("kv_heads", [1, 3])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_state_to_cache_write(layout, kv_heads, head_dim, dtype):
    gen = seeded(layout, kv_heads, head_dim, dtype)
    hidden, rows, num_blocks = 96, 21, 4
    states = torch.randn(rows, hidden, generator=gen).to(dtype).to(DEVICE)
    norm_weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype).to(DEVICE)
    k_weight = (torch.randn(kv_heads * head_dim, hidden, generator=gen) / hidden ** 0.5).to(dtype).to(DEVICE)
    v_weight = (torch.randn(kv_heads * head_dim, hidden, generator=gen) / hidden ** 0.5).to(dtype).to(DEVICE)
    positions = torch.randint(0, 4000, (rows,), generator=gen).to(DEVICE)
    inv_freq = (1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)).to(DEVICE)
    slots = torch.randperm(num_blocks * PAGE, generator=gen)[:rows]
    slots[[2, 7, 20]] = -1  # padding rows write nothing
    slots = slots.to(DEVICE)

    caches = [make_cache(num_blocks, kv_heads, head_dim, dtype, layout) for _ in range(2)]
    args = (states, norm_weight, 1e-5, k_weight, v_weight, positions, inv_freq, slots)
    write_states_to_cache(*args, *caches[0], rope_scale=0.9)
    write_states_to_cache_ref(*args, *caches[1], rope_scale=0.9)
    for got, expected in zip(caches[0], caches[1]):
        torch.testing.assert_close(got.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype], equal_nan=True)
        written = got[slots[slots >= 0] // PAGE, slots[slots >= 0] % PAGE]
        assert not written.isnan().any()
        assert got.isnan().sum() == (num_blocks * PAGE - (slots >= 0).sum()) * kv_heads * head_dim


def test_state_to_cache_reference_is_the_blocks_keys_and_values(toy):
    """The fused write stores exactly what BeagleBlock.keys_values computes."""
    block = toy["draft"].block
    gen = torch.Generator().manual_seed(1)
    states = torch.randn(9, block.cfg.hidden_size, generator=gen)
    positions = torch.arange(9) * 7
    key_cache, value_cache = make_cache(2, block.num_kv_heads, block.head_dim, torch.float32, "HND", device="cpu")
    slots = torch.arange(9) + 5
    write_states_to_cache_ref(states, block.state_norm.weight, block.state_norm.eps, block.k_proj.weight,
                              block.v_proj.weight, positions, block.rotary.inv_freq, slots, key_cache, value_cache,
                              rope_scale=block.rotary.scaling)
    k, v = block.keys_values(states, positions)
    torch.testing.assert_close(key_cache[slots // PAGE, slots % PAGE], k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(value_cache[slots // PAGE, slots % PAGE], v, atol=1e-5, rtol=1e-5)
