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

from explain.sessions import frozen_graph_def as _frozen_graph_def

log = logging.getLogger(__name__)

_NORMS = ("FusedBatchNorm", "FusedBatchNormV3")
_CONVOLUTIONS = ("Conv2D", "DepthwiseConv2dNative")
#: Ops of control flow, as a frozen graph holds them (lowered to v1 loops and conditionals, or not).
_CONTROL_FLOW = frozenset({"Enter", "Exit", "Switch", "Merge", "NextIteration", "LoopCond", "While", "StatelessWhile",
                           "If", "StatelessIf", "Case", "StatelessCase"})
#: the folded function's outputs may differ from the original's by float32 rounding, no more
#: (MobileNetV2's probabilities: about 3e-8 on the probes)
OUTPUT_TOLERANCE = 1e-4
#: each folded normalization's output, relative to its largest value on the probes: float32 rounding
#: of a filter scaled before instead of after the convolution (MobileNetV2: under 1e-6)
ACTIVATION_TOLERANCE = 1e-4


@dataclass(frozen=True)
class FoldedFunction:
    """A one-input, one-output function of the original's graph with ``folded`` normalizations
    folded into their convolutions (``function(images) -> outputs``)."""

    function: Callable[[tf.Tensor], tf.Tensor]
    folded: int
    normalizations: int


def fold_batch_norms(signature, output_key: str, probes: np.ndarray) -> FoldedFunction | None:
    """``signature`` (a concrete function of one image input, such as ``xai_model``) with its
    inference batch normalizations folded, or None when nothing folds, the graph holds what this
    rewrite leaves alone (:func:`_unsupported`), or a check on ``probes`` fails: every folded
    normalization's output must match the original's within :data:`ACTIVATION_TOLERANCE` of its
    largest value (layer by layer, so a saturated softmax cannot hide a wrong fold), and the output
    ``output_key`` within :data:`OUTPUT_TOLERANCE`. Folding only saves time, so any failure is
    logged and the original is used."""
    try:
        return _fold(signature, output_key, probes)
    except Exception as error:  # noqa: BLE001 - an optimization must not break loading a model
        log.warning("batch normalizations not folded (%s: %s); gradients use the graph as exported",
                    type(error).__name__, error, exc_info=True)
        return None


def _fold(signature, output_key: str, probes: np.ndarray) -> FoldedFunction | None:
    arguments = signature.structured_input_signature[1]
    if len(arguments) != 1 or signature.structured_input_signature[0] or not _has_normalizations(signature):
        return None
    argument = next(iter(arguments))
    input_name = signature.inputs[0].name
    # a signature's outputs are its structured outputs flattened, a dict's in sorted key order
    output_name = signature.outputs[sorted(signature.structured_outputs).index(output_key)].name
    original = _frozen_graph_def(signature)
    if not any(attr.func.name or attr.list.func for node in original.node for attr in node.attr.values()):
        # every call is inlined: the library's hundreds of functions would only slow each import
        original.ClearField("library")
    reason = _unsupported(original)
    if reason:
        log.info("batch normalizations not folded: the frozen graph holds %s; gradients use the graph as exported",
                 reason)
        return None
    graph_def = graph_pb2.GraphDef()
    graph_def.CopyFrom(original)
    pairs, normalizations = fold_graph_def(graph_def)
    if not pairs:
        return None

    output_node = output_name.split(":")[0]
    original = _simplified(original, [output_node, *(norm for norm, _ in pairs)])
    graph_def = _simplified(graph_def, [output_node, *(add for _, add in pairs)])

    def import_both(images):
        for name, graph in (("original", original), ("folded", graph_def)):
            tf.compat.v1.import_graph_def(graph, input_map={input_name: images}, name=name)

    both = tf.compat.v1.wrap_function(import_both, [tf.TensorSpec([None, *probes.shape[1:]], tf.float32)])
    tensor = both.graph.get_tensor_by_name
    check = both.prune(both.inputs[0], [[tensor(f"original/{norm}:0"), tensor(f"folded/{add}:0")] for norm, add in pairs])
    probes = tf.constant(probes, tf.float32)
    for (norm, _), (before, after) in zip(pairs, check(probes)):
        scale = max(float(tf.reduce_max(tf.abs(before))), np.finfo(np.float32).tiny)
        difference = float(tf.reduce_max(tf.abs(after - before))) / scale
        if not difference <= ACTIVATION_TOLERANCE:  # NaN too
            log.warning("batch normalizations not folded: %s folded differs from the model's by %.3g of its largest "
                        "value (> %g) on probe images; gradients use the graph as exported", norm, difference,
                        ACTIVATION_TOLERANCE)
            return None

    function = both.prune(both.inputs[0], tensor(f"folded/{output_name}"))  # the folded nodes alone
    expected = signature(**{argument: probes})[output_key]
    difference = float(tf.reduce_max(tf.abs(function(probes) - expected)))
    if not difference <= OUTPUT_TOLERANCE:  # NaN too
        log.warning("batch normalizations not folded: the folded graph's outputs differ from the model's by %.3g "
                    "(> %g) on probe images; gradients use the graph as exported", difference, OUTPUT_TOLERANCE)
        return None
    return FoldedFunction(function, len(pairs), normalizations)


def _simplified(graph_def: graph_pb2.GraphDef, outputs: list[str]) -> graph_pb2.GraphDef:
    """``graph_def`` without its ``Identity`` and ``NoOp`` nodes (what the inlined calls left: the
    ordering they impose means nothing once the variables are constants) and without the nodes
    ``outputs`` do not need, such as the normalizations a fold replaced. An import of MobileNetV2's
    8,463 nodes cost 6 s; of what is left (about 300), a fraction of a second."""
    nodes = {node.name: node for node in graph_def.node}
    kept = set(outputs)

    out = graph_pb2.GraphDef()
    out.versions.CopyFrom(graph_def.versions)
    out.library.CopyFrom(graph_def.library)
    for node in graph_def.node:
        if node.op in ("Identity", "NoOp") and node.name not in kept:
            continue
        copy = out.node.add()
        copy.CopyFrom(node)
        del copy.input[:]
        if "_class" in copy.attr:  # colocation with nodes that may be gone; placement is one CPU's
            del copy.attr["_class"]
        for name in node.input:
            if not name.startswith("^"):
                copy.input.append(_through_identities(nodes, name, kept)[1])
            elif nodes[name[1:]].op not in ("Identity", "NoOp", "Const"):
                copy.input.append(name)
    needed, stack = set(), list(outputs)  # what the outputs read, directly or not
    by_name = {node.name: node for node in out.node}
    while stack:
        name = stack.pop()
        if name not in needed:
            needed.add(name)
            stack.extend(i.lstrip("^").split(":")[0] for i in by_name[name].input)
    kept_nodes = [node for node in out.node if node.name in needed]
    del out.node[:]
    out.node.extend(kept_nodes)
    return out


def _has_normalizations(signature) -> bool:
    """Whether ``signature``'s graph or a function it calls holds a normalization (before freezing,
    which costs about 0.5 s, for nothing on a model without one)."""
    graph_def = signature.graph.as_graph_def()
    return any(node.op in _NORMS for node in graph_def.node) or any(
        node.op in _NORMS for function in graph_def.library.function for node in function.node_def)


def _unsupported(graph_def: graph_pb2.GraphDef) -> str | None:
    """What in a frozen graph the folded function could not be differentiated through as the
    original is, or None: a custom gradient (its gradient function belongs to the original graph,
    and tracing through the import fails) or control flow (lowered to v1 loops, which a traced
    gradient of the import does not support)."""
    for node in graph_def.node:
        if "_gradient_op_type" in node.attr:
            return f"a custom gradient ({node.name})"
        if node.op in _CONTROL_FLOW:
            return f"control flow ({node.op} {node.name})"
    return None


def fold_graph_def(graph_def: graph_pb2.GraphDef) -> tuple[list[tuple[str, str]], int]:
    """Fold, in place, each inference normalization of a frozen ``graph_def`` whose input is a
    convolution with a constant filter that feeds nothing else; returns the (normalization, its
    replacing ``BiasAdd``) names of those folded, and the number of normalizations.

    The convolution gets a new constant filter scaled per output channel, and the normalization's
    consumers read a new ``BiasAdd`` of the folded offset instead; the normalization itself is
    left in place for any consumer of its other outputs (pruned when unused)."""
    nodes = {node.name: node for node in graph_def.node}
    consumers: dict[str, list[node_def_pb2.NodeDef]] = defaultdict(list)
    for node in graph_def.node:
        for name in node.input:
            if not name.startswith("^"):
                consumers[_tensor(name)].append(node)

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
    folded: list[tuple[str, str]] = []
    for norm in normalizations:
        if norm.attr["is_training"].b or norm.attr["data_format"].s not in (b"", b"NHWC") \
                or norm.attr["T"].type != tf.float32.as_datatype_enum:
            continue
        conv, conv_tensor = _through_identities(nodes, norm.input[0])
        if conv.op not in _CONVOLUTIONS or conv_tensor != conv.name + ":0" \
                or conv.attr["data_format"].s not in (b"", b"NHWC") or not only_reaches(conv_tensor, norm):
            continue
        inputs = [_through_identities(nodes, name)[0] for name in (conv.input[1], *norm.input[1:5])]
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
        folded.append((norm.name, add.name))
    return folded, len(normalizations)


def _through_identities(nodes: dict[str, node_def_pb2.NodeDef], name: str,
                        stop: set[str] = frozenset()) -> tuple[node_def_pb2.NodeDef, str]:
    """The node and tensor (``node:k``) behind input ``name``, through ``Identity`` nodes (not
    through those named in ``stop``)."""
    tensor = _tensor(name)
    node = nodes[tensor.split(":")[0]]
    while node.op == "Identity" and node.name not in stop:
        tensor = _tensor(node.input[0])
        node = nodes[tensor.split(":")[0]]
    return node, tensor


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
