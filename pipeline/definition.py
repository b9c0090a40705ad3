"""The pipeline: train -> export_signatures -> evaluate (gate) -> upload_model -> deploy_model ->
explain_smoke. This file only wires; what each step does lives in ``components/``.

One definition serves both targets. The difference lives in :func:`_training_step` alone: on
Vertex the train component runs as a custom training job (machine type, replicas, accelerators,
service account, timeout from config); locally it runs as a plain component. The gate is data,
not control flow (``kfp.local`` runs no ``dsl.If``): upload, deploy and the smoke test receive the
evaluation's decision and end cleanly, saying why, when it is "no".

Caching is off on every task: a scheduled run starts with the same spec and parameters as the
last one, so with caching Vertex would reuse every step's outputs and retrain, upload and deploy
nothing; the gate must also re-score the champion each run. With ``data.eval_split_percent`` a
split step first divides the one data pattern into training and evaluation records.
"""

# (No "from __future__ import annotations": KFP reads the real annotation objects.)
import json

from kfp import dsl

from components.config import Config
from components.kfp_components import make_components


def _training_step(cfg: Config, train_component):
    """The one place where the targets differ: how the train component runs."""
    if cfg.backend != "vertex":
        return train_component
    from google_cloud_pipeline_components.v1.custom_job import create_custom_training_job_from_component

    return create_custom_training_job_from_component(
        train_component, display_name=f"{cfg.pipeline.name}-train", machine_type=cfg.training.machine_type,
        replica_count=cfg.training.replica_count, accelerator_type=cfg.training.accelerator_type or "",
        accelerator_count=cfg.training.accelerator_count or 0, service_account=cfg.gcp.service_account,
        network=cfg.gcp.network, encryption_spec_key_name=cfg.gcp.encryption_key, timeout=cfg.training.timeout)


def build_pipeline(cfg: Config):
    """The pipeline function for ``cfg``; its parameters default to the configuration's values."""
    ops = make_components(cfg.images.components)
    train_step = _training_step(cfg, ops["train"])
    t, g = cfg.training, cfg.gcp

    @dsl.pipeline(name=cfg.pipeline.name, description="Train, export, gate, upload, deploy and explain the "
                                                        "flowers classifier.")
    def flowers_pipeline(
        train_data_path: str = cfg.data.train_data_path,
        eval_data_path: str = cfg.data.eval_data_path,
        hub_handle: str = t.hub_handle,
        batch_size: int = t.batch_size,
        num_epochs: int = t.num_epochs,
        learning_rate: float = t.learning_rate,
        fine_tune_layers: int = t.fine_tune_layers,
        seed: int = t.seed,
        train_examples: int = t.train_examples,
        model_display_name: str = cfg.model.display_name,
        endpoint_display_name: str = cfg.deploy.endpoint_display_name,
        min_accuracy: float = cfg.gate.min_accuracy,
        require_not_worse: bool = cfg.gate.require_not_worse,
        margin: float = cfg.gate.margin,
        allow_first_deploy: bool = cfg.gate.allow_first_deploy,
        explanation_parameters: str = json.dumps(cfg.explanation.parameters),
        visualization: str = json.dumps(cfg.explanation.visualization),
        deploy_target: str = cfg.deploy.target,
        traffic_percentage: int = cfg.deploy.traffic_percentage,
        backend: str = cfg.backend,
        registry_dir: str = cfg.local.registry_dir,
        project: str = g.project,
        location: str = g.region,
        api_endpoint: str = g.api_endpoint,
    ):
        common = dict(backend=backend, registry_dir=registry_dir, project=project, location=location,
                      api_endpoint=api_endpoint)
        tasks = []
        if cfg.data.eval_split_percent:  # one pattern holds everything: split it by record hash first
            split = ops["split_data"](data_path=train_data_path, eval_split_percent=cfg.data.eval_split_percent
                                      ).set_display_name("split_data")
            tasks.append(split)
            train_data_path, eval_data_path = split.outputs["train_data_path"], split.outputs["eval_data_path"]
        trained = train_step(train_data_path=train_data_path, eval_data_path=eval_data_path, hub_handle=hub_handle,
                             batch_size=batch_size, num_epochs=num_epochs, learning_rate=learning_rate,
                             fine_tune_layers=fine_tune_layers, seed=seed, train_examples=train_examples
                             ).set_display_name("train")
        exported = ops["export_signatures"](trained=trained.outputs["model"], visualization=visualization
                                            ).set_display_name("export_signatures")
        gate = ops["evaluate"](exported=exported.outputs["exported"], eval_data_path=eval_data_path,
                               min_accuracy=min_accuracy, require_not_worse=require_not_worse, margin=margin,
                               allow_first_deploy=allow_first_deploy, model_display_name=model_display_name,
                               **common).set_display_name("evaluate")
        uploaded = ops["upload_model"](approved=gate.outputs["deploy"], exported=exported.outputs["exported"],
                                       display_name=model_display_name, metrics_json=gate.outputs["metrics_json"],
                                       comparison_json=gate.outputs["comparison_json"],
                                       explanation_parameters=explanation_parameters, deploy_target=deploy_target,
                                       labels=json.dumps(cfg.model.labels),
                                       version_aliases=",".join(cfg.model.version_aliases),
                                       serving_image=cfg.images.serving,
                                       prebuilt_image=cfg.images.prebuilt_prediction, eval_data_path=eval_data_path,
                                       **common
                                       ).set_display_name("upload_model")
        deployed = ops["deploy_model"](model_name=uploaded.output, endpoint_display_name=endpoint_display_name,
                                       traffic_percentage=traffic_percentage, machine_type=cfg.deploy.machine_type,
                                       min_replica_count=cfg.deploy.min_replica_count,
                                       max_replica_count=cfg.deploy.max_replica_count,
                                       service_account=g.service_account,
                                       comparison_json=gate.outputs["comparison_json"],  # the champion it beat
                                       **common).set_display_name("deploy_model")
        smoke = ops["explain_smoke"](endpoint=deployed.output, eval_data_path=eval_data_path,
                                     deploy_target=deploy_target, **common).set_display_name("explain_smoke")
        for task in [*tasks, trained, exported, gate, uploaded, deployed, smoke]:
            task.set_caching_options(False)  # every run retrains, re-scores, uploads and deploys
        if cfg.batch_predict.enabled:  # bulk explanations by the uploaded model (BatchPredictionJob on Vertex)
            b = cfg.batch_predict
            ops["batch_predict"](model_name=uploaded.output, source=b.source, destination=b.destination,
                                 deploy_target=deploy_target, explanation_parameters=explanation_parameters,
                                 machine_type=b.machine_type, starting_replica_count=b.starting_replica_count,
                                 max_replica_count=b.max_replica_count, accelerator_type=b.accelerator_type,
                                 accelerator_count=b.accelerator_count, batch_size=b.batch_size,
                                 instances_format=b.instances_format, service_account=g.service_account, **common
                                 ).set_display_name("batch_predict").set_caching_options(False)

    return flowers_pipeline
