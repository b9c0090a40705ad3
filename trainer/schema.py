"""The facts every part of the project agrees on: the TFRecord schema, image size, class names
and the names of the exported signatures. One place for each fact."""

from __future__ import annotations

IMAGE_SIZE: tuple[int, int] = (192, 192)
CHANNELS = 3

#: The flowers dataset's classes, in label order (the lab's ``CLASSES``).
CLASSES: tuple[str, ...] = ("daisy", "dandelion", "roses", "sunflowers", "tulips")

# TFRecord feature keys, exactly as in gs://asl-public/data/flowers-xai/*.tfrec.
FEATURE_IMAGE = "image"  # JPEG bytes
FEATURE_CLASS = "class"  # int64 label index
FEATURE_ONE_HOT = "one_hot_class"  # float list, len == number of classes
# Written by our synthetic generator only: a PNG of the ground-truth object mask.
FEATURE_MASK = "mask"

# SavedModel signatures (the lab's names; Vertex's explanation service looks for the xai_* ones).
SERVING_SIGNATURE = "serving_default"
XAI_PREPROCESS_SIGNATURE = "xai_preprocess"
XAI_MODEL_SIGNATURE = "xai_model"
#: Name of the float image tensor between xai_preprocess and xai_model.
CONCRETE_INPUT = "numpy_inputs"
#: Name of the serving signature's input (image bytes) and output (probabilities).
SERVING_INPUT = "bytes_inputs"
SERVING_OUTPUT = "probabilities"

# Files written beside an exported model.
LABELS_FILE = "labels.txt"
EXPLANATION_METADATA_FILE = "explanation_metadata.json"

#: Explanation requests: where IG refinement starts when nobody chose a ``step_count`` (the CLIs, the
#: serving container's fallback, configs/local.yaml). With refinement on (the default) a path needs
#: what its curve needs, and a coarse start lets the refinement put the steps there: on MobileNetV2
#: 1.0 @ 192, from 5 grid points a path reaches 0.05 in a median of 14 evaluations; from 50 it cannot
#: spend fewer than 50. Here, not in ``explain``, so light modules can read it without TensorFlow.
DEFAULT_ADAPTIVE_START = 5
#: XRAI's paths start from at least this many grid points when refinement is on. Refinement
#: converges completeness (a scalar), and from 5 points it leaves wide panels where F is flat but
#: the per-pixel integrands are not, so the map that XRAI ranks regions by was not converged:
#: simulated on 257-point paths of 8 validation images (MobileNetV2 1.0 @ 192, black and white),
#: top-10% region overlap with the converged map was median 0.77 (worst 0.40) from 5 points,
#: 0.84 from 9, 0.94 (worst 0.59) from 17 and 1.0 from 33, for a median of 25, 28, 34 and 48
#: evaluations per path to 0.05.
XRAI_MIN_START = 17
#: Fixed steps (refinement off: Vertex's own semantics) when nobody chose a ``step_count``: Vertex's usual.
DEFAULT_FIXED_STEP_COUNT = 50
