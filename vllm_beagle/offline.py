"""Offline vLLM runs: a target with or without a draft, greedy outputs and spec-decode counters.

Shared by `beagle demo`, the tests and the benchmarks, so that every figure comes from one code path.
Scripts that use it need an `if __name__ == "__main__":` guard: vLLM spawns its engine process.
"""

from __future__ import annotations

import dataclasses
import operator
import time
from typing import Any

SPEC_COUNTERS = {
    "vllm:spec_decode_num_drafts": "num_drafts",
    "vllm:spec_decode_num_draft_tokens": "num_draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "num_accepted_tokens",
}
PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos"


@dataclasses.dataclass
class SpecCounters:
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = dataclasses.field(default_factory=list)

    @property
    def tau(self) -> float:
        """Mean acceptance length, counting the token the target adds to every round."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else float("nan")

    @property
    def per_position_rate(self) -> list[float]:
        return [a / self.num_drafts for a in self.accepted_per_pos] if self.num_drafts else []

    def add(self, name: str, value: float, position: int | None = None) -> None:
        """Count one sample of a vLLM metric: a spec-decode total, or the per-position counter's sample for
        `position`; samples of any other metric change nothing. Samples add up because vLLM reports one per
        engine (and label set)."""
        if name in SPEC_COUNTERS:
            field = SPEC_COUNTERS[name]
            setattr(self, field, getattr(self, field) + int(value))
        elif name == PER_POSITION:
            self.accepted_per_pos = _per_position(self.accepted_per_pos, [0] * position + [int(value)], operator.add)

    def __sub__(self, before: SpecCounters) -> SpecCounters:
        return SpecCounters(
            self.num_drafts - before.num_drafts,
            self.num_draft_tokens - before.num_draft_tokens,
            self.num_accepted_tokens - before.num_accepted_tokens,
            _per_position(self.accepted_per_pos, before.accepted_per_pos, operator.sub),
        )

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "tau": self.tau, "per_position_rate": self.per_position_rate}


def spec_counters(llm) -> SpecCounters:
    """vLLM's cumulative spec-decode counters (zero when the engine drafts nothing)."""
    counters = SpecCounters()
    for metric in llm.get_metrics():
        if metric.name == PER_POSITION:
            # vLLM's reader hands this counter over as one list, indexed by position.
            for position, value in enumerate(metric.values):
                counters.add(metric.name, value, position)
        elif metric.name in SPEC_COUNTERS:
            counters.add(metric.name, metric.value)
    return counters


def _per_position(a, b, op) -> list[int]:
    """op over two per-position count lists; the shorter one counts as zeros past its end."""
    width = max(len(a), len(b))
    return [op(x, y) for x, y in zip(list(a) + [0] * (width - len(a)), list(b) + [0] * (width - len(b)))]


def make_llm(target: str, speculative_config: dict | None = None, **engine_kwargs):
    """An offline engine for a local target, with CPU-friendly defaults that callers may override.

    vLLM compiles the model unless told not to, as users run it; `enforce_eager=True` starts faster and
    runs slower, and changes the speed-up of drafting (README), so figures of record use the default."""
    from vllm import LLM

    kwargs = dict(model=target, dtype="float32", max_model_len=1024, seed=0,
                  disable_log_stats=False, max_num_seqs=8)
    kwargs.update(engine_kwargs)
    return LLM(speculative_config=speculative_config, **kwargs)


def generate(llm, prompts: list[list[int]], max_tokens: int, temperature: float | list[float] = 0.0,
             ignore_eos: bool = False) -> dict[str, Any]:
    """Generate from token-id prompts (at one temperature, or one per prompt); returns output ids, wall
    time and the counters of this call alone."""
    from vllm import SamplingParams, TokensPrompt

    temperatures = temperature if isinstance(temperature, list) else [temperature] * len(prompts)
    params = [SamplingParams(temperature=t, max_tokens=max_tokens, ignore_eos=ignore_eos, seed=0) for t in temperatures]
    before = spec_counters(llm)
    start = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    ids = [list(o.outputs[0].token_ids) for o in outputs]
    return {"outputs": ids, "texts": [o.outputs[0].text for o in outputs], "seconds": seconds,
            "num_output_tokens": sum(map(len, ids)),
            "spec": (spec_counters(llm) - before).as_dict()}


def shutdown(llm) -> None:
    """Stop the engine now rather than at interpreter exit, when vLLM's log streams may be closed."""
    from .vllm_internals import engine_core

    engine_core(llm).shutdown()
