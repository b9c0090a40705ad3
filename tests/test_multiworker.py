"""Multi-worker training: two ``trainer.train`` processes on 127.0.0.1 (one configured by ``TF_CONFIG``,
one by Vertex's ``CLUSTER_SPEC``) train one model with ``MultiWorkerMirroredStrategy``, reach the
single process's accuracy, and leave one set of outputs, the chief's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
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


def test_two_workers_train_one_model_as_accurate_as_one_process(tmp_path):
    from trainer.synthetic import write_dataset
    from trainer.train import train_and_evaluate

    data = write_dataset(str(tmp_path / "data"), num_train=200, num_eval=80, seed=5, num_shards=2,
                         image_size=(SIZE, SIZE))
    backbone = _small_test_network(str(tmp_path / "small_test_network"))
    flags = [f"--train_data_path={data['train_pattern']}", f"--eval_data_path={data['eval_pattern']}",
             f"--hub_handle={backbone}", "--batch_size=16", "--num_epochs=30", f"--image_size={SIZE}",
             "--learning_rate=0.03", "--seed=3", "--verbose=0"]

    # Two workers: the chief told by TF_CONFIG, the other by Vertex's CLUSTER_SPEC.
    chief, worker = (f"127.0.0.1:{p}" for p in _free_ports(2))
    multi_dir = tmp_path / "multi"
    base = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    base.pop("TF_CONFIG", None)
    environments = [
        {**base, "TF_CONFIG": json.dumps({"cluster": {"chief": [chief], "worker": [worker]},
                                          "task": {"type": "chief", "index": 0}})},
        {**base, "CLUSTER_SPEC": json.dumps({"cluster": {"workerpool0": [chief], "workerpool1": [worker]},
                                             "task": {"type": "workerpool1", "index": 0}})},
    ]
    logs = [open(tmp_path / f"worker{i}.log", "w+") for i in range(2)]
    processes = [subprocess.Popen([sys.executable, "-m", "trainer.train", *flags, f"--output_dir={multi_dir}"],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
                 for env, log in zip(environments, logs)]
    try:
        codes = [p.wait(timeout=240) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    texts = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], "\n----\n".join(t[-3000:] for t in texts)

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
    assert len(list((multi_dir / "logs").rglob("events.out.tfevents.*"))) == 1
    assert not [p for p in (multi_dir / "checkpoints").rglob("*") if "workertemp" in p.name]
    worker_summary = json.loads(texts[1].strip().splitlines()[-1])
    assert worker_summary["num_examples"] == 0  # the worker did not evaluate: the chief did
