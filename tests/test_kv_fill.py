"""The stacked KV fill (every skipped layer at once, vllm_e3.models.kv_fill.StackedKVFill)
writes what the per-layer fill (kv_fill_layer: the layer's own norm, K/V
projection, RoPE, cache write) writes, on vLLM's own RMSNorm and RoPE
modules; and it is refused where a layer needs the per-layer path. The
engines of test_token_exits / test_compiled_stages compare the tokens it
leads to with the plain-PyTorch reference."""
import types

import pytest
import torch

from vllm_e3.models.kv_fill import FillGroup, StackedKVFill, kv_fill_layer

D, HEADS, KV_HEADS, HD, L = 64, 4, 2, 16, 6


class Recorder:
    """A backend whose cache write records (layer, slot) -> (k, v)."""

    def __init__(self):
        self.written = {}

    def do_kv_cache_update(self, attn, k, v, cache, slots):
        # rows may be strided views (vLLM's CPU write takes them); heads and dims are dense
        assert k.stride(-1) == v.stride(-1) == 1 and k.stride(-2) == v.stride(-2) == HD
        for i, s in enumerate(slots.tolist()):
            self.written[(attn.layer_name, s)] = (k[i].clone(), v[i].clone())


def _layers(rec, seed=0, bias=False):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.model_executor.layers.rotary_embedding import get_rope

    g = torch.Generator().manual_seed(seed)
    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(HD, max_position=512, is_neox_style=True)
        layers, kv_weights = [], []
        for l in range(L):
            norm = RMSNorm(D, eps=1e-5)
            norm.weight.data = 1 + 0.1 * torch.randn(D, generator=g)
            attn = types.SimpleNamespace(layer_name=f"layer{l}", num_kv_heads=KV_HEADS, head_size=HD,
                                         kv_cache=None, impl=rec)
            self_attn = types.SimpleNamespace(kv_size=KV_HEADS * HD, q_size=HEADS * HD, head_dim=HD,
                                              num_kv_heads=KV_HEADS, rotary_emb=rope, attn=attn)
            layers.append(types.SimpleNamespace(input_layernorm=norm, self_attn=self_attn))
            w = torch.randn(2 * KV_HEADS * HD, D, generator=g) / D ** 0.5
            kv_weights.append((w, torch.randn(2 * KV_HEADS * HD, generator=g) if bias else None))
    return layers, kv_weights


@pytest.mark.parametrize("bias", [False, True])
def test_stacked_fill_writes_what_the_per_layer_fill_writes(bias):
    rec_ref, rec = Recorder(), Recorder()
    layers, kv_w = _layers(rec_ref, bias=bias)
    # three groups leaving at exits 2, 3 and 5 of 6 layers, rows out of order
    g = torch.Generator().manual_seed(1)
    groups = [FillGroup(e, torch.tensor(rows), torch.randn(len(rows), D, generator=g),
                        torch.tensor([7 + 3 * r for r in rows]))
              for e, rows in ((2, [4, 1]), (3, [0]), (5, [2, 5, 3]))]
    slot_mapping = {f"layer{l}": torch.arange(8) * 10 + l for l in range(L)}
    for l in range(2, L):                          # the per-layer path, as the loop runs it
        live = [gr for gr in groups if gr.start <= l]
        rows = torch.cat([gr.rows for gr in live])
        kv_fill_layer(layers[l], torch.cat([gr.x for gr in live]),
                      torch.cat([gr.positions for gr in live]), slot_mapping[f"layer{l}"][rows], kv_w[l])
    stack = StackedKVFill.build(layers, kv_w, 2)
    assert stack is not None
    for layer in layers:
        layer.self_attn.attn.impl = rec
    written = stack.fill(slot_mapping, groups)
    assert written == sum(gr.count * (L - gr.start) for gr in groups) == len(rec_ref.written)
    assert rec.written.keys() == rec_ref.written.keys()
    for key, (k, v) in rec_ref.written.items():
        torch.testing.assert_close(rec.written[key][0], k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rec.written[key][1], v, rtol=1e-5, atol=1e-5)


def test_stacked_fill_refused_where_a_layer_needs_its_own_path():
    layers, kv_w = _layers(Recorder())
    assert StackedKVFill.build(layers, [None] + kv_w[1:], 0) is None      # quantized layer 0
    assert StackedKVFill.build(layers, [None] + kv_w[1:], 1) is not None  # not among the filled
    layers[4].self_attn.k_norm = object()                                  # Qwen3's K norm
    assert StackedKVFill.build(layers, kv_w, 1) is None
