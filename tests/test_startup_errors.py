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
