"""5. Scale: how Integrated Gradients time grows with the step count, the batch of instances and
the image size, for ours, ``saliency`` and the tutorial (one plot, three panels).

Image sizes need a model of each input size: an untrained MobileNetV2 1.0 at that size (the
architecture of the real backbone) is exported per size (time does not depend on the weights).
"""

from __future__ import annotations

import functools
import os

import numpy as np

from bench.common import SignatureModel, alternate, load_eval_set, table
from bench.fixtures import Assets
from bench.profiles import Profile


def _export_size(size: int, directory: str) -> str:
    import tf_keras as keras

    from trainer.backbone import build_feature_network
    from trainer.export import export_model
    from trainer.schema import CLASSES

    if not os.path.exists(os.path.join(directory, "saved_model.pb")):
        keras.utils.set_random_seed(0)
        features = build_feature_network((size, size))
        model = keras.Sequential([features, keras.layers.Dense(len(CLASSES), activation="softmax")])
        export_model(model, directory, CLASSES, image_size=(size, size), verbose=False)
    return directory


@functools.lru_cache(maxsize=None)
def _models(model_dir: str) -> tuple:
    """Each model loaded (and its functions traced) once, not once per measured point."""
    import saliency.core as saliency

    from bench.reference_ig import make_integrated_gradients
    from explain import load_explainable_model

    ours, reference = load_explainable_model(model_dir), SignatureModel(model_dir)
    return ours, make_integrated_gradients(reference), saliency.IntegratedGradients(), reference.saliency_call()


def _contenders(model_dir: str, images: np.ndarray, steps: int) -> dict:
    from explain.integrated_gradients import IntegratedGradients

    ours, tutorial, lib, call = _models(model_dir)
    baselines, classes = np.zeros_like(images), np.zeros(len(images), np.int32)
    return {
        "ours": lambda: IntegratedGradients().GetMask(images, baselines, classes, ours, step_count=steps,
                                                      quadrature="riemann_middle"),
        "saliency": lambda: [lib.GetMask(x, call, {"class_index": 0}, x_baseline=b, x_steps=steps, batch_size=32)
                             for x, b in zip(images, baselines)],
        "tutorial": lambda: [tutorial(b, x, 0, m_steps=steps - 1) for x, b in zip(images, baselines)],
    }


def run(profile: Profile, assets: Assets, figures_dir: str) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import tensorflow as tf

    data = load_eval_set(assets.eval_pattern, max(profile.scale_batches))
    base_steps = profile.scale_base_steps
    series: dict[str, dict[str, list]] = {"steps": {}, "batch": {}, "size": {}}
    rows = []

    def measure(axis: str, value: int, model_dir: str, images: np.ndarray, steps: int) -> None:
        print(f"[scale] {axis} = {value}", flush=True)
        fns = _contenders(model_dir, images, steps)
        for name, t in alternate(fns, repeats=profile.scale_repeats, warmup=1).items():
            series[axis].setdefault(name, []).append((value, t.median))
            rows.append([axis, value, name, t.median])

    for steps in profile.scale_steps:
        measure("steps", steps, assets.model_dir, data.images[:1], steps)
    for batch in profile.scale_batches:
        measure("batch", batch, assets.model_dir, data.images[:batch], base_steps)
    for size in profile.scale_sizes:
        directory = assets.model_dir if size == 192 else _export_size(
            size, os.path.join(os.path.dirname(assets.model_dir), f"scale_{size}"))
        images = tf.image.resize(data.images[:1], (size, size)).numpy()
        measure("size", size, directory, images, base_steps)

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    labels = {"steps": "steps (1 image)", "batch": f"images per call ({base_steps} steps)",
              "size": f"image side, pixels (1 image, {base_steps} steps)"}
    for ax, (axis, by_name) in zip(axes, series.items()):
        for name, points in by_name.items():
            x, y = zip(*points)
            ax.plot(x, y, marker="o", label=name)
        ax.set_xlabel(labels[axis])
        ax.set_ylabel("seconds")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Integrated Gradients time")
    fig.tight_layout()
    path = os.path.join(figures_dir, "ig_scale.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {
        "title": "5. Scale",
        "description": (f"MobileNetV2 1.0 (the trained model at 192; untrained ones at the other sizes), fixed "
                        f"steps (midpoint for ours). Median of {profile.scale_repeats} alternating runs per point. Batch: ours takes all "
                        f"instances in one call; `saliency` and the tutorial loop over them, as they explain one "
                        f"image per call."),
        "tables": [table("Seconds per call", ["varying", "value", "implementation", "seconds"], rows)],
        "figures": [path],
        "headline": {},
        "raw": series,
    }
