"""--amp: the precision each device computes in (auto, bf16, fp16, off); float32 stays exact, bf16 stays close."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import run_script

import cli
from all_models import Captioner, DecoderWithAttention, ModelConfig
from decoding import DecodeConfig, greedy_decode
from optim import make_optimizer
from runtime import make_autocast
from scst import train_step

CPU = torch.device("cpu")


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=12, encoder="smallcnn", encoded_size=4, embed_dim=16, attention_dim=16, decoder_dim=24,
                dropout=0.0)
    return ModelConfig(**{**base, **kw})


def captions(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`<start> w.. <end> <pad>..` rows of the given lengths, words from 4..11."""
    g = torch.Generator().manual_seed(0)
    caps = torch.zeros(len(lengths), max(lengths), dtype=torch.long)  # (B, L)
    for i, n in enumerate(lengths):
        caps[i, 0], caps[i, n - 1] = 1, 2
        caps[i, 1 : n - 1] = torch.randint(4, 12, (n - 2,), generator=g)
    return caps, torch.tensor(lengths)


def test_auto_is_bf16_only_where_it_was_measured_faster(monkeypatch) -> None:
    monkeypatch.setattr(cli, "cpu_native_bf16", lambda: None)  # a CPU that emulates bf16: auto falls back
    for purpose in cli.AMP_PURPOSES:
        dtype, note = cli.pick_amp(CPU, "auto", purpose)
        assert dtype is None and "float32" in note
    assert "no native bf16" in cli.pick_amp(CPU, "auto", "encode")[1]
    assert cli.pick_amp(CPU, "off", "encode")[0] is None  # exact on request
    dtype, note = cli.pick_amp(CPU, "bf16")  # forced: done, and said to be slow here
    assert dtype is torch.bfloat16 and "emulated" in note
    monkeypatch.setattr(cli, "cpu_native_bf16", lambda: "AVX512-BF16")
    dtype, note = cli.pick_amp(CPU, "auto", "encode")  # the feature cache's CNN: bf16 paid (1.6-1.9x)
    assert dtype is torch.bfloat16 and "AVX512-BF16" in note
    dtype, note = cli.pick_amp(CPU, "auto", "train")  # the training step: bf16 trained real batches slower
    assert dtype is None and "AVX512-BF16" in note and "--amp bf16 forces it" in note
    assert cli.pick_amp(CPU, "bf16", "train")[0] is torch.bfloat16
    assert cli.pick_amp(CPU, "auto", "decode")[0] is None  # captions: float32 (bf16 measured no faster)
    assert cli.pick_amp(CPU, "bf16", "decode")[0] is torch.bfloat16
    assert cli.pick_amp(torch.device("mps"), "auto")[0] is None  # mps: float32
    with pytest.raises(cli.UserError) as err:
        cli.pick_amp(CPU, "fp16")
    assert err.value.code == cli.EXIT_BAD_OPTION and "CUDA" in str(err.value)
    with pytest.raises(cli.UserError):
        DecodeConfig(amp="fp32")


def test_train_says_in_one_line_what_the_step_and_the_feature_cache_compute_in(monkeypatch, capsys) -> None:
    """On a native-bf16 CPU, auto trains in float32 but builds the feature cache in bf16, and says both."""
    monkeypatch.setattr(cli, "cpu_native_bf16", lambda: "AMX")
    _, scaler, cache_ctx = make_autocast(CPU, "auto", say=True, cache=True)
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and line.startswith("precision: float32")
    assert "feature cache: bf16 autocast (the CPU has AMX)" in line and not scaler.is_enabled()
    with cache_ctx:
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") is torch.bfloat16
    make_autocast(CPU, "auto", say=True, cache=False)  # no cache: its precision is not mentioned
    assert "feature cache" not in capsys.readouterr().out
    make_autocast(CPU, "off", say=True, cache=True)  # the same for both: said once
    assert capsys.readouterr().out == "precision: float32 (--amp off)\n"


def test_this_machines_answer_is_one_of_the_native_kinds() -> None:
    assert cli.cpu_native_bf16() in (None, "AMX", "AVX512-BF16", "Arm BF16")


def test_bf16_teacher_forcing_keeps_the_softmax_and_the_cell_in_float32() -> None:
    """Under CPU autocast the matrix products run in bf16; the attention weights and the LSTM state stay float32
    and the scores stay within bf16's rounding of the float32 ones."""
    torch.manual_seed(0)
    dec = DecoderWithAttention(tiny_config(), encoder_dim=20).eval()
    a = torch.randn(3, 16, 20)  # (B, P, D)
    caps, lens = captions([6, 4, 7])
    with torch.no_grad():
        ref = dec(a, caps, lens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = dec(a, caps, lens)
            _, _, h, c = dec.prepare(a)
            h, c, _, alpha = dec.advance(dec.word_gates(dec.embedding(caps[:, :1]), dec.input_weights()[0]),
                                         h.unsqueeze(1), c.unsqueeze(1), a, dec.attention.project(a),
                                         dec.input_weights()[1])
    assert c.dtype == alpha.dtype == torch.float32 and h.dtype == torch.bfloat16  # h feeds bf16 products only
    assert bf16.alphas.dtype == torch.float32
    torch.testing.assert_close(bf16.alphas, ref.alphas, atol=0.02, rtol=0.05)
    torch.testing.assert_close(bf16.logits.float(), ref.logits, atol=0.05, rtol=0.05)


def test_bf16_greedy_decoding_scores_are_close_to_float32() -> None:
    torch.manual_seed(1)
    dec = DecoderWithAttention(tiny_config(), encoder_dim=20).eval()
    a = torch.randn(4, 16, 20)
    wm = {w: i for i, w in enumerate(["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(8)])}
    ref = greedy_decode(dec, a, wm, max_len=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = greedy_decode(dec, a, wm, max_len=8)
    for r, g in zip(ref, got):
        assert g.alphas.dtype == torch.float32
        if g.tokens == r.tokens:  # a tie broken the other way is bf16's right; the same words score the same
            assert abs(g.score - r.score) <= 0.05 * max(1.0, abs(r.score))


def test_bf16_training_step_keeps_float32_weights_and_a_close_loss() -> None:
    """Master weights, gradients and optimizer state stay float32; the loss is computed in float32."""
    torch.manual_seed(0)
    model = Captioner(tiny_config(fine_tune_encoder=True))
    x = torch.randn(2, 3, 32, 32)
    caps, lens = captions([6, 5])
    losses = []
    for amp in ("off", "bf16"):
        m = Captioner(tiny_config(fine_tune_encoder=True))
        m.load_state_dict(model.state_dict())
        opt = make_optimizer(m, 1e-3, 1e-3)
        ctx, scaler, _ = make_autocast(CPU, amp)
        assert not scaler.is_enabled()
        losses.append(train_step(m, x, caps, lens, opt, alpha_c=1.0, grad_clip=5.0, scaler=scaler, autocast=ctx))
        assert all(p.dtype == torch.float32 for p in m.parameters())
        assert all(v.dtype == torch.float32 for s in opt.state.values() for k, v in s.items() if k != "step")
    assert abs(losses[1]["loss"] - losses[0]["loss"]) <= 0.02 * losses[0]["loss"]


def test_inference_auto_is_exactly_amp_off(trained: Path, good_image: Path,
                                                                   monkeypatch) -> None:
    monkeypatch.setattr(cli, "cpu_native_bf16", lambda: "AMX")  # even where bf16 is native: it did not pay
    args = ["--checkpoint", trained / "best.pt", "--json", "--device", "cpu", good_image]
    auto = run_script("inference.py", *args, mode="in_process")
    off = run_script("inference.py", *args, "--amp", "off", mode="in_process")
    assert auto.rc == off.rc == 0 and auto.out == off.out
    assert "float32 (bf16 decodes no faster" in auto.err and "float32 (--amp off)" in off.err
    forced = run_script("inference.py", *args, "--amp", "bf16", mode="in_process")  # runs, and says so
    assert forced.rc == 0 and "bf16 autocast (the CPU has AMX" in forced.err and forced.out.count("\n") == 1
