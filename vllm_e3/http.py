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
                               requests being counted)

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
            found = await _rpc(raw, "e3_request_stats", [request_id])
            if request_id not in found:
                raise HTTPException(status_code=404,
                                    detail=f"no exit statistics for request {request_id!r} "
                                           "(unknown, or finished longer ago than the last 4096)")
            return {"id": request_id, "object": "e3.request_stats", **found[request_id]}

        async def engine_stats(raw: Request):
            return {"object": "e3.stats", **(await _rpc(raw, "e3_exit_stats") or {}),
                    **(await _rpc(raw, "e3_live_state") or {})}

        app.add_api_route("/v1/e3/requests/{request_id}", request_stats, methods=["GET"])
        app.add_api_route("/v1/e3/stats", engine_stats, methods=["GET"])

    async def init_state(self, engine_client, state, args) -> None:
        state.e3_engine_client = engine_client


async def _rpc(raw: Request, method: str, *args):
    client = getattr(raw.app.state, "e3_engine_client", None)
    if client is None:
        raise HTTPException(status_code=503, detail="no engine behind this server")
    results = await client.collective_rpc(method, args=args)
    if method == "e3_request_stats":
        merged: dict = {}
        for r in results:
            merged.update(r or {})
        return merged
    return results[0] if results else None
