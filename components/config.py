"""The pipeline's configuration: typed dataclasses loaded from YAML, validated on load.

Every setting of a run (where it runs, what it trains, how it explains, when it deploys) lives in
one YAML file (``configs/local.yaml`` by default, ``configs/vertex.yaml`` for Vertex AI), so a
scheduled retrain and a laptop run differ only in that file. Loading checks every field's type and
choices and names the offending field (``configs/x.yaml: training.batch_size: expected an integer,
got 'ten'``) before anything slow starts. ``--set a.b=c`` overrides any field from the command line
(the value is parsed as YAML, so ``--set training.num_epochs=2`` is an integer).

    python -m components.config --config=configs/vertex.yaml --set gcp.project=my-project
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from trainer.schema import DEFAULT_ADAPTIVE_START

DEFAULT_CONFIG = "configs/local.yaml"
#: Vertex's newest prebuilt TF prediction image (built-in explanations need a prebuilt image).
BUILTIN_SERVING_IMAGE = "us-docker.pkg.dev/vertex-ai/prediction/tf2-cpu.2-15:latest"
#: Vertex Explainable AI (built-in explanations) stops answering on this date.
BUILTIN_EXPLANATIONS_END = "2027-03-16"


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the file and field."""


def _default_explanation_parameters() -> dict[str, Any]:
    """IG refined to 0.05 from the default start."""
    return {"integrated_gradients_attribution": {"step_count": DEFAULT_ADAPTIVE_START}}


@dataclass
class PipelineSettings:
    """The pipeline run itself: its name, caching and run labels."""

    name: str = "flowers-xai"
    enable_caching: bool = False
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class GcpSettings:
    """Where on Google Cloud; empty strings mean "not set" (the local backend needs none)."""

    project: str = ""
    region: str = "us-central1"
    bucket: str = ""
    #: ``gs://`` URI for the pipeline's artifacts; empty: ``<bucket>/pipeline_root``.
    pipeline_root: str = ""
    service_account: str = ""
    #: ``projects/<number>/global/networks/<name>`` for VPC peering; empty: none.
    network: str = ""
    #: Customer-managed encryption key (CMEK): ``projects/p/locations/l/keyRings/r/cryptoKeys/k``.
    encryption_key: str = ""
    #: A private or regional Vertex API endpoint; empty: the SDK's default for ``region``.
    api_endpoint: str = ""


@dataclass
class ImageSettings:
    """Container images: ``components`` runs every step (and the custom training job),
    ``serving`` is ``serving/Dockerfile``, ``prebuilt_prediction`` Vertex's prebuilt TF image."""

    components: str = "python:3.11"
    serving: str = ""
    prebuilt_prediction: str = BUILTIN_SERVING_IMAGE


@dataclass
class DataSettings:
    """Training and evaluation records. They must differ: a gate scored on training data passes
    anything. For one pattern holding everything (the lab's ``flowers-xai/*.tfrec``), set
    ``eval_split_percent`` and leave ``eval_data_path`` empty: a split step sends each record to
    evaluation or training by a hash of its bytes, so a record stays on its side in every run."""

    train_data_path: str = "data/sample/train/*.tfrec"
    eval_data_path: str = "data/sample/validation/*.tfrec"
    #: 1..50: split ``train_data_path`` into training and this percentage for evaluation; 0: no split.
    eval_split_percent: int = 0


@dataclass
class TrainingSettings:
    """Hyper-parameters (``trainer.train``'s flags) and the Vertex custom job's resources."""

    hub_handle: str = "models/backbone"
    batch_size: int = 32
    num_epochs: int = 15
    learning_rate: float = 1e-3
    fine_tune_layers: int = 0
    seed: int = 42
    #: Examples per epoch; 0: the whole training set.
    train_examples: int = 0
    machine_type: str = "n1-standard-8"
    replica_count: int = 1
    accelerator_type: str = ""
    accelerator_count: int = 0
    #: Custom job timeout, as Vertex writes durations (``7200s``).
    timeout: str = "7200s"


@dataclass
class ModelSettings:
    """How the model is registered: one display name for all versions, labels, aliases."""

    display_name: str = "flowers-xai"
    labels: dict[str, str] = field(default_factory=dict)
    version_aliases: list[str] = field(default_factory=list)


@dataclass
class ExplanationSettings:
    """``parameters``: Vertex ``ExplanationParameters`` as sent at upload (snake_case SDK form);
    ``visualization``: the metadata's ``InputMetadata.Visualization``."""

    parameters: dict[str, Any] = field(
        default_factory=_default_explanation_parameters)
    visualization: dict[str, Any] = field(default_factory=dict)


@dataclass
class GateSettings:
    """Deploy only at or above ``min_accuracy`` and (``require_not_worse``) at or above the
    accuracy of the version currently serving plus ``margin``, both scored in the same run on the
    same evaluation data. With no model of that name registered yet the gate refuses unless
    ``allow_first_deploy`` (a champion that cannot be scored always fails closed)."""

    min_accuracy: float = 0.8
    require_not_worse: bool = True
    #: The challenger needs champion accuracy + margin (0: not worse; 0.01: one point better).
    margin: float = 0.0
    allow_first_deploy: bool = False


@dataclass
class DeploySettings:
    """Where and how the model serves. ``target`` matters on Vertex: ``builtin_explanations`` uses
    the prebuilt TF image and Vertex's explanations (stop on 2027-03-16), ``custom_container``
    our serving image with explanations carried in predictions."""

    target: Literal["custom_container", "builtin_explanations"] = "custom_container"
    endpoint_display_name: str = "flowers-xai-endpoint"
    machine_type: str = "n1-standard-4"
    min_replica_count: int = 1
    max_replica_count: int = 1
    #: Share of the endpoint's traffic the new version gets.
    traffic_percentage: int = 100


@dataclass
class BatchPredictSettings:
    """Bulk explanations of a dataset by the uploaded model (pipeline step ``batch_predict`` when
    ``enabled``). On Vertex: a BatchPredictionJob running the serving container over ``source``
    (``gs://`` JSONL instances, or a ``file-list`` of image URIs) on ``machine_type`` machines,
    ``starting_replica_count``..``max_replica_count`` of them, ``batch_size`` instances per request;
    locally: ``explain.batch`` over ``source`` (a folder, glob, TFRecords or JSONL). Output in
    Vertex's layout under ``destination``."""

    enabled: bool = False
    source: str = ""
    destination: str = ""
    instances_format: Literal["jsonl", "file-list"] = "jsonl"
    machine_type: str = "n1-standard-8"
    starting_replica_count: int = 1
    max_replica_count: int = 1
    accelerator_type: str = ""
    accelerator_count: int = 0
    batch_size: int = 8


@dataclass
class ScheduleSettings:
    display_name: str = "flowers-xai-retrain"
    #: Cron expression, optionally prefixed with ``TZ=<IANA zone>``.
    cron: str = "0 3 * * 1"
    max_concurrent_run_count: int = 1


@dataclass
class LocalSettings:
    """The offline backend: the on-disk registry and where local runs write."""

    registry_dir: str = "local_registry"
    work_dir: str = "runs/pipeline"


@dataclass
class Config:
    """The whole configuration. ``backend`` picks where every step runs."""

    backend: Literal["local", "vertex"] = "local"
    gcp: GcpSettings = field(default_factory=GcpSettings)
    images: ImageSettings = field(default_factory=ImageSettings)
    data: DataSettings = field(default_factory=DataSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    explanation: ExplanationSettings = field(default_factory=ExplanationSettings)
    gate: GateSettings = field(default_factory=GateSettings)
    deploy: DeploySettings = field(default_factory=DeploySettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    batch_predict: BatchPredictSettings = field(default_factory=BatchPredictSettings)
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    local: LocalSettings = field(default_factory=LocalSettings)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- validation
_LABEL_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_LABEL_VALUE_RE = re.compile(r"^[a-z0-9_-]{0,63}$")
_DURATION_RE = re.compile(r"^\d+(\.\d+)?s$")


#: Numbers PyYAML's YAML 1.1 resolver reads as strings: an exponent without a dot (``1e-3``).
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against the type ``hint``; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{where}: must be one of {list(allowed)}, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_describe(value)}")
        return value
    if hint is float:
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            value = float(value)  # 1e-3 is a number in YAML 1.2 and to every reader; PyYAML (1.1) reads a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {_describe(value)}")
        if not math.isfinite(value):  # .nan / .inf pass YAML, then fail far away (a protobuf error naming nothing)
            raise ConfigError(f"{where}: expected a finite number, got {value}")
        return float(value)
    if hint is str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_describe(value)}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {_describe(value)}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_hint, value_hint = typing.get_args(hint)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_describe(value)}")
        return {_coerce(k, key_hint, f"{where} key"): (v if value_hint is Any else _coerce(v, value_hint, f"{where}.{k}"))
                for k, v in value.items()}
    raise TypeError(f"{where}: unsupported type hint {hint}")  # a bug in this module, not in the file


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown field(s) {unknown}; allowed: {names}")
    prefix = f"{where}." if where else ""
    return cls(**{name: _coerce(data[name], hints[name], prefix + name) for name in names if name in data})


def _check(config: Config) -> None:
    """Rules beyond types: ranges, label syntax, and what the Vertex backend cannot run without."""
    def fail(name: str, message: str) -> None:
        raise ConfigError(f"{name}: {message}")

    t = config.training
    for name in ("batch_size", "num_epochs", "replica_count"):
        if getattr(t, name) < 1:
            fail(f"training.{name}", f"must be >= 1, got {getattr(t, name)}")
    for name in ("train_examples", "fine_tune_layers", "accelerator_count"):
        if getattr(t, name) < 0:
            fail(f"training.{name}", f"must be >= 0, got {getattr(t, name)}")
    if t.learning_rate <= 0:
        fail("training.learning_rate", f"must be > 0, got {t.learning_rate}")
    if not _DURATION_RE.match(t.timeout):
        fail("training.timeout", f"must be a duration in seconds like '7200s', got {t.timeout!r}")
    if not 0 <= config.gate.min_accuracy <= 1:
        fail("gate.min_accuracy", f"must be in [0, 1], got {config.gate.min_accuracy}")
    if not -1 <= config.gate.margin <= 1:
        fail("gate.margin", f"must be in [-1, 1], got {config.gate.margin}")
    _check_data(config.data, fail)
    d = config.deploy
    if not 0 < d.traffic_percentage <= 100:
        fail("deploy.traffic_percentage", f"must be in (0, 100], got {d.traffic_percentage}")
    if not 1 <= d.min_replica_count <= d.max_replica_count:
        fail("deploy.min_replica_count", f"need 1 <= min_replica_count ({d.min_replica_count}) <= "
                                         f"max_replica_count ({d.max_replica_count})")
    if config.schedule.max_concurrent_run_count < 1:
        fail("schedule.max_concurrent_run_count", f"must be >= 1, got {config.schedule.max_concurrent_run_count}")
    if len(config.schedule.cron.split()) < 5:
        fail("schedule.cron", f"must be a cron expression with 5 fields, got {config.schedule.cron!r}")
    for where, labels in (("pipeline.labels", config.pipeline.labels), ("model.labels", config.model.labels)):
        for key, value in labels.items():
            if not _LABEL_RE.match(key) or not _LABEL_VALUE_RE.match(str(value)):
                fail(f"{where}.{key}", f"{key}={value!r} is not a valid label: lower-case letters, digits, "
                                       "'_' or '-', keys starting with a letter, at most 63 characters")
    if not config.model.display_name.strip():
        fail("model.display_name", "must not be empty")
    if not config.deploy.endpoint_display_name.strip():
        fail("deploy.endpoint_display_name", "must not be empty")
    for name in ("pipeline_root", "bucket"):
        value = getattr(config.gcp, name)
        if value and not value.startswith("gs://"):
            fail(f"gcp.{name}", f"must be a gs:// URI, got {value!r}")
    _check_resources(config, fail)
    _check_explanations(config)


#: Vertex's GPU types and the machine families each attaches to (others: no accelerator allowed).
_ACCELERATOR_MACHINES = {
    "NVIDIA_TESLA_T4": ("n1-",), "NVIDIA_TESLA_V100": ("n1-",), "NVIDIA_TESLA_P100": ("n1-",),
    "NVIDIA_TESLA_P4": ("n1-",), "NVIDIA_TESLA_K80": ("n1-",), "NVIDIA_L4": ("g2-",),
    "NVIDIA_TESLA_A100": ("a2-highgpu-", "a2-megagpu-"), "NVIDIA_A100_80GB": ("a2-ultragpu-",),
    "NVIDIA_H100_80GB": ("a3-highgpu-",), "NVIDIA_H100_MEGA_80GB": ("a3-megagpu-",),
}
#: Machine families that come with GPUs attached: they need an accelerator setting.
_GPU_FAMILIES = ("a2-", "a3-", "g2-")
_MACHINE_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)+$")


def _check_machine(where: str, machine_type: str, accelerator_type: str, accelerator_count: int, fail) -> None:
    """Machine type, accelerator type and count together, as Vertex accepts them."""
    if not _MACHINE_RE.match(machine_type):
        fail(f"{where}.machine_type", f"must be a Compute Engine machine type like 'n1-standard-8', got "
                                      f"{machine_type!r}")
    if bool(accelerator_type) != bool(accelerator_count):
        fail(f"{where}.accelerator_type", f"accelerator_type ({accelerator_type!r}) and accelerator_count "
                                          f"({accelerator_count}) go together: set both or neither")
    if not accelerator_type:
        if machine_type.startswith(_GPU_FAMILIES):
            fail(f"{where}.accelerator_type", f"machine type {machine_type} comes with GPUs: set accelerator_type "
                                              "and accelerator_count")
        return
    if accelerator_type not in _ACCELERATOR_MACHINES:
        fail(f"{where}.accelerator_type", f"must be one of {sorted(_ACCELERATOR_MACHINES)}, got {accelerator_type!r}")
    if not machine_type.startswith(_ACCELERATOR_MACHINES[accelerator_type]):
        families = " or ".join(f"{f}*" for f in _ACCELERATOR_MACHINES[accelerator_type])
        fail(f"{where}.machine_type", f"{accelerator_type} attaches to {families} machines, not {machine_type}")
    if accelerator_count not in (1, 2, 4, 8, 16):
        fail(f"{where}.accelerator_count", f"must be 1, 2, 4, 8 or 16 GPUs per machine, got {accelerator_count}")


def _check_resources(config: Config, fail) -> None:
    """Training replicas, machines and accelerators, and the batch-prediction job's, together."""
    t = config.training
    _check_machine("training", t.machine_type, t.accelerator_type, t.accelerator_count, fail)
    replicas = t.replica_count * max(1, t.accelerator_count)
    if t.batch_size % replicas:
        fail("training.batch_size", f"{t.batch_size} is the global batch, split evenly over the {t.replica_count} "
                                    f"machine(s) x {max(1, t.accelerator_count)} device(s) = {replicas} replicas "
                                    "training in sync: make it a multiple of that")
    b = config.batch_predict
    _check_machine("batch_predict", b.machine_type, b.accelerator_type, b.accelerator_count, fail)
    if not 1 <= b.starting_replica_count <= b.max_replica_count:
        fail("batch_predict.starting_replica_count", f"need 1 <= starting_replica_count ({b.starting_replica_count})"
                                                     f" <= max_replica_count ({b.max_replica_count})")
    if b.batch_size < 1:
        fail("batch_predict.batch_size", f"must be >= 1, got {b.batch_size}")
    if b.enabled:
        for name in ("source", "destination"):
            if not getattr(b, name):
                fail(f"batch_predict.{name}", "must be set when batch_predict.enabled")
        if config.backend == "vertex":
            for name in ("source", "destination"):
                bad = [u for u in getattr(b, name).split(",") if u.strip() and not u.strip().startswith("gs://")]
                if bad:
                    fail(f"batch_predict.{name}", f"must be gs:// URIs on Vertex (its machines read and write Cloud "
                                                  f"Storage), got {bad[0]!r}")


def _check_data(data: DataSettings, fail) -> None:
    """Evaluation data must not be the training data (a gate scored on what the model was trained
    on passes anything); one pattern for both is allowed only through the split step."""
    if not 0 <= data.eval_split_percent <= 50:
        fail("data.eval_split_percent", f"must be in [0, 50], got {data.eval_split_percent}")
    if data.eval_split_percent:
        if data.eval_data_path:
            fail("data.eval_data_path", "must be empty when data.eval_split_percent splits "
                                        f"data.train_data_path, got {data.eval_data_path!r}")
        return
    if not data.eval_data_path:
        fail("data.eval_data_path", "is empty; give evaluation records, or set data.eval_split_percent to split "
                                    "data.train_data_path")
    if _same_records(data.train_data_path, data.eval_data_path):
        fail("data.eval_data_path", f"{data.eval_data_path!r} reads the training records "
                                    f"(data.train_data_path {data.train_data_path!r}); evaluate on other data or "
                                    "set data.eval_split_percent and leave data.eval_data_path empty")


def _same_records(train: str, evaluation: str) -> bool:
    """True when the two patterns share a file: the same text, or (local paths) overlapping globs."""
    import glob
    import os

    if train.rstrip("/") == evaluation.rstrip("/"):
        return True
    if "://" in train or "://" in evaluation:
        return False  # listing a bucket at load time would need the network; the text check stands
    expand = lambda p: {os.path.realpath(f) for f in glob.glob(p)}  # noqa: E731
    return bool(expand(train) & expand(evaluation))


def _check_explanations(config: Config) -> None:
    """Parameters and visualization are checked by ``explain`` itself, the code that runs them
    locally and mirrors Vertex's rules, so a configuration Vertex would refuse fails here."""
    from explain import ExplanationParametersError, parse_explanation_parameters, parse_visualization

    try:
        parse_explanation_parameters(config.explanation.parameters)
    except ExplanationParametersError as e:
        raise ConfigError(f"explanation.parameters: {e}") from e
    try:
        parse_visualization(config.explanation.visualization)
    except ExplanationParametersError as e:
        raise ConfigError(f"explanation.visualization: {e}") from e


# --------------------------------------------------------------------------- loading
def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` to the raw mapping; the value is parsed as YAML."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {assignment!r}: expected KEY=VALUE, e.g. training.num_epochs=2")
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: {'.'.join(parts[:i + 1])} is not a mapping")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {assignment!r}: value is not valid YAML: {e}") from e


def from_dict(data: Mapping[str, Any], overrides: Sequence[str] = (), source: str = "config") -> Config:
    """A validated :class:`Config` from a mapping plus ``KEY=VALUE`` overrides."""
    data = copy.deepcopy(dict(data))
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        config = _build(Config, data, "")
        _check(config)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return config


def load_config(path: str | Path = DEFAULT_CONFIG, overrides: Sequence[str] | str = ()) -> Config:
    """Load, override and validate a YAML configuration file."""
    if isinstance(overrides, str):
        overrides = [overrides]
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read configuration: {e.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return from_dict(data, overrides, str(path))


def config_from_json(text: str | Mapping[str, Any]) -> Config:
    """The configuration a pipeline step received as JSON (see :func:`config_to_json`)."""
    return from_dict(json.loads(text) if isinstance(text, str) else text, source="config JSON")


def config_to_json(config: Config) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)


def add_config_arguments(parser) -> None:
    """``--config`` and repeatable ``--set`` on an argparse parser (every CLI here shares them)."""
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="YAML configuration file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a configuration field, e.g. --set training.num_epochs=2 (repeatable)")


def main(argv: Sequence[str] | None = None) -> None:
    """Print the validated configuration (after overrides) as YAML."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m components.config", description=main.__doc__)
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")


if __name__ == "__main__":
    main()
