"""Writes the tf2onnx fixtures under models/fixtures/: a small Keras net (NHWC) of RepVGG blocks
(3x3+BN, 1x1+BN, identity BN) and an ACNet block (3x3, 1x3, 3x1, each +BN), random weights and BN
statistics, converted by tf2onnx with its optimizers (the default) and without them (every conv
between Transposes, BN, bias and the branch sum in NHWC).

    pip install tensorflow-cpu tf2onnx   # in a separate venv: the tests need only onnx + onnxruntime
    python models/tf_fixtures.py [OUT_DIR]
"""
from __future__ import annotations

import os
import sys

import numpy as np
import tensorflow as tf
import tf2onnx
from tensorflow import keras


def conv_bn(x, filters, kernel, stride=1):
    y = keras.layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False)(x)
    return keras.layers.BatchNormalization()(y)


def repvgg(x, filters, stride=1):
    branches = [conv_bn(x, filters, 3, stride), conv_bn(x, filters, 1, stride)]
    if stride == 1 and x.shape[-1] == filters:
        branches.append(keras.layers.BatchNormalization()(x))
    return keras.layers.ReLU()(keras.layers.Add()(branches))


def acnet(x, filters):
    branches = [conv_bn(x, filters, 3), conv_bn(x, filters, (1, 3)), conv_bn(x, filters, (3, 1))]
    return keras.layers.ReLU()(keras.layers.Add()(branches))


def net() -> keras.Model:
    keras.utils.set_random_seed(0)
    x = keras.Input((32, 32, 3), name="x")
    y = repvgg(repvgg(x, 8, 2), 8)
    y = repvgg(acnet(y, 8), 16, 2)
    y = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(y))
    model = keras.Model(x, y)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):  # as training leaves them
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.5, c), rng.normal(0, 0.5, c),
                               rng.uniform(0.5, 2.0, c)])
    return model


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
    os.makedirs(out, exist_ok=True)
    model = net()
    spec = (tf.TensorSpec((None, 32, 32, 3), tf.float32, name="x"),)
    for name, optimizers in (("tf2onnx_repvgg_acnet", None), ("tf2onnx_repvgg_acnet_unoptimized", {})):
        tf2onnx.convert.from_keras(model, input_signature=spec, opset=17, optimizers=optimizers,
                                   output_path=os.path.join(out, f"{name}.onnx"))


if __name__ == "__main__":
    main()
