"""4. Serving: latency (median, p95) and throughput of the local endpoint over HTTP
(``python -m serving --model DIR``, a separate process, as users run it) at concurrency 1 and 4,
vs calling the SavedModel directly in this process (``serving_default`` for predict,
``explain_images`` for explain): the difference is what HTTP, JSON and base64 cost.

Each request carries one JPEG image, as the lab's requests do; explain uses Integrated
Gradients with Vertex's usual 50 steps (a few in the quick profile). HTTP and in-process rounds alternate.
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
    """Run ``fn`` ``requests`` times from ``concurrency`` threads: (latencies, requests per second)."""
    def one(_):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    with futures.ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, range(requests)))
    return latencies, requests / (time.perf_counter() - t0)


def run(profile: Profile, assets: Assets, figures_dir: str) -> dict:
    import httpx
    import tensorflow as tf

    from explain import explain_images, load_explainable_model
    from serving.testing import wait_until_up
    from trainer.schema import SERVING_INPUT, SERVING_SIGNATURE

    explain_parameters = {"integratedGradientsAttribution": {"stepCount": profile.serving_explain_steps}}
    record = next(iter(tf.data.TFRecordDataset(tf.io.gfile.glob(assets.eval_pattern)).take(1)))
    jpeg = tf.io.parse_single_example(record, {"image": tf.io.FixedLenFeature([], tf.string)})["image"].numpy()
    body = {"instances": [{SERVING_INPUT: {"b64": base64.b64encode(jpeg).decode()}}]}

    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    server = subprocess.Popen([sys.executable, "-m", "serving", "--model", assets.model_dir, "--port", str(port),
                               "--log_level", "warning"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_up(url, timeout_s=180)
        except TimeoutError:
            server.kill()
            raise RuntimeError(f"the server did not start: {server.stderr.read().decode()[-2000:]}") from None
        client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=8))

        def http(verb: str):
            def call():
                response = client.post(f"{url}{ENDPOINT}:{verb}", json=body if verb == "predict" else
                                       dict(body, explanationSpecOverride={"parameters": explain_parameters}))
                response.raise_for_status()
            return call

        serving_fn = tf.saved_model.load(assets.model_dir)
        signature = serving_fn.signatures[SERVING_SIGNATURE]
        explainable = load_explainable_model(assets.model_dir)

        def direct_predict():
            signature(**{SERVING_INPUT: tf.constant([jpeg])})

        def direct_explain():
            explain_images(explainable, explainable.preprocess([jpeg]), explain_parameters)

        contenders = {("predict", "HTTP"): http("predict"), ("predict", "in-process"): direct_predict,
                      ("explain", "HTTP"): http("explain"), ("explain", "in-process"): direct_explain}
        for fn in contenders.values():  # warm-up: model load, tracing, connection
            fn()
        rows, raw = [], {}
        for concurrency in profile.concurrency:
            for verb, requests in (("predict", profile.predict_requests), ("explain", profile.explain_requests)):
                for i, how in enumerate(("HTTP", "in-process") if concurrency % 2 else ("in-process", "HTTP")):
                    print(f"[serving] {verb} {how} x{concurrency}", flush=True)
                    latencies, throughput = _load(contenders[(verb, how)], max(requests, concurrency), concurrency)
                    raw[f"{verb}/{how}/c{concurrency}"] = {"latencies": latencies, "throughput": throughput}
                    rows.append([verb, how, concurrency, len(latencies), float(np.median(latencies)) * 1000,
                                 float(np.percentile(latencies, 95)) * 1000, throughput])
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()

    def median_ms(key):
        return float(np.median(raw[key]["latencies"])) * 1000

    return {
        "title": "4. Serving latency and throughput",
        "description": (f"One JPEG instance per request; `python -m serving --model` in its own process on the same "
                        "cores, called with `httpx` from this process; in-process = the SavedModel's "
                        f"`serving_default` signature (predict) or `explain_images` (explain, IG {profile.serving_explain_steps} steps) called "
                        "directly. Concurrency = client threads sending requests back to back."),
        "tables": [table("Latency (ms) and throughput (requests/s)",
                         ["call", "path", "concurrency", "requests", "median ms", "p95 ms", "requests/s"], rows)],
        "headline": {"HTTP overhead on predict, median ms (concurrency 1)":
                     median_ms("predict/HTTP/c1") - median_ms("predict/in-process/c1"),
                     "explain latency over HTTP, median ms (concurrency 1)": median_ms("explain/HTTP/c1")},
        "raw": raw,
    }
