"""6. Bulk explanations and predictions (``explain.batch``, as ``make batch-explain`` runs them)
against their floors: the measurement itself is :func:`bench.batch_throughput.run`; this module
feeds it the benchmark's validation images and turns its figures into the report's table.
"""

from __future__ import annotations

import importlib.util

from bench.common import table
from bench.fixtures import Assets
from bench.profiles import Profile


def validation_jpegs(pattern: str, n: int) -> list[bytes]:
    """The encoded images of the first ``n`` validation records, as a user's folder would hold them."""
    import tensorflow as tf

    from trainer.data import list_files

    spec = {"image": tf.io.FixedLenFeature([], tf.string)}
    records = tf.data.TFRecordDataset(list_files(pattern)).take(n)
    return [tf.io.parse_single_example(r, spec)["image"].numpy() for r in records]


def run(profile: Profile, assets: Assets, figures_dir: str) -> dict:
    if importlib.util.find_spec("bench.batch_throughput") is None:
        return {"skipped": "bench/batch_throughput.py is not in this tree"}
    from bench.batch_throughput import run as measure

    images = validation_jpegs(assets.eval_pattern, max(profile.batch_images, profile.batch_predict_images))
    steps = profile.batch_steps
    r = measure(assets.model_dir, images[:profile.batch_images], step_count=steps, batch_size=8,
                repeats=profile.batch_repeats, predict_images=images[:profile.batch_predict_images],
                floor_batches=profile.floor_batches)
    rows = [[f"explanations (IG, {steps} fixed steps)", r["explain_seconds_per_image"],
             r["explain_floor_seconds_per_image"], r["explain_vs_floor"]],
            ["predictions", r["predict_seconds_per_image"], r["serving_default_seconds_per_image"],
             r["predict_vs_serving_default"]]]
    return {
        "title": "6. Bulk explanations and predictions (explain.batch)",
        "description": (f"{r['images']} validation JPEGs (explanations) and {r['predict_images']} (predictions) "
                        f"written to a folder and run through `explain_batch` "
                        f"(read, check, decode, explain or predict, draw, write JSON lines), explain calls of "
                        f"{r['batch_size']} images, the median of {profile.batch_repeats} run(s) after a warm-up. "
                        f"Explanation floor: {steps} evaluations x one batched forward+backward pass per image "
                        f"({r['forward_backward_seconds_per_image'] * 1000:.1f} ms at the best batch size); fixed "
                        f"steps, so the evaluations are exactly {steps} per image and the floor is exact. "
                        f"Prediction reference: `serving_default` in process on batches "
                        f"of the same encoded images."),
        "tables": [table("Seconds per image", ["work", "explain.batch s / image", "reference s / image",
                                               "reference / ours"], rows)],
        "headline": {"bulk explanations, floor / ours": r["explain_vs_floor"],
                     "bulk predictions, serving_default / ours": r["predict_vs_serving_default"]},
        "raw": r,
    }
