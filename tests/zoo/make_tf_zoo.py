"""Write the tf2onnx zoo models (tests/zoo/tf_*.onnx) listed in tests/zoo/tf.json.

Run in a venv with tensorflow and tf2onnx (not the project's venv), from the repository root:

    python3 -m venv /tmp/tf-venv
    /tmp/tf-venv/bin/pip install tensorflow-cpu==2.15.1 tf2onnx==1.16.1 jax==0.4.23 jaxlib==0.4.23 "numpy<2"
    /tmp/tf-venv/bin/python tests/zoo/make_tf_zoo.py

Keras models (keras 2.15, NHWC), random-init and seeded, converted with tf2onnx.convert.from_keras.
The ONNX files are kept exactly as tf2onnx wrote them (NHWC inputs, Transpose pairs, unk__N dims).
tf_jax_mlp goes jax -> jax2tf (graph serialization, enable_xla=False, so that plain TF ops come out
and tf2onnx can convert them) -> tf2onnx.convert.from_function.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import tensorflow as tf
import tf2onnx

HERE = Path(__file__).parent


def conv_bn(x, filters: int, stride: int = 1, depthwise: bool = False):
    if depthwise:
        x = tf.keras.layers.DepthwiseConv2D(3, stride, padding="same", use_bias=False)(x)
    else:
        x = tf.keras.layers.Conv2D(filters, 3 if stride > 1 else 1, stride, padding="same", use_bias=False)(x)
    x = tf.keras.layers.BatchNormalization()(x)
    return tf.keras.layers.ReLU(6.0)(x)


def tiny_cnn() -> tf.keras.Model:
    """A MobileNet-shaped NHWC classifier: Conv+BN+ReLU6 stem, depthwise-separable blocks, GAP, Dense."""
    inp = tf.keras.Input((32, 32, 3), name="image")
    x = conv_bn(inp, 16, 2)
    for filters, stride in ((24, 1), (32, 2), (32, 1)):
        x = conv_bn(x, 0, stride, depthwise=True)
        x = conv_bn(x, filters)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    out = tf.keras.layers.Dense(10, activation="softmax")(x)
    return tf.keras.Model(inp, out, name="tf_cnn")


def tiny_text() -> tf.keras.Model:
    """Token ids (int32) -> Embedding -> GRU -> Dense: a small sentence classifier."""
    inp = tf.keras.Input((24,), dtype="int32", name="tokens")
    x = tf.keras.layers.Embedding(500, 32)(inp)
    x = tf.keras.layers.GRU(32)(x)
    x = tf.keras.layers.Dense(32, activation="relu")(x)
    out = tf.keras.layers.Dense(4)(x)
    return tf.keras.Model(inp, out, name="tf_text")


def fit_briefly(model: tf.keras.Model, x: np.ndarray, y: np.ndarray, loss, epochs: int = 3) -> None:
    """A few seconds of training on a learnable synthetic task, so that the outputs depend on the input
    (random-init or random-label models give near-constant outputs) and BatchNorm statistics are real."""
    model.compile(tf.keras.optimizers.Adam(3e-3), loss)
    history = model.fit(x, y, batch_size=32, epochs=epochs, verbose=0)
    print(f"{model.name}: synthetic-task loss {history.history['loss'][0]:.3f} -> {history.history['loss'][-1]:.3f}")


def image_task(rng: np.random.Generator, n: int, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Noise plus one of ``classes`` fixed NHWC patterns; the label is the pattern's index."""
    patterns = rng.standard_normal((classes, 32, 32, 3))
    y = rng.integers(0, classes, n)
    return (patterns[y] + rng.standard_normal((n, 32, 32, 3))).astype("float32"), y


def token_task(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Random ids in [0, 500); the label counts ids below 40 (capped at 3), which needs the recurrence."""
    x = rng.integers(0, 500, (n, 24)).astype("int32")
    return x, np.minimum((x < 40).sum(1), 3)


def convert(model: tf.keras.Model, name: str, opset: int) -> Path:
    spec = tuple(tf.TensorSpec((None, *i.shape[1:]), i.dtype, name=i.name) for i in model.inputs)
    target = HERE / f"{name}.onnx"
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset, output_path=str(target))
    onnx_model = onnx.load(target)
    dims = {i.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]
            for i in onnx_model.graph.input}
    print(f"{target.name}: ir {onnx_model.ir_version}, opset {[o.version for o in onnx_model.opset_import]}, "
          f"inputs {dims}, {target.stat().st_size} bytes")
    return target


def jax_mlp(name: str, opset: int) -> Path:
    """A 16-32-32-5 GELU MLP written in jax, converted through jax2tf with a polymorphic batch."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import jax2tf

    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    sizes = [(16, 32), (32, 32), (32, 5)]
    params = [(jax.random.normal(keys[2 * i], s) / np.sqrt(s[0]), 0.1 * jax.random.normal(keys[2 * i + 1], s[1:]))
              for i, s in enumerate(sizes)]

    def mlp(x):
        for w, b in params[:-1]:
            x = jax.nn.gelu(x @ w + b)
        w, b = params[-1]
        return x @ w + b

    spec = [tf.TensorSpec([None, 16], tf.float32, name="x")]
    fn = tf.function(jax2tf.convert(mlp, polymorphic_shapes=["(b, 16)"], native_serialization=False, enable_xla=False),
                     autograph=False, input_signature=spec)
    target = HERE / f"{name}.onnx"
    tf2onnx.convert.from_function(fn, input_signature=spec, opset=opset, output_path=str(target))
    print(f"{target.name}: jax {jax.__version__}, {target.stat().st_size} bytes")
    return target


def main() -> int:
    print(f"tensorflow {tf.__version__}, tf2onnx {tf2onnx.__version__}, python {sys.version.split()[0]}")
    tf.keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(0)
    cnn = tiny_cnn()
    fit_briefly(cnn, *image_task(rng, 1024), "sparse_categorical_crossentropy")
    convert(cnn, "tf_cnn", 13)
    tf.keras.utils.set_random_seed(1)
    text = tiny_text()
    fit_briefly(text, *token_task(rng, 2048), tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), 4)
    convert(text, "tf_text", 13)
    jax_mlp("tf_jax_mlp", 13)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
