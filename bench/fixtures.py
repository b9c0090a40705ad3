"""The data and models every benchmark measures, built offline and cached.

``bench/.cache/<profile>/`` holds the synthetic flowers (with their ground-truth masks), the
trained classifier and its export. The backbone is not built here: both profiles use the one
cached build of MobileNetV2 1.0 @ 192 (:data:`trainer.backbone.DEFAULT_RECIPE`) under
``<repo>/models/backbone`` that the demo and the tests share (:func:`trainer.backbone.ensure_backbone`
builds it once and reuses it while its recipe matches). Everything is built once (the first
``make bench`` pays for it; the time is reported) and reused, so a benchmark's figures never
include building its inputs.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

from bench.profiles import Profile

CACHE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache")
#: The backbone the demo and the tests use (tests/conftest.py SHARED_BACKBONE_DIR): one build for all.
SHARED_BACKBONE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "backbone")
_DONE = "built.json"


@dataclass(frozen=True)
class Assets:
    """Paths of one profile's cached inputs."""

    root: str

    @property
    def data_dir(self) -> str:
        return os.path.join(self.root, "data")

    @property
    def train_pattern(self) -> str:
        return os.path.join(self.data_dir, "train", "*.tfrec")

    @property
    def eval_pattern(self) -> str:
        return os.path.join(self.data_dir, "validation", "*.tfrec")

    @property
    def backbone_dir(self) -> str:
        """The shared cached backbone (not under this profile's cache)."""
        return SHARED_BACKBONE_DIR

    @property
    def run_dir(self) -> str:
        return os.path.join(self.root, "run")

    @property
    def keras_model_dir(self) -> str:
        return os.path.join(self.run_dir, "keras_model")

    @property
    def model_dir(self) -> str:
        """The exported SavedModel (three signatures, labels, explanation metadata)."""
        return os.path.join(self.root, "model")

    def fingerprint(self) -> str | None:
        """The export's identity: TensorFlow's SavedModel fingerprint hashes of its weights and of
        its graph (not the file whole: it holds a random id per export). The same recipe built on
        another machine trains other weights (float rounding differs across CPUs), so results are
        comparable only on equal fingerprints. None when the export has no fingerprint."""
        import tensorflow as tf

        try:
            fingerprint = tf.saved_model.experimental.read_fingerprint(self.model_dir)
        except (OSError, ValueError, tf.errors.OpError):
            return None
        return f"{fingerprint.checkpoint_hash:x}-{fingerprint.graph_def_program_hash:x}"

    def build_info(self) -> dict:
        with open(os.path.join(self.root, _DONE)) as f:
            return json.load(f)


def ensure_assets(profile: Profile, cache_dir: str = CACHE_DIR) -> tuple[Assets, dict]:
    """Reuse (or build) the shared backbone, then ``profile``'s data, trained model and export.

    Returns the paths and the build info (seconds of each step, whether the backbone and the
    profile's build were reused, the backbone's recipe). The cache key holds the backbone's
    recipe, so a rebuilt backbone retrains the classifier."""
    from dataclasses import asdict

    from trainer.backbone import DEFAULT_RECIPE, ensure_backbone, read_recipe
    from trainer.export import export_keras_model
    from trainer.synthetic import write_dataset
    from trainer.train import train_and_evaluate

    assets = Assets(os.path.join(cache_dir, profile.name))
    seconds = {}
    t0 = time.perf_counter()
    reused = read_recipe(SHARED_BACKBONE_DIR) is not None and all(
        read_recipe(SHARED_BACKBONE_DIR).get(k) == v for k, v in asdict(DEFAULT_RECIPE).items())
    ensure_backbone(SHARED_BACKBONE_DIR, DEFAULT_RECIPE, verbose=0)
    backbone_seconds = time.perf_counter() - t0
    built = read_recipe(SHARED_BACKBONE_DIR)
    backbone = {"dir": SHARED_BACKBONE_DIR, "recipe": asdict(DEFAULT_RECIPE), "reused": reused,
                "seconds": 0.0 if reused else backbone_seconds,
                "parameters": built.get("parameters"), "feature_dim": built.get("feature_dim"),
                "pretrain_val_accuracy": built.get("pretrain_val_accuracy")}
    done = os.path.join(assets.root, _DONE)
    key = {**{k: getattr(profile, k) for k in ("num_train", "num_eval", "train_epochs", "seed")},
           "backbone_recipe": asdict(DEFAULT_RECIPE)}
    if os.path.exists(done) and assets.build_info().get("key") == key:
        info = assets.build_info()
        info["backbone"] = backbone
        info["reused"] = True
        info["model_fingerprint"] = assets.fingerprint()
        return assets, info
    os.makedirs(assets.root, exist_ok=True)
    print(f"[bench] building the {profile.name} data and model under {assets.root} (once; cached)", flush=True)
    seconds["backbone"] = backbone["seconds"]
    t0 = time.perf_counter()
    write_dataset(assets.data_dir, profile.num_train, profile.num_eval, seed=profile.seed, num_shards=4)
    seconds["data"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = train_and_evaluate(assets.train_pattern, assets.eval_pattern, assets.run_dir,
                                 hub_handle=SHARED_BACKBONE_DIR, batch_size=32, num_epochs=profile.train_epochs,
                                 seed=profile.seed, verbose=0)
    seconds["train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    export_keras_model(assets.keras_model_dir, assets.model_dir, verbose=False)
    seconds["export"] = time.perf_counter() - t0
    info = {"key": key, "seconds": seconds, "validation_accuracy": metrics["accuracy"]}
    with open(done, "w") as f:
        json.dump(info, f, indent=2)
    return assets, dict(info, backbone=backbone, reused=False, model_fingerprint=assets.fingerprint())
