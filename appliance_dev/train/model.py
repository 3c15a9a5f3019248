"""The network: a small 2D U-Net, its BatchNorm folded into the convolutions for export, and the way back
from an exported model.onnx to a trainable PyTorch module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from appliance_dev.train.config import N_CLASSES, WIDTHS


def build_model(widths: tuple[int, ...] = WIDTHS, channels: int = 3):
    """A small 2D U-Net: 3x3 conv + BN + ReLU pairs, max-pool down, transposed-conv up, concat skips."""
    import torch.nn as nn
    import torch

    def block(i: int, o: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True),
                             nn.Conv2d(o, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

    class UNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.ModuleList()
            prev = channels
            for c in widths:
                self.enc.append(block(prev, c))
                prev = c
            self.up = nn.ModuleList()
            self.dec = nn.ModuleList()
            for i in range(len(widths) - 1, 0, -1):
                self.up.append(nn.ConvTranspose2d(widths[i], widths[i - 1], 2, stride=2))
                self.dec.append(block(2 * widths[i - 1], widths[i - 1]))
            self.head = nn.Conv2d(widths[0], N_CLASSES, 1)
            self.pool = nn.MaxPool2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            skips = []
            for i, enc in enumerate(self.enc):
                if i:
                    x = self.pool(x)
                x = enc(x)
                skips.append(x)
            for up, dec, skip in zip(self.up, self.dec, reversed(skips[:-1])):
                x = dec(torch.cat([up(x), skip], 1))
            return self.head(x)

    return UNet()


def fold_batchnorm(model):
    """Fold every eval-mode BatchNorm into the conv before it (an exported graph of Conv/ReLU only)."""
    import copy

    import torch
    import torch.nn as nn

    model = copy.deepcopy(model).eval()
    for mod in model.modules():
        if isinstance(mod, nn.Sequential):
            layers = list(mod)
            out = []
            i = 0
            while i < len(layers):
                layer = layers[i]
                if isinstance(layer, nn.Conv2d) and i + 1 < len(layers) and isinstance(layers[i + 1], nn.BatchNorm2d):
                    bn = layers[i + 1]
                    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                    conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                     layer.padding, bias=True)
                    with torch.no_grad():
                        conv.weight.copy_(layer.weight * scale[:, None, None, None])
                        b = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
                        conv.bias.copy_((b - bn.running_mean) * scale + bn.bias)
                    out.append(conv)
                    i += 2
                else:
                    out.append(layer)
                    i += 1
            for j in range(len(mod)):
                del mod[0]
            for layer in out:
                mod.append(layer)
    return model


def model_from_onnx(path: Path, channels: int = 3):
    """The training architecture, BatchNorm folded as exported, with an exported model.onnx's weights loaded.

    Why: the shipped package holds only the folded ONNX; this turns it back into a trainable PyTorch module
    (``--init``: continue training a shipped model) and into the benchmark's PyTorch reference. The export keeps
    PyTorch's parameter names as initializer names; the base width is the first convolution's output channels.
    """
    import onnx
    import torch
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    first = next(iter(build_model(channels=channels).state_dict()))
    base = int(inits[first].shape[0]) if first in inits else WIDTHS[0]
    model = fold_batchnorm(build_model(tuple(base * 2**i for i in range(len(WIDTHS))), channels=channels))
    params = dict(model.named_parameters())
    if set(params) != set(inits) or any(tuple(params[k].shape) != inits[k].shape for k in params):
        raise ValueError(f"{path}: its weights do not fit the training script's architecture")
    with torch.no_grad():
        for k, prm in params.items():
            prm.copy_(torch.from_numpy(np.array(inits[k])))  # a writable copy
    return model


def torch_model_from_onnx(onnx_path: Path, channels: int) -> Any:
    """The benchmarks' PyTorch reference: the training architecture, batch-norm folded as exported, with
    model.onnx's weights loaded by name (:func:`model_from_onnx`), in eval mode; a clear exit when the
    weights do not fit the architecture."""
    try:
        return model_from_onnx(onnx_path, channels).eval()
    except ValueError as exc:
        raise SystemExit(f"bench: {exc}; retrain or fix") from exc
