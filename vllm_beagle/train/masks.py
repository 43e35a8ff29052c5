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

Parallel drafting (one forward per round): the row at window position m >= 1 carries the mask token
and its key/value slot holds the draft's placeholder state; it sees the true keys j <= s and the
placeholder slots s < r <= p of its own window, as vLLM's mask rows see the true rows and the mask rows
up to their own. Window position 0 is the ordinary first draft step.

Every row of both stages sees a prefix of the true keys and, in stage 2, a run of predicted slots:
keys j <= true_end and slots_start < j <= slots_end (key indices, the slots numbered after the true keys).
The masks are these three bounds per query, so one definition serves both attention paths: compared with
every key it is the dense mask of SDPA; read by FlexAttention's mask_mod it becomes a block-sparse mask
whose fully hidden tiles are skipped. The mask_mod captures only tensors, so that one compiled kernel
serves every mask of a run (captured Python numbers would compile a kernel per mask).
"""

from __future__ import annotations

import dataclasses
import functools

import torch


def _visible(key, true_end, slots_start, slots_end):
    return (key <= true_end) | ((key > slots_start) & (key <= slots_end))


@dataclasses.dataclass(frozen=True)
class Visibility:
    """The keys 0..num_keys-1 that each query sees, as per-query bounds ([Q] long each)."""

    num_keys: int
    true_end: torch.Tensor
    slots_start: torch.Tensor
    slots_end: torch.Tensor

    def dense(self) -> torch.Tensor:
        """[Q, num_keys] bool."""
        keys = torch.arange(self.num_keys, device=self.true_end.device)
        return _visible(keys[None, :], self.true_end[:, None], self.slots_start[:, None], self.slots_end[:, None])

    def block_mask(self):
        """The same mask as a FlexAttention BlockMask, shared by every sequence and head."""
        from torch.nn.attention.flex_attention import create_block_mask

        true_end, slots_start, slots_end = self.true_end, self.slots_start, self.slots_end

        def mask_mod(b, h, q, kv):
            return _visible(kv, true_end[q], slots_start[q], slots_end[q])

        return create_block_mask(mask_mod, None, None, len(true_end), self.num_keys, device=true_end.device)


def _check(window: int, offset: int) -> None:
    if window < 1 or not 0 <= offset < window:
        raise ValueError(f"need window >= 1 and 0 <= offset < window, got window {window}, offset {offset}")


def _start(row: torch.Tensor, window: int, offset: int) -> torch.Tensor:
    """The first row of each row's window."""
    return ((row - offset).div(window, rounding_mode="floor") * window + offset).clamp_min(0)


def stage1(num_rows: int, window: int, offset: int, device=None) -> Visibility:
    """Every row: row p sees true key j iff j <= start(p)."""
    _check(window, offset)
    start = _start(torch.arange(num_rows, device=device), window, offset)
    none = torch.full_like(start, -1)
    return Visibility(num_rows, start, none, none)


def stage2(num_rows: int, window: int, offset: int, step: int, rows: torch.Tensor | None = None,
           device=None) -> Visibility:
    """Simulation step `step` (1-based) for `rows` (default every row): true keys, then predicted slots."""
    _check(window, offset)
    rows = torch.arange(num_rows, device=device) if rows is None else rows
    start = _start(rows, window, offset)
    return Visibility(2 * num_rows, start, num_rows + start, num_rows + torch.minimum(rows, start + step - 1))


def parallel(num_rows: int, window: int, offset: int, device=None) -> Visibility:
    """Parallel drafting, keys [T true states | T placeholder slots]: row p sees true key j iff j <= start(p)
    and slot r iff start(p) < r <= p."""
    _check(window, offset)
    rows = torch.arange(num_rows, device=device)
    start = _start(rows, window, offset)
    return Visibility(2 * num_rows, start, num_rows + start, num_rows + rows)


def mask_rows(num_rows: int, window: int, offset: int, device=None) -> torch.Tensor:
    """[num_rows] bool: the rows that carry the mask token in parallel drafting (window position >= 1)."""
    _check(window, offset)
    rows = torch.arange(num_rows, device=device)
    return rows != _start(rows, window, offset)


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
