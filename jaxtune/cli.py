"""`jaxtune` console entry point.

User mistakes (bad config keys, bad data, missing files) end in one line
`jaxtune: error: ...` and exit status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from jaxtune.errors import UserError

EXIT_USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxtune",
        description="JAX-native post-training for LLMs.",
        epilog="Config overrides: --config.KEY=VALUE, e.g. --config.optim.lr=1e-4 --config.train.steps=500",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train (or resume) a run from a config file")
    train.add_argument("--config", required=True, help="path/to/config.py[:arg], e.g. configs/quickstart.py")
    train.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics.jsonl, tokenizer")
    train.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
    return parser


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.a.b=v` (or `--config.a.b v`) overrides from the ordinary arguments."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            body = arg[len("--config."):]
            if "=" not in body and i + 1 < len(argv):
                body = f"{body}={argv[i + 1]}"
                i += 1
            overrides.append(body)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _train(args, overrides: list[str]) -> int:
    from jaxtune import config as config_lib

    config = config_lib.load_config(args.config, overrides)  # all config errors before JAX starts work
    from jaxtune import trainer

    trainer.train(config, args.workdir)  # a signal-stopped run has saved and exits cleanly too
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, overrides = _split_overrides(argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        if args.command == "train":
            return _train(args, overrides)
    except UserError as e:
        if args.debug:
            raise
        print(f"jaxtune: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
