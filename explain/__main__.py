"""``python -m explain --model_dir=DIR --output_dir=OUT [--method=ig|xrai] [--step_count=5] IMAGES...``

Explain image files against an exported model directory and write the three-panel figures.
"""

from __future__ import annotations

from typing import Any

import fire

from explain.files import explain_files, local_explainer
from explain.model import load_explainable_model
from explain.parameters import DEFAULT_ADAPTIVE_START, DEFAULT_FIXED_STEP_COUNT

_METHODS = {"ig": "integrated_gradients_attribution", "xrai": "xrai_attribution"}


def main(*image_files: str, model_dir: str, output_dir: str, method: str = "ig",
         step_count: int | None = None,
         quadrature: str | None = None, target_error: float | None = None, fixed_steps: bool = False,
         max_step_count: int | None = None, map_target: float | None = None, completeness_only: bool = False,
         top_k: int = 1,
         batch_size: int = 8) -> list[str]:
    """Explain IMAGE_FILES with the model in MODEL_DIR; figures and explanations.json in OUTPUT_DIR.

    Args:
      method: ig (Integrated Gradients) or xrai.
      step_count: path steps to start from (Vertex range 1..100); default 5 refined (XRAI starts
        from at least 17), or 50 with fixed steps.
      quadrature: extension: a fixed-step rule (turns refinement off): riemann_middle, gauss_legendre
        (smooth activations), riemann_trapezoid, ...
      target_error: extension: the approximation error each path is refined to (default 0.05).
      fixed_steps: exactly step_count steps, no refinement (Vertex's own semantics).
      max_step_count: extension: the most gradient evaluations one path may cost (default 400).
      map_target: extension: also refine until each map's estimated relative L1 error is at most
        this (default explain.parameters.DEFAULT_MAP_TARGET; XRAI's judged on its segments'
        mean attributions: completeness alone cannot see pixels that cancel in the sum).
      completeness_only: refine to target_error alone, no map_target (``map_target: null``).
      top_k: classes explained per image (figures show the first).
    """
    if method not in _METHODS:
        raise ValueError(f"--method must be one of {sorted(_METHODS)}, got {method!r}")
    fixed = fixed_steps or (quadrature and not target_error)
    spec: dict[str, Any] = {"step_count": step_count or (DEFAULT_FIXED_STEP_COUNT if fixed else DEFAULT_ADAPTIVE_START)}
    if quadrature:
        spec["quadrature"] = quadrature
    if target_error:
        spec["target_error"] = target_error
    if fixed_steps:
        spec["target_error"] = None
    if max_step_count:
        spec["max_step_count"] = max_step_count
    if map_target is not None and completeness_only:
        raise ValueError("--map_target and --completeness_only contradict each other: choose one")
    if map_target is not None:
        spec["map_target"] = map_target
    if completeness_only:
        spec["map_target"] = None
    parameters = {_METHODS[method]: spec, "top_k": top_k}
    model = load_explainable_model(model_dir)
    return explain_files(list(image_files), local_explainer(model, parameters), output_dir,
                         batch_size=batch_size, suffix=method)


if __name__ == "__main__":
    import sys

    from explain.files import FilesNotExplained

    try:
        fire.Fire(main)
    except (FilesNotExplained, ValueError) as e:  # ModelLoadError is one; said plainly, no traceback
        sys.exit(f"error: {e}")
