"""Checkpoint schema: saving and loading are exact, and every kind of bad checkpoint is refused with
an error that names the checkpoint, the field and both values."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_beagle.checkpoint import check_tensors, load_checkpoint
from vllm_beagle.reference import ReferenceDraft
from vllm_beagle.schema import BeagleConfig, CheckpointError, rope_parameters_of


@pytest.fixture
def ckpt(toy, tmp_path):
    """A fresh copy of the toy eagle draft, to spoil."""
    return shutil.copytree(toy["draft_dir"], str(tmp_path / "beagle-ckpt"))


@pytest.fixture
def target_cfg(toy):
    return toy["target"].config.to_dict()


def edit_config(path, **changes):
    file = os.path.join(path, "config.json")
    with open(file) as f:
        cfg = json.load(f)
    for key, value in changes.items():
        if value is None:
            del cfg[key]
        else:
            cfg[key] = value
    with open(file, "w") as f:
        json.dump(cfg, f)


def edit_tensors(path, fn):
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file)


def refused(path, target_cfg, *fragments):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, target_cfg, "tiny-target")
    message = str(e.value)
    assert path in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_save_and_load_round_trip_exactly(toy, target_cfg):
    cfg, tensors = load_checkpoint(toy["draft_dir"], target_cfg)
    assert cfg.method == "eagle" and cfg.state == "final_norm"
    expected = toy["draft"].block.state_dict()
    assert sorted(tensors) == sorted(expected)
    for name, t in expected.items():
        assert torch.equal(tensors[name], t), name
    reloaded = ReferenceDraft.from_checkpoint(toy["draft_dir"], toy["target"])
    assert torch.equal(reloaded.embed_weight, toy["target"].get_input_embeddings().weight)
    assert torch.equal(reloaded.lm_head_weight, toy["target"].get_output_embeddings().weight)


def test_eagle3_checkpoint_names_the_layer_vllm_feeds(toy, target_cfg):
    cfg, tensors = load_checkpoint(toy["draft3_dir"], target_cfg)
    layers = toy["target"].config.num_hidden_layers
    assert cfg.method == "eagle3" and cfg.state_layer == layers
    with open(os.path.join(toy["draft3_dir"], "config.json")) as f:
        written = json.load(f)
    assert written["architectures"] == ["Eagle3BeagleLlamaForCausalLM"]
    assert written["eagle_aux_hidden_state_layer_ids"] == [layers]
    assert torch.equal(tensors["final_norm.weight"], toy["target"].model.norm.weight)


@pytest.mark.parametrize("field, value", [
    ("hidden_size", 256),
    ("num_attention_heads", 8),
    ("num_key_value_heads", 4),
    ("head_dim", 64),
    ("vocab_size", 32001),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 500000.0}),
])
def test_refuses_a_draft_that_does_not_match_the_target(ckpt, target_cfg, field, value):
    edit_config(ckpt, **{field: value})
    theirs = rope_parameters_of(target_cfg) if field == "rope_parameters" else target_cfg[field]
    refused(ckpt, target_cfg, f"field '{field}' is {value!r} in the draft but {theirs!r} in the target tiny-target")


@pytest.mark.parametrize("heads", [0, -3])
def test_a_head_count_that_is_not_positive_is_named_where_the_head_width_is_derived(ckpt, target_cfg, heads):
    """Without head_dim the head width is hidden_size / num_attention_heads: 0 heads must not divide by zero."""
    edit_config(ckpt, num_attention_heads=heads, head_dim=None)
    refused(ckpt, target_cfg, f"field 'num_attention_heads' must be a positive integer, got {heads}")
    with pytest.raises(ValueError, match=f"field 'num_attention_heads' must be a positive integer, got {heads}"):
        BeagleConfig.from_target({**target_cfg, "num_attention_heads": heads, "head_dim": None})


def test_refuses_a_state_layer_the_target_does_not_have(toy, tmp_path, target_cfg):
    path = shutil.copytree(toy["draft3_dir"], str(tmp_path / "beagle3"))
    with open(os.path.join(path, "config.json")) as f:
        beagle = json.load(f)["beagle"]
    edit_config(path, beagle={**beagle, "state_layer": 7})
    refused(path, target_cfg, "'beagle.state_layer' is 7", "has 2 layers")


@pytest.mark.parametrize("spoil, fragments", [
    (lambda t: t.pop("k_proj.weight"), ["lacks", "k_proj.weight"]),
    (lambda t: t.__setitem__("fc.weight", torch.zeros(4, 4)), ["unexpected", "fc.weight"]),
    (lambda t: t.__setitem__("v_proj.weight", torch.zeros(64, 64)),
     ["tensor 'v_proj.weight' of shape (64, 64) where (64, 128) is expected"]),
    (lambda t: t.__setitem__("o_proj.weight", t["o_proj.weight"].to(torch.int32)),
     ["tensor 'o_proj.weight' of dtype I32; weights must be one of F32, F16, BF16"]),
    # A dtype torch cannot check for NaN/Inf: refused from the header, before the value check would raise.
    (lambda t: t.__setitem__("o_proj.weight", t["o_proj.weight"].to(torch.float8_e4m3fn)),
     ["tensor 'o_proj.weight' of dtype F8_E4M3; weights must be one of F32, F16, BF16"]),
    (lambda t: t["mlp.up_proj.weight"].__setitem__((3, 5), float("nan")), ["'mlp.up_proj.weight' holds 1 NaN/Inf"]),
    (lambda t: t["query_norm.weight"].__setitem__(0, float("inf")), ["'query_norm.weight' holds 1 NaN/Inf"]),
    (lambda t: t.__setitem__("lm_head.weight", torch.zeros(10, 128)), ["'lm_head.weight' of shape (10, 128)"]),
])
def test_refuses_bad_tensors(ckpt, target_cfg, spoil, fragments):
    edit_tensors(ckpt, spoil)
    refused(ckpt, target_cfg, *fragments)


def test_accepts_its_own_embedding_and_lm_head(ckpt, target_cfg, toy):
    def add(t):
        t["embed_tokens.weight"] = toy["target"].get_input_embeddings().weight.clone()
        t["lm_head.weight"] = toy["target"].get_output_embeddings().weight.clone() * 2
    edit_tensors(ckpt, add)
    _, tensors = load_checkpoint(ckpt, target_cfg)
    draft = ReferenceDraft.from_checkpoint(ckpt, toy["target"])
    assert torch.equal(draft.lm_head_weight, tensors["lm_head.weight"])


def test_refuses_a_truncated_weights_file(ckpt, target_cfg):
    file = os.path.join(ckpt, "model.safetensors")
    with open(file, "rb") as f:
        data = f.read()
    with open(file, "wb") as f:
        f.write(data[: len(data) // 2])
    refused(ckpt, target_cfg, "model.safetensors is truncated or not a safetensors file")


def test_refuses_a_file_that_is_not_safetensors(ckpt, target_cfg):
    torch.save({"q_proj.weight": torch.zeros(2)}, os.path.join(ckpt, "model.safetensors"))
    refused(ckpt, target_cfg, "model.safetensors is truncated or not a safetensors file")


def test_refuses_missing_files_and_bad_config(ckpt, target_cfg, tmp_path):
    os.remove(os.path.join(ckpt, "model.safetensors"))
    refused(ckpt, target_cfg, "no model.safetensors")
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        f.write("{not json")
    refused(ckpt, target_cfg, "config.json is not valid JSON")
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        f.write('{"beagle": ' + "[" * 100_000 + "]" * 100_000 + "}")  # past what Python's decoder recurses into
    refused(ckpt, target_cfg, "config.json is nested too deeply to be a config")
    os.remove(os.path.join(ckpt, "config.json"))
    refused(ckpt, target_cfg, "no config.json")
    missing = str(tmp_path / "nowhere")
    refused(missing, target_cfg, "is not a directory")


@pytest.mark.parametrize("changes, fragments", [
    ({"beagle": None}, ["no 'beagle' section"]),
    ({"beagle": {"version": 99}}, ["'beagle.version' is 99"]),
    ({"architectures": ["LlamaForCausalLM"]},
     ["'architectures' is ['LlamaForCausalLM']", "EagleBeagleLlamaForCausalLM"]),
    ({"intermediate_size": None}, ["lacks the field 'intermediate_size'"]),
    ({"beagle": {"version": 1, "state": "middle"}}, ["beagle.state must be one of"]),
])
def test_refuses_a_config_that_is_not_a_beagle_config(ckpt, target_cfg, changes, fragments):
    edit_config(ckpt, **changes)
    refused(ckpt, target_cfg, *fragments)


def test_reduced_vocabulary_map_round_trips_exactly(toy, target_cfg):
    cfg, tensors = load_checkpoint(toy["draft_vocab_dir"], target_cfg)
    saved = toy["draft_vocab"]
    assert cfg.draft_vocab_size == 1000
    assert torch.equal(tensors["draft_to_target"], saved.block.draft_to_target)
    assert torch.equal(tensors["lm_head.weight"], saved.lm_head_weight[saved.block.draft_to_target])
    loaded = ReferenceDraft.from_checkpoint(toy["draft_vocab_dir"], toy["target"])
    assert torch.equal(loaded.block.draft_to_target, saved.block.draft_to_target)
    # Logits over the target's vocabulary: the target's rows where drafted, -inf where never drafted.
    predicted = torch.randn(2, cfg.hidden_size)
    logits = loaded.logits(predicted)
    kept = loaded.block.draft_to_target
    torch.testing.assert_close(logits[:, kept], predicted @ toy["target"].lm_head.weight[kept].T)
    outside = torch.ones(cfg.vocab_size, dtype=torch.bool)
    outside[kept] = False
    assert torch.isneginf(logits[:, outside]).all()


@pytest.mark.parametrize("spoil, fragment", [
    (lambda t: t.__setitem__("draft_to_target", t["draft_to_target"].float()), "token ids must be I64"),
    (lambda t: t["draft_to_target"].__setitem__(0, 32000), "outside the target's vocabulary 0..31999"),
    (lambda t: t["draft_to_target"].__setitem__(1, int(t["draft_to_target"][0])), "to the same target id"),
    (lambda t: t.pop("draft_to_target"), "lacks the tensor(s) ['draft_to_target']"),
    (lambda t: t.__setitem__("lm_head.weight", t["lm_head.weight"][:999]), "'lm_head.weight' of shape (999, 128)"),
])
def test_bad_token_maps_are_refused(toy, target_cfg, tmp_path, spoil, fragment):
    path = shutil.copytree(toy["draft_vocab_dir"], str(tmp_path / "beagle-vocab"))
    edit_tensors(path, spoil)
    refused(path, target_cfg, fragment)


def test_draft_vocab_size_out_of_range_is_refused(toy, target_cfg, tmp_path):
    path = shutil.copytree(toy["draft_vocab_dir"], str(tmp_path / "beagle-vocab"))
    with open(os.path.join(path, "config.json")) as f:
        beagle = json.load(f)["beagle"]
    edit_config(path, beagle={**beagle, "draft_vocab_size": 40000})
    refused(path, target_cfg, "draft_vocab_size must be between 1 and vocab_size 32000, got 40000")


@pytest.mark.parametrize("changes, fragment", [
    ({"drafting": "tree"}, "beagle.drafting must be one of"),
    ({"drafting": "parallel"}, "beagle.mask_token_id is required with drafting 'parallel'"),
    ({"mask_token_id": 5}, "beagle.mask_token_id is required with drafting 'parallel' and forbidden otherwise"),
    ({"drafting": "parallel", "mask_token_id": 10 ** 6}, "beagle.mask_token_id must be a token id below"),
    ({"drafting": "parallel", "mask_token_id": 5, "kv_mode": "true_states"}, "drafting 'parallel' needs kv_mode"),
    ({"query": "state"}, "beagle.query must be one of ('token', 'token+state'), got 'state'"),
    # A token-only draft's tensors with a token+state query: its row projection is missing.
    ({"query": "token+state"}, "row_norm.weight"),
])
def test_refuses_inconsistent_drafting_fields(ckpt, target_cfg, changes, fragment):
    with open(os.path.join(ckpt, "config.json")) as f:
        beagle = json.load(f)["beagle"]
    edit_config(ckpt, beagle={**beagle, **changes})
    refused(ckpt, target_cfg, fragment)


def test_a_token_state_query_round_trips_and_needs_its_row_projection(toy, target_cfg):
    cfg, tensors = load_checkpoint(toy["draft_qstate_dir"], target_cfg)
    assert cfg.query == "token+state" and cfg == toy["draft_qstate"].cfg
    torch.testing.assert_close(tensors["row_proj.weight"], toy["draft_qstate"].block.row_proj.weight)
    broken = dict(tensors)
    del broken["row_proj.weight"]
    with pytest.raises(CheckpointError, match="row_proj.weight"):
        check_tensors(cfg, broken, "draft")


def test_a_parallel_draft_carries_its_placeholder_state_and_mask_token(toy, target_cfg):
    """What vLLM's parallel drafter reads: the top-level mask_token_id and the draft's mask_hidden, in the target's
    state width (vLLM puts it through combine_hidden_states); a fused one is the speculators type peagle, which
    vLLM serves by its folder alone as eagle3 with parallel drafting."""
    from vllm.transformers_utils.configs.speculators.base import SpeculatorsConfig

    cfg, tensors = load_checkpoint(toy["draft_parallel_fused_dir"], target_cfg)
    assert tensors["mask_hidden"].shape == (cfg.state_width,) == (3 * cfg.hidden_size,)
    with open(os.path.join(toy["draft_parallel_fused_dir"], "config.json")) as f:
        config = json.load(f)
    assert config["mask_token_id"] == cfg.mask_token_id == cfg.vocab_size - 1
    assert SpeculatorsConfig.extract_vllm_speculative_config(config) == {
        "method": "eagle3", "parallel_drafting": True, "num_speculative_tokens": 3}
    broken = dict(tensors)
    del broken["mask_hidden"]
    with pytest.raises(CheckpointError, match="mask_hidden"):
        check_tensors(cfg, broken, "draft")
