"""Students as data: one StudentSpec builds the torch model, the Keras twin and the cost numbers.

Architecture (why): clouds are large, smooth objects, so the student works at 1/stem_stride of the
input resolution (a stride-4 patchify stem == space-to-depth + 1x1 conv) and a small U-Net there;
the logits are bilinearly upsampled to input resolution inside the model so every runtime emits a
full-resolution mask. This keeps MACs/pixel at ~1 % of the ukis-csmask teacher.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TEACHER_MACS_PER_PIXEL = 4.65e9 / 256**2  # ukis-csmask EfficientNet-b4 U-Net, 4.65 GMAC per 256² tile
TEACHER_PARAMS = 19_540_000
CHROMA_EPS = 0.02   # reflectance added to the brightness before dividing: dark pixels keep bounded ratios


@dataclass(frozen=True)
class StudentSpec:
    name: str = "cloudgate-s4"
    bands: tuple[str, ...] = ("blue", "green", "red", "nir")
    classes: tuple[str, ...] = ("clear", "cloud", "shadow")
    stem_stride: int = 4
    widths: tuple[int, ...] = (12, 20, 32)
    feature_channels: int = 64  # teacher feature width the SSLKD adapters project onto
    # Bands the student uses when the scene has them (SWIR separates snow/ice from cloud, which VNIR
    # alone cannot) and runs without otherwise: their planes are 0 and one extra input channel, the
    # presence flag, says whether they are real (1.0) or absent (0.0). Empty: every band is required.
    optional_bands: tuple[str, ...] = ()
    # The input grid the student is trained, validated and flown at: 1 = the sensor's grid, 2 = 2x2-averaged
    # reflectance (the half-resolution decision path: a quarter of the invoke work per scene pixel).
    input_downsample: int = 1
    # Brightness-normalised input channels computed in the graph (probe of issue 27): each band divided by the
    # pixel's mean VNIR brightness (+ 0.02) beside the reflectance itself. Clear snow/ice and cloud decks differ by
    # 5-10 % band ratios at the same brightness; these channels hand the first conv the ratios directly.
    chromaticity: bool = False

    @staticmethod
    def from_dict(d: dict) -> "StudentSpec":
        known = set(StudentSpec.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"student spec: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        for k in ("bands", "classes", "widths", "optional_bands"):
            if k in d:
                d[k] = tuple(d[k])
        spec = StudentSpec(**d)
        if len(spec.widths) < 2:
            raise ValueError("student spec: widths needs at least 2 levels")
        stray = [b for b in spec.optional_bands if b not in spec.bands]
        if stray:
            raise ValueError(f"student spec: optional_bands {stray} must also be listed in bands {list(spec.bands)}")
        if spec.chromaticity and (tuple(spec.bands[:4]) != ("blue", "green", "red", "nir") or spec.optional_bands):
            raise ValueError("student spec: chromaticity divides by the mean of the first four channels, which must be "
                             f"blue, green, red, nir with no optional bands; got bands {list(spec.bands)}, "
                             f"optional {list(spec.optional_bands)}")
        if spec.input_downsample not in (1, 2):
            raise ValueError(f"student spec: input_downsample={spec.input_downsample!r}: choose 1 (full resolution) "
                             "or 2 (2x2-averaged, the half-resolution decision grid)")
        if len(spec.optional_bands) == len(spec.bands):
            raise ValueError("student spec: at least one band must be required (not in optional_bands)")
        return spec

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("bands", "classes", "widths", "optional_bands"):
            d[k] = list(d[k])
        return d

    @property
    def in_channels(self) -> int:
        """Model input channels: every band, plus the presence flag when some bands are optional."""
        return len(self.bands) + (1 if self.optional_bands else 0)

    def model_input(self, x: np.ndarray, names, optional_present: bool) -> np.ndarray:
        """(..., C) float reflectance whose last axis is named by `names` -> (..., in_channels) float32 in
        model-input order. Optional bands count as present only when all of them are in `names` and
        `optional_present` is true; absent ones are 0 and the flag channel is 0."""
        names = list(names)
        present = bool(optional_present) and all(b in names for b in self.optional_bands)
        out = np.zeros(x.shape[:-1] + (self.in_channels,), np.float32)
        for c, b in enumerate(self.bands):
            if b in self.optional_bands and not present:
                continue
            out[..., c] = x[..., names.index(b)]
        if self.optional_bands:
            out[..., -1] = 1.0 if present else 0.0
        return out

    def conv_layers(self) -> list[tuple[int, int, int, int]]:
        """(kernel, c_in, c_out, downsample factor of the output grid) for every conv, in order."""
        s, w = self.stem_stride, self.widths
        stem_in = self.in_channels * (2 if self.chromaticity else 1)
        layers = [(s, stem_in, w[0], s), (3, w[0], w[0], s)]
        for i in range(1, len(w)):
            f = s * 2**i
            layers += [(3, w[i - 1], w[i], f), (3, w[i], w[i], f)]
        for i in range(len(w) - 2, -1, -1):
            layers.append((3, w[i + 1] + w[i], w[i], s * 2**i))
        layers.append((1, w[0], len(self.classes), s))
        return layers

    def macs_per_pixel(self) -> float:
        return sum(k * k * ci * co / f**2 for k, ci, co, f in self.conv_layers())

    def parameters(self) -> int:
        # conv weights + (folded) bias per output channel
        return sum(k * k * ci * co + co for k, ci, co, _ in self.conv_layers())


class _ConvBNReLU(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, k: int = 3, stride: int = 1):
        super().__init__(
            nn.Conv2d(c_in, c_out, k, stride=stride, padding=(k // 2 if stride == 1 else 0), bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class StudentUNet(nn.Module):
    """Tiny U-Net at 1/stem_stride resolution. forward() returns full-resolution logits;
    forward_with_features() also returns the 1/stem_stride decoder feature used by SSLKD."""

    def __init__(self, spec: StudentSpec):
        super().__init__()
        self.spec = spec
        w, s = spec.widths, spec.stem_stride
        stem_in = spec.in_channels * (2 if spec.chromaticity else 1)
        self.stem = nn.Sequential(_ConvBNReLU(stem_in, w[0], k=s, stride=s), _ConvBNReLU(w[0], w[0]))
        self.down = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), _ConvBNReLU(w[i - 1], w[i]), _ConvBNReLU(w[i], w[i]))
            for i in range(1, len(w))
        )
        self.up = nn.ModuleList(_ConvBNReLU(w[i + 1] + w[i], w[i]) for i in range(len(w) - 2, -1, -1))
        self.head = nn.Conv2d(w[0], len(spec.classes), 1)

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.spec.chromaticity:
            x = torch.cat([x, x / (x[:, :4].mean(1, keepdim=True).clamp_min(0.0) + CHROMA_EPS)], 1)
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(skips[-1]))
        y = skips.pop()
        for block in self.up:
            y = block(torch.cat([F.interpolate(y, scale_factor=2.0, mode="nearest"), skips.pop()], dim=1))
        logits_low = self.head(y)
        logits = F.interpolate(logits_low, scale_factor=float(self.spec.stem_stride), mode="bilinear",
                               align_corners=False)
        return logits, y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[0]


def build_student(spec: StudentSpec) -> StudentUNet:
    return StudentUNet(spec)


def folded_convs(model: StudentUNet) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Conv weights with BatchNorm folded in, in StudentSpec.conv_layers() order: (weight OIHW, bias)."""
    model = model.eval()
    seqs = [model.stem[0], model.stem[1]]
    for d in model.down:
        seqs += [d[1], d[2]]
    seqs += list(model.up)
    out = []
    with torch.no_grad():
        for seq in seqs:
            conv, bn = seq[0], seq[1]
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            out.append((conv.weight * scale[:, None, None, None], bn.bias - bn.running_mean * scale))
        out.append((model.head.weight.clone(), model.head.bias.clone()))
    return out


def build_keras(spec: StudentSpec, model: StudentUNet, tile: int):
    """Keras (NHWC) twin of a trained student with BN folded, for the TFLite INT8 converter."""
    import tensorflow as tf  # export-only dependency

    if spec.chromaticity:
        raise ValueError("student spec: chromaticity channels have no Keras twin yet (ONNX export only); "
                         "train with chromaticity: false to export TFLite")

    convs = folded_convs(model)
    it = iter(convs)

    def conv(x, k, stride=1, relu=True):
        w, b = next(it)
        layer = tf.keras.layers.Conv2D(w.shape[0], k, strides=stride, padding="valid" if stride > 1 or k == 1 else "same",
                                       activation="relu" if relu else None)
        y = layer(x)
        layer.set_weights([w.permute(2, 3, 1, 0).numpy(), b.numpy()])
        return y

    w, s = spec.widths, spec.stem_stride
    inp = tf.keras.Input((tile, tile, spec.in_channels), batch_size=1, name="reflectance")
    x = conv(inp, s, stride=s)
    skips = [conv(x, 3)]
    for _ in range(1, len(w)):
        y = tf.keras.layers.MaxPooling2D(2)(skips[-1])
        y = conv(y, 3)
        skips.append(conv(y, 3))
    y = skips.pop()
    for _ in range(len(w) - 1):
        y = tf.keras.layers.UpSampling2D(2, interpolation="nearest")(y)
        y = tf.keras.layers.Concatenate(axis=-1)([y, skips.pop()])
        y = conv(y, 3)
    y = conv(y, 1, relu=False)
    out = tf.keras.layers.UpSampling2D(s, interpolation="bilinear", name="logits")(y)
    return tf.keras.Model(inp, out, name=spec.name.replace("-", "_"))
