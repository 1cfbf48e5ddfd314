"""KV fill of exited tokens: per layer (kv_fill_layer) against all layers at
once (StackedKVFill), on vLLM's own RMSNorm and RoPE modules at the embedded
model's shapes (576 wide, 30 layers, 3 KV heads of 64), the cache write a
no-op recorder so that only the fill's own work is timed. One thread, as the
engine's worker runs. Exits 8/15/22 with the middle profile's shares of m
exited rows; min of --reps timings.

    python benchmarks/bench_kv_fill.py
"""
from __future__ import annotations

import argparse
import time
import types

import torch

from vllm_e3.models.kv_fill import FillGroup, StackedKVFill, kv_fill_layer

D, KV_HEADS, HD, L = 576, 3, 64, 30


class NoWrite:
    def do_kv_cache_update(self, attn, k, v, cache, slots):
        pass


def layers_and_weights():
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(HD, max_position=2048, is_neox_style=True)
        layers, kv_w = [], []
        for l in range(L):
            norm = RMSNorm(D, eps=1e-5)
            attn = types.SimpleNamespace(layer_name=f"layer{l}", num_kv_heads=KV_HEADS,
                                         head_size=HD, kv_cache=None, impl=NoWrite())
            layers.append(types.SimpleNamespace(input_layernorm=norm, self_attn=types.SimpleNamespace(
                kv_size=KV_HEADS * HD, head_dim=HD, num_kv_heads=KV_HEADS, rotary_emb=rope,
                attn=attn)))
            kv_w.append((torch.randn(2 * KV_HEADS * HD, D) / D ** 0.5, None))
    return layers, kv_w


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="4,16,48,96")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)
    layers, kv_w = layers_and_weights()
    stack = StackedKVFill.build(layers, kv_w, 8)
    slots = {f"layer{l}": torch.arange(4096) for l in range(L)}
    print(f"{'rows exited':>11s} {'row-layers':>10s} {'per layer ms':>12s} {'stacked ms':>10s} "
          f"{'us/row-layer':>14s} {'ratio':>6s}")
    for m in (int(x) for x in args.rows.split(",")):
        share = {8: 0.3, 15: 0.25, 22: 0.2}
        tot = sum(share.values())
        counts = {e: max(1, round(m * s / tot)) for e, s in share.items()}
        groups, r0 = [], 0
        for e, n in counts.items():
            groups.append(FillGroup(e, torch.arange(r0, r0 + n), torch.randn(n, D), torch.arange(n) + 100))
            r0 += n
        row_layers = sum(g.count * (L - g.start) for g in groups)

        def per_layer():
            for l in range(8, L):
                live = [g for g in groups if g.start <= l]
                rows = torch.cat([g.rows for g in live])
                kv_fill_layer(layers[l], torch.cat([g.x for g in live]),
                              torch.cat([g.positions for g in live]), slots[f"layer{l}"][rows], kv_w[l])

        def stacked():
            stack.fill(slots, groups)

        best = {}
        for name, fn in (("per", per_layer), ("stack", stacked)):
            fn()
            ts = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            best[name] = min(ts)
        print(f"{r0:11d} {row_layers:10d} {1e3 * best['per']:12.3f} {1e3 * best['stack']:10.3f} "
              f"{1e6 * best['per'] / row_layers:6.1f} -> {1e6 * best['stack'] / row_layers:5.1f} "
              f"{best['per'] / best['stack']:6.2f}")


if __name__ == "__main__":
    main()
