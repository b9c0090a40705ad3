"""Explanations for the exported image classifier: Integrated Gradients and XRAI, configured by
Vertex AI ``ExplanationParameters`` and drawn as Vertex draws them, computed locally against the
SavedModel's ``xai_preprocess``/``xai_model`` signatures.

The server (``serving/``) and the CLI (``python -m explain``) use this public API.
"""

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

from explain.explainer import explain_images
from explain.files import explain_files
from explain.model import ExplainableModel, ModelLoadError, load_explainable_model
from explain.parameters import (EXTENSION_KEYS, ExplanationConfig, ExplanationParametersError,
                                parse_explanation_parameters, vertex_parameters)
from explain.visualization import (VisualizationConfig, parse_visualization, render_attribution,
                                   save_explanation_figure)

__all__ = [
    "EXTENSION_KEYS", "ExplainableModel", "ExplanationConfig", "ExplanationParametersError", "ModelLoadError",
    "VisualizationConfig", "explain_files", "explain_images", "load_explainable_model",
    "parse_explanation_parameters", "parse_visualization", "render_attribution", "save_explanation_figure",
    "vertex_parameters",
]
