"""Step 6, explain_smoke: send one validation image to the deployed endpoint through the official
``aiplatform`` client and check that the answer has a prediction and attributions; write the
explained prediction as the lab's three-panel figure.

Locally the step starts the endpoint server on the registry for the duration of the check, so the
request crosses real HTTP in Vertex's REST shape, exactly as it will in the cloud.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
from typing import Any, Iterator

import fire

#: Vertex needs a real region in aiplatform.init even when the API endpoint is our own server.
LOCAL_SDK_REGION = "us-central1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_endpoint_server(registry_dir: str, timeout_s: float = 120.0) -> Iterator[str]:
    """Run ``python -m serving --registry`` in a subprocess; yields its base URL, stops it after."""
    from serving.testing import wait_until_up

    port = _free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "serving", "--registry", registry_dir, "--port", str(port),
                             "--log_level", "warning"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, timeout_s)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _first_image(eval_data_path: str) -> tuple[bytes, int]:
    import trainer  # noqa: F401

    import tensorflow as tf

    from trainer.data import list_files
    from trainer.schema import FEATURE_CLASS, FEATURE_IMAGE

    record = next(iter(tf.data.TFRecordDataset(list_files(eval_data_path)).take(1)))
    ex = tf.io.parse_single_example(record, {FEATURE_IMAGE: tf.io.FixedLenFeature([], tf.string),
                                             FEATURE_CLASS: tf.io.FixedLenFeature([], tf.int64)})
    return ex[FEATURE_IMAGE].numpy(), int(ex[FEATURE_CLASS])


def check_response(predictions: list, explanations: list) -> dict[str, Any]:
    """The smoke test proper: one prediction, one explanation with an attribution image."""
    if not predictions:
        raise RuntimeError("explain_smoke: the endpoint returned no predictions")
    if not explanations or not explanations[0].get("attributions"):
        raise RuntimeError("explain_smoke: the endpoint returned no attributions")
    attribution = explanations[0]["attributions"][0]
    image = attribution.get("featureAttributions", {})
    (key, value), = image.items()
    if not value.get("b64_jpeg"):
        raise RuntimeError(f"explain_smoke: attribution for {key!r} has no b64_jpeg image")
    return attribution


def _call(endpoint_name: str, api_endpoint: str, project: str, location: str, instance: dict,
          explanations_in_predictions: bool, anonymous: bool) -> tuple[list, list]:
    from google.cloud import aiplatform

    kwargs: dict[str, Any] = {"project": project or "local", "location": location or LOCAL_SDK_REGION}
    if api_endpoint:
        kwargs.update(api_endpoint=api_endpoint, api_transport="rest")
    if anonymous:
        from google.auth.credentials import AnonymousCredentials

        kwargs["credentials"] = AnonymousCredentials()
    aiplatform.init(**kwargs)
    endpoint = aiplatform.Endpoint(endpoint_name)
    if explanations_in_predictions:  # our container on Vertex: each prediction carries its explanation
        predictions = [dict(p) for p in endpoint.predict([instance]).predictions]
        return [p.get("probabilities") for p in predictions], [p.get("explanation", {}) for p in predictions]
    response = endpoint.explain([instance])
    from google.protobuf import json_format

    explanations = [json_format.MessageToDict(e._pb) for e in response.explanations]
    return [list(p) for p in response.predictions], explanations


def explain_smoke(endpoint: str, eval_data_path: str, output_dir: str, backend: str = "local",
                  registry_dir: str = "", project: str = "", location: str = "", api_endpoint: str = "",
                  deploy_target: str = "custom_container") -> dict[str, Any]:
    """Explain one validation image through the endpoint; returns the attribution summary and figure."""
    import numpy as np

    from explain.visualization import decode_jpeg_b64, save_explanation_figure
    from trainer.preprocess import preprocess_image

    image_bytes, label = _first_image(eval_data_path)
    instance = {"bytes_inputs": {"b64": base64.b64encode(image_bytes).decode()}}
    if backend == "vertex":
        predictions, explanations = _call(endpoint, api_endpoint, project, location, instance,
                                          deploy_target == "custom_container", anonymous=False)
    else:
        with local_endpoint_server(registry_dir) as url:
            predictions, explanations = _call(endpoint, url, "local", LOCAL_SDK_REGION, instance, False, True)
    attribution = check_response(predictions, explanations)
    (key, value), = attribution["featureAttributions"].items()
    os.makedirs(output_dir, exist_ok=True)
    pixels = preprocess_image(image_bytes).numpy()
    figure = save_explanation_figure(
        pixels, decode_jpeg_b64(value["b64_jpeg"]), os.path.join(output_dir, "explained_prediction.png"),
        title=f"{attribution.get('outputDisplayName', '')} ({float(np.max(predictions[0])):.2f}); "
              f"approximation error {float(attribution.get('approximationError', 0.0)):.3f}")
    summary = {"figure": figure, "predicted": attribution.get("outputDisplayName"), "true_class_index": label,
               "probabilities": [float(p) for p in predictions[0]],
               "approximation_error": attribution.get("approximationError")}
    with open(os.path.join(output_dir, "explained_prediction.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"Explained prediction: {summary['predicted']} -> {figure}")
    return summary


if __name__ == "__main__":
    fire.Fire(explain_smoke, serialize=lambda r: json.dumps(r))
