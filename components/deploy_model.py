"""Step 5, deploy_model: deploy the uploaded version to the endpoint with that display name
(created once, reused by every later run), then undeploy the versions it supersedes once the new
one is serving, so a scheduled retrain never piles up endpoints or deployed models."""

from __future__ import annotations

import json
from typing import Any

import fire


def deploy_model(model: str, endpoint_display_name: str, backend: str = "local", traffic_percentage: int = 100,
                 machine_type: str = "n1-standard-4", min_replica_count: int = 1, max_replica_count: int = 1,
                 registry_dir: str = "", project: str = "", location: str = "", api_endpoint: str = "",
                 service_account: str = "") -> dict[str, Any]:
    """Deploy ``model`` ("<resource>@<version>"); returns {"endpoint", "deployed_model_id", "undeployed"}."""
    if backend == "vertex":
        from components import vertex

        return vertex.deploy_model(model, endpoint_display_name, machine_type=machine_type,
                                   min_replica_count=min_replica_count, max_replica_count=max_replica_count,
                                   traffic_percentage=traffic_percentage, service_account=service_account or None,
                                   undeploy_previous=traffic_percentage == 100, project=project, location=location,
                                   api_endpoint=api_endpoint or None)

    from serving.registry import Registry

    registry = Registry(registry_dir)
    endpoint = registry.get_or_create_endpoint(endpoint_display_name)
    deployed = registry.deploy_model(endpoint["name"], model, traffic_percentage=traffic_percentage,
                                     display_name=endpoint_display_name, machine_type="local",
                                     min_replica_count=min_replica_count, max_replica_count=max_replica_count)
    undeployed = []
    if traffic_percentage == 100:  # the new version serves everything: retire the ones it replaces
        for other in registry.get_endpoint(endpoint["name"])["deployedModels"]:
            if other["id"] != deployed["id"]:
                registry.undeploy_model(endpoint["name"], other["id"])
                undeployed.append(other["id"])
    print(f"Deployed {model} to {endpoint['name']} as {deployed['id']}; undeployed {undeployed or 'none'}")
    return {"endpoint": endpoint["name"], "deployed_model_id": deployed["id"], "undeployed": undeployed}


if __name__ == "__main__":
    fire.Fire(deploy_model, serialize=lambda r: json.dumps(r))
