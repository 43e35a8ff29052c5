"""`beagle train` without its command line: check the job, load the target and the shards, build the
draft, train it (resuming what the work folder holds) and write the checkpoint with what it was
trained on. Every refusal is a ValueError (or OutputError, TrainStateError) that names the problem,
raised before the work it would spoil."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys

import torch

from ..checkpoint import is_beagle_config
from ..cpu import warn_if_slow_bf16
from ..outputs import exclusive, prepare_output_dir
from ..schema import CONFIG_FILE, QUERY_TOKEN
from ..verifier import hub_name
from .loop import TrainConfig, last_evaluation, run_identity, train, training_stats, uses_flex


@dataclasses.dataclass
class TrainJob:
    data: list[str]  # folders of shards, trained on together
    target: str  # HF folder of the target
    out: str  # checkpoint folder to write
    arch: str = "beagle"
    kv_mode: str = "concat"
    drafting: str = "chain"
    query: str = QUERY_TOKEN
    mask_token_id: int | None = None  # None: new_draft's default for parallel drafting
    draft_vocab: int | None = None  # None: draft_vocab.default_size
    state: str | None = None  # None: the shards' own
    data_fraction: list[float] = dataclasses.field(default_factory=lambda: [1.0])  # one for all, or per folder
    heldout: str | None = None  # None: a heldout folder beside `data`, if there is one
    work_dir: str | None = None  # None: OUT.train
    device: str | None = None  # None: cuda when available
    tf32: bool = False
    export_dtype: str = "float32"
    verifier: str | None = None  # the target `vllm serve DRAFT` serves; None: its hub id where known
    command: str = ""  # recorded in the checkpoint


def resolve_device(device: str | None) -> str:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: each process its own GPU
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def check_job(job: TrainJob, cfg: TrainConfig) -> None:
    """ValueError for options that cannot work, before anything is loaded."""
    from .new_draft import check_options

    check_options(job.arch, job.kv_mode, job.draft_vocab or 0, job.drafting, job.mask_token_id, job.query)
    device = resolve_device(job.device)
    if uses_flex(cfg.attention, device) and job.drafting == "parallel":
        raise ValueError("--drafting parallel trains through dense attention only: drop --attention flex")
    if job.drafting == "parallel" and cfg.stage2_epochs:
        raise ValueError("--drafting parallel feeds no draft step back, so there is no stage 2 to simulate: "
                         "pass --stage2-epochs 0 (and as many --stage1-epochs as you want epochs)")
    if len(job.data_fraction) not in (1, len(job.data)):
        raise ValueError(f"--data-fraction takes one fraction for every --data folder or one for each of the "
                         f"{len(job.data)}, got {len(job.data_fraction)}")
    if not all(0 < f <= 1 for f in job.data_fraction):
        raise ValueError(f"--data-fraction must be in (0, 1], got {' '.join(map(str, job.data_fraction))}")
    if job.tf32 and torch.device(device).type != "cuda":
        raise ValueError("--tf32 needs a CUDA device")
    config = os.path.join(job.out, CONFIG_FILE)
    if os.path.exists(config):
        with open(config, encoding="utf-8") as f:
            try:
                existing = json.load(f)
            except json.JSONDecodeError:
                existing = {}
        # A Beagle checkpoint has its beagle section, the EAGLE-1 export is one layer: anything else is
        # somebody's model (the target's own folder, say) that a run must not overwrite.
        if not is_beagle_config(existing) and existing.get("num_hidden_layers") != 1:
            raise ValueError(f"--out {job.out} holds a model that is not a draft (its config.json has no beagle "
                             "section and more than one layer); give another folder")


def run(job: TrainJob, cfg: TrainConfig) -> bool:
    """Train and write the checkpoint; False on the ranks of a torchrun job that write nothing."""
    from transformers import AutoModelForCausalLM

    from .draft_vocab import default_size
    from .new_draft import new_draft
    from .responses import fingerprint
    from .shards import ShardSet

    check_job(job, cfg)
    device = resolve_device(job.device)
    if job.tf32:
        torch.set_float32_matmul_precision("high")
    if cfg.precision == "bf16" and torch.device(device).type == "cpu":
        warn_if_slow_bf16("beagle train --precision bf16")
    heldout_dir = job.heldout
    beside = os.path.join(os.path.dirname(os.path.abspath(job.data[0])), "heldout")
    if heldout_dir is None and os.path.isdir(beside):
        heldout_dir = beside
    target = AutoModelForCausalLM.from_pretrained(job.target, dtype=torch.float32).eval()
    vocab_size = target.config.vocab_size
    draft_vocab = default_size(job.arch, vocab_size) if job.draft_vocab is None else job.draft_vocab
    # EAGLE-1 reads the final state, which shards of every kind carry.
    state = job.state or ("final_norm" if job.arch == "eagle" else None)
    data = ShardSet(job.data, vocab_size, state)
    data.keep_fraction(*job.data_fraction)
    heldout = ShardSet(heldout_dir, vocab_size, state) if heldout_dir else None
    draft, facts = new_draft(target, data, job.arch, job.kv_mode, draft_vocab, cfg.seed, job.drafting,
                             job.mask_token_id, job.query)
    if draft_vocab:
        print(f"beagle train: draft vocabulary of {draft_vocab} tokens covers "
              f"{facts['draft_vocab_coverage']:.1%} of the training targets")
    work_dir = job.work_dir or job.out.rstrip("/") + ".train"
    # The training state (weights and two Adam moments, written beside the previous one) and the checkpoint.
    state_bytes = sum(p.numel() for p in draft.block.parameters()) * 4 * 3
    prepare_output_dir(work_dir, 2 * state_bytes, "the training state")
    prepare_output_dir(os.path.dirname(os.path.abspath(job.out)), state_bytes, "the checkpoint")
    identity = run_identity(cfg, data, target=fingerprint(job.target), arch=job.arch, state=data.state,
                            kv_mode=job.kv_mode, draft_vocab=draft_vocab, drafting=job.drafting,
                            mask_token_id=draft.cfg.mask_token_id, query=job.query)
    # One lock per run: under torchrun every rank trains, and rank 0 holds the folder and writes.
    rank = int(os.environ.get("RANK", "0"))
    with exclusive(work_dir, "the training folder") if rank == 0 else contextlib.nullcontext():
        train(draft, data, work_dir, cfg, heldout=heldout, device=device, identity=identity)
    if rank != 0:
        return False
    evaluation = last_evaluation(work_dir)
    # EAGLE-1 trains teacher-forced: the block-attention window, simulation steps and mask attention never applied;
    # a parallel draft simulates nothing.
    unused = {"loss"} | ({"window", "sim_steps", "attention"} if job.arch == "eagle" else set())
    unused |= {"sim_steps"} if job.drafting == "parallel" else set()
    # What a reader can use: the data folders as given and what they hold (the fingerprint the identity
    # already read the shards for), never this machine's paths.
    draft.cfg.training = {"arch": job.arch, "data": job.data, "data_fingerprint": identity["data"],
                          "sequences": len(data), "data_fraction": job.data_fraction,
                          **{k: v for k, v in dataclasses.asdict(cfg).items() if k not in unused},
                          **dataclasses.asdict(cfg.loss), **facts,
                          **({"heldout": evaluation} if evaluation else {}),
                          "stats": _rounded(training_stats(work_dir)), "tf32": job.tf32, "command": job.command}
    draft.cfg.verifier = job.verifier or hub_name(job.target)
    if draft.cfg.verifier is None:
        print(f"beagle train: the hub id of {job.target} is not known, so the checkpoint names no target for "
              "`vllm serve DRAFT`; pass --verifier NAME_OR_PATH to record one (serving with the target named "
              "works either way)", file=sys.stderr)
    draft.to("cpu").to(getattr(torch, job.export_dtype)).save(job.out)
    return True


def _rounded(stats: dict) -> dict:
    """Per-stage training figures for the checkpoint's record, with tokens/s."""
    return {stage: {"steps": s["steps"], "seconds": round(s["seconds"], 1), "tokens": s["tokens"],
                    "tokens_per_s": round(s["tokens"] / max(s["seconds"], 1e-9), 1),
                    "peak_memory_gib": round(s["peak_memory_gib"], 2)} for stage, s in stats.items()}
