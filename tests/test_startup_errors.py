"""Bad input to `LLM(..., model_impl="e3")` fails at start-up, before any
engine process starts, with a message that names the problem."""
import json
import os

import pytest
import torch


def _start(model, **e3):
    from vllm import LLM

    return LLM(model, model_impl="e3", enforce_eager=True,
               additional_config={"e3": e3} if e3 else {})


@pytest.mark.parametrize("e3, msg", [
    ({"policy": "token", "exits": [8, 40]}, "exit point 40 is out of range"),
    ({"policy": "token", "exits": [15, 8]}, "strictly increasing"),
    ({"policy": "token", "exits": [8, 8]}, "strictly increasing"),
    ({"policy": "token", "exits": [8], "thresholds": [1.2]}, "threshold for exit 8 must be in [0, 1]"),
    ({"policy": "warp"}, "unknown policy 'warp'"),
    ({"polcy": "token"}, "unknown key(s) ['polcy']"),
])
def test_bad_e3_config(model_dir, e3, msg):
    with pytest.raises(Exception) as ei:
        _start(model_dir, **e3)
    assert msg in str(ei.value)


def test_policy_e3_refuses_async_scheduling(model_dir):
    from vllm import LLM

    with pytest.raises(ValueError, match="does not support --async-scheduling"):
        LLM(model_dir, model_impl="e3", enforce_eager=True, async_scheduling=True,
            additional_config={"e3": {"policy": "e3", "exits": [8]}})


@pytest.mark.parametrize("e3, what", [
    ({"policy": "e3", "exits": [8]}, "policy 'e3'"),
    ({"policy": "token", "exits": [8], "audit_rate": 0.1}, "the online audit"),
    ({"policy": "e3", "exits": [8], "plan": True}, "policy 'e3'"),
])
def test_pipeline_parallel_refuses_what_runs_in_one_rank(model_dir, e3, what):
    """vllm_e3.models.parallel: parking and the audit need one pipeline rank
    (a plan does not lift that)."""
    from vllm import LLM

    with pytest.raises(ValueError) as ei:
        LLM(model_dir, model_impl="e3", pipeline_parallel_size=2, additional_config={"e3": e3})
    assert f"--pipeline-parallel-size 2: {what}" in str(ei.value)
    assert "use policy 'token' or 'sync'" in str(ei.value)


def test_pipeline_parallel_plan_needs_the_engine_costs(model_dir):
    """The ranks plan from e3/engine_costs.json (vllm_e3.pipeline); the
    prepared model has none."""
    from vllm import LLM

    assert not os.path.exists(os.path.join(model_dir, "e3", "engine_costs.json"))
    with pytest.raises(ValueError) as ei:
        LLM(model_dir, model_impl="e3", pipeline_parallel_size=2,
            additional_config={"e3": {"policy": "token", "exits": [8], "plan": True}})
    assert "--pipeline-parallel-size 2 with 'plan': true" in str(ei.value)
    assert "engine_costs.json is missing: run `vllm-e3 profile`" in str(ei.value)


def test_pipeline_parallel_refuses_eager(model_dir):
    from vllm import LLM

    with pytest.raises(ValueError, match="--pipeline-parallel-size 2 with --enforce-eager: vLLM 0.32"):
        LLM(model_dir, model_impl="e3", pipeline_parallel_size=2, enforce_eager=True,
            additional_config={"e3": {"policy": "token", "exits": [8]}})


@pytest.fixture()
def model_copy(model_dir, tmp_path):
    """A model directory of links to the prepared one, with its own e3/."""
    d = tmp_path / "model"
    d.mkdir()
    for name in os.listdir(model_dir):
        if name != "e3":
            os.symlink(os.path.join(model_dir, name), d / name)
    (d / "e3").mkdir()
    return d


def test_ramps_shape_mismatch(model_copy):
    from vllm_e3.ramps import save_ramps

    save_ramps(str(model_copy / "e3" / "ramps.safetensors"),
               {"exits.8.norm.weight": torch.ones(64), "exits.8.down.weight": torch.zeros(4, 64),
                "exits.8.up.weight": torch.zeros(64, 4)},
               exits=[8], base_model_hash="x", recipe={}, data_hash="y")
    with pytest.raises(Exception, match=r"exits.8.norm.weight has shape \[64\], expected \[576\]"):
        _start(str(model_copy), policy="token", exits=[8])


def test_corrupt_ramps(model_copy):
    (model_copy / "e3" / "ramps.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Exception, match="cannot read ramps file"):
        _start(str(model_copy), policy="token", exits=[8])


def test_unsupported_architecture(model_copy):
    cfg = json.load(open(model_copy / "config.json"))
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    os.unlink(model_copy / "config.json")
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception) as ei:
        _start(str(model_copy))
    msg = str(ei.value)
    assert "does not support architecture GPTNeoXForCausalLM" in msg
    assert "LlamaForCausalLM" in msg and "Qwen3ForCausalLM" in msg


# ---- platform and vLLM version ---------------------------------------------------------------------
def _engine_args(model, **e3):
    import vllm_e3
    from vllm.engine.arg_utils import EngineArgs

    vllm_e3.register()   # the wrapper, as vLLM's plugin loader would install it
    return EngineArgs(model=model, model_impl="e3", enforce_eager=True,
                      additional_config={"e3": e3} if e3 else {})


def test_exits_refused_off_cpu(model_dir, monkeypatch):
    """A GPU (simulated: the platform says it is not a CPU) stops start-up
    before vLLM builds anything, pointing at docs/gpu.md."""
    from vllm.platforms import current_platform

    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    with pytest.raises(RuntimeError) as ei:
        _engine_args(model_dir, policy="token", exits=[8, 15]).create_engine_config()
    msg = str(ei.value)
    assert "runs on CPU only" in msg and "docs/gpu.md" in msg and "policy 'token'" in msg


def test_full_policy_allowed_off_cpu():
    """Policy full (and exits configured but unable to fire) passes the check
    off CPU and asks for vLLM's own worker and scheduler (False); on CPU, E3's."""
    from types import SimpleNamespace

    from vllm_e3.config import load_e3_config
    from vllm_e3.patches.patch_arg_utils import check_platform

    gpu = SimpleNamespace(is_cpu=lambda: False, device_name="cuda")
    cpu = SimpleNamespace(is_cpu=lambda: True, device_name="cpu")
    full = load_e3_config("/nonexistent", {"policy": "full", "exits": [8, 15]})
    assert check_platform(full, gpu) is False
    assert check_platform(full, cpu) is True
    sync = load_e3_config("/nonexistent", {"policy": "sync", "exits": [8]})
    with pytest.raises(RuntimeError, match="see docs/gpu.md"):
        check_platform(sync, gpu)
    assert check_platform(sync, cpu) is True


def test_other_vllm_version_refused(model_dir, monkeypatch):
    import vllm.version

    from vllm_e3.patches.patch_arg_utils import check_vllm_version, installed_vllm_version

    # this build's own string (with or without a local "+cpu" suffix) passes
    assert installed_vllm_version().startswith("0.32.0")
    check_vllm_version()
    check_vllm_version("0.32.0+cpu")
    monkeypatch.setattr(vllm.version, "__version__", "0.33.1")
    with pytest.raises(RuntimeError, match=r"needs vLLM 0\.32\.0, but vLLM 0\.33\.1 is installed"):
        _engine_args(model_dir).create_engine_config()
    for other in ("0.32.1", "0.32.0rc1", "dev"):
        with pytest.raises(RuntimeError, match="needs vLLM 0.32.0"):
            check_vllm_version(other)
