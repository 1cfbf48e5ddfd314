"""E3Config, ramps validation and register(): the bad inputs of the
foundation issue, each with its message (no engine needed)."""
import json
import os

import pytest
import torch

from vllm_e3.config import E3Config, E3ConfigError, load_e3_config
from vllm_e3.ramps import save_ramps, validate_ramps


@pytest.mark.parametrize("raw, msg", [
    ({"policy": "fastest"}, "unknown policy 'fastest'"),
    ({"exits": [15, 8]}, "strictly increasing"),
    ({"exits": [8, 8]}, "strictly increasing"),
    ({"exits": [8], "thresholds": [1.5]}, "threshold for exit 8 must be in [0, 1]"),
    ({"exits": [8], "thresholds": [-0.1]}, "threshold for exit 8 must be in [0, 1]"),
    ({"exits": [8, 15], "thresholds": [0.9]}, "one entry per exit"),
    ({"exit": [8]}, "unknown key(s) ['exit']"),
    ({"exits": [8], "force_exit": {"9": 0.5}}, "force_exit names exit 9"),
    ({"exits": [8], "force_exit": {"8": 2}}, "rate for exit 8 must be in [0, 1]"),
    ({"confidence": "entropy"}, "unknown confidence measure"),
    ({"exits": "8"}, "must be a list of integers"),
    ({"plan": "yes"}, "'plan' must be true or false"),
    ({"policy": "sync", "plan": True}, "policy 'sync' is not modelled"),
    ({"audit_rate": 1.5}, "'audit_rate' must be a number in [0, 1], got 1.5"),
    ({"audit_rate": "0.1"}, "'audit_rate' must be a number in [0, 1]"),
    ({"audit_rate": True}, "'audit_rate' must be a number in [0, 1]"),
])
def test_bad_config_names_the_problem(raw, msg):
    with pytest.raises(E3ConfigError) as ei:
        E3Config.from_dict(raw)
    assert msg in str(ei.value)


def test_exit_out_of_range():
    cfg = E3Config.from_dict({"exits": [8, 30]})
    with pytest.raises(E3ConfigError, match=r"exit point 30 is out of range.*\[1, 29\]"):
        cfg.validate_for_model(30)
    with pytest.raises(E3ConfigError, match="exit point 0 is out of range"):
        E3Config.from_dict({"exits": [0]}).validate_for_model(30)


def test_file_and_deployment_deep_merge(tmp_path):
    os.makedirs(tmp_path / "e3")
    (tmp_path / "e3" / "config.json").write_text(json.dumps(
        {"policy": "token", "exits": [8, 15], "thresholds": [0.9, None], "confidence": "margin"}))
    cfg = load_e3_config(str(tmp_path), {"thresholds": [0.5, 0.7]})
    assert cfg.policy == "token" and cfg.exits == (8, 15) and cfg.confidence == "margin"
    assert cfg.thresholds == (0.5, 0.7)
    # new exits: the file's thresholds and measure (made for its exits) go, the rest stays
    cfg = load_e3_config(str(tmp_path), {"exits": [4, 12, 20]})
    assert cfg.exits == (4, 12, 20) and cfg.thresholds == (None, None, None)
    assert cfg.confidence == "max_prob" and cfg.policy == "token"
    cfg = load_e3_config(str(tmp_path), {"exits": [4], "confidence": "gate", "thresholds": [0.3]})
    assert cfg.confidence == "gate" and cfg.thresholds == (0.3,)
    assert load_e3_config(str(tmp_path / "nowhere")).policy == "full"
    (tmp_path / "e3" / "config.json").write_text("{not json")
    with pytest.raises(E3ConfigError, match="cannot read E3 config"):
        load_e3_config(str(tmp_path))


def _ramps(path, d=64, r=4, gate=True, exits=(8,)):
    t = {}
    for e in exits:
        t.update({f"exits.{e}.norm.weight": torch.ones(d), f"exits.{e}.down.weight": torch.zeros(r, d),
                  f"exits.{e}.up.weight": torch.zeros(d, r)})
        if gate:
            t.update({f"exits.{e}.gate.weight": torch.zeros(1, d), f"exits.{e}.gate.bias": torch.zeros(1)})
    save_ramps(str(path), t, exits=exits, base_model_hash="x", recipe={}, data_hash="y")


def test_ramps_validate_shapes_and_corruption(tmp_path):
    p = tmp_path / "ramps.safetensors"
    _ramps(p, d=64)
    specs = validate_ramps(str(p), [8, 15], hidden_size=64)
    assert specs[8].rank == 4 and specs[8].has_gate and specs[15].rank == 0
    with pytest.raises(E3ConfigError, match=r"exits.8.norm.weight has shape \[64\], expected \[576\]"):
        validate_ramps(str(p), [8], hidden_size=576)
    p.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(E3ConfigError, match="cannot read ramps file"):
        validate_ramps(str(p), [8], hidden_size=64)


def test_register_twice_is_a_noop():
    import vllm_e3
    from vllm.model_executor.models.registry import _ModelRegistry
    from vllm_e3.patches import MARKER

    vllm_e3.register()
    first = (_ModelRegistry.resolve_model_cls, _ModelRegistry.inspect_model_cls)
    vllm_e3.register()
    vllm_e3._registered = False  # force a second full pass: patches must not stack
    vllm_e3.register()
    assert (_ModelRegistry.resolve_model_cls, _ModelRegistry.inspect_model_cls) == first
    assert getattr(_ModelRegistry.resolve_model_cls, MARKER)
    assert not getattr(_ModelRegistry.resolve_model_cls.__wrapped_original__, MARKER, False)


def test_unsupported_architecture_message():
    from vllm_e3.patches.patch_registry import UnsupportedArchitectureError, map_architectures

    with pytest.raises(UnsupportedArchitectureError) as ei:
        map_architectures(["GPT2LMHeadModel"])
    msg = str(ei.value)
    assert "GPT2LMHeadModel" in msg
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert arch in msg


def test_one_copy_of_the_namespaced_packages():
    """kernels/ and patches/ are installed as vllm_e3.kernels / vllm_e3.patches
    (editable: this checkout's folders), and not as top-level modules."""
    import pathlib

    import vllm_e3.kernels
    import vllm_e3.patches

    repo = pathlib.Path(__file__).resolve().parent.parent
    assert pathlib.Path(vllm_e3.kernels.__file__).resolve() == repo / "kernels" / "__init__.py"
    assert pathlib.Path(vllm_e3.patches.__file__).resolve() == repo / "patches" / "__init__.py"
    # outside the checkout (python -m puts the cwd on sys.path) the install
    # provides no top-level `kernels` / `patches` of ours
    import subprocess
    import sys

    code = ("import importlib.util as u; "
            "print([str((u.find_spec(m) or 0) and u.find_spec(m).origin) for m in ('kernels', 'patches')])")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True).stdout
    assert str(repo) not in out, out
