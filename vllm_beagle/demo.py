"""`beagle demo`: plain decoding and Beagle drafting side by side in vLLM, measured in one run.

Until a trained default ships, the demo builds a tiny random target and a partly-right Beagle draft
for it (vllm_beagle.toy): the text is nonsense, but the outputs must match token for token, and the
counters are vLLM's own.
"""

from __future__ import annotations

import os

from .offline import generate, make_llm, shutdown

# Plain completion prompts: the toy target has no chat skills, and its continuation depends mostly
# on the last token, so the prompts end differently.
PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "Speculative decoding makes large language models",
]


def ensure_toy_models(cache: str) -> tuple[str, str]:
    """The tiny target and its draft under `cache`, built on first use."""
    from transformers import LlamaForCausalLM

    from .schema import CONFIG_FILE
    from .toy import build_draft, build_target

    target_dir = os.path.join(cache, "toy-target")
    draft_dir = os.path.join(cache, "beagle-toy")
    if not os.path.isfile(os.path.join(target_dir, "model.safetensors")):
        build_target(target_dir)
    if not os.path.isfile(os.path.join(draft_dir, CONFIG_FILE)):
        build_draft(LlamaForCausalLM.from_pretrained(target_dir), draft_dir)
    return target_dir, draft_dir


def run_demo(cache: str, k: int, max_tokens: int) -> None:
    # One engine at a time in this process: about twice as fast to start on a small CPU machine.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoTokenizer

    target, draft = ensure_toy_models(cache)
    tok = AutoTokenizer.from_pretrained(target)
    prompts = [tok(p).input_ids for p in PROMPTS]
    results = {}
    for name, spec in (("plain", None),
                       ("beagle", {"method": "eagle", "model": draft, "num_speculative_tokens": k})):
        llm = make_llm(target, spec)
        generate(llm, prompts[:1], 4)  # warm-up, not measured
        results[name] = generate(llm, prompts, max_tokens, ignore_eos=True)
        shutdown(llm)
        del llm

    plain, beagle = results["plain"], results["beagle"]
    print("\n=== vllm-beagle demo: tiny random target, Beagle draft, greedy, K =", k, "===\n")
    for prompt, a, b in zip(PROMPTS, plain["outputs"], beagle["outputs"]):
        print(f"prompt: {prompt}")
        print(f"  plain : {tok.decode(a)[:120]!r}")
        print(f"  beagle: {tok.decode(b)[:120]!r}")
        print(f"  identical token ids: {a == b}\n")
    spec = beagle["spec"]
    rates = ", ".join(f"{r:.2f}" for r in spec["per_position_rate"])
    speed = {n: r["num_output_tokens"] / r["seconds"] for n, r in results.items()}
    print(f"drafts {spec['num_drafts']}, draft tokens {spec['num_draft_tokens']}, "
          f"accepted {spec['num_accepted_tokens']}")
    print(f"mean acceptance length (tau) {spec['tau']:.2f}; per-position acceptance {rates}")
    print(f"decode speed: plain {speed['plain']:.1f} tok/s, beagle {speed['beagle']:.1f} tok/s, "
          f"ratio {speed['beagle'] / speed['plain']:.2f}x (tiny target: drafting overhead dominates)")
    if plain["outputs"] != beagle["outputs"]:
        raise SystemExit("outputs differ: speculative decoding changed the target's greedy output")
