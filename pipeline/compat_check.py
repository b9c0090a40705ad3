"""Runs INSIDE the prediction runtime's TensorFlow (``.venv-compat``, tensorflow-cpu 2.15.1, the
newest TF of Vertex's prebuilt prediction images): load the exported SavedModel and call its three
signatures. Imports nothing but TensorFlow and the standard library, on purpose.

    .venv-compat/bin/python pipeline/compat_check.py MODEL_DIR IMAGE_FILE EXPECTED_JSON
"""

import json
import sys

import numpy as np
import tensorflow as tf


def main(model_dir: str, image_file: str, expected_json: str) -> None:
    expected = json.load(open(expected_json))
    loaded = tf.saved_model.load(model_dir)
    missing = {"serving_default", "xai_preprocess", "xai_model"} - set(loaded.signatures)
    if missing:
        raise SystemExit(f"{model_dir}: signatures missing under TF {tf.__version__}: {sorted(missing)}")
    image = tf.constant([open(image_file, "rb").read()])
    served = loaded.signatures["serving_default"](**{expected["serving_input"]: image})[expected["serving_output"]]
    pixels = loaded.signatures["xai_preprocess"](**{expected["serving_input"]: image})[expected["xai_input"]]
    via_xai = loaded.signatures["xai_model"](**{expected["xai_input"]: pixels})[expected["xai_output"]]
    gap = float(np.max(np.abs(served.numpy() - np.array(expected["probabilities"]))))
    gap_xai = float(np.max(np.abs(via_xai.numpy() - served.numpy())))
    print(json.dumps({"tensorflow": tf.__version__, "max_abs_diff_vs_training_tf": gap,
                      "max_abs_diff_xai_vs_serving": gap_xai}))
    if gap > 1e-4 or gap_xai > 1e-5:
        raise SystemExit(f"{model_dir}: TF {tf.__version__} gives different probabilities (max diff {gap:.2e})")


if __name__ == "__main__":
    main(*sys.argv[1:4])
