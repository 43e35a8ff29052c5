"""Reduced draft vocabularies, side by side: for each size N, a Beagle draft trained on the same data with
`beagle train --draft-vocab N`, then its training step time, and in vLLM its tau, its cost per draft token
and its end-to-end decode speed-up over plain decoding on MT-Bench, all measured in one run.

    python benchmarks/draft_vocab.py --data data-smollm2/train [--target DIR] [--sizes 0 32768 16384 8192 4096]
        [--work draft-vocab] [--ks 3 5] [--num-prompts 16] [--max-tokens 128] [--json FILE] [-- TRAIN OPTIONS]

N = 0 is the target's full vocabulary. Drafts are trained into WORK/beagle-vocab-N unless that checkpoint
is already there, and `beagle train` resumes an interrupted training, so running the command again picks
up where it stopped. TRAIN OPTIONS go to every `beagle train` (default: the shipped SmolLM2 draft's
recipe). Training step time is timed in this process on the same batches for every N, stage 1 and stage 2
apart. The cost of a draft token comes from vLLM's own timings: (time per round - time per plain decode
step) / (K x time per plain decode step). On CPU, verifying K + 1 tokens costs more than one decode step,
so there that share also holds the extra verification work.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

from vllm_beagle.cli import build_parser, train_config
from vllm_beagle.compare import chat_token_ids, run_engines, summarize
from vllm_beagle.drafts import draft_path, speculative_config
from vllm_beagle.prompts import load_prompts
from vllm_beagle.smollm2 import smollm2_dir
from vllm_beagle.verifier import target_name

PER_RUN_OPTIONS = ("--data", "--target", "--out", "--draft-vocab")  # what this script sets for each size


def shipped_recipe() -> list[str]:
    """The `beagle train` options the shipped Beagle draft was trained with (its config.json records the
    command), less those this script sets for each size."""
    with open(os.path.join(draft_path("beagle"), "config.json")) as f:
        command = shlex.split(json.load(f)["beagle"]["training"]["command"])
    options, rest = [], command[2:]  # after `beagle train`
    while rest:
        option = rest.pop(0)
        if option in PER_RUN_OPTIONS:
            rest.pop(0)
        else:
            options.append(option)
    return options


def train_argv(data: str, target: str, out: str, size: int, options: list[str]) -> list[str]:
    return ["train", "--data", data, "--target", target, "--out", out, "--draft-vocab", str(size), *options]


def train_step_seconds(target, data, argv: list[str], steps: int) -> dict[str, float]:
    """Seconds per training step of stage 1 and of stage 2, for the draft `beagle train argv` would train
    (`target`, the HF model, and `data`, its shards, loaded once by the caller for every size).

    Each stage runs from a fresh draft: one untimed step, then a timed call of 2 steps and one of
    2 + `steps`; their difference divided by `steps` leaves out what every call pays once (optimiser
    set-up, loading and saving the training state).
    """
    from vllm_beagle.train.loop import train
    from vllm_beagle.train.new_draft import new_draft

    args = build_parser().parse_args(argv)
    cfg = train_config(args)
    if -(-len(data) // cfg.batch_size) < 5 + steps:
        raise SystemExit(f"draft_vocab.py: timing {steps} steps needs {5 + steps} batches in an epoch; "
                         f"{args.data} has {len(data)} sequences at batch size {cfg.batch_size}")
    seconds = {}
    for stage, epochs in (("stage1", (1, 0)), ("stage2", (0, 1))):
        draft, _ = new_draft(target, data, "beagle", args.kv_mode, args.draft_vocab, cfg.seed)
        stage_cfg = dataclasses.replace(cfg, stage1_epochs=epochs[0], stage2_epochs=epochs[1], save_every=10**9)
        with tempfile.TemporaryDirectory() as work:
            train(draft, data, work, stage_cfg, stop_after=1, progress=False)
            timed = []
            for n in (2, 2 + steps):
                start = time.perf_counter()
                train(draft, data, work, stage_cfg, stop_after=n, progress=False)
                timed.append(time.perf_counter() - start)
        seconds[stage] = (timed[1] - timed[0]) / steps
    return seconds


def main() -> int:
    argv = sys.argv[1:]
    options = shipped_recipe()
    if "--" in argv:
        argv, options = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="training shards (OUT/train of beagle data)")
    parser.add_argument("--target", default=None, help="HF directory (default: the embedded SmolLM2)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 32768, 16384, 8192, 4096],
                        help="draft vocabulary sizes (0: the full vocabulary)")
    parser.add_argument("--work", default="draft-vocab", help="where the drafts are trained (default draft-vocab)")
    parser.add_argument("--prompts", default="mtbench", help="mtbench, sharegpt-heldout or a JSONL file")
    parser.add_argument("--num-prompts", type=int, default=16, help="prompts used (default 16)")
    parser.add_argument("--ks", type=int, nargs="+", default=[3, 5], help="draft tokens per round (default 3 5)")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per prompt (default 128)")
    parser.add_argument("--timed-steps", type=int, default=10, help="training steps timed per stage (default 10)")
    parser.add_argument("--eager", action="store_true",
                        help="vLLM without compilation (default: compiled, as users run it)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if not args.sizes or any(n < 0 for n in args.sizes) or args.timed_steps < 1:
        parser.error("--sizes must be >= 0 (0: the full vocabulary) and --timed-steps at least 1")
    target = args.target or smollm2_dir()
    drafts, coverages = {}, {}
    for size in args.sizes:
        drafts[size] = os.path.join(args.work, f"beagle-vocab-{size or 'full'}")
        if not os.path.isfile(os.path.join(drafts[size], "config.json")):
            print(f"draft_vocab.py: training {drafts[size]}", flush=True)
            subprocess.run([sys.executable, "-m", "vllm_beagle.cli",
                            *train_argv(args.data, target, drafts[size], size, options)], check=True)
        with open(os.path.join(drafts[size], "config.json")) as f:
            coverages[size] = json.load(f)["beagle"]["training"].get("draft_vocab_coverage", 1.0)

    import torch
    from transformers import AutoModelForCausalLM

    from vllm_beagle.train.shards import ShardSet

    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    data = ShardSet(args.data, model.config.vocab_size)
    timings = {size: train_step_seconds(model, data, train_argv(args.data, target, path, size, options),
                                        args.timed_steps) for size, path in drafts.items()}
    del model, data
    prompts = chat_token_ids(target, load_prompts(args.prompts, args.num_prompts))
    specs = {"plain": None}
    specs.update({(size, k): speculative_config(path, k) for k in args.ks for size, path in drafts.items()})
    summary = summarize(run_engines(target, specs, prompts, args.max_tokens, eager=args.eager))
    plain_step = 1 / summary["plain"]["tokens_per_s"]
    rows = []
    for key, r in summary.items():
        if key == "plain":
            continue
        size, k = key
        round_time = r["output_tokens"] / r["tokens_per_s"] / r["num_drafts"]
        rows.append({"size": size, "k": k, "coverage": coverages[size], "tau": r["tau"],
                     "per_position": r["per_position"],
                     "draft_token_cost": (round_time - plain_step) / (k * plain_step), "speedup": r["speedup"],
                     "identical_outputs": r["identical_outputs"], "prompts": r["prompts"],
                     "train_step_s": timings[size]})
    print(f"\n{len(prompts)} {args.prompts} prompts, up to {args.max_tokens} new tokens, greedy, batch 1; "
          f"plain decoding {summary['plain']['tokens_per_s']:.1f} tok/s\n")
    print("| draft vocabulary | coverage | K | tau | per-position acceptance | draft token cost (x plain step) "
          "| speed-up | identical outputs | train step s (stage 1 / 2) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rates = " / ".join(f"{x:.2f}" for x in r["per_position"])
        print(f"| {r['size'] or 'full'} | {r['coverage']:.1%} | {r['k']} | {r['tau']:.2f} | {rates} | "
              f"{r['draft_token_cost']:.2f} | {r['speedup']:.2f}x | {r['identical_outputs']}/{r['prompts']} | "
              f"{r['train_step_s']['stage1']:.2f} / {r['train_step_s']['stage2']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"target": target_name(target), "data": args.data, "train_options": options,
                       "prompts": args.prompts, "num_prompts": len(prompts), "max_tokens": args.max_tokens,
                       "plain_tokens_per_s": summary["plain"]["tokens_per_s"], "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
