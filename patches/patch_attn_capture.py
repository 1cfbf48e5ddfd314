"""Patch 5 (patches/README.md): the E3 runner sees the step's
`CommonAttentionMetadata`.

Target: the E3 runner's own `AttentionGroup` instances
(`runner.attn_groups[kv_group][attn_group].build_metadata`, vllm 0.32.0:
v1/worker/utils.py:341), wrapped on those instances only -- no class is
changed, vanilla engines never see it.

Why: restricting a stage to a subset of the requests must go through each
attention group's own builder (vllm_e3.models.attention), and the builders' input,
the per-KV-cache-group common metadata, is a local of
`GPUModelRunner._build_attention_metadata` (gpu_model_runner.py:2397-2518);
the forward context carries only what the builders made. The wrapper hands
the common metadata to `sink(kv_cache_group_id, cm)` and calls the original
unchanged.
"""
from __future__ import annotations

from . import MARKER


def capture_common_metadata(attn_groups, sink) -> int:
    """Wrap each group's `build_metadata` once; returns how many were
    wrapped now."""
    n = 0
    for gid, groups in enumerate(attn_groups):
        for group in groups:
            orig = group.build_metadata
            if getattr(orig, MARKER, False):
                continue

            def build_metadata(common_attn_metadata, *args, _orig=orig, _gid=gid, **kwargs):
                sink(_gid, common_attn_metadata)
                return _orig(common_attn_metadata, *args, **kwargs)

            setattr(build_metadata, MARKER, True)
            group.build_metadata = build_metadata
            n += 1
    return n
