"""``explain.batch``: bulk predictions with explanations in Vertex's BatchPredictionJob output layout,
from folders, TFRecords and JSONL; bad records reported, never fatal; resumable after a kill."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import httpx
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from explain.batch import MANIFEST_FILE, BatchResumeError, explain_batch
from explain.batch_io import BatchInputError, resolve_input
from serving.app import ServerConfig
from serving.backends import ModelDirBackend
from serving.testing import running_server
from trainer.data import make_example
from trainer.schema import CLASSES

REPO = Path(__file__).resolve().parents[1]
IG = {"integrated_gradients_attribution": {"step_count": 4}}
PREDICT_ROUTE = "/v1/endpoints/1/deployedModels/2:predict"


def _png(seed: int, size=(48, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _all(output: Path, prefix: str) -> list[dict]:
    return [line for f in sorted(output.glob(f"{prefix}-*")) for line in _lines(f)]


@pytest.fixture()
def image_folder(tmp_path) -> Path:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i in range(4):
        (folder / f"img{i}.png").write_bytes(_png(i))
    (folder / "sub" / "img4.png").write_bytes(_png(4))
    (folder / "garbage.jpg").write_bytes(b"this is no image at all")
    (folder / "truncated.png").write_bytes(_png(5)[:200])
    return folder


def _approx_equal(a, b, where="prediction"):
    """Same JSON tree; numbers equal to float32 precision."""
    if isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            _approx_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _approx_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5), where
    else:
        assert a == b, where


def test_folder_to_vertex_layout_same_lines_as_the_serving_container(image_folder, tmp_path, exported_model_dir):
    output = tmp_path / "out"
    summary = explain_batch(str(image_folder), str(output), exported_model_dir, IG, shard_size=3, batch_size=2,
                            figures=True, progress=False)
    assert summary | {"seconds": 0} == {"output_dir": str(output), "num_records": 7, "num_shards": 3,
                                        "skipped_shards": 0, "written_shards": 3, "results": 5, "errors": 2,
                                        "seconds": 0}
    names = sorted(p.name for p in output.iterdir())
    assert names == ["batch_explain.json", "figures"] + [
        f"prediction.{kind}-0000{s}-of-00003" for kind in ("errors_stats", "results") for s in range(3)]

    results, errors = _all(output, "prediction.results"), _all(output, "prediction.errors_stats")
    assert sorted(Path(r["key"]).name for r in results) == [f"img{i}.png" for i in range(5)]
    assert {Path(e["key"]).name: e["error"]["status"] for e in errors} == {
        "garbage.jpg": "INVALID_ARGUMENT", "truncated.png": "INVALID_ARGUMENT"}
    by_name = {Path(e["key"]).name: e["error"]["message"] for e in errors}
    assert "not an image" in by_name["garbage.jpg"] and "truncated" in by_name["truncated.png"]
    assert len(list((output / "figures").glob("*.png"))) == 5

    # Each line is what a BatchPredictionJob running our serving container writes: the instance it
    # sent and the container's prediction for it, explanation inside.
    config = ServerConfig(backend=ModelDirBackend(exported_model_dir, IG), cache_dir=str(tmp_path / "cache"),
                          predict_route=PREDICT_ROUTE)
    with running_server(config) as url:
        for line in results[:2]:
            data = Path(line["key"]).read_bytes()
            assert line["instance"] == {"bytes_inputs": {"b64": base64.b64encode(data).decode()}}
            response = httpx.post(url + PREDICT_ROUTE, json={"instances": [line["instance"]]}, timeout=120)
            assert response.status_code == 200, response.text
            (served,) = response.json()["predictions"]
            _approx_equal(line["prediction"], served)
    for line in results:
        probabilities = np.array(line["prediction"]["probabilities"])
        assert probabilities.shape == (len(CLASSES),) and probabilities.sum() == pytest.approx(1, abs=1e-4)
        assert line["prediction"]["label"] == CLASSES[int(probabilities.argmax())]


def test_tfrecord_and_jsonl_inputs_report_bad_records(tmp_path, exported_model_dir):
    records = tmp_path / "data-00000-of-00001.tfrec"
    rng = np.random.default_rng(0)
    with tf.io.TFRecordWriter(str(records)) as writer:
        for i in range(3):
            writer.write(make_example(rng.integers(0, 255, (40, 40, 3), np.uint8), i).SerializeToString())
        writer.write(b"not a protobuf at all \xff\xff")
        bad = make_example(rng.integers(0, 255, (40, 40, 3), np.uint8), 0)
        bad.features.feature["image"].bytes_list.value[0] = b"\xff\xd8 broken jpeg"
        writer.write(bad.SerializeToString())
    out = tmp_path / "tfrec-out"
    summary = explain_batch(str(records), str(out), exported_model_dir, explain=False, shard_size=10,
                            key_only=True, progress=False)
    assert (summary["results"], summary["errors"]) == (3, 2)
    results = _lines(out / "prediction.results-00000-of-00001")
    assert [r["key"] for r in results] == [f"{records}#{i}" for i in range(3)]
    assert all("instance" not in r and "explanation" not in r["prediction"] for r in results)
    errors = {e["key"]: e["error"]["message"] for e in _lines(out / "prediction.errors_stats-00000-of-00001")}
    assert "not a tf.train.Example" in errors[f"{records}#3"] and "not an image" in errors[f"{records}#4"]

    jsonl = tmp_path / "instances.jsonl"
    good = {"bytes_inputs": {"b64": base64.b64encode(_png(7)).decode()}}
    jsonl.write_text("\n".join([json.dumps(good), "{not json", json.dumps({"b64": "!!!"}),
                                json.dumps({"b64": base64.b64encode(_png(8)).decode()}),
                                json.dumps({"image": [1, 2, 3]})]) + "\n")
    out = tmp_path / "jsonl-out"
    summary = explain_batch(str(jsonl), str(out), exported_model_dir, IG, progress=False)
    assert (summary["results"], summary["errors"]) == (2, 3)
    results = _lines(out / "prediction.results-00000-of-00001")
    assert results[0]["instance"] == good and results[0]["key"] == f"{jsonl}#1"
    assert results[0]["prediction"]["explanation"]["attributions"][0]["outputIndex"] == [
        results[0]["prediction"]["labelIndex"]]
    errors = {e["key"].rsplit("#", 1)[1]: e for e in _lines(out / "prediction.errors_stats-00000-of-00001")}
    assert "not valid JSON" in errors["2"]["error"]["message"]
    assert "invalid base64" in errors["3"]["error"]["message"] and errors["3"]["instance"] == {"b64": "!!!"}
    assert "expected" in errors["5"]["error"]["message"]


def test_bad_input_and_mismatched_resume_fail_clearly(tmp_path, image_folder, exported_model_dir):
    with pytest.raises(BatchInputError, match="no files match"):
        explain_batch(str(tmp_path / "nothing*.png"), str(tmp_path / "o"), exported_model_dir, IG, progress=False)
    (image_folder / "x.tfrec").write_bytes(b"")
    with pytest.raises(BatchInputError, match="mixes"):
        explain_batch(str(image_folder), str(tmp_path / "o"), exported_model_dir, IG, progress=False)
    (image_folder / "x.tfrec").unlink()
    (image_folder / "photo.webp").write_bytes(b"RIFF")  # a type the batch does not read: named, not dropped silently
    with pytest.warns(UserWarning, match=r"skipped 1 file\(s\) of other types \(e.g. .*photo.webp\)"):
        assert all(not f.endswith(".webp") for f in resolve_input(str(image_folder)).files)
    (image_folder / "photo.webp").unlink()
    out = tmp_path / "o2"
    explain_batch(str(image_folder), str(out), exported_model_dir, explain=False, shard_size=4, progress=False)
    with pytest.raises(BatchResumeError, match="explain"):
        explain_batch(str(image_folder), str(out), exported_model_dir, IG, shard_size=4, progress=False)
    # A run resumed under other defaults (the same request dict, resolved otherwise, as when a
    # default changes between versions), or one whose manifest predates resolved parameters, is refused.
    manifest_path = out / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["resolved_parameters"] = {"attribution": {"map_target": 0.5}}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BatchResumeError, match="resolved_parameters"):
        explain_batch(str(image_folder), str(out), exported_model_dir, explain=False, shard_size=4, progress=False)
    del manifest["resolved_parameters"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BatchResumeError, match="earlier version"):
        explain_batch(str(image_folder), str(out), exported_model_dir, explain=False, shard_size=4, progress=False)
    # A manifest cut off (by a kill during an earlier version's write in place) or otherwise not one
    # is named, not a traceback.
    for broken, message in ((json.dumps(manifest)[:40].encode(), "is not valid JSON"),
                            (b"\xff\xfe\x00garbage", "is not valid JSON"), (b"null", "holds NoneType")):
        manifest_path.write_bytes(broken)
        with pytest.raises(BatchResumeError, match=f"{MANIFEST_FILE} {message}"):
            explain_batch(str(image_folder), str(out), exported_model_dir, explain=False, shard_size=4,
                          progress=False)
    # The output may sit inside the input folder: its files are not read as input on a rerun.
    inside = image_folder / "explanations"
    first = explain_batch(str(image_folder), str(inside), exported_model_dir, explain=False, progress=False)
    # a killed run's temporary shard file is swept by the next run (it holds the lock, so none is live)
    orphan = inside / ".prediction.results-00000-of-00001.0123456789ab.tmp"
    orphan.write_text('{"half": ')
    again = explain_batch(str(image_folder), str(inside), exported_model_dir, explain=False, progress=False)
    assert first["num_records"] == again["num_records"] == 7 and again["skipped_shards"] == 1
    assert not orphan.exists()


def test_unlocked_outputs_never_commit_into_a_run_with_other_settings(tmp_path, image_folder, exported_model_dir):
    """Where no lock keeps a second writer out (``gs://``; here TensorFlow's in-memory ``ram://``
    filesystem, which takes the same path), every shard is committed only after the manifest is
    read back: a run with other settings that took the output over meanwhile stops this one."""
    from explain.batch import Engine

    out = f"ram://batch-{tmp_path.name}/out"
    summary = explain_batch(str(image_folder), out, exported_model_dir, explain=False, shard_size=4, progress=False)
    assert summary["written_shards"] == 2 and tf.io.gfile.exists(f"{out}/prediction.results-00001-of-00002")
    with pytest.raises(BatchResumeError, match="another shard_size"):
        explain_batch(str(image_folder), out, exported_model_dir, explain=False, shard_size=3, progress=False)

    class TakenOver(Engine):
        """The real engine; after its first batch another run (shard_size 3) replaces the manifest."""

        def run(self, batch):
            predictions = super().run(batch)
            with tf.io.gfile.GFile(manifest, "r") as f:
                other = json.load(f) | {"shard_size": 3}
            tf.io.gfile.remove(manifest)  # ram:// does not truncate a file opened for writing
            with tf.io.gfile.GFile(manifest, "w") as f:
                json.dump(other, f)
            return predictions

    out2 = f"ram://batch-{tmp_path.name}/out2"
    manifest = f"{out2}/{MANIFEST_FILE}"
    with pytest.raises(BatchResumeError, match="another shard_size"):
        explain_batch(str(image_folder), out2, exported_model_dir, explain=False, shard_size=4, batch_size=4,
                      progress=False, engine=TakenOver(exported_model_dir, False, None))
    assert not tf.io.gfile.glob(f"{out2}/prediction.results-*")  # nothing committed into the other run


def test_cli_resumes_after_a_kill_without_redoing_finished_shards(tmp_path, exported_model_dir):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(16):
        (folder / f"{i:02d}.png").write_bytes(_png(100 + i))
    output = tmp_path / "out"
    command = [sys.executable, "-m", "explain.batch", f"--input={folder}", f"--output_dir={output}",
               f"--model_dir={exported_model_dir}", "--step_count=64", "--shard_size=2", "--batch_size=1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = output / "prediction.results-00000-of-00008"
    deadline = time.monotonic() + 120
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    # a second writer while the first runs is refused, saying why
    assert process.poll() is None, process.stderr.read().decode()[-3000:]
    with pytest.raises(BatchResumeError, match="being written by another process"):
        explain_batch(str(folder), str(output), exported_model_dir, {"integrated_gradients_attribution": {
            "step_count": 64}}, shard_size=2, batch_size=1, progress=False)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert first.exists(), process.stderr.read().decode()[-3000:]
    finished = sorted(output.glob("prediction.results-*"))
    assert len(finished) < 8, "the run finished before it was killed; nothing was resumed"
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished}

    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["skipped_shards"] == len(finished) and summary["written_shards"] == 8 - len(finished)
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished} == stamps  # not redone
    keys = [Path(r["key"]).name for r in _all(output, "prediction.results")]
    assert keys == [f"{i:02d}.png" for i in range(16)]  # every instance once, in order
    assert not list(output.glob(".*.tmp"))  # the killed shard's partial files were swept, the shard redone
    assert json.loads((output / MANIFEST_FILE).read_text())["num_records"] == 16
