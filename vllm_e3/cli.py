"""The `vllm-e3` command: prepare, train, calibrate, profile, plan, tune, layout.

Every subcommand's arguments are declared here; each runs a handler named
"module:function" (`handler`), imported only when that subcommand runs, so
`vllm-e3 --help` imports no torch, the tools never import this module back,
and a handler that fails to import is an error that says so.
"""
from __future__ import annotations

import argparse
import importlib
import shlex
import sys

from .simulate import MIN_GAIN


def parse_exits(text: str) -> list[int]:
    try:
        return sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"exits must be comma-separated integers, got {text!r}") from None


def _measure(text: str) -> str:
    """A --confidence value: a measure the engine scores, or "forced"."""
    from .config import CONFIDENCE_MEASURES, SHORTLIST, known_measure

    if text != "forced" and not known_measure(text):
        raise argparse.ArgumentTypeError(f"choose one of {[*CONFIDENCE_MEASURES, 'forced']} or {SHORTLIST}K, "
                                          f"got {text!r}")
    return text


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


def _rekey(args) -> int:
    from .config import E3ConfigError
    from .prepare import rekey

    try:
        for path in rekey(args.e3_dir, args.old, args.new):
            print(f"re-keyed {path}")
    except E3ConfigError as exc:
        print(f"vllm-e3 rekey: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _rekey_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "rekey", help="point e3 files at a base model whose served weights did not change",
        description="Check that OLD and NEW serve the same float32 weights (every tensor equal once cast "
                    "to float32, config.json equal but for its dtype), then re-key E3_DIR's ramps and "
                    "reports from OLD's base-model hash to NEW's.")
    p.add_argument("e3_dir", help="folder with ramps.safetensors (and calibration.json, ...)")
    p.add_argument("--old", required=True, help="the model folder the files were made for")
    p.add_argument("--new", required=True, help="the model folder to re-key them to")
    p.set_defaults(handler=_rekey)
    return p


def _prepare_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("prepare", help="materialise the embedded default model; prints its directory")
    p.add_argument("--dir", default=None, help="target directory (default $VLLM_E3_HOME/SmolLM2-135M-Instruct)")
    p.add_argument("--force", action="store_true", help="rebuild even if the manifest matches")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--no-e3", action="store_true",
                   help="do not install the shipped ramps and calibration into DIR/e3")
    p.add_argument("--replace-e3", action="store_true",
                   help="install the shipped ramps and calibration over e3 files of your own")
    p.set_defaults(handler=_prepare)
    return p


DTYPES = ("float32", "bfloat16", "float16")


def _tool_args(p: argparse.ArgumentParser, out_help: str, dtype_help: str) -> None:
    """The arguments train and calibrate share."""
    p.add_argument("--out", default=None, help=out_help)
    p.add_argument("--engine-dtype", default="float32", choices=DTYPES,
                   help=dtype_help + " (default %(default)s)")
    _run_args(p)


def _run_args(p: argparse.ArgumentParser) -> None:
    """How the offline tools run: cache, threads, progress bars."""
    p.add_argument("--cache-dir", default=None, help="corpus/state cache (default $VLLM_E3_HOME/cache)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default %(default)s: on a shared 2-core machine one thread "
                        "beat two even for the head GEMM)")
    p.add_argument("--no-progress", action="store_true")


def _recipe_args(p: argparse.ArgumentParser, batch_flag: str = "--batch") -> None:
    """train's recipe (tune passes it through; its own --batch is the engine's, so train's
    rows per step are --train-batch there)."""
    p.add_argument("--exits", type=parse_exits, default=[],
                   help="candidate exit points, comma-separated (default: 53/67/80/90%% of the depth, "
                        "16,20,24,27 on 30 layers)")
    p.add_argument("--rank", type=int, default=64, help="adapter rank (default %(default)s)")
    p.add_argument("--text-windows", type=int, default=0,
                   help="teacher-forced windows of the Python standard library's source added to the "
                        "training rows (default %(default)s: the model's own outputs only; 256 lowered "
                        "held-out agreement here, benchmarks/RESULTS.md)")
    p.add_argument("--text-tokens", type=int, default=96, help="tokens per text window (default %(default)s)")
    p.add_argument("--prompts", default=None,
                   help="JSONL of {\"prompt\": ...} lines (default: the built-in set's train split)")
    p.add_argument("--max-prompts", type=int, default=0, help="use only the first N prompts (0: all)")
    p.add_argument("--mse-steps", type=int, default=600,
                   help="phase-1 steps per exit, centred-logit regression (default %(default)s)")
    p.add_argument("--steps", type=int, default=60,
                   help="phase-2 steps per exit, full-vocabulary KL (default %(default)s)")
    p.add_argument(batch_flag, type=int, default=128, help="training rows per step (default %(default)s)")
    p.add_argument("--lr", type=float, default=3e-2, help="AdamW learning rate, both phases (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)


def _max_tokens(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per prompt (default %(default)s)")


def _train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="train ramps (exit heads) for a model by self-distillation",
        description="Train per-exit ramps by self-distillation on the model's own greedy outputs; "
                    "writes <out>/ramps.safetensors.")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    _recipe_args(p)
    _max_tokens(p)
    _tool_args(p, "the e3 folder to write (default MODEL_DIR/e3)",
               "dtype of the vLLM engine that generates the corpus: the deployment whose outputs are "
               "the reference")
    p.set_defaults(handler="vllm_e3.tools.train:run")
    return p


def _heldout_args(p: argparse.ArgumentParser) -> None:
    """calibrate's held-out data, target and costs (tune passes them through)."""
    p.add_argument("--target-agreement", type=float, default=0.99,
                   help="token agreement with the full model for config.json (default %(default)s)")
    p.add_argument("--humaneval", type=int, default=100, help="HumanEval problems 0..N-1 (default %(default)s)")
    p.add_argument("--no-builtin-heldout", action="store_true",
                   help="leave out the built-in prompt set's held-out split")
    p.add_argument("--max-heldout", type=int, default=0,
                   help="use only the first N prompts of the built-in held-out split (0: all)")
    p.add_argument("--free-prompts", type=int, default=8,
                   help="prompts for the free-running comparison; 0 skips it (default %(default)s)")
    p.add_argument("--free-tokens", type=int, default=64)
    p.add_argument("--cost-rows", type=int, default=64, help="decode rows when timing costs (default %(default)s)")


def _calibrate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "calibrate", help="choose exits, confidence measure and thresholds on held-out data",
        description="Calibrate trained ramps on held-out prompts; writes <out>/calibration.json, "
                    "config.json, report.json and report.png.")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    _heldout_args(p)
    _max_tokens(p)
    p.add_argument("--train-prompts", default=None,
                   help="the training prompts, JSONL as train's --prompts: the tokens the model served "
                        "on them make the shortlist (default: the built-in set's train split; give "
                        "train's --prompts and --max-prompts to reuse its cached corpus)")
    p.add_argument("--max-train-prompts", type=int, default=0,
                   help="use only the first N training prompts (0: all)")
    p.add_argument("--engine-costs", default=None,
                   help="the serving engine's costs (`vllm-e3 profile`); default: engine_costs.json in "
                        "--out or MODEL_DIR/e3 if there")
    p.add_argument("--no-engine-costs", action="store_true",
                   help="judge by the per-row cost model alone, even where engine costs are found")
    p.add_argument("--min-gain", type=float, default=MIN_GAIN,
                   help="with engine costs, exits are deployed only if modelled at most 1 - this of "
                        "full's time on every workload (default %(default)s)")
    _tool_args(p, "the e3 folder holding ramps.safetensors (default MODEL_DIR/e3)",
               "dtype of the vLLM engine whose outputs are the reference")
    p.set_defaults(handler="vllm_e3.tools.calibrate:run")
    return p


def _plan_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="measure stage costs here and choose exits and targets")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--exits", default=None, help="candidate exits (default: the E3 config's)")
    p.add_argument("--profile", default=None,
                   help='exit fractions as JSON, e.g. \'{"8": 0.3, "15": 0.25}\' (default: calibration.json)')
    p.add_argument("--batch", type=int, default=64,
                   help="decode batch to plan for (the engine's --max-num-active-seqs)")
    p.add_argument("--slots", type=int, default=None,
                   help="runner slots (the engine's --max-num-seqs; default --batch): more than "
                        "--batch lets parked requests wait beside a full first stage")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--confidence", default=None, type=_measure,
                   help="decision cost to assume (default: the E3 config's measure; "
                        "forced = a synthetic profile, no decision cost)")
    p.add_argument("--max-tpot-ratio", type=float, default=None,
                   help="choose e3 only if its modelled TPOT is at most this many times token's "
                        "(default: the E3 config's max_tpot_ratio)")
    p.add_argument("--engine-costs", default=None,
                   help="engine costs measured by `vllm-e3 profile` (default: e3/engine_costs.json "
                        "when it exists): plan by simulating the engine instead of the closed form")
    p.add_argument("--requests", type=int, default=None,
                   help="with engine costs: requests in the simulated workload (default 3 x --batch)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--pp", type=int, default=1,
                   help="pipeline-parallel ranks: choose the partition of the layers too (priced with "
                        "the engine costs, vllm_e3/pipeline.py) and print the line that applies it; "
                        "--batch is then the rows of one step, with --pp groups of them in flight")
    p.add_argument("--write", action="store_true", help="write the plan into e3/config.json")
    p.set_defaults(handler="vllm_e3.planner:main")
    return p


def _profile_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("profile", help="measure this engine's stage and step costs "
                                              "(e3/engine_costs.json) for the planner's simulation")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    _workload_args(p)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--curve-to", type=int, default=None, metavar="ROWS",
                   help="also time the layer on closed batches of 2, 4, ... x --batch rows up to ROWS "
                        "(short outputs), so the planner has the curve where it plans beyond --batch")
    p.add_argument("--out", default=None, help="default MODEL_DIR/e3/engine_costs.json")
    p.set_defaults(handler="vllm_e3.profile:main")
    return p


def _workload_args(p: argparse.ArgumentParser) -> None:
    """The engine profile measures (tune plans for the same)."""
    p.add_argument("--batch", type=int, default=64, help="the engine's --max-num-seqs (default %(default)s)")
    p.add_argument("--requests", type=int, default=None, help="requests of the workload (default 3 x --batch)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--enforce-eager", action="store_true",
                   help="profile the eager engine (plan for an engine served with --enforce-eager)")


def _tune_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "tune", help="train, calibrate, profile and plan for a model, in one resumable run",
        description="Run train, calibrate, profile and plan for MODEL_DIR (vllm_e3/tools/tune.py); "
                    "a rerun skips the steps that are done and redoes those whose inputs changed. "
                    "Ends with a summary (also <out>/tune_summary.json) and the `vllm serve` line.")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--out", default=None,
                   help="the e3 folder to write (default MODEL_DIR/e3); elsewhere, a folder named e3 "
                        "whose parent becomes a view of MODEL_DIR (symlinks) to serve")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="the engine's dtype: corpus, profile and serving (default %(default)s)")
    p.add_argument("--force", action="store_true", help="redo every step")
    _recipe_args(p, batch_flag="--train-batch")
    _max_tokens(p)
    _heldout_args(p)
    _workload_args(p)
    _run_args(p)
    p.set_defaults(handler="vllm_e3.tools.tune:run")
    return p


def _layout_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("layout", help="simulate E3's split-and-replicate layout on N devices")
    p.add_argument("model_dir", metavar="MODEL_DIR", nargs="?", default=None,
                   help="measure the cost curves here, as `vllm-e3 plan` does")
    p.add_argument("--curves", default=None, help="cost curves JSON (measure_costs' dict) instead")
    p.add_argument("--save-curves", default=None, help="write the curves used to this JSON file")
    p.add_argument("--devices", "-N", type=int, required=True)
    p.add_argument("--profile", default=None,
                   help='exit fractions of all tokens as JSON, e.g. \'{"8": 0.3, "15": 0.25}\'')
    p.add_argument("--rates", action="store_true",
                   help="--profile gives rates of the tokens reaching each exit (force_exit form)")
    p.add_argument("--exits", default=None, help="candidate exits / boundaries (default: the profile's)")
    p.add_argument("--batch", type=int, default=64,
                   help="sequences per device: the load is devices x batch for every layout")
    p.add_argument("--hop-cost", type=float, default=0.0, help="microseconds per token per hop")
    p.add_argument("--hop-latency", type=float, default=0.0, help="fixed microseconds per hop")
    p.add_argument("--latency-bound", type=float, default=2.0,
                   help="p99 TPOT <= this x vanilla's (whole-model DP, same load)")
    p.add_argument("--confidence", default="forced", type=_measure,
                   help="decision cost to assume (forced = synthetic profile, no decision cost)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--scale-to", default=None,
                   help="'llama-7b' or an HF config.json: scale the curves by MACs per token "
                        "(source shape: SmolLM2-135M, or --scale-from) and the exits by depth")
    p.add_argument("--scale-from", default=None, help="HF config.json the curves were measured on")
    p.add_argument("--json", default=None, help="write all results as JSON to FILE ('-': stdout)")
    p.set_defaults(handler="vllm_e3.layout:main")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-e3", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for add in (_prepare_parser, _rekey_parser, _plan_parser, _profile_parser, _layout_parser, _train_parser,
                _calibrate_parser, _tune_parser):
        add(sub)
    return parser


def _handler(spec):
    """A handler given as "module:function", imported now."""
    if callable(spec):
        return spec
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    # train and calibrate record the command line that made their artifacts
    args.command = shlex.join(["vllm-e3", *argv])
    return _handler(args.handler)(args)


if __name__ == "__main__":
    sys.exit(main())
