"""Ramps (exit heads) and their artifact, `<model_dir>/e3/ramps.safetensors`.

A ramp at exit point `e` reads the residual stream after decoder layer `e-1`,
`x = hidden + residual` [n, d], and maps it into the space the model's own
final norm + LM head read:

    y = x + up(down(rms_norm(x) * norm.weight))        (rank-r adapter)
    y = x                                               (no tensors: identity,
                                                          the "logit lens")
    head_in = final_norm(y)                             (the model's own norm)
    gate    = sigmoid(head_in @ gate.weight.T + gate.bias)   (optional)

Artifact schema (safetensors; every tensor in the model's hidden size d):
    exits.<e>.norm.weight  [d]
    exits.<e>.down.weight  [r, d]
    exits.<e>.up.weight    [d, r]
    exits.<e>.gate.weight  [1, d]     optional: the learned confidence gate
    exits.<e>.gate.bias    [1]        optional, present iff gate.weight is
Metadata (strings): `format` = "vllm-e3.ramps/1", `exits` (JSON list),
`base_model_hash` (see `model_hash`), `recipe` (JSON), `data_hash`, and
optionally `command` (the command line that made the file).
An exit listed in the E3 config with no tensors in the file uses the identity
ramp; tensors of exits not in the config are ignored.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch

from .config import E3ConfigError

RAMPS_FORMAT = "vllm-e3.ramps/1"
_PARTS = ("norm.weight", "down.weight", "up.weight", "gate.weight", "gate.bias")


@dataclass
class RampSpec:
    """Shapes of one exit's tensors as stored (rank 0 = identity ramp)."""
    exit: int
    rank: int
    has_adapter: bool
    has_gate: bool


def ramp_key(e: int, part: str) -> str:
    return f"exits.{e}.{part}"


HASH_SCHEME = "e3h2"
_SAMPLES, _SAMPLE_BYTES = 16, 4096


def model_hash(model_dir: str) -> str:
    """Identity of the base model a ramps file was trained for, in O(1) of
    the model's size (start-up must not read 14 GB for a 7B model):
    "e3h2:" + sha256 over
    - config.json, byte for byte;
    - for each `*.safetensors` file (by name): its name, its header (the
      8-byte length and the JSON table of every tensor's name, dtype, shape
      and offsets), and 16 chunks of 4 KiB of tensor data at evenly spaced
      offsets -- so a re-quantised or fine-tuned copy with the same layout
      hashes differently too, with overwhelming likelihood.
    The e3/ folder is not hashed."""
    h = hashlib.sha256()
    with open(os.path.join(model_dir, "config.json"), "rb") as f:
        h.update(f.read())
    for name in sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors")):
        h.update(name.encode())
        with open(os.path.join(model_dir, name), "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            h.update(head + f.read(n))
            start = 8 + n
            size = max(0, os.fstat(f.fileno()).st_size - start)
            for i in range(_SAMPLES):
                f.seek(start + (size - _SAMPLE_BYTES) * i // (_SAMPLES - 1) if size > _SAMPLE_BYTES else start)
                h.update(f.read(_SAMPLE_BYTES))
    return f"{HASH_SCHEME}:{h.hexdigest()}"


def check_base_model(path: str, meta: dict[str, str], model_dir: str) -> None:
    """Refuse ramps trained for other weights than those in `model_dir`."""
    want, got = meta.get("base_model_hash", ""), model_hash(model_dir)
    if want != got:
        why = ("it was hashed by an older vllm-e3 (full-weight sha256, no scheme prefix)"
               if want and ":" not in want else f"it was trained for base model {want[:20] or '?'}")
        raise E3ConfigError(
            f"ramps file {path} does not belong to the weights in {model_dir}: {why}, and these weights "
            f"(config.json + safetensors headers and sampled data, vllm_e3.ramps.model_hash) hash to "
            f"{got[:20]}. Retrain the ramps for these weights (`vllm-e3 train`), or remove the file "
            f"to serve identity ramps")


def read_ramps_header(path: str) -> tuple[dict[str, str], dict[str, list[int]]]:
    """(metadata, {tensor name: shape}) without reading tensor data."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types on corruption
        raise E3ConfigError(f"cannot read ramps file {path}: {exc}") from exc
    return meta, shapes


def validate_ramps(path: str, exits, hidden_size: int, model_dir: str | None = None) -> dict[int, RampSpec]:
    """Check every ramp tensor's shape against the model (and, given
    `model_dir`, the base-model hash); returns per-exit specs."""
    meta, shapes = read_ramps_header(path)
    fmt = meta.get("format")
    if fmt != RAMPS_FORMAT:
        raise E3ConfigError(f"{path}: metadata 'format' is {fmt!r}, expected {RAMPS_FORMAT!r}")
    by_exit: dict[int, dict[str, list[int]]] = {}
    for name, shape in shapes.items():
        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "exits" or not parts[1].isdigit() or parts[2] not in _PARTS:
            raise E3ConfigError(f"{path}: unexpected tensor {name!r} (schema: exits.<e>.{{{','.join(_PARTS)}}})")
        by_exit.setdefault(int(parts[1]), {})[parts[2]] = shape
    specs: dict[int, RampSpec] = {}
    d = hidden_size
    for e in exits:
        t = by_exit.get(e)
        if not t:
            specs[e] = RampSpec(e, 0, False, False)
            continue
        adapter = [p for p in ("norm.weight", "down.weight", "up.weight") if p in t]
        if adapter and len(adapter) != 3:
            raise E3ConfigError(f"{path}: exit {e} has only {adapter} of norm/down/up")
        rank = t["down.weight"][0] if adapter else 0
        want = {}
        if adapter:
            want.update({"norm.weight": [d], "down.weight": [rank, d], "up.weight": [d, rank]})
        has_gate = "gate.weight" in t or "gate.bias" in t
        if has_gate:
            want.update({"gate.weight": [1, d], "gate.bias": [1]})
        for part, shape in want.items():
            got = t.get(part)
            if got != shape:
                raise E3ConfigError(
                    f"{path}: ramp tensor exits.{e}.{part} has shape {got}, "
                    f"expected {shape} for a model with hidden size {d}"
                )
        specs[e] = RampSpec(e, rank, bool(adapter), has_gate)
    if model_dir is not None:
        check_base_model(path, meta, model_dir)
    return specs


def require_gates(cfg, specs: dict[int, RampSpec], path: str) -> None:
    """Confidence `gate` needs a gate at every exit that can fire."""
    if cfg.confidence != "gate" or not cfg.exits_active:
        return
    missing = [e for e in cfg.exits if not (e in specs and specs[e].has_gate)]
    if missing:
        raise E3ConfigError(f"E3 confidence 'gate' needs gate tensors for exits {missing} in {path}")


def load_ramp_tensors(path: str, exits) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except Exception as exc:
        raise E3ConfigError(f"cannot read ramps file {path}: {exc}") from exc
    keep = {f"exits.{e}." for e in exits}
    return {k: v for k, v in tensors.items() if any(k.startswith(p) for p in keep)}


def save_ramps(path: str, tensors: dict[str, torch.Tensor], *, exits, base_model_hash: str,
               recipe: dict, data_hash: str, command: str | None = None) -> None:
    from safetensors.torch import save_file

    meta = {
        "format": RAMPS_FORMAT,
        "exits": json.dumps(sorted(exits)),
        "base_model_hash": base_model_hash,
        "recipe": json.dumps(recipe, sort_keys=True),
        "data_hash": data_hash,
    }
    if command:
        meta["command"] = command
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
    os.replace(tmp, path)


def rekey_ramps(path: str, old_hash: str, new_hash: str) -> bool:
    """Point a ramps file trained for base model `old_hash` at `new_hash`:
    the tensors and every other metadata field stay as they are. For a base
    model whose served weights did not change (`vllm_e3.prepare.rekey`
    checks that first). Returns False, writing nothing, if the file belongs
    to neither hash; True if it now names `new_hash`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    meta, _ = read_ramps_header(path)
    if meta.get("base_model_hash") == new_hash:
        return True
    if meta.get("base_model_hash") != old_hash:
        return False
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={**meta, "base_model_hash": new_hash})
    os.replace(tmp, path)
    return True


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm in fp32, cast back to x's dtype (matches HF and vLLM)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf.to(x.dtype) * weight) if weight.dtype == x.dtype else (xf * weight.float()).to(x.dtype)


class Ramp(torch.nn.Module):
    """One exit's adapter (+ optional gate). rank 0: identity, no parameters."""

    def __init__(self, hidden_size: int, rank: int, has_gate: bool, eps: float):
        super().__init__()
        self.rank, self.eps = rank, eps
        if rank > 0:
            self.norm_weight = torch.nn.Parameter(torch.ones(hidden_size), requires_grad=False)
            self.down = torch.nn.Parameter(torch.zeros(rank, hidden_size), requires_grad=False)
            self.up = torch.nn.Parameter(torch.zeros(hidden_size, rank), requires_grad=False)
        self.has_gate = has_gate
        if has_gate:
            self.gate_weight = torch.nn.Parameter(torch.zeros(1, hidden_size), requires_grad=False)
            self.gate_bias = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [n, d] residual stream after layer e-1
        if self.rank == 0:
            return x
        z = rms_norm(x, self.norm_weight, self.eps)
        return x + torch.nn.functional.linear(torch.nn.functional.linear(z, self.down), self.up)

    def param_items(self, e: int):
        """(artifact key, parameter) pairs, the artifact's names in one table."""
        names = {"norm_weight": "norm.weight", "down": "down.weight", "up": "up.weight",
                 "gate_weight": "gate.weight", "gate_bias": "gate.bias"}
        for attr, part in names.items():
            if hasattr(self, attr):
                yield ramp_key(e, part), getattr(self, attr)
