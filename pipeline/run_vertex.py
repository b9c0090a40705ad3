"""``make pipeline`` and ``make schedule``: the configuration's pipeline on Vertex AI.

Checks first that no example placeholder is left and every path is one Vertex can read
(:mod:`pipeline.preflight`), then that a region and credentials are there, one sentence naming the
field if not; then compiles the spec for the configuration and submits it, or
creates/updates/pauses/resumes the retraining schedule. The parameter values are the spec's
defaults, which come from the config. A schedule always runs with caching off: its runs repeat the
same spec and parameters, and a cached run would retrain and deploy nothing.
"""

import os
import sys
from typing import Sequence

from components.config import Config


def _common(cfg: Config) -> dict:
    root = cfg.gcp.pipeline_root or (f"{cfg.gcp.bucket.rstrip('/')}/pipeline_root" if cfg.gcp.bucket else "")
    return dict(project=cfg.gcp.project, location=cfg.gcp.region, pipeline_root=root,
                service_account=cfg.gcp.service_account or None, labels=cfg.pipeline.labels or None,
                enable_caching=cfg.pipeline.enable_caching, encryption_spec_key_name=cfg.gcp.encryption_key or None,
                api_endpoint=cfg.gcp.api_endpoint or None)


def submit(cfg: Config, spec: str):
    from pipeline.compile import compile_pipeline
    from pipeline.submit import submit_pipeline

    compile_pipeline(cfg, spec)
    return submit_pipeline(spec, display_name=cfg.pipeline.name, network=cfg.gcp.network or None, **_common(cfg))


def schedule(cfg: Config, spec: str, action: str = "create"):
    from pipeline import schedule as schedules

    kw = dict(project=cfg.gcp.project, location=cfg.gcp.region, api_endpoint=cfg.gcp.api_endpoint or None)
    if action == "pause":
        return schedules.pause_schedule(cfg.schedule.display_name, **kw)
    if action == "resume":
        return schedules.resume_schedule(cfg.schedule.display_name, **kw)
    from pipeline.compile import compile_pipeline

    compile_pipeline(cfg, spec)
    return schedules.create_or_update_schedule(spec, cfg.schedule.display_name, cfg.schedule.cron,
                                               cfg.schedule.max_concurrent_run_count, network=cfg.gcp.network or None,
                                               **{**_common(cfg), "enable_caching": False})


def main(argv: Sequence[str] | None = None) -> None:
    from components.vertex import VertexConfigError, check_vertex_ready
    from pipeline.cli import parse
    from pipeline.preflight import PreflightError, check_submittable

    def extra(parser):
        parser.add_argument("command", choices=["submit", "schedule"])
        parser.add_argument("--action", choices=["create", "pause", "resume"], default="create",
                            help="schedule only: create or update (default), pause or resume")
        parser.add_argument("--spec", default="artifacts/flowers_pipeline.yaml", help="where the compiled spec goes")

    cfg, args = parse("python -m pipeline.run_vertex", __doc__.splitlines()[0], argv, extra)
    try:
        if cfg.backend != "vertex":
            raise VertexConfigError(f"{args.config} has backend {cfg.backend!r}; Vertex AI needs backend: vertex.")
        if args.command == "submit" or args.action == "create":
            check_submittable(cfg)
        check_vertex_ready(cfg.gcp.project, cfg.gcp.region)
        if args.command == "submit":
            submit(cfg, args.spec)
        else:
            print(schedule(cfg, args.spec, args.action))
    except (VertexConfigError, PreflightError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
