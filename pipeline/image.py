"""``make image``: build and push the components and serving images with Cloud Build, tagged as
the configuration names them (``images.components``, ``images.serving``)."""

import shutil
import subprocess
from typing import Sequence


def build_command(components_image: str, serving_image: str, project: str) -> list[str]:
    """The ``gcloud builds submit`` command for ``docker/cloudbuild.yaml``."""
    return ["gcloud", "builds", "submit", "--project", project, "--config", "docker/cloudbuild.yaml",
            f"--substitutions=_COMPONENTS_IMAGE={components_image},_SERVING_IMAGE={serving_image}", "."]


def main(argv: Sequence[str] | None = None) -> None:
    from pipeline.cli import parse

    cfg, _ = parse("python -m pipeline.image", __doc__, argv)
    if not cfg.gcp.project:
        raise SystemExit("error: gcp.project is empty; set it in the config or with --set gcp.project=ID")
    if not cfg.images.components or not cfg.images.serving or "PROJECT" in cfg.images.components + cfg.images.serving:
        raise SystemExit("error: images.components and images.serving must name your Artifact Registry images")
    if shutil.which("gcloud") is None:
        raise SystemExit("error: gcloud is not installed; install the Google Cloud CLI to build images")
    subprocess.run(build_command(cfg.images.components, cfg.images.serving, cfg.gcp.project), check=True)


if __name__ == "__main__":
    main()
