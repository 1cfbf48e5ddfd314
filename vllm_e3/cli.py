"""The `vllm-e3` command: prepare, train, calibrate, plan."""
from __future__ import annotations

import argparse
import sys


def _prepare(args) -> int:
    import os

    from .prepare import prepare

    if args.quiet:
        sys.stderr = open(os.devnull, "w")
    print(prepare(args.dir, force=args.force))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-e3", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="materialise the embedded default model; prints its directory")
    p.add_argument("--dir", default=None, help="target directory (default $VLLM_E3_HOME/SmolLM2-135M-Instruct)")
    p.add_argument("--force", action="store_true", help="rebuild even if the manifest matches")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=_prepare)
    from .planner import add_plan_parser

    add_plan_parser(sub)
    try:
        from .train import add_train_parser
        add_train_parser(sub)
    except ImportError:
        pass
    try:
        from .calibrate import add_calibrate_parser
        add_calibrate_parser(sub)
    except ImportError:
        pass
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
