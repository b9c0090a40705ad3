"""Which machine am I, and with what strategy do I train: the cluster from ``TF_CONFIG`` or Vertex's
``CLUSTER_SPEC``.

Vertex AI custom jobs with several replicas describe the cluster to every replica. A TensorFlow
``MultiWorkerMirroredStrategy`` reads ``TF_CONFIG``; Vertex sets it, and always sets
``CLUSTER_SPEC`` (worker pools ``workerpool0`` = the chief, ``workerpool1`` = the other workers), so
when only ``CLUSTER_SPEC`` is there it is translated into ``TF_CONFIG``. Without a cluster the
trainer uses no strategy at all (the single-process path stays exactly as fast as before), or
``MirroredStrategy`` when the machine has several GPUs.

Only the chief writes checkpoints, metrics and the model; other workers write to scratch, so two
replicas never write the same files.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Mapping, MutableMapping

#: Vertex worker pools as ``TF_CONFIG`` task types (pool 2 is for parameter servers, 3 for evaluators).
_POOL_TYPES = {"workerpool0": "chief", "workerpool1": "worker", "workerpool2": "ps", "workerpool3": "evaluator"}
#: Task types that train (hold a replica of the model).
TRAINING_TYPES = ("chief", "worker")


class ClusterConfigError(ValueError):
    """``TF_CONFIG`` / ``CLUSTER_SPEC`` cannot be used; the message says which variable and why."""


@dataclass(frozen=True)
class Cluster:
    """This process's place in the training cluster (one worker, the chief, when there is none)."""

    num_workers: int = 1
    task_type: str = "chief"
    task_index: int = 0
    tf_config: Mapping[str, Any] | None = None

    @property
    def is_chief(self) -> bool:
        """The chief writes the outputs: the ``chief`` task, or worker 0 when the cluster has no chief."""
        if self.tf_config is None:
            return True
        cluster = self.tf_config.get("cluster", {})
        if "chief" in cluster:
            return self.task_type == "chief"
        return self.task_type == "worker" and self.task_index == 0

    @property
    def worker_index(self) -> int:
        """This worker's position among the training tasks (chief first): its data shard."""
        cluster = (self.tf_config or {}).get("cluster", {})
        if self.task_type == "worker" and "chief" in cluster:
            return len(cluster["chief"]) + self.task_index
        return self.task_index


def cluster_spec_to_tf_config(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Vertex's ``CLUSTER_SPEC`` (``{"cluster": {"workerpool0": [...], ...}, "task": {"type":
    "workerpool1", "index": 0}}``) as ``TF_CONFIG``."""
    try:
        cluster = {_POOL_TYPES[pool]: list(hosts) for pool, hosts in spec["cluster"].items() if hosts}
        task = {"type": _POOL_TYPES[spec["task"]["type"]], "index": int(spec["task"].get("index", 0))}
    except (KeyError, TypeError, AttributeError) as e:
        raise ClusterConfigError(f"CLUSTER_SPEC: not Vertex's cluster spec ({type(e).__name__}: {e}); expected "
                                 '{"cluster": {"workerpool0": [...]}, "task": {"type": "workerpool0", "index": 0}}')
    return {"cluster": cluster, "task": task}


def read_cluster(environ: MutableMapping[str, str] | None = None) -> Cluster:
    """The cluster from ``TF_CONFIG`` (or ``CLUSTER_SPEC``, then written to ``TF_CONFIG`` for TensorFlow)."""
    environ = os.environ if environ is None else environ
    name = "TF_CONFIG"
    raw = environ.get("TF_CONFIG")
    if not raw and environ.get("CLUSTER_SPEC"):
        name = "CLUSTER_SPEC"
        try:
            config = cluster_spec_to_tf_config(json.loads(environ["CLUSTER_SPEC"]))
        except json.JSONDecodeError as e:
            raise ClusterConfigError(f"CLUSTER_SPEC is not JSON: {e}") from None
        raw = environ["TF_CONFIG"] = json.dumps(config)
    if not raw:
        return Cluster()
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ClusterConfigError(f"{name} is not JSON: {e}") from None
    cluster, task = config.get("cluster") or {}, config.get("task") or {}
    task_type, task_index = task.get("type"), task.get("index", 0)
    if task_type not in cluster:
        raise ClusterConfigError(f"{name}: task type {task_type!r} is not in the cluster {sorted(cluster)}")
    if not isinstance(task_index, int) or not 0 <= task_index < len(cluster[task_type]):
        raise ClusterConfigError(f"{name}: task index {task_index!r} out of range for {len(cluster[task_type])} "
                                 f"{task_type} task(s)")
    num_workers = sum(len(cluster.get(t, [])) for t in TRAINING_TYPES)
    return Cluster(num_workers=num_workers, task_type=task_type, task_index=task_index, tf_config=config)


def make_strategy(cluster: Cluster):
    """``MultiWorkerMirroredStrategy`` across workers, ``MirroredStrategy`` across the GPUs of one
    machine, or None (no strategy: the plain single-device path). Call it before any other
    TensorFlow work: collective ops must be configured at program start."""
    import tensorflow as tf

    if cluster.task_type not in TRAINING_TYPES:
        raise ClusterConfigError(f"TF_CONFIG: task type {cluster.task_type!r} does not train; this trainer runs "
                                 f"synchronous data-parallel training on {TRAINING_TYPES} tasks only")
    if cluster.num_workers > 1:
        return tf.distribute.MultiWorkerMirroredStrategy()
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return None


def write_dir(output_dir: str, cluster: Cluster) -> str:
    """Where this worker writes: ``output_dir`` for the chief, a local scratch directory otherwise."""
    if cluster.is_chief:
        return output_dir
    return tempfile.mkdtemp(prefix=f"trainer-{cluster.task_type}{cluster.task_index}-")
