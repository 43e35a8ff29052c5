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
"""

from __future__ import annotations

import torch


def window_starts(num_rows: int, window: int, offset: int, device=None) -> torch.Tensor:
    """The first row of each row's window, [num_rows]."""
    if window < 1 or not 0 <= offset < window:
        raise ValueError(f"need window >= 1 and 0 <= offset < window, got window {window}, offset {offset}")
    rows = torch.arange(num_rows, device=device)
    return ((rows - offset).div(window, rounding_mode="floor") * window + offset).clamp_min(0)


def stage1_mask(num_rows: int, window: int, offset: int, device=None) -> torch.Tensor:
    """[rows, rows] bool: row p sees true key j iff j <= start(p)."""
    start = window_starts(num_rows, window, offset, device)
    return torch.arange(num_rows, device=device)[None, :] <= start[:, None]


def stage2_mask(num_rows: int, window: int, offset: int, step: int, device=None) -> torch.Tensor:
    """[rows, 2 * rows] bool for simulation step `step` (1-based): true keys, then predicted slots."""
    start = window_starts(num_rows, window, offset, device)
    rows = torch.arange(num_rows, device=device)
    slots = rows[None, :]
    predicted = (slots > start[:, None]) & (slots <= torch.minimum(rows, start + step - 1)[:, None])
    return torch.cat([stage1_mask(num_rows, window, offset, device), predicted], dim=1)


def exact_rows(num_rows: int, window: int, offset: int, step: int, device=None) -> torch.Tensor:
    """[rows] bool: the rows whose output at this step is the exact step-th autoregressive prediction."""
    start = window_starts(num_rows, window, offset, device)
    return torch.arange(num_rows, device=device) - start == step - 1
