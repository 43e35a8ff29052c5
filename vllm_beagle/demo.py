"""`beagle demo`: SmolLM2-135M-Instruct answers chat prompts with plain decoding and with the shipped
Beagle draft in vLLM, measured in one run, outputs side by side."""

from __future__ import annotations

from .compare import chat_token_ids, run_engines, summarize
from .drafts import speculative_config
from .smollm2 import smollm2_dir

PROMPTS = [
    "What is the capital of France? Answer in two sentences.",
    "Write a short poem about the sea.",
    "Give me three tips for writing clean Python code.",
]


def run_demo(cache: str | None, k: int, max_tokens: int, eager: bool = False) -> None:
    target = smollm2_dir(cache)
    messages = [[{"role": "user", "content": p}] for p in PROMPTS]
    results = run_engines(target, {"plain": None, "beagle": speculative_config("beagle", k)},
                          chat_token_ids(target, messages), max_tokens, eager=eager)
    summary = summarize(results)
    plain, beagle = results["plain"], results["beagle"]
    mode = "eager" if eager else "compiled"
    print(f"\n=== vllm-beagle demo: SmolLM2-135M-Instruct on CPU, shipped Beagle draft, greedy, K = {k}, "
          f"vLLM {mode} ===\n")
    for prompt, a, b, same in zip(PROMPTS, plain["texts"], beagle["texts"],
                                  (x == y for x, y in zip(plain["outputs"], beagle["outputs"]))):
        print(f"user: {prompt}")
        print(f"  plain : {a.strip()[:300]!r}")
        print(f"  beagle: {b.strip()[:300]!r}")
        print(f"  identical token ids: {same}\n")
    s = summary["beagle"]
    rates = " / ".join(f"{r:.2f}" for r in s["per_position"])
    print(f"mean acceptance length (tau) {s['tau']:.2f}; per-position acceptance {rates}")
    print(f"decode speed, one request at a time: plain {summary['plain']['tokens_per_s']:.1f} tok/s, "
          f"beagle {s['tokens_per_s']:.1f} tok/s, speed-up {s['speedup']:.2f}x")
    if plain["outputs"] != beagle["outputs"]:
        raise SystemExit("outputs differ: speculative decoding changed the target's greedy output")
