"""Inference batch normalizations folded into the convolutions before them, for gradient kernels.

At inference a batch normalization is a per-channel affine map with constant coefficients, so
after a convolution it folds into the convolution's filter and a bias (the rewrite TensorFlow's
``optimize_for_inference_lib.fold_batch_norms`` makes). A forward pass hardly gains (oneDNN fuses
the two already), but a gradient does: the backward pass of every normalization
(``FusedBatchNormGradV3``, 52 of them in MobileNetV2) reads and writes a whole activation, and the
fused forward cannot be used under a gradient tape. On MobileNetV2 1.0 @ 192, 2 cores, one
forward+backward pass per node drops from 30 to 18-20 ms alone, 16.5 to 10.5 ms in 4s and 13.7
to 9.3 ms in 16s (``make bench`` measures it beside the unfolded graph).

TensorFlow's own ``fold_batch_norms`` folds nothing in a frozen TF2 SavedModel signature: the
inlined function calls leave ``Identity`` nodes between a convolution, its filter and its
normalization, which it does not look through (0 of 52 on MobileNetV2). This follows them. The
folded function is checked against the original on probe images before it is used
(:func:`fold_batch_norms`), and nothing is folded when a check fails.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import graph_pb2, node_def_pb2
from tensorflow.python.framework import convert_to_constants

log = logging.getLogger(__name__)

_NORMS = ("FusedBatchNorm", "FusedBatchNormV3")
_CONVOLUTIONS = ("Conv2D", "DepthwiseConv2dNative")
#: the folded function's outputs may differ from the original's by float32 rounding, no more
#: (MobileNetV2's probabilities: about 1e-7)
OUTPUT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class FoldedFunction:
    """A one-input, one-output function of the original's graph with ``folded`` normalizations
    folded into their convolutions (``function(images) -> outputs``)."""

    function: Callable[[tf.Tensor], tf.Tensor]
    folded: int
    normalizations: int


def fold_batch_norms(signature, output_key: str, probes: np.ndarray) -> FoldedFunction | None:
    """``signature`` (a concrete function of one image input, such as ``xai_model``) with its
    inference batch normalizations folded, or None when nothing folds or the folded function's
    output ``output_key`` differs from the original's on ``probes`` by more than
    :data:`OUTPUT_TOLERANCE` (a graph this rewrite does not understand: it is logged and the
    original is used)."""
    arguments = signature.structured_input_signature[1]
    if len(arguments) != 1 or signature.structured_input_signature[0]:
        return None
    argument = next(iter(arguments))
    input_name = signature.inputs[0].name
    # a signature's outputs are its structured outputs flattened, a dict's in sorted key order
    output_name = signature.outputs[sorted(signature.structured_outputs).index(output_key)].name
    graph_def = _frozen_graph_def(signature)
    folded, normalizations = fold_graph_def(graph_def)
    if not folded:
        return None

    def import_graph():
        tf.compat.v1.import_graph_def(graph_def, name="")

    wrapped = tf.compat.v1.wrap_function(import_graph, [])
    function = wrapped.prune(wrapped.graph.get_tensor_by_name(input_name),
                             wrapped.graph.get_tensor_by_name(output_name))
    probes = tf.constant(probes, tf.float32)
    expected = signature(**{argument: probes})[output_key]
    difference = float(tf.reduce_max(tf.abs(function(probes) - expected)))
    if not difference <= OUTPUT_TOLERANCE:  # NaN too
        log.warning("batch normalizations not folded: the folded graph's outputs differ from the model's by %.3g "
                    "(> %g) on probe images; gradients use the graph as exported", difference, OUTPUT_TOLERANCE)
        return None
    return FoldedFunction(function, folded, normalizations)


def _frozen_graph_def(signature) -> graph_pb2.GraphDef:
    """``signature``'s graph with its variables as constants and its calls inlined. The public
    ``convert_variables_to_constants_v2`` also builds a concrete function of the result, which
    takes 2.5 of its 2.8 s on MobileNetV2 and is not used here: the GraphDef is taken before that
    step (the same two calls it makes), or from the public function if a TensorFlow lacks them."""
    try:
        data = convert_to_constants._FunctionConverterDataInEager(func=signature, lower_control_flow=True,
                                                                  aggressive_inlining=False)
        return convert_to_constants._replace_variables_by_constants(converter_data=data)[0]
    except AttributeError:  # pragma: no cover - another TensorFlow's internals
        return convert_to_constants.convert_variables_to_constants_v2(signature).graph.as_graph_def()


def fold_graph_def(graph_def: graph_pb2.GraphDef) -> tuple[int, int]:
    """Fold, in place, each inference normalization of a frozen ``graph_def`` whose input is a
    convolution with a constant filter that feeds nothing else; returns (folded, normalizations).

    The convolution gets a new constant filter scaled per output channel, and the normalization's
    consumers read a new ``BiasAdd`` of the folded offset instead; the normalization itself is
    left in place for any consumer of its other outputs (pruned when unused)."""
    nodes = {node.name: node for node in graph_def.node}
    consumers: dict[str, list[node_def_pb2.NodeDef]] = defaultdict(list)
    for node in graph_def.node:
        for name in node.input:
            if not name.startswith("^"):
                consumers[_tensor(name)].append(node)

    def resolve(name: str) -> tuple[node_def_pb2.NodeDef, str]:
        """The node and tensor behind ``name``, through ``Identity`` nodes."""
        tensor = _tensor(name)
        node = nodes[tensor.split(":")[0]]
        while node.op == "Identity":
            tensor = _tensor(node.input[0])
            node = nodes[tensor.split(":")[0]]
        return node, tensor

    def only_reaches(tensor: str, target: node_def_pb2.NodeDef) -> bool:
        """Whether every consumer of ``tensor``, through ``Identity`` nodes, is ``target``."""
        for consumer in consumers[tensor]:
            if consumer.op == "Identity":
                if not only_reaches(consumer.name + ":0", target):
                    return False
            elif consumer is not target:
                return False
        return True

    normalizations = [n for n in graph_def.node if n.op in _NORMS]
    folded = 0
    for norm in normalizations:
        if norm.attr["is_training"].b or norm.attr["data_format"].s not in (b"", b"NHWC") \
                or norm.attr["T"].type != tf.float32.as_datatype_enum:
            continue
        conv, conv_tensor = resolve(norm.input[0])
        if conv.op not in _CONVOLUTIONS or conv_tensor != conv.name + ":0" \
                or conv.attr["data_format"].s not in (b"", b"NHWC") or not only_reaches(conv_tensor, norm):
            continue
        inputs = [resolve(name)[0] for name in (conv.input[1], *norm.input[1:5])]
        if any(node.op != "Const" for node in inputs):
            continue
        weights, gamma, beta, mean, variance = (tf.make_ndarray(n.attr["value"].tensor) for n in inputs)
        scale = gamma / np.sqrt(variance + norm.attr["epsilon"].f)
        if conv.op == "DepthwiseConv2dNative":  # output channel = input channel * multiplier + m
            weights = weights * scale.reshape(weights.shape[2], weights.shape[3])
        else:
            weights = weights * scale
        conv.input[1] = _add_const(graph_def, nodes, norm.name + "/folded_filter", weights)
        bias = _add_const(graph_def, nodes, norm.name + "/folded_offset", beta - mean * scale)
        add = graph_def.node.add(name=_unique(nodes, norm.name + "/folded"), op="BiasAdd",
                                 input=[norm.input[0], bias])
        add.attr["T"].type = tf.float32.as_datatype_enum
        add.attr["data_format"].s = b"NHWC"
        nodes[add.name] = add
        for consumer in consumers[norm.name + ":0"]:
            for i, name in enumerate(consumer.input):
                if _tensor(name) == norm.name + ":0":
                    consumer.input[i] = add.name
        folded += 1
    return folded, len(normalizations)


def _tensor(name: str) -> str:
    """``node`` or ``node:k`` as ``node:k``."""
    return name if ":" in name else name + ":0"


def _unique(nodes: dict, name: str) -> str:
    while name in nodes:
        name += "_"
    return name


def _add_const(graph_def: graph_pb2.GraphDef, nodes: dict, name: str, value: np.ndarray) -> str:
    node = graph_def.node.add(name=_unique(nodes, name), op="Const")
    node.attr["dtype"].type = tf.float32.as_datatype_enum
    node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(np.asarray(value, np.float32)))
    nodes[node.name] = node
    return node.name
