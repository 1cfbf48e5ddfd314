"""`vllm-e3 train`: ramps (exit heads) for a model by self-distillation.

On the corpus and captured states of `vllm_e3.tools.data` (the model's own
greedy continuations of the built-in train split or the user's prompts):

1. ramps    per exit, the rank-r `Ramp` adapter y = x + up(down(rms_norm(x) *
            norm_w)), trained by KL(final || ramp) through the model's frozen
            final norm and tied LM head (full-vocabulary softmax for the ramp).
2. gate     per exit, logistic regression on head_in = final_norm(y) predicting
            "ramp top-1 == the full model's top-1" (the token vanilla vLLM
            served; CALM's classifier confidence), folded into one [1, d]
            weight and a bias.
3. artifact `<out>/ramps.safetensors` via `save_ramps` (bf16), with the base
            model hash, exit points, corpus hash and recipe as metadata.
"""
from __future__ import annotations

import gc
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..config import RAMPS_FILENAME, E3ConfigError, e3_dir
from ..files import write_json
from ..ramps import Ramp, model_hash, ramp_key, save_ramps, validate_ramps
from .data import (TEXT_SOURCE, TOP_K, Captured, FrozenHead, _log, _sha, _tqdm, build_corpus, builtin_prompts,
                   captured_cached, chat_token_ids, heldout_prompts, humaneval_reserved, load_base, ramp_eval,
                   text_corpus, topk_kl, training_prompts)
from .selection import auc


# Default candidate exits as fractions of the depth: 16, 20, 24, 27 of 30 layers.
# Measured on SmolLM2-135M (benchmarks/RESULTS.md, "Ramps and calibration"): exits before ~half
# depth agree with the final top-1 on < 15% of tokens even with a trained ramp.
DEFAULT_EXIT_FRACTIONS = (0.53, 0.67, 0.8, 0.9)


def new_ramp(d: int, rank: int, eps: float, seed: int) -> Ramp:
    """A trainable adapter that starts as the identity (up = 0, LoRA-style)."""
    ramp = Ramp(d, rank, has_gate=False, eps=eps)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ramp.down.copy_(torch.randn(rank, d, generator=g) / math.sqrt(d))
    for p in ramp.parameters():
        p.requires_grad_(True)
    return ramp


def logit_metric(head: FrozenHead) -> torch.Tensor:
    """G [d, d] with  d^T G d = mean_v (centered logit difference)^2  for a
    head-input difference d: G = (W^T W - V wbar wbar^T) / V. Softmax ignores a
    shift of all logits, hence the centring. One [d, d] matrix stands in for
    the [V, d] head, so a step of phase 1 costs O(B d^2), not O(B d V)."""
    W = head.weight
    V = W.shape[0]
    wbar = W.mean(0)
    return (W.T @ W - V * torch.outer(wbar, wbar)) / V


def _schedule(opt, steps: int, warmup: int = 10):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))


def train_ramp(x: torch.Tensor, final: torch.Tensor, top_lp: torch.Tensor, top_ids: torch.Tensor,
               head: FrozenHead, *, rank: int, mse_steps: int, steps: int, batch: int, lr: float,
               seed: int, desc: str = "ramp", progress: bool = True) -> tuple[Ramp, dict[str, list[float]]]:
    """x [N, d] exit states, final [N, d] last-layer states (bf16 ok) -> a trained Ramp.

    Phase 1 (`mse_steps`, batch 4x): regress the ramp's head input onto the
    model's own final head input in the centred-logit metric `logit_metric`
    (full vocabulary, exact, cheap) -- a fast, well-conditioned start.
    Phase 2 (`steps`): KL(final || ramp) through the full-vocabulary softmax,
    which puts the weight on the tokens that carry probability.
    Returns (ramp, {"mse": losses, "kl": losses})."""
    torch.manual_seed(seed)
    ramp = new_ramp(x.shape[1], rank, head.eps, seed)
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    hist: dict[str, list[float]] = {"mse": [], "kl": []}
    if mse_steps:
        G = logit_metric(head)
        opt = torch.optim.AdamW(ramp.parameters(), lr=lr, weight_decay=0.0)
        sched = _schedule(opt, mse_steps, warmup=20)
        for _ in _tqdm(range(mse_steps), desc=f"{desc} mse", disable=not progress, leave=False):
            idx = torch.randint(0, n, (4 * batch,), generator=g)
            dlt = head.head_in(ramp(x[idx].float())) - head.head_in(final[idx].float())  # [B, d]
            loss = ((dlt @ G) * dlt).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            hist["mse"].append(loss.item())
    opt = torch.optim.AdamW(ramp.parameters(), lr=lr, weight_decay=0.0)
    sched = _schedule(opt, steps)
    bar = _tqdm(range(steps), desc=f"{desc} kl", disable=not progress, leave=False)
    for _ in bar:
        idx = torch.randint(0, n, (batch,), generator=g)
        logq = torch.log_softmax(head.logits(head.head_in(ramp(x[idx].float()))), dim=-1)
        loss = topk_kl(top_lp[idx], top_ids[idx], logq)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        hist["kl"].append(loss.item())
        bar.set_postfix(kl=f"{hist['kl'][-1]:.3f}")
    for p in ramp.parameters():
        p.requires_grad_(False)
    return ramp, hist


def fit_gate(head_in: torch.Tensor, label: torch.Tensor, *, l2: float = 1e-2,
             iters: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression of label [N] (1 = ramp top-1 is the final top-1) on
    head_in [N, d]; standardised for conditioning, folded back so the gate is
    sigmoid(head_in @ w.T + b) on the raw head input. Returns w [1, d], b [1]."""
    x = head_in.float()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    y = label.float()
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    with torch.no_grad():
        pbar = y.mean().clamp(1e-4, 1 - 1e-4)
        b.fill_(float(torch.log(pbar / (1 - pbar))))
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        w_raw = w / sd
        b_raw = b - (w_raw * mu).sum()
    return w_raw.detach().reshape(1, -1), b_raw.detach().reshape(1)


def gate_scores(head_in: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(head_in.float() @ w.float().T + b.float()).squeeze(1)  # [N]


def default_exits(num_layers: int) -> list[int]:
    return sorted({min(max(1, math.floor(f * num_layers + 0.5)), num_layers - 1)
                   for f in DEFAULT_EXIT_FRACTIONS})


@dataclass
class Recipe:
    exits: list[int] = field(default_factory=list)   # empty: default_exits(L)
    rank: int = 64
    max_tokens: int = 64
    mse_steps: int = 600
    steps: int = 60
    batch: int = 128
    lr: float = 3e-2
    seed: int = 0
    top_k: int = TOP_K
    prompts: str = "builtin:train"
    num_prompts: int = 0
    valid_fraction: float = 0.1
    gate_rows: int = 2048
    engine_dtype: str = "float32"
    # teacher-forced text windows (vllm_e3.tools.data.text_corpus) added to the
    # training rows; 0: the model's own outputs only
    text_windows: int = 0
    text_tokens: int = 96


def _split_rows(c: Captured, valid_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean row masks (train, valid) split by whole sequences."""
    nseq = int(c.seq.max()) + 1 if c.num_rows else 0
    g = torch.Generator().manual_seed(seed + 1)
    valid_seq = torch.randperm(nseq, generator=g)[:max(1, int(round(nseq * valid_fraction)))]
    valid = torch.isin(c.seq, valid_seq.to(c.seq.dtype))
    return ~valid, valid


def train(model_dir: str, recipe: Recipe, *, out_dir: str | None = None, prompts: list[str] | None = None,
          prompt_ids: list[list[int]] | None = None, cache_dir: str | None = None, generate=None,
          progress: bool = True, command: str | None = None) -> dict:
    """Run the whole pipeline; returns the training report (also written to
    <out>/train_report.json). `prompt_ids` (already chat-templated token ids)
    bypasses the tokenizer; `generate(model_dir, prompt_ids, max_tokens)`
    replaces vLLM as the corpus generator (tests); `command`, the command line
    that ran it, goes into the artifact's metadata and the report."""
    t_start = time.time()
    out_dir = out_dir or e3_dir(model_dir)
    model = load_base(model_dir)
    L, d = model.config.num_hidden_layers, model.config.hidden_size
    exits = recipe.exits = sorted(set(recipe.exits)) or default_exits(L)
    bad = [e for e in exits if not 1 <= e <= L - 1]
    if bad:
        raise E3ConfigError(f"exit points {bad} out of range: the model has {L} layers, so exits lie in [1, {L - 1}]")
    if prompt_ids is None:
        from transformers import AutoTokenizer

        prompt_ids = chat_token_ids(AutoTokenizer.from_pretrained(model_dir),
                                    prompts if prompts is not None else builtin_prompts("train"))
    recipe.num_prompts = len(prompt_ids)
    base_hash = model_hash(model_dir)
    corpus = build_corpus(model_dir, prompt_ids, recipe.max_tokens, base_hash=base_hash,
                          dtype=recipe.engine_dtype, cache_dir=cache_dir, generate=generate)
    data_hash = corpus.data_hash()
    c = captured_cached(model, base_hash, corpus, exits, cache_dir=cache_dir, progress=progress)
    text = None
    if recipe.text_windows:
        from transformers import AutoTokenizer

        tcorpus, text = text_corpus(AutoTokenizer.from_pretrained(model_dir), recipe.text_windows,
                                    recipe.text_tokens, heldout_prompts(100, True) + humaneval_reserved(),
                                    seed=recipe.seed)
        ct = captured_cached(model, base_hash, tcorpus, exits, cache_dir=cache_dir, progress=progress)
        data_hash = _sha({"greedy": data_hash, "text": tcorpus.data_hash()})
        text["rows"] = ct.num_rows
        _log(f"train: {ct.num_rows} teacher-forced rows from {text['windows']} windows of {TEXT_SOURCE}")
    head = FrozenHead.of(model)
    del model
    gc.collect()

    # validation rows are the model's own outputs only, so the figures compare across recipes
    tr, va = _split_rows(c, recipe.valid_fraction, recipe.seed)
    ctr, cva = c.rows(tr), c.rows(va)
    if text is not None:
        ctr = ctr.cat(ct)
    # "The full model's top-1" is the token vanilla vLLM served; in bf16 the fp32
    # teacher's argmax differs from it on ~1-2% of rows (near-ties).
    final_tr, final_va = ctr.served, cva.served
    tensors: dict[str, torch.Tensor] = {}
    report = {"model_dir": os.path.abspath(model_dir), "rows_train": ctr.num_rows, "rows_valid": int(va.sum()),
              "text_corpus": text,
              "served_vs_fp32_top1": float((c.served == c.top_ids[:, 0]).float().mean()), "exits": {}}
    _log(f"train: {report['rows_train']} rows, {report['rows_valid']} validation rows; "
         f"fp32 top-1 = vLLM ({recipe.engine_dtype}) token on {100 * report['served_vs_fp32_top1']:.1f}% of rows")
    # one bar over the exits (each exit's own bars show its phases): its ETA is the whole training's
    for e in _tqdm(exits, desc="train exits", unit="exit", disable=not progress):
        t0 = time.time()
        ident = ramp_eval(None, cva.states[e], head, cva.top_lp, cva.top_ids)
        ramp, hist = train_ramp(ctr.states[e], ctr.final, ctr.top_lp, ctr.top_ids, head, rank=recipe.rank,
                                mse_steps=recipe.mse_steps, steps=recipe.steps, batch=recipe.batch,
                                lr=recipe.lr, seed=recipe.seed + e, desc=f"exit {e}", progress=progress)
        losses = hist["kl"] or [float("nan")]
        # the gate's labels need the ramp's full-vocabulary argmax: a bounded subset suffices
        sub = torch.randperm(ctr.num_rows, generator=torch.Generator().manual_seed(e))[:recipe.gate_rows]
        ev_tr = ramp_eval(ramp, ctr.states[e][sub], head)
        w, b = fit_gate(ev_tr["head_in"], ev_tr["argmax"] == final_tr[sub])
        ev_va = ramp_eval(ramp, cva.states[e], head, cva.top_lp, cva.top_ids)
        agree_va = ev_va["argmax"] == final_va
        gate_va = gate_scores(ev_va["head_in"], w, b)
        r = {
            "kl_identity": float(ident["kl"].mean()), "kl_ramp": float(ev_va["kl"].mean()),
            "agree_identity": float((ident["argmax"] == final_va).float().mean()),
            "agree_ramp": float(agree_va.float().mean()),
            "agree_ramp_train": float((ev_tr["argmax"] == final_tr[sub]).float().mean()),
            "gate_auc": auc(gate_va, agree_va), "max_prob_auc": auc(ev_va["max_prob"], agree_va),
            "loss_first": float(sum(losses[:10]) / max(1, len(losses[:10]))),
            "loss_last": float(sum(losses[-10:]) / max(1, len(losses[-10:]))),
            "seconds": round(time.time() - t0, 1),
        }
        report["exits"][str(e)] = r
        _log(f"exit {e:2d}: valid agreement {100 * r['agree_identity']:.1f}% (identity) -> "
             f"{100 * r['agree_ramp']:.1f}% (ramp); KL {r['kl_identity']:.2f} -> {r['kl_ramp']:.2f}; "
             f"AUC gate {r['gate_auc']:.3f} max_prob {r['max_prob_auc']:.3f}; {r['seconds']:.0f}s")
        for key, val in ramp.param_items(e):
            tensors[key] = val.detach().to(torch.bfloat16)
        tensors[ramp_key(e, "gate.weight")] = w.to(torch.bfloat16)
        tensors[ramp_key(e, "gate.bias")] = b.to(torch.bfloat16)
    path = os.path.join(out_dir, RAMPS_FILENAME)
    save_ramps(path, tensors, exits=exits, base_model_hash=base_hash, recipe=asdict(recipe), data_hash=data_hash,
               command=command)
    validate_ramps(path, exits, d)
    report["ramps"] = os.path.abspath(path)
    report["bytes"] = os.path.getsize(path)
    report["seconds"] = round(time.time() - t_start, 1)
    _log(f"wrote {path} ({report['bytes'] / 1e6:.2f} MB) in {report['seconds']:.0f}s")
    write_json(os.path.join(out_dir, "train_report.json"),
               {"command": command, "recipe": asdict(recipe), "data_hash": data_hash,
                "base_model_hash": base_hash, **report})
    return report


def from_args(args) -> dict:
    """`vllm-e3 train`'s arguments (vllm_e3/cli.py) -> `train`'s report."""
    recipe = Recipe(exits=args.exits, rank=args.rank, max_tokens=args.max_tokens, mse_steps=args.mse_steps, steps=args.steps,
                    batch=args.batch, lr=args.lr, seed=args.seed, engine_dtype=args.engine_dtype,
                    text_windows=args.text_windows, text_tokens=args.text_tokens,
                    prompts=os.path.basename(args.prompts) if args.prompts else "builtin:train")
    return train(args.model_dir, recipe, out_dir=args.out, cache_dir=args.cache_dir,
                 prompts=training_prompts(args.prompts, args.max_prompts), progress=not args.no_progress,
                 command=getattr(args, "command", None))


def run(args) -> int:
    torch.set_num_threads(args.threads)
    from_args(args)
    return 0
