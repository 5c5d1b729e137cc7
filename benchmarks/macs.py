"""Count the multiply-accumulates (MACs) of one image through an ONNX model.

Sums Conv / Gemm / MatMul work, in float (Conv, Gemm, MatMul) and in integer form
(ConvInteger, QLinearConv, MatMulInteger, QLinearMatMul), with the batch dimension set to 1.
Everything else (ReLU, pooling, softmax, (de)quantisation) is ignored: for a VGG these are
well under 1 % of the work. Needs ``onnx`` (the bench, dev or train extra), not the runtime install.

    python -m xray_edge.benchmarks.macs runtime/models/xray-edge-vgg19-int8.onnx
"""
from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import onnx
from onnx import shape_inference

CONV_OPS = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}  # op -> index of the weight input
MATMUL_OPS = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3), "Gemm": (0, 1)}


def _fix_batch(model: onnx.ModelProto, batch: int = 1) -> None:
    """Give every graph input a fixed leading (batch) dimension so shapes can be inferred."""
    init = {t.name for t in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in init:
            continue
        dims = inp.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = batch


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Known shapes of every value (inputs, initializers, inferred intermediates)."""
    inferred = shape_inference.infer_shapes(model)
    out: dict[str, list[int | None]] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        dims = vi.type.tensor_type.shape.dim
        out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    for t in g.initializer:
        out[t.name] = list(t.dims)
    return out


def _known(shape: list[int | None] | None) -> bool:
    return bool(shape) and all(isinstance(d, int) and d > 0 for d in shape)


def count_macs(model: onnx.ModelProto) -> tuple[dict[str, int], list[str]]:
    """Return ({op_type: MACs per image}, [warnings for nodes whose shapes are unknown])."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    _fix_batch(model)
    shapes = _shapes(model)
    totals: dict[str, int] = defaultdict(int)
    warnings: list[str] = []
    for node in model.graph.node:
        op = node.op_type
        if op in CONV_OPS:
            w, y = shapes.get(node.input[CONV_OPS[op]]), shapes.get(node.output[0])
            if not (_known(w) and _known(y)):
                warnings.append(f"{op} {node.name or node.output[0]}: shape unknown, not counted")
                continue
            # y: (N, Cout, *spatial); w: (Cout, Cin/group, *kernel)
            totals[op] += math.prod(y) * math.prod(w[1:])
        elif op in MATMUL_OPS:
            ia, ib = MATMUL_OPS[op]
            a, b, y = shapes.get(node.input[ia]), shapes.get(node.input[ib]), shapes.get(node.output[0])
            if not (_known(a) and _known(b) and _known(y)):
                warnings.append(f"{op} {node.name or node.output[0]}: shape unknown, not counted")
                continue
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            k = a[-2] if (op == "Gemm" and trans_a) else a[-1]
            totals[op] += math.prod(y) * k
    return dict(totals), warnings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    args = ap.parse_args(argv)
    try:
        model = onnx.load(str(args.model))
    except Exception as e:  # noqa: BLE001 - any load failure is reported the same way
        print(f"{args.model}: cannot read ONNX model ({e})", file=sys.stderr)
        return 2
    totals, warnings = count_macs(model)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    params = sum(math.prod(t.dims) for t in model.graph.initializer)
    print(f"model: {args.model.name}  ({args.model.stat().st_size / 1e6:.1f} MB, {params / 1e6:.2f} M parameters)")
    for op, macs in sorted(totals.items()):
        print(f"  {op:<14} {macs / 1e9:10.4f} GMAC")
    total = sum(totals.values())
    print(f"  {'total':<14} {total / 1e9:10.4f} GMAC per image ({2 * total / 1e9:.2f} GFLOP)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
