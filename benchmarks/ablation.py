"""Ablations of Beagle drafts on one data set, in one table: each variant is `beagle train` with its own
options on the same shards (and the same recipe otherwise), then its offline tau on the same held-out
shards (over whole responses, and over the first --max-tokens of each, as the vLLM run drafts), and its
tau, per-position acceptance and speed-up in a vLLM run of its own on the same prompts, beside plain
decoding (first and last, speed-ups over the mean of the two) and n-gram drafting.

    python benchmarks/ablation.py --data DATA/train [--heldout DATA/heldout] [--work ablation]
        [--variants top fused fused-noreg fused@0.25 ...] [--k 3] [--prompts mtbench] [--num-prompts 16]
        [--max-tokens 128] [--eager] [--conversations N] [--own-answers DIR] [--json FILE] [-- TRAIN OPTIONS]

A variant is a name from VARIANTS, optionally with @F to train on the first fraction F of the training
sequences (the data's conversations are in a seeded random order, so a prefix is a uniform sample): the
points of a data-size curve. With --conversations N, F is a fraction of N training conversations rather
than of those --data holds, and a name alone means all N: the shards of a prefix then serve the points
it covers, so that a curve is read point by point while beagle data extracts the rest into the same
folder (a variant that asks for more than --data holds is refused, naming what is there). Shards of
fused states serve every variant (top-state drafts and EAGLE-1 read the final states those shards
carry). A name may carry -fp32 (trained in fp32) and +own (trained on the dataset's own answers to the same
conversations as well, from --own-answers, counted as --data is). TRAIN OPTIONS go to every `beagle train`
(default: beagle train's defaults).

It resumes at two grains. A variant's row goes into the results file (--json, default WORK/ablation.json)
as soon as it is measured, and a variant already there is not trained or measured again: a results file
kept with the repository carries an ablation across machines, hours of training per row. A draft is
trained into WORK/<variant> unless that checkpoint is there, and `beagle train` resumes from its last save.
Each variant gets its own vLLM run, so its speed-ups are ratios within one run even when rows were
measured days apart; n-gram drafting in every run shows how comparable the runs are.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM

from vllm_beagle.checkpoint import read_config_dict
from vllm_beagle.compare import PLAIN, PLAIN_AGAIN, bookended, chat_token_ids, run_engines, summarize
from vllm_beagle.drafts import speculative_config
from vllm_beagle.outputs import claim_manifest, write_json
from vllm_beagle.prompts import load_prompts
from vllm_beagle.schema import CONFIG_FILE, state_name
from vllm_beagle.smollm2 import smollm2_dir
from vllm_beagle.train.data import MANIFEST
from vllm_beagle.train.evaluate import (
    acceptance,
    accepted_per_round,
    load_draft,
    ngram_proposer,
    offline_acceptance,
    proposer,
    versus,
)
from vllm_beagle.train.shards import SHARD_GLOB, ShardSet, shard_range

# What each variant adds to the common `beagle train` options.
VARIANTS = {
    "top": ["--state", "final_norm"],
    "top-noreg": ["--state", "final_norm", "--regression-weight", "0"],
    "fused": [],
    "fused-noreg": ["--regression-weight", "0"],
    # The query reads its row's own state beside its token's embedding (--query token+state); -sim trains every
    # epoch in stage 2, whose draft steps read the states the draft fed back (EAGLE-3's training-time test),
    # where stage 1 would teach the rows inside a window to read true states they never get in drafting.
    "fused-noreg-qstate": ["--regression-weight", "0", "--query", "token+state"],
    "fused-noreg-qstate-sim": ["--regression-weight", "0", "--query", "token+state", "--stage1-epochs", "0",
                               "--stage2-epochs", "3"],
    # EAGLE-1 drafts over the full vocabulary, whatever draft vocabulary the common options ask for.
    "eagle": ["--arch", "eagle", "--draft-vocab", "0"],
}
# NAME-fp32 trains NAME in fp32 beside common options that ask for bf16: what bf16 costs, if anything, and
# the variants a CPU without bf16 instructions can train. NAME+own (after -fp32, if both) also trains on the
# dataset's own answers to the same conversations (--own-answers), the same share of them.
FP32 = "-fp32"
OWN = "+own"


def base_name(name: str) -> str:
    """The VARIANTS entry of a variant name without its fraction."""
    return name.removesuffix(OWN).removesuffix(FP32)


def variant_options(name: str) -> list[str]:
    fp32 = name.removesuffix(OWN).endswith(FP32)
    return VARIANTS[base_name(name)] + (["--precision", "fp32"] if fp32 else [])


def parse_variant(spec: str) -> tuple[str, float]:
    name, _, fraction = spec.partition("@")
    if base_name(name) not in VARIANTS:
        raise SystemExit(f"ablation.py: unknown variant {name!r}; known: {', '.join(VARIANTS)}, each also "
                         f"as NAME{FP32}, NAME{OWN} and NAME{FP32}{OWN}")
    value = float(fraction) if fraction else 1.0
    if not 0 < value <= 1:
        raise SystemExit(f"ablation.py: the fraction of {spec!r} must be in (0, 1]")
    return name, value


def checkpoint_name(spec: str) -> str:
    # vLLM's --spec-model shorthand and our own naming: beagle-... and eagle-... folders.
    name, fraction = parse_variant(spec)
    prefix = "eagle" if base_name(name) == "eagle" else "beagle"
    return f"{prefix}-{name}" + (f"-frac{fraction:g}" if fraction < 1 else "")


def train(spec: str, args, options: list[str]) -> str:
    out = os.path.join(args.work, checkpoint_name(spec))
    if os.path.isfile(os.path.join(out, CONFIG_FILE)):
        return out
    argv = train_argv(spec, args, options, out)
    print("ablation.py: beagle " + " ".join(argv), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "vllm_beagle.cli", *argv], check=True)
    return out


def train_argv(spec: str, args, options: list[str], out: str) -> list[str]:
    """The `beagle train` arguments of one variant."""
    name, _ = parse_variant(spec)
    folders = [args.data]
    if name.endswith(OWN):
        if not args.own_answers:
            raise SystemExit(f"ablation.py: {spec} trains on the dataset's own answers too: give --own-answers")
        folders.append(args.own_answers)
    fractions = [data_fraction(spec, folder, args.conversations) for folder in folders]
    # The variant's own options come last: where both name an option, the variant's wins.
    argv = ["train", "--data", *folders, "--target", args.target, "--out", out, *options, *variant_options(name)]
    if min(fractions) < 1:
        argv += ["--data-fraction", *(f"{fraction:.6g}" for fraction in fractions)]
    if args.heldout:
        argv += ["--heldout", args.heldout]
    return argv


def data_fraction(spec: str, data: str, conversations: int | None) -> float:
    """The share of the sequences in `data` that `spec` trains on (`beagle train --data-fraction`)."""
    _, fraction = parse_variant(spec)
    if not conversations:
        return fraction
    held, wanted = held_conversations(data), fraction * conversations
    if wanted > held + 1:  # a conversation of rounding: an eighth of 15,802 is 1,975.25
        raise SystemExit(f"ablation.py: {spec} trains on {wanted:.0f} of the {conversations} training "
                         f"conversations, but {data} holds the states of {held}; extract more first "
                         f"(beagle data with a larger --num-prompts)")
    return min(1.0, wanted / held)


def held_conversations(data: str) -> int:
    """How many conversations the shards in `data` hold, from the range beagle data records in each."""
    ranges = [shard_range(path) for path in glob.glob(os.path.join(data, SHARD_GLOB))]
    if None in ranges:
        raise SystemExit(f"ablation.py: --conversations counts the conversations of shards that beagle data "
                         f"wrote from a dataset or response store; some in {data} record none")
    return sum(hi - lo for lo, hi in ranges)


# What a results file was measured with: a variant measured otherwise is not a row of the same table.
SETTINGS = ("data", "heldout", "k", "prompts", "num_prompts", "max_tokens", "eager", "offline_sequences",
            "conversations", "options")


def load_results(path: str, settings: dict) -> dict:
    """The rows measured so far; a new file starts with the settings alone."""
    saved = None
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
    recorded, present = claim_manifest(path, settings, saved)
    if recorded:
        raise SystemExit(f"ablation.py: {path} was measured with other settings ("
                         + "; ".join(f"{k}: {recorded[k]!r} there, {present[k]!r} here" for k in recorded)
                         + "); use another --json or the same settings")
    return {"variants": {}, **(saved or settings)}


def measure(spec: str, path: str, args, target, prompts: list[list[int]]) -> dict:
    """One variant's row: its offline tau, and a vLLM run of its own beside plain decoding and n-gram."""
    draft = load_draft(path, target)
    heldout = ShardSet(args.heldout, target.config.vocab_size, state_name(draft.cfg))
    offline = offline_acceptance(draft, heldout, args.k, args.offline_sequences)
    # Rounds among each sequence's first max_tokens response tokens, as the vLLM run drafts: later rounds of
    # long (multi-turn) responses are easier, and the whole-response figure overstates the vLLM one. Beside
    # n-gram drafting at the same rounds: whether the draft finds what copying from the context finds.
    rounds = {"k": args.k, "max_sequences": args.offline_sequences, "within": args.max_tokens}
    first = accepted_per_round(proposer(draft, args.k), heldout, **rounds)
    ngram_first = accepted_per_round(ngram_proposer(args.k), heldout, **rounds)
    offline_first = {**acceptance(first, args.k), **versus(first, ngram_first, args.k)}
    del draft
    config = read_config_dict(path)
    training = config.get("beagle", {}).get("training") or config.get("training", {})
    specs = bookended({"ngram": speculative_config("ngram", args.k), spec: speculative_config(path, args.k)})
    run = summarize(run_engines(args.target, specs, prompts, args.max_tokens, eager=args.eager))
    with open(os.path.join(args.data, MANIFEST)) as f:
        # The dtype the target computed the states in, which the settings do not pin (the same shards path
        # may hold either, by the machine that made them).
        state_dtype = json.load(f)["state_dtype"]
    return {"checkpoint": path, "measured": datetime.date.today().isoformat(), "state_dtype": state_dtype,
            "offline": offline, "offline_first": offline_first,
            "ngram_offline_first": acceptance(ngram_first, args.k),
            "data": training.get("data"), "sequences": training.get("sequences"), "stats": training.get("stats"),
            "vllm": run[spec],
            "ngram": run["ngram"], "plain": run[PLAIN], "plain_again": run[PLAIN_AGAIN]}


def print_table(results: dict, specs: list[str]) -> None:
    print(f"\n{results['num_prompts']} {results['prompts']} prompts, {results['max_tokens']} new tokens, "
          f"K = {results['k']}, greedy, batch 1, vLLM {'eager' if results['eager'] else 'compiled'}, one run per "
          f"variant; offline: up to {results['offline_sequences']} held-out sequences of {results['heldout']}\n")
    print(f"| drafting | training sequences | offline tau | offline, first {results['max_tokens']} tokens "
          "| there: n-gram, the draft where n-gram is accepted | vLLM tau | per position | speed-up | n-gram, same run "
          "| plain tok/s | identical | measured |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for spec in specs:
        row = results["variants"][spec]
        r, plain = row["vllm"], (row["plain"]["tokens_per_s"] + row["plain_again"]["tokens_per_s"]) / 2
        rates = " / ".join(f"{x:.2f}" for x in r["per_position"])
        first = f"{row['offline_first']['tau']:.2f}" if "offline_first" in row else "not measured"
        copying = (f"{row['ngram_offline_first']['tau']:.2f}, {row['offline_first']['where_ngram_accepts']['tau']:.2f}"
                   if "ngram_offline_first" in row else "not measured")
        print(f"| {spec} | {row['sequences']} | {row['offline']['tau']:.2f} | {first} | {copying} | {r['tau']:.2f} "
              f"| {rates} | "
              f"{r['speedup']:.2f}x | {row['ngram']['tau']:.2f}, {row['ngram']['speedup']:.2f}x | {plain:.1f} | "
              f"{r['identical_outputs']}/{r['prompts']} | {row['measured']} |")


def main() -> int:
    argv = sys.argv[1:]
    options = []
    if "--" in argv:
        argv, options = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="training shards (OUT/train of beagle data)")
    parser.add_argument("--heldout", default=None, help="held-out shards (default: heldout beside --data)")
    parser.add_argument("--target", default=None, help="HF directory (default: the embedded SmolLM2)")
    parser.add_argument("--work", default="ablation", help="where the drafts are trained (default ablation)")
    parser.add_argument("--variants", nargs="+", default=["top", "fused", "fused-noreg"],
                        help=f"variants to compare, NAME or NAME@FRACTION, trained and measured in this order; "
                             f"names: {', '.join(VARIANTS)}, each also as NAME{FP32} (trained in fp32) "
                             f"and NAME{OWN} (with --own-answers) "
                             f"(default: top fused fused-noreg)")
    parser.add_argument("--k", type=int, default=3, help="draft tokens per round (default 3)")
    parser.add_argument("--prompts", default="mtbench", help="vLLM prompt set (default mtbench)")
    parser.add_argument("--num-prompts", type=int, default=16, help="vLLM prompts (default 16)")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per prompt (default 128)")
    parser.add_argument("--offline-sequences", type=int, default=40,
                        help="held-out sequences read offline (default 40)")
    parser.add_argument("--eager", action="store_true", help="vLLM without compilation (default: compiled)")
    parser.add_argument("--conversations", type=int, default=None,
                        help="the training conversations that fractions count from (default: those in --data); "
                             "--data may then hold a prefix of them")
    parser.add_argument("--own-answers", default=None,
                        help="shards of the dataset's own answers to the same conversations (OUT/train of beagle "
                             f"data --answers dataset), for the NAME{OWN} variants")
    parser.add_argument("--json", default=None,
                        help="the results file, written after each variant and read to resume (default "
                             "WORK/ablation.json)")
    args = parser.parse_args(argv)
    for spec in args.variants:
        parse_variant(spec)
    args.target = args.target or smollm2_dir()
    # Kept as given (relative where the command was), so that the results name no path of this machine.
    args.heldout = args.heldout or os.path.join(os.path.dirname(os.path.normpath(args.data)), "heldout")
    if not os.path.isdir(args.heldout):
        raise SystemExit(f"ablation.py: no held-out shards at {args.heldout}")
    args.json = args.json or os.path.join(args.work, "ablation.json")
    args.options = options
    results = load_results(args.json, {k: getattr(args, k) for k in SETTINGS})
    todo = [spec for spec in args.variants if spec not in results["variants"]]
    if todo:
        target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
        prompts = chat_token_ids(args.target, load_prompts(args.prompts, args.num_prompts))
    for spec in todo:
        results["variants"][spec] = measure(spec, train(spec, args, options), args, target, prompts)
        write_json(args.json, results)
        print(f"ablation.py: {spec} measured, in {args.json}", file=sys.stderr, flush=True)
    print_table(results, args.variants)
    return 0


if __name__ == "__main__":
    sys.exit(main())
