"""Per-response exit statistics over HTTP: a `vllm.endpoint_plugins` entry
point (vLLM's seam for extra routes; opt-in by vLLM's rule, so the server is
started with `VLLM_PLUGINS=e3,e3_http`, which `make serve` does).

    GET /v1/e3/requests/{id}   the counters of one request by the `id` of its
                               response (running or among the last 4096
                               finished): decode tokens, decoder layers run
                               against a full pass, tokens per exit point,
                               times parked
    GET /v1/e3/stats           the engine's exit counters (also on /metrics),
                               and what the worker holds now (parked tokens,
                               requests being counted); under
                               `--data-parallel-size N` the sum over the
                               engines, and each engine's under "engines"

Standard OpenAI clients see unchanged responses; the routes read the worker
through `collective_rpc` (methods of vllm_e3.worker.E3CPUWorker). On a server
that is not `--model-impl e3` the plugin adds nothing.
"""
from __future__ import annotations

from fastapi import FastAPI, HTTPException, Request


class E3EndpointPlugin:
    name = "e3_http"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        args = getattr(app.state, "args", None)
        if getattr(args, "model_impl", None) != "e3":
            return

        async def request_stats(request_id: str, raw: Request):
            found = await _request_stats(raw, request_id)
            if request_id not in found:
                raise HTTPException(status_code=404,
                                    detail=f"no exit statistics for request {request_id!r} "
                                           "(unknown, or finished longer ago than the last 4096)")
            return {"id": request_id, "object": "e3.request_stats", **found[request_id]}

        async def all_engine_stats(raw: Request):
            from .stats import add_counters, engine_stats

            per = [engine_stats(r) for r in await _rpc_engines(raw, "e3_exit_stats")]
            per = [p for p in per if p is not None]
            # each engine's last worker: the last pipeline rank holds the request counters
            live = [r[-1] for r in await _rpc_engines(raw, "e3_live_state") if r and r[-1]]
            total = add_counters([{k: v for k, v in p.items() if k != "rank"} for p in per]) if per else {}
            return {"object": "e3.stats", **total, **(add_counters(live) if live else {}),
                    **({"engines": per} if len(per) > 1 else {})}

        app.add_api_route("/v1/e3/requests/{request_id}", request_stats, methods=["GET"])
        app.add_api_route("/v1/e3/stats", all_engine_stats, methods=["GET"])

    async def init_state(self, engine_client, state, args) -> None:
        state.e3_engine_client = engine_client


async def _rpc_engines(raw: Request, method: str, *args) -> list[list]:
    """`method` on every worker of every engine: one list of replies per
    engine. Under data parallelism vLLM's own collective_rpc answers with the
    first engine's replies only, so this calls each engine through the
    client's call_utility_all_async."""
    client = getattr(raw.app.state, "e3_engine_client", None)
    if client is None:
        raise HTTPException(status_code=503, detail="no engine behind this server")
    core = getattr(client, "engine_core", None)
    if len(getattr(core, "core_engines", ())) > 1 and hasattr(core, "call_utility_all_async"):
        return await core.call_utility_all_async("collective_rpc", method, None, args, None)
    return [await client.collective_rpc(method, args=args)]


async def _request_stats(raw: Request, request_id: str) -> dict:
    """{request_id: counters}, added over the engines (one worker of each
    answers: vllm_e3.worker); the engine that served it has them."""
    from .stats import add_counters

    found = [r[request_id] for engine in await _rpc_engines(raw, "e3_request_stats", [request_id])
             for r in engine if r and request_id in r]
    return {request_id: add_counters(found)} if found else {}
