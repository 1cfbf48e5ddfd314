"""Shared pieces of the end-to-end benchmarks: machine description, synthetic
prompts, truncated model copies, interleaved timing."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time

import torch


def machine() -> str:
    cpu = "unknown cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), {platform.python_version()}, torch {torch.__version__}"


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # stay clear of special tokens at the bottom of the vocabulary
    return torch.randint(100, vocab, (n, length), generator=g).tolist()


def truncated_copy(model_dir: str, num_layers: int, out_root: str) -> str:
    """A copy of the model with its first `num_layers` decoder layers (for
    measuring the per-layer cost of vanilla vLLM)."""
    from safetensors.torch import load_file, save_file

    out = os.path.join(out_root, f"trunc{num_layers}")
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    os.makedirs(out, exist_ok=True)
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    cfg["num_hidden_layers"] = num_layers
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
    keep = {}
    for k, v in load_file(os.path.join(model_dir, "model.safetensors")).items():
        if k.startswith("model.layers."):
            if int(k.split(".")[2]) >= num_layers:
                continue
        keep[k] = v
    save_file(keep, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    for name in os.listdir(model_dir):
        if name.startswith("tokenizer") or name in ("generation_config.json", "chat_template.jinja"):
            src = os.path.join(model_dir, name)
            if not os.path.exists(os.path.join(out, name)):
                os.symlink(src, os.path.join(out, name))
    return out


def median(xs):
    return statistics.median(xs)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def interleaved_rounds(engines: dict, prompts, sp, runs: int, stats=None, vanilla=("vanilla",)):
    """Time `engines` (name -> LLM) in `runs` interleaved rounds of one
    closed batch each. E3 engines (every name but those in `vanilla`) have their exit
    counters reset before each round and read after it with `stats(llm)`.
    Returns per name: the round times (s), the last round's token ids, the
    last round's counters."""
    times = {c: [] for c in engines}
    outs, counters = {}, {}
    for r in range(runs):
        for c, llm in engines.items():
            e3 = c not in vanilla
            if e3:
                llm.collective_rpc("e3_reset_exit_stats")
            t0 = time.perf_counter()
            got = llm.generate(prompts, sp, use_tqdm=False)
            times[c].append(time.perf_counter() - t0)
            outs[c] = [list(o.outputs[0].token_ids) for o in got]
            if e3 and stats is not None:
                counters[c] = stats(llm)
            print(f"round {r} {c:18s} {times[c][-1]:7.2f}s", flush=True)
    return times, outs, counters
