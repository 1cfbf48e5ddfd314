"""A plain PyTorch reference of the E3 exit semantics, for tests, calibration
and quality measurements (never imported by the serving path).

One request at a time, greedy, on the transformers model with its own
modules: the prompt runs the whole model; each decode token runs layers until
the first exit where it leaves (forced profile or confidence >= threshold),
its logits come from final_norm(ramp(x)) through the head, and the K/V of
every layer it skipped are computed from its pre-ramp state x through that
layer's input norm -> k/v projection -> RoPE ("KV fill"; `kv_fill=False`
leaves those layers' cache rows zero, as a missing fill would).
"""
from __future__ import annotations

import torch

from .exits import audit_mask, forced_exit_u
from .ramps import Ramp


class ReferenceE3:
    def __init__(self, model_dir: str, dtype=torch.float32, ramps: dict[int, Ramp] | None = None):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        self.ramps = ramps or {}
        self.cfg = self.model.config

    # ---- one layer's pieces -------------------------------------------
    def _kv(self, l: int, x_normed: torch.Tensor, pos: torch.Tensor):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        a = self.model.model.layers[l].self_attn
        t, hd = x_normed.shape[0], a.head_dim
        k = a.k_proj(x_normed).view(t, -1, hd).transpose(0, 1)[None]
        v = a.v_proj(x_normed).view(t, -1, hd).transpose(0, 1)[None]
        cos, sin = self.model.model.rotary_emb(x_normed[None], pos[None])
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
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
        (vllm_e3.exits.audit_mask) also run the layers they skipped, with
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
