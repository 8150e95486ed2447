"""The `r1` command line.

    r1 generate "prompt"        one reply, locally (no Ray)
    r1 chat                     interactive chat, locally (no Ray)
    r1 serve                    the OpenAI-compatible Ray Serve application
    r1 train {sft,reward,grpo}  Ray Train jobs
    r1 eval                     task accuracy of a model
    r1 submit ...               submit a command as a Ray job
    r1 model build-tiny|merge-lora

Each command's `--help` explains its flags. Configuration errors print the bad key and the allowed
values and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Subcommand groups, each a module with `register(subparsers)`; imported lazily so `r1 generate`
# does not pay for importing Ray.
_COMMAND_MODULES = ["cluster.local", "cluster.serve.cli", "cluster.train.cli", "cluster.submit"]


def _build_tiny(args: argparse.Namespace) -> int:
    from r1.model.tiny import build_tiny

    path = build_tiny(args.out, seed=args.seed, overwrite=args.overwrite)
    print(f"built r1-tiny in {path}")
    return 0


def path_argument(value: str) -> str:
    """An argparse type for paths: an empty string is an error, not the current directory."""
    if not value.strip():
        raise argparse.ArgumentTypeError("an empty path; give a directory or file path")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="r1",
        description="r1-cluster: train and serve DeepSeek-R1-style reasoning models on Ray.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")

    model = subparsers.add_parser("model", help="build or convert model checkpoints")
    model_sub = model.add_subparsers(dest="model_command", metavar="MODEL_COMMAND", required=True)
    tiny = model_sub.add_parser(
        "build-tiny",
        help="build the r1-tiny model (tokenizer + untrained Qwen2 weights) deterministically",
        description="Build r1-tiny: a byte-level BPE tokenizer trained offline, a DeepSeek-R1 chat template and a "
        "small Qwen2 model with seeded random weights. The same seed gives byte-identical files.",
    )
    tiny.add_argument("--out", required=True, type=path_argument, help="output directory")
    tiny.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    tiny.add_argument("--overwrite", action="store_true",
                      help="replace a model already in --out (refused without it: its weights would be lost)")
    tiny.set_defaults(func=_build_tiny)

    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name and name.startswith(error.name):
                continue  # that command group is not part of this build
            raise
        module.register(subparsers)
        if hasattr(module, "register_model_commands"):
            module.register_model_commands(model_sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except ValueError as error:
        print(f"r1: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`r1 generate … | head -n1`): stop quietly, as shell tools do, and
        # keep the interpreter's final flush of stdout from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
