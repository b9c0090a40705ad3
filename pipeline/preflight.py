"""Before anything is submitted to Vertex AI: refuse a configuration that still holds an example's
placeholders, or names paths Vertex cannot read, in one sentence naming the field.

Why: ``configs/vertex.yaml`` ships with ``us-central1-docker.pkg.dev/PROJECT/...`` images; submitted
as is, every task of the run fails pulling its image, twenty minutes later, in a log few people
open. Loading the config cannot refuse these (``make compile`` and the tests use the example as it
is); submitting and scheduling can, and do, here.

    python -m pipeline.preflight --config configs/vertex.yaml
"""

import re
from typing import Sequence

from components.config import DEFAULT_CONFIG, Config

VERTEX_CONFIG = "configs/vertex.yaml"

#: Text that marks an example value nobody filled in.
_PLACEHOLDER = re.compile(r"REPLACE_ME|YOUR[_-]|your[_-]|(^|[/:.@])(PROJECT|my-project)([/:.@]|$)|<[^>]*>")
#: The dataclass default: a bare Python image, which does not hold this repository.
_BARE_IMAGE = re.compile(r"^python(:[\w.-]+)?$")


class PreflightError(ValueError):
    """The configuration cannot be submitted as it is; the message names the field."""


def _is_placeholder(value: str) -> bool:
    return bool(_PLACEHOLDER.search(value))


def problems(cfg: Config) -> list[str]:
    """Every reason ``cfg`` cannot run on Vertex AI, one sentence each, naming the field."""
    found: list[str] = []

    def need(field: str, value: str, what: str, prefix: tuple[str, ...] = ()) -> None:
        if not value:
            found.append(f"{field} is empty: set it to {what}.")
        elif _is_placeholder(value):
            found.append(f"{field} still holds the example's placeholder {value!r}: set it to {what}.")
        elif prefix and not value.startswith(prefix):
            found.append(f"{field} is {value!r}, which Vertex AI cannot read: set it to {what}.")

    def optional(field: str, value: str) -> None:
        if value and _is_placeholder(value):
            found.append(f"{field} still holds the example's placeholder {value!r}: set it or leave it empty.")

    g = cfg.gcp
    need("gcp.project", g.project, "your Google Cloud project id")
    if not g.pipeline_root:
        need("gcp.bucket", g.bucket, "a gs:// bucket for the pipeline's artifacts (or set gcp.pipeline_root)",
             ("gs://",))
    else:
        need("gcp.pipeline_root", g.pipeline_root, "a gs:// URI for the pipeline's artifacts", ("gs://",))
        optional("gcp.bucket", g.bucket)
    for field in ("service_account", "network", "encryption_key", "api_endpoint"):
        optional(f"gcp.{field}", getattr(g, field))
    need("images.components", cfg.images.components, "the components image `make image` pushes")
    if _BARE_IMAGE.match(cfg.images.components):
        found.append(f"images.components is {cfg.images.components!r}, which does not hold this repository: "
                     f"set it to the components image `make image` pushes.")
    if cfg.deploy.target == "custom_container":
        need("images.serving", cfg.images.serving, "the serving image `make image` pushes")
    else:
        need("images.prebuilt_prediction", cfg.images.prebuilt_prediction, "a Vertex prebuilt TF prediction image")
    need("data.train_data_path", cfg.data.train_data_path, "gs:// training records", ("gs://",))
    if not cfg.data.eval_split_percent:
        need("data.eval_data_path", cfg.data.eval_data_path, "gs:// evaluation records", ("gs://",))
    need("training.hub_handle", cfg.training.hub_handle, "a TF Hub URL or a gs:// SavedModel",
         ("https://", "http://", "gs://"))
    return found


def check_submittable(cfg: Config) -> None:
    """Raise :class:`PreflightError` with the first problem (one sentence naming the field)."""
    found = problems(cfg)
    if found:
        raise PreflightError(found[0])


def main(argv: Sequence[str] | None = None) -> None:
    """Print every problem of a configuration for Vertex AI; exit 1 if there is any."""
    import argparse

    from components.config import ConfigError, add_config_arguments, load_config

    parser = argparse.ArgumentParser(prog="python -m pipeline.preflight", description=main.__doc__)
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(VERTEX_CONFIG if args.config == DEFAULT_CONFIG else args.config, args.overrides)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    found = problems(cfg)
    for problem in found:
        print(f"error: {problem}")
    if found:
        raise SystemExit(1)
    print("ready to submit")


if __name__ == "__main__":
    main()
