"""The `vllm-e3` command: prepare, train, calibrate, profile, plan, layout."""
from __future__ import annotations

import argparse
import shlex
import sys


def _prepare(args) -> int:
    import os

    from .config import E3ConfigError
    from .prepare import prepare

    if args.quiet:
        sys.stderr = open(os.devnull, "w")
    try:
        print(prepare(args.dir, force=args.force, deploy=not args.no_e3, replace_e3=args.replace_e3))
    except E3ConfigError as exc:
        print(f"vllm-e3 prepare: error: {exc}", file=sys.__stderr__)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-e3", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="materialise the embedded default model; prints its directory")
    p.add_argument("--dir", default=None, help="target directory (default $VLLM_E3_HOME/SmolLM2-135M-Instruct)")
    p.add_argument("--force", action="store_true", help="rebuild even if the manifest matches")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--no-e3", action="store_true",
                   help="do not install the shipped ramps and calibration into DIR/e3")
    p.add_argument("--replace-e3", action="store_true",
                   help="install the shipped ramps and calibration over e3 files of your own")
    p.set_defaults(func=_prepare)
    from .planner import add_plan_parser

    add_plan_parser(sub)
    from .profile import add_profile_parser

    add_profile_parser(sub)
    from .layout import add_layout_parser

    add_layout_parser(sub)
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
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    # train and calibrate record the command line that made their artifacts
    args.command = shlex.join(["vllm-e3", *argv])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
