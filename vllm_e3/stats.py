"""Exit statistics of an E3 engine.

Offline, the worker answers by name:

    llm.collective_rpc("e3_exit_stats")        # [dict] one per worker: its counters
    engine_stats(llm.collective_rpc("e3_exit_stats"))   # the engine's (TP/PP ranks merged)
    llm.collective_rpc("e3_request_stats", args=([out.request_id for out in outputs],))
    llm.collective_rpc("e3_reset_exit_stats")
    llm.collective_rpc("e3_model_class")       # ["E3LlamaForCausalLM"]

(Method names travel without vLLM's insecure pickle fallback; see
`vllm_e3.worker.E3CPUWorker`.) Engine counters: steps, decode tokens, tokens
exited per exit point, decoder layers run by decode tokens against a full
pass, KV-fill rows (one per exited token per layer filled), parked/resumed
tokens and park waits. Per request: decode tokens, layers run against a full
pass, tokens per exit point, times parked (`vllm_e3.runtime.RequestExitStats`).

Served (`vllm serve --model-impl e3`): the engine counters are on `/metrics`
(`vllm_e3.metrics`), per-request counters at `GET /v1/e3/requests/{id}`
(`vllm_e3.http`).
"""
from __future__ import annotations


def exit_stats(runtime, rank: dict | None = None) -> dict | None:
    """The engine counters of the runner's E3 state (vllm_e3.runtime.E3Runtime;
    None: not an E3 model), with the worker's `rank` {"dp", "pp", "tp"}."""
    if runtime is None:
        return None
    return {**runtime.stats.as_dict(), "rank": rank or {"dp": 0, "pp": 0, "tp": 0}}


def engine_stats(results: list[dict | None]) -> dict | None:
    """One engine's counters from its workers' `exit_stats` (collective_rpc's
    list). Tensor-parallel ranks of one pipeline rank make the same decisions
    and hold the same counters: one of them counts. Pipeline ranks count
    disjoint things (each the stages it ran and the exits it decided, the last
    one the steps and tokens: vllm_e3.models.loop), so they add."""
    parts = [r for r in results if r is not None and r.get("rank", {}).get("tp", 0) == 0]
    if not parts:
        return None
    merged = add_counters([{k: v for k, v in r.items() if k != "rank"} for r in parts])
    merged["rank"] = {"dp": parts[0].get("rank", {}).get("dp", 0)}
    return merged


def request_stats(runtime, ids: list[str] | None = None) -> dict[str, dict]:
    """Counters of running and recently finished requests, by request id.
    An id may also be the id a client saw (vLLM adds `-<8 chars>` to it
    inside the engine; a completions request with several prompts sums
    them); None: every request still known."""
    known = runtime.counters.known() if runtime is not None else {}
    if ids is None:
        return {rid: st.as_dict() for rid, st in known.items()}
    out = {}
    for want in ids:
        # a completions request's engine ids are "<id>-<prompt index>-<8 chars>"
        hits = [st for rid, st in known.items() if rid == want or rid.startswith(want + "-")]
        if hits:
            out[want] = _sum(hits)
    return out


def add_counters(dicts: list[dict]) -> dict:
    """Counters added key by key (a dict of counts per key too); a `*_max`
    key is the largest."""
    total = {k: (dict(v) if isinstance(v, dict) else v) for k, v in dicts[0].items()}
    for d in dicts[1:]:
        for k, v in d.items():
            if isinstance(v, dict):
                for e, n in v.items():
                    total[k][e] = total[k].get(e, 0) + n
            elif k.endswith("_max"):
                total[k] = max(total[k], v)
            else:
                total[k] += v
    return total


def _sum(items) -> dict:
    return add_counters([st.as_dict() for st in items])
