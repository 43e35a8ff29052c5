"""Two-Stage Block-Attention Training against independent definitions and against inference:
the masks equal a brute-force reading of the paper, stage 1 trains what true-states drafting does,
and stage 2's simulation reproduces concat-mode chain drafting exactly."""

import dataclasses

import pytest
import torch

from vllm_beagle.reference import ReferenceDraft, target_states
from vllm_beagle.train.masks import exact_rows, stage1_mask, stage2_mask
from vllm_beagle.train.objective import LossConfig, TrainBatch, stage1_loss, stage2_losses


def brute_start(p, window, offset):
    """Windows start at 0 and at offset + w * window; a row belongs to the last start at or before it."""
    starts = {0} | set(range(offset, p + 1, window))
    return max(s for s in starts if s <= p)


CASES = [(n, w, o) for n in (1, 7, 20) for w in (1, 3, 5) for o in range(w)]


@pytest.mark.parametrize("rows, window, offset", CASES)
def test_stage1_mask_is_inverse_block_attention(rows, window, offset):
    expected = torch.tensor([[j <= brute_start(p, window, offset) for j in range(rows)] for p in range(rows)])
    assert torch.equal(stage1_mask(rows, window, offset), expected)


@pytest.mark.parametrize("rows, window, offset", CASES)
def test_stage2_masks_and_exact_rows(rows, window, offset):
    for step in range(1, window + 1):
        expected = []
        for p in range(rows):
            s = brute_start(p, window, offset)
            true = [j <= s for j in range(rows)]
            # Slot r holds the state predicted for position r, written at step r - s.
            predicted = [s < r <= p and r - s <= step - 1 for r in range(rows)]
            expected.append(true + predicted)
        assert torch.equal(stage2_mask(rows, window, offset, step), torch.tensor(expected)), step
        exact = [p - brute_start(p, window, offset) == step - 1 for p in range(rows)]
        assert exact_rows(rows, window, offset, step).tolist() == exact


def test_window_arguments_are_checked():
    with pytest.raises(ValueError, match="0 <= offset < window"):
        stage1_mask(5, 3, 3)


def inference_case(toy, draft, k):
    """A sequence whose continuation is the draft's own greedy chain, so teacher forcing = inference."""
    target = toy["target"]
    context = torch.tensor([1, 450, 7483, 310, 3444, 338, 3681])
    n = len(context)
    states, _, logits = target_states(target, context, draft.cfg)
    with_bonus = torch.cat([context, logits[-1].argmax()[None]])
    drafts, predicted = draft.draft_chain(with_bonus, states, k)
    tokens = torch.cat([with_bonus, torch.tensor(drafts[:k - 1], dtype=torch.long)])
    all_states = target_states(target, tokens, draft.cfg).states
    batch = TrainBatch(tokens[None], all_states[None], torch.ones(1, len(tokens), dtype=torch.bool))
    return batch, n, predicted


@pytest.mark.parametrize("k", [1, 3, 5])
def test_stage2_simulation_is_concat_chain_drafting(toy, k):
    draft = toy["draft"]
    batch, n, chain = inference_case(toy, draft, k)
    offset = (n - 1) % k  # a window starts at the row of the last true state
    simulated = [predicted[0, n - 1 + i] for i, (_, predicted) in
                 enumerate(stage2_losses(draft, batch, k, offset, k, LossConfig(noise_std=0.0)))]
    torch.testing.assert_close(torch.stack(simulated), chain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [3, 5])
def test_stage1_is_true_states_chain_drafting(toy, k):
    cfg = dataclasses.replace(toy["draft"].cfg, kv_mode="true_states")
    draft = ReferenceDraft(cfg, toy["draft"].embed_weight, toy["draft"].lm_head_weight)
    draft.block.load_state_dict(toy["draft"].block.state_dict())
    batch, n, chain = inference_case(toy, draft, k)
    rows = torch.arange(batch.num_rows)
    mask = stage1_mask(batch.num_rows, k, (n - 1) % k)
    predicted = draft(batch.tokens[:, 1:], rows, batch.states[:, :-1], rows, visible=mask)
    torch.testing.assert_close(predicted[0, n - 1:n - 1 + k], chain, rtol=1e-5, atol=1e-5)


def test_losses_train_and_weight_the_steps(toy):
    """Both stages give finite losses with gradients on the block only; step i carries weight window - i + 1."""
    draft = toy["draft"]
    batch, _, _ = inference_case(toy, draft, 5)
    gen = torch.Generator().manual_seed(0)
    with torch.enable_grad():
        loss = stage1_loss(draft, batch, 3, 1, LossConfig(), gen)
        loss.backward()
        assert torch.isfinite(loss) and draft.block.q_proj.weight.grad is not None
        assert not draft.embed_weight.requires_grad and not draft.lm_head_weight.requires_grad
        draft.block.zero_grad()
        unweighted = []
        for step, (loss, _) in enumerate(stage2_losses(draft, batch, 3, 1, 3, LossConfig(noise_std=0.0)), 1):
            loss.backward()
            unweighted.append(float(loss.detach()) / (3 - step + 1))
        assert all(u > 0 for u in unweighted)
    draft.block.zero_grad()
