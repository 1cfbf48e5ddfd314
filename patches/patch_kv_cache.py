"""Patch 4 (patches/README.md): under an E3 engine whose tokens can exit,
prefix caching caches prompt blocks only.

Target: the E3 scheduler's own `KVCacheCoordinator` instance
(`scheduler.kv_cache_manager.coordinator.cache_blocks`, vllm 0.32.0:
v1/core/kv_cache_coordinator.py:354), wrapped on that instance only -- no
class is changed, vanilla engines never see it.

Why: a token that exits at `e` gets K/V in layers `e..L-1` from its pre-ramp
state (the KV fill), not what the full model would write. Prompt positions
never exit (vllm_e3.models.rows.RowLayout), so a block made only of prompt
positions holds exactly the full model's K/V; a block holding a decode
position may not. vLLM caches a request's full blocks as it goes, decode
blocks included, and another request whose prompt is this one's prompt +
output (multi-turn chat) would read them: one client's exits would change
another client's tokens. Capping the tokens vLLM may cache at the request's
prompt length keeps every shared block exact; the cost is that a follow-up
turn recomputes the previous answer's tokens (benchmarks/RESULTS.md,
"Prefix caching under exits").
"""
from __future__ import annotations

from . import MARKER


def cache_prompt_blocks_only(scheduler) -> bool:
    """Wrap `scheduler`'s coordinator once; returns whether it was applied
    now (False: already wrapped, or prefix caching is off)."""
    manager = scheduler.kv_cache_manager
    coord = manager.coordinator
    if not manager.enable_caching or getattr(coord.cache_blocks, MARKER, False):
        return False
    orig = coord.cache_blocks

    def cache_blocks(request, num_computed_tokens: int) -> None:
        orig(request, min(num_computed_tokens, request.num_prompt_tokens))

    setattr(cache_blocks, MARKER, True)
    coord.cache_blocks = cache_blocks
    return True
