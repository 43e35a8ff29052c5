"""Runs vLLM engines for the tests in a fresh process; job and results are JSON files.

Job: {"target": DIR, "runs": [{"name", "spec": speculative config or null,
      "calls": [{"prompts": [[ids]], "max_tokens": N, "temperature": T or [T per prompt] (default 0)}],
      "count_draft_forwards": bool (default false)}]}
Results: {name: {"calls": [generate() results]} or {"error": "Type: message"}}. A counted run's calls also
hold "draft_forwards" (forward calls of the draft model) and "draft_logits_argmax" (per call of the draft's
logits processor, the argmax of each row: a greedy request's draft tokens). Counting needs the engine in
this process (VLLM_ENABLE_V1_MULTIPROCESSING=0).
Each run gets its own engine, built after the previous one has been shut down. The plugin reaches
vLLM only through its installed entry point: this script never registers anything itself.
"""

import json
import sys

from vllm_beagle.offline import generate, make_llm, shutdown

# What the draft model of the engine that runs now has done (the engine runs in this process).
DRAFT_FORWARDS = [0]
DRAFT_ARGMAX = []


def _count_draft_forwards(worker) -> None:
    model = worker.model_runner.drafter.model
    model.register_forward_hook(lambda *_: DRAFT_FORWARDS.__setitem__(0, DRAFT_FORWARDS[0] + 1))
    model.logits_processor.register_forward_hook(
        lambda _m, _i, logits: DRAFT_ARGMAX.append(logits.argmax(-1).tolist()))


def _call(llm, call: dict, counted: bool) -> dict:
    forwards, logits_calls = DRAFT_FORWARDS[0], len(DRAFT_ARGMAX)
    result = generate(llm, call["prompts"], call["max_tokens"], call.get("temperature", 0.0), ignore_eos=True)
    if counted:
        result |= {"draft_forwards": DRAFT_FORWARDS[0] - forwards, "draft_logits_argmax": DRAFT_ARGMAX[logits_calls:]}
    return result


def main(job_file: str, out_file: str) -> None:
    with open(job_file) as f:
        job = json.load(f)
    results = {}
    for run in job["runs"]:
        try:
            # Eager: compiling every engine would cost the suite minutes and test nothing more.
            llm = make_llm(job["target"], run["spec"], enforce_eager=True)
        except Exception as e:  # any refusal: the test asserts on its type and message
            results[run["name"]] = {"error": f"{type(e).__name__}: {e}"}
            continue
        counted = run.get("count_draft_forwards", False)
        if counted:
            llm.collective_rpc(_count_draft_forwards)
        results[run["name"]] = {"calls": [_call(llm, c, counted) for c in run["calls"]]}
        shutdown(llm)
        del llm
    with open(out_file, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
