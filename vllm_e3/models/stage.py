"""Stages as compile units: the decoder layers between two consecutive exit
points and the exit decision at their end, compiled by vLLM's own
`@support_torch_compile` with a dynamic token count.

A deciding stage [a, e) runs its layers, then, inside the same graph, exit
`e`'s head (vllm_e3.models.heads: ramp, norm, confidence, comparison with the
per-row thresholds) and a stable partition of its rows, and returns fixed
shapes in the partition's order -- the rows that continue first, in their
order, then the rows that leave -- with a 0-d count of those that continue:

    positions [m], hidden [m, d], residual [m, d], rows [m], thr [m, E],
    head_in [m, d], count []

As vLLM's rejection sampler does, the host reads the count afterwards (one
`int()` per boundary, the stage loop's only host read there); the next stage
runs on views `[:count]` of these outputs (no copy), and the rows `[count:]`
hand their head input to the LM head and their pre-ramp state to the KV fill.
The last stage on the last pipeline rank ends with the model's final norm and
returns the head input of the rows that ran to the end; a stage that ends at
a pipeline rank's boundary returns (hidden, residual). The idea is vLLM's Gemma3n/Gemma4 (`gemma3n.py` self/cross decoder,
`gemma4.py`): several compiled modules over slices of one `self.layers`, the
later ones run on fewer tokens.

Soundness, from vLLM 0.32's `compilation/decorators.py` and `wrapper.py`:
- One compiled function per instance, but the AOT artifact path (on by
  default with torch >= 2.10, CPU included) hashes the vLLM config with the
  qualname and first line of `forward` -- not the model tag, and not the
  model directory's `e3/config.json`. Two stages with one `forward` would
  load each other's graph, whose attention layer names are baked in as
  constants: stage 2 would read and write stage 1's KV cache. So each stage
  gets its own class whose qualname names everything its graph bakes in:
  the layer range, its end (decide / final / pass), and for a deciding stage
  the head's measure (`forced`, `max_prob`, `margin`, `gate`,
  `shortlist1024`) and ramp kind (`r64g`: rank 64 with a gate), e.g.
  `E3Stage_0_16_decide_shortlist1024_r64g.forward`. A changed measure or
  ramp compiles anew instead of loading another configuration's graph.
- Each stage is built under its own `set_model_tag`, which keys VLLM_COMPILE's
  cache directories (GPU) and names the stage in the compile logs.
- Guards are dropped: nothing read at trace time may depend on the step. The
  layers read their attention metadata and slot mapping through vLLM's opaque
  attention ops, which look the forward context up at run time, so the stage
  loop's restriction of `fc.attn_metadata` between stage calls is honoured.
- The first call marks the token dimension dynamic and must have >= 2 rows
  (backed shapes specialise 0 and 1); later calls may have 1, never 0. The
  model's no-metadata path (profile/warm-up) runs every stage on all rows.
- `residual` is None on every call of the first stage and a tensor on every
  call of the others, as the decorator requires of optional arguments.
- Every tensor argument's dim 0 is the stage's row count, one symbol: the
  gather that compacts the rows happens at the end of the previous graph, so
  no second dynamic size enters a graph.
"""
from __future__ import annotations

import torch
from torch import nn

from vllm.compilation.backends import set_model_tag
from vllm.compilation.decorators import support_torch_compile

# every tensor argument's dim 0 is the stage's row count, one symbol for all
_DYNAMIC = {"positions": {0: "b"}, "hidden_states": {0: "b"}, "residual": {0: "b"}, "rows": {0: "b"},
            "thr": {0: "b"}}

DECIDE, FINAL, PASS = "decide", "final", "pass"


class E3StageBase(nn.Module):
    """Decoder layers [start, end) of the backbone and what ends them
    (`kind`: a decision by `head`, the final norm `norm`, or nothing);
    `forward` is supplied per class by `stage_class`. The layers are the
    backbone's own modules (shared, not copied): weights are loaded and
    post-processed once, through `model.layers`."""

    def __init__(self, *, vllm_config, layers: list[nn.Module], start: int, end: int, kind: str,
                 head=None, norm=None, prefix: str = ""):
        super().__init__()
        assert len(layers) == end - start > 0
        assert (kind == DECIDE) == (head is not None) and (kind == FINAL) == (norm is not None)
        self.start, self.end, self.kind = start, end, kind
        self.layers = nn.ModuleList(layers)
        self.head = head
        self.final_norm = norm                 # the model's own module (shared)

    def run(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
            rows: torch.Tensor, thr: torch.Tensor, sync: torch.Tensor):
        # positions [m], hidden_states [m, d], residual [m, d] or None (first stage),
        # rows [m] forward rows, thr [m, E] effective thresholds, sync [] bool
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        if self.kind == FINAL:
            return self.final_norm(hidden_states, residual)[0]
        if self.kind == PASS:
            return hidden_states, residual
        head_in, leave = self.head.decide(hidden_states + residual, thr[:, self.head.column], sync)
        order = torch.argsort(leave.to(torch.int8), stable=True)     # continuing rows first, in order
        count = (~leave).sum()
        return (positions[order], hidden_states[order], residual[order], rows[order], thr[order],
                head_in[order], count)


_CLASSES: dict[str, type[E3StageBase]] = {}


def stage_name(start: int, end: int, kind: str, tag: str = "") -> str:
    return f"E3Stage_{start}_{end}_{kind}" + (f"_{tag}" if tag else "")


def stage_class(name: str) -> type[E3StageBase]:
    """The compile-unit class `name` (`stage_name`): one per name and process,
    with a `forward` whose qualname is the AOT cache key."""
    cls = _CLASSES.get(name)
    if cls is not None:
        return cls

    def forward(self, positions, hidden_states, residual, rows, thr, sync):
        return self.run(positions, hidden_states, residual, rows, thr, sync)

    forward.__name__ = "forward"
    forward.__qualname__ = f"{name}.forward"
    cls = type(name, (E3StageBase,), {"forward": forward, "__module__": __name__, "__qualname__": name})
    cls = support_torch_compile(dynamic_arg_dims=_DYNAMIC)(cls)
    _CLASSES[name] = cls
    return cls


def build_stage(vllm_config, layers, start: int, end: int, kind: str, head=None, norm=None,
                prefix: str = "") -> nn.Module:
    """The compile unit of layers [start, end) of `layers` (the backbone's
    ModuleList) ending in `kind`. Under compilation mode NONE
    (`--enforce-eager`) the decorator leaves it a plain module that runs
    eagerly: the same code, so the same ids."""
    name = stage_name(start, end, kind, head.tag if head is not None else "")
    with set_model_tag(f"e3_stage_{start}_{end}"):
        return stage_class(name)(vllm_config=vllm_config, layers=list(layers[start:end]), start=start,
                                 end=end, kind=kind, head=head, norm=norm,
                                 prefix=f"{prefix}e3_stages.{start}_{end}")
