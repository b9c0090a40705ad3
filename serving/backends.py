"""Where the server's endpoints come from: the local registry, or one model directory.

Both answer the same two questions (which endpoint is this, which model version does a deployed
model serve) with Vertex-shaped resources, so the HTTP layer is identical in both modes.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Any, Protocol

from serving.instances import RequestError
from serving.registry import PARENT, Registry, RegistryError
from serving.storage import DamagedFileError
from trainer.schema import DEFAULT_ADAPTIVE_START

#: The model-dir mode's one deployed model id (and its model's id).
LOCAL_DEPLOYED_MODEL_ID = "1"
#: Model-dir mode's explanation parameters when none are configured: IG refined to 0.05 from the
#: default start.
DEFAULT_EXPLANATION_PARAMETERS = {"integratedGradientsAttribution": {"stepCount": DEFAULT_ADAPTIVE_START}}


class Backend(Protocol):
    def endpoint(self, name: str) -> dict[str, Any]: ...

    def version(self, deployed_model: dict[str, Any]) -> dict[str, Any]: ...


@dataclass
class RegistryBackend:
    """Every endpoint of a registry. Each request re-reads the endpoint's JSON (a few hundred
    bytes), so a deployment made while the server runs is served at once, without a restart."""

    registry: Registry

    def endpoint(self, name: str) -> dict[str, Any]:
        try:
            return self.registry.get_endpoint(name)
        except DamagedFileError:  # the server's data: a 500 naming the file (serving.app), not "not found"
            raise
        except (RegistryError, OSError, ValueError) as e:  # OSError: a name the file system refuses
            raise RequestError(str(e) if isinstance(e, RegistryError) else f"endpoint {name[:200]!r} not found",
                               404, "NOT_FOUND") from e

    def version(self, deployed_model: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.registry.get_model(deployed_model["model"].split("@")[0] + "@"
                                           + deployed_model["modelVersionId"])
        except RegistryError as e:  # the model was deleted from under its deployment
            raise RequestError(str(e), 500, "INTERNAL") from e


@dataclass
class ModelDirBackend:
    """One model directory behind every endpoint name: ``GET .../endpoints/<anything>`` describes
    it and ``:predict``/``:explain`` serve it (the custom-container mode Vertex deploys)."""

    model_dir: str
    explanation_parameters: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self._version = {
            "name": f"{PARENT}/models/{LOCAL_DEPLOYED_MODEL_ID}",
            "versionId": "1",
            "versionAliases": ["default"],
            "displayName": posixpath.basename(self.model_dir.rstrip("/")) or "model",
            "artifactUri": self.model_dir,
        }
        metadata = _read_metadata(self.model_dir)
        if metadata is not None:
            parameters = self.explanation_parameters or DEFAULT_EXPLANATION_PARAMETERS
            self._version["explanationSpec"] = {"metadata": metadata, "parameters": dict(parameters)}

    def endpoint(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "displayName": self._version["displayName"],
            "deployedModels": [{
                "id": LOCAL_DEPLOYED_MODEL_ID,
                "model": f"{self._version['name']}@1",
                "modelVersionId": "1",
                "displayName": self._version["displayName"],
                "dedicatedResources": {"machineSpec": {"machineType": "local"},
                                       "minReplicaCount": 1, "maxReplicaCount": 1},
            }],
            "trafficSplit": {LOCAL_DEPLOYED_MODEL_ID: 100},
        }

    def version(self, deployed_model: dict[str, Any]) -> dict[str, Any]:
        return self._version


def _read_metadata(model_dir: str) -> dict[str, Any] | None:
    """``explanation_metadata.json`` beside the model, read without TensorFlow for local paths."""
    from trainer.schema import EXPLANATION_METADATA_FILE

    path = posixpath.join(model_dir, EXPLANATION_METADATA_FILE)
    if "://" in model_dir:
        import tensorflow as tf

        if not tf.io.gfile.exists(path):
            return None
        with tf.io.gfile.GFile(path) as f:
            return json.load(f)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
