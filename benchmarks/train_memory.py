"""Peak memory and step time of Beagle's stage-2 training for s = 1..5 simulation steps, of stage 1, and
of the EAGLE-1 baseline on the same batch.

    python benchmarks/train_memory.py [--hidden 576 --heads 9 --kv-heads 3 --vocab 49152 --batch 4 --seq 1024]
                                      [--draft-vocab N] [--precision fp32 bf16] [--json FILE]

A random draft and random target states of the given shape (SmolLM2-135M's by default) stand in for
real data: memory and time do not depend on the values. On a GPU it reports torch's peak allocated
memory and the median step time (forward, per-step backward, optimizer step); on CPU only the step
time. Stage 2 writes one predicted-state buffer in place and runs backward after every simulation
step, so its peak memory should not grow with s. On a GPU Beagle runs twice: attention through SDPA
with the dense block mask, and through FlexAttention with the same mask made block-sparse (the
trainer's `--attention` choices; FlexAttention has no backward pass on CPU). Each configuration runs at
every `--precision` asked for (`beagle train --precision`: bf16 autocast of the forward).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch

from vllm_beagle.eagle import EagleDraft
from vllm_beagle.reference import ReferenceDraft
from vllm_beagle.schema import BeagleConfig
from vllm_beagle.train.loop import backpropagate
from vllm_beagle.train.objective import LossConfig, stage1_loss, stage2_losses, teacher_forced_loss
from vllm_beagle.train.shards import TrainBatch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=576, help="draft width (default 576, SmolLM2-135M)")
    parser.add_argument("--heads", type=int, default=9, help="query heads (default 9)")
    parser.add_argument("--kv-heads", type=int, default=3, help="key/value heads (default 3)")
    parser.add_argument("--intermediate", type=int, default=1536, help="MLP width (default 1536)")
    parser.add_argument("--vocab", type=int, default=49152, help="target vocabulary (default 49152)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    parser.add_argument("--seq", type=int, default=1024, help="positions per sequence (default 1024)")
    parser.add_argument("--window", type=int, default=5,
                        help="block window; stage 2 is measured for s = 1..window (default 5)")
    parser.add_argument("--runs", type=int, default=5, help="timed steps per configuration (default 5)")
    parser.add_argument("--draft-vocab", type=int, default=0, help="Beagle's reduced draft vocabulary (0: full)")
    parser.add_argument("--tf32", action="store_true",
                        help="let fp32 matrix products and FlexAttention use TF32 tensor cores (GPU)")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32"],
                        help="beagle train's --precision, one row set per value (default fp32)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the rows to FILE")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    torch.manual_seed(0)
    cfg = BeagleConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads, vocab_size=args.vocab,
                       rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                       max_position_embeddings=8192)
    embed = torch.randn(args.vocab, args.hidden) * 0.02
    beagle = ReferenceDraft(dataclasses.replace(cfg, draft_vocab_size=args.draft_vocab or None), embed, embed)
    if args.draft_vocab:
        beagle.use_draft_vocab(torch.arange(args.draft_vocab))
    # The baseline is vLLM's EAGLE-1, which has no reduced vocabulary.
    drafts = {"beagle": beagle.to(device), "eagle": EagleDraft(cfg, embed, embed).to(device)}
    optimizers = {name: torch.optim.AdamW(d.block.parameters(), lr=1e-5) for name, d in drafts.items()}
    batch = TrainBatch(torch.randint(args.vocab, (args.batch, args.seq), device=device),
                       torch.randn(args.batch, args.seq, args.hidden, device=device),
                       torch.ones(args.batch, args.seq, dtype=torch.bool, device=device))
    loss_cfg = LossConfig()

    def losses(kind, flex):
        draft = drafts["eagle" if kind == "eagle" else "beagle"]
        if kind == "eagle":
            yield teacher_forced_loss(draft, batch, loss_cfg)
        elif kind == "stage 1":
            yield stage1_loss(draft, batch, args.window, 0, loss_cfg, flex=flex)
        else:
            yield from (loss for loss, _ in stage2_losses(draft, batch, args.window, 0, kind, loss_cfg, flex=flex))

    def step(kind, flex, precision):
        optimizer = optimizers["eagle" if kind == "eagle" else "beagle"]
        optimizer.zero_grad(set_to_none=True)
        backpropagate(losses(kind, flex), torch.autocast(device, torch.bfloat16, enabled=precision == "bf16"))
        optimizer.step()

    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}; "
          f"draft hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, vocab {args.vocab} (Beagle drafts over "
          f"{args.draft_vocab or args.vocab}); batch {args.batch} x {args.seq} positions, window {args.window}"
          f"{'; fp32 matrix products in TF32' if args.tf32 else ''}\n")
    print("| training | attention | precision | peak memory (GiB) | step time (ms) | positions/s |\n"
          "|---|---|---|---|---|---|")
    # FlexAttention has no backward pass on CPU.
    beagle_attention = ["dense", "flex"] if device == "cuda" else ["dense"]
    configs = [(kind, attention) for attention in beagle_attention for kind in ["stage 1", *range(1, args.window + 1)]]
    rows = []
    for precision in args.precision:
        for kind, attention in [*configs, ("eagle", "dense")]:
            flex = attention == "flex"
            step(kind, flex, precision)  # warm-up (and, for flex, compilation)
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(args.runs):
                start = time.perf_counter()
                step(kind, flex, precision)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - start) * 1e3)
            row = {"training": {"stage 1": "Beagle stage 1", "eagle": "EAGLE-1 baseline"}.get(
                       kind, f"Beagle stage 2, s = {kind}"),
                   "attention": "causal SDPA" if kind == "eagle" else attention, "precision": precision,
                   "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
                   "step_ms": statistics.median(times)}
            rows.append(row)
            peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
            print(f"| {row['training']} | {row['attention']} | {precision} | {peak} | {row['step_ms']:.1f} | "
                  f"{args.batch * args.seq / row['step_ms'] * 1e3:,.0f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                       "torch": torch.__version__, "args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
