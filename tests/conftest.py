"""Shared fixtures: tiny, real artefacts built once per test session.

``exported_model_dir`` is a real SavedModel with the three signatures and its
``explanation_metadata.json``, written by :func:`trainer.export.export_model`.
"""

from __future__ import annotations

import os

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import pytest
import tensorflow as tf
import tf_keras as keras

from trainer.export import export_model
from trainer.schema import CLASSES, IMAGE_SIZE


def _tiny_cnn(seed: int = 0) -> keras.Model:
    """A small untrained CNN with the classifier's input and output shapes."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.layers.InputLayer(input_shape=[*IMAGE_SIZE, 3]),
        keras.layers.Conv2D(8, 5, strides=4, activation="relu"),
        keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(len(CLASSES), activation="softmax"),
    ])


@pytest.fixture(scope="session")
def exported_model_dir(tmp_path_factory) -> str:
    """A small classifier exported with all three signatures, labels and explanation metadata."""
    export_dir = str(tmp_path_factory.mktemp("export") / "model")
    export_model(_tiny_cnn(), export_dir, CLASSES, verbose=False)
    return export_dir


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> dict:
    """A small synthetic flowers dataset (lab schema + masks): train/ and validation/ globs."""
    from trainer.synthetic import write_dataset

    return write_dataset(str(tmp_path_factory.mktemp("data")), num_train=250, num_eval=60, seed=42, num_shards=2)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the test files for ``make test``'s two processes (``--dist loadfile``: a file is
    one unit of work, taken in this order).

    On a fresh clone the real backbone takes 2-2.5 min to build, and a process that needs it
    meanwhile waits on its file lock. So its own tests come first (one process builds it), then
    every file that does not need it (the other process), then the file of the classifier trained
    on it (trained once, in one process), then the other files that use it."""
    def uses(fixture: str) -> set:
        return {item.path for item in items if fixture in getattr(item, "fixturenames", ())}

    real, trained = uses("backbone_dir"), uses("trained_run")

    def order(item: pytest.Item) -> int:
        if item.path.name == "test_backbone.py":
            return 0
        return 2 if item.path in trained else 3 if item.path in real else 1

    items.sort(key=order)  # stable: collection order within each part


#: The demo's cached backbone (``make backbone``): the tests reuse it when its recipe matches.
SHARED_BACKBONE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "backbone")


@pytest.fixture(scope="session")
def backbone_dir() -> str:
    """The offline MobileNetV2 1.0 @ 192 in TF Hub format, pre-trained on synthetic flowers: one
    cached build shared with the demo and the bench (built here on a fresh clone)."""
    from trainer.backbone import DEFAULT_RECIPE, ensure_backbone

    return ensure_backbone(SHARED_BACKBONE_DIR, DEFAULT_RECIPE, verbose=0)


@pytest.fixture(scope="session")
def small_backbone_dir(tmp_path_factory) -> str:
    """A SMALL TEST NETWORK (not MobileNetV2) in TF Hub format, built in seconds: for unit tests of
    the training machinery (determinism, resume, bad data) where the network is beside the point."""
    from trainer.backbone import BackboneRecipe, ensure_backbone

    recipe = BackboneRecipe(architecture="small_test_network", pretrain_size=48, num_images=60, epochs=1,
                            calibration_images=16, batch_size=16)
    return ensure_backbone(str(tmp_path_factory.mktemp("small_backbone") / "hub"), recipe, verbose=0)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, sample_data, backbone_dir) -> tuple[str, dict]:
    """A classifier trained on ``sample_data`` (cached features): (run dir, metrics)."""
    from trainer.train import train_and_evaluate

    run_dir = str(tmp_path_factory.mktemp("run"))
    metrics = train_and_evaluate(train_data_path=sample_data["train_pattern"],
                                 eval_data_path=sample_data["eval_pattern"], output_dir=run_dir,
                                 hub_handle=backbone_dir, batch_size=16, num_epochs=15, seed=42, verbose=0)
    return run_dir, metrics


@pytest.fixture(scope="session")
def trained_model_dir(trained_run) -> str:
    """The trained classifier exported with its three signatures, labels and metadata."""
    from trainer.export import export_keras_model

    run_dir, _ = trained_run
    export_dir = f"{run_dir}/model"
    export_keras_model(f"{run_dir}/keras_model", export_dir, verbose=False)
    return export_dir


# ------------------------------------------------------------------------ the Vertex REST stub
VERTEX_PROJECT, VERTEX_LOCATION = "flowers-test", "us-central1"


@pytest.fixture()
def no_network(monkeypatch):
    """Fail at once, naming the host, if anything resolves a non-loopback name (modules that talk
    to the Vertex stub use it for every test: ``pytestmark = pytest.mark.usefixtures("no_network")``)."""
    import socket

    real = socket.getaddrinfo

    def loopback_only(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise OSError(f"test tried to reach {host!r}; tests must not touch the network")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", loopback_only)


@pytest.fixture()
def vertex(monkeypatch):
    """The real ``aiplatform`` SDK pointed at the local REST stub (``tests/vertex_rest_stub.py``):
    (stub, keyword arguments that point our functions at it). The SDK's one call outside the Vertex
    API (the project-number lookup of PipelineJob.submit's bucket check) is answered with the stub's
    number; the SDK's process-global ``aiplatform.init`` state is restored after."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud.aiplatform import initializer
    from google.cloud.aiplatform.utils import resource_manager_utils

    from tests.vertex_rest_stub import running_vertex_stub

    with running_vertex_stub() as (url, stub):
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)  # PipelineJob.submit checks the root's bucket
        monkeypatch.setattr(resource_manager_utils, "get_project_number",
                            lambda project_id, credentials=None: stub.project_number)
        try:
            yield stub, {"project": VERTEX_PROJECT, "location": VERTEX_LOCATION, "api_endpoint": url,
                         "credentials": AnonymousCredentials()}
        finally:
            initializer.global_config.__init__()
