"""Exit statistics of an E3 engine, offline: the worker answers by name.

    llm.collective_rpc("e3_exit_stats")        # [dict] one per worker
    llm.collective_rpc("e3_reset_exit_stats")
    llm.collective_rpc("e3_model_class")       # ["E3LlamaForCausalLM"]

(Method names travel without vLLM's insecure pickle fallback; see
`vllm_e3.worker.E3CPUWorker`.) Counters: steps, decode tokens, tokens exited
per exit point, decoder layers run by decode tokens against a full pass, and
KV-fill rows (one per exited token per layer filled).
"""
from __future__ import annotations


def exit_stats(model) -> dict | None:
    stats = getattr(model, "e3_stats", None)
    return stats.as_dict() if stats is not None else None


def reset_exit_stats(model) -> None:
    from .exits import ExitStats

    if hasattr(model, "e3_stats"):
        model.e3_stats = ExitStats()
