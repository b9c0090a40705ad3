"""The pipeline steps as KFP components: thin typed wrappers, no logic.

Each body imports the step's plain function from ``components.<step>`` and maps KFP artifacts
(paths and metadata) to its arguments, so the code a pipeline runs is the code the CLIs and
tests run. The components run in ``images.components`` (see ``docker/Dockerfile``), which holds
this repository; under ``kfp.local`` they run in this interpreter.
"""

# (No "from __future__ import annotations": KFP reads the real annotation objects.)

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output


def split_data_op(data_path: str, eval_split_percent: int, split: Output[Dataset]
                  ) -> NamedTuple("Split", train_data_path=str, eval_data_path=str):
    """One pattern into training and evaluation records, by record hash (deterministic)."""
    from collections import namedtuple

    from components.split_data import split_records

    result = split_records(data_path, split.path, eval_split_percent)
    split.metadata.update({k: result[k] for k in ("num_train", "num_eval")})
    return namedtuple("Split", ["train_data_path", "eval_data_path"])(result["train_data_path"],
                                                                        result["eval_data_path"])


def train_op(train_data_path: str, eval_data_path: str, hub_handle: str, batch_size: int, num_epochs: int,
             learning_rate: float, fine_tune_layers: int, seed: int, train_examples: int,
             model: Output[Model], metrics: Output[Metrics]):
    """Train; the model artifact is the run directory (``keras_model/``, metrics, figures)."""
    from components.train import train

    result = train(train_data_path, eval_data_path, model.path, hub_handle, batch_size, num_epochs, learning_rate,
                   fine_tune_layers, seed, train_examples)
    for key in ("accuracy", "loss", "train_seconds"):
        metrics.log_metric(key, result[key])
    model.metadata.update({"accuracy": result["accuracy"], "hub_handle": hub_handle, "framework": "tf_keras"})


def export_signatures_op(trained: Input[Model], visualization: str, exported: Output[Model]):
    """Export with serving_default / xai_preprocess / xai_model; metadata travels on the artifact."""
    from components.export_signatures import export_signatures

    metadata = export_signatures(trained.path + "/keras_model", exported.path, visualization)
    exported.metadata.update({"explanation_metadata": metadata, "framework": "tensorflow"})


def evaluate_op(exported: Input[Model], eval_data_path: str, min_accuracy: float, require_not_worse: bool,
                margin: float, allow_first_deploy: bool, backend: str, model_display_name: str, registry_dir: str,
                project: str, location: str, api_endpoint: str, metrics: Output[Metrics]
                ) -> NamedTuple("Gate", deploy=bool, reason=str, metrics_json=str, comparison_json=str):
    """Score the export and the serving version side by side and decide (the gate)."""
    import json
    from collections import namedtuple

    from components.evaluate import evaluate

    result = evaluate(exported.path, eval_data_path, min_accuracy, backend, model_display_name, require_not_worse,
                      registry_dir, project, location, api_endpoint, margin, allow_first_deploy)
    metrics.log_metric("accuracy", result["metrics"]["accuracy"])
    metrics.log_metric("loss", result["metrics"]["loss"])
    if result["comparison"]["champion_accuracy"] is not None:
        metrics.log_metric("champion_accuracy", result["comparison"]["champion_accuracy"])
    metrics.metadata.update({k: result["comparison"][k] for k in ("deploy", "reason", "champion", "champion_source")})
    return namedtuple("Gate", ["deploy", "reason", "metrics_json", "comparison_json"])(
        result["deploy"], result["reason"], json.dumps(result["metrics"]), json.dumps(result["comparison"]))


def upload_model_op(approved: bool, exported: Input[Model], display_name: str, metrics_json: str,
                    comparison_json: str, explanation_parameters: str, backend: str, deploy_target: str, labels: str,
                    version_aliases: str, registry_dir: str, project: str, location: str, api_endpoint: str,
                    serving_image: str, prebuilt_image: str, eval_data_path: str) -> str:
    """Upload (a new version when the display name exists); returns "<model>@<version>" or "" if not approved."""
    if not approved:
        print("upload skipped: the evaluation gate did not approve this model")
        return ""
    from components.upload_model import upload_model

    return upload_model(exported.path, display_name, metrics_json, explanation_parameters, backend, deploy_target,
                        labels, version_aliases, registry_dir, project, location, api_endpoint, serving_image,
                        prebuilt_image, comparison_json, eval_data_path)["model"]


def deploy_model_op(model_name: str, endpoint_display_name: str, backend: str, traffic_percentage: int,
                    machine_type: str, min_replica_count: int, max_replica_count: int, registry_dir: str,
                    project: str, location: str, api_endpoint: str, service_account: str,
                    comparison_json: str = "") -> str:
    """Deploy to the endpoint with that display name; returns the endpoint's resource name."""
    if not model_name:
        print("deploy skipped: nothing was uploaded (the gate did not approve)")
        return ""
    import json

    from components.deploy_model import deploy_model

    champion = json.loads(comparison_json).get("champion", "") if comparison_json else None
    return deploy_model(model_name, endpoint_display_name, backend, traffic_percentage, machine_type,
                        min_replica_count, max_replica_count, registry_dir, project, location, api_endpoint,
                        service_account, champion)["endpoint"]


def explain_smoke_op(endpoint: str, eval_data_path: str, backend: str, registry_dir: str, project: str,
                     location: str, api_endpoint: str, deploy_target: str, explanation: Output[dsl.HTML]):
    """One explained prediction from the deployed endpoint; the figure is the artifact."""
    if not endpoint:
        print("explain_smoke skipped: nothing was deployed")
        return
    import base64
    import os

    from components.explain_smoke import explain_smoke

    summary = explain_smoke(endpoint, eval_data_path, os.path.dirname(explanation.path) or ".", backend,
                            registry_dir, project, location, api_endpoint, deploy_target)
    with open(summary["figure"], "rb") as f:
        png = base64.b64encode(f.read()).decode()
    with open(explanation.path, "w") as f:
        f.write(f'<h3>{summary["predicted"]}</h3><img src="data:image/png;base64,{png}"/>')
    explanation.metadata.update({k: summary[k] for k in ("predicted", "approximation_error", "figure")})


def batch_predict_op(model_name: str, source: str, destination: str, deploy_target: str,
                     explanation_parameters: str, machine_type: str, starting_replica_count: int,
                     max_replica_count: int, accelerator_type: str, accelerator_count: int, batch_size: int,
                     instances_format: str, service_account: str, backend: str, registry_dir: str, project: str,
                     location: str, api_endpoint: str) -> str:
    """Explain every instance of ``source`` with the uploaded model (a BatchPredictionJob on Vertex);
    returns the directory holding prediction.results-* and prediction.errors_stats-*."""
    if not model_name:
        print("batch_predict skipped: nothing was uploaded (the gate did not approve)")
        return ""
    from components.batch_predict import batch_predict

    return batch_predict(model_name, source, destination, backend, deploy_target, explanation_parameters,
                         machine_type, starting_replica_count, max_replica_count, accelerator_type, accelerator_count,
                         batch_size, instances_format, registry_dir, project, location, api_endpoint,
                         service_account)["output_directory"]


def make_components(base_image: str) -> dict:
    """The pipeline's components, built for ``base_image`` (which must contain this repository)."""
    fns = [split_data_op, train_op, export_signatures_op, evaluate_op, upload_model_op, deploy_model_op,
           explain_smoke_op, batch_predict_op]
    return {fn.__name__[:-3]: dsl.component(fn, base_image=base_image, install_kfp_package=False) for fn in fns}
