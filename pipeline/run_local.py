"""``make pipeline-local``: the whole pipeline offline with ``kfp.local``'s SubprocessRunner.

Each component runs as a subprocess of this interpreter (``use_venv=False``: the project's own
``.venv`` already holds everything), against the on-disk registry and the local endpoint server.
"""

import os
import sys
from typing import Sequence

from components.config import Config


def run_local(cfg: Config, pipeline_root: str = "") -> str:
    """Run the pipeline for ``cfg`` locally; returns the pipeline root holding every artifact."""
    from kfp import local

    from pipeline.definition import build_pipeline

    if cfg.backend != "local":
        raise SystemExit(f"backend is {cfg.backend!r}; the offline run needs backend: local")
    root = os.path.abspath(pipeline_root or cfg.local.work_dir)
    os.makedirs(root, exist_ok=True)
    # Components import this repository and call `python3`: make both this environment's.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=root, raise_on_error=True)
    pipeline_fn = build_pipeline(cfg)
    # Paths are resolved here, not in each component's working directory.
    pipeline_fn(registry_dir=os.path.abspath(cfg.local.registry_dir),
                      train_data_path=os.path.abspath(cfg.data.train_data_path),
                      eval_data_path=os.path.abspath(cfg.data.eval_data_path),
                      hub_handle=cfg.training.hub_handle if "://" in cfg.training.hub_handle
                      else os.path.abspath(cfg.training.hub_handle))
    return publish_explanation(root)


def _newest_run(root: str) -> str:
    """The newest run directory kfp.local made under ``root`` (``<pipeline>-<timestamp>``), or ""."""
    import glob

    runs = sorted(glob.glob(os.path.join(root, "*-*-*-*")), key=os.path.getmtime)
    return runs[-1] if runs else ""


def publish_explanation(root: str) -> str:
    """Copy this run's explained prediction to ``root/explained_prediction.png`` (where the demo
    says it is); when the gate stopped the run there is none, and a stale copy is removed."""
    import shutil

    newest = _newest_run(root)
    for name in ("explained_prediction.png", "explained_prediction.json"):
        produced = os.path.join(newest, "explain-smoke-op", name) if newest else ""
        published = os.path.join(root, name)
        if produced and os.path.exists(produced):
            shutil.copy(produced, published)
        elif os.path.exists(published):
            os.remove(published)
    return root


def outcome(root: str) -> str:
    """What the newest run under ``root`` did, in a sentence: deployed (and where its explained
    prediction is), or refused by the gate and why. A refusal ends a run with status SUCCESS (it is
    a decision, not a failure), which is easy to miss in the step logs."""
    import json

    newest = _newest_run(root)
    try:
        with open(os.path.join(newest, "evaluate-op", "executor_output.json")) as f:
            decision = json.load(f)["parameterValues"]
    except (OSError, ValueError, KeyError):
        return f"Pipeline finished; artifacts under {root}"
    if not decision.get("deploy"):
        return (f"The gate refused the new model ({decision.get('reason', 'no reason recorded')}): nothing was "
                f"deployed, and the serving version, if any, keeps its traffic. Artifacts under {newest}")
    return (f"Deployed ({decision.get('reason', '')}). The explained prediction is "
            f"{os.path.join(root, 'explained_prediction.png')}; make serve answers :predict and :explain for "
            "the endpoint (README, Local endpoint)")


def main(argv: Sequence[str] | None = None) -> None:
    from pipeline.cli import parse

    cfg, args = parse("python -m pipeline.run_local", "Run the whole pipeline offline with kfp.local.", argv,
                      lambda p: p.add_argument("--pipeline_root", default="", help="default: local.work_dir"))
    print(outcome(run_local(cfg, args.pipeline_root)))


if __name__ == "__main__":
    main()
