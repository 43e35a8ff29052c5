"""`beagle serve` on 127.0.0.1: the OpenAI endpoints answer (streaming and not) with the target's
greedy output, /metrics carries vLLM's spec-decode counters, and the server stops cleanly."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

from conftest import BEAGLE, MAX_TOKENS, PARITY_PROMPT
from vllm_beagle.cli import SERVER_MODULE

pytestmark = pytest.mark.vllm
MODEL = "tiny"
MAX_MODEL_LEN = 512
COMPLETION = {"model": MODEL, "prompt": "Hello", "max_tokens": 8, "temperature": 0}
# name -> (path, JSON body or raw bytes)
BAD_REQUESTS = {
    "empty prompt": ("/v1/completions", {**COMPLETION, "prompt": ""}),
    "prompt longer than the context": ("/v1/completions", {**COMPLETION, "prompt": [5] * (MAX_MODEL_LEN + 10)}),
    "max_tokens 0": ("/v1/completions", {**COMPLETION, "max_tokens": 0}),
    "max_tokens negative": ("/v1/completions", {**COMPLETION, "max_tokens": -3}),
    "n 0": ("/v1/completions", {**COMPLETION, "n": 0}),
    "n not a number": ("/v1/completions", {**COMPLETION, "n": "two"}),
    "unknown model": ("/v1/completions", {**COMPLETION, "model": "no-such-model"}),
    "malformed JSON": ("/v1/completions", b'{"model": "tiny", "prompt": '),
    "chat without messages": ("/v1/chat/completions", {"model": MODEL, "max_tokens": 8}),
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(toy, log, draft=None):
    """The toy target served on a free loopback port, by `beagle serve` with `draft`, or by vLLM's own
    server without one: (url, process) once healthy."""
    port = free_port()
    command = ([BEAGLE, "serve", toy["target_dir"], "--draft", draft, "-k", "3"] if draft
               else [sys.executable, "-m", SERVER_MODULE, "--model", toy["target_dir"]])
    proc = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port),
         "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager", "--served-model-name", MODEL],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited early:\n{_tail(log)}"
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return url, proc
        except requests.ConnectionError:
            pass
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"server not healthy after 300 s:\n{_tail(log)}")


@pytest.fixture(scope="module")
def plain_bad_answers(toy, tmp_path_factory):
    """How vLLM without a draft answers the bad requests; its server is stopped before the drafting one
    starts (two engines never share the two cores)."""
    log = open(tmp_path_factory.mktemp("plain-server") / "server.log", "w+")
    url, proc = start_server(toy, log)
    try:
        yield {name: answer(url, request) for name, request in BAD_REQUESTS.items()}
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(toy, plain_bad_answers, tmp_path_factory):
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w+")
    url, proc = start_server(toy, log, toy["draft_dir"])
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


def answer(url, request):
    """(status code, error type) of a request; the error type is None for an answer that is not an error."""
    path, body = request
    if isinstance(body, bytes):
        response = requests.post(f"{url}{path}", data=body, headers={"Content-Type": "application/json"}, timeout=60)
    else:
        response = requests.post(f"{url}{path}", json=body, timeout=60)
    try:
        error = response.json().get("error")
    except ValueError:
        error = None
    return response.status_code, error.get("type") if isinstance(error, dict) else None


def test_bad_requests_get_the_same_4xx_as_without_a_draft_and_the_server_keeps_serving(server, plain_bad_answers):
    url, _, _ = server
    for name, request in BAD_REQUESTS.items():
        plain = plain_bad_answers[name]
        assert 400 <= plain[0] < 500, f"{name}: vLLM without a draft answered {plain}; the request is not bad"
        assert answer(url, request) == plain, name
    assert post(url, "/v1/completions", COMPLETION)["choices"][0]["text"]


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
