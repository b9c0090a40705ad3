"""3. Training to the same validation accuracy: our trainer (frozen backbone's features computed
once, then the head trained on the cached vectors; parallel decode and prefetch) vs the lab's
pipeline (:mod:`bench.reference_lab_train`: the backbone re-run on every image of every epoch,
plain ``map``, no prefetch). Same data, same backbone, same epochs, same batch size.

Both runs start from the same seeds; accuracies are each pipeline's own validation accuracy
after the last epoch (ours: the assembled image model evaluated on images, as it reports it).
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from bench.common import table
from bench.fixtures import Assets
from bench.profiles import Profile


def run(profile: Profile, assets: Assets, figures_dir: str) -> dict:
    import tf_keras as keras

    from bench.reference_lab_train import train_and_evaluate as lab_train
    from trainer.data import count_records, list_files
    from trainer.train import set_determinism, train_and_evaluate

    shards = list_files(assets.train_pattern)[:profile.training_shards]
    train_pattern = ",".join(shards)
    num_train = count_records(train_pattern)
    epochs, batch_size = profile.training_epochs, 32
    results: dict[str, list[dict]] = {"ours": [], "lab": []}

    def ours() -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            metrics = train_and_evaluate(train_pattern, assets.eval_pattern, os.path.join(tmp, "run"),
                                         batch_size=batch_size, num_epochs=epochs, hub_handle=assets.backbone_dir,
                                         seed=profile.seed, verbose=0)
            return {"seconds": time.perf_counter() - t0, "accuracy": metrics["accuracy"]}

    def lab() -> dict:
        set_determinism(profile.seed)  # the same footing as ours, which sets it itself
        t0 = time.perf_counter()
        _, history = lab_train(train_pattern, assets.eval_pattern, batch_size, epochs, num_train,
                               assets.backbone_dir)
        return {"seconds": time.perf_counter() - t0, "accuracy": float(history["val_accuracy"][-1])}

    order = [("lab", lab), ("ours", ours)]
    for r in range(profile.training_repeats):
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            print(f"[training] {name}, round {r + 1}", flush=True)
            results[name].append(fn())
            keras.backend.clear_session()
    summary = {name: {"seconds": float(np.median([x["seconds"] for x in runs])),
                      "accuracy": float(np.median([x["accuracy"] for x in runs]))} for name, runs in results.items()}
    rows = [["ours (trainer.train, cached features)", summary["ours"]["seconds"], summary["ours"]["accuracy"]],
            ["lab train.py (backbone every epoch)", summary["lab"]["seconds"], summary["lab"]["accuracy"]]]
    return {
        "title": "3. Training",
        "description": (f"N = {num_train} training images"
                        + (" (the lab's scale: the flowers dataset's size, synthetic here)" if num_train == 3670 else
                           "" if profile.training_shards is None else
                           f" ({len(shards)} of the bench's training shards: the lab's pipeline runs the backbone "
                           f"on every image of every epoch, and {profile.training_epochs} epochs over all 3,670 "
                           f"would not fit the bench's time limit on 2 cores)")
                        + f", {count_records(assets.eval_pattern)} validation images, {epochs} epochs of "
                        f"{num_train} examples, batch {batch_size}, the MobileNetV2 1.0 @ 192 backbone (the shared "
                        f"cached build) frozen; median of {profile.training_repeats} "
                        f"alternating run(s) each. Our time includes everything `trainer.train` does "
                        f"(data validation, feature caching, checkpoints, TensorBoard logs, evaluation of the "
                        f"assembled model on images, saving, figures); the lab's is `model.fit` alone."),
        "tables": [table("Wall-clock seconds and final validation accuracy",
                         ["pipeline", "seconds", "validation accuracy"], rows)],
        "headline": {"training speed-up vs the lab's pipeline": summary["lab"]["seconds"] / summary["ours"]["seconds"],
                     "training N (images) x epochs": f"{num_train} x {epochs}",
                     "validation accuracy, ours minus lab":
                         round(summary["ours"]["accuracy"] - summary["lab"]["accuracy"], 4)},
        "raw": results,
    }
