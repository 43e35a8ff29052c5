"""The losses of Two-Stage Block-Attention Training, on the reference draft.

A batch holds T positions per sequence: tokens t_0..t_{T-1}, the states the draft reads (h_j) and, when
those are not the target's final post-norm states, the final states too (to recompute the target's
next-token distribution with the shared LM head instead of storing it). Row p = 0..T-2 (block.py)
predicts the state at position p + 1 and the distribution of t_{p+2}; it is supervised where
loss_mask[p + 1] is set (the token t_{p+2} belongs to a response).

Each supervised prediction costs soft cross-entropy against the target's distribution (renormalised over
the draft's vocabulary when that is reduced) plus
`regression_weight` times a smooth-L1 regression onto the target's state. Gaussian noise of
`noise_std` is added to the true states the draft attends to (never to the targets).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ..reference import Draft, ReferenceDraft
from .masks import block_mask, exact_rows, mask_rows, parallel, stage1, stage2
from .shards import TrainBatch


def option(default, help: str, choices: tuple | None = None):
    """A config field that `beagle train` offers as --name, with this help and these choices (the CLI reads
    all three from here)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass
class LossConfig:
    regression_weight: float = option(10.0, "weight of the smooth-L1 state regression next to the soft "
                                            "cross-entropy (0: the token-only objective)")
    noise_std: float = option(0.2, "std of the Gaussian noise on the true states the draft reads")


def _noisy_states(batch: TrainBatch, cfg: LossConfig, generator: torch.Generator | None) -> torch.Tensor:
    """The target's states of rows 0..R-1 with noise, before the draft's `combine`."""
    states = batch.states[:, :batch.num_rows].float()
    if cfg.noise_std:
        # Drawn on the CPU from a seeded generator: the same noise on any device.
        states = states + (torch.randn(states.shape, generator=generator) * cfg.noise_std).to(states.device)
    return states.to(batch.states.dtype)


def _loss(draft: Draft, predicted: torch.Tensor, batch: TrainBatch, cfg: LossConfig, selected: torch.Tensor,
          rows: torch.Tensor | None = None) -> torch.Tensor:
    """Mean loss of the selected predictions (state and distribution at position p + 1 of row p).

    predicted: [B, R', H] for the rows `rows` (default: all R rows); selected: [B, R'] bool. Only the
    selected rows go through the LM head, which dominates the cost. 0 with a graph when none is selected.
    """
    # The regression target is the true state as the draft reads it; for fused states that is the draft's own
    # projection of them, held fixed (a target that moved with the prediction could meet it anywhere).
    with torch.no_grad():
        target_states = draft.combine(batch.states[:, 1:])
    final = (batch.final if batch.final is not None else batch.states)[:, 1:]
    if rows is not None:
        target_states, final = target_states[:, rows], final[:, rows]
    chosen = predicted[selected]
    with torch.no_grad():
        # Over a reduced draft vocabulary: the target's distribution renormalised over the kept tokens.
        target_probs = torch.softmax((final[selected].to(chosen.dtype) @ draft.target_rows.T).float(), dim=-1)
    log_probs = torch.log_softmax(draft.draft_logits(chosen).float(), dim=-1)
    cross_entropy = -(target_probs * log_probs).sum(-1)
    regression = F.smooth_l1_loss(chosen.float(), target_states[selected].float(), reduction="none").mean(-1)
    return (cross_entropy + cfg.regression_weight * regression).sum() / max(1, len(chosen))


def teacher_forced_loss(draft: Draft, batch: TrainBatch, cfg: LossConfig,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """EAGLE-1's objective: every row reads its true (noisy) state and attends causally to the rows before."""
    rows = torch.arange(batch.num_rows, device=batch.tokens.device)
    predicted = draft(batch.tokens[:, 1:], rows, draft.combine(_noisy_states(batch, cfg, generator)))
    return _loss(draft, predicted, batch, cfg, batch.loss_mask[:, 1:])


def stage1_loss(draft: ReferenceDraft, batch: TrainBatch, window: int, offset: int, cfg: LossConfig,
                generator: torch.Generator | None = None, flex: bool = False) -> torch.Tensor:
    """Inverse block attention: one forward pass, every supervised row contributes.

    flex: attend through FlexAttention's block-sparse mask rather than SDPA's dense one (same result).
    """
    predicted = stage1_predictions(draft, batch, window, offset, cfg, generator, flex)
    return _loss(draft, predicted, batch, cfg, batch.loss_mask[:, 1:])


def stage1_predictions(draft: ReferenceDraft, batch: TrainBatch, window: int, offset: int, cfg: LossConfig,
                       generator: torch.Generator | None = None, flex: bool = False) -> torch.Tensor:
    """[B, R, H]: every row attends to the true states up to its window's first row (masks.stage1). A token+state
    query reads its row's true state in every row, teacher-forced as EAGLE-1 trains: inside a window a draft step
    would read the ĥ of the step before, which stage 2 feeds."""
    num_rows, device = batch.num_rows, batch.tokens.device
    rows = torch.arange(num_rows, device=device)
    visible = (block_mask(num_rows, window, offset, 0, device) if flex
               else stage1(num_rows, window, offset, device).dense())
    states = draft.combine(_noisy_states(batch, cfg, generator))
    return draft(batch.tokens[:, 1:], rows, states, rows, visible=visible, row_states=states)


def parallel_loss(draft: ReferenceDraft, batch: TrainBatch, window: int, offset: int, cfg: LossConfig,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Parallel drafting's objective: one forward pass, every supervised row contributes. It is the whole of a
    parallel draft's training, which feeds nothing back to simulate."""
    predicted = parallel_predictions(draft, batch, window, offset, cfg, generator)
    return _loss(draft, predicted, batch, cfg, batch.loss_mask[:, 1:])


def parallel_predictions(draft: ReferenceDraft, batch: TrainBatch, window: int, offset: int, cfg: LossConfig,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, R, H]: stage 1's windows, the rows after each window's first carrying the mask token and attending to
    the placeholder states of the rows before them in the window (masks.parallel)."""
    num_rows, device = batch.num_rows, batch.tokens.device
    rows = torch.arange(num_rows, device=device)
    masked = mask_rows(num_rows, window, offset, device)
    tokens = torch.where(masked, draft.cfg.mask_token_id, batch.tokens[:, 1:])
    true_keys = draft.combine(_noisy_states(batch, cfg, generator))
    placeholders = draft.combine(draft.block.mask_hidden).to(true_keys.dtype).expand_as(true_keys)
    keys = torch.cat([true_keys, placeholders], dim=1)
    visible = parallel(num_rows, window, offset, device).dense()
    return draft(tokens, rows, keys, torch.cat([rows, rows]), visible=visible,
                 row_states=torch.where(masked[:, None], placeholders, true_keys))


def stage2_losses(draft: ReferenceDraft, batch: TrainBatch, window: int, offset: int, steps: int, cfg: LossConfig,
                  generator: torch.Generator | None = None,
                  flex: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Training-time simulation: yields (loss, predicted) for steps 1..steps.

    The loss of step i supervises only the exact i-th autoregressive predictions, weighted
    window - i + 1; only those rows are computed (`predicted` [B, R, H] holds them, NaN elsewhere).
    The states written into the predicted slots are detached, so each step's loss depends on its own
    forward pass only: a caller that runs backward on it before asking for the next step keeps one
    step's activations, whatever the number of steps (constant memory). flex: as in stage1_loss.
    """
    if not 1 <= steps <= window:
        raise ValueError(f"simulation steps must be between 1 and the window ({window}), got {steps}")
    num_rows, device = batch.num_rows, batch.tokens.device
    rows = torch.arange(num_rows, device=device)
    noisy = _noisy_states(batch, cfg, generator)
    slots = None  # the predicted states written so far, detached
    key_positions = torch.cat([rows, rows])
    for step in range(1, steps + 1):
        # The draft's combine (the fused kind's fc) runs again in every step, so that each step's graph is
        # its own and is freed by its backward.
        true_keys = draft.combine(noisy)
        slots = torch.zeros_like(true_keys).detach() if slots is None else slots
        keys = torch.cat([true_keys, slots], dim=1)
        exact = exact_rows(num_rows, window, offset, step, device)
        # A step without exact rows (a batch shorter than the step) has no query for FlexAttention to tile.
        visible = (block_mask(num_rows, window, offset, step, device) if flex and len(exact)
                   else stage2(num_rows, window, offset, step, exact, device).dense())
        # An exact row's own state: the true one at step 1 (the window's first row), after that the ĥ that the
        # step before wrote into its slot.
        row_states = (true_keys if step == 1 else slots)[:, exact]
        out = draft(batch.tokens[:, 1:][:, exact], exact, keys, key_positions, visible=visible,
                    row_states=row_states)
        loss = (window - step + 1) * _loss(draft, out, batch, cfg, batch.loss_mask[:, 1:][:, exact], exact)
        predicted = out.new_full((out.shape[0], num_rows, out.shape[-1]), float("nan"))
        predicted[:, exact] = out.detach()
        yield loss, predicted
        # Row p's output is the state at position p + 1: its slot, which the next step may read.
        writers = exact[exact + 1 < num_rows]
        slots = slots.clone()
        slots[:, writers + 1] = predicted[:, writers].to(slots.dtype)
