"""The server under load: `beagle serve` with a draft against vLLM's server without one, on one mix.

    python benchmarks/load.py [--target DIR] [--draft beagle] [--requests 500] [--concurrency 32] [--k 3]
                              [--plain-passes 2] [--json load.json]

The mix (vllm_beagle/load.py, seeded): MT-Bench questions cut to 1-120 words, completions and chat,
streamed and not, 1-96 new tokens, 15% sampled with n = 2 or 3, 10% greedy streams the client drops
after 1-4 chunks, the rest greedy. The server without a draft takes the mix `--plain-passes` times
(later passes in reverse order, so that requests share batches with other neighbours); where batching
alone changes a greedy answer between those passes, that spread is shown, and the draft is held to it:
a greedy answer of the drafting server counts as a mismatch only when it differs from every pass without
a draft. Then the drafting server takes the mix once. Printed: requests, failures (5xx), cancelled,
p50/p99 latency, mismatches, tau and per-position acceptance, whether the spec-decode counters are
consistent, whether the server went back to no running or waiting request and still answers /health.
The exit status is 1 when anything is wrong. One server at a time, on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from vllm_beagle import load
from vllm_beagle.drafts import draft_path
from vllm_beagle.local_server import LocalServer, server_command
from vllm_beagle.prompts import load_prompts
from vllm_beagle.smollm2 import smollm2_dir
from vllm_beagle.verifier import target_name

MODEL = "target"


def server(target: str, draft: str | None, args: argparse.Namespace, log_path: str, env: dict) -> LocalServer:
    return LocalServer([*server_command(target, draft, args.k), "--dtype", "float32", "--max-model-len",
                        str(args.max_model_len), "--served-model-name", MODEL], log_path, env)


def run_pass(server: LocalServer, requests: list[load.LoadRequest], concurrency: int, reverse: bool) -> dict:
    start = time.perf_counter()
    answers = load.run_load(server.url, requests, concurrency, reverse)
    return {"summary": load.load_summary(answers, time.perf_counter() - start),
            "problems": load.check_load(requests, answers), "greedy": load.greedy_texts(requests, answers)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=None, help="HF directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--draft", default="beagle", help="a shipped draft name or a Beagle checkpoint folder")
    parser.add_argument("--requests", type=int, default=500, help="requests in the mix (default 500)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (default 32)")
    parser.add_argument("--k", type=int, default=3, help="draft tokens per round")
    parser.add_argument("--plain-passes", type=int, default=2, help="passes of the mix without a draft")
    parser.add_argument("--max-model-len", type=int, default=2048, help="vLLM's context limit (default 2048)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    parser.add_argument("--json", default=None, help="write the summary here")
    args = parser.parse_args()
    if args.requests < 1 or args.concurrency < 1 or args.k < 1 or args.plain_passes < 1:
        parser.error("--requests, --concurrency, --k and --plain-passes must be at least 1")
    try:
        draft = draft_path(args.draft)
    except FileNotFoundError as e:
        parser.error(str(e))
    target = args.target or smollm2_dir()
    texts = [messages[0]["content"] for messages in load_prompts("mtbench")]
    requests = load.make_requests(texts, args.requests, MODEL, seed=args.seed)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))

    with tempfile.TemporaryDirectory() as tmp:
        print(f"server without a draft: {args.plain_passes} passes of {args.requests} requests", file=sys.stderr)
        with server(target, None, args, f"{tmp}/plain.log", env) as plain_server:
            plain = [run_pass(plain_server, requests, args.concurrency, reverse=i % 2 == 1)
                     for i in range(args.plain_passes)]
        print(f"beagle serve --draft {draft}: {args.requests} requests", file=sys.stderr)
        with server(target, draft, args, f"{tmp}/draft.log", env) as drafting_server:
            drafted = run_pass(drafting_server, requests, args.concurrency, reverse=False)
            counters, gauges = load.settle(drafting_server)
            healthy = drafting_server.healthy()

    references = [p["greedy"] for p in plain]
    spread = load.greedy_mismatches(references[:1], references[1]) if len(references) > 1 else []
    mismatches = load.greedy_mismatches(references, drafted["greedy"])
    counter_problems = load.check_counters(counters, args.k)
    problems = [f"without a draft: {p}" for run in plain for p in run["problems"]] + drafted["problems"]
    problems += counter_problems
    if len(mismatches) > len(spread):
        problems.append(f"{len(mismatches)} greedy mismatches, more than the {len(spread)} between passes without")
    if any(gauges.values()):
        problems.append(f"requests still running or waiting after the load: {gauges}")
    if not healthy:
        problems.append("the server no longer answers /health after the load")

    print(f"\n{args.requests} requests at concurrency {args.concurrency}, K = {args.k}, mix seed {args.seed}\n")
    print("| server | answered | failed (5xx) | cancelled | p50 s | p99 s | wall s |")
    print("|---|---|---|---|---|---|---|")
    for name, run in [*((f"no draft, pass {i + 1}", p) for i, p in enumerate(plain)), ("beagle serve", drafted)]:
        s = run["summary"]
        print(f"| {name} | {s['answered']} | {s['failed']} ({s['5xx']}) | {s['cancelled']} | {s['p50_s']:.2f} | "
              f"{s['p99_s']:.2f} | {s['wall_s']:.1f} |")
    compared = sum(all(i in ref for ref in references) for i in drafted["greedy"])
    print(f"\ngreedy answers compared: {compared}; differing between passes without a draft: {len(spread)} "
          f"{spread[:10]}; drafting server's differing from every pass without: {len(mismatches)} {mismatches[:10]}")
    print(f"tau {counters.tau:.3f}, per-position acceptance "
          f"{[round(r, 3) for r in counters.per_position_rate]}, {counters.num_drafts} drafts; counters "
          f"{'consistent' if not counter_problems else 'INCONSISTENT'}; after the load {gauges}, "
          f"healthy {healthy}")
    for problem in problems[:50]:
        print("PROBLEM:", problem)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"target": target_name(target), "draft": args.draft, "requests": args.requests,
                       "concurrency": args.concurrency,
                       "k": args.k, "seed": args.seed, "plain": [p["summary"] for p in plain],
                       "drafting": drafted["summary"], "spread": spread, "mismatches": mismatches,
                       "counters": counters.as_dict(), "gauges_after": gauges, "healthy_after": healthy,
                       "problems": problems}, f, indent=2)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
