"""The shared command line of the pipeline tools: ``--config`` plus repeatable ``--set``."""

import argparse
from typing import Callable, Sequence

from components.config import Config, ConfigError, add_config_arguments, load_config


def parse(prog: str, description: str, argv: Sequence[str] | None,
          extra: Callable[[argparse.ArgumentParser], None] | None = None) -> tuple[Config, argparse.Namespace]:
    """Parse ``argv`` and load the configuration; a bad config exits with its one-line error."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_config_arguments(parser)
    if extra:
        extra(parser)
    args = parser.parse_args(argv)
    try:
        return load_config(args.config, args.overrides), args
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
