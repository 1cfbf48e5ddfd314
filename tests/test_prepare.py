"""`vllm-e3 prepare` (vllm_e3/prepare.py): the prepared model declares
float32 over bf16 weights, an older prepared model is upgraded in place with
its e3 files re-keyed, `vllm-e3 rekey` refuses weights that differ, and
patch 6 keeps a float32 checkpoint float32 under `--dtype auto` on CPU. No
engine starts here."""
import json
import os
import shutil

import pytest
import torch

from helpers import plant_ramps, tiny_llama


def _format1(tmp_path):
    """A tiny model as prepare's format 1 left it: bf16 weights and config,
    a manifest without "format", and ramps of the user's own in e3/."""
    from vllm_e3.prepare import MANIFEST, _sha256

    d = tiny_llama(tmp_path / "model", layers=4, dtype="bfloat16")
    files = {n: _sha256(os.path.join(d, n)) for n in sorted(os.listdir(d))}
    with open(os.path.join(d, MANIFEST), "w") as f:
        json.dump({"source": "test", "source_sha256": "x", "files": files}, f)
    plant_ramps(d, [2])
    return d


def test_prepared_model_declares_float32(prepared_model_dir):
    from vllm_e3.prepare import PREPARED_FORMAT

    with open(os.path.join(prepared_model_dir, "config.json")) as f:
        assert json.load(f)["dtype"] == "float32"
    with open(os.path.join(prepared_model_dir, "vllm-e3-manifest.json")) as f:
        assert json.load(f)["format"] == PREPARED_FORMAT


def test_an_older_prepared_model_is_upgraded_in_place(tmp_path):
    from vllm_e3.prepare import _manifest_ok, prepare
    from vllm_e3.ramps import check_base_model, model_hash, read_ramps_header

    d = _format1(tmp_path)
    before = {n: open(os.path.join(d, n), "rb").read() for n in os.listdir(d) if n.endswith(".safetensors")}
    ramps = os.path.join(d, "e3", "ramps.safetensors")
    assert read_ramps_header(ramps)[0]["base_model_hash"] == model_hash(d)
    assert not _manifest_ok(d)
    assert prepare(d, deploy=False) == d                       # no GGUF rebuild: the upgrade path
    assert _manifest_ok(d)
    with open(os.path.join(d, "config.json")) as f:
        assert json.load(f)["dtype"] == "float32"
    assert before == {n: open(os.path.join(d, n), "rb").read() for n in before}   # weights untouched
    check_base_model(ramps, read_ramps_header(ramps)[0], d)   # the user's ramps follow the new hash


def test_rekey_checks_the_served_weights(tmp_path):
    from vllm_e3.config import E3ConfigError
    from vllm_e3.prepare import float32_config, rekey
    from vllm_e3.ramps import model_hash, read_ramps_header

    old = _format1(tmp_path)
    new = str(tmp_path / "new")
    shutil.copytree(old, new, ignore=shutil.ignore_patterns("e3"))
    float32_config(new)
    assert model_hash(old) != model_hash(new)
    e3 = os.path.join(old, "e3")
    with open(os.path.join(e3, "report.json"), "w") as f:
        json.dump({"base_model_hash": model_hash(old)}, f)

    # a weight that differs is refused, and nothing is rewritten
    bad = str(tmp_path / "bad")
    shutil.copytree(new, bad)
    from safetensors.torch import load_file, save_file

    path = os.path.join(bad, "model.safetensors")
    t = load_file(path)
    k = next(iter(t))
    t[k] = t[k].clone()
    t[k].view(-1)[0] += 1
    save_file(t, path, metadata={"format": "pt"})
    with pytest.raises(E3ConfigError, match=f"tensor {k} differs"):
        rekey(e3, old, bad)
    assert read_ramps_header(os.path.join(e3, "ramps.safetensors"))[0]["base_model_hash"] == model_hash(old)

    done = rekey(e3, old, new)
    assert sorted(os.path.basename(p) for p in done) == ["ramps.safetensors", "report.json"]
    assert read_ramps_header(os.path.join(e3, "ramps.safetensors"))[0]["base_model_hash"] == model_hash(new)
    with open(os.path.join(e3, "report.json")) as f:
        assert json.load(f)["base_model_hash"] == model_hash(new)
    with pytest.raises(E3ConfigError, match="made for base model"):   # already re-keyed away from `bad`'s
        rekey(e3, bad, bad)


def test_the_shipped_artifact_is_keyed_to_the_prepared_model(prepared_model_dir):
    from vllm_e3.prepare import check_artifact

    check_artifact(prepared_model_dir)


@pytest.mark.parametrize("declared, want", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_auto_dtype_keeps_a_float32_checkpoint_on_cpu(tmp_path, declared, want):
    """Patch 6, on a vanilla engine config (no --model-impl e3): vLLM alone
    would downcast the float32 checkpoint to bfloat16."""
    import vllm_e3
    from vllm.engine.arg_utils import EngineArgs

    vllm_e3.register()
    d = tiny_llama(tmp_path / declared, layers=2, dtype=declared)
    cfg = EngineArgs(model=d, enforce_eager=True).create_engine_config()
    assert cfg.model_config.dtype == want
    assert EngineArgs(model=d, dtype="bfloat16", enforce_eager=True).create_engine_config().model_config.dtype \
        == torch.bfloat16
