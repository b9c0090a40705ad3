"""Multi-worker training: two ``trainer.train`` processes on 127.0.0.1 (one configured by ``TF_CONFIG``,
one by Vertex's ``CLUSTER_SPEC``) train one model with ``MultiWorkerMirroredStrategy``, reach the
single process's accuracy, resume from the chief's checkpoint after both are killed, and leave one
set of outputs, the chief's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import pytest
import tensorflow as tf
import tf_keras as keras

from trainer.distribute import Cluster, ClusterConfigError, cluster_spec_to_tf_config, read_cluster

REPO = Path(__file__).resolve().parents[1]
SIZE = 48


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _small_test_network(path: str) -> str:
    """A small test network (two strided convolutions, random weights, pooled with the mean colour;
    not MobileNetV2), saved in TF Hub's format so the trainer loads it through ``hub.KerasLayer``
    as in production."""
    keras.utils.set_random_seed(7)
    inputs = keras.Input([SIZE, SIZE, 3])
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(inputs)
    x = keras.layers.Conv2D(32, 3, strides=2, activation="relu")(x)
    features = keras.layers.Concatenate()([keras.layers.GlobalAveragePooling2D()(inputs) * 4.0,
                                           keras.layers.GlobalAveragePooling2D()(x),
                                           keras.layers.GlobalMaxPooling2D()(x)])
    tf.saved_model.save(keras.Model(inputs, features, name="small_test_network"), path)
    return path


def test_cluster_from_tf_config_and_vertex_cluster_spec():
    assert read_cluster({}) == Cluster()
    assert Cluster().is_chief and Cluster().num_workers == 1
    spec = {"cluster": {"workerpool0": ["a:1"], "workerpool1": ["b:2", "c:3"]}, "environment": "cloud",
            "task": {"type": "workerpool1", "index": 1}}
    assert cluster_spec_to_tf_config(spec) == {"cluster": {"chief": ["a:1"], "worker": ["b:2", "c:3"]},
                                               "task": {"type": "worker", "index": 1}}
    environ = {"CLUSTER_SPEC": json.dumps(spec)}
    cluster = read_cluster(environ)
    assert (cluster.num_workers, cluster.task_type, cluster.task_index) == (3, "worker", 1)
    assert not cluster.is_chief and cluster.worker_index == 2
    assert json.loads(environ["TF_CONFIG"])["task"] == {"type": "worker", "index": 1}  # for TensorFlow
    no_chief = read_cluster({"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1", "b:2"]},
                                                      "task": {"type": "worker", "index": 0}})})
    assert no_chief.is_chief and no_chief.worker_index == 0  # worker 0 leads when there is no chief
    with pytest.raises(ClusterConfigError, match="task index 5"):
        read_cluster({"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1"]},
                                               "task": {"type": "worker", "index": 5}})})
    with pytest.raises(ClusterConfigError, match="CLUSTER_SPEC"):
        read_cluster({"CLUSTER_SPEC": json.dumps({"cluster": {"pool9": []}})})


def _start_workers(environments: list[dict], flags: list[str], log_dir: Path, run: str) -> list:
    processes = []
    for i, env in enumerate(environments):
        with open(log_dir / f"{run}-worker{i}.log", "w") as log:
            processes.append(subprocess.Popen([sys.executable, "-m", "trainer.train", *flags], env=env, stdout=log,
                                              stderr=subprocess.STDOUT))
    return processes


def _logs(log_dir: Path, run: str) -> list[str]:
    return [(log_dir / f"{run}-worker{i}.log").read_text() for i in range(2)]


def test_two_workers_train_one_model_as_accurate_as_one_process_and_resume_after_a_kill(tmp_path):
    from trainer.synthetic import write_dataset
    from trainer.train import train_and_evaluate

    data = write_dataset(str(tmp_path / "data"), num_train=200, num_eval=80, seed=5, num_shards=2,
                         image_size=(SIZE, SIZE))
    backbone = _small_test_network(str(tmp_path / "small_test_network"))
    multi_dir = tmp_path / "multi"
    flags = [f"--train_data_path={data['train_pattern']}", f"--eval_data_path={data['eval_pattern']}",
             f"--hub_handle={backbone}", "--batch_size=16", "--num_epochs=30", f"--image_size={SIZE}",
             "--learning_rate=0.03", "--seed=3", "--verbose=2", f"--output_dir={multi_dir}"]

    # Two workers: the chief told by TF_CONFIG, the other by Vertex's CLUSTER_SPEC.
    chief, worker = (f"127.0.0.1:{p}" for p in _free_ports(2))
    base = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    base.pop("TF_CONFIG", None)
    environments = [
        {**base, "TF_CONFIG": json.dumps({"cluster": {"chief": [chief], "worker": [worker]},
                                          "task": {"type": "chief", "index": 0}})},
        {**base, "CLUSTER_SPEC": json.dumps({"cluster": {"workerpool0": [chief], "workerpool1": [worker]},
                                             "task": {"type": "workerpool1", "index": 0}})},
    ]
    # First run: killed (both workers, as a preempted Vertex job is) once two epochs are checkpointed.
    first = _start_workers(environments, flags, tmp_path, "first")
    deadline = time.monotonic() + 240
    try:
        while "Epoch 3/30" not in _logs(tmp_path, "first")[0] and time.monotonic() < deadline:
            assert all(p.poll() is None for p in first), "\n----\n".join(_logs(tmp_path, "first"))
            time.sleep(0.1)
    finally:
        for p in first:
            p.kill()
            p.wait(timeout=30)
    assert "Epoch 30/30" not in _logs(tmp_path, "first")[0], "training ended before the kill"
    assert not (multi_dir / "metrics.json").exists()

    # Second run: same command; it resumes from the chief's checkpoint instead of starting over.
    second = _start_workers(environments, flags, tmp_path, "second")
    try:
        codes = [p.wait(timeout=240) for p in second]
    finally:
        for p in second:
            if p.poll() is None:
                p.kill()
    texts = _logs(tmp_path, "second")
    assert codes == [0, 0], "\n----\n".join(t[-3000:] for t in texts)
    assert "Epoch 1/30" not in texts[0] and "Epoch 30/30" in texts[0]

    # The single-process reference, same data, flags and seed.
    single = train_and_evaluate(train_data_path=data["train_pattern"], eval_data_path=data["eval_pattern"],
                                output_dir=str(tmp_path / "single"), hub_handle=backbone, batch_size=16,
                                num_epochs=30, image_size=SIZE, learning_rate=0.03, seed=3, verbose=0)

    metrics = json.loads((multi_dir / "metrics.json").read_text())
    assert metrics["num_workers"] == 2 and metrics["strategy"] == "MultiWorkerMirroredStrategy"
    assert metrics["num_examples"] == 80
    assert single["accuracy"] >= 0.5, single  # the task is learnable with this network (chance: 0.2)
    assert abs(metrics["accuracy"] - single["accuracy"]) <= 0.1, (metrics["accuracy"], single["accuracy"])
    # Each worker cached the features of its own half of the training set.
    assert "cached backbone features for its 100 training images" in texts[0]
    assert "cached backbone features for its 100 training images" in texts[1]

    # One set of outputs: the chief's. The worker wrote no model, metrics, logs or checkpoint copies.
    assert (multi_dir / "keras_model" / "saved_model.pb").exists()
    assert sorted(p.name for p in multi_dir.iterdir()) == sorted(p.name for p in (tmp_path / "single").iterdir())
    chief_pids = {str(first[0].pid), str(second[0].pid)}
    events = list((multi_dir / "logs").rglob("events.out.tfevents.*"))
    # TensorBoard names its files ...tfevents.<time>.<host>.<pid>...: each was written by a chief process.
    assert events and all(e.name.split(".")[5] in chief_pids for e in events), ([e.name for e in events], chief_pids)
    assert not [p for p in (multi_dir / "checkpoints").rglob("*") if "workertemp" in p.name]
    worker_summary = json.loads(texts[1].strip().splitlines()[-1])
    assert worker_summary["num_examples"] == 0  # the worker did not evaluate: the chief did
