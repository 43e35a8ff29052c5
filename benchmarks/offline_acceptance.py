"""Offline acceptance of draft checkpoints on held-out shards: the figure `beagle train` logs after every
epoch (greedy drafting of K tokens, chain or parallel as the draft drafts, from the true context, a round
every 8th response position), for any Beagle or EAGLE-1 checkpoint and as many held-out sequences as
wanted, without vLLM.

    python benchmarks/offline_acceptance.py --data data-smollm2/heldout [--target DIR] [--k 3]
                                            [--sequences 40] [--within N] [--json F] DRAFT [DRAFT ...]

DRAFT is `beagle`, `eagle-baseline` (the shipped drafts), a checkpoint folder, or `ngram`: vLLM's
prompt-lookup proposal (prompt_lookup_min 2, max 4, as the benchmarks serve it; the tests hold it equal to
vLLM's own function) at the same rounds (a round where it finds no match counts as one with nothing
accepted; vLLM's tau counts only the rounds that draft). With `ngram` among the drafts, each other draft's
row also says how it does where n-gram drafting is accepted and where it is not, and the tau a
round-by-round choice of the better of the two would reach: whether a draft misses what copying from the
context finds. Fast (seconds per draft on CPU) and steady across runs, so it compares drafts trained on
the same data; vLLM's counters on real prompts (`benchmarks/acceptance.py`) remain the figure of record.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from transformers import AutoModelForCausalLM

from vllm_beagle.drafts import NGRAM, draft_path
from vllm_beagle.schema import state_name
from vllm_beagle.smollm2 import smollm2_dir
from vllm_beagle.train.evaluate import acceptance, accepted_per_round, load_draft, ngram_proposer, proposer, versus
from vllm_beagle.train.shards import ShardSet
from vllm_beagle.verifier import target_name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("drafts", nargs="+", metavar="DRAFT")
    parser.add_argument("--data", required=True, help="a folder of held-out shards written by `beagle data`")
    parser.add_argument("--target", default=None, help="HF directory (default: the embedded SmolLM2)")
    parser.add_argument("--k", type=int, default=3, help="draft tokens per round (default 3)")
    parser.add_argument("--sequences", type=int, default=40, help="held-out sequences read (default 40)")
    parser.add_argument("--within", type=int, default=None,
                        help="only rounds that start among the first N response tokens (e.g. 128 to match vLLM runs of "
                             "128 new tokens; default: the whole response)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.k < 1 or args.sequences < 1 or (args.within is not None and args.within < 1):
        parser.error("--k, --sequences and --within must be at least 1")

    target_dir = args.target or smollm2_dir()
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    rounds = {"k": args.k, "max_sequences": args.sequences, "within": args.within}
    ngram = None
    if NGRAM in args.drafts:
        ngram = accepted_per_round(ngram_proposer(args.k), ShardSet(args.data, target.config.vocab_size), **rounds)
    results = []
    print(f"{args.sequences} sequences at most of {args.data}, K = {args.k}"
          + (f", rounds within the first {args.within} response tokens" if args.within else "") + "\n")
    columns = ["draft", "tau", "per-position acceptance", "rounds"]
    columns += ["tau where n-gram is accepted / elsewhere", "better of it and n-gram"] if ngram else []
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for name in args.drafts:
        if name == NGRAM:
            accepted, row = ngram, {}
        else:
            draft = load_draft(draft_path(name), target)
            # Shards of a pre-norm kind also serve drafts that read the final state.
            data = ShardSet(args.data, target.config.vocab_size, state_name(draft.cfg))
            accepted = accepted_per_round(proposer(draft, args.k), data, **rounds)
            row = versus(accepted, ngram, args.k) if ngram else {}
        r = {**acceptance(accepted, args.k), **row}
        results.append({"draft": name, "k": args.k, **r})
        cells = [name, f"{r['tau']:.2f}", " / ".join(f"{x:.2f}" for x in r["per_position"]), str(r["rounds"])]
        if ngram:
            cells += ([f"{r['where_ngram_accepts']['tau']:.2f} ({r['ngram_rounds']} rounds) / "
                       f"{r['elsewhere']['tau']:.2f}", f"{r['better_of_both']['tau']:.2f}"] if row else ["", ""])
        print("| " + " | ".join(cells) + " |", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            # The data as given and the target by its hub id (or folder name): no path of this machine.
            json.dump({"data": args.data, "target": target_name(target_dir),
                       "within": args.within,
                       "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
