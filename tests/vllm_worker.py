"""Runs vLLM engines for the tests in a fresh process; job and results are JSON files.

Job: {"target": DIR, "runs": [{"name", "spec": speculative config or null,
      "calls": [{"prompts": [[ids]], "max_tokens": N, "temperature": T or [T per prompt] (default 0)}]}]}
Results: {name: {"calls": [generate() results]} or {"error": "Type: message"}}.
Each run gets its own engine, built after the previous one has been shut down. The plugin reaches
vLLM only through its installed entry point: this script never registers anything itself.
"""

import json
import sys

from vllm_beagle.offline import generate, make_llm, shutdown


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
        results[run["name"]] = {"calls": [generate(llm, c["prompts"], c["max_tokens"], c.get("temperature", 0.0),
                                                   ignore_eos=True) for c in run["calls"]]}
        shutdown(llm)
        del llm
    with open(out_file, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
