"""GPU timings of the Beagle kernels against their references and against stock attention.

    python benchmarks/kernel_timings.py [--quick] [--json FILE]

For draft shapes (one query row per request, the draft steps; four rows, the first pass after a
K = 3 verification) over batch and context sizes, with SmolLM2-135M and Llama-3-8B head layouts,
bf16: median time of many runs after warm-up (CUDA events), launched from Python and replayed from a
CUDA graph (as vLLM runs decode steps; small shapes are launch-bound otherwise), and the bandwidth the kernel achieves
reading K and V, next to the device's own copy bandwidth. Baselines: the PyTorch reference (small
batches only: it loops over requests), vLLM's `unified_attention` and FlashAttention's
`flash_attn_with_kvcache` where importable, and PyTorch SDPA over a contiguous (not paged) cache,
which reads the same bytes without a block table. Without a GPU it says so and exits.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys

import torch

LAYOUTS = {"SmolLM2-135M": (9, 3, 64, 576), "Llama-3-8B": (32, 8, 128, 4096)}  # heads, kv heads, D, hidden
PAGE = 16
MAX_CACHE_TOKENS = 4 * 1024 * 1024


def timed(fn, warmup=5, runs=30) -> float:
    """Median milliseconds of fn() measured with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graphed(fn):
    """fn captured in a CUDA graph, as vLLM runs decode steps: times without Python launch overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy (read + write)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / timed(lambda: dst.copy_(src)) / 1e6


def attention_case(batch, context, rows, heads, kv_heads, dim, dtype=torch.bfloat16):
    pages = -(-context // PAGE)
    num_blocks = batch * pages
    kv = torch.randn(num_blocks, PAGE, kv_heads, 2 * dim, dtype=dtype, device="cuda")  # GPU layout (NHD)
    key_cache, value_cache = kv[..., :dim], kv[..., dim:]
    table = torch.randperm(num_blocks, device="cuda").int().view(batch, pages)
    qsl = torch.arange(0, (batch + 1) * rows, rows, dtype=torch.int32, device="cuda")
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch * rows, heads, dim, dtype=dtype, device="cuda")
    return q, key_cache, value_cache, table, qsl, seq_lens


def attention_row(model, heads, kv_heads, dim, rows, batch, context, unified_attention, flash_attn_with_kvcache):
    from beagle_kernels.paged_cross_attention import paged_cross_attention, paged_cross_attention_ref

    q, kc, vc, table, qsl, seq_lens = attention_case(batch, context, rows, heads, kv_heads, dim)
    out = torch.empty_like(q)
    kv_bytes = 2 * batch * context * kv_heads * dim * q.element_size()

    def triton_fn():
        paged_cross_attention(q, kc, vc, table, qsl, seq_lens, out=out, max_seq_len=context, max_query_len=rows)

    row = {"model": model, "rows": rows, "batch": batch, "context": context,
           "triton_ms": timed(triton_fn), "triton_graph_ms": timed(graphed(triton_fn))}
    row["triton_graph_GBps"] = kv_bytes / row["triton_graph_ms"] / 1e6
    if batch <= 4:
        row["reference_ms"] = timed(lambda: paged_cross_attention_ref(q, kc, vc, table, qsl, seq_lens),
                                    warmup=1, runs=5)
    # The same bytes without paging: gathered once, contiguous [batch, kv_heads, context, D].
    pos = torch.arange(context, device="cuda")
    blocks = table[:, pos // PAGE].long()
    kd = kc[blocks, pos % PAGE].transpose(1, 2).contiguous()
    vd = vc[blocks, pos % PAGE].transpose(1, 2).contiguous()
    qd = q.view(batch, rows, heads, dim).transpose(1, 2)
    mask = pos[None, :] <= (context - rows + torch.arange(rows, device="cuda"))[:, None]

    def sdpa_fn():
        torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, enable_gqa=True)

    row["sdpa_dense_ms"] = timed(sdpa_fn)
    row["sdpa_dense_graph_ms"] = timed(graphed(sdpa_fn))
    if flash_attn_with_kvcache is not None:
        row["flash_attn_ms"] = timed(lambda: flash_attn_with_kvcache(
            q.view(batch, rows, heads, dim), kc, vc, cache_seqlens=seq_lens, block_table=table, causal=True))
    if unified_attention is not None:
        vllm_out = torch.empty_like(q)

        def vllm_fn():
            unified_attention(q=q, k=kc, v=vc, out=vllm_out, cu_seqlens_q=qsl, max_seqlen_q=rows, seqused_k=seq_lens,
                              max_seqlen_k=context, softmax_scale=dim ** -0.5, causal=True, window_size=(-1, -1),
                              block_table=table, softcap=0, q_descale=None, k_descale=None, v_descale=None)

        row["vllm_unified_ms"] = timed(vllm_fn)
        row["vllm_unified_graph_ms"] = timed(graphed(vllm_fn))
        triton_fn()
        row["max_abs_diff_vs_vllm"] = (out.float() - vllm_out.float()).abs().max().item()
    return row


def bench_attention(quick: bool) -> list[dict]:
    try:
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention
    except ImportError:
        unified_attention = None
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        flash_attn_with_kvcache = None

    results = []
    batches = [1, 16, 256] if quick else [1, 4, 16, 64, 256]
    contexts = [256, 4096, 32768] if quick else [256, 1024, 4096, 16384, 32768]
    for model, (heads, kv_heads, dim, _) in LAYOUTS.items():
        for rows in (1, 4):
            for batch in batches:
                for context in contexts:
                    if batch * context > MAX_CACHE_TOKENS:
                        continue
                    row = attention_row(model, heads, kv_heads, dim, rows, batch, context, unified_attention,
                                        flash_attn_with_kvcache)
                    results.append(row)
                    print(json.dumps(row), flush=True)
                    torch.cuda.empty_cache()
    return results


def bench_write(quick: bool) -> list[dict]:
    from beagle_kernels.state_to_cache import write_states_to_cache, write_states_to_cache_ref

    rows_out = []
    for model, (_, kv_heads, dim, hidden) in LAYOUTS.items():
        for tokens in ([1, 64, 1024] if quick else [1, 16, 64, 256, 1024, 4096]):
            dtype = torch.bfloat16
            states = torch.randn(tokens, hidden, dtype=dtype, device="cuda")
            norm = torch.ones(hidden, dtype=dtype, device="cuda")
            wk = torch.randn(kv_heads * dim, hidden, dtype=dtype, device="cuda") / hidden ** 0.5
            wv = torch.randn_like(wk)
            positions = torch.arange(tokens, device="cuda")
            inv_freq = 1.0 / 10000.0 ** (torch.arange(0, dim, 2, device="cuda").float() / dim)
            slots = torch.arange(tokens, device="cuda")
            kv = torch.empty(-(-tokens // PAGE), PAGE, kv_heads, 2 * dim, dtype=dtype, device="cuda")
            args = (states, norm, 1e-5, wk, wv, positions, inv_freq, slots, kv[..., :dim], kv[..., dim:])
            fused = functools.partial(write_states_to_cache, *args)
            row = {"model": model, "tokens": tokens, "fused_ms": timed(fused), "fused_graph_ms": timed(graphed(fused)),
                   "reference_ms": timed(functools.partial(write_states_to_cache_ref, *args))}
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    return rows_out


def markdown(result: dict) -> str:
    """The results as the tables the README and closing notes carry."""
    lines = [f"{result['device']}, torch {result['torch']}, bf16, token-major paged cache (page {PAGE}); "
             f"device copy bandwidth {result['copy_GBps']:.0f} GB/s", "",
             "| heads layout | rows/req | batch | context | Triton eager / graph ms | Triton GB/s (graph) "
             "| vLLM unified_attention eager / graph ms | max abs diff vs vLLM | SDPA dense eager / graph ms "
             "| reference ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for a in result["attention"]:
        vllm = (f"{a['vllm_unified_ms']:.3f} / {a['vllm_unified_graph_ms']:.3f} | {a['max_abs_diff_vs_vllm']:.1e}"
                if "vllm_unified_ms" in a else "- | -")
        ref = f"{a['reference_ms']:.3f}" if "reference_ms" in a else "-"
        lines.append(f"| {a['model']} | {a['rows']} | {a['batch']} | {a['context']} | {a['triton_ms']:.3f} / "
                     f"{a['triton_graph_ms']:.3f} | {a['triton_graph_GBps']:.0f} | {vllm} | "
                     f"{a['sdpa_dense_ms']:.3f} / {a['sdpa_dense_graph_ms']:.3f} | {ref} |")
    lines += ["", "| heads layout | rows | fused write eager / graph ms | reference ms |", "|---|---|---|---|"]
    for w in result["state_to_cache"]:
        lines.append(f"| {w['model']} | {w['tokens']} | {w['fused_ms']:.3f} / {w['fused_graph_ms']:.3f} | "
                     f"{w['reference_ms']:.3f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--table", metavar="RESULTS_JSON", help="print the tables of an earlier run and exit")
    args = parser.parse_args()
    if args.table:
        with open(args.table) as f:
            print(markdown(json.load(f)))
        return 0
    if not torch.cuda.is_available():
        print("benchmarks/kernel_timings.py: no GPU here; kernel timings need one "
              "(the CPU runs Triton only interpreted)")
        return 0
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "copy_GBps": copy_bandwidth()}
    print(json.dumps(result), flush=True)
    result["attention"] = bench_attention(args.quick)
    result["state_to_cache"] = bench_write(args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
