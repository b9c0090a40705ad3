"""The HTTP server: Vertex AI's prediction REST API for the local registry or one model.

Paths, request and response bodies, and errors are Vertex's, so the official ``aiplatform`` SDK
(REST transport, ``api_endpoint="http://127.0.0.1:PORT"``) works against it unchanged:

* ``GET  /v1/projects/{p}/locations/{l}/endpoints/{id}``             the Endpoint resource
* ``POST /v1/projects/{p}/locations/{l}/endpoints/{id}:predict``     PredictResponse
* ``POST /v1/projects/{p}/locations/{l}/endpoints/{id}:explain``     ExplainResponse
* ``POST /v1/projects/{p}/locations/{l}/endpoints/{id}:rawPredict``  the model's own response + headers
* ``GET  /health`` (and ``AIP_HEALTH_ROUTE``); ``POST AIP_PREDICT_ROUTE`` in custom-container mode,
  where each prediction carries its explanation (Vertex's built-in explanations are deprecated).

Handlers are ``async`` only to read the body within its size limit; checking and running models
happens in the thread pool, so slow requests never block others.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
import re
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.backends import Backend
from serving.instances import Limits, RequestError, decode_instances, parse_json_body
from serving.models import ModelCache, ServedModel

log = logging.getLogger("serving")

_ENDPOINT = "/v1/projects/{project}/locations/{location}/endpoints/{endpoint_id}"
_HTTP_STATUS = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED",
                413: "INVALID_ARGUMENT", 500: "INTERNAL", 503: "UNAVAILABLE"}


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
    #: In custom-container mode, the model is loaded at start and health says 503 until it is.
    preload: bool = False


def _error(code: int, message: str, status: str | None = None) -> JSONResponse:
    return JSONResponse(RequestError(message, code, status or _HTTP_STATUS.get(code, "UNKNOWN")).to_json(),
                        status_code=code)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it is known to exceed ``limit`` bytes (from
    Content-Length, or while streaming a chunked body) without reading the rest into memory."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"request body is {declared} bytes, over the limit of {limit} bytes", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"request body is over the limit of {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def _pick_deployed_model(endpoint: dict[str, Any], deployed_model_id: str | None, rng: random.Random) -> dict:
    """The deployed model a request goes to: the one asked for, else one drawn by traffic split."""
    deployed = {d["id"]: d for d in endpoint.get("deployedModels", [])}
    if deployed_model_id:
        if str(deployed_model_id) not in deployed:
            raise RequestError(f"endpoint {endpoint['name']} has no deployed model {deployed_model_id!r} "
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
    if not override:
        return metadata
    if not isinstance(override, dict) or not isinstance(override.get("inputs", {}), dict):
        raise RequestError("explanationSpecOverride.metadata must be {\"inputs\": {<input>: {...}}}")
    merged = copy.deepcopy(metadata)
    inputs = merged.setdefault("inputs", {})
    for name, fields in override.get("inputs", {}).items():
        if name not in inputs:
            raise RequestError(f"explanationSpecOverride.metadata.inputs: unknown input {name!r} "
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
    override = body.get("explanationSpecOverride", body.get("explanation_spec_override")) or {}
    if not isinstance(override, dict):
        raise RequestError("explanationSpecOverride must be a JSON object")
    spec = version.get("explanationSpec") or {}
    parameters = override.get("parameters") or spec.get("parameters") or default_parameters
    if not parameters:
        raise RequestError(f"model {version['name']}@{version['versionId']} has no explanationSpec and the "
                           "request has no explanationSpecOverride.parameters", 400, "FAILED_PRECONDITION")
    if not isinstance(parameters, dict):
        raise RequestError("explanationSpecOverride.parameters must be a JSON object")
    metadata = spec.get("metadata")
    if metadata is not None:
        metadata = merge_metadata(metadata, override.get("metadata"))
    elif override.get("metadata"):
        raise RequestError("explanationSpecOverride.metadata given, but the model has no explanation metadata")
    return parameters, metadata


def _check_parameters(parameters: dict[str, Any]) -> None:
    """Refuse bad explanation parameters (naming the field) before any model work."""
    from explain import ExplanationParametersError, parse_explanation_parameters

    try:
        parse_explanation_parameters(parameters)
    except ExplanationParametersError as e:
        raise RequestError(f"explanation parameters: {e}") from e


def _explain(served: ServedModel, images: list[bytes], parameters: dict, metadata: dict | None) -> list[dict]:
    """Vertex-shaped explanations of encoded images, by :func:`explain.explain_images`."""
    from explain import ExplanationParametersError, explain_images

    model = served.explainable()
    try:
        pixels = model.preprocess(images)
    except ValueError as e:  # decodable for PIL, not for the graph: named by instance
        raise RequestError(f"instances: {e}") from e
    try:
        return explain_images(model, pixels, parameters, metadata)
    except ExplanationParametersError as e:  # e.g. an override that does not fit this model
        raise RequestError(f"explanation: {e}") from e


def _vertex_explanation(explanation: dict[str, Any]) -> dict[str, Any]:
    """Vertex's Explanation message; our warnings ride along (the SDK ignores unknown fields)."""
    out = {"attributions": explanation["attributions"]}
    if explanation.get("warnings"):
        out["warnings"] = list(explanation["warnings"])
    return out


def create_app(config: ServerConfig) -> FastAPI:
    """The FastAPI application serving ``config.backend``'s endpoints."""
    cache = ModelCache(config.cache_dir)
    rng = random.Random()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if config.preload:  # in the background, so the port opens and health can say "loading"
            threading.Thread(target=preload, name="preload", daemon=True).start()
        yield

    def preload() -> None:
        try:
            served = resolve("startup")[2]
            served.explainable()  # every container prediction is explained
            served.signature()  # last: health says ready once this is set
        except Exception:  # noqa: BLE001  (health keeps answering 503; the log says why)
            log.exception("loading the model failed")

    app = FastAPI(title="Local Vertex AI prediction endpoint", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.models = cache  # for introspection (tests, debugging): which versions are loaded

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, e: RequestError) -> JSONResponse:
        return JSONResponse(e.to_json(), status_code=e.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {e.detail}"
        return _error(e.status_code, message)

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")
        return _error(500, f"internal error: {type(e).__name__}: {e}")

    def resolve(name: str, deployed_model_id: str | None = None) -> tuple[dict, dict, ServedModel]:
        endpoint = config.backend.endpoint(name)
        deployed = _pick_deployed_model(endpoint, deployed_model_id, rng)
        return endpoint, deployed, cache.get(config.backend.version(deployed))

    def predict(name: str, body: dict[str, Any]) -> tuple[dict, dict, list]:
        _, deployed, served = resolve(name)
        images = decode_instances(body, served.input_name, config.limits)
        return deployed, served.version, served.predict(images).tolist()

    def explain(name: str, body: dict[str, Any]) -> dict[str, Any]:
        deployed_id = body.get("deployedModelId", body.get("deployed_model_id"))
        _, deployed, served = resolve(name, deployed_id)
        images = decode_instances(body, served.input_name, config.limits)
        parameters, metadata = _explanation_request(body, served.version, config.explanation_parameters)
        _check_parameters(parameters)
        explanations = _explain(served, images, parameters, metadata)
        predictions = served.predict(images).tolist()
        return {"explanations": [_vertex_explanation(e) for e in explanations],
                "predictions": predictions, "deployedModelId": deployed["id"]}

    def container_predict(body: dict[str, Any]) -> dict[str, Any]:
        """Custom-container mode: every prediction carries its label and explanation."""
        _, _, served = resolve("container")
        images = decode_instances(body, served.input_name, config.limits)
        request_override = (body.get("parameters") or {}).get("explanationParameters")
        parameters, metadata = _explanation_request(
            {"explanationSpecOverride": {"parameters": request_override}} if request_override else {},
            served.version, config.explanation_parameters)
        _check_parameters(parameters)
        probabilities = served.predict(images)
        explanations = _explain(served, images, parameters, metadata)
        labels = served.labels
        return {"predictions": [
            {"probabilities": p.tolist(), "label": labels[int(p.argmax())], "labelIndex": int(p.argmax()),
             "explanation": _vertex_explanation(e)} for p, e in zip(probabilities, explanations)]}

    async def body_of(request: Request) -> dict[str, Any]:
        return parse_json_body(await _read_body(request, config.limits.max_body_bytes))

    def endpoint_name(project: str, location: str, endpoint_id: str) -> str:
        return f"projects/{project}/locations/{location}/endpoints/{endpoint_id}"

    @app.get(config.health_route)
    async def health() -> JSONResponse:
        if config.preload:
            served = await run_in_threadpool(lambda: resolve("health")[2])
            if not served.loaded:
                return _error(503, "model is loading")
        return JSONResponse({"status": "ok"})

    if config.predict_route:  # registered before the Vertex routes, so it wins any overlap
        @app.post(config.predict_route)
        async def container_predict_route(request: Request) -> JSONResponse:
            body = await body_of(request)
            return JSONResponse(await run_in_threadpool(container_predict, body))

    @app.get(_ENDPOINT)
    async def get_endpoint(project: str, location: str, endpoint_id: str) -> JSONResponse:
        name = endpoint_name(project, location, endpoint_id)
        return JSONResponse(await run_in_threadpool(config.backend.endpoint, name))

    @app.post(_ENDPOINT + ":predict")
    async def predict_route(project: str, location: str, endpoint_id: str, request: Request) -> JSONResponse:
        body = await body_of(request)
        deployed, version, predictions = await run_in_threadpool(
            predict, endpoint_name(project, location, endpoint_id), body)
        return JSONResponse({"predictions": predictions, "deployedModelId": deployed["id"],
                             "model": version["name"], "modelDisplayName": version["displayName"],
                             "modelVersionId": version["versionId"]})

    @app.post(_ENDPOINT + ":rawPredict")
    async def raw_predict_route(project: str, location: str, endpoint_id: str, request: Request) -> JSONResponse:
        body = await body_of(request)
        deployed, version, predictions = await run_in_threadpool(
            predict, endpoint_name(project, location, endpoint_id), body)
        return JSONResponse({"predictions": predictions}, headers={
            "X-Vertex-AI-Deployed-Model-Id": deployed["id"], "X-Vertex-AI-Model": version["name"],
            "X-Vertex-AI-Model-Version-Id": version["versionId"]})

    @app.post(_ENDPOINT + ":explain")
    async def explain_route(project: str, location: str, endpoint_id: str, request: Request) -> JSONResponse:
        body = await body_of(request)
        return JSONResponse(await run_in_threadpool(explain, endpoint_name(project, location, endpoint_id), body))

    return app
