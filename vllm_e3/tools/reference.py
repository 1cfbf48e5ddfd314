"""Plain PyTorch references of the E3 exit semantics, for tests, calibration
and quality measurements (never imported by the serving path).

`ReferenceE3`: one request at a time, greedy, on the transformers model with
its own modules: the prompt runs the whole model; each decode token runs layers
until the first exit where it leaves (forced profile or confidence >=
threshold), its logits come from final_norm(ramp(x)) through the head, and the
K/V of every layer it skipped are computed from its pre-ramp state x through
that layer's input norm -> k/v projection -> RoPE ("KV fill"; `kv_fill=False`
leaves those layers' cache rows zero, as a missing fill would).

`free_run` / `free_run_batched` (calibrate's free-running quality): the same
decode loop on transformers' own layers and cache, with trained ramps and any
confidence measure, one prompt at a time or a batch of them.
"""
from __future__ import annotations

import torch

from ..config import E3Config
from ..models.draws import audit_mask, forced_exit_u
from ..ramps import Ramp
from .data import FrozenHead, _tqdm
from .selection import confidence_of


class ReferenceE3:
    def __init__(self, model_dir: str, dtype=torch.float32, ramps: dict[int, Ramp] | None = None):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        self.ramps = ramps or {}
        self.cfg = self.model.config

    # ---- one layer's pieces -------------------------------------------
    def _kv(self, l: int, x_normed: torch.Tensor, pos: torch.Tensor):
        cos, sin = self.model.model.rotary_emb(x_normed[None], pos[None])
        k, v = layer_kv(self.model.model.layers[l].self_attn, x_normed[None], cos, sin)
        return k[0], v[0]                                   # [kvh, t, hd]

    def _layer(self, l: int, x: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

        layer = self.model.model.layers[l]
        a = layer.self_attn
        h = layer.input_layernorm(x)
        t, hd = h.shape[0], a.head_dim
        q = a.q_proj(h).view(t, -1, hd).transpose(0, 1)[None]
        cos, sin = self.model.model.rotary_emb(h[None], pos[None])
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        k, v = self._kv(l, h, pos)
        cache[l][0].append(k); cache[l][1].append(v)
        K = repeat_kv(torch.cat(cache[l][0], 1)[None], a.num_key_value_groups)
        V = repeat_kv(torch.cat(cache[l][1], 1)[None], a.num_key_value_groups)
        T = K.shape[2]
        scores = (q @ K.transpose(-1, -2)) * hd ** -0.5           # [1, h, t, T]
        if t > 1:
            causal = torch.ones(t, T, dtype=torch.bool).tril(T - t)
            scores = scores.masked_fill(~causal, float("-inf"))
        # (explicit softmax attention: torch's CPU SDPA costs ~8 ms a call here)
        o = scores.softmax(-1) @ V
        x = x + a.o_proj(o[0].transpose(0, 1).reshape(t, -1))
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def head_input(self, e: int, x: torch.Tensor) -> torch.Tensor:
        ramp = self.ramps.get(e)
        return self.model.model.norm(ramp(x) if ramp is not None else x)

    # ---- generation ---------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt: list[int], max_tokens: int, *, exits=(), force_exit=None,
                 thresholds=None, seed: int = 0, kv_fill: bool = True,
                 eos_token_id: int | None = None, audit_rate: float = 0.0,
                 shortlist: list[int] | None = None) -> tuple[list[int], list[int | None]]:
        """Greedy tokens and, per token, the exit it left at (None: full).
        With `audit_rate`, the exited tokens the online audit draws
        (vllm_e3.models.draws.audit_mask) also run the layers they skipped, with
        their own K/V for those layers while they do, and `self.audits` lists
        (exit, ramp top-1 == full top-1) for each. `shortlist`: thresholds
        apply to the max probability over those token ids' logits only
        (confidence shortlist@K)."""
        self.audits: list[tuple[int, bool]] = []
        L = self.cfg.num_hidden_layers
        force_exit = {int(k): v for k, v in (force_exit or {}).items()}
        thresholds = dict(zip(exits, thresholds)) if thresholds is not None else {}
        cache = [([], []) for _ in range(L)]
        pos = torch.arange(len(prompt))
        x = self.model.model.embed_tokens(torch.tensor(prompt))
        for l in range(L):
            x = self._layer(l, x, pos, cache)
        logits = self.model.lm_head(self.model.model.norm(x[-1:]))
        out, where = [int(logits.argmax(-1))], [None]  # noqa
        while len(out) < max_tokens and out[-1] != eos_token_id:
            p = len(prompt) + len(out) - 1
            tok = out[-1]
            pos = torch.tensor([p])
            x = self.model.model.embed_tokens(torch.tensor([tok]))
            left = None
            for l in range(L):
                if l in exits and l > 0:
                    if self._leaves(l, x, p, tok, force_exit, thresholds, seed, shortlist):
                        left = l
                        break
                x = self._layer(l, x, pos, cache)
            if left is None:
                logits = self.model.lm_head(self.model.model.norm(x))
            else:
                logits = self.model.lm_head(self.head_input(left, x))
                if audit_rate > 0.0 and bool(audit_mask(seed, left, audit_rate, pos, torch.tensor([tok]))[0]):
                    y = x
                    for l in range(left, L):
                        y = self._layer(l, y, pos, cache)
                    for l in range(left, L):             # the audit's own K/V rows out again
                        cache[l][0].pop(); cache[l][1].pop()
                    full = self.model.lm_head(self.model.model.norm(y))
                    self.audits.append((left, int(full.argmax(-1)) == int(logits.argmax(-1))))
                for l in range(left, L):
                    layer = self.model.model.layers[l]
                    k, v = self._kv(l, layer.input_layernorm(x), pos)
                    if not kv_fill:
                        k, v = torch.zeros_like(k), torch.zeros_like(v)
                    cache[l][0].append(k); cache[l][1].append(v)
            out.append(int(logits.argmax(-1)))
            where.append(left)
        return out, where

    def _leaves(self, e, x, p, tok, force_exit, thresholds, seed, shortlist=None) -> bool:
        if e in force_exit:
            return forced_exit_u(seed, e, p, tok) < force_exit[e]
        t = thresholds.get(e)
        if t is None:
            return False
        logits = self.model.lm_head(self.head_input(e, x)).float()
        if shortlist is not None:
            logits = logits[..., torch.tensor(shortlist)]
        return bool(logits.softmax(-1).max() >= t)


# ---- free-running quality (transformers layers and cache) -------------------------
@torch.no_grad()
def layer_kv(attn, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one KV fill of the references: K (with RoPE) and V of attention
    `attn` for input-normed states h [b, t, d]: [b, kv_heads, t, head_dim] each."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    b, t = h.shape[:2]
    k = attn.k_proj(h).view(b, t, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(h).view(b, t, -1, attn.head_dim).transpose(1, 2)
    return apply_rotary_pos_emb(k, k, cos, sin)[1], v


def _kv(layer, x: torch.Tensor, pe) -> tuple[torch.Tensor, torch.Tensor]:
    """`layer_kv` of decoder layer `layer` for pre-norm states x [b, 1, d]."""
    return layer_kv(layer.self_attn, layer.input_layernorm(x), *pe)


def kv_fill(model, x: torch.Tensor, pe, cache, layers) -> None:
    """K/V of `layers` for rows that left with pre-ramp state x [b, 1, d]:
    each layer's own input norm -> K/V projections -> RoPE on K -> cache."""
    for l in layers:
        cache.update(*_kv(model.model.layers[l], x, pe), l)


@torch.no_grad()
def free_run(model, head: FrozenHead, ramps: dict[int, Ramp], cfg: E3Config, prompt_ids: list[int],
             max_tokens: int, eos: set[int], shortlist: list[int] | None = None) -> tuple[list[int], list[int]]:
    """Greedy decode (batch 1, fp32) applying cfg's exits; returns (tokens, exit layer per token).
    The first token comes from the prefill and never exits (as in serving)."""
    from transformers.cache_utils import DynamicCache

    L = model.config.num_hidden_layers
    live = {e: t for e, t in zip(cfg.exits, cfg.thresholds) if t is not None}
    cache = DynamicCache(config=model.config)
    out = model.model(input_ids=torch.tensor([prompt_ids]), past_key_values=cache, use_cache=True)
    tok = int(model.lm_head(out.last_hidden_state[0, -1:]).argmax(-1))
    toks, where = [tok], [L]
    pos = len(prompt_ids)
    while len(toks) < max_tokens and tok not in eos:
        h = model.model.embed_tokens(torch.tensor([[tok]]))
        pids = torch.tensor([[pos]])
        pe = model.model.rotary_emb(h, position_ids=pids)
        left, hin = L, None
        for l, layer in enumerate(model.model.layers):
            h = layer(h, attention_mask=None, position_ids=pids, past_key_values=cache, use_cache=True,
                      position_embeddings=pe)
            if l + 1 in live:
                e = l + 1
                hin = head.head_in(ramps[e](h[0]))                       # [1, d]
                if float(confidence_of(cfg.confidence, hin, head, ramps[e], shortlist)) >= live[e]:
                    left = e
                    kv_fill(model, h, pe, cache, range(e, L))
                    break
        if left == L:
            hin = model.model.norm(h)[0]
        tok = int(head.logits(hin).argmax(-1))
        toks.append(tok)
        where.append(left)
        pos += 1
    return toks, where


@torch.no_grad()
def free_run_batched(model, head: FrozenHead, ramps: dict[int, Ramp], cfg: E3Config,
                     prompts: list[list[int]], max_tokens: int, eos: set[int],
                     pad_id: int = 0, shortlist: list[int] | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """`free_run` for a batch of prompts (left-padded). Every layer runs on
    every row; a row that left at exit e has the K/V it wrote in layers >= e
    replaced, at this step's cache slot, by the KV fill of its pre-ramp state,
    and its later hidden states are discarded -- the cache and the tokens are
    those of the per-row loop, at batch speed."""
    from transformers.cache_utils import DynamicCache

    L, b = model.config.num_hidden_layers, len(prompts)
    live = {e: t for e, t in zip(cfg.exits, cfg.thresholds) if t is not None}
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])           # [b, P]
    seen = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])     # [b, P]
    cache = DynamicCache(config=model.config)
    out = model.model(input_ids=ids, attention_mask=seen, position_ids=(seen.cumsum(1) - 1).clamp(min=0),
                      past_key_values=cache, use_cache=True)
    tok = model.lm_head(out.last_hidden_state[:, -1]).argmax(-1)                       # [b]
    toks, where = [tok], [torch.full((b,), L)]
    pos = seen.sum(1)                                                                  # [b] next position
    for _ in range(max_tokens - 1):
        seen = torch.cat([seen, torch.ones(b, 1, dtype=seen.dtype)], 1)
        mask = torch.zeros(b, 1, 1, seen.shape[1]).masked_fill(seen[:, None, None, :] == 0,
                                                               torch.finfo(torch.float32).min)
        h = model.model.embed_tokens(tok[:, None])                                     # [b, 1, d]
        pids = pos[:, None]
        pe = model.model.rotary_emb(h, position_ids=pids)
        left = torch.full((b,), L)                                                     # exit layer per row
        x_exit = torch.zeros_like(h)                                                   # pre-ramp state
        hin = torch.zeros(b, h.shape[-1])
        for l, layer in enumerate(model.model.layers):
            h = layer(h, attention_mask=mask, position_ids=pids, past_key_values=cache, use_cache=True,
                      position_embeddings=pe)
            gone = left <= l                                                           # left at e <= l
            if bool(gone.any()):
                k, v = _kv(layer, x_exit[gone], tuple(t[gone] for t in pe))
                cache.layers[l].keys[gone, :, -1:] = k
                cache.layers[l].values[gone, :, -1:] = v
            if l + 1 in live:
                e = l + 1
                cand = (left == L).nonzero().squeeze(1)
                hi = head.head_in(ramps[e](h[cand, 0]))                                # [m, d]
                conf = confidence_of(cfg.confidence, hi, head, ramps[e], shortlist)                  # [m]
                go = cand[conf >= live[e]]
                left[go], x_exit[go], hin[go] = e, h[go], hi[conf >= live[e]]
        stay = left == L
        hin[stay] = model.model.norm(h[stay, 0])
        tok = head.logits(hin).argmax(-1)
        toks.append(tok)
        where.append(left)
        pos = pos + 1
    T, W = torch.stack(toks, 1).tolist(), torch.stack(where, 1).tolist()
    outs, wheres = [], []
    for t, w in zip(T, W):
        n = next((i + 1 for i, x in enumerate(t) if x in eos), len(t))
        outs.append(t[:n])
        wheres.append(w[:n])
    return outs, wheres


@torch.no_grad()
def _loglik(model, prompt_ids: list[int], toks: list[int]) -> float:
    """Sum of the full model's log-probs of toks after prompt_ids."""
    ids = torch.tensor([prompt_ids + toks])
    lp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float(), -1)
    return float(lp.gather(1, torch.tensor(toks)[:, None]).sum())


def free_running_quality(model, head, ramps, cfgs: dict[str, E3Config], prompt_ids: list[list[int]],
                         max_tokens: int, eos: set[int], shortlist: list[int] | None = None,
                         progress: bool = False) -> dict:
    """Per config: fraction of tokens before the first divergence from the
    same loop without exits, full-model log-likelihood per token of the
    early-exit output vs the full model's own, and the observed exits.
    `shortlist`: the token ids a shortlist@K config's confidence reads."""
    L = model.config.num_hidden_layers
    off = E3Config(policy="full")
    refs, _ = free_run_batched(model, head, ramps, off, prompt_ids, max_tokens, eos)
    ll_ref = [_loglik(model, p, r) for p, r in zip(prompt_ids, refs)]
    out = {"prompts": len(prompt_ids), "max_tokens": max_tokens, "configs": {}}
    for name, cfg in _tqdm(cfgs.items(), desc="free-running", unit="config", total=len(cfgs),
                           disable=not progress):
        frac, lls, ntok, layers, exited = [], [], 0, 0, 0
        runs = zip(*free_run_batched(model, head, ramps, cfg, prompt_ids, max_tokens, eos,
                                     shortlist=shortlist))
        for p, ref, (toks, where) in zip(prompt_ids, refs, runs):
            same = next((i for i, (a, b) in enumerate(zip(toks, ref)) if a != b), min(len(toks), len(ref)))
            frac.append(same / max(len(ref), 1) if (same < len(ref) or len(toks) == len(ref)) else 1.0)
            lls.append(_loglik(model, p, toks))
            ntok += len(toks)
            layers += sum(where)
            exited += sum(1 for w in where if w < L)
        n_ref = sum(map(len, refs))
        out["configs"][name] = {
            "config": cfg.to_dict(),
            "tokens_before_first_divergence": sum(frac) / len(frac),
            "identical_outputs": sum(1 for f in frac if f >= 1.0),
            "loglik_per_token_e3": sum(lls) / max(ntok, 1),
            "loglik_per_token_full": sum(ll_ref) / max(n_ref, 1),
            "exit_fraction": exited / max(ntok, 1),
            "layers_skipped_fraction": 1.0 - layers / max(ntok * L, 1),
        }
    return out
