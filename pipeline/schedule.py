"""Scheduled retraining on Vertex AI Pipelines: create-or-update, pause and resume, by display name.

The display name is the schedule's identity: running ``make schedule`` again updates the schedule
that has it (cron, concurrency and the run definition, so a recompiled pipeline is picked up)
instead of adding a second schedule that would retrain twice.

    python -m pipeline.schedule create --template_path=artifacts/flowers_pipeline.yaml \\
        --display_name=flowers-retrain --cron="TZ=Etc/UTC 0 3 * * 1" --max_concurrent_run_count=1 \\
        --project=my-project --location=us-central1 --pipeline_root=gs://my-bucket/pipeline_root
    python -m pipeline.schedule pause --display_name=flowers-retrain --project=my-project --location=us-central1
    python -m pipeline.schedule resume --display_name=flowers-retrain --project=my-project --location=us-central1
"""

from __future__ import annotations

import sys
from typing import Any, Mapping

import components  # noqa: F401  (first: it quiets google-api-core's Python-version FutureWarnings)

import fire
from google.auth import credentials as auth_credentials
from google.cloud import aiplatform
from google.protobuf import field_mask_pb2

from components.vertex import VertexConfigError, check_vertex_ready, init_sdk
from pipeline.submit import build_pipeline_job

#: What an update replaces: the timing, the concurrency and the run it starts.
UPDATED_FIELDS = ("cron", "max_concurrent_run_count", "create_pipeline_job_request")


class ScheduleNotFoundError(LookupError):
    """No schedule has the display name asked for."""


def find_schedule(display_name: str, *, project: str, location: str, api_endpoint: str | None = None,
                  credentials: auth_credentials.Credentials | None = None) -> aiplatform.PipelineJobSchedule | None:
    """The schedule named ``display_name``, or None; several is an error (which one would we update?)."""
    init_sdk(project, location, api_endpoint, credentials)
    found = aiplatform.PipelineJobSchedule.list(filter=f'display_name="{display_name}"', project=project,
                                                location=location, credentials=credentials)
    if len(found) > 1:
        names = ", ".join(s.resource_name for s in found)
        raise VertexConfigError(f"{len(found)} schedules are named {display_name!r} in {project}/{location} "
                                f"({names}); delete the extras so updates have one target.")
    return found[0] if found else None


def create_or_update_schedule(template_path: str, display_name: str, cron: str, max_concurrent_run_count: int = 1,
                              *, project: str, location: str, pipeline_root: str,
                              service_account: str | None = None,
                              parameter_values: Mapping[str, Any] | None = None,
                              labels: Mapping[str, str] | None = None, enable_caching: bool | None = None,
                              network: str | None = None, encryption_spec_key_name: str | None = None,
                              api_endpoint: str | None = None,
                              credentials: auth_credentials.Credentials | None = None,
                              ) -> aiplatform.PipelineJobSchedule:
    """Create the schedule ``display_name`` running ``template_path`` on ``cron``, or update the one that
    exists (cron, max concurrent runs, and the run definition). Returns the schedule as Vertex has it."""
    check_vertex_ready(project, location, credentials)
    if max_concurrent_run_count < 1:
        raise VertexConfigError(f"max_concurrent_run_count must be at least 1, got {max_concurrent_run_count}.")
    job = build_pipeline_job(template_path, project, location, pipeline_root, parameter_values, labels,
                             enable_caching, display_name, encryption_spec_key_name, api_endpoint, credentials)
    existing = find_schedule(display_name, project=project, location=location, api_endpoint=api_endpoint,
                             credentials=credentials)
    if existing is None:
        schedule = job.create_schedule(cron=cron, display_name=display_name,
                                       max_concurrent_run_count=max_concurrent_run_count,
                                       service_account=service_account or None, network=network or None)
        print(f"Created schedule {schedule.resource_name} ({cron})")
        return schedule

    # The SDK's update() changes timing fields only; the run definition goes in the same PATCH so a
    # recompiled pipeline or new parameters take effect on the next scheduled run.
    wanted = aiplatform.PipelineJobSchedule(pipeline_job=job, display_name=display_name)._gca_resource
    wanted.name = existing.resource_name
    wanted.cron = cron
    wanted.max_concurrent_run_count = max_concurrent_run_count
    if service_account:
        wanted.create_pipeline_job_request.pipeline_job.service_account = service_account
    if network:
        wanted.create_pipeline_job_request.pipeline_job.network = network
    existing.api_client.update_schedule(schedule=wanted,
                                        update_mask=field_mask_pb2.FieldMask(paths=list(UPDATED_FIELDS)))
    print(f"Updated schedule {existing.resource_name} ({cron})")
    return aiplatform.PipelineJobSchedule.get(existing.resource_name, project=project, location=location,
                                              credentials=credentials)


def _existing(display_name: str, project: str, location: str, api_endpoint: str | None,
              credentials: auth_credentials.Credentials | None) -> aiplatform.PipelineJobSchedule:
    check_vertex_ready(project, location, credentials)
    schedule = find_schedule(display_name, project=project, location=location, api_endpoint=api_endpoint,
                             credentials=credentials)
    if schedule is None:
        raise ScheduleNotFoundError(f"No schedule named {display_name!r} in {project}/{location}; "
                                    f"create it first (make schedule).")
    return schedule


def pause_schedule(display_name: str, *, project: str, location: str, api_endpoint: str | None = None,
                   credentials: auth_credentials.Credentials | None = None) -> str:
    """Pause the schedule ``display_name`` (no new runs until resumed); returns its resource name."""
    schedule = _existing(display_name, project, location, api_endpoint, credentials)
    schedule.pause()
    print(f"Paused schedule {schedule.resource_name}")
    return schedule.resource_name


def resume_schedule(display_name: str, *, project: str, location: str, api_endpoint: str | None = None,
                    credentials: auth_credentials.Credentials | None = None) -> str:
    """Resume the paused schedule ``display_name``; returns its resource name."""
    schedule = _existing(display_name, project, location, api_endpoint, credentials)
    schedule.resume()
    print(f"Resumed schedule {schedule.resource_name}")
    return schedule.resource_name


def main() -> None:
    """CLI (``create``, ``pause``, ``resume``): configuration problems end with one sentence."""
    try:
        fire.Fire({"create": create_or_update_schedule, "pause": pause_schedule, "resume": resume_schedule},
                  serialize=lambda result: getattr(result, "resource_name", result))
    except (VertexConfigError, ScheduleNotFoundError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
