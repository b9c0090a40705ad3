"""Figures people would rather look at than numbers: sample grids, confusion matrices, curves.

Matplotlib's Agg backend, so they render the same on a laptop, in CI and in a Vertex container
without a display.
"""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_samples_grid(images: np.ndarray, labels: Sequence[int], class_names: Sequence[str], path: str,
                      title: str | None = None) -> str:
    """A 3x3 grid of labelled samples, as the lab's ``display_9_images_from_dataset``.

    ``images`` are ``float [N, H, W, 3]`` in [0, 1] or ``uint8``; only the first nine are shown.
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    fig, axes = plt.subplots(3, 3, figsize=(9, 9))
    for ax, image, label in zip(axes.flat, images, labels):
        ax.imshow(np.clip(image, 0, 1) if np.asarray(image).dtype.kind == "f" else image)
        ax.set_title(class_names[int(label)], fontsize=14)
    for ax in axes.flat:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=16)
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: str,
                          title: str = "Confusion matrix") -> str:
    """Counts in the cells, colour by share of the true class (rows: true, columns: predicted), so
    a rare class's errors are as visible as a frequent one's."""
    cm = np.asarray(cm)
    if cm.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion matrix of shape {cm.shape} for {len(class_names)} class names")
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = 2.5 + 0.8 * len(class_names)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of true class")
    return _save(fig, path)


def plot_history(history: dict[str, list[float]], path: str) -> str:
    """Loss and accuracy per epoch, training (solid) and validation (dashed): Keras's
    ``History.history`` as it is."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            values = history.get(key) or []
            if len(values):
                ax.plot(range(1, len(values) + 1), values, style, marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        if ax.lines:
            ax.legend()
        else:
            ax.text(0.5, 0.5, f"no {metric} recorded", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
