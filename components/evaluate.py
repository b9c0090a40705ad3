"""Step 3, evaluate: score the new model (the challenger) *and* the version now serving (the
champion) on the same evaluation data in the same run, and decide whether the challenger may
replace it.

Why both are scored here rather than the champion's figures read back from the registry: stored
figures come from another run, perhaps on other data, and may be missing (a run killed between
upload and evaluation import left a default version without one, and the gate then let a 0.60
retrain replace a 0.95 champion). So the champion's exported model is loaded from its artifact URI
and scored next to the challenger; its stored evaluation is read only when that fails. When there
is a champion but neither works, the gate fails closed and says why; when no model of that name
exists at all, only ``gate.allow_first_deploy`` lets the challenger through.

A refusal is a clean, explained outcome, not an error: the serving version keeps all its traffic.

    python -m components.evaluate --export_dir=runs/x/model --eval_data_path='data/validation/*.tfrec' \\
        --min_accuracy=0.8 --registry_dir=local_registry --model_display_name=flowers-xai
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

import fire

_LOGGER = logging.getLogger(__name__)


@dataclass
class Champion:
    """The version serving now: its name, where its model is, and how it scored in this run.
    ``accuracy`` is None when it could be neither scored nor read back (``problem`` says why)."""

    model: str
    artifact_uri: str
    accuracy: float | None = None
    #: "scored" (on this run's data), "stored" (its imported evaluation, a fallback) or "".
    source: str = ""
    problem: str = ""
    metrics: dict[str, Any] | None = None


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
    probs = np.concatenate(probs)
    return classification_metrics(np.concatenate(y_true), probs, read_labels(export_dir, probs.shape[-1]))


def find_champion(backend: str, model_display_name: str, registry_dir: str = "", project: str = "",
                  location: str = "", api_endpoint: str = "") -> Champion | None:
    """The ``default`` version of the model called ``model_display_name``; None if there is no such
    model. Two models with that name is an error (which one serves?)."""
    if backend == "vertex":
        from components.vertex import serving_version

        found = serving_version(model_display_name, project=project, location=location,
                                api_endpoint=api_endpoint or None)
        return Champion(found["versioned_resource_name"], found["artifact_uri"]) if found else None
    from serving.registry import Registry, RegistryError

    models = Registry(registry_dir).list_models(display_name=model_display_name)
    if len(models) > 1:
        raise RegistryError(f"{len(models)} models are called {model_display_name!r} in {registry_dir}; "
                            "the gate cannot tell which one serves")
    if not models:
        return None
    return Champion(f"{models[0]['name']}@{models[0]['versionId']}", models[0]["artifactUri"])


def stored_accuracy(backend: str, champion: Champion, model_display_name: str, registry_dir: str = "",
                    project: str = "", location: str = "", api_endpoint: str = "") -> float | None:
    """The champion's accuracy from its newest imported evaluation (schema keys), or None."""
    from components.metrics_schema import accuracy_from_schema_metrics

    if backend == "vertex":
        from components.vertex import serving_metrics

        metrics = serving_metrics(model_display_name, project=project, location=location,
                                  api_endpoint=api_endpoint or None)
    else:
        from serving.registry import Registry

        evaluations = Registry(registry_dir).list_model_evaluations(champion.model)
        metrics = evaluations[-1]["metrics"] if evaluations else None
    return accuracy_from_schema_metrics(metrics) if metrics else None


def score_champion(champion: Champion, eval_data_path: str, backend: str, model_display_name: str,
                   registry_dir: str = "", project: str = "", location: str = "",
                   api_endpoint: str = "") -> Champion:
    """Score the champion's exported model on ``eval_data_path``; if it cannot be loaded or run,
    fall back to its stored evaluation; record why at each step that fails."""
    from components.common import readable_path

    try:
        champion.metrics = evaluate_export(readable_path(champion.artifact_uri), eval_data_path)
        champion.accuracy, champion.source = float(champion.metrics["accuracy"]), "scored"
        return champion
    except Exception as exc:  # noqa: BLE001  (any failure to score means: look elsewhere, then fail closed)
        champion.problem = (f"its model at {champion.artifact_uri} could not be scored "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
        _LOGGER.warning("champion %s: %s", champion.model, champion.problem)
    try:
        accuracy = stored_accuracy(backend, champion, model_display_name, registry_dir, project, location,
                                   api_endpoint)
    except Exception as exc:  # noqa: BLE001
        accuracy = None
        champion.problem += f"; its stored evaluation could not be read ({type(exc).__name__}: {exc})"
    if accuracy is None:
        champion.problem += "" if "stored evaluation" in champion.problem else "; it has no stored evaluation"
    else:
        champion.accuracy, champion.source = accuracy, "stored"
    return champion


def gate(accuracy: float, min_accuracy: float, champion: Champion | None, margin: float = 0.0,
         allow_first_deploy: bool = False, require_not_worse: bool = True) -> tuple[bool, str]:
    """(deploy?, the reason in one sentence). The challenger needs ``min_accuracy`` and, against a
    champion, at least the champion's accuracy plus ``margin`` (0: not worse; 0.01: a point better;
    negative: tolerate that much noise). No champion passes only on a first deploy; a champion that
    could not be scored nor read back fails closed."""
    if accuracy < min_accuracy:
        return False, f"not deployed: accuracy {accuracy:.4f} is below the threshold {min_accuracy:.4f}"
    if champion is None:
        if allow_first_deploy:
            return True, f"deploy: accuracy {accuracy:.4f} >= threshold {min_accuracy:.4f}, first deploy"
        return False, ("not deployed: no model of this name is registered, so there is no champion to compare "
                       "with; set gate.allow_first_deploy: true for the first deploy")
    if not require_not_worse:
        return True, f"deploy: accuracy {accuracy:.4f} >= threshold {min_accuracy:.4f} (no comparison asked for)"
    if champion.accuracy is None:
        return False, f"not deployed (fail closed): the serving version {champion.model}: {champion.problem}"
    against = f"serving version {champion.model} {champion.accuracy:.4f} ({champion.source})"
    if accuracy < champion.accuracy + margin:
        return False, (f"not deployed: accuracy {accuracy:.4f} is worse than the {against} "
                       f"plus the margin {margin:+.4f}")
    return True, f"deploy: accuracy {accuracy:.4f} >= threshold {min_accuracy:.4f}, {against}, margin {margin:+.4f}"


def evaluate(export_dir: str, eval_data_path: str, min_accuracy: float, backend: str = "local",
             model_display_name: str = "flowers-xai", require_not_worse: bool = True, registry_dir: str = "",
             project: str = "", location: str = "", api_endpoint: str = "", margin: float = 0.0,
             allow_first_deploy: bool = False) -> dict[str, Any]:
    """Score the challenger and the champion side by side, decide. Returns ``{metrics, champion,
    deploy, reason, comparison}``; ``comparison`` (both scores, the decision) is what the upload
    step records with the new version's evaluation."""
    metrics = evaluate_export(export_dir, eval_data_path)
    champion = find_champion(backend, model_display_name, registry_dir, project, location, api_endpoint)
    if champion is not None:
        champion = score_champion(champion, eval_data_path, backend, model_display_name, registry_dir, project,
                                  location, api_endpoint)
    deploy, reason = gate(float(metrics["accuracy"]), min_accuracy, champion, margin, allow_first_deploy,
                          require_not_worse)
    print(reason)
    comparison = {"challenger_accuracy": float(metrics["accuracy"]), "eval_data_path": eval_data_path,
                  "champion": champion.model if champion else "",
                  "champion_accuracy": champion.accuracy if champion else None,
                  "champion_source": champion.source if champion else "", "deploy": deploy, "reason": reason,
                  "margin": margin}
    return {"metrics": metrics, "champion": asdict(champion) if champion else None, "deploy": deploy,
            "reason": reason, "comparison": comparison}


if __name__ == "__main__":
    fire.Fire(evaluate, serialize=lambda r: json.dumps({k: r[k] for k in ("deploy", "reason", "comparison")}))
