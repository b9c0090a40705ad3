"""``python -m serving.client``: explain image files through a live endpoint into figures."""

from __future__ import annotations

import json

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import numpy as np
import pytest
from PIL import Image

from serving.app import ServerConfig
from serving.backends import ModelDirBackend
from serving.client import EndpointError, main
from serving.testing import running_server

IG = {"integratedGradientsAttribution": {"stepCount": 4}}


@pytest.fixture(scope="module")
def endpoint_url(exported_model_dir, tmp_path_factory):
    config = ServerConfig(backend=ModelDirBackend(exported_model_dir, IG),
                          cache_dir=str(tmp_path_factory.mktemp("cache")))
    with running_server(config) as url:
        yield f"{url}/v1/projects/local/locations/local/endpoints/7"


def _images(directory, n: int) -> list[str]:
    paths = []
    for i in range(n):
        path = directory / f"flower_{i}.jpg"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (50, 70, 3), np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_client_writes_three_panel_figures(endpoint_url, tmp_path):
    files = _images(tmp_path, 3)
    out = tmp_path / "out"
    figures = main(*files, endpoint_url=endpoint_url, output_dir=str(out), step_count=6, top_k=2, batch_size=2)
    assert [p.split("/")[-1] for p in figures] == [f"flower_{i}_ig.png" for i in range(3)]
    for figure in figures:
        with Image.open(figure) as image:
            assert image.format == "PNG" and image.width > 2 * image.height  # three panels side by side
    summary = json.loads((out / "explanations.json").read_text())
    assert [s["file"] for s in summary] == files
    assert all(len(s["attributions"]) == 2 for s in summary)  # top_k reached the server


def test_a_bad_file_costs_its_own_figure_only(endpoint_url, exported_model_dir, tmp_path):
    """Through the endpoint and locally: the good files are explained, the bad one is named with
    the server's (or the model's) reason, in explanations.json and in the error raised at the end."""
    from explain.files import FilesNotExplained

    bad = tmp_path / "not_an_image.jpg"
    bad.write_bytes(b"plain text, not a JPEG")
    good = _images(tmp_path, 2)
    for where, kwargs, reason in (("remote", {"endpoint_url": endpoint_url}, "HTTP 400: INVALID_ARGUMENT: instances[0]"),
                                  ("local", {"model_dir": exported_model_dir}, "Unknown image file format")):
        out = tmp_path / where
        with pytest.raises(FilesNotExplained) as raised:
            main(good[0], str(bad), good[1], str(tmp_path / "missing.jpg"), output_dir=str(out), batch_size=4, **kwargs)
        assert f"2 of 4 image file(s) could not be explained: {bad}: " in str(raised.value)
        assert reason in str(raised.value) and "No such file" in str(raised.value)
        summary = json.loads((out / "explanations.json").read_text())
        assert [s["file"] for s in summary if "figure" in s] == good and all(
            (out / f"flower_{i}_{'endpoint' if where == 'remote' else 'ig'}.png").exists() for i in range(2))
        assert [s["file"] for s in summary if "error" in s] == [str(bad), str(tmp_path / "missing.jpg")]
    with pytest.raises(ValueError, match="exactly one of"):
        main(str(bad), output_dir=str(tmp_path / "out"))
    # Parameters no file could be explained with are the run's error, said once, not each file's.
    with pytest.raises(ValueError, match="step_count") as raised:
        main(*good, model_dir=exported_model_dir, step_count=500, output_dir=str(tmp_path / "params"))
    assert not isinstance(raised.value, FilesNotExplained)


def test_the_endpoint_refusing_every_request_is_not_blamed_on_the_files(tmp_path):
    """A server that is not there (or overloaded) is the run's error, raised at once."""
    with pytest.raises(EndpointError, match="ConnectError"):
        main(*_images(tmp_path, 2), endpoint_url="http://127.0.0.1:9/v1/projects/p/locations/l/endpoints/1",
             output_dir=str(tmp_path / "out"))
