"""vLLM's own server given nothing but a draft folder (`vllm serve DRAFT`; on CPU its API server module):
it serves the target the draft's speculators_config names, with speculative decoding on, and greedy
answers are the target's; a target that is not there stops it with vLLM's error naming the path."""

import json
import os
import shutil
import sys

import pytest
import requests
from conftest import MAX_TOKENS, PARITY_PROMPT

from vllm_beagle.load import spec_metrics
from vllm_beagle.local_server import SERVER_MODULE, LocalServer

pytestmark = pytest.mark.vllm
MODEL = "tiny"


def vllm_serve(draft_dir, log_path):
    return LocalServer([sys.executable, "-m", SERVER_MODULE, "--model", draft_dir, "--dtype", "float32",
                        "--max-model-len", "512", "--enforce-eager", "--served-model-name", MODEL], log_path,
                       timeout_s=300)


def test_vllm_serves_the_target_a_draft_names_with_the_draft(toy, engines, tmp_path):
    with vllm_serve(toy["draft_dir"], str(tmp_path / "server.log")) as server:
        body = {"model": MODEL, "prompt": PARITY_PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True}
        response = requests.post(f"{server.url}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == engines["plain"]["calls"][1]["texts"][0]
        before, _ = spec_metrics(server.get("/metrics"))
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about the river."}],
                "max_tokens": 24, "temperature": 0}
        response = requests.post(f"{server.url}/v1/chat/completions", json=chat, timeout=120)
        assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"]
        after, _ = spec_metrics(server.get("/metrics"))
        assert before.num_drafts > 0 and after.num_drafts > before.num_drafts


def test_a_target_that_is_not_there_is_named(toy, tmp_path):
    draft = str(tmp_path / "beagle-lost-target")
    shutil.copytree(toy["draft_dir"], draft)
    with open(os.path.join(draft, "config.json")) as f:
        config = json.load(f)
    config["speculators_config"]["verifier"]["name_or_path"] = "/nowhere/target-model"
    with open(os.path.join(draft, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(RuntimeError, match="exited") as failed:
        vllm_serve(draft, str(tmp_path / "server.log"))
    assert "Invalid repository ID or local directory specified: '/nowhere/target-model'" in str(failed.value)
