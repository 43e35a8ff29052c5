"""`beagle serve` on 127.0.0.1: the OpenAI endpoints answer (streaming and not, and through the `openai`
client) with the target's greedy output, bad requests get vLLM's own 4xx, a mixed load changes no greedy
answer, /metrics carries consistent spec-decode counters, and the server stops cleanly."""

import json
import os
import signal
import time

import pytest
import requests
from conftest import MAX_TOKENS, PARITY_PROMPT

from vllm_beagle.load import (
    check_counters,
    check_load,
    greedy_mismatches,
    greedy_texts,
    make_requests,
    run_load,
    settle,
    spec_metrics,
)
from vllm_beagle.local_server import LocalServer, server_command
from vllm_beagle.prompts import load_prompts

pytestmark = pytest.mark.vllm
MODEL = "tiny"
MAX_MODEL_LEN = 512
COMPLETION = {"model": MODEL, "prompt": "Hello", "max_tokens": 8, "temperature": 0}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about dogs."}], "max_tokens": 24,
        "temperature": 0}
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
# The load benchmark's mix (benchmarks/load.py), cut down: every kind of request, a few of each.
LOAD = make_requests([m[0]["content"] for m in load_prompts("mtbench")], 64, MODEL, seed=0)
LOAD_CONCURRENCY = 16


def start_server(toy, log_path, draft=None):
    """The toy target on a free loopback port, served by `beagle serve` with `draft` or by vLLM's own
    server without one."""
    return LocalServer([*server_command(toy["target_dir"], draft), "--dtype", "float32", "--max-model-len",
                        str(MAX_MODEL_LEN), "--enforce-eager", "--served-model-name", MODEL], log_path, timeout_s=300)


@pytest.fixture(scope="module")
def plain(toy, tmp_path_factory):
    """How vLLM without a draft answers the bad requests, the chat request, the `openai` client's requests and
    two passes of the load (the second in reverse order, for the spread that batching alone causes). Its
    server is stopped before the drafting one starts: two engines never share the two cores."""
    with start_server(toy, str(tmp_path_factory.mktemp("plain-server") / "server.log")) as server:
        yield {"bad": {name: answer(server.url, request) for name, request in BAD_REQUESTS.items()},
               "chat": post(server.url, "/v1/chat/completions", CHAT)["choices"][0]["message"]["content"],
               "openai": openai_answers(server.url),
               "load": [run_load(server.url, LOAD, LOAD_CONCURRENCY, reverse=reverse) for reverse in (False, True)]}


@pytest.fixture(scope="module")
def server(toy, plain, tmp_path_factory):
    server = start_server(toy, str(tmp_path_factory.mktemp("server") / "server.log"), toy["draft_dir"])
    yield server
    server.kill()


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


def openai_answers(url):
    """What the `openai` package (the client most users have) gets back for requests of every kind: chat
    and completions, streamed and not, a stop string and max_tokens that ends mid-draft (greedy, so the
    texts must be equal), and n = 2 (vLLM samples for n > 1, so only the shape of that answer)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about the river."}], "max_tokens": 24,
            "temperature": 0}
    completion = {"model": MODEL, "prompt": "The garden in winter", "max_tokens": 24, "temperature": 0}
    out = {"chat": client.chat.completions.create(**chat).choices[0].message.content,
           "chat streamed": "".join(c.choices[0].delta.content or "" for c in
                                    client.chat.completions.create(**chat, stream=True) if c.choices),
           "completion": client.completions.create(**completion).choices[0].text,
           "completion streamed": "".join(c.choices[0].text for c in
                                          client.completions.create(**completion, stream=True) if c.choices)}
    two = client.completions.create(**{**completion, "max_tokens": 8, "temperature": 1.0}, n=2,
                                    extra_body={"ignore_eos": True})
    out["n 2"] = ([c.finish_reason for c in two.choices], two.usage.completion_tokens)
    words = out["completion"].split()
    out["stop word"] = words[len(words) // 2]
    stopped = client.completions.create(**completion, stop=[out["stop word"]]).choices[0]
    out["stopped"] = (stopped.text, stopped.finish_reason)
    short = client.completions.create(**{**completion, "max_tokens": 5})
    out["max_tokens 5"] = (short.choices[0].text, short.choices[0].finish_reason, short.usage.completion_tokens)
    return out


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


def test_bad_requests_get_the_same_4xx_as_without_a_draft_and_the_server_keeps_serving(server, plain):
    for name, request in BAD_REQUESTS.items():
        expected = plain["bad"][name]
        assert 400 <= expected[0] < 500, f"{name}: vLLM without a draft answered {expected}; the request is not bad"
        assert answer(server.url, request) == expected, name
    assert post(server.url, "/v1/completions", COMPLETION)["choices"][0]["text"]


def test_completions_are_the_targets_greedy_output(server, engines):
    url = server.url
    body = {"model": MODEL, "prompt": PARITY_PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    text = post(url, "/v1/completions", body)["choices"][0]["text"]
    assert text == engines["plain"]["calls"][1]["texts"][0]
    assert stream(url, "/v1/completions", body, lambda c: c["text"]) == text


def test_chat_completions_are_the_targets_greedy_output(server, plain):
    url = server.url
    text = post(url, "/v1/chat/completions", CHAT)["choices"][0]["message"]["content"]
    assert text and text == plain["chat"]
    assert stream(url, "/v1/chat/completions", CHAT, lambda c: c["delta"].get("content")) == text


def test_the_openai_client_gets_the_answers_of_a_server_without_a_draft(server, plain):
    expected, got = plain["openai"], openai_answers(server.url)
    assert got == expected
    assert got["chat"] and got["chat streamed"] == got["chat"] and got["completion streamed"] == got["completion"]
    assert got["n 2"] == (["length", "length"], 16)
    text, reason = got["stopped"]
    assert reason == "stop" and got["completion"].startswith(text) and got["stop word"] not in text
    assert got["max_tokens 5"][1:] == ("length", 5)


def test_metrics_show_drafts_accepted(server):
    post(server.url, "/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 16, "temperature": 0})
    counters, _ = spec_metrics(server.get("/metrics"))
    assert counters.num_drafts > 0
    assert counters.num_accepted_tokens > 0


def test_under_load_answers_as_without_a_draft(server, plain):
    """Mixed load (streams and not, n > 1, sampled, streams the client drops) at concurrency 16: no failure,
    greedy answers as without a draft (within the spread batching alone causes there), consistent
    counters, and no request left running once the clients are gone."""
    for answers in plain["load"]:
        assert check_load(LOAD, answers) == [], "vLLM without a draft fails this load"
    answers = run_load(server.url, LOAD, LOAD_CONCURRENCY)
    assert check_load(LOAD, answers) == []
    references = [greedy_texts(LOAD, a) for a in plain["load"]]
    spread = greedy_mismatches(references[:1], references[1])
    drafted = greedy_texts(LOAD, answers)
    assert len(drafted) > len(LOAD) // 2
    assert len(greedy_mismatches(references, drafted)) <= len(spread)
    counters, gauges = settle(server)
    assert gauges and not any(gauges.values()), gauges
    assert counters.num_drafts > 0 and check_counters(counters, 3) == []
    assert server.healthy()


def test_server_stops_cleanly_on_sigint(server):
    proc = server.proc
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0, server.log_tail()
    # The engine and worker processes exit (and are reaped) shortly after the server; none may linger.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    pytest.fail("processes of the server's group are still alive 30 s after it exited")
