"""Writes the paddle2onnx fixtures under models/fixtures/: a small training-structure net of
RepVGG blocks (3x3+BN, 1x1+BN, identity BN) and an ACNet block (3x3, 1x3, 3x1, each +BN), random
weights and BN statistics, exported by paddle2onnx as users export (static batch and a dynamic one).

    pip install paddlepaddle paddle2onnx   # in a separate venv: the tests need only onnx + onnxruntime
    python models/paddle_fixtures.py [OUT_DIR]
"""
from __future__ import annotations

import os
import sys

import numpy as np
import paddle
from paddle import nn


class ConvBN(nn.Layer):
    def __init__(self, c_in, c_out, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2D(c_in, c_out, kernel, stride, padding, bias_attr=False)
        self.bn = nn.BatchNorm2D(c_out)

    def forward(self, x):
        return self.bn(self.conv(x))


class RepVGGBlock(nn.Layer):
    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.dense, self.pointwise = ConvBN(c_in, c_out, 3, stride, 1), ConvBN(c_in, c_out, 1, stride)
        self.identity = nn.BatchNorm2D(c_out) if c_in == c_out and stride == 1 else None

    def forward(self, x):
        y = self.dense(x) + self.pointwise(x)
        return nn.functional.relu(y + self.identity(x) if self.identity is not None else y)


class ACBlock(nn.Layer):
    def __init__(self, c):
        super().__init__()
        self.square = ConvBN(c, c, 3, 1, 1)
        self.wide, self.tall = ConvBN(c, c, (1, 3), 1, (0, 1)), ConvBN(c, c, (3, 1), 1, (1, 0))

    def forward(self, x):
        return nn.functional.relu(self.square(x) + self.wide(x) + self.tall(x))


def net() -> nn.Layer:
    paddle.seed(0)
    model = nn.Sequential(RepVGGBlock(3, 8, 2), RepVGGBlock(8, 8), ACBlock(8), RepVGGBlock(8, 16, 2),
                          nn.AdaptiveAvgPool2D(1), nn.Flatten(), nn.Linear(16, 10))
    rng = np.random.default_rng(0)
    for layer in model.sublayers():
        if isinstance(layer, nn.BatchNorm2D):  # statistics as training leaves them: folding is exercised
            c = layer._mean.shape[0]
            layer._mean.set_value(rng.normal(0, 0.5, c).astype("float32"))
            layer._variance.set_value(rng.uniform(0.5, 2.0, c).astype("float32"))
            layer.weight.set_value(rng.uniform(0.5, 1.5, c).astype("float32"))
            layer.bias.set_value(rng.normal(0, 0.5, c).astype("float32"))
    model.eval()
    return model


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
    os.makedirs(out, exist_ok=True)
    model = net()
    for name, batch in (("paddle_repvgg_acnet", 1), ("paddle_repvgg_acnet_dynamic", None)):
        spec = [paddle.static.InputSpec([batch, 3, 32, 32], "float32", "x")]
        paddle.onnx.export(model, os.path.join(out, name), input_spec=spec, opset_version=13)


if __name__ == "__main__":
    main()
