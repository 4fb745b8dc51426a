"""Build a model over 2 GB stored with external data: a stack of wide MatMul + Relu layers.

    python bench/make_big_model.py OUT_DIR [--layers 10] [--width 8192] [--samples 16]

writes OUT_DIR/big.onnx, OUT_DIR/big.onnx.data (weights, one page-aligned tensor after another) and
OUT_DIR/big.calib.npz. Weights are generated and written one layer at a time, so building the model
never holds more than one layer in memory.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ALIGN = 4096


def build(out: Path, layers: int, width: int, samples: int, seed: int = 0) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    model_path, data_name = out / "big.onnx", "big.onnx.data"
    nodes, inits, x = [], [], "x"
    with open(out / data_name, "wb") as data:
        for k in range(layers):
            w = rng.standard_normal((width, width), dtype=np.float32)
            w *= np.float32(np.sqrt(2.0 / width))
            offset = data.tell()
            data.write(w.tobytes())
            data.write(b"\0" * (-data.tell() % ALIGN))
            init = onnx.TensorProto(name=f"w{k}", data_type=TensorProto.FLOAT, dims=[width, width],
                                    data_location=onnx.TensorProto.EXTERNAL)
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(w.nbytes))):
                init.external_data.add(key=key, value=value)
            inits.append(init)
            del w
            nodes.append(helper.make_node("MatMul", [x, f"w{k}"], [f"m{k}"], name=f"matmul{k}"))
            last = k == layers - 1
            if not last:
                nodes.append(helper.make_node("Relu", [f"m{k}"], [f"r{k}"], name=f"relu{k}"))
            x = f"m{k}" if last else f"r{k}"
    graph = helper.make_graph(nodes, "wide_matmul_stack",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxflex-bench")
    model.ir_version = 8
    model_path.write_bytes(model.SerializeToString())
    np.savez(out / "big.calib.npz", x=rng.standard_normal((samples, width), dtype=np.float32))
    return model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args()
    path = build(args.out, args.layers, args.width, args.samples)
    size = sum(p.stat().st_size for p in args.out.iterdir() if p.name.startswith("big.onnx"))
    print(f"wrote {path} ({size / 2**30:.2f} GiB with its external data)")


if __name__ == "__main__":
    main()
