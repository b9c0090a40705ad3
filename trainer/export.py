"""Export a trained classifier as a SavedModel with the three signatures Vertex explanations use,
then write its labels and ``explanation_metadata.json`` beside it.

The metadata is derived by loading the exported model back and reading its signatures, never
typed by hand, so a renamed tensor cannot silently break explanations after a 20-minute deploy.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import tensorflow as tf

from trainer.preprocess import preprocess_batch
from trainer.schema import (CHANNELS, CONCRETE_INPUT, EXPLANATION_METADATA_FILE, IMAGE_SIZE,
                            LABELS_FILE, SERVING_INPUT, SERVING_OUTPUT, SERVING_SIGNATURE,
                            XAI_MODEL_SIGNATURE, XAI_PREPROCESS_SIGNATURE)

#: Explanation metadata keys (the lab's ``inputs={"image": ...}``).
INPUT_KEY = "image"
OUTPUT_KEY = "probabilities"


class ExportError(ValueError):
    """The exported model's signatures do not have the shape explanations need."""


@dataclass(frozen=True)
class SignatureNames:
    """What inspection of an exported model found; printed as the lab prints it."""

    serving_input: str
    serving_output: str
    xai_input: str
    xai_output: str


def _signatures(model: tf.keras.Model, image_size: tuple[int, int]) -> dict[str, Any]:
    """The ``serving_default``, ``xai_preprocess`` and ``xai_model`` concrete functions."""

    @tf.function(input_signature=[tf.TensorSpec([None, *image_size, CHANNELS], tf.float32,
                                                name=CONCRETE_INPUT)])
    def xai_model(numpy_inputs):
        return {SERVING_OUTPUT: model(numpy_inputs, training=False)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=SERVING_INPUT)])
    def xai_preprocess(bytes_inputs):
        return {CONCRETE_INPUT: preprocess_batch(bytes_inputs, image_size)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=SERVING_INPUT)])
    def serving_default(bytes_inputs):
        images = preprocess_batch(bytes_inputs, image_size)
        return {SERVING_OUTPUT: model(images, training=False)}

    return {
        SERVING_SIGNATURE: serving_default.get_concrete_function(),
        XAI_PREPROCESS_SIGNATURE: xai_preprocess.get_concrete_function(),
        XAI_MODEL_SIGNATURE: xai_model.get_concrete_function(),
    }


def read_signature_defs(model_dir: str) -> Mapping[str, Any]:
    """The SignatureDefs of a SavedModel (name -> inputs and outputs by name), read from
    ``saved_model.pb`` alone: loading the graph costs seconds, reading the names does not."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(posixpath.join(model_dir, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    signatures: dict[str, Any] = {}
    for meta_graph in proto.meta_graphs:
        signatures.update({k: v for k, v in meta_graph.signature_def.items() if not k.startswith("__")})
    return signatures  # without TF2's internal "__saved_model_init_op", as loaded.signatures


def inspect_signatures(export_dir: str) -> SignatureNames:
    """Read the input/output names of the exported signatures and check they chain up."""
    signatures = read_signature_defs(export_dir)
    missing = {SERVING_SIGNATURE, XAI_PREPROCESS_SIGNATURE, XAI_MODEL_SIGNATURE} - set(signatures)
    if missing:
        raise ExportError(f"{export_dir}: SavedModel lacks signature(s) {sorted(missing)}")

    def io_names(name: str) -> tuple[list[str], list[str]]:
        return sorted(signatures[name].inputs), sorted(signatures[name].outputs)

    serving_in, serving_out = io_names(SERVING_SIGNATURE)
    pre_in, pre_out = io_names(XAI_PREPROCESS_SIGNATURE)
    xai_in, xai_out = io_names(XAI_MODEL_SIGNATURE)
    for name, names in [(SERVING_SIGNATURE, serving_in), (SERVING_SIGNATURE, serving_out),
                        (XAI_PREPROCESS_SIGNATURE, pre_out), (XAI_MODEL_SIGNATURE, xai_in),
                        (XAI_MODEL_SIGNATURE, xai_out)]:
        if len(names) != 1:
            raise ExportError(f"{export_dir}: signature {name} must have exactly one input and output, has {names}")
    if pre_out != xai_in:
        raise ExportError(f"{export_dir}: {XAI_PREPROCESS_SIGNATURE} outputs {pre_out} but "
                          f"{XAI_MODEL_SIGNATURE} expects {xai_in}")
    return SignatureNames(serving_in[0], serving_out[0], xai_in[0], xai_out[0])


def build_explanation_metadata(names: SignatureNames, labels: Sequence[str],
                               visualization: dict[str, Any] | None = None,
                               input_baselines: list | None = None) -> dict[str, Any]:
    """Vertex ``ExplanationMetadata`` (the guide's JSON format) for an image classifier.

    Attributions are taken with respect to the ``xai_model`` input (the decoded pixels, which
    are differentiable), not the serialized bytes of ``serving_default``.
    """
    image_input: dict[str, Any] = {"input_tensor_name": names.xai_input, "modality": "image"}
    if visualization:
        image_input["visualization"] = dict(visualization)
    if input_baselines is not None:
        image_input["input_baselines"] = input_baselines
    return {
        "inputs": {INPUT_KEY: image_input},
        "outputs": {OUTPUT_KEY: {"output_tensor_name": names.xai_output,
                                 "index_display_name_mapping": list(labels)}},
        "framework": "tensorflow",
    }


def write_labels(export_dir: str, labels: Sequence[str]) -> None:
    with tf.io.gfile.GFile(posixpath.join(export_dir, LABELS_FILE), "w") as f:
        f.write("\n".join(labels) + "\n")


def output_count(function: Any) -> int | None:
    """The class count of a single-output signature (its output's last dimension), if static."""
    (output,) = function.structured_outputs.values()
    return output.shape[-1]


def read_labels(export_dir: str, num_outputs: int | None = None) -> list[str]:
    """Class labels written beside an exported model, in output order; with ``num_outputs`` (the
    model's), a file with another count is refused by name, not met later as an IndexError."""
    path = posixpath.join(export_dir, LABELS_FILE)
    with tf.io.gfile.GFile(path) as f:
        labels = [line.strip() for line in f if line.strip()]
    if num_outputs is not None and len(labels) != num_outputs:
        raise ValueError(f"{path}: {len(labels)} labels for the model's {num_outputs} outputs (one label per "
                         "line, in output order)")
    return labels


def read_explanation_metadata(export_dir: str) -> dict[str, Any]:
    with tf.io.gfile.GFile(posixpath.join(export_dir, EXPLANATION_METADATA_FILE)) as f:
        return json.load(f)


def export_model(model: tf.keras.Model, export_dir: str, labels: Sequence[str],
                 image_size: tuple[int, int] = IMAGE_SIZE,
                 visualization: dict[str, Any] | None = None, verbose: bool = True) -> dict[str, Any]:
    """Save ``model`` with its three signatures to ``export_dir`` (local or ``gs://``) and write
    ``labels.txt`` and ``explanation_metadata.json`` beside it. Returns the metadata."""
    num_outputs = int(model.output_shape[-1])
    if num_outputs != len(labels):
        raise ExportError(f"model has {num_outputs} outputs but {len(labels)} labels were given: {list(labels)}")
    tf.saved_model.save(model, export_dir, signatures=_signatures(model, image_size))
    names = inspect_signatures(export_dir)
    if verbose:  # as the lab prints them: these are what a request and the metadata must use
        print("Serving function input:", names.serving_input)
        print("Serving function output:", names.serving_output)
        print("Model input name:", names.xai_input)
        print("Model output name:", names.xai_output)
    metadata = build_explanation_metadata(names, labels, visualization)
    write_labels(export_dir, labels)
    with tf.io.gfile.GFile(posixpath.join(export_dir, EXPLANATION_METADATA_FILE), "w") as f:
        json.dump(metadata, f, indent=2)
    return metadata


def load_keras_model(keras_model_dir: str) -> tf.keras.Model:
    """Load the trainer's tf_keras SavedModel; ``hub.KerasLayer`` is revived from the saved graph."""
    import tensorflow_hub as hub
    import tf_keras as keras

    if not tf.io.gfile.exists(keras_model_dir):
        raise ExportError(f"{keras_model_dir}: no trained model there (run trainer.train first)")
    return keras.models.load_model(keras_model_dir, custom_objects={"KerasLayer": hub.KerasLayer}, compile=False)


def export_keras_model(keras_model_dir: str, export_dir: str, labels: Sequence[str] | str | None = None,
                       visualization: dict[str, Any] | None = None, verbose: bool = True) -> dict[str, Any]:
    """Export a model saved by ``trainer.train`` (its ``keras_model/``) with the three signatures.

    ``labels`` default to the ``labels.json`` the trainer wrote beside ``keras_model/``.
    """
    if labels is None:
        labels_json = posixpath.join(posixpath.dirname(keras_model_dir.rstrip("/")), "labels.json")
        if not tf.io.gfile.exists(labels_json):
            raise ExportError(f"{labels_json}: no labels found; pass labels explicitly")
        with tf.io.gfile.GFile(labels_json) as f:
            labels = json.load(f)
    elif isinstance(labels, str):
        labels = [c.strip() for c in labels.split(",") if c.strip()]
    model = load_keras_model(keras_model_dir)
    size = tuple(int(d) for d in model.input_shape[1:3])
    return export_model(model, export_dir, list(labels), image_size=size, visualization=visualization,
                        verbose=verbose)


if __name__ == "__main__":
    import fire

    fire.Fire(export_keras_model, serialize=lambda metadata: json.dumps(metadata, indent=2))
