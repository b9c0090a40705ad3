"""``python -m serving``: serve the local registry, one model directory, or (with Vertex's ``AIP_*``
environment) run as the custom prediction container. ``--help`` lists every option."""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from typing import Any, Mapping, Sequence

from serving.batching import BatchingParameters
from serving.instances import Limits

DEFAULT_PORT = 8080  # Vertex's AIP_HTTP_PORT default
#: Kubernetes (which runs Vertex's prediction containers) waits 30 s after SIGTERM before SIGKILL:
#: in-flight requests get 20 s, leaving time to cancel what remains and exit.
DEFAULT_GRACEFUL_SHUTDOWN_S = 20.0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    defaults, batching = Limits(), BatchingParameters()
    p = argparse.ArgumentParser(
        prog="python -m serving", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Serve Vertex AI's prediction REST API (GET endpoint, :predict, :explain, :rawPredict) "
                    "locally. With AIP_PREDICT_ROUTE set (Vertex custom container), predictions carry "
                    "their explanations and the model comes from --model or AIP_STORAGE_URI.")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--registry", help="registry root: serve all its endpoints (re-read on every request)")
    source.add_argument("--model", help="model directory (local, file:// or gs://) served behind every endpoint "
                                        "name; default AIP_STORAGE_URI")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 inside a container)")
    p.add_argument("--port", type=int, default=int(environ.get("AIP_HTTP_PORT", DEFAULT_PORT)),
                   help="port (AIP_HTTP_PORT if set)")
    p.add_argument("--max_body_bytes", type=int, default=defaults.max_body_bytes, help="largest request body")
    p.add_argument("--max_instances", type=int, default=defaults.max_instances, help="most instances per request")
    p.add_argument("--max_image_pixels", type=int, default=defaults.max_image_pixels,
                   help="largest image (width x height), checked from the header before decoding")
    p.add_argument("--explain_budget", type=_positive_int,
                   default=environ.get("AIP_EXPLAIN_BUDGET") or None,
                   help="most gradient evaluations one explanation request may cost (instances x outputs x "
                        "baselines x SmoothGrad samples x steps per path); larger requests get a 400 "
                        "(env AIP_EXPLAIN_BUDGET; default explain.cost.DEFAULT_EXPLAIN_BUDGET, 2000)")
    p.add_argument("--explain_concurrency", type=_positive_int,
                   default=environ.get("AIP_EXPLAIN_CONCURRENCY") or None,
                   help="explanations running at once; more wait their turn (env AIP_EXPLAIN_CONCURRENCY; "
                        "default: the cores this process may use)")
    p.add_argument("--explain_queue", type=_non_negative_int,
                   default=environ.get("AIP_EXPLAIN_QUEUE") or None,
                   help="explanations waiting for a turn at most; more, and those whose deadline passes while "
                        "they wait or whose turn leaves under a quarter of it (up to 5 s), are answered 503 "
                        "(env AIP_EXPLAIN_QUEUE; default: 4 per running one)")
    p.add_argument("--request_deadline_s", type=float,
                   default=float(environ.get("AIP_REQUEST_DEADLINE_S") or defaults.request_deadline_s),
                   help="each request's deadline: work still running then is stopped and answered 504 "
                        "(env AIP_REQUEST_DEADLINE_S)")
    p.add_argument("--body_timeout_s", type=float, default=defaults.body_timeout_s,
                   help="time a client has to send its request body (408 after)")
    p.add_argument("--head_timeout_s", type=_positive_float, default=defaults.head_timeout_s,
                   help="time a connection has to send a request's line and headers (408 and closed after)")
    p.add_argument("--graceful_shutdown_s", type=float, default=DEFAULT_GRACEFUL_SHUTDOWN_S,
                   help="after SIGTERM, time in-flight requests have to finish before they are cancelled")
    p.add_argument("--allowed_hosts", default=None,
                   help="comma-separated Host names to answer; default: loopback names when bound to "
                        "loopback, any otherwise")
    p.add_argument("--max_batch_size", type=_positive_int, default=batching.max_batch_size,
                   help=":predict batching: most instances per model call (TF Serving's max_batch_size)")
    p.add_argument("--batch_timeout_micros", type=int, default=batching.batch_timeout_micros,
                   help=":predict batching: longest wait for a batch to fill (TF Serving's batch_timeout_micros)")
    p.add_argument("--explanation_parameters", default=environ.get("EXPLANATION_PARAMETERS"),
                   help="default explanation parameters (Vertex JSON, or a path/URI of a JSON file) for models "
                        "without an explanationSpec; default env EXPLANATION_PARAMETERS")
    p.add_argument("--cache_dir", default=os.path.join(tempfile.gettempdir(), "serving-model-cache"),
                   help="where models from gs:// or file:// URIs are copied")
    p.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def load_parameters(value: str | None) -> dict[str, Any] | None:
    """Explanation parameters from JSON text or from a JSON file (local path or any gfile URI)."""
    if not value:
        return None
    text = value
    if not value.lstrip().startswith("{"):
        if "://" in value:
            import trainer  # noqa: F401
            import tensorflow as tf

            with tf.io.gfile.GFile(value) as f:
                text = f.read()
        else:
            with open(value, encoding="utf-8") as f:
                text = f.read()
    try:
        parameters = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"explanation parameters {value[:80]!r}: not valid JSON ({e})") from e
    if not isinstance(parameters, dict):
        raise SystemExit(f"explanation parameters {value[:80]!r}: must be a JSON object")
    return parameters


def build_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None):
    """The server configuration and bind address from the command line and ``AIP_*`` variables."""
    environ = os.environ if environ is None else environ
    args = _parser(environ).parse_args(argv)  # before heavy imports: --help stays instant

    from serving.app import LOOPBACK_HOSTS, ServerConfig
    from serving.backends import ModelDirBackend, RegistryBackend
    from serving.registry import Registry

    limits = Limits(args.max_body_bytes, args.max_instances, args.max_image_pixels,
                    request_deadline_s=args.request_deadline_s, body_timeout_s=args.body_timeout_s,
                    head_timeout_s=args.head_timeout_s)
    parameters = load_parameters(args.explanation_parameters)
    if parameters is not None:  # fail at start, not at the first request
        from explain import ExplanationParametersError, parse_explanation_parameters

        try:
            parse_explanation_parameters(parameters)
        except ExplanationParametersError as e:
            raise SystemExit(f"--explanation_parameters / EXPLANATION_PARAMETERS: {e}") from e
    predict_route = environ.get("AIP_PREDICT_ROUTE") or None
    health_route = environ.get("AIP_HEALTH_ROUTE") or "/health"
    model = args.model or (None if args.registry else environ.get("AIP_STORAGE_URI"))
    if args.registry:
        if predict_route:
            raise SystemExit("AIP_PREDICT_ROUTE (custom-container mode) serves one model: use --model or "
                             "AIP_STORAGE_URI, not --registry")
        backend = RegistryBackend(Registry(args.registry))
    elif model:
        from serving.models import fetch_model

        backend = ModelDirBackend(fetch_model(model, args.cache_dir), parameters)
    else:
        raise SystemExit("nothing to serve: give --registry DIR or --model DIR (or set AIP_STORAGE_URI)")
    if args.allowed_hosts:
        allowed_hosts = tuple(h.strip().lower() for h in args.allowed_hosts.split(",") if h.strip())
    else:
        allowed_hosts = LOOPBACK_HOSTS if args.host in LOOPBACK_HOSTS or args.host == "localhost" else None
    try:
        batching = BatchingParameters(max_batch_size=args.max_batch_size,
                                      batch_timeout_micros=args.batch_timeout_micros)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    config = ServerConfig(backend=backend, cache_dir=args.cache_dir, limits=limits, health_route=health_route,
                          predict_route=predict_route, explanation_parameters=parameters,
                          preload=not args.registry, explain_budget=args.explain_budget,
                          explain_concurrency=args.explain_concurrency, explain_queue=args.explain_queue,
                          allowed_hosts=allowed_hosts, batching=batching,
                          graceful_shutdown_s=args.graceful_shutdown_s)
    return config, args.host, args.port, args.log_level


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    from serving.connections import head_timeout_protocol

    config, host, port, log_level = build_config(argv)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from serving.app import create_app

    app = create_app(config)

    class Server(uvicorn.Server):
        """uvicorn's server, which also tells the explanations still waiting for a slot that the
        server is going away (503 at once, :meth:`serving.admission.ExplanationSlots.close`)
        instead of starting them within the grace period; the app hears of SIGTERM only after it."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.slots.close("the server is shutting down")
            super().handle_exit(sig, frame)

    # After SIGTERM uvicorn stops accepting, lets in-flight requests finish for the grace period,
    # then cancels them (their explanations stop within one chunk) and exits.
    Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          timeout_graceful_shutdown=config.graceful_shutdown_s,
                          http=head_timeout_protocol(config.limits.head_timeout_s))).run()


if __name__ == "__main__":
    main()
