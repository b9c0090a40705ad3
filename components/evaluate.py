"""Step 3, evaluate: score the *exported* model on the validation data and decide whether it may
be deployed.

The gate passes when accuracy reaches the configured threshold and (by default) is not worse than
the version currently serving, whose figures are read back from its imported ModelEvaluation (on
Vertex) or the local registry. A failed gate is a clean, explained outcome, not an error: the
serving version keeps all its traffic.
"""

from __future__ import annotations

import json
from typing import Any

import fire

def evaluate_export(export_dir: str, eval_data_path: str, batch_size: int = 64) -> dict[str, Any]:
    """Accuracy, loss, per-class precision/recall and confusion matrix of ``serving_default`` on the
    records' own image bytes: exactly what the endpoint will see."""
    import trainer  # noqa: F401

    import numpy as np
    import tensorflow as tf

    from trainer.data import list_files
    from trainer.export import inspect_signatures, read_labels
    from trainer.schema import FEATURE_CLASS, FEATURE_IMAGE, SERVING_SIGNATURE
    from trainer.train import classification_metrics

    names = inspect_signatures(export_dir)
    serve = tf.saved_model.load(export_dir).signatures[SERVING_SIGNATURE]
    spec = {FEATURE_IMAGE: tf.io.FixedLenFeature([], tf.string), FEATURE_CLASS: tf.io.FixedLenFeature([], tf.int64)}
    ds = (tf.data.TFRecordDataset(list_files(eval_data_path))
          .map(lambda r: tf.io.parse_single_example(r, spec)).batch(batch_size))
    y_true, probs = [], []
    for batch in ds:
        probs.append(serve(**{names.serving_input: batch[FEATURE_IMAGE]})[names.serving_output].numpy())
        y_true.append(batch[FEATURE_CLASS].numpy())
    return classification_metrics(np.concatenate(y_true), np.concatenate(probs), read_labels(export_dir))


def champion_metrics(backend: str, model_display_name: str, registry_dir: str = "", project: str = "",
                     location: str = "", api_endpoint: str = "") -> dict[str, Any] | None:
    """Metrics of the version now serving (the ``default`` alias), or None if there is none."""
    if backend == "vertex":
        from components.vertex import serving_metrics

        return serving_metrics(model_display_name, project=project, location=location, api_endpoint=api_endpoint or None)
    from serving.registry import Registry, RegistryError

    registry = Registry(registry_dir)
    models = registry.list_models(display_name=model_display_name)
    if not models:
        return None
    try:
        evaluations = registry.list_model_evaluations(f"{models[0]['name']}@default")
    except RegistryError:
        return None
    return evaluations[-1]["metrics"] if evaluations else None


def gate(metrics: dict[str, Any], min_accuracy: float, champion: dict[str, Any] | None,
         require_not_worse: bool = True) -> tuple[bool, str]:
    """(deploy?, the reason in one sentence)."""
    accuracy = float(metrics["accuracy"])
    if accuracy < min_accuracy:
        return False, f"not deployed: accuracy {accuracy:.4f} is below the threshold {min_accuracy:.4f}"
    if require_not_worse and champion and "accuracy" in champion and accuracy < float(champion["accuracy"]):
        return False, (f"not deployed: accuracy {accuracy:.4f} is worse than the serving version's "
                       f"{float(champion['accuracy']):.4f}")
    against = f", serving version {float(champion['accuracy']):.4f}" if champion and "accuracy" in champion else ""
    return True, f"deploy: accuracy {accuracy:.4f} >= threshold {min_accuracy:.4f}{against}"


def evaluate(export_dir: str, eval_data_path: str, min_accuracy: float, backend: str = "local",
             model_display_name: str = "flowers-xai", require_not_worse: bool = True, registry_dir: str = "",
             project: str = "", location: str = "", api_endpoint: str = "") -> dict[str, Any]:
    """Score the export, compare with the champion, decide. Returns {metrics, champion, deploy, reason}."""
    metrics = evaluate_export(export_dir, eval_data_path)
    champion = champion_metrics(backend, model_display_name, registry_dir, project, location, api_endpoint)
    deploy, reason = gate(metrics, min_accuracy, champion, require_not_worse)
    print(reason)
    return {"metrics": metrics, "champion": champion, "deploy": deploy, "reason": reason}


if __name__ == "__main__":
    fire.Fire(evaluate, serialize=lambda r: json.dumps({k: r[k] for k in ("deploy", "reason")}))
