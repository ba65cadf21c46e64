"""Writes tests/fixtures/malformed/*.onnx: tiny detector-shaped graphs, each with one attribute
that tract 0.23.9 trusts and panics on (the sites issue 15 lists), for tests/robustness.rs.

Each graph: images [1,3,32,32] -> <the op under test> -> ... -> output0 [1, 84, N], so that perch
accepts it as a detector up to the point where tract analyses it. Usage:
  PY=$(models/recipe/venv.sh)/bin/python; $PY scripts/make_malformed.py
"""
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUT = Path(__file__).resolve().parents[1] / "tests/fixtures/malformed"


def model(name, nodes, inits, opset=13):
    g = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, None)],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="perch-malformed")
    OUT.mkdir(parents=True, exist_ok=True)
    onnx.save(m, OUT / f"{name}.onnx")


def w(name, shape):
    rng = np.random.default_rng(0)
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.1, name)


def shape_const(name, dims):
    return numpy_helper.from_array(np.array(dims, dtype=np.int64), name)


def conv_detector(name, **conv_attrs):
    """Conv(3->84, 1x1, attrs) -> Reshape [1,84,-1]."""
    attrs = {"kernel_shape": [1, 1], "strides": [1, 1], "pads": [0, 0, 0, 0]}
    attrs.update(conv_attrs)
    conv = helper.make_node("Conv", ["images", "w", "b"], ["c"])
    for k, v in attrs.items():
        # An empty list has no inferable type: write it as an empty INTS attribute.
        conv.attribute.append(helper.make_attribute(k, v, attr_type=onnx.AttributeProto.INTS))
    nodes = [
        conv,
        helper.make_node("Reshape", ["c", "shape"], ["output0"]),
    ]
    model(name, nodes, [w("w", [84, 3, 1, 1]), w("b", [84]), shape_const("shape", [1, 84, -1])])


def main():
    conv_detector("conv-strides-zero", strides=[0, 0])
    conv_detector("conv-pads-empty", pads=[])
    conv_detector("conv-strides-empty", strides=[])
    conv_detector("conv-dilations-empty", dilations=[])
    conv_detector("conv-kernel-shape-empty", kernel_shape=[])
    conv_detector("conv-kernel-shape-long", kernel_shape=[1, 1, 1, 1, 1])
    # MaxPool with stride 0 between the input and a valid Conv.
    nodes = [
        helper.make_node("MaxPool", ["images"], ["p"], kernel_shape=[2, 2], strides=[0, 0]),
        helper.make_node("Conv", ["p", "w", "b"], ["c"], kernel_shape=[1, 1]),
        helper.make_node("Reshape", ["c", "shape"], ["output0"]),
    ]
    model("maxpool-stride-zero", nodes, [w("w", [84, 3, 1, 1]), w("b", [84]), shape_const("shape", [1, 84, -1])])
    # Transpose whose permutation names an axis the tensor does not have.
    nodes = [
        helper.make_node("Conv", ["images", "w", "b"], ["c"], kernel_shape=[1, 1]),
        helper.make_node("Transpose", ["c"], ["t"], perm=[4, 1, 2, 3]),
        helper.make_node("Reshape", ["t", "shape"], ["output0"]),
    ]
    model("transpose-perm-out-of-range", nodes, [w("w", [84, 3, 1, 1]), w("b", [84]), shape_const("shape", [1, 84, -1])])
    # Split on an axis the tensor does not have (opset 13: sizes as an input).
    nodes = [
        helper.make_node("Conv", ["images", "w", "b"], ["c"], kernel_shape=[1, 1]),
        helper.make_node("Split", ["c", "split"], ["s0", "s1"], axis=4),
        helper.make_node("Concat", ["s0", "s1"], ["cat"], axis=1),
        helper.make_node("Reshape", ["cat", "shape"], ["output0"]),
    ]
    model("split-axis-out-of-range", nodes,
          [w("w", [84, 3, 1, 1]), w("b", [84]), shape_const("split", [42, 42]), shape_const("shape", [1, 84, -1])])


if __name__ == "__main__":
    main()
