"""One ``Attention`` operator per layer of the embedding model, for the query model.

onnxruntime runs a BERT layer's attention fastest as its fused
``com.microsoft.Attention`` operator, which the dynamic quantizer then turns
into ``QAttention`` (the query, key and value products in one int8 call).
Its transformer optimizer (``optimize_model(model_type="bert")``) makes that
fusion for the usual exports, but not for ours: all-MiniLM-L6-v2 as packaged
was exported by torch's dynamo exporter, whose attention (query and key each
scaled, the key transposed through a reshape chain, a NaN guard after the
softmax) is none of the shapes its BERT fusion knows. Its BART fusion does
match that shape but takes the padding mask for a causal one (an encoder
would then attend to earlier tokens only), so it cannot be used either.

This module makes the same rewrite for the shape our model has, with the
optimizer's own graph helpers: each layer's query, key and value projections
become one ``Attention`` node with their weights side by side, the padding
mask as its ``mask_index`` and the product of the two scales as its scale;
what only fed them is pruned.

Contract: ``fuse_attention(model, num_heads)`` rewrites an ``onnx.ModelProto``
in place and returns the number of layers fused. A layer whose nodes do not
have that shape is left as it was. The caller checks that the rewritten
graph computes what the original did (``query_model`` does, on every build).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

MASK = "attention_mask_int32"  # Attention reads the padding mask as int32

# From a layer's Softmax back to its projections (op types, and which input
# each step follows; None: whichever input matches).
SCORES = (["Add", "MatMul"], [0, None])
QUERY = (["Mul", "Transpose", "Reshape", "Add", "MatMul"], [0, 0, 0, 0, None])
KEY = (["Mul", "Reshape", "Transpose", "Reshape", "Transpose", "Reshape", "Add", "MatMul"],
       [1, 0, 0, 0, 0, 0, 0, None])
VALUE = (["Transpose", "Reshape", "Add", "MatMul"], [1, 0, 0, None])
# From the Softmax on to the layer's context (B, S, hidden): the NaN guard
# (Where, the probabilities as its third input), probabilities x values, heads merged.
CONTEXT = (["Where", "MatMul", "Transpose", "Reshape"], [(0, 2), (0, 0), (0, 0), (0, 0)])


@dataclass
class _Layer:
    hidden: str  # the layer's input (B, S, hidden)
    weights: list[np.ndarray]  # query, key, value: (hidden, hidden) each
    biases: list[np.ndarray]
    scale: float
    context: Any  # the Reshape whose output becomes the Attention node's


def fuse_attention(model: Any, num_heads: int) -> int:
    """Rewrite each layer's attention of ``model`` into one ``Attention`` node."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.transformers.onnx_model import OnnxModel

    graph = OnnxModel(model)
    if MASK in graph.input_name_to_nodes() or graph.find_graph_input("attention_mask") is None:
        return 0
    layers = [layer for softmax in graph.get_nodes_by_op_type("Softmax")
              if (layer := _match(graph, softmax)) is not None]
    for n, layer in enumerate(layers):
        name = f"Attention_{n}"
        graph.add_initializer(numpy_helper.from_array(
            np.concatenate(layer.weights, axis=1).astype(np.float32), f"{name}_qkv_weight"))
        graph.add_initializer(numpy_helper.from_array(
            np.concatenate(layer.biases).astype(np.float32), f"{name}_qkv_bias"))
        graph.add_node(helper.make_node(
            "Attention", [layer.hidden, f"{name}_qkv_weight", f"{name}_qkv_bias", MASK],
            [layer.context.output[0]], name=name, domain="com.microsoft",
            num_heads=num_heads, scale=layer.scale))
        graph.remove_node(layer.context)
    if layers:
        graph.add_node(helper.make_node("Cast", ["attention_mask"], [MASK],
                                        name="attention_mask_to_int32", to=TensorProto.INT32))
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        # What only fed the old attention goes, with its weights; the inputs stay
        # (fastembed feeds all three).
        graph.prune_graph(allow_remove_graph_inputs=False)
        graph.topological_sort()
    return len(layers)


def _match(graph: Any, softmax: Any) -> _Layer | None:
    parents = graph.output_name_to_node()
    scores = graph.match_parent_path(softmax, *SCORES, parents)
    context = graph.match_child_path(softmax, CONTEXT[0], edges=CONTEXT[1])
    if scores is None or context is None:
        return None
    query = graph.match_parent_path(scores[1], *QUERY, parents)
    key = graph.match_parent_path(scores[1], *KEY, parents)
    value = graph.match_parent_path(context[1], *VALUE, parents)
    if query is None or key is None or value is None:
        return None
    projections = [query[-1], key[-1], value[-1]]
    hidden = {p.input[0] for p in projections}
    weights = [graph.get_constant_value(p.input[1]) for p in projections]
    biases = [graph.get_constant_input(path[-2])[1] for path in (query, key, value)]
    scales = [graph.get_constant_input(path[0])[1] for path in (query, key)]
    if (len(hidden) != 1 or any(c is None for c in weights + biases + scales)
            or any(s.size != 1 for s in scales)):
        return None
    return _Layer(hidden=hidden.pop(), weights=weights, biases=biases,
                  scale=float(scales[0].item() * scales[1].item()), context=context[-1])
