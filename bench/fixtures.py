"""The data and models every benchmark measures, built offline and cached.

``bench/.cache/<profile>/`` holds the synthetic flowers (with their ground-truth masks), the
MobileNetV2-style backbone in TF Hub format, the trained classifier and its export. They are
built once (the first ``make bench`` pays for it; the time is reported) and reused, so a
benchmark's figures never include building its inputs.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

from bench.profiles import Profile

CACHE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache")
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
        return os.path.join(self.root, "backbone")

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

    def build_info(self) -> dict:
        with open(os.path.join(self.root, _DONE)) as f:
            return json.load(f)


def ensure_assets(profile: Profile, cache_dir: str = CACHE_DIR) -> Assets:
    """Build (or reuse) ``profile``'s data, backbone, trained model and export."""
    from trainer.backbone import build_local_backbone
    from trainer.export import export_keras_model
    from trainer.synthetic import write_dataset
    from trainer.train import train_and_evaluate

    assets = Assets(os.path.join(cache_dir, profile.name))
    done = os.path.join(assets.root, _DONE)
    key = {k: getattr(profile, k) for k in ("num_train", "num_eval", "backbone_images", "backbone_epochs",
                                            "train_epochs", "seed")}
    if os.path.exists(done) and assets.build_info().get("key") == key:
        return assets
    os.makedirs(assets.root, exist_ok=True)
    print(f"[bench] building the {profile.name} data and model under {assets.root} (once; cached)", flush=True)
    seconds = {}
    t0 = time.perf_counter()
    write_dataset(assets.data_dir, profile.num_train, profile.num_eval, seed=profile.seed, num_shards=4)
    seconds["data"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    build_local_backbone(assets.backbone_dir, num_images=profile.backbone_images, epochs=profile.backbone_epochs,
                         verbose=0)
    seconds["backbone"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = train_and_evaluate(assets.train_pattern, assets.eval_pattern, assets.run_dir,
                                 hub_handle=assets.backbone_dir, batch_size=32, num_epochs=profile.train_epochs,
                                 seed=profile.seed, verbose=0)
    seconds["train"] = time.perf_counter() - t0
    export_keras_model(assets.keras_model_dir, assets.model_dir, verbose=False)
    with open(done, "w") as f:
        json.dump({"key": key, "seconds": seconds, "validation_accuracy": metrics["accuracy"]}, f, indent=2)
    return assets
