"""Explanations for the exported image classifier: Integrated Gradients and XRAI, configured by
Vertex AI ``ExplanationParameters`` and drawn as Vertex draws them, computed locally against the
SavedModel's ``xai_preprocess``/``xai_model`` signatures.

The server (``serving/``) and the CLI (``python -m explain``) use this public API. Names are
imported on first use: checking a configuration (``explain.parameters``) must not load
TensorFlow, which only the model and the explainer need (so ``import explain`` alone does
not import its submodules either: import them by name).
"""

import importlib

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

#: public name -> the module that defines it
_EXPORTS = {
    "explain_images": "explain.explainer", "NonFiniteAttributionError": "explain.explainer",
    "explain_files": "explain.files",
    "ExplainableModel": "explain.model", "ModelLoadError": "explain.model", "load_explainable_model": "explain.model",
    "EXTENSION_KEYS": "explain.parameters", "ExplanationConfig": "explain.parameters",
    "ExplanationParametersError": "explain.parameters", "parse_explanation_parameters": "explain.parameters",
    "vertex_parameters": "explain.parameters",
    "VisualizationConfig": "explain.visualization", "parse_visualization": "explain.visualization",
    "render_attribution": "explain.visualization", "save_explanation_figure": "explain.visualization",
}

__all__ = sorted(_EXPORTS)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'explain' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once
    return value
