"""The `vllm-e3` command line (vllm_e3/cli.py): every subcommand's arguments
live there, each handler is imported when its subcommand runs, and a handler
that cannot be imported is an error, never a missing subcommand."""
import subprocess
import sys

import pytest

from vllm_e3.cli import _handler, build_parser

SUBCOMMANDS = ("prepare", "rekey", "plan", "profile", "layout", "train", "calibrate", "tune")


def test_every_subcommand_is_declared_and_its_handler_imports():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "cmd")
    assert set(sub.choices) == set(SUBCOMMANDS)
    for name, p in sub.choices.items():
        handler = p.get_default("handler")
        assert handler is not None, name
        assert callable(_handler(handler)), name


def test_a_handler_that_cannot_be_imported_is_an_error():
    with pytest.raises(ModuleNotFoundError, match="vllm_e3.no_such_tool"):
        _handler("vllm_e3.no_such_tool:run")
    with pytest.raises(AttributeError, match="no_such_function"):
        _handler("vllm_e3.simulate:no_such_function")


def test_bad_arguments_name_the_problem(capsys):
    with pytest.raises(SystemExit) as ei:
        build_parser().parse_args(["train", "MODEL", "--exits", "8,x"])
    assert ei.value.code == 2 and "exits must be comma-separated integers" in capsys.readouterr().err


def test_help_imports_no_torch():
    code = "import sys, vllm_e3.cli; vllm_e3.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
