"""Tiny hand-built ONNX models with a harvester contract, for tests of the scorer (no training needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from agent.contract import CONTRACT_KEY, AlertPolicy, Contract, FeatureSpec, contract_to_dict


def make_contract(features: list[FeatureSpec], **over: Any) -> Contract:
    base: dict[str, Any] = {
        "model_name": "test-model",
        "model_version": "0.0.1",
        "input_name": "features",
        "output_name": "probabilities",
        "classes": ("healthy", "fault"),
        "healthy_class": "healthy",
        "hop_s": 5.0,
        "features": tuple(features),
        "mean": tuple(0.0 for _ in features),
        "std": tuple(1.0 for _ in features),
        "alert": AlertPolicy(0.8, 0.4, 2, 2),
        "max_missing_fraction": 0.5,
    }
    base.update(over)
    return Contract(**base)


def linear_softmax_model(
    path: Path,
    contract: Contract | None,
    weights: np.ndarray,
    bias: np.ndarray,
    nan_output: bool = False,
    raw_contract: str | None = None,
    nan_above: tuple[int, float] | None = None,
) -> Path:
    """probabilities = softmax(x @ W + b); `nan_output` makes the graph emit NaN (Log of a negative number);
    `nan_above = (j, c)` only for rows whose input column j (the standardised feature) is at or above c: a model
    that is fine until the data reaches a value (0 x Log(c - x_j), which is 0 below c and NaN from c on)."""
    n_in, n_out = weights.shape
    nodes = [
        helper.make_node("MatMul", ["features", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["p0" if nan_output or nan_above else "probabilities"], axis=1),
    ]
    inits = [numpy_helper.from_array(weights.astype(np.float32), "W"),
             numpy_helper.from_array(bias.astype(np.float32), "b")]
    if nan_output:
        inits.append(numpy_helper.from_array(np.array([-1.0], np.float32), "neg"))
        nodes += [helper.make_node("Log", ["neg"], ["nan"]), helper.make_node("Add", ["p0", "nan"], ["probabilities"])]
    elif nan_above is not None:
        j, c = nan_above
        inits += [numpy_helper.from_array(np.array([j], np.int64), "j"),
                  numpy_helper.from_array(np.array([c], np.float32), "c"),
                  numpy_helper.from_array(np.array([0.0], np.float32), "zero")]
        nodes += [helper.make_node("Gather", ["features", "j"], ["xj"], axis=1),
                  helper.make_node("Sub", ["c", "xj"], ["room"]),
                  helper.make_node("Log", ["room"], ["log_room"]),
                  helper.make_node("Mul", ["log_room", "zero"], ["poison"]),
                  helper.make_node("Add", ["p0", "poison"], ["probabilities"])]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, n_in])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, n_out])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if raw_contract is not None:
        helper.set_model_props(model, {CONTRACT_KEY: raw_contract})
    elif contract is not None:
        helper.set_model_props(model, {CONTRACT_KEY: json.dumps(contract_to_dict(contract))})
    onnx.save(model, str(path))
    return path
