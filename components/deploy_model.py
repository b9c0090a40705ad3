"""Step 5, deploy_model: deploy the uploaded version to the endpoint with that display name
(created once, reused by every later run); once it serves all the traffic, move the model's
``default`` alias to it (it is now the champion the next run must beat) and undeploy the versions
it supersedes, so a scheduled retrain never piles up endpoints or deployed models. A deploy that
fails leaves ``default`` where it was. Locally the whole step holds the endpoint's lock
(:meth:`Registry.rollout`), so two runs deploying at once cannot undeploy each other's model."""

from __future__ import annotations

import json
from typing import Any

import fire


def deploy_model(model: str, endpoint_display_name: str, backend: str = "local", traffic_percentage: int = 100,
                 machine_type: str = "n1-standard-4", min_replica_count: int = 1, max_replica_count: int = 1,
                 registry_dir: str = "", project: str = "", location: str = "", api_endpoint: str = "",
                 service_account: str = "", champion: str | None = None) -> dict[str, Any]:
    """Deploy ``model`` ("<resource>@<version>"); returns {"endpoint", "deployed_model_id", "undeployed"}.

    ``champion`` is the version the gate compared ``model`` with ("" for none): if the champion
    changed since (a second run deployed in between; ``serving.registry.check_champion``), the step
    is refused (``ChampionChangedError``) instead of replacing a version this model was never
    compared with."""
    if backend == "vertex":
        from components import vertex

        return vertex.deploy_model(model, endpoint_display_name, machine_type=machine_type,
                                   min_replica_count=min_replica_count, max_replica_count=max_replica_count,
                                   traffic_percentage=traffic_percentage, service_account=service_account or None,
                                   undeploy_previous=traffic_percentage == 100, project=project, location=location,
                                   api_endpoint=api_endpoint or None, champion=champion)

    from serving.registry import Registry

    result = Registry(registry_dir).rollout(endpoint_display_name, model, traffic_percentage=traffic_percentage,
                                            display_name=endpoint_display_name, machine_type="local",
                                            min_replica_count=min_replica_count,
                                            max_replica_count=max_replica_count, champion=champion)
    print(f"Deployed {model} to {result['endpoint']} as {result['deployed_model_id']}"
          f"{' (already deployed)' if result['reused'] else ''}; undeployed {result['undeployed'] or 'none'}")
    return {k: result[k] for k in ("endpoint", "deployed_model_id", "undeployed", "reused")}


if __name__ == "__main__":
    fire.Fire(deploy_model, serialize=lambda r: json.dumps(r))
