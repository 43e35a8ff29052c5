"""Two-Stage Block-Attention Training against independent definitions and against inference:
the masks equal a brute-force reading of the paper, stage 1 trains what true-states drafting does,
stage 2's simulation reproduces concat-mode chain drafting exactly, and the parallel objective is
parallel drafting."""

import dataclasses

import pytest
import torch

from vllm_beagle.reference import ReferenceDraft, target_states
from vllm_beagle.schema import BeagleConfig
from vllm_beagle.train.masks import exact_rows, mask_rows, parallel, stage1, stage2
from vllm_beagle.train.objective import (
    LossConfig,
    parallel_predictions,
    stage1_loss,
    stage1_predictions,
    stage2_losses,
)
from vllm_beagle.train.shards import TrainBatch


def brute_start(p, window, offset):
    """Windows start at 0 and at offset + w * window; a row belongs to the last start at or before it."""
    starts = {0} | set(range(offset, p + 1, window))
    return max(s for s in starts if s <= p)


CASES = [(n, w, o) for n in (1, 7, 20) for w in (1, 3, 5) for o in range(w)]


@pytest.mark.parametrize("rows, window, offset", CASES)
def test_stage1_mask_is_inverse_block_attention(rows, window, offset):
    expected = torch.tensor([[j <= brute_start(p, window, offset) for j in range(rows)] for p in range(rows)])
    assert torch.equal(stage1(rows, window, offset).dense(), expected)


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
        assert torch.equal(stage2(rows, window, offset, step).dense(), torch.tensor(expected)), step
        exact = [p for p in range(rows) if p - brute_start(p, window, offset) == step - 1]
        assert exact_rows(rows, window, offset, step).tolist() == exact


@pytest.mark.parametrize("rows, window, offset", CASES)
def test_parallel_mask_is_what_vllms_mask_rows_see(rows, window, offset):
    """A window's first row is an ordinary first draft step; each row after it carries the mask token and sees
    the true states up to the window's start and the placeholder slots after it up to its own."""
    expected = []
    for p in range(rows):
        s = brute_start(p, window, offset)
        expected.append([j <= s for j in range(rows)] + [s < r <= p for r in range(rows)])
    assert torch.equal(parallel(rows, window, offset).dense(), torch.tensor(expected))
    assert mask_rows(rows, window, offset).tolist() == [p != brute_start(p, window, offset) for p in range(rows)]


def visibilities(rows, window, offset):
    """Stage 1's, then each stage-2 step's for its exact rows (those that have any)."""
    steps = [stage2(rows, window, offset, step, exact_rows(rows, window, offset, step))
             for step in range(1, window + 1)]
    return [stage1(rows, window, offset)] + [v for v in steps if len(v.true_end)]


@pytest.mark.parametrize("rows, window, offset", CASES + [(300, 5, 3), (300, 1, 0)])
def test_flex_block_masks_equal_the_dense_masks(rows, window, offset):
    """FlexAttention reads the same bounds through its mask_mod, and skips only tiles that hide every key."""
    from torch.nn.attention.flex_attention import create_mask

    for visibility in visibilities(rows, window, offset):
        dense, block_mask = visibility.dense(), visibility.block_mask()
        queries, keys = dense.shape
        assert torch.equal(create_mask(block_mask.mask_mod, None, None, queries, keys, "cpu")[0, 0], dense)
        q_block, kv_block = block_mask.BLOCK_SIZE
        padded = torch.zeros(-(-queries // q_block) * q_block, -(-keys // kv_block) * kv_block, dtype=torch.bool)
        padded[:queries, :keys] = dense
        seen = padded.unflatten(0, (-1, q_block)).unflatten(2, (-1, kv_block)).any(3).any(1)
        assert torch.equal(block_mask.to_dense()[0, 0].bool() | ~seen, torch.ones_like(seen))


FLEX_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_one_compiled_flex_kernel_serves_every_mask_of_a_shape():
    """A mask_mod that captured Python numbers would recompile FlexAttention for every window, offset and
    step, and past torch's recompile limit fall back to the unfused path that materialises every score."""
    from vllm_beagle.block import masked_attention

    q, k, v = (torch.randn(2, 40, heads, 16, device=FLEX_DEVICE) for heads in (4, 2, 2))
    masks = [stage1(40, window, offset, FLEX_DEVICE).block_mask() for window, offset in [(5, 0), (5, 3), (3, 1)]]
    first, *others = masks
    with torch.no_grad():
        masked_attention(q, k, v, first)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for mask in others:
                masked_attention(q, k, v, mask)


def test_flex_attention_trains_like_dense_attention():
    """The trainer's FlexAttention path gives SDPA's losses and, on CUDA (it has no backward on CPU), gradients."""
    torch.manual_seed(0)
    cfg = BeagleConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=32, vocab_size=512, rms_norm_eps=1e-5,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, max_position_embeddings=1024)
    embed = torch.randn(cfg.vocab_size, cfg.hidden_size)
    draft = ReferenceDraft(cfg, embed, embed).to(FLEX_DEVICE)
    batch = TrainBatch(torch.randint(cfg.vocab_size, (2, 150)), torch.randn(2, 150, cfg.hidden_size),
                       torch.rand(2, 150) < 0.8).to(FLEX_DEVICE)
    train = FLEX_DEVICE == "cuda"

    def losses_and_gradients(flex):
        out = []
        with torch.set_grad_enabled(train):
            losses = [stage1_loss(draft, batch, 5, 2, LossConfig(), torch.Generator().manual_seed(0), flex)]
            losses += (loss for loss, _ in stage2_losses(draft, batch, 5, 2, 5, LossConfig(),
                                                         torch.Generator().manual_seed(0), flex))
            for loss in losses:
                draft.block.zero_grad()
                if train:
                    loss.backward()
                out.append([loss.detach()] + [p.grad.clone() for p in draft.block.parameters() if train])
        return out

    for dense, flex in zip(losses_and_gradients(False), losses_and_gradients(True), strict=True):
        for a, b in zip(dense, flex, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_window_arguments_are_checked():
    with pytest.raises(ValueError, match="0 <= offset < window"):
        stage1(5, 3, 3)


def inference_case(toy, draft, k):
    """A sequence whose continuation is the draft's own greedy chain, so teacher forcing = inference."""
    target = toy["target"]
    context = torch.tensor([1, 450, 7483, 310, 3444, 338, 3681])
    n = len(context)
    states, _, logits = target_states(target, context, draft.cfg)
    with_bonus = torch.cat([context, logits[-1].argmax()[None]])
    drafts, predicted = draft.draft_chain(with_bonus, states, k)
    tokens = torch.cat([with_bonus, torch.tensor(drafts[:k - 1], dtype=torch.long)])
    out = target_states(target, tokens, draft.cfg)
    final = None if draft.cfg.state == "final_norm" else out.final[None]
    batch = TrainBatch(tokens[None], out.states[None], torch.ones(1, len(tokens), dtype=torch.bool), final)
    return batch, n, predicted


@pytest.mark.parametrize("name", ["draft", "draft_fused", "draft_qstate"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_stage2_simulation_is_concat_chain_drafting(toy, k, name):
    draft = toy[name]
    batch, n, chain = inference_case(toy, draft, k)
    offset = (n - 1) % k  # a window starts at the row of the last true state
    simulated = [predicted[0, n - 1 + i] for i, (_, predicted) in
                 enumerate(stage2_losses(draft, batch, k, offset, k, LossConfig(noise_std=0.0)))]
    torch.testing.assert_close(torch.stack(simulated), chain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["draft", "draft_fused"])
@pytest.mark.parametrize("k", [3, 5])
def test_stage1_is_true_states_chain_drafting(toy, k, name):
    cfg = dataclasses.replace(toy[name].cfg, kv_mode="true_states")
    draft = ReferenceDraft(cfg, toy[name].embed_weight, toy[name].lm_head_weight)
    draft.block.load_state_dict(toy[name].block.state_dict())
    batch, n, chain = inference_case(toy, draft, k)
    rows = torch.arange(batch.num_rows)
    mask = stage1(batch.num_rows, k, (n - 1) % k).dense()
    predicted = draft(batch.tokens[:, 1:], rows, draft.combine(batch.states[:, :-1]), rows, visible=mask)
    torch.testing.assert_close(predicted[0, n - 1:n - 1 + k], chain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [3, 5])
def test_stage1_with_token_state_queries_is_teacher_forced(toy, k):
    """A token+state query in stage 1: a window's first row is the first draft step; each row after it sees the
    true states up to the window's start as keys but reads its own true state, where a draft step would read
    the ĥ of the step before (stage 2 feeds those)."""
    draft = toy["draft_qstate"]
    batch, n, chain = inference_case(toy, draft, k)
    predicted = stage1_predictions(draft, batch, k, (n - 1) % k, LossConfig(noise_std=0.0))[0, n - 1:n - 1 + k]
    torch.testing.assert_close(predicted[0], chain[0], rtol=1e-5, atol=1e-5)
    states = draft.combine(batch.states[0])
    for m in range(k):
        p = n - 1 + m
        row = draft(batch.tokens[0, p + 1:p + 2], torch.tensor([p]), states[:n], torch.arange(n),
                    row_states=states[p:p + 1])[0]
        torch.testing.assert_close(predicted[m], row, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["draft_parallel", "draft_parallel_fused", "draft_qstate_parallel"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_parallel_objective_is_parallel_drafting(toy, k, name):
    """The window that starts at the last true state's row predicts what one parallel drafting forward does."""
    draft = toy[name]
    batch, n, _ = inference_case(toy, draft, k)
    predicted = parallel_predictions(draft, batch, k, (n - 1) % k, LossConfig(noise_std=0.0))
    drafts, parallel_states = draft.draft_parallel(batch.tokens[0, :n + 1], batch.states[0, :n], k)
    torch.testing.assert_close(predicted[0, n - 1:n - 1 + k], parallel_states, rtol=1e-5, atol=1e-5)
    assert drafts == draft.logits(predicted[0, n - 1:n - 1 + k]).argmax(-1).tolist()


def defined_loss(draft, batch, predicted, rows, regression_weight):
    """The loss of the predictions of `rows` as objective.py defines it, written out row by row: the mean over
    the supervised rows of the soft cross-entropy against the target's next-token distribution plus
    regression_weight x the smooth-L1 distance (mean over the width) to the true state."""
    final = batch.final if batch.final is not None else batch.states
    terms = []
    for p in rows:
        if not batch.loss_mask[0, p + 1]:
            continue
        target_probs = torch.softmax(final[0, p + 1] @ draft.lm_head_weight.T, dim=-1)
        cross_entropy = -(target_probs * torch.log_softmax(draft.draft_logits(predicted[0, p]), dim=-1)).sum()
        true_state = draft.combine(batch.states[0, p + 1])
        regression = torch.nn.functional.smooth_l1_loss(predicted[0, p], true_state)
        terms.append(cross_entropy + regression_weight * regression)
    return torch.stack(terms).mean()


@pytest.mark.parametrize("name", ["draft", "draft_fused", "draft_qstate"])
def test_losses_train_and_weight_the_steps(toy, name):
    """Both stages give finite losses with gradients on the block only, every stage-2 step backpropagated
    on its own (the fused draft's fc included); step i's loss is window - i + 1 times its exact rows' loss."""
    draft = toy[name]
    batch, _, _ = inference_case(toy, draft, 5)
    gen = torch.Generator().manual_seed(0)
    window, offset = 3, 1
    with torch.enable_grad():
        loss = stage1_loss(draft, batch, window, offset, LossConfig(), gen)
        loss.backward()
        assert torch.isfinite(loss) and draft.block.q_proj.weight.grad is not None
        assert not draft.embed_weight.requires_grad and not draft.lm_head_weight.requires_grad
        draft.block.zero_grad()
        cfg = LossConfig(noise_std=0.0)
        steps = stage2_losses(draft, batch, window, offset, window, cfg)
        for step, (loss, predicted) in enumerate(steps, 1):
            loss.backward()
            exact = [p for p in range(batch.num_rows) if p - brute_start(p, window, offset) == step - 1]
            with torch.no_grad():
                expected = (window - step + 1) * defined_loss(draft, batch, predicted, exact, cfg.regression_weight)
            torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    draft.block.zero_grad()
