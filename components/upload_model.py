"""Step 4, upload_model: register the exported model with its explanation metadata (from the
export step) and parameters (from config), as a new version of the model with that display name
(``parent_model``) when one exists, and import its evaluation (schema keys, for the console) with
the gate's comparison (both scores) in the evaluation's metadata.

The new version does not take the ``default`` alias here: the deploy step moves it once the
version serves, so ``default`` always names the version that serves (the next run's champion).
Locally the upload is one locked, idempotent registry step (:meth:`Registry.upload_version`).

Deploy targets on Vertex: ``custom_container`` (our server; explanations carried in predictions,
default parameters passed in its environment) or ``builtin_explanations`` (Vertex's prebuilt TF
image with the explanation spec at upload; deprecated 2026-03-16, stops on 2027-03-16).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import fire

from components.common import as_dict


def upload_model(export_dir: str, display_name: str, metrics: dict | str, explanation_parameters: dict | str,
                 backend: str = "local", deploy_target: str = "custom_container", labels: dict | str | None = None,
                 version_aliases: Sequence[str] | str = (), registry_dir: str = "", project: str = "",
                 location: str = "", api_endpoint: str = "", serving_image: str = "",
                 prebuilt_image: str = "", comparison: dict | str | None = None,
                 eval_data_path: str = "") -> dict[str, Any]:
    """Upload; returns {"model": "<resource name>@<version>", "version_id", "parent_model"}.
    ``comparison`` is the evaluate step's record (challenger and champion scores, decision).

    With ``deploy_target="builtin_explanations"`` Vertex's own server computes the explanations
    with exactly the uploaded ``step_count``, so it is measured first on ``eval_data_path``
    (:func:`explain.calibration.calibrate_parameters`): the smallest count meeting 0.05 on 90%
    of the validation images, or the largest with a warning."""
    from components.metrics_schema import CLASSIFICATION_METRICS_SCHEMA, classification_schema_metrics
    from explain.parameters import vertex_parameters
    from trainer.export import read_explanation_metadata

    metadata = read_explanation_metadata(export_dir)  # produced by the export step, never typed here
    parameters = as_dict(explanation_parameters)
    metrics = as_dict(metrics)
    comparison = as_dict(comparison)
    labels = as_dict(labels)
    aliases = [a for a in (version_aliases.split(",") if isinstance(version_aliases, str) else version_aliases) if a]

    if backend == "vertex":
        from components import vertex

        builtin = deploy_target == "builtin_explanations"  # vertex.upload_model warns about its end date
        if builtin and eval_data_path:
            from explain.calibration import calibrate_parameters

            parameters, _ = calibrate_parameters(export_dir, eval_data_path, parameters)
        uploaded = vertex.upload_model(
            display_name=display_name, artifact_uri=export_dir,
            explanation_metadata=metadata if builtin else None,
            explanation_parameters=vertex_parameters(parameters) if builtin else None,
            serving_container_image_uri=(prebuilt_image or vertex.PREBUILT_TF_PREDICTION_IMAGE) if builtin else serving_image,
            labels=labels or {}, version_aliases=aliases, is_default_version=False,
            serving_container_env=None if builtin else {"EXPLANATION_PARAMETERS": json.dumps(parameters)},
            description="flowers classifier with explanations", project=project, location=location,
            api_endpoint=api_endpoint or None)
        model = uploaded["versioned_resource_name"]
        vertex.import_evaluation(model, metrics, metadata=comparison or None, project=project, location=location,
                                 api_endpoint=api_endpoint or None)
        return {"model": model, "version_id": uploaded["version_id"], "display_name": display_name}

    from serving.registry import Registry

    registry = Registry(registry_dir)
    version = registry.upload_version(display_name, os.path.abspath(export_dir), explanation_metadata=metadata,
                                      explanation_parameters=parameters, labels=labels or None,
                                      version_aliases=aliases)
    model = f"{version['name']}@{version['versionId']}"
    parent = version["name"] if version["versionId"] != "1" else None
    registry.import_model_evaluation(model, classification_schema_metrics(metrics), display_name="validation",
                                     metrics_schema_uri=CLASSIFICATION_METRICS_SCHEMA, metadata=comparison or None)
    print(f"Uploaded {model}" + (f" as a new version of {parent}" if parent else ""))
    return {"model": model, "version_id": version["versionId"], "display_name": display_name, "parent_model": parent}


if __name__ == "__main__":
    fire.Fire(upload_model, serialize=lambda r: json.dumps(r))
