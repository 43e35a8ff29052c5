"""The training loop: stage 1 for the first epochs, stage 2 after, resumable, exported as a checkpoint.

Every random choice (epoch order, window offsets, noise) is drawn from generators seeded by the seed
and the step, so a run resumed from its last saved state takes exactly the steps an uninterrupted run
would have taken. The training state is saved atomically every `save_every` steps and at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import time
from collections.abc import Iterator

import torch
from tqdm import tqdm

from ..outputs import atomic_path
from ..reference import Draft
from .evaluate import offline_acceptance
from .objective import LossConfig, option, parallel_loss, stage1_loss, stage2_losses, teacher_forced_loss
from .shards import ShardSet

STATE_FILE = "train_state.pt"
EVAL_FILE = "eval.jsonl"


@dataclasses.dataclass
class TrainConfig:
    window: int = option(5, "block window k")
    sim_steps: int = option(4, "stage-2 simulation steps s <= k")
    stage1_epochs: int = option(10, "epochs of stage 1")
    stage2_epochs: int = option(10, "epochs of stage 2")
    batch_size: int = option(8, "sequences per step")
    max_len: int = option(2048, "positions per sequence")
    lr: float = option(3e-5, "peak learning rate, AdamW")
    warmup_steps: int = option(2000, "linear warm-up steps")
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = 0.5
    seed: int = option(0, "seed of initialisation, order, offsets and noise")
    save_every: int = option(200, "steps between saved training states")
    eval_k: int = option(3, "draft length K of the held-out acceptance measured after every epoch")
    eval_sequences: int = option(16, "held-out sequences that measurement reads (and as many training sequences)")
    # Dense is the default everywhere: on an H100 in fp32, FlexAttention's block-sparse path made every training
    # step slower (benchmarks/train_memory.py; README) for 5-18% less memory.
    attention: str = option("dense", "attention over Beagle's block masks: dense (SDPA with the full mask) or "
                                     "flex (FlexAttention, skips fully hidden tiles; CUDA only; slower but lighter "
                                     "on an H100 in fp32)", ("dense", "flex"))
    precision: str = option("fp32", "fp32, or bf16: the draft's forward under bfloat16 autocast (matrix products "
                                    "and attention in bf16; weights, optimizer, softmax and losses stay fp32); on "
                                    "a CPU with AMX, steps of SmolLM2's shapes ran 1.5 to 2.4x faster than fp32",
                            ("fp32", "bf16"))
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)

    def __post_init__(self):
        # Checked here rather than where each stage starts: an impossible stage-2 option must not surface
        # only after hours of stage 1.
        if self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")
        if self.stage2_epochs and not 1 <= self.sim_steps <= self.window:
            raise ValueError(f"sim_steps must be between 1 and window ({self.window}), got {self.sim_steps}")
        if self.max_len < 2:
            raise ValueError(f"max_len must be at least 2 (a row needs a state and a next token), got {self.max_len}")
        for name in ("batch_size", "save_every", "eval_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("stage1_epochs", "stage2_epochs", "warmup_steps", "eval_sequences"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} cannot be negative, got {getattr(self, name)}")
        for field in dataclasses.fields(self):
            choices = field.metadata.get("choices")
            if choices and getattr(self, field.name) not in choices:
                raise ValueError(f"{field.name} must be one of {', '.join(choices)}, "
                                 f"got {getattr(self, field.name)!r}")


def uses_flex(attention: str, device) -> bool:
    """Whether Beagle's block masks go through FlexAttention; refuses it where it cannot train."""
    if attention == "flex" and torch.device(device).type != "cuda":
        raise ValueError("attention flex needs a CUDA device: PyTorch's FlexAttention has no backward pass on "
                         f"{torch.device(device).type}; use attention dense")
    return attention == "flex"


def _generator(seed: int, *parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash((seed,) + parts) % 2**63)


def _steps_per_epoch(data: ShardSet, cfg: TrainConfig) -> int:
    return -(-len(data) // cfg.batch_size)


# Sequences are batched with others of similar length, found within runs of this many batches of a random
# order: padding then costs little, and every batch is still a random draw from the whole data.
LENGTH_GROUP = 64


def _epoch_batches(data: ShardSet, cfg: TrainConfig, epoch: int) -> list[list[int]]:
    """The batches of an epoch, in order: a seeded shuffle, sorted by length within each run of
    LENGTH_GROUP batches, cut into batches, and the batches shuffled again."""
    order = torch.randperm(len(data), generator=_generator(cfg.seed, 1, epoch)).tolist()
    group = cfg.batch_size * LENGTH_GROUP
    batches = []
    for start in range(0, len(order), group):
        run = sorted(order[start:start + group], key=data.length)
        batches += [run[i:i + cfg.batch_size] for i in range(0, len(run), cfg.batch_size)]
    shuffled = torch.randperm(len(batches), generator=_generator(cfg.seed, 4, epoch)).tolist()
    return [batches[i] for i in shuffled]


# Options a resumed run may change: they decide when to save and what to measure, not what is trained.
CHANGEABLE_ON_RESUME = ("save_every", "eval_k", "eval_sequences", "attention")


def run_identity(cfg: TrainConfig, data: ShardSet, **more) -> dict:
    """What a training state is a state of: the options that shape the weights, the data and `more`
    (the caller's: e.g. the target's fingerprint). A resume must match it in every entry."""
    options = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in CHANGEABLE_ON_RESUME}
    options["betas"] = list(options["betas"])
    return {**options, "data": data.fingerprint(), **more}


def train(draft: Draft, data: ShardSet, work_dir: str, cfg: TrainConfig, stop_after: int | None = None,
          progress: bool = True, heldout: ShardSet | None = None, device: str = "cpu",
          identity: dict | None = None) -> Draft:
    """Train `draft` in place, resuming from `work_dir` when it holds a saved state.

    `identity` (default run_identity(cfg, data)) is saved with the state; a saved state of another
    identity (other options, data or target) is refused by name rather than resumed.

    `stop_after` ends the run after that many steps of this call (the state is saved first), as an
    interruption would; calling train again resumes. With `heldout`, the offline acceptance of
    greedy drafting with K = eval_k is measured after every epoch, on held-out and on training
    sequences, and appended to eval.jsonl.

    Under torchrun (WORLD_SIZE > 1) every process trains the same draft on its share of each batch
    and gradients are averaged across processes before each optimiser step (gloo on CPU, NCCL on
    GPU); only rank 0 writes the training state and measures held-out acceptance.
    """
    flex = uses_flex(cfg.attention, device)
    autocast = torch.autocast(torch.device(device).type, torch.bfloat16, enabled=cfg.precision == "bf16")
    rank, world = _init_distributed(device)
    draft.to(device)
    os.makedirs(work_dir, exist_ok=True)
    params = list(draft.block.parameters())
    for p in params:  # gradients exist from the start: a process without sequences in a step adds zeros
        p.grad = torch.zeros_like(p)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    per_epoch = _steps_per_epoch(data, cfg)
    total = per_epoch * (cfg.stage1_epochs + cfg.stage2_epochs)
    identity = identity or run_identity(cfg, data)
    step, stats = _load_state(work_dir, draft, optimizer, scheduler, device, identity)
    done_now = 0
    batches = (None, None)  # (epoch, its batches)
    with tqdm(total=total, initial=step, desc="train", unit="step", disable=not progress or rank != 0) as bar:
        while step < total:
            started = time.perf_counter()
            epoch, index = divmod(step, per_epoch)
            if batches[0] != epoch:
                batches = (epoch, _epoch_batches(data, cfg, epoch))
            indices = batches[1][index][rank::world]
            offset = int(torch.randint(cfg.window, (1,), generator=_generator(cfg.seed, 2, step)))
            noise = _generator(cfg.seed, 3, step, rank)
            optimizer.zero_grad(set_to_none=False)
            shown = 0.0
            if indices:
                batch = data.batch(indices, cfg.max_len).to(device)
                shown = backpropagate(_losses(draft, batch, epoch, offset, noise, cfg, flex), autocast)
            if world > 1:
                _average_gradients(params, world)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            done_now += 1
            stage = _stage_name(draft, epoch, cfg)
            record = stats.setdefault(stage, {"steps": 0, "seconds": 0.0, "tokens": 0, "peak_memory_gib": 0.0})
            record["steps"] += 1
            record["seconds"] += time.perf_counter() - started
            record["tokens"] += sum(min(data.length(i), cfg.max_len) for i in batches[1][index])
            record["peak_memory_gib"] = max(record["peak_memory_gib"], _peak_memory_gib(device))
            bar.update(1)
            bar.set_postfix(stage=stage, loss=f"{shown:.3f}", tok_s=f"{record['tokens'] / record['seconds']:.0f}")
            if rank == 0 and (step % cfg.save_every == 0 or step == total or done_now == stop_after):
                _save_state(work_dir, draft, optimizer, scheduler, step, stats, identity)
            if rank == 0 and heldout is not None and step % per_epoch == 0:
                _evaluate(draft, heldout, data, work_dir, cfg, step, step // per_epoch, bar)
            if done_now == stop_after:
                break
    return draft


def _stage_name(draft: Draft, epoch: int, cfg: TrainConfig) -> str:
    if draft.arch == "eagle":
        return "teacher_forced"
    if draft.cfg.drafting == "parallel":
        return "parallel"
    return "stage1" if epoch < cfg.stage1_epochs else "stage2"


def _peak_memory_gib(device) -> float:
    """The most memory the run has held: the GPU's allocations on CUDA, the process's resident set elsewhere."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _init_distributed(device: str) -> tuple[int, int]:
    """(rank, world size): (0, 1) unless started by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _average_gradients(params: list[torch.Tensor], world: int) -> None:
    # By hand rather than through DistributedDataParallel: the losses call the block's parts
    # (queries, keys_values, output) directly, and stage 2 backpropagates several losses per step,
    # neither of which DDP's forward-hooked reducer follows. One flat all-reduce per step.
    import torch.distributed as dist

    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p))


def backpropagate(losses: Iterator[torch.Tensor], autocast: torch.autocast) -> float:
    """Backpropagate each loss as it comes (stage 2 keeps one simulation step's activations); returns their sum.
    Only the forward, the generator's work up to each loss, runs under `autocast`: backward follows the dtypes
    the forward chose, as torch.autocast asks."""
    total = 0.0
    with torch.enable_grad():
        while True:
            with autocast:
                loss = next(losses, None)
            if loss is None:
                return total
            loss.backward()
            total += float(loss.detach())


def _losses(draft: Draft, batch, epoch: int, offset: int, noise: torch.Generator, cfg: TrainConfig, flex: bool):
    """The losses of one step, to be backpropagated one by one (stage 2 keeps one step's activations)."""
    if draft.arch == "eagle":  # EAGLE-1's own recipe, for as many epochs as both of Beagle's stages
        yield teacher_forced_loss(draft, batch, cfg.loss, noise)
    elif draft.cfg.drafting == "parallel":  # every epoch: nothing is fed back, so there is no stage 2
        yield parallel_loss(draft, batch, cfg.window, offset, cfg.loss, noise)
    elif epoch < cfg.stage1_epochs:
        yield stage1_loss(draft, batch, cfg.window, offset, cfg.loss, noise, flex)
    else:
        for loss, _ in stage2_losses(draft, batch, cfg.window, offset, cfg.sim_steps, cfg.loss, noise, flex):
            yield loss


def _evaluate(draft: Draft, heldout: ShardSet, data: ShardSet, work_dir: str, cfg: TrainConfig, step: int, epoch: int,
              bar) -> None:
    # The same measurement on training sequences shows how much of the held-out figure is lost to overfitting.
    result = {"step": step, "epoch": epoch, "k": cfg.eval_k,
              **offline_acceptance(draft, heldout, cfg.eval_k, cfg.eval_sequences),
              "training_sequences": offline_acceptance(draft, data, cfg.eval_k, cfg.eval_sequences)}
    with open(os.path.join(work_dir, EVAL_FILE), "a") as f:
        f.write(json.dumps(result) + "\n")
    rates = " ".join(f"{r:.2f}" for r in result["per_position"])
    bar.write(f"epoch {epoch}: held-out tau {result['tau']:.2f} at K = {cfg.eval_k} (per position {rates}); "
              f"on training sequences {result['training_sequences']['tau']:.2f}")


def last_evaluation(work_dir: str) -> dict | None:
    """The newest line of eval.jsonl, or None when the run measured nothing."""
    path = os.path.join(work_dir, EVAL_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    for line in reversed(lines):
        try:  # a run killed while appending leaves a torn last line
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


class TrainStateError(ValueError):
    """A saved training state that does not fit the draft being trained."""


def _save_state(work_dir, draft, optimizer, scheduler, step, stats, identity) -> None:
    # The previous state stays under the name until this one is whole and synced (atomic_path).
    with atomic_path(os.path.join(work_dir, STATE_FILE)) as tmp:
        torch.save({"step": step, "block": draft.block.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "stats": stats, "identity": identity}, tmp)


def _read_state(path: str, device="cpu") -> dict:
    try:
        return torch.load(path, weights_only=True, map_location=device)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise TrainStateError(f"the training state {path} is damaged ({e}); delete it to start the run again, "
                              "or train into another --work-dir") from None


def training_stats(work_dir: str) -> dict:
    """Per stage of the saved run: steps, wall seconds, tokens (unpadded positions), peak memory."""
    path = os.path.join(work_dir, STATE_FILE)
    return _read_state(path).get("stats", {}) if os.path.exists(path) else {}


def _load_state(work_dir, draft, optimizer, scheduler, device, identity) -> tuple[int, dict]:
    path = os.path.join(work_dir, STATE_FILE)
    if not os.path.exists(path):
        return 0, {}
    state = _read_state(path, device)
    saved = state.get("identity", identity)
    changed = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
    if changed:
        raise TrainStateError(
            f"the training state {path} belongs to another run: {', '.join(changed)} differ "
            f"({ {k: saved.get(k) for k in changed} } there, { {k: identity.get(k) for k in changed} } now). "
            "Resume with the options, data and target it was started with, or train into another --work-dir")
    try:
        draft.block.load_state_dict(state["block"])
    except RuntimeError as e:  # its first line only names the module
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:])
        raise TrainStateError(f"the training state {path} was saved for another draft ({detail}). Resume with "
                              "the options and data it was started with (--arch, --draft-vocab, the shards' state), "
                              "or train into another --work-dir") from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["step"], state.get("stats", {})
