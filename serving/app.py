"""The HTTP server: Vertex AI's prediction REST API for the local registry or one model.

Paths, request and response bodies, and errors are Vertex's, so the official ``aiplatform`` SDK
(REST transport, ``api_endpoint="http://127.0.0.1:PORT"``) works against it unchanged:

* ``GET  /v1/projects/{p}/locations/{l}/endpoints/{id}``             the Endpoint resource
* ``POST /v1/projects/{p}/locations/{l}/endpoints/{id}:predict``     PredictResponse
* ``POST /v1/projects/{p}/locations/{l}/endpoints/{id}:explain``     ExplainResponse
* ``POST /v1/projects/{p}/locations/{l}/endpoints/{id}:rawPredict``  the model's own response + headers
* ``GET  /health`` (and ``AIP_HEALTH_ROUTE``); ``POST AIP_PREDICT_ROUTE`` in custom-container mode,
  where each prediction carries its explanation (Vertex's built-in explanations are deprecated).

What any client may send is bounded before work starts: routes match exactly (no redirects,
405 for a wrong method), POST bodies must be JSON within a size, a read time and a nesting depth,
images within a pixel budget, and an explanation within a cost budget in gradient evaluations
(:mod:`explain.cost`). Work that starts is bounded in time: each request has a deadline (which
a version's one-time load on its first request does not use up), and an
explanation stops within one chunk of gradient evaluations when the deadline passes, the client
disconnects or the server shuts down (:mod:`serving.cancellation`). Every answer, errors
included, is Vertex's JSON with the right 4xx, never an absolute path, and keeps the connection.

Handlers are ``async`` only to read the body and watch the connection; checking and running
models happens in the thread pool, and ``:predict`` requests are batched across requests
(:mod:`serving.batching`).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import io
import logging
import random
import re
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from serving.admission import ExplanationSlots, ServerBusyError
from serving.backends import Backend
from serving.batching import Batcher, BatchingParameters, QueueFullError
from serving.cancellation import CancellableModel, Cancelled, CancellationToken, ClientGone, DeadlineExceeded
from serving.instances import Limits, RequestError, decode_instances, parse_json_body
from serving.models import ModelCache, ServedModel
from serving.storage import DamagedFileError

log = logging.getLogger("serving")
#: Worker threads kept for everything but explanations (:predict, GET, checking bodies), the
#: size of anyio's default pool.
THREADS_BESIDE_EXPLANATIONS = 40

#: One path segment of a resource name (project, location, endpoint id): what Vertex allows.
_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}"
_VERTEX_ROUTE = re.compile(rf"^/v1/projects/(?P<project>{_SEGMENT})/locations/(?P<location>{_SEGMENT})"
                           rf"/endpoints/(?P<endpoint>{_SEGMENT})(?::(?P<verb>predict|explain|rawPredict))?$")
#: Host names a server bound to loopback answers to: a web page on another origin (or one that
#: rebinds its DNS name to 127.0.0.1) sends its own host name and is refused.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
#: Absolute paths that can appear in library messages; replaced before an answer leaves.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:home|tmp|root|usr|var|opt|work|mnt|srv|data|private|Users)"
                            r"(?:/[^\s'\"),:]*)?")


@dataclass
class ServerConfig:
    """What the server serves and how. ``predict_route`` turns on custom-container mode."""

    backend: Backend
    cache_dir: str
    limits: Limits = field(default_factory=Limits)
    health_route: str = "/health"
    predict_route: str | None = None
    #: Used when a model version has no explanationSpec parameters and a request gives none.
    explanation_parameters: dict[str, Any] | None = None
    #: Load and warm the model at start (health says 503 until done); default: in model-dir mode.
    preload: bool | None = None
    #: Most gradient evaluations one explanation request may cost (:mod:`explain.cost`).
    explain_budget: int | None = None
    #: Explanations running at once (:mod:`serving.admission`); default: the cores this process may use.
    explain_concurrency: int | None = None
    #: Explanations waiting for one of those slots at most; more are answered 503 at once. Default:
    #: four per slot.
    explain_queue: int | None = None
    #: Accepted ``Host`` names (any port); None accepts any (a server bound to a public address).
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS
    batching: BatchingParameters = field(default_factory=BatchingParameters)
    #: After SIGTERM, how long in-flight requests may finish before they are cancelled.
    graceful_shutdown_s: float = 20.0

    def __post_init__(self) -> None:
        if self.explain_budget is None:
            from explain.cost import DEFAULT_EXPLAIN_BUDGET

            self.explain_budget = DEFAULT_EXPLAIN_BUDGET
        if self.explain_concurrency is None:
            from explain.sessions import cores

            self.explain_concurrency = cores()
        if self.explain_queue is None:
            self.explain_queue = 4 * self.explain_concurrency
        if self.preload is None:
            from serving.backends import ModelDirBackend

            self.preload = isinstance(self.backend, ModelDirBackend)


def _error_json(code: int, message: str, status: str | None = None) -> dict[str, Any]:
    return RequestError(message, code, status).to_json()


def scrub(message: str) -> str:
    """``message`` without absolute file paths (they say where the server keeps its files)."""
    return _ABSOLUTE_PATH.sub("<path>", message)


def _pick_deployed_model(endpoint: dict[str, Any], deployed_model_id: Any, rng: random.Random) -> dict:
    """The deployed model a request goes to: the one asked for, else one drawn by traffic split."""
    deployed = {d["id"]: d for d in endpoint.get("deployedModels", [])}
    if deployed_model_id:
        if not isinstance(deployed_model_id, (str, int)) or str(deployed_model_id) not in deployed:
            raise RequestError(f"endpoint {endpoint['name']} has no deployed model {str(deployed_model_id)[:80]!r} "
                               f"(has {sorted(deployed)})", 400, "INVALID_ARGUMENT")
        return deployed[str(deployed_model_id)]
    split = {k: v for k, v in endpoint.get("trafficSplit", {}).items() if v > 0 and k in deployed}
    if not split:
        raise RequestError(f"endpoint {endpoint['name']} has no deployed model with traffic; deploy one first",
                           400, "FAILED_PRECONDITION")
    chosen = rng.choices(list(split), weights=list(split.values()))[0]
    return deployed[chosen]


def _camel_to_snake(key: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", key).lower()


def merge_metadata(metadata: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    """Apply Vertex's ``ExplanationMetadataOverride`` (``{"inputs": {name: {"inputBaselines": ...}}}``)
    to a model's metadata, in the key style the metadata already uses (the exporter writes snake_case)."""
    if override is None:
        return metadata
    if not isinstance(override, dict) or not isinstance(override.get("inputs", {}), dict):
        raise RequestError("explanationSpecOverride.metadata must be {\"inputs\": {<input>: {...}}}")
    merged = copy.deepcopy(metadata)
    inputs = merged.setdefault("inputs", {})
    for name, fields in override.get("inputs", {}).items():
        if name not in inputs:
            raise RequestError(f"explanationSpecOverride.metadata.inputs: unknown input {name[:80]!r} "
                               f"(the model's inputs are {sorted(inputs)})")
        if not isinstance(fields, dict):
            raise RequestError(f"explanationSpecOverride.metadata.inputs.{name} must be an object")
        snake = any("_" in k for k in inputs[name])
        inputs[name].update({(_camel_to_snake(k) if snake else k): v for k, v in fields.items()})
    return merged


def _explanation_request(body: dict[str, Any], version: dict[str, Any],
                         default_parameters: dict[str, Any] | None) -> tuple[dict, dict | None]:
    """The explanation parameters and metadata for one explain call: the model version's
    explanationSpec, overridden per call as Vertex's ``explanationSpecOverride`` does."""
    override = body.get("explanationSpecOverride", body.get("explanation_spec_override"))
    if override is None:
        override = {}
    if not isinstance(override, dict):
        raise RequestError("explanationSpecOverride must be a JSON object")
    requested = override.get("parameters")
    if requested is not None and not isinstance(requested, dict):
        raise RequestError(f"explanationSpecOverride.parameters must be a JSON object, got "
                           f"{type(requested).__name__}")
    spec = version.get("explanationSpec") or {}
    parameters = requested or spec.get("parameters") or default_parameters
    if not parameters:
        raise RequestError(f"model {version['name']}@{version['versionId']} has no explanationSpec and the "
                           "request has no explanationSpecOverride.parameters", 400, "FAILED_PRECONDITION")
    metadata = spec.get("metadata")
    if metadata is not None:
        metadata = merge_metadata(metadata, override.get("metadata"))
    elif override.get("metadata") is not None:
        raise RequestError("explanationSpecOverride.metadata given, but the model has no explanation metadata")
    return parameters, metadata


def _vertex_explanation(explanation: dict[str, Any]) -> dict[str, Any]:
    """Vertex's Explanation message; our warnings ride along (the SDK ignores unknown fields)."""
    out = {"attributions": explanation["attributions"]}
    if explanation.get("warnings"):
        out["warnings"] = list(explanation["warnings"])
    return out


def _host_allowed(host_header: str | None, allowed: tuple[str, ...]) -> bool:
    if not host_header:
        return False
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8080
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":")[0]
    return host in allowed


def _is_json(content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].strip().lower() == "application/json"


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refused with a 413 as soon as it is known to exceed ``limit`` bytes (from
    Content-Length, or while streaming a chunked body) without reading the rest into memory,
    and with a 408 when it takes longer than ``timeout_s`` to arrive (a stalled client)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"request body is {declared} bytes, over the limit of {limit} bytes", 413)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestError(f"request body is over the limit of {limit} bytes", 413)
                chunks.append(chunk)
    except TimeoutError:
        raise RequestError(f"the request body did not arrive within {timeout_s:g} s", 408,
                           "DEADLINE_EXCEEDED") from None
    except ClientDisconnect:  # nobody to answer: the client's doing, not the server's error
        log.info("a client closed the connection after %d bytes of its request body", size)
        raise RequestError("the client closed the connection before its request body arrived", 499,
                           "CANCELLED") from None
    return b"".join(chunks)


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _warm_up_image() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buffer, "PNG")
    return buffer.getvalue()


def create_app(config: ServerConfig) -> FastAPI:
    """The FastAPI application serving ``config.backend``'s endpoints."""
    # With a registry, keep only the versions deployed now: a retrain must not add a model's
    # worth of memory every time it replaces the serving version.
    registry = getattr(config.backend, "registry", None)
    cache = ModelCache(config.cache_dir, deployed=registry.deployed_versions if registry is not None else None)
    rng = random.Random()
    ready = threading.Event()  # model-dir mode: set once the model is loaded and warm
    batchers: dict[tuple, Batcher] = {}
    batchers_lock = threading.Lock()
    tokens: set[CancellationToken] = set()  # in-flight requests, cancelled at shutdown
    working = [0, 0]  # [requests whose work runs in a thread now, works stopped by cancellation]
    working_lock = threading.Lock()
    slots = ExplanationSlots(config.explain_concurrency, config.explain_queue)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # every running and waiting explanation holds a worker thread: leave the pool room for the
        # rest (anyio's default of 40 would let 5 explanations per core on 8 cores take it all)
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, slots.slots + slots.max_waiting + THREADS_BESIDE_EXPLANATIONS)
        if config.preload:  # in the background, so the port opens and health can say "loading"
            threading.Thread(target=preload, name="preload", daemon=True).start()
        yield
        for token in list(tokens):  # the grace period is over: stop what still runs
            token.cancel(ClientGone("the server is shutting down"))
        for batcher in batchers.values():
            batcher.close()

    def preload() -> None:
        try:
            served = resolve("startup")[2]
            served.explainable()  # explanations need it; loading traces the IG kernel
            batcher_for(served).submit([_warm_up_image()])  # loads and runs serving_default once
            ready.set()
        except Exception:  # noqa: BLE001  (health keeps answering 503; the log says why)
            log.exception("loading the model failed")

    app = FastAPI(title="Local Vertex AI prediction endpoint", docs_url=None, redoc_url=None,
                  openapi_url=None, lifespan=lifespan)
    app.router.redirect_slashes = False
    app.state.models = cache  # for introspection (tests, debugging): which versions are loaded
    app.state.batchers = batchers
    # For tests and monitoring: how much work runs now, and how much was stopped by cancellation.
    app.state.working = lambda: working[0]
    app.state.cancelled = lambda: working[1]
    app.state.slots = slots  # explanations running and waiting (:mod:`serving.admission`)

    def batcher_for(served: ServedModel) -> Batcher:
        key = (served.version["name"], served.version["versionId"], served.model_dir)
        with batchers_lock:
            # a batcher holds its model: close those of versions the cache has dropped
            cached = {k[:2] for k in cache.keys()}
            for old in [k for k in batchers if k[:2] not in cached and k != key]:
                batchers.pop(old).close()
            if key not in batchers:
                batchers[key] = Batcher(served.predict, config.batching, name=f"batch-{served.version['versionId']}")
            return batchers[key]

    def predict_rows(served: ServedModel, images: list[bytes], token: CancellationToken):
        with token.not_counted():  # the version's first request loads it: the server's work, not the request's
            served.signature()
        try:
            return batcher_for(served).submit(images, timeout_s=token.remaining_s())
        except TimeoutError:
            raise DeadlineExceeded(f"the request ran past its deadline of {token.deadline_s:g} s") from None

    def resolve(name: str, deployed_model_id: Any = None,
                token: CancellationToken | None = None) -> tuple[dict, dict, ServedModel]:
        endpoint = config.backend.endpoint(name)
        deployed = _pick_deployed_model(endpoint, deployed_model_id, rng)
        with token.not_counted() if token is not None else contextlib.nullcontext():  # a first fetch
            return endpoint, deployed, cache.get(config.backend.version(deployed))

    def explained(served: ServedModel, images: list[bytes], parameters: dict, metadata: dict | None,
                  token: CancellationToken) -> list[dict]:
        """Vertex-shaped explanations, after the request's cost is checked against the budget."""
        from explain import ExplanationParametersError, NonFiniteAttributionError, explain_images
        from explain.cost import ExplanationCostError, check_cost, request_cost
        from trainer.export import read_explanation_metadata

        with token.not_counted():  # the labels are checked against the model, loaded once per version
            labels = served.labels
        try:
            cost = request_cost(parameters, len(images), metadata or read_explanation_metadata(served.model_dir),
                                labels)
            check_cost(cost, config.explain_budget, "--explain_budget / AIP_EXPLAIN_BUDGET")
        except (ExplanationParametersError, ExplanationCostError) as e:
            raise RequestError(f"explanation parameters: {e}") from e
        token.check()
        with token.not_counted():  # loaded once per version (it traces the IG kernel): not the request's work
            explainable = served.explainable()
        model = CancellableModel(explainable, token)
        with slots.slot(token):  # in turn: a burst must not slow every explanation past its deadline
            try:
                pixels = model.preprocess(images)
            except ValueError as e:  # decodable for PIL, not for the graph: named by instance
                raise RequestError(f"instances: {e}") from e
            try:
                return explain_images(model, pixels, parameters, metadata)
            except ExplanationParametersError as e:  # e.g. an override that does not fit this model
                raise RequestError(f"explanation: {e}") from e
            except NonFiniteAttributionError as e:  # the model's fault, said as such; the server goes on
                log.warning("explanation failed: %s", e)
                raise RequestError(f"explanation: {e}", code=500) from e

    def predict(name: str, body: dict[str, Any], token: CancellationToken) -> tuple[dict, dict, list]:
        _, deployed, served = resolve(name, token=token)
        images = decode_instances(body, served.input_name, config.limits)
        return deployed, served.version, predict_rows(served, images, token).tolist()

    def explain(name: str, body: dict[str, Any], token: CancellationToken) -> dict[str, Any]:
        deployed_id = body.get("deployedModelId", body.get("deployed_model_id"))
        _, deployed, served = resolve(name, deployed_id, token)
        images = decode_instances(body, served.input_name, config.limits)
        parameters, metadata = _explanation_request(body, served.version, config.explanation_parameters)
        explanations = explained(served, images, parameters, metadata, token)
        predictions = predict_rows(served, images, token).tolist()
        return {"explanations": [_vertex_explanation(e) for e in explanations],
                "predictions": predictions, "deployedModelId": deployed["id"]}

    def container_predict(body: dict[str, Any], token: CancellationToken) -> dict[str, Any]:
        """Custom-container mode: every prediction carries its label and explanation."""
        _, _, served = resolve("container", token=token)
        images = decode_instances(body, served.input_name, config.limits)
        request_override = (body.get("parameters") or {}).get("explanationParameters")
        parameters, metadata = _explanation_request(
            {"explanationSpecOverride": {"parameters": request_override}} if request_override is not None else {},
            served.version, config.explanation_parameters)
        explanations = explained(served, images, parameters, metadata, token)
        probabilities = predict_rows(served, images, token)
        labels = served.labels
        return {"predictions": [
            {"probabilities": p.tolist(), "label": labels[int(p.argmax())], "labelIndex": int(p.argmax()),
             "explanation": _vertex_explanation(e)} for p, e in zip(probabilities, explanations)]}

    async def run(request: Request, fn: Callable, *args: Any) -> Any:
        """``fn(*args, token)`` in the thread pool, cancelled (through the token) when the client
        disconnects or the server's grace period ends; the deadline is checked by the worker."""
        token = CancellationToken(config.limits.request_deadline_s)
        tokens.add(token)

        def counted() -> Any:
            with working_lock:
                working[0] += 1
            try:
                return fn(*args, token)
            except Cancelled:
                with working_lock:
                    working[1] += 1
                raise
            finally:
                with working_lock:
                    working[0] -= 1

        work = asyncio.ensure_future(run_in_threadpool(counted))
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                return work.result()
            token.cancel(ClientGone("the client closed the connection"))
            raise RequestError("the client closed the connection; the request was cancelled", 499, "CANCELLED")
        except asyncio.CancelledError:  # the shutdown grace period is over: answer, then let go
            token.cancel(ClientGone("the server is shutting down"))
            raise RequestError("the server is shutting down and cancelled this request; retry", 503) from None
        finally:
            watcher.cancel()
            if not work.done():  # disconnected, or cancelled by shutdown: stop the worker too
                token.cancel(ClientGone("the request was cancelled"))
                work.add_done_callback(lambda t: t.cancelled() or t.exception())
            tokens.discard(token)

    def endpoint_name(match: re.Match) -> str:
        return f"projects/{match['project']}/locations/{match['location']}/endpoints/{match['endpoint']}"

    async def health() -> JSONResponse:
        if config.preload and not ready.is_set():
            return JSONResponse(_error_json(503, "the model is loading"), status_code=503)
        return JSONResponse({"status": "ok"})

    async def json_body(request: Request) -> dict[str, Any]:
        return parse_json_body(await _read_body(request, config.limits.max_body_bytes, config.limits.body_timeout_s))

    async def dispatch(request: Request) -> JSONResponse:
        path, method = request.scope["path"], request.method
        if config.allowed_hosts is not None and not _host_allowed(request.headers.get("host"), config.allowed_hosts):
            raise RequestError(f"Host {request.headers.get('host', '')[:100]!r} is not served here (allowed: "
                               f"{', '.join(config.allowed_hosts)})", 400)
        if path == config.health_route:
            if method not in ("GET", "HEAD"):
                raise RequestError(f"{method} {path}: method not allowed; use GET", 405)
            return await health()
        if config.predict_route and path == config.predict_route:
            route = ("container", None)
        elif (match := _VERTEX_ROUTE.match(path)) is not None:
            route = (match["verb"] or "get", match)
        else:
            raise RequestError(f"{method} {path[:200]}: not found", 404)
        verb, match = route
        if verb == "get":
            if method not in ("GET", "HEAD"):
                raise RequestError(f"{method} {path}: method not allowed; use GET", 405)
            return JSONResponse(await run_in_threadpool(config.backend.endpoint, endpoint_name(match)))
        if method != "POST":
            raise RequestError(f"{method} {path}: method not allowed; use POST", 405)
        if not _is_json(request.headers.get("content-type")):
            raise RequestError(f"POST bodies must be JSON: Content-Type is "
                               f"{request.headers.get('content-type', 'missing')[:100]!r}; "
                               "send application/json", 415)
        body = await json_body(request)
        if verb == "container":
            return JSONResponse(await run(request, container_predict, body))
        name = endpoint_name(match)
        if verb == "explain":
            return JSONResponse(await run(request, explain, name, body))
        deployed, version, predictions = await run(request, predict, name, body)
        if verb == "rawPredict":
            return JSONResponse({"predictions": predictions}, headers={
                "X-Vertex-AI-Deployed-Model-Id": deployed["id"], "X-Vertex-AI-Model": version["name"],
                "X-Vertex-AI-Model-Version-Id": version["versionId"]})
        return JSONResponse({"predictions": predictions, "deployedModelId": deployed["id"],
                             "model": version["name"], "modelDisplayName": version["displayName"],
                             "modelVersionId": version["versionId"]})

    @app.api_route("/{path:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
                   include_in_schema=False)
    async def every_route(request: Request) -> JSONResponse:
        """Every request comes here, so every answer (errors included) is Vertex's JSON and no
        exception reaches the server (which would drop the keep-alive connection)."""
        try:
            return await dispatch(request)
        except RequestError as e:
            response = JSONResponse(_error_json(e.code, scrub(e.message), e.status), status_code=e.code)
            if e.code == 405:
                response.headers["Allow"] = "POST" if "use POST" in e.message else "GET, HEAD"
        except Cancelled as e:
            code = 504 if isinstance(e, DeadlineExceeded) else 499
            response = JSONResponse(_error_json(code, str(e)), status_code=code)
        except (QueueFullError, ServerBusyError) as e:
            response = JSONResponse(_error_json(503, str(e)), status_code=503)
        except DamagedFileError as e:  # the server's data, not the client's request: named in the log
            log.error("%s", e)
            response = JSONResponse(_error_json(500, f"the registry's file {e.path.parent.name}/{e.path.name} is "
                                                     "damaged; see the server log"), status_code=500)
        except Exception:  # noqa: BLE001  (a bug: logged with an id the answer quotes, no details leak)
            incident = secrets.token_hex(4)
            log.exception("internal error %s on %s %s", incident, request.method, request.scope["path"][:200])
            response = JSONResponse(_error_json(500, f"internal error {incident}; see the server log"),
                                    status_code=500)
        if response.status_code == 408:  # the body never arrived: do not wait for it
            response.headers["Connection"] = "close"
        return response

    return app
