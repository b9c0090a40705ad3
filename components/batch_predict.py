"""Step 7 (optional), batch_predict: explain a whole dataset with the uploaded model.

On Vertex this creates a BatchPredictionJob on the uploaded model version: Vertex starts the model's
serving container (``serving/Dockerfile``, the ``custom_container`` deploy target) on
``starting_replica_count``..``max_replica_count`` machines, sends it the instances under the input
``gs://`` URIs, and writes ``prediction.results-*`` / ``prediction.errors_stats-*`` under the
destination prefix. Each prediction carries its explanation (the container computes it), so this
keeps working after Vertex's built-in explanations stop on 2027-03-16; with the
``builtin_explanations`` target it asks Vertex for them instead (``generate_explanation``), warning.
Locally the same step runs :func:`explain.batch.explain_batch`, which writes the same layout and
line format. Nothing here schedules work: Vertex does.

Vertex reads images as JSONL instances (``{"bytes_inputs": {"b64": ...}}`` per line) or as a
``file-list`` (one ``gs://`` image URI per line). TFRecords in the lab's schema would reach the
container as serialized Examples, not images, so :func:`write_jsonl_instances` turns them (or an
image folder) into JSONL instances first.

    python -m components.batch_predict run --model_name=projects/P/locations/L/models/ID@3 \\
        --source=gs://B/instances/*.jsonl --destination=gs://B/batch --backend=vertex --project=P --location=L
    python -m components.batch_predict to_jsonl --input='gs://B/validation/*.tfrec' \\
        --output_prefix=gs://B/instances/validation
"""

from __future__ import annotations

import json
import logging
import posixpath
from typing import Any, Sequence

import fire

from components.common import as_dict

_LOGGER = logging.getLogger(__name__)
#: What Vertex can feed our container: JSONL instances or a list of image URIs.
INSTANCES_FORMATS = ("jsonl", "file-list")


def _uris(source: str | Sequence[str]) -> list[str]:
    return [u.strip() for u in (source.split(",") if isinstance(source, str) else source) if u.strip()]


def create_batch_prediction_job(model_name: str, source: str | Sequence[str], destination: str, *,
                                machine_type: str, starting_replica_count: int = 1, max_replica_count: int = 1,
                                accelerator_type: str = "", accelerator_count: int = 0, batch_size: int = 8,
                                instances_format: str = "jsonl", explanation_parameters: dict | None = None,
                                builtin_explanations: bool = False, display_name: str = "",
                                labels: dict[str, str] | None = None, service_account: str = "",
                                encryption_spec_key_name: str = "", project: str, location: str,
                                api_endpoint: str | None = None, credentials=None, sync: bool = True
                                ) -> dict[str, Any]:
    """Create a Vertex BatchPredictionJob on ``model_name`` (``.../models/ID@VERSION``) over ``source``
    (``gs://`` URIs or globs, comma separated) into ``destination`` (a ``gs://`` prefix); waits for it
    when ``sync``. ``explanation_parameters`` go to the container as the request ``parameters``
    (``{"explanationParameters": ...}``), overriding the ones it was uploaded with.

    Returns ``{"job", "state", "output_directory"}``.
    """
    from google.cloud import aiplatform

    from components import vertex

    uris = _uris(source)
    if not uris or not all(u.startswith("gs://") for u in uris):
        raise ValueError(f"source must be gs:// URIs (Vertex reads the input from Cloud Storage), got {uris}")
    if not destination.startswith("gs://"):
        raise ValueError(f"destination must be a gs:// prefix, got {destination!r}")
    if instances_format not in INSTANCES_FORMATS:
        raise ValueError(f"instances_format must be one of {INSTANCES_FORMATS} (TFRecords: convert them with "
                         f"to_jsonl first), got {instances_format!r}")
    if not 1 <= starting_replica_count <= max_replica_count:
        raise ValueError(f"need 1 <= starting_replica_count ({starting_replica_count}) <= max_replica_count "
                         f"({max_replica_count})")
    if bool(accelerator_type) != bool(accelerator_count):
        raise ValueError(f"accelerator_type ({accelerator_type!r}) and accelerator_count ({accelerator_count}) "
                         "go together: set both or neither")
    if builtin_explanations:
        vertex.warn_builtin_explanations()
    vertex.init_sdk(project, location, api_endpoint, credentials)
    model = aiplatform.Model(model_name)  # 404s here, clearly, when the version is gone
    job = aiplatform.BatchPredictionJob.create(
        job_display_name=display_name or f"{model.display_name}-batch-explain",
        model_name=model.versioned_resource_name,
        instances_format=instances_format,
        predictions_format="jsonl",
        gcs_source=uris,
        gcs_destination_prefix=destination,
        model_parameters={"explanationParameters": dict(explanation_parameters)} if explanation_parameters else None,
        machine_type=machine_type,
        accelerator_type=accelerator_type or None,
        accelerator_count=accelerator_count or None,
        starting_replica_count=starting_replica_count,
        max_replica_count=max_replica_count,
        batch_size=batch_size,
        generate_explanation=builtin_explanations,
        labels=dict(labels) if labels else None,
        service_account=service_account or None,
        encryption_spec_key_name=encryption_spec_key_name or None,
        sync=sync,
    )
    if sync:
        output = job.output_info.gcs_output_directory if job.output_info else ""
        return {"job": job.resource_name, "state": job.state.name, "output_directory": output}
    job.wait_for_resource_creation()
    return {"job": job.resource_name, "state": job.state.name, "output_directory": ""}


def write_jsonl_instances(input: str, output_prefix: str, instances_per_file: int = 1000) -> list[str]:
    """Images or TFRecords (``explain.batch_io`` inputs, local or gs://) as Vertex JSONL instance files
    ``<output_prefix>-00000.jsonl`` ...; unusable records are left out and listed on the console."""
    import tensorflow as tf

    from explain.batch_io import b64_instance, read_records, resolve_input

    parent = posixpath.dirname(output_prefix)
    if parent:
        tf.io.gfile.makedirs(parent)
    files, handle, count = [], None, 0
    for record in read_records(resolve_input(input)):
        if record.error is not None:
            print(f"skipped {record.key}: {record.error}")
            continue
        if handle is None or count == instances_per_file:
            if handle is not None:
                handle.close()
            files.append(f"{output_prefix}-{len(files):05d}.jsonl")
            handle, count = tf.io.gfile.GFile(files[-1], "w"), 0
        handle.write(json.dumps(record.instance if record.instance is not None else b64_instance(record.image)) + "\n")
        count += 1
    if handle is not None:
        handle.close()
    return files


def batch_predict(model_name: str, source: str, destination: str, backend: str = "local",
                  deploy_target: str = "custom_container", explanation_parameters: dict | str | None = None,
                  machine_type: str = "n1-standard-8", starting_replica_count: int = 1, max_replica_count: int = 1,
                  accelerator_type: str = "", accelerator_count: int = 0, batch_size: int = 8,
                  instances_format: str = "jsonl", registry_dir: str = "", project: str = "", location: str = "",
                  api_endpoint: str = "", service_account: str = "") -> dict[str, Any]:
    """The pipeline step: a BatchPredictionJob on Vertex, :func:`explain.batch.explain_batch` locally
    (into ``destination/prediction-<model>-<version>``). Returns where the predictions are."""
    parameters = as_dict(explanation_parameters) or None
    if backend == "vertex":
        return create_batch_prediction_job(
            model_name, source, destination, machine_type=machine_type, starting_replica_count=starting_replica_count,
            max_replica_count=max_replica_count, accelerator_type=accelerator_type,
            accelerator_count=accelerator_count, batch_size=batch_size, instances_format=instances_format,
            explanation_parameters=parameters, builtin_explanations=deploy_target == "builtin_explanations",
            service_account=service_account, project=project, location=location, api_endpoint=api_endpoint or None)
    from explain.batch import explain_batch
    from serving.registry import Registry

    version = Registry(registry_dir).get_model(model_name)
    parameters = parameters or (version.get("explanationSpec") or {}).get("parameters")
    output = posixpath.join(destination, f"prediction-{version['displayName']}-v{version['versionId']}")
    summary = explain_batch(",".join(_uris(source)), output, version["artifactUri"], parameters,
                            batch_size=batch_size, progress=False)
    return {"job": "local", "state": "JOB_STATE_SUCCEEDED", "output_directory": output, **summary}


if __name__ == "__main__":
    fire.Fire({"run": batch_predict, "to_jsonl": write_jsonl_instances})
