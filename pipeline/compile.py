"""``make compile``: write the pipeline spec (YAML) for a configuration."""

import os
from typing import Sequence

from components.config import Config

DEFAULT_OUTPUT = "artifacts/flowers_pipeline.yaml"


def compile_pipeline(cfg: Config, output: str = DEFAULT_OUTPUT) -> str:
    """Compile ``cfg``'s pipeline to ``output`` (YAML) and return the path."""
    from kfp import compiler

    from pipeline.definition import build_pipeline

    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    compiler.Compiler().compile(build_pipeline(cfg), output)
    return output


def main(argv: Sequence[str] | None = None) -> None:
    from pipeline.cli import parse

    cfg, args = parse("python -m pipeline.compile", "Compile the pipeline spec (YAML).", argv,
                      lambda p: p.add_argument("--output", default=DEFAULT_OUTPUT, help="where to write the spec"))
    print(f"Wrote the pipeline spec to {compile_pipeline(cfg, args.output)}")


if __name__ == "__main__":
    main()
