"""The EAGLE-1 baseline: its export is the format vLLM's EagleLlamaForCausalLM loads, and its chain
drafting (which computes only the newest row) equals a full causal pass over all rows."""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from vllm_beagle.eagle import EagleDraft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# vLLM's EAGLE-1 tensor names (llama_eagle.py; no `model.` prefix, no input_layernorm in layer 0).
VLLM_EAGLE_NAMES = {
    "fc.weight", "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight",
    "layers.0.self_attn.v_proj.weight", "layers.0.self_attn.o_proj.weight", "layers.0.mlp.gate_proj.weight",
    "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight", "layers.0.post_attention_layernorm.weight",
}


def random_eagle(toy, seed=0):
    torch.manual_seed(seed)
    draft = EagleDraft(toy["draft"].cfg, toy["draft"].embed_weight, toy["draft"].lm_head_weight)
    with torch.no_grad():
        for name, p in draft.block.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.1)
    return draft


def test_export_is_vllms_eagle_format_and_loads_back(toy, tmp_path):
    draft = random_eagle(toy)
    draft.cfg.training = {"arch": "eagle"}
    draft.save(str(tmp_path / "eagle-x"))
    tensors = load_file(str(tmp_path / "eagle-x" / "model.safetensors"))
    assert set(tensors) == VLLM_EAGLE_NAMES
    H = toy["draft"].cfg.hidden_size
    assert tensors["fc.weight"].shape == (H, 2 * H)
    with open(os.path.join(tmp_path, "eagle-x", "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 1
    assert "beagle" not in config and config["training"] == {"arch": "eagle"}
    loaded = EagleDraft.from_checkpoint(str(tmp_path / "eagle-x"), toy["target"])
    for name, t in draft.block.state_dict().items():
        assert torch.equal(t, loaded.block.state_dict()[name]), name


def test_chain_drafting_equals_full_causal_passes(toy):
    draft = random_eagle(toy, seed=1)
    tokens = torch.randint(3, 32000, (12,), generator=torch.Generator().manual_seed(2))
    states = torch.randn(11, toy["draft"].cfg.hidden_size)
    drafts, predicted = draft.draft_chain(tokens, states, 3)
    rows, row_states = tokens[1:], states
    for step in range(3):
        full = draft(rows, torch.arange(len(rows)), row_states)[-1]  # every row's output, keep the last
        # fp32 rounding scales with the states (about 10 here), and each step feeds the last one back.
        scale = float(full.abs().max())
        torch.testing.assert_close(full, predicted[step], rtol=1e-5, atol=1e-5 * scale)
        assert int(draft.logits(full).argmax()) == drafts[step]
        rows, row_states = torch.cat([rows, torch.tensor([drafts[step]])]), torch.cat([row_states, full[None]])


def test_offline_acceptance_script_reads_both_formats(toy, shards, tmp_path):
    """benchmarks/offline_acceptance.py loads a Beagle and an EAGLE checkpoint from disk and reports what the
    trainer's measurement gives for the same drafts in memory."""
    from vllm_beagle.train.evaluate import offline_acceptance

    eagle = random_eagle(toy, seed=3)
    eagle.save(str(tmp_path / "eagle-x"))
    out = tmp_path / "offline.json"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "offline_acceptance.py"),
                             "--target", toy["target_dir"], "--data", shards.folder, "--sequences", "8",
                             "--within", "16", "--json", str(out), "ngram", toy["draft_dir"],
                             str(tmp_path / "eagle-x")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    ngram, *reported = json.loads(out.read_text())["results"]
    assert len(reported) == 2
    for row, draft in zip(reported, (toy["draft"], eagle)):
        expected = offline_acceptance(draft, shards, 3, 8, within=16)
        assert {k: row[k] for k in ("rounds", "per_position", "tau")} == expected
        assert row["better_of_both"]["tau"] >= max(row["tau"], ngram["tau"])
        assert row["where_ngram_accepts"]["rounds"] + row["elsewhere"]["rounds"] == row["rounds"]


def test_offline_acceptance_within_keeps_the_first_rounds_of_each_response(toy, shards):
    from vllm_beagle.train.evaluate import offline_acceptance

    whole = offline_acceptance(toy["draft"], shards, 3, 8)
    first = offline_acceptance(toy["draft"], shards, 3, 8, within=1)
    assert first["rounds"] == 8 < whole["rounds"]  # one round per sequence: the one drafting its first response token
    assert offline_acceptance(toy["draft"], shards, 3, 8, within=10**6) == whole


def lookup(tokens, k, shortest=2, longest=4):
    """Prompt lookup by brute force: the longest n-gram ending the context that occurred before (its
    earliest occurrence), and up to k tokens after it."""
    for n in range(longest, shortest - 1, -1):
        for j in range(len(tokens) - n):
            if tokens[j:j + n] == tokens[-n:]:
                return tokens[j + n:j + n + k]
    return []


# vLLM's own n-gram matching (numba), run in a process of its own: llvmlite in a process breaks the vLLM
# engines it starts later.
VLLM_LOOKUP = """
import json, sys
import numpy as np
from vllm.v1.spec_decode.ngram_proposer import _find_longest_matched_ngram_and_propose_tokens as find
print(json.dumps([find(np.array(c, dtype=np.int32), 2, 4, 1 << 30, 3).tolist() for c in json.load(sys.stdin)]))
"""


def test_offline_ngram_drafts_what_vllms_prompt_lookup_drafts_and_splits_a_drafts_rounds_by_it():
    """The offline `ngram` drafts as vLLM's proposer does (lookup 2 to 4): on repetitive random contexts it
    proposes what a brute-force lookup finds and what vLLM's own function proposes; `versus` splits a draft's
    rounds by n-gram's acceptance."""
    from vllm_beagle.train.evaluate import ngram_proposer, versus

    propose = ngram_proposer(3)
    generator = torch.Generator().manual_seed(0)
    contexts = [torch.randint(0, 4, (int(torch.randint(1, 40, (1,), generator=generator)),), generator=generator)
                for _ in range(300)]
    ours = [propose(tokens, None) for tokens in contexts]
    assert ours == [lookup(tokens.tolist(), 3) for tokens in contexts]
    assert 50 < sum(map(bool, ours)) < 300  # contexts with and without a match were drawn
    vllm = subprocess.run([sys.executable, "-c", VLLM_LOOKUP], input=json.dumps([t.tolist() for t in contexts]),
                          capture_output=True, text=True, timeout=300)
    assert vllm.returncode == 0, vllm.stderr[-3000:]
    assert json.loads(vllm.stdout.strip().splitlines()[-1]) == ours
    split = versus([0, 3, 1, 0], [2, 0, 1, 0], 3)
    assert split["ngram_rounds"] == 2 and split["where_ngram_accepts"]["tau"] == 1.5  # rounds 1 and 3: 0 and 1
    assert split["elsewhere"]["tau"] == 2.5 and split["better_of_both"]["tau"] == 2.5  # max: 2, 3, 1, 0
