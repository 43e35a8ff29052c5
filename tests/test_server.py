"""`beagle serve` on 127.0.0.1: the OpenAI endpoints answer (streaming and not) with the target's
greedy output, /metrics carries vLLM's spec-decode counters, and the server stops cleanly."""

import json
import os
import signal
import socket
import subprocess
import time

import pytest
import requests

from conftest import BEAGLE, MAX_TOKENS, PARITY_PROMPT

pytestmark = pytest.mark.vllm
MODEL = "tiny"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(toy, tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w+")
    proc = subprocess.Popen(
        [BEAGLE, "serve", toy["target_dir"], "--draft", toy["draft_dir"], "-k", "3", "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
         "--served-model-name", MODEL],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited early:\n{_tail(log)}"
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        time.sleep(1)
    else:
        proc.kill()
        pytest.fail(f"server not healthy after 300 s:\n{_tail(log)}")
    yield url, proc, log
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)


def _tail(log):
    log.flush()
    log.seek(0)
    return log.read()[-5000:]


def post(url, path, body):
    response = requests.post(f"{url}{path}", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def stream(url, path, body, pick):
    """Concatenate the text of a server-sent-event stream."""
    text = ""
    with requests.post(f"{url}{path}", json={**body, "stream": True}, stream=True, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return text
            chunk = json.loads(line[len("data: "):])
            if chunk["choices"]:
                text += pick(chunk["choices"][0]) or ""
    pytest.fail("stream ended without [DONE]")


def test_completions_are_the_targets_greedy_output(server, engines):
    url, _, _ = server
    body = {"model": MODEL, "prompt": PARITY_PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    text = post(url, "/v1/completions", body)["choices"][0]["text"]
    assert text == engines["plain"]["calls"][1]["texts"][0]
    assert stream(url, "/v1/completions", body, lambda c: c["text"]) == text


def test_chat_completions_stream_and_not(server):
    url, _, _ = server
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about dogs."}], "max_tokens": 24,
            "temperature": 0}
    text = post(url, "/v1/chat/completions", body)["choices"][0]["message"]["content"]
    assert text
    assert stream(url, "/v1/chat/completions", body, lambda c: c["delta"].get("content")) == text


def test_metrics_show_drafts_accepted(server):
    url, _, _ = server
    post(url, "/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 16, "temperature": 0})
    metrics = requests.get(f"{url}/metrics", timeout=30).text
    values = {}
    for line in metrics.splitlines():
        for name in ("vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_accepted_tokens_total"):
            if line.startswith(name + "{"):
                values[name] = values.get(name, 0) + float(line.rsplit(" ", 1)[1])
    assert values["vllm:spec_decode_num_drafts_total"] > 0
    assert values["vllm:spec_decode_num_accepted_tokens_total"] > 0


def test_server_stops_cleanly_on_sigint(server):
    _, proc, log = server
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0, _tail(log)
    # The engine and worker processes exit (and are reaped) shortly after the server; none may linger.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    pytest.fail("processes of the server's group are still alive 30 s after it exited")
