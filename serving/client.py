"""Explain image files against a running endpoint (or a model directory) and write the lab's
three-panel figures, with a progress bar for many files.

    python -m serving.client --endpoint_url=http://127.0.0.1:8080/v1/projects/local/locations/local/endpoints/ID \\
        --output_dir=OUT [--method=ig|xrai --step_count=N --top_k=K] FILES...
    python -m serving.client --model_dir=DIR --output_dir=OUT FILES...

Figures and ``explanations.json`` are written by :func:`explain.explain_files`, the same writer
``python -m explain`` uses, so local and remote explanations look identical. Without ``--method``
the endpoint's own explanationSpec applies; with it, the call carries an explanationSpecOverride.
"""

from __future__ import annotations

import base64
from typing import Any, Mapping

import httpx

from trainer.schema import DEFAULT_ADAPTIVE_START, SERVING_INPUT

_METHODS = {"ig": "integratedGradientsAttribution", "xrai": "xraiAttribution"}
#: How the server words a request over its cost budget (explain.cost.check_cost).
_OVER_BUDGET = "gradient evaluations per request"


class EndpointError(RuntimeError):
    """The endpoint refused or failed a request; the message is the server's, with its status."""


class BadRequestError(EndpointError, ValueError):
    """HTTP 400: the request itself (an instance, a parameter) was refused. A ``ValueError``, so
    :func:`explain.files.explain_files` sends each file alone to name the bad one."""


def _override(method: str | None, step_count: int | None, top_k: int | None) -> dict[str, Any] | None:
    if method is None and step_count is None and top_k is None:
        return None
    if (method or "ig") not in _METHODS:
        raise ValueError(f"--method must be one of {sorted(_METHODS)}, got {method!r}")
    parameters: dict[str, Any] = {_METHODS[method or "ig"]: {"stepCount": step_count or DEFAULT_ADAPTIVE_START}}
    if top_k is not None:
        parameters["topK"] = top_k
    return {"parameters": parameters}


def endpoint_explainer(endpoint_url: str, override: Mapping[str, Any] | None = None,
                       deployed_model_id: str | None = None, timeout_s: float = 300.0):
    """An ``explain.files.ExplainFn`` that calls ``<endpoint_url>:explain`` over HTTP."""
    url = endpoint_url.rstrip("/").removesuffix(":explain") + ":explain"
    client = httpx.Client(timeout=timeout_s)

    def explain(images: list[bytes]) -> list[Mapping[str, Any]]:
        body: dict[str, Any] = {"instances": [{SERVING_INPUT: {"b64": base64.b64encode(i).decode()}} for i in images]}
        if override:
            body["explanationSpecOverride"] = dict(override)
        if deployed_model_id:
            body["deployedModelId"] = str(deployed_model_id)
        try:
            response = client.post(url, json=body)
        except httpx.HTTPError as e:
            raise EndpointError(f"{url}: {type(e).__name__}: {e}") from e
        if response.status_code != 200:
            try:
                error = response.json()["error"]
                detail = f"{error['status']}: {error['message']}"
            except (ValueError, KeyError, TypeError):
                detail = response.text[:500]
            if response.status_code == 400 and _OVER_BUDGET in detail and len(images) > 1:
                half = len(images) // 2  # the server's cost budget is per request: send fewer images
                return [*explain(images[:half]), *explain(images[half:])]
            error_type = BadRequestError if response.status_code == 400 else EndpointError
            raise error_type(f"{url} answered HTTP {response.status_code}: {detail}")
        return response.json()["explanations"]

    return explain


def main(*image_files: str, output_dir: str, endpoint_url: str | None = None, model_dir: str | None = None,
         method: str | None = None, step_count: int | None = None, top_k: int | None = None,
         deployed_model_id: str | None = None, batch_size: int = 8, timeout_s: float = 300.0) -> list[str]:
    """Explain IMAGE_FILES via ENDPOINT_URL (or locally with MODEL_DIR); figures in OUTPUT_DIR.

    Args:
      endpoint_url: http://HOST:PORT/v1/projects/P/locations/L/endpoints/ID
      model_dir: explain locally instead (the same as ``python -m explain``).
      method: ig or xrai; with step_count/top_k, overrides the endpoint's explanation parameters.
      deployed_model_id: explain with this deployed model instead of the traffic split's pick.
      batch_size: images per request (keep requests under the server's body limit).
    """
    if (endpoint_url is None) == (model_dir is None):
        raise ValueError("give exactly one of --endpoint_url or --model_dir")
    if model_dir is not None:
        from explain.__main__ import main as explain_locally

        return explain_locally(*image_files, model_dir=model_dir, output_dir=output_dir, method=method or "ig",
                               **({"step_count": step_count} if step_count else {}), top_k=top_k or 1, batch_size=batch_size)
    from explain import explain_files

    override = _override(method, step_count, top_k)
    explain_fn = endpoint_explainer(endpoint_url, override, deployed_model_id, timeout_s)
    suffix = (method or "ig") if override else "endpoint"  # the endpoint's own spec: method unknown here
    return explain_files(list(image_files), explain_fn, output_dir, batch_size=batch_size, suffix=suffix)


if __name__ == "__main__":
    import sys

    import fire

    from explain.files import FilesNotExplained

    try:
        fire.Fire(main, serialize=lambda paths: "\n".join(paths))
    except (FilesNotExplained, EndpointError, ValueError) as e:  # said plainly, no traceback
        sys.exit(f"error: {e}")
