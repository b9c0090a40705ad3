"""Step 0 (optional), split_data: one pattern of records into training and evaluation sets.

The lab's data is one pattern (``gs://asl-public/data/flowers-xai/*.tfrec``) that the lab itself
splits 80/20. Training and gating on that one pattern would score the model on its own training
data, and a gate scored that way passes anything. This step decides each record's side by a hash
of its serialized bytes, not by position or a random draw: the same record lands on the same side
in every run, whatever the file order or sharding, and when a scheduled run finds new records
added, the old ones keep their sides, so nothing trained on yesterday is evaluated on today.

    python -m components.split_data --data_path='gs://asl-public/data/flowers-xai/*.tfrec' \\
        --output_dir=runs/split --eval_percent=20
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import fire

#: Files per side; several shards let tf.data interleave reads.
NUM_SHARDS = 4


def eval_side(record: bytes, eval_percent: int) -> bool:
    """True when ``record`` belongs to the evaluation set: the first 8 bytes of its SHA-256 as a
    number, modulo 100, below ``eval_percent``."""
    return int.from_bytes(hashlib.sha256(record).digest()[:8], "big") % 100 < eval_percent


def split_records(data_path: str, output_dir: str, eval_percent: int = 20, num_shards: int = NUM_SHARDS
                  ) -> dict[str, Any]:
    """Write ``train-*.tfrec`` and ``validation-*.tfrec`` under ``output_dir``; returns their glob
    patterns and counts. Records are copied byte for byte (nothing re-encoded)."""
    if not 1 <= eval_percent <= 50:
        raise ValueError(f"eval_percent must be in [1, 50], got {eval_percent}")
    import trainer  # noqa: F401

    import tensorflow as tf

    from trainer.data import list_files

    files = list_files(data_path)  # names the pattern when it matches nothing
    tf.io.gfile.makedirs(output_dir)
    writers = {side: [tf.io.TFRecordWriter(os.path.join(output_dir, f"{side}-{i:05d}-of-{num_shards:05d}.tfrec"))
                      for i in range(num_shards)] for side in ("train", "validation")}
    counts = {"train": 0, "validation": 0}
    try:
        for record in tf.data.TFRecordDataset(files).as_numpy_iterator():
            side = "validation" if eval_side(record, eval_percent) else "train"
            writers[side][counts[side] % num_shards].write(record)
            counts[side] += 1
    finally:
        for side_writers in writers.values():
            for writer in side_writers:
                writer.close()
    if not counts["train"] or not counts["validation"]:
        raise ValueError(f"{data_path}: splitting {sum(counts.values())} records at {eval_percent}% left "
                         f"{counts['train']} for training and {counts['validation']} for evaluation; need both")
    print(f"split {data_path}: {counts['train']} training, {counts['validation']} evaluation records")
    return {"train_data_path": os.path.join(output_dir, "train-*.tfrec"),
            "eval_data_path": os.path.join(output_dir, "validation-*.tfrec"),
            "num_train": counts["train"], "num_eval": counts["validation"]}


if __name__ == "__main__":
    fire.Fire(split_records, serialize=lambda r: json.dumps(r))
