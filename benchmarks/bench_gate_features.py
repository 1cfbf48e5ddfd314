"""Exits that pay: a gate on richer features than the head input, measured by
AUC on held-out rows (offline, no engine).

Per decode row and exit e, with the shipped ramps:

    shortlist   p1, p2 and entropy of the ramp's softmax over the K = 1024 head rows
                the model served most on the training corpus (the features
                shortlist@1024 reads anyway), and its top-1 logit
    saturation  1 - cos(h_e, h_prev) and ||h_e - h_prev|| / ||h_e|| between the
                residual stream here and at the previous exit (CALM's "state
                propagation" signal; Schuster et al. 2022); 0 at the first exit
    gate        the shipped gate's logit (a linear read of the head input)

Labels: ramp top-1 (full vocabulary) == the token vanilla vLLM served. Fitted on
the training corpus's captured rows (the ramps' own training data), scored on
the held-out rows calibrate uses (HumanEval 0-99 + the built-in held-out split).
Two models per exit: logistic regression and a 1-hidden-layer MLP (32 units).

    python benchmarks/bench_gate_features.py      # after `make ramps` (its caches)
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
K = 1024


def features(c, ramps, head, order, exits):
    """{exit: ([N, F] features, [N] labels, {"max_prob", "shortlist", "gate": [N] scores})}."""
    from vllm_e3.tools.selection import confidence_of

    idx = order[:K]
    Wk = head.weight[idx]
    out, prev = {}, None
    for e in exits:
        h = c.states[e].float()
        hin = head.head_in(ramps[e](h))
        z = hin @ Wk.T
        lp = torch.log_softmax(z, -1)
        p = lp.exp()
        top = p.topk(2, -1).values
        ent = -(p * lp).sum(-1)
        full = head.logits(hin)
        agree = full.argmax(-1) == c.served
        gate_logit = (hin @ ramps[e].gate_weight.T + ramps[e].gate_bias).squeeze(1)
        if prev is None:
            cos_gap, rel = torch.zeros(len(h)), torch.zeros(len(h))
        else:
            cos_gap = 1 - F.cosine_similarity(h, prev, dim=-1)
            rel = (h - prev).norm(dim=-1) / h.norm(dim=-1).clamp_min(1e-6)
        x = torch.stack([top[:, 0], top[:, 1], ent, z.max(-1).values, cos_gap, rel, gate_logit], 1)
        base = {"max_prob": confidence_of("max_prob", hin, head, ramps[e]),
                f"shortlist@{K}": top[:, 0], "gate": torch.sigmoid(gate_logit)}
        out[e] = (x, agree, base)
        prev = h
    return out


def fit(x, y, hidden: int = 0, steps: int = 300, seed: int = 0):
    """Logistic regression (hidden = 0) or an MLP, on standardised features."""
    torch.manual_seed(seed)
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    net = (torch.nn.Linear(x.shape[1], 1) if not hidden else
           torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4)
    z, t = (x - mu) / sd, y.float()
    for _ in range(steps):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(net(z).squeeze(1), t).backward()
        opt.step()
    return lambda q: torch.sigmoid(net((q - mu) / sd).squeeze(1)).detach()


@torch.no_grad()
def _score(c, ramps, head, order, exits):
    return features(c, ramps, head, order, exits)


def main() -> None:
    sys.path.insert(0, HERE)
    from transformers import AutoTokenizer

    from common import machine
    from vllm_e3.prepare import prepare
    from vllm_e3.ramps import model_hash
    from vllm_e3.tools.calibrate import load_ramps
    from vllm_e3.tools.data import (FrozenHead, build_corpus, builtin_prompts, captured_cached, chat_token_ids,
                                    heldout_prompts, load_base)
    from vllm_e3.tools.selection import auc, shortlist_from

    torch.set_num_threads(2)
    model_dir = prepare(deploy=False)
    art = os.path.join(os.path.dirname(HERE), "artifacts", "smollm2-135m", "e3", "ramps.safetensors")
    model = load_base(model_dir)
    ramps, meta = load_ramps(art, model.config.hidden_size, model.config.rms_norm_eps)
    exits = sorted(ramps)
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = model_hash(model_dir)
    train_c = build_corpus(model_dir, chat_token_ids(tok, builtin_prompts("train")), 64, base_hash=base)
    held_c = build_corpus(model_dir, chat_token_ids(tok, heldout_prompts(100, True)), 64, base_hash=base)
    ctr = captured_cached(model, base, train_c, exits)
    cho = captured_cached(model, base, held_c, exits)
    head = FrozenHead.of(model)
    order = shortlist_from(train_c.gen_ids, head.weight.shape[0], K)
    ftr = _score(ctr, ramps, head, order, exits)
    fho = _score(cho, ramps, head, order, exits)
    rows = []
    print(f"machine: {machine()}\nheld-out rows {cho.num_rows}, training rows {ctr.num_rows}; AUC of "
          f"'ramp top-1 = served token' per exit")
    for e in exits:
        (xt, yt, _), (xh, yh, bh) = ftr[e], fho[e]
        r = {"exit": e, **{m: auc(s, yh) for m, s in bh.items()},
             "logistic": auc(fit(xt, yt)(xh), yh), "mlp32": auc(fit(xt, yt, hidden=32)(xh), yh)}
        rows.append(r)
        print("  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    out = os.path.join(HERE, "results", "gate_features.json")
    json.dump({"machine": machine(), "K": K, "rows_heldout": cho.num_rows, "rows_train": ctr.num_rows,
               "ramps": meta.get("data_hash"), "rows": rows}, open(out, "w"), indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
