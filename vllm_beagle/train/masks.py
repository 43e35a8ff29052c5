"""Attention masks of Two-Stage Block-Attention Training, in vLLM's row layout (see block.py).

Row p carries the query token t_{p+1} and the state h_p; the rows are tiled into windows of `window`
rows starting at `offset + w * window` (rows before the first start form a shorter window at 0).
In a window starting at row s, the row at window position m = p - s predicts the state at position
p + 1 from the true states up to h_s: an (m + 1)-step-ahead prediction.

Stage 1 (inverse block attention): every row of a window sees the true keys j <= s only, so one
forward pass trains 1..window-step-ahead predictions, exactly what draft steps see in true-states
mode.

Stage 2 (training-time simulation): the keys are [T true states | T predicted-state slots]. At step i
(1-based) the row at window position i - 1 makes the exact i-th autoregressive prediction; its output,
the predicted state at position p + 1, is written into slot p + 1, and at step i + 1 the rows of the
window also see the slots s < r <= min(p, s + i). That is what concat-mode draft steps see.

Each mask is a rule on (row, key) index tensors, so that one definition serves both attention paths:
broadcast over every pair it is the dense mask of SDPA; as FlexAttention's mask_mod it becomes a
block-sparse mask whose fully hidden tiles are skipped.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch


@dataclasses.dataclass(frozen=True)
class Visibility:
    """The keys 0..num_keys-1 that each query sees; query q is row rows[q]."""

    rows: torch.Tensor  # [Q] long
    num_keys: int
    rule: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (row, key) -> visible, elementwise

    def dense(self) -> torch.Tensor:
        """[Q, num_keys] bool."""
        keys = torch.arange(self.num_keys, device=self.rows.device)
        return self.rule(self.rows[:, None], keys[None, :])

    def block_mask(self):
        """The same mask as a FlexAttention BlockMask, shared by every sequence and head."""
        from torch.nn.attention.flex_attention import create_block_mask

        rows, rule = self.rows, self.rule
        return create_block_mask(lambda b, h, q, kv: rule(rows[q], kv), None, None, len(rows), self.num_keys,
                                 device=rows.device)


def _check(window: int, offset: int) -> None:
    if window < 1 or not 0 <= offset < window:
        raise ValueError(f"need window >= 1 and 0 <= offset < window, got window {window}, offset {offset}")


def _start(row: torch.Tensor, window: int, offset: int) -> torch.Tensor:
    """The first row of each row's window."""
    return ((row - offset).div(window, rounding_mode="floor") * window + offset).clamp_min(0)


def stage1(num_rows: int, window: int, offset: int, device=None) -> Visibility:
    """Every row: row p sees true key j iff j <= start(p)."""
    _check(window, offset)
    return Visibility(torch.arange(num_rows, device=device), num_rows,
                      lambda row, key: key <= _start(row, window, offset))


def stage2(num_rows: int, window: int, offset: int, step: int, rows: torch.Tensor | None = None,
           device=None) -> Visibility:
    """Simulation step `step` (1-based) for `rows` (default every row): true keys, then predicted slots."""
    _check(window, offset)

    def rule(row, key):
        start, slot = _start(row, window, offset), key - num_rows
        # A true key j < num_rows has slot < 0 and a slot key has key > start: one test each side.
        return (key <= start) | ((slot > start) & (slot <= torch.minimum(row, start + step - 1)))

    return Visibility(torch.arange(num_rows, device=device) if rows is None else rows, 2 * num_rows, rule)


def exact_rows(num_rows: int, window: int, offset: int, step: int, device=None) -> torch.Tensor:
    """[rows] long: the rows whose output at this step is the exact step-th autoregressive prediction."""
    _check(window, offset)
    rows = torch.arange(num_rows, device=device)
    return rows[rows - _start(rows, window, offset) == step - 1]


@functools.lru_cache(maxsize=256)
def block_mask(num_rows: int, window: int, offset: int, step: int, device: torch.device):
    """FlexAttention's mask of stage 1 (step 0) or of stage-2 step `step` for its exact rows.

    Cached: building one takes longer than the attention it serves, and a run asks for the same few
    (one per sequence length, offset and step) at every training step.
    """
    if step == 0:
        return stage1(num_rows, window, offset, device).block_mask()
    rows = exact_rows(num_rows, window, offset, step, device)
    return stage2(num_rows, window, offset, step, rows, device).block_mask()
