"""Evaluation metrics in the keys of Vertex's ``classification_metrics_1.0.0.yaml``, and back.

Vertex validates an imported ModelEvaluation's metrics against its schema, so what the pipeline
stores (both backends, one format) holds the schema's keys and nothing else, and the console shows
them. The gate reads them back (accuracy) only as a fallback, when the champion cannot be scored.
"""

from __future__ import annotations

from typing import Any, Mapping

#: Schema Vertex uses to display classification metrics of an imported ModelEvaluation.
CLASSIFICATION_METRICS_SCHEMA = "gs://google-cloud-aiplatform/schema/modelevaluation/classification_metrics_1.0.0.yaml"
#: The top-level keys of ``classification_metrics_1.0.0.yaml``; Vertex validates imported metrics against it.
CLASSIFICATION_SCHEMA_KEYS = ("auPrc", "auRoc", "logLoss", "confidenceMetrics", "confusionMatrix")


def classification_schema_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Our evaluation (``accuracy``, ``loss``, ``confusion_matrix``, ``class_names``) in the schema's
    own keys and nothing else: ``logLoss`` is the cross-entropy; for single-label top-1 predictions
    micro precision@1 and recall@1 both equal accuracy (at confidence threshold 0); the confusion
    matrix with its annotation specs (the class names)."""
    out: dict[str, Any] = {key: metrics[key] for key in CLASSIFICATION_SCHEMA_KEYS if key in metrics}
    if "loss" in metrics and "logLoss" not in out:
        out["logLoss"] = float(metrics["loss"])
    if "accuracy" in metrics and "confidenceMetrics" not in out:
        accuracy = float(metrics["accuracy"])
        out["confidenceMetrics"] = [{"confidenceThreshold": 0.0, "precisionAt1": accuracy, "recallAt1": accuracy}]
    if "confusion_matrix" in metrics and "confusionMatrix" not in out:
        names = list(metrics.get("class_names") or range(len(metrics["confusion_matrix"])))
        out["confusionMatrix"] = {"annotationSpecs": [{"id": str(i), "displayName": str(n)} for i, n in enumerate(names)],
                                  "rows": [[float(c) for c in row] for row in metrics["confusion_matrix"]]}
    return out


def accuracy_from_schema_metrics(metrics: Mapping[str, Any]) -> float | None:
    """Accuracy back from stored schema metrics (precision@1 at threshold 0, or the confusion
    matrix's trace); None when neither is there."""
    for entry in metrics.get("confidenceMetrics") or []:
        if float(entry.get("confidenceThreshold", 0.0)) == 0.0 and "precisionAt1" in entry:
            return float(entry["precisionAt1"])
    rows = (metrics.get("confusionMatrix") or {}).get("rows")
    if rows:
        total = sum(sum(row) for row in rows)
        return float(sum(row[i] for i, row in enumerate(rows)) / total) if total else None
    return None
