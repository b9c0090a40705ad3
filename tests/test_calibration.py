"""Choosing the ``step_count`` Vertex's built-in explanations will use, by measuring the export.

Against real exported SavedModels: the almost linear tiny CNN needs the fewest steps, the
saturating classifier more, a baseline that scores like every image leaves nothing to measure;
and the upload step sends the measured count to Vertex (real SDK, local REST stub)."""

from __future__ import annotations

import trainer  # noqa: F401

import numpy as np
import pytest

from explain import load_explainable_model
from explain.calibration import calibrate_parameters, choose_step_count
from explain.testing import export_saturating_classifier, smooth_images


@pytest.fixture(scope="module")
def saturating_dir(tmp_path_factory) -> str:
    return export_saturating_classifier(str(tmp_path_factory.mktemp("sat") / "model"))


def test_the_smallest_count_meeting_the_target_is_chosen(saturating_dir):
    model, images = load_explainable_model(saturating_dir), smooth_images(6)
    # this classifier's transitions are sharp: fixed steps need a loose target to be met within 100
    choice = choose_step_count(model, images, {"integrated_gradients_attribution": {"step_count": 50}},
                               target=0.5, candidates=(2, 4, 16, 64, 100))
    assert choice.met and choice.images == 6 and choice.shares[choice.step_count] >= 0.9
    assert all(share < 0.9 for steps, share in choice.shares.items() if steps < choice.step_count)
    assert list(choice.shares) == sorted(choice.shares) and max(choice.shares) == choice.step_count
    # an unreachable target: the largest count, and a warning saying what to do
    strict = choose_step_count(model, images, {"xrai_attribution": {"step_count": 50}}, target=1e-9,
                               candidates=(2, 4))
    assert not strict.met and strict.step_count == 4 and "custom_container" in strict.warning


def test_images_that_score_like_the_baseline_are_set_apart(exported_model_dir):
    black = np.zeros((3, 192, 192, 3), np.float32)
    choice = choose_step_count(load_explainable_model(exported_model_dir), black,
                               {"integrated_gradients_attribution": {"step_count": 50}})
    assert choice.degenerate_images == 3 and not choice.met and "another baseline" in choice.warning


def test_upload_for_builtin_explanations_sends_the_measured_step_count(saturating_dir, sample_data, monkeypatch,
                                                                      tmp_path, no_network, vertex):
    import shutil

    from google.auth.credentials import AnonymousCredentials
    from google.cloud.aiplatform import initializer

    from components.upload_model import upload_model

    parameters = {"integrated_gradients_attribution": {"step_count": 50}}
    calibrated, choice = calibrate_parameters(saturating_dir, sample_data["eval_pattern"], parameters,
                                              num_images=4)
    assert calibrated["integrated_gradients_attribution"]["step_count"] == choice.step_count
    assert parameters["integrated_gradients_attribution"]["step_count"] == 50  # the input is not changed
    # the pipeline step finds credentials itself (no keyword for them): anonymous ones, set as aiplatform.init would
    monkeypatch.setattr(initializer.global_config, "_credentials", AnonymousCredentials(), raising=False)
    # the export as the pipeline step sees it: under the bucket's /gcs mount (a local stand-in)
    monkeypatch.setenv("GCS_FUSE_ROOT", str(tmp_path / "gcs"))
    export_dir = str(tmp_path / "gcs" / "bucket" / "run" / "model")
    shutil.copytree(saturating_dir, export_dir)
    stub, kw = vertex
    with pytest.warns(FutureWarning, match="2027-03-16"):
        upload_model(export_dir, "flowers", {"accuracy": 0.9}, parameters, backend="vertex",
                     deploy_target="builtin_explanations", project="p", location="us-central1",
                     api_endpoint=kw["api_endpoint"], prebuilt_image="img", eval_data_path=sample_data["eval_pattern"])
    (request,) = stub.requests_to("POST", r"/models:upload$")
    assert request.body["model"]["explanationSpec"]["parameters"] == {
        "integratedGradientsAttribution": {"stepCount": choice.step_count}}
