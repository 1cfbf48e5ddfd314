"""Exit statistics of an E3 engine.

Offline, the worker answers by name:

    llm.collective_rpc("e3_exit_stats")        # [dict] one per worker: engine counters
    llm.collective_rpc("e3_request_stats", args=([out.request_id for out in outputs],))
    llm.collective_rpc("e3_reset_exit_stats")
    llm.collective_rpc("e3_model_class")       # ["E3LlamaForCausalLM"]

(Method names travel without vLLM's insecure pickle fallback; see
`vllm_e3.worker.E3CPUWorker`.) Engine counters: steps, decode tokens, tokens
exited per exit point, decoder layers run by decode tokens against a full
pass, KV-fill rows (one per exited token per layer filled), parked/resumed
tokens and park waits. Per request: decode tokens, layers run against a full
pass, tokens per exit point, times parked (`vllm_e3.exits.RequestExitStats`).

Served (`vllm serve --model-impl e3`): the engine counters are on `/metrics`
(`vllm_e3.metrics`), per-request counters at `GET /v1/e3/requests/{id}`
(`vllm_e3.http`).
"""
from __future__ import annotations


def exit_stats(runtime) -> dict | None:
    """The engine counters of the runner's E3 state (vllm_e3.runtime.E3Runtime;
    None: not an E3 model)."""
    return runtime.stats.as_dict() if runtime is not None else None


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


def _sum(items) -> dict:
    total = items[0].as_dict()
    for st in items[1:]:
        d = st.as_dict()
        for k, v in d.items():
            if isinstance(v, dict):
                for e, n in v.items():
                    total[k][e] = total[k].get(e, 0) + n
            else:
                total[k] += v
    return total
