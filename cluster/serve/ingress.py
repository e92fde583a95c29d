"""The OpenAI-compatible HTTP ingress: validates requests, picks the model's deployment, streams its answer.

It holds no model: each model id maps to a handle of its model deployment. Requests are parsed strictly here
(a 400 never costs a replica a call), a model whose replicas are not up yet answers 503, and an answer is
streamed on as it comes. When the client disconnects, the replica call is cancelled, which aborts the engine
request and frees its KV blocks.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` type of the route methods.
import asyncio
import logging
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptoss_serve.cluster.serve.errors import (
    APIError,
    internal_error,
    model_not_found,
    not_found,
    queue_full,
    unavailable,
)
from gptoss_serve.cluster.serve.metrics import IngressMetrics, render
from gptoss_serve.cluster.serve.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ResponsesRequest,
    parse_request,
)
from gptoss_serve.cluster.serve.routing_hint import ROUTING_KWARG, routing_hint
from gptoss_serve.cluster.serve.shared_actors import MetricsHubActor, get_or_create

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0  # a ready() call that takes longer means no replica is up
PROBE_INTERVAL_S = 1.0  # while a model is not ready
HEALTHY_PROBE_INTERVAL_S = 5.0
METRICS_MAX_AGE_S = 15.0  # snapshots older than this belong to replicas that went away

app = FastAPI(title="gptoss-serve", docs_url=None, redoc_url=None)


@app.exception_handler(APIError)
async def _api_error(request: Request, error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers())


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    api_error = not_found(f"No route {request.method} {request.url.path}.") if error.status_code == 404 else \
        APIError(error.status_code, str(error.detail), "invalid_request_error")
    return JSONResponse(api_error.body(), status_code=api_error.status_code)


# Helpers the routes use are defined before the deployment class: Serve ships the class to its replicas
# together with the module globals that exist when the class is decorated.
async def _resolve(response):
    return await response


def _load_tokenizer():
    """o200k_harmony, the same for every gpt-oss model: for rendering prompts into routing hints."""
    from gptoss_serve.model.tokenizer import load_tokenizer

    return load_tokenizer()


async def _sse_body(call) -> AsyncIterator[str]:
    """The replica's SSE batches; if the client disconnects, Starlette cancels this and the call is cancelled."""
    try:
        async for item in call:
            yield item["data"]
    finally:
        call.cancel()


@serve.deployment(name="OpenAIIngress", max_ongoing_requests=1024)
@serve.ingress(app)
class OpenAIIngress:
    async def __init__(self, servers: dict[str, DeploymentHandle], routing_hints: bool = False):
        """routing_hints: pass each request's prompt-prefix hint to the model replicas' router (router.py)."""
        context = serve.get_replica_context()
        self._replica_id = context.replica_tag
        self._servers = servers
        self._model_info: dict[str, dict[str, Any]] = {}  # model id -> ready() answer, once a replica is up
        self._healthy: dict[str, bool] = {}  # model id -> whether the last probe was answered
        self._metrics = IngressMetrics(self._replica_id)
        self._hub = await get_or_create(MetricsHubActor, context.app_name, "metrics")
        self._tokenizer = await asyncio.to_thread(_load_tokenizer) if routing_hints else None
        self._monitor_task = asyncio.create_task(self._monitor())
        self._push_task = asyncio.create_task(self._push_metrics())

    # Readiness ---------------------------------------------------------------------------------------------
    async def _probe(self, model_id: str) -> dict[str, Any] | None:
        response = self._servers[model_id].ready.remote()
        try:
            return await asyncio.wait_for(_resolve(response), PROBE_TIMEOUT_S)
        except Exception as error:  # no replica answered in time (none running yet), or the engine is down
            logger.info("model %s not ready: %r", model_id, error)
            response.cancel()
            return None

    async def _monitor(self) -> None:
        """Keeps each model's readiness current, so that /health and refusals answer at once."""
        while True:
            infos = await asyncio.gather(*(self._probe(model_id) for model_id in self._servers))
            for model_id, info in zip(self._servers, infos):
                self._healthy[model_id] = info is not None
                if info is not None:
                    self._model_info[model_id] = info
            await asyncio.sleep(PROBE_INTERVAL_S if not all(self._healthy.values()) else HEALTHY_PROBE_INTERVAL_S)

    def _server(self, model_id: str) -> DeploymentHandle:
        if model_id not in self._servers:
            raise model_not_found(model_id, list(self._servers))
        if not self._healthy.get(model_id):
            state = "is starting" if model_id not in self._model_info else "is not answering"
            raise unavailable(f"The model {model_id!r} {state}: no replica of it is ready.")
        return self._servers[model_id]

    # Routes ------------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> Response:
        not_ready = [model_id for model_id in self._servers if not self._healthy.get(model_id)]
        if not_ready:
            return JSONResponse({"status": "starting", "not_ready": not_ready}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        data = [{"id": model_id, "object": "model", "created": 0, "owned_by": "gptoss-serve",
                 "max_model_len": info.get("max_model_len"), "ready": bool(self._healthy.get(model_id))}
                for model_id, info in ((m, self._model_info.get(m, {})) for m in self._servers)]
        return {"object": "list", "data": data}

    @app.get("/metrics")
    async def metrics(self) -> Response:
        snapshots = await self._hub.collect.remote(METRICS_MAX_AGE_S)
        snapshots[self._source] = self._metrics.snapshot()
        return Response(render(snapshots.values()), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._handle("chat", request, ChatCompletionRequest)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._handle("completions", request, CompletionRequest)

    @app.post("/v1/responses")
    async def responses(self, request: Request) -> Response:
        return await self._handle("responses", request, ResponsesRequest)

    @app.get("/v1/responses/{response_id}")
    async def get_response(self, response_id: str) -> Response:
        model_id = next(iter(self._servers))
        response = await self._server(model_id).get_response.remote(response_id)
        if response is None:
            raise not_found(f"No stored response has id {response_id!r}.", param="response_id")
        return JSONResponse(response)

    # Forwarding --------------------------------------------------------------------------------------------
    async def _handle(self, endpoint: str, http_request: Request, model_cls) -> Response:
        try:
            request = parse_request(model_cls, await http_request.body())
            response = await self._forward(endpoint, request)
        except APIError as error:
            response = JSONResponse(error.body(), status_code=error.status_code, headers=error.headers())
        self._metrics.observe(endpoint, response.status_code)
        return response

    async def _forward(self, endpoint: str, request) -> Response:
        server = self._server(request.model)
        kwargs = {}
        if self._tokenizer is not None:
            kwargs[ROUTING_KWARG] = await routing_hint(endpoint, request, self._tokenizer)
        call = getattr(server, endpoint).options(stream=True).remote(request, **kwargs)
        try:
            first = await call.__anext__()
            if first["kind"] == "error":
                raise APIError.from_dict(first["error"])
            headers = {"x-gptoss-replica": first["replica"]}
            if request.stream:
                return StreamingResponse(_sse_body(call), media_type="text/event-stream",
                                         headers={**headers, "Cache-Control": "no-cache"})
            second = await call.__anext__()
            if second["kind"] == "error":
                raise APIError.from_dict(second["error"])
            async for _ in call:  # nothing follows the body: let the replica's handler finish
                pass
            return JSONResponse(second["body"], headers=headers)
        except APIError:
            call.cancel()
            raise
        except BackPressureError as error:
            raise queue_full(f"The model's request queue is full: {error}") from None
        except asyncio.CancelledError:
            call.cancel()  # the client went away: stop the generation and free its KV blocks
            raise
        except Exception as error:
            call.cancel()
            logger.exception("%s: replica call failed", endpoint)
            raise internal_error(f"{type(error).__name__}: {error}") from None

    @property
    def _source(self) -> str:
        return f"ingress:{self._replica_id}"

    async def _push_metrics(self) -> None:
        while True:
            try:
                await self._hub.push.remote(self._source, self._metrics.snapshot())
            except Exception:
                logger.warning("metrics push failed", exc_info=True)
            await asyncio.sleep(5.0)
