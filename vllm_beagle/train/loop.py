"""The training loop: stage 1 for the first epochs, stage 2 after, resumable, exported as a checkpoint.

Every random choice (epoch order, window offsets, noise) is drawn from generators seeded by the seed
and the step, so a run resumed from its last saved state takes exactly the steps an uninterrupted run
would have taken. The training state is saved atomically every `save_every` steps and at the end.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from tqdm import tqdm

from ..reference import ReferenceDraft
from .objective import LossConfig, stage1_loss, stage2_losses
from .shards import ShardSet

STATE_FILE = "train_state.pt"


@dataclasses.dataclass
class TrainConfig:
    window: int = 5
    sim_steps: int = 4
    stage1_epochs: int = 10
    stage2_epochs: int = 10
    batch_size: int = 8
    max_len: int = 2048
    lr: float = 3e-5
    warmup_steps: int = 2000
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = 0.5
    seed: int = 0
    save_every: int = 200
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)


def _generator(seed: int, *parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash((seed,) + parts) % 2**63)


def _steps_per_epoch(data: ShardSet, cfg: TrainConfig) -> int:
    return -(-len(data) // cfg.batch_size)


def _batch_indices(data: ShardSet, cfg: TrainConfig, epoch: int, index: int) -> list[int]:
    order = torch.randperm(len(data), generator=_generator(cfg.seed, 1, epoch)).tolist()
    return order[index * cfg.batch_size:(index + 1) * cfg.batch_size]


def train(draft: ReferenceDraft, data: ShardSet, work_dir: str, cfg: TrainConfig,
          stop_after: int | None = None, progress: bool = True) -> ReferenceDraft:
    """Train `draft` in place, resuming from `work_dir` when it holds a saved state.

    `stop_after` ends the run after that many steps of this call (the state is saved first), as an
    interruption would; calling train again resumes.
    """
    os.makedirs(work_dir, exist_ok=True)
    params = list(draft.block.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    per_epoch = _steps_per_epoch(data, cfg)
    total = per_epoch * (cfg.stage1_epochs + cfg.stage2_epochs)
    step = _load_state(work_dir, draft, optimizer, scheduler)
    done_now = 0
    with tqdm(total=total, initial=step, desc="train", unit="step", disable=not progress) as bar:
        while step < total:
            epoch, index = divmod(step, per_epoch)
            batch = data.batch(_batch_indices(data, cfg, epoch, index), cfg.max_len)
            offset = int(torch.randint(cfg.window, (1,), generator=_generator(cfg.seed, 2, step)))
            noise = _generator(cfg.seed, 3, step)
            optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():
                if epoch < cfg.stage1_epochs:
                    loss = stage1_loss(draft, batch, cfg.window, offset, cfg.loss, noise)
                    loss.backward()
                    shown = float(loss.detach())
                else:
                    shown = 0.0
                    for loss, _ in stage2_losses(draft, batch, cfg.window, offset, cfg.sim_steps, cfg.loss, noise):
                        loss.backward()
                        shown += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            done_now += 1
            bar.update(1)
            bar.set_postfix(stage=1 if epoch < cfg.stage1_epochs else 2, loss=f"{shown:.3f}")
            if step % cfg.save_every == 0 or step == total or done_now == stop_after:
                _save_state(work_dir, draft, optimizer, scheduler, step)
            if done_now == stop_after:
                break
    return draft


def _save_state(work_dir, draft, optimizer, scheduler, step) -> None:
    path = os.path.join(work_dir, STATE_FILE)
    torch.save({"step": step, "block": draft.block.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, path + ".tmp")
    os.replace(path + ".tmp", path)


def _load_state(work_dir, draft, optimizer, scheduler) -> int:
    path = os.path.join(work_dir, STATE_FILE)
    if not os.path.exists(path):
        return 0
    state = torch.load(path, weights_only=True)
    draft.block.load_state_dict(state["block"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["step"]
