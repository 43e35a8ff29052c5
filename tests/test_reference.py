"""The reference draft against DESIGN.md section 1, written out independently here in the paper's
indexing (query at the token's own position i, keys h_j for j < i), with plain loops."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from vllm_beagle.reference import target_states


def rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope(x, pos, theta):
    """Rotate the pairs (x[k], x[k + d/2]) by pos * theta^(-2k/d)."""
    d = x.shape[-1]
    k = torch.arange(d // 2, dtype=torch.float32)
    angle = pos * theta ** (-2 * k / d)
    a, b = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()], -1)


def beagle_state(draft, token, i, keys, row_state):
    """ĥ_i for token t_i at position i, attending to keys = [(h_j, j)] with j < i; row_state: the state of the
    row that carries t_i (h_{i-1}, or the ĥ_{i-1} a draft step feeds back), which a token+state query reads."""
    blk, cfg = draft.block, draft.cfg
    W = {n: p for n, p in blk.state_dict().items()}
    eps, theta, nh, nkv, hd = cfg.rms_norm_eps, cfg.rope_parameters["rope_theta"], cfg.num_attention_heads, \
        cfg.num_key_value_heads, cfg.head_dim
    e = draft.embed_weight[token]
    if cfg.query == "token+state":
        e = e + W["row_proj.weight"] @ rms(row_state, W["row_norm.weight"], eps)
    q = (W["q_proj.weight"] @ rms(e, W["query_norm.weight"], eps)).view(nh, hd)
    q = torch.stack([rope(q[a], i, theta) for a in range(nh)])
    heads = []
    for a in range(nh):
        g = a // (nh // nkv)
        scores, values = [], []
        for h, j in keys:
            assert j < i
            x = rms(h, W["state_norm.weight"], eps)
            kj = rope((W["k_proj.weight"] @ x).view(nkv, hd)[g], j, theta)
            values.append((W["v_proj.weight"] @ x).view(nkv, hd)[g])
            scores.append(q[a] @ kj / math.sqrt(hd))
        p = torch.softmax(torch.stack(scores), 0)
        heads.append(sum(pj * vj for pj, vj in zip(p, values)))
    y = e + W["o_proj.weight"] @ torch.cat(heads)
    m = rms(y, W["mlp_norm.weight"], eps)
    return y + W["mlp.down_proj.weight"] @ (F.silu(W["mlp.gate_proj.weight"] @ m) * (W["mlp.up_proj.weight"] @ m))


@pytest.mark.parametrize("name", ["draft", "draft_qstate"])
def test_reference_forward_is_design_section_1(toy, name):
    draft, target = toy[name], toy["target"]
    tokens = torch.tensor([1, 450, 7483, 310, 3444, 338, 3681, 29889, 13])
    states = draft.combine(target_states(target, tokens, draft.cfg).states)
    n = len(tokens) - 1
    rows = torch.arange(n)
    got = draft(tokens[1:], rows, states[:n], rows, row_states=states[:n])
    for i in range(1, n + 1):
        expected = beagle_state(draft, tokens[i], i, [(states[j], j) for j in range(i)], states[i - 1])
        torch.testing.assert_close(got[i - 1], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["draft", "draft_qstate"])
def test_chain_drafting_feeds_back_predicted_states(toy, name):
    """Concat mode: step s queries with the last draft token (and, token+state, the state predicted for its row)
    and also sees the states predicted before it."""
    draft, target = toy[name], toy["target"]
    tokens = torch.tensor([1, 15043, 29892, 590, 1024, 338])
    n = len(tokens) - 1
    states = target_states(target, tokens[:n], draft.cfg).states
    keys = [(draft.combine(states[j]), j) for j in range(n)]
    token, expected = tokens[n], []
    for step in range(4):
        i = n + step
        predicted = beagle_state(draft, token, i, keys, keys[-1][0])
        token = int(draft.logits(predicted).argmax())
        expected.append(token)
        keys.append((predicted, i))
    assert draft.draft_chain(tokens, states, 4)[0] == expected


def test_layer_state_is_the_pre_norm_residual(toy):
    """eagle3's state for aux id L is the residual the target's final norm turns into the eagle state."""
    draft3, target = toy["draft3"], toy["target"]
    ids = torch.tensor([1, 450, 7483, 310, 3444, 338])
    pre, final, logits = target_states(target, ids, draft3.cfg)
    post, _, logits2 = target_states(target, ids, toy["draft"].cfg)
    torch.testing.assert_close(final, post)
    torch.testing.assert_close(target.model.norm(pre), post)
    torch.testing.assert_close(logits, logits2)
    torch.testing.assert_close(logits, target(ids[None]).logits[0])


def test_fused_state_is_the_chosen_layers_residuals_side_by_side(toy):
    """The fused kind's target state is vLLM's aux states concatenated in layer order, each the same
    residual a one-layer draft reads; the draft's combine projects it with its fc."""
    fused, target = toy["draft_fused"], toy["target"]
    ids = torch.tensor([1, 450, 7483, 310, 3444, 338])
    states = target_states(target, ids, fused.cfg).states
    layers = fused.cfg.state_layers
    assert states.shape == (len(ids), len(layers) * fused.cfg.hidden_size)
    for part, layer in zip(states.split(fused.cfg.hidden_size, dim=-1), layers, strict=True):
        one = dataclasses.replace(toy["draft3"].cfg, state_layer=layer)
        torch.testing.assert_close(part, target_states(target, ids, one).states)
    torch.testing.assert_close(fused.combine(states), states @ fused.block.fc.weight.T)
