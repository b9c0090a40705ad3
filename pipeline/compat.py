"""``make compat``: prove the exported SavedModel loads and answers the same in the prediction
runtime a config names (Vertex's prebuilt images stop at TensorFlow 2.15), in its own virtual
environment, before a 20-minute deploy finds out.
"""

import json
import os
import subprocess
import sys
import tempfile
from typing import Sequence

COMPAT_VENV = ".venv-compat"
COMPAT_TENSORFLOW = "tensorflow-cpu==2.15.1"


def ensure_venv(venv: str = COMPAT_VENV, requirement: str = COMPAT_TENSORFLOW) -> str:
    """Create ``venv`` with ``requirement`` once; returns its python."""
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(os.path.join(venv, ".installed")):
        subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", requirement], check=True)
        open(os.path.join(venv, ".installed"), "w").write(requirement + "\n")
    return python


def check(model_dir: str, venv: str = COMPAT_VENV, requirement: str = COMPAT_TENSORFLOW) -> dict:
    """Run ``compat_check.py`` in the compat runtime against expectations computed here."""
    import trainer  # noqa: F401

    import tensorflow as tf

    from trainer.export import inspect_signatures

    names = inspect_signatures(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        rng = tf.random.Generator.from_seed(0)
        pixels = tf.cast(rng.uniform([192, 192, 3], 0, 255), tf.uint8)
        image = os.path.join(tmp, "probe.jpg")
        tf.io.write_file(image, tf.io.encode_jpeg(pixels))
        serve = tf.saved_model.load(model_dir).signatures["serving_default"]
        probs = serve(**{names.serving_input: tf.constant([tf.io.read_file(image).numpy()])})[names.serving_output]
        expected = os.path.join(tmp, "expected.json")
        json.dump({"serving_input": names.serving_input, "serving_output": names.serving_output,
                   "xai_input": names.xai_input, "xai_output": names.xai_output,
                   "probabilities": probs.numpy().tolist()}, open(expected, "w"))
        python = ensure_venv(venv, requirement)
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compat_check.py")
        out = subprocess.run([python, script, model_dir, image, expected], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"compat check failed for {model_dir} under {requirement}:\n{out.stderr[-3000:]}{out.stdout}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{model_dir} loads and answers under TensorFlow {result['tensorflow']} "
          f"(max |diff| {result['max_abs_diff_vs_training_tf']:.1e})")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.compat", description=__doc__)
    parser.add_argument("--model_dir", required=True, help="an exported model (trainer.export)")
    parser.add_argument("--venv", default=COMPAT_VENV)
    parser.add_argument("--requirement", default=COMPAT_TENSORFLOW, help="the prediction runtime's TensorFlow")
    args = parser.parse_args(argv)
    check(args.model_dir, args.venv, args.requirement)


if __name__ == "__main__":
    main()
