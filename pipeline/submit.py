"""Submit a compiled pipeline spec to Vertex AI Pipelines and print the run's console link.

``check_vertex_ready`` runs first, so ``make pipeline`` without a project or credentials stops with
one sentence instead of a stack trace from deep inside the SDK.

    python -m pipeline.submit --template_path=artifacts/flowers_pipeline.yaml --project=my-project \\
        --location=us-central1 --pipeline_root=gs://my-bucket/pipeline_root \\
        --service_account=pipelines@my-project.iam.gserviceaccount.com --display_name=flowers
"""

from __future__ import annotations

import sys
from typing import Any, Mapping

import components  # noqa: F401  (first: it quiets google-api-core's Python-version FutureWarnings)

import fire
from google.auth import credentials as auth_credentials
from google.cloud import aiplatform

from components.vertex import VertexConfigError, check_vertex_ready, init_sdk

CONSOLE_RUN_URL = ("https://console.cloud.google.com/vertex-ai/locations/{location}/pipelines/runs/{job_id}"
                   "?project={project}")


def console_link(project: str, location: str, job_id: str) -> str:
    """The Cloud Console page of one pipeline run."""
    return CONSOLE_RUN_URL.format(location=location, job_id=job_id, project=project)


def build_pipeline_job(template_path: str, project: str, location: str, pipeline_root: str,
                       parameter_values: Mapping[str, Any] | None, labels: Mapping[str, str] | None,
                       enable_caching: bool | None, display_name: str,
                       encryption_spec_key_name: str | None = None, api_endpoint: str | None = None,
                       credentials: auth_credentials.Credentials | None = None) -> aiplatform.PipelineJob:
    """A configured (not yet submitted) PipelineJob; shared by submit and schedule so both send the
    same run definition."""
    if not pipeline_root or not pipeline_root.startswith("gs://"):
        raise VertexConfigError(f"pipeline_root must be a gs:// URI that Vertex AI Pipelines can write to, "
                                f"got {pipeline_root!r}.")
    init_sdk(project, location, api_endpoint, credentials)
    return aiplatform.PipelineJob(
        display_name=display_name,
        template_path=template_path,
        pipeline_root=pipeline_root,
        parameter_values=dict(parameter_values or {}),
        labels=dict(labels) if labels else None,
        enable_caching=enable_caching,
        encryption_spec_key_name=encryption_spec_key_name,
        project=project,
        location=location,
        credentials=credentials,
    )


def submit_pipeline(template_path: str, project: str, location: str, pipeline_root: str,
                    service_account: str | None = None, parameter_values: Mapping[str, Any] | None = None,
                    labels: Mapping[str, str] | None = None, enable_caching: bool | None = None,
                    display_name: str = "flowers-xai", network: str | None = None,
                    encryption_spec_key_name: str | None = None, api_endpoint: str | None = None,
                    credentials: auth_credentials.Credentials | None = None) -> aiplatform.PipelineJob:
    """Submit ``template_path`` (a compiled spec) as a Vertex AI pipeline run, without waiting for it,
    and print its console link. ``enable_caching=None`` keeps the compiled per-task settings."""
    check_vertex_ready(project, location, credentials)
    job = build_pipeline_job(template_path, project, location, pipeline_root, parameter_values, labels,
                             enable_caching, display_name, encryption_spec_key_name, api_endpoint, credentials)
    job.submit(service_account=service_account or None, network=network or None)
    print(f"Submitted {job.resource_name}\nConsole: {console_link(project, location, job.job_id)}")
    return job


def main() -> None:
    """CLI: a configuration problem ends the command with its one sentence, not a traceback."""
    try:
        fire.Fire(submit_pipeline, serialize=lambda job: job.resource_name)
    except VertexConfigError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
