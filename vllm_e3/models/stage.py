"""Stages as compile units: the decoder layers between two consecutive exit
points, compiled by vLLM's own `@support_torch_compile` with a dynamic token
count, so that the stage loop (`loop.py`) runs compiled graphs and keeps
only the exit logic (decisions, compaction, parking, KV fill) eager between
them. The idea is vLLM's Gemma3n/Gemma4 (`gemma3n.py` self/cross decoder,
`gemma4.py`): several compiled modules over slices of one `self.layers`, the
later ones run on fewer tokens.

Soundness, from vLLM 0.32's `compilation/decorators.py` and `wrapper.py`:
- One compiled function per instance, but the AOT artifact path (on by
  default with torch >= 2.10, CPU included) hashes the vLLM config with the
  qualname and first line of `forward` -- not the model tag. Two stages with
  one `forward` would load each other's graph, whose attention layer names
  are baked in as constants: stage 2 would read and write stage 1's KV
  cache. So each layer range gets its own class whose `forward` carries the
  range in its qualname (`E3Stage_8_15.forward`): equal ranges may share an
  artifact (same layers, same graph), different ranges never do.
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
"""
from __future__ import annotations

import torch
from torch import nn

from vllm.compilation.backends import set_model_tag
from vllm.compilation.decorators import support_torch_compile

# every tensor argument's dim 0 is the stage's token count, one symbol for all
_DYNAMIC = {"positions": {0: "b"}, "hidden_states": {0: "b"}, "residual": {0: "b"}}


class E3StageBase(nn.Module):
    """Decoder layers [start, end) of the backbone; `forward` is supplied per
    range by `stage_class`. The layers are the backbone's own modules (shared,
    not copied): weights are loaded and post-processed once, through
    `model.layers`."""

    def __init__(self, *, vllm_config, layers: list[nn.Module], start: int, end: int,
                 prefix: str = ""):
        super().__init__()
        assert len(layers) == end - start > 0
        self.start, self.end = start, end
        self.layers = nn.ModuleList(layers)

    def run_layers(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                   residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [n], hidden_states [n, d], residual [n, d] or None (first stage)
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        return hidden_states, residual


_CLASSES: dict[tuple[int, int], type[E3StageBase]] = {}


def stage_class(start: int, end: int) -> type[E3StageBase]:
    """The compile-unit class of layers [start, end): one per range and process,
    with a `forward` whose qualname names the range (the AOT cache key)."""
    cls = _CLASSES.get((start, end))
    if cls is not None:
        return cls
    name = f"E3Stage_{start}_{end}"

    def forward(self, positions, hidden_states, residual=None):
        return self.run_layers(positions, hidden_states, residual)

    forward.__name__ = "forward"
    forward.__qualname__ = f"{name}.forward"
    cls = type(name, (E3StageBase,), {"forward": forward, "__module__": __name__,
                                      "__qualname__": name})
    cls = support_torch_compile(dynamic_arg_dims=_DYNAMIC)(cls)
    _CLASSES[(start, end)] = cls
    return cls


def build_stages(vllm_config, layers, ranges: list[tuple[int, int]], prefix: str = "") -> list[nn.Module]:
    """One compile unit per [start, end) in `ranges`, over `layers` (the
    backbone's ModuleList). Under compilation mode NONE (`--enforce-eager`)
    the decorator leaves them plain modules that run eagerly."""
    stages = []
    for start, end in ranges:
        with set_model_tag(f"e3_stage_{start}_{end}"):
            stages.append(stage_class(start, end)(
                vllm_config=vllm_config, layers=list(layers[start:end]), start=start, end=end,
                prefix=f"{prefix}e3_stages.{start}_{end}"))
    return stages
