"""Acceptance and decode speed on MT-Bench for Beagle, the EAGLE-1 baseline and n-gram drafting, against
plain decoding, all measured in one run (one engine after another, batch 1).

    python benchmarks/acceptance.py [--target DIR] [--num-prompts 80] [--ks 3 5] [--temperatures 0 1]
                                    [--drafts beagle eagle-baseline ngram] [--max-tokens 128]
                                    [--json results.json] [--plot acceptance.png]

Prints a Markdown table (tau, per-position acceptance, output tokens/s, speed-up over plain decoding, what
a round costs in plain decoding steps (tau / speed-up: the draft's forwards and the verification of K + 1
tokens together), greedy outputs identical) and draws per-position acceptance per draft and K into a PNG.
Defaults: the embedded SmolLM2-135M-Instruct and the two shipped drafts. On the CPU machines the speed-ups
are ratios measured in the same run; absolute tokens/s mean little there. Plain decoding runs first and
last: how far its two speeds lie apart says how much the machine drifted during the run, and speed-ups are
over their mean.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from vllm_beagle.compare import bookended, chat_token_ids, run_engines, summarize
from vllm_beagle.drafts import speculative_config
from vllm_beagle.prompts import load_prompts
from vllm_beagle.smollm2 import smollm2_dir
from vllm_beagle.verifier import target_name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=None, help="HF directory (default: the embedded SmolLM2)")
    parser.add_argument("--prompts", default="mtbench", help="mtbench, sharegpt-heldout or a JSONL file")
    parser.add_argument("--num-prompts", type=int, default=80, help="prompts used (default 80)")
    parser.add_argument("--ks", type=int, nargs="+", default=[3, 5], help="draft tokens per round (default 3 5)")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0],
                        help="sampling temperatures (default 0 1)")
    parser.add_argument("--drafts", nargs="+", default=["beagle", "eagle-baseline", "ngram"],
                        help="shipped draft names, ngram, or checkpoint folders (default: all three)")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per prompt (default 128)")
    parser.add_argument("--eager", action="store_true",
                        help="vLLM without compilation (default: compiled, as users run it)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--plot", default="acceptance.png", help="PNG of per-position acceptance ('' for none)")
    args = parser.parse_args()
    target = args.target or smollm2_dir()
    prompts = chat_token_ids(target, load_prompts(args.prompts, args.num_prompts))
    table = {}
    for temperature in args.temperatures:
        # A checkpoint folder is named by its folder's name: a path of this machine means nothing elsewhere.
        specs = bookended({f"{os.path.basename(os.path.normpath(d))}, K = {k}": speculative_config(d, k)
                           for k in args.ks for d in args.drafts})
        results = run_engines(target, specs, prompts, args.max_tokens, temperature, eager=args.eager)
        table[temperature] = summarize(results)
    mode = "eager" if args.eager else "compiled"
    print(f"\n{len(prompts)} {args.prompts} prompts, up to {args.max_tokens} new tokens, batch 1, vLLM {mode}\n")
    print("| temperature | drafting | tau | per-position acceptance | tokens/s | speed-up | round (plain steps) "
          "| identical outputs |")
    print("|---|---|---|---|---|---|---|---|")
    for temperature, rows in table.items():
        for name, r in rows.items():
            rates = " / ".join(f"{x:.2f}" for x in r.get("per_position", []))
            tau = f"{r['tau']:.2f}" if "tau" in r else "-"
            cost = f"{r['tau'] / r['speedup']:.2f}" if "tau" in r else "1.00"
            same = f"{r['identical_outputs']}/{r['prompts']}" if temperature == 0 else "-"
            print(f"| {temperature:g} | {name} | {tau} | {rates or '-'} | {r['tokens_per_s']:.1f} | "
                  f"{r['speedup']:.2f}x | {cost} | {same} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"target": target_name(target), "prompts": args.prompts, "num_prompts": len(prompts),
                       "eager": args.eager,
                       "max_tokens": args.max_tokens, "results": {str(t): r for t, r in table.items()}}, f, indent=2)
    if args.plot:
        plot(table, args.plot)
    return 0


def plot(table: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table), figsize=(6 * len(table), 4), squeeze=False)
    for ax, (temperature, rows) in zip(axes[0], table.items()):
        for name, r in rows.items():
            if r.get("per_position"):
                ax.plot(range(1, len(r["per_position"]) + 1), r["per_position"], marker="o",
                        label=f"{name} (tau {r['tau']:.2f})")
        ax.set(title=f"temperature {temperature:g}", xlabel="draft position", ylabel="acceptance rate", ylim=(0, 1),
               xticks=range(1, 1 + max((len(r.get("per_position", [])) for r in rows.values()), default=0)))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
