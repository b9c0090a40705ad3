"""4. Serving over HTTP (``python -m serving --model DIR``, a separate process, as users run it):

* a single ``:explain`` of one JPEG image with default settings, one request at a time: median
  and p95 latency, for the default IG and XRAI requests (``step_count`` 5 as configs/local.yaml's,
  refined to error 0.05 by default, and the map to its estimated error ``map_target`` 0.1 by
  default, XRAI's on its segments' mean attributions: :mod:`explain.parameters`), and IG as Vertex users write it (``step_count`` 50);
* ``:predict`` throughput with 8 concurrent clients (one JPEG instance per request; the server
  batches concurrent requests) vs calling the SavedModel's ``serving_default`` in this process
  with batches of 8 images: the ratio is what HTTP, JSON, base64 and the server cost.

HTTP and in-process rounds alternate.
"""

from __future__ import annotations

import base64
import concurrent.futures as futures
import os
import socket
import subprocess
import sys
import time

import numpy as np

from bench.common import table
from bench.fixtures import Assets
from bench.profiles import Profile

ENDPOINT = "/v1/projects/local/locations/local/endpoints/bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(fn, requests: int, concurrency: int) -> tuple[list[float], float]:
    """Run ``fn`` ``requests`` times from ``concurrency`` threads: (latencies, calls per second)."""
    def one(_):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    with futures.ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, range(requests)))
    return latencies, requests / (time.perf_counter() - t0)


def explain_requests(profile: Profile) -> dict[str, dict]:
    """The default explanation requests (the quick profile caps the steps)."""
    if profile.name != "full":
        method = {"stepCount": profile.ig_start_steps, "maxStepCount": profile.ig_max_steps}
        return {"IG (default request)": {"integratedGradientsAttribution": method},
                "XRAI (default request)": {"xraiAttribution": method}}
    method = {"stepCount": profile.ig_start_steps}
    return {"IG (default request)": {"integratedGradientsAttribution": method},
            "XRAI (default request)": {"xraiAttribution": method},
            "IG (stepCount 50, refined)": {"integratedGradientsAttribution": {"stepCount": 50}}}


def explained_image(assets: Assets, scan: int = 50) -> tuple[bytes, int]:
    """The first validation JPEG whose predicted class's output gap to the black baseline is at
    least ``MIN_GAP`` (as section 1 sets apart the rest: below it a path is not refined and costs a
    fixed 16 evaluations, which would time the degenerate case, not a default explanation), and
    how many were skipped before it."""
    import tensorflow as tf

    from bench.ig_speed import MIN_GAP
    from explain import load_explainable_model

    model = load_explainable_model(assets.model_dir)
    records = tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(assets.eval_pattern))).take(scan)
    for skipped, record in enumerate(records):
        jpeg = tf.io.parse_single_example(record, {"image": tf.io.FixedLenFeature([], tf.string)})["image"].numpy()
        image = model.preprocess([jpeg])
        probs = model.predict(np.concatenate([image, np.zeros_like(image)]))
        c = int(probs[0].argmax())
        if abs(probs[0, c] - probs[1, c]) >= MIN_GAP:
            return jpeg, skipped
    raise RuntimeError(f"none of the first {scan} validation images has an output gap to black of at least {MIN_GAP}")


def run(profile: Profile, assets: Assets, figures_dir: str) -> dict:
    import httpx
    import tensorflow as tf

    from serving.testing import wait_until_up
    from trainer.schema import SERVING_INPUT, SERVING_SIGNATURE

    jpeg, skipped = explained_image(assets)
    body = {"instances": [{SERVING_INPUT: {"b64": base64.b64encode(jpeg).decode()}}]}

    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    server = subprocess.Popen([sys.executable, "-m", "serving", "--model", assets.model_dir, "--port", str(port),
                               "--log_level", "warning"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    concurrency, batch = profile.predict_concurrency, profile.predict_batch
    explain_rows, raw, warnings = [], {}, {}
    try:
        try:
            wait_until_up(url, timeout_s=600)
        except TimeoutError:
            server.kill()
            raise RuntimeError(f"the server did not start: {server.stderr.read().decode()[-2000:]}") from None
        client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=max(8, concurrency)))

        def post(verb: str, parameters: dict | None = None) -> dict:
            payload = body if parameters is None else dict(body, explanationSpecOverride={"parameters": parameters})
            response = client.post(f"{url}{ENDPOINT}:{verb}", json=payload)
            if response.status_code != 200:
                raise RuntimeError(f":{verb} answered {response.status_code}: {response.text[:1000]}")
            return response.json()

        for name, parameters in explain_requests(profile).items():
            print(f"[serving] explain {name}", flush=True)
            first = post("explain", parameters)  # warm-up (model load, tracing)
            attribution = first["explanations"][0]["attributions"][0]
            warnings[name] = {"approximationError": attribution.get("approximationError")}
            latencies, _ = _load(lambda p=parameters: post("explain", p),
                                 profile.explain_requests if "IG" in name else max(2, profile.explain_requests // 2),
                                 1)
            raw[f"explain/{name}"] = latencies
            explain_rows.append([name, len(latencies), float(np.median(latencies)) * 1000,
                                 float(np.percentile(latencies, 95)) * 1000,
                                 warnings[name]["approximationError"]])

        signature = tf.saved_model.load(assets.model_dir).signatures[SERVING_SIGNATURE]
        batch_input = tf.constant([jpeg] * batch)

        def in_process():
            signature(**{SERVING_INPUT: batch_input})

        post("predict")
        in_process()
        half = max(concurrency, profile.predict_requests // 2)
        http_lat, http_rates, local_rates = [], [], []
        for how in ("in-process", "HTTP", "HTTP", "in-process"):
            print(f"[serving] predict {how}", flush=True)
            if how == "HTTP":
                latencies, rate = _load(lambda: post("predict"), half, concurrency)
                http_lat += latencies
                http_rates.append(rate)
            else:
                _, calls = _load(in_process, max(1, half // batch), 1)
                local_rates.append(calls * batch)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()

    http_rate, local_rate = float(np.mean(http_rates)), float(np.mean(local_rates))
    raw.update({"predict/HTTP": {"latencies": http_lat, "rates": http_rates}, "predict/in-process": local_rates})
    predict_rows = [[f"HTTP :predict, {concurrency} concurrent clients, 1 image per request", len(http_lat),
                     float(np.median(http_lat)) * 1000, float(np.percentile(http_lat, 95)) * 1000, http_rate],
                    [f"in-process serving_default, batches of {batch}", 2 * max(1, half // batch) * batch,
                     float("nan"), float("nan"), local_rate]]
    headline = {f"HTTP :predict throughput at concurrency {concurrency} / in-process serving_default (batches of "
                f"{batch})": http_rate / local_rate}
    for row in explain_rows:
        headline[f"single :explain over HTTP, {row[0]}: median ms"] = row[2]
        headline[f"single :explain over HTTP, {row[0]}: p95 ms"] = row[3]
    return {
        "title": "4. Serving over HTTP",
        "description": ("One JPEG instance per request; `python -m serving --model` in its own process on the same "
                        "cores, called with `httpx` from this process. Explain: the first validation image whose "
                        f"output gap to the black baseline is at least 0.05 ({skipped} skipped before it), "
                        "one request at a time after a "
                        "warm-up request, parameters sent as `explanationSpecOverride` (only `stepCount`; "
                        "refinement to error 0.05, and the map to an estimated error of 0.1, XRAI's on its "
                        "segments' means, is the default). Predict: "
                        f"{concurrency} client threads sending requests back to back, alternating with "
                        f"in-process calls of `serving_default` on batches of {batch} images."),
        "tables": [table("A single :explain over HTTP (one image)",
                         ["request", "requests", "median ms", "p95 ms", "approximation error (first response)"],
                         explain_rows),
                   table(":predict throughput", ["path", "images", "median ms", "p95 ms", "images/s"],
                         predict_rows)],
        "headline": headline,
        "raw": raw,
    }
