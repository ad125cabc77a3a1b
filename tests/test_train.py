"""train.py on the tiny shapes set with the tiny smallcnn model, on CPU: resuming (after Ctrl-C and SIGKILL), the
weight average and the schedules in a run, torchrun, the files a run writes, its folder, and user mistakes."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

import h5py
import pytest
import torch
from helpers import (
    TEMP_NAME,
    kill_when,
    one_line,
    run_script,
    sigint_after_step,
    size,
    start_script,
    temps,
    tiny_train_args,
    tiny_train_config,
)
from torch.utils.data import DataLoader, Subset

import feature_cache
import run
import train
from all_models import Captioner
from checkpoints import load_checkpoint, model_from_checkpoint
from cli import field_help
from pytorch_dataset_class import ImageDataset
from run_start import load_resume, make_model_config


def comparable(history: list[dict]) -> list[dict]:
    """Per-epoch metrics without the timings."""
    return [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s")} for h in history]


# ----------------------------------------------------------------------------------------------
# Resume, DDP (in-process unless a process boundary is the point)


def test_resume_equals_uninterrupted_run(tiny_shapes: Path, tmp_path: Path, monkeypatch) -> None:
    sigint_before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a shell's background job, else Python's handler
    full = train.train(tiny_train_config(tiny_shapes, tmp_path, run="full", epochs=2), progress=False)
    # stopped after epoch 1, resumed for epoch 2
    train.train(tiny_train_config(tiny_shapes, tmp_path, run="a", epochs=1), progress=False)
    resumed = train.train(tiny_train_config(tiny_shapes, tmp_path, run="a2", epochs=2,
                                            resume=str(tmp_path / "a/last.pt")), progress=False)
    # Ctrl-C (a real SIGINT) in the middle of epoch 2, then resumed
    with sigint_after_step(monkeypatch, 20) as calls, \
            pytest.raises(train.Interrupted, match=r"epoch 2 after step 5/15.*--resume"):
        train.train(tiny_train_config(tiny_shapes, tmp_path, run="b", epochs=2), progress=False)
    mid = torch.load(tmp_path / "b/last.pt", weights_only=True)
    assert (mid["epoch"], mid["step_in_epoch"]) == (1, 5)
    after_sigint = train.train(tiny_train_config(tiny_shapes, tmp_path, run="b2", epochs=2,
                                        resume=str(tmp_path / "b/last.pt")), progress=False)
    assert len(calls) == 20 and signal.getsignal(signal.SIGINT) is sigint_before  # the handler is given back

    want = comparable(full["history"])
    assert len(want) == 2 and want[1]["train_loss"] != want[0]["train_loss"]
    ref = load_checkpoint(tmp_path / "full/last.pt")
    for name, summary in (("a2", resumed), ("b2", after_sigint)):
        got = comparable(summary["history"])
        for w, g in zip(want, got, strict=True):
            assert w.keys() == g.keys()
            for k in w:
                assert g[k] == pytest.approx(w[k], rel=1e-6, abs=1e-9), (name, k)
        ck = load_checkpoint(tmp_path / name / "last.pt")
        for k, v in ref["model_state"].items():
            torch.testing.assert_close(ck["model_state"][k], v, rtol=1e-6, atol=1e-7)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_ema_run_validates_and_saves_the_average_and_resumes_exactly(tiny_shapes: Path, tmp_path: Path) -> None:
    """With --ema-decay, model_state (what evaluate.py and inference.py load) is the average, the val scores in
    the metrics are that model's, and a run stopped after epoch 1 and resumed ends as the uninterrupted run."""
    kw = dict(ema_decay=0.9)
    full = train.train(tiny_train_config(tiny_shapes, tmp_path, run="full", epochs=2, **kw), progress=False)
    train.train(tiny_train_config(tiny_shapes, tmp_path, run="a", epochs=1, **kw), progress=False)
    resumed = train.train(tiny_train_config(tiny_shapes, tmp_path, run="a2", epochs=2,
                                            resume=str(tmp_path / "a/last.pt"), **kw), progress=False)
    for w, g in zip(comparable(full["history"]), comparable(resumed["history"]), strict=True):
        assert g == pytest.approx(w, rel=1e-6, abs=1e-9)
    ref, ck = load_checkpoint(tmp_path / "full/last.pt"), load_checkpoint(tmp_path / "a2/last.pt")
    assert ref["ema_updates"] == ck["ema_updates"] > 0
    for key in ("model_state", "trained_state"):
        for k, v in ref[key].items():
            torch.testing.assert_close(ck[key][k], v, rtol=1e-6, atol=1e-7)
    assert not torch.equal(ref["model_state"]["decoder.fc.weight"], ref["trained_state"]["decoder.fc.weight"])
    # The last epoch's val loss is that of the weights in model_state.
    model = model_from_checkpoint(ref, "cpu")[0].eval()
    val = ImageDataset(tiny_shapes / "val.h5")
    n = ref["train_config"]["val_max_images"]
    scores = run.validate(model, DataLoader(Subset(val, range(n)), batch_size=16), val.references()[:n],
                               ref["word_map"], alpha_c=ref["train_config"]["alpha_c"], max_decode_len=12,
                               progress=False)
    assert scores["val_loss"] == pytest.approx(full["history"][-1]["val_loss"], rel=1e-5)
    assert scores["val_bleu4"] == pytest.approx(full["history"][-1]["val_bleu4"], rel=1e-6)


def test_cosine_schedule_follows_its_curve_and_resumes_on_it(tiny_shapes: Path, tmp_path: Path,
                                                             monkeypatch) -> None:
    """--lr-schedule cosine: the rate falls from --decoder-lr to 0 over the run, step by step, and a run
    stopped mid-epoch by Ctrl-C continues on the same curve (same weights as the uninterrupted run)."""
    cfg = dict(epochs=2, lr_schedule="cosine", decoder_lr=2e-3)
    seen: list[float] = []
    real_step = run.optimize  # optim.optimize, as Run.optimize calls it

    def record(loss, optimizer, **kw):
        seen.append(optimizer.param_groups[0]["lr"])
        return real_step(loss, optimizer, **kw)

    monkeypatch.setattr(run, "optimize", record)
    full = train.train(tiny_train_config(tiny_shapes, tmp_path, run="full", **cfg), progress=False)
    n = len(seen)  # 2 epochs x 15 steps
    assert n == 30 and seen[0] == pytest.approx(2e-3) and seen[n // 2] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(seen, seen[1:])) and seen[-1] < 2e-5

    def sigint_at_20(loss, optimizer, **kw):
        out = real_step(loss, optimizer, **kw)
        seen.append(0.0)
        if len(seen) == n + 20:
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(run, "optimize", sigint_at_20)
    with pytest.raises(train.Interrupted):
        train.train(tiny_train_config(tiny_shapes, tmp_path, run="b", **cfg), progress=False)
    monkeypatch.setattr(run, "optimize", real_step)
    stopped = torch.load(tmp_path / "b/last.pt", weights_only=True)
    assert stopped["scheduler_state"] is None  # only --lr-schedule plateau has a scheduler state
    # Earlier versions saved a ReduceLROnPlateau's state for every schedule: such a checkpoint resumes the same.
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    stopped["scheduler_state"] = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max").state_dict()
    torch.save(stopped, tmp_path / "b/last.pt")
    resumed = train.train(tiny_train_config(tiny_shapes, tmp_path, run="b2", resume=str(tmp_path / "b/last.pt"), **cfg),
                          progress=False)
    for w, g in zip(comparable(full["history"]), comparable(resumed["history"]), strict=True):
        assert w.keys() == g.keys() and all(g[k] == pytest.approx(w[k], rel=1e-6, abs=1e-9) for k in w)
    ref, got = (load_checkpoint(tmp_path / r / "last.pt")["model_state"] for r in ("full", "b2"))
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7)


def test_torchrun_two_processes_keep_identical_parameters(tiny_shapes: Path, tmp_path: Path) -> None:
    dump = tmp_path / "params"
    # tests/ddp_worker.py runs train.py's main() in each process and dumps what each rank holds at the end
    # --run-name: torchrun takes --run for an abbreviation of its own --run-path
    proc = run_script("tests/ddp_worker.py", dump,
                      *tiny_train_args(tiny_shapes, tmp_path, "--device", "cpu", "--epochs", "1", "--run-name", "ddp"),
                      mode="fresh", launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"),
                      timeout=240)
    assert proc.rc == 0, proc.err[-3000:]
    ranks = [json.loads(Path(f"{dump}.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # each rank trained on its own half of the 240 captions, yet both hold the same weights
    assert [r["samples"] for r in ranks] == [120, 120]
    assert ranks[0]["sha1"] == ranks[1]["sha1"] and ranks[0]["sum"] == ranks[1]["sum"]
    # only rank 0 wrote the run, and its weights are the ones both ranks hold
    ck = load_checkpoint(tmp_path / "ddp/last.pt")  # the folder --run-name named
    assert ck["epoch"] == 1
    flat = torch.cat([v.float().flatten() for k, v in ck["model_state"].items()
                      if k in dict(Captioner(make_model_config(tiny_train_config(tiny_shapes, tmp_path),
                                                                     len(ck["word_map"]))).named_parameters())])
    assert float(flat.double().sum()) == pytest.approx(ranks[0]["sum"], rel=1e-9)
    assert proc.out.count("epoch 1/1 ") == 1  # one rank logs


# ----------------------------------------------------------------------------------------------
# The command line, end to end


def test_cli_run_writes_everything(trained_run) -> None:
    run_dir, proc = trained_run
    assert proc.rc == 0, proc.err[-3000:]
    for name in ("last.pt", "best.pt", "metrics.jsonl", "curves.png", "config.json"):
        assert (run_dir / name).is_file(), name
    assert '"batch_size": 16' in proc.out  # the resolved config is printed
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["batch_size"] == 16 and cfg["encoder"] == "smallcnn" and cfg["epochs"] == 1
    ck = torch.load(run_dir / "last.pt", weights_only=True)
    assert ck["epoch"] == 1 and ck["train_config"] == cfg and ck["format_version"] == 1
    assert "module." not in "".join(ck["model_state"]) and "_orig_mod" not in "".join(ck["model_state"])
    model, word_map = model_from_checkpoint(load_checkpoint(run_dir / "best.pt"))
    assert word_map == ck["word_map"] and model.config.encoder == "smallcnn"
    (m,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"epoch", "train_loss", "val_loss", "val_top5", "val_bleu4", "lr_decoder", "images_per_s",
            "seconds"} <= m.keys()
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nan_loss_stops_with_one_line_and_keeps_last_checkpoint(trained: Path, tmp_path: Path) -> None:
    run_dir = trained
    run_copy = tmp_path / "r"
    shutil.copytree(run_dir, run_copy)
    # One NaN weight, as a diverged run leaves them: every logit of the first step is then NaN. (A huge
    # learning rate is no reliable trigger: the LSTM's sigmoid and tanh squash overflowing weights.)
    ck = torch.load(run_copy / "last.pt", weights_only=True)
    ck["model_state"]["decoder.fc.bias"][0] = float("nan")
    torch.save(ck, run_copy / "last.pt")
    before = hashlib.sha1((run_copy / "last.pt").read_bytes()).hexdigest()
    proc = run_script("train.py", "--resume", run_copy / "last.pt", "--out-dir", tmp_path, "--epochs", "3",
                      mode="fresh")
    assert proc.rc == 1, proc.err[-3000:]
    assert "Traceback" not in proc.err
    last = proc.err.strip().splitlines()[-1]
    assert last.startswith("train.py: error: loss is nan at epoch 2 step "), last
    assert "last good checkpoint" in last
    assert hashlib.sha1((run_copy / "last.pt").read_bytes()).hexdigest() == before


def test_sigint_saves_last_and_resumes(tiny_shapes: Path, tmp_path: Path) -> None:
    """Ctrl-C in a terminal: SIGINT to the whole process group, DataLoader worker included."""
    args = tiny_train_args(tiny_shapes, tmp_path, "--epochs", "100", "--early-stop", "100", "--run", "s", "--workers",
                           "1")
    proc = start_script("train.py", *args)
    try:
        for line in proc.stdout:  # wait until epoch 1 is done: training is under way
            if line.startswith("epoch 1/100"):
                break
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("train.py: interrupted in epoch ") and f"--resume {tmp_path / 's/last.pt'}" in last
    ck = torch.load(tmp_path / "s/last.pt", weights_only=True)
    done = ck["epoch"]
    assert 1 <= done < 100
    # resuming takes the saved config (100 epochs) with --epochs on top: finish the epoch it was in
    train.main(["--resume", str(tmp_path / "s/last.pt"), "--epochs", str(done + 1)])
    ck2 = load_checkpoint(tmp_path / "s/last.pt")
    assert ck2["epoch"] == done + 1 and ck2["step_in_epoch"] == 0 and len(ck2["history"]) == done + 1
    assert ck2["train_config"]["epochs"] == done + 1 and ck2["train_config"]["batch_size"] == 16


# ----------------------------------------------------------------------------------------------
# User mistakes: one stderr line, no traceback


@pytest.mark.parametrize("extra, code, message", [
    (["--batch-size", "0"], 2, "--batch-size must be >= 1, got 0"),
    (["--decoder-lr", "-1"], 2, "--decoder-lr must be a positive number"),
    (["--lr-decay", "1.5"], 2, "--lr-decay must be in (0, 1)"),
    (["--amp", "fp8"], 2, "argument --amp: invalid choice"),
    (["--epochs", "many"], 2, "argument --epochs: invalid int value"),
    (["--dropout", "1"], 2, "--dropout must be in [0, 1)"),
    (["--label-smoothing", "1"], 2, "--label-smoothing must be in [0, 1)"),
    (["--encoder", "vgg"], 2, "argument --encoder: invalid choice"),
    (["--device", "tpu"], 2, "--device tpu: expected auto, cpu, cuda"),
    (["--cache-features", "--fine-tune-encoder"], 2, "--cache-features needs a frozen encoder"),
    (["--run", "a/b"], 2, "--run a/b: a run name is a plain folder name"),
    (["--captions-per-image", "2"], 2, "--captions-per-image draws from an image's captions: it needs --group"),
    (["--resume", "nope.pt"], 1, "--resume nope.pt: file not found"),
])
def test_bad_options_exit_with_one_line(tiny_shapes: Path, tmp_path: Path, extra, code, message) -> None:
    r = run_script("train.py", *tiny_train_args(tiny_shapes, tmp_path, *extra), mode="in_process")
    got, err = r.rc, r.err
    assert got == code and len(err.strip().splitlines()) == 1 and message in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(tiny_shapes: Path, tmp_path: Path) -> None:
    r = run_script("train.py", *tiny_train_args(tiny_shapes, tmp_path, "--device", "cuda"), mode="in_process")
    got, err = r.rc, r.err
    assert got == 2 and "no CUDA device" in err and len(err.strip().splitlines()) == 1


def test_bad_data_folders(tiny_shapes: Path, tmp_path: Path) -> None:
    def check(data: Path, message: str) -> None:
        r = run_script("train.py", *tiny_train_args(data, tmp_path), mode="in_process")
        got, err = r.rc, r.err
        assert got == 1 and len(err.strip().splitlines()) == 1 and message in err, err

    check(tmp_path / "absent", "processed data folder not found")
    data = tmp_path / "d"
    shutil.copytree(tiny_shapes, data)
    (data / "val.h5").unlink()
    check(data, "val.h5 not found")
    (data / "val.h5").write_bytes(b"not hdf5")
    check(data, "val.h5: not a readable processed HDF5 file")
    shutil.copy(tiny_shapes / "val.h5", data / "val.h5")
    wm = json.loads((data / "word_map.json").read_text())
    (data / "word_map.json").write_text(json.dumps({**wm, "zebra": len(wm)}))
    check(data, "is not the word map train.h5 was built with")
    (data / "word_map.json").unlink()
    check(data, "word_map.json not found")


def test_resume_refuses_another_vocabulary_or_model(trained: Path, tiny_shapes: Path, tmp_path: Path) -> None:
    run_dir = trained
    # the same data with one more word: a consistent folder, but not the vocabulary the run was trained with
    data = tmp_path / "d"
    shutil.copytree(tiny_shapes, data)
    wm = json.loads((data / "word_map.json").read_text())
    text = json.dumps({**wm, "zebra": len(wm)})
    (data / "word_map.json").write_text(text)
    for split in ("train", "val"):
        with h5py.File(data / f"{split}.h5", "r+") as f:
            f.attrs["word_map_sha1"] = hashlib.sha1(text.encode()).hexdigest()
    r = run_script("train.py", "--resume", run_dir / "last.pt", "--data", data, "--out-dir", tmp_path,
                   mode="in_process")
    got, err = r.rc, r.err
    assert got == 1 and "trained with another vocabulary" in err and len(err.strip().splitlines()) == 1, err
    r = run_script("train.py", "--resume", run_dir / "last.pt", "--decoder-dim", "64", "--out-dir", tmp_path,
                   mode="in_process")
    got, err = r.rc, r.err
    assert got == 2 and "decoder_dim 32 (checkpoint) vs 64 (options)" in err, err
    # a new run into a folder that holds one
    r = run_script("train.py", *tiny_train_args(tiny_shapes, run_dir.parent, "--run", run_dir.name),
                   mode="in_process")
    got, err = r.rc, r.err
    assert got == 2 and "already holds a run" in err, err


def test_resume_refuses_another_model_config(trained: Path, tmp_path: Path) -> None:
    r = run_script("train.py", "--resume", trained / "last.pt", "--embed-dim", "32", "--out-dir", tmp_path)
    one_line(r, 2, f"--resume {trained / 'last.pt'}", "embed_dim 16 (checkpoint) vs 32 (options)")


def test_help_shows_every_field_with_its_comment(capsys, monkeypatch) -> None:
    """Every TrainConfig field is an option whose help is the field's comment (never empty), with its default."""
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps at the terminal's width, even inside a word
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    helps = field_help(train.TrainConfig)
    for f in dataclasses.fields(train.TrainConfig):
        assert "--" + f.name.replace("_", "-") in out
        assert helps.get(f.name), f"{f.name}: no comment to be its help"
        assert f"{' '.join(helps[f.name].split())} (default: {f.default})" in out, f.name
    assert "--deep-output, --no-deep-output" in out
    assert train.build_parser().parse_args(["--val-max-images", "none"]).val_max_images is None


# ----------------------------------------------------------------------------------------------
# SIGKILL


@pytest.fixture(scope="module")
def killed_training(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """train.py killed with SIGKILL twice, then resumed to the end.

    1. a fresh run, killed the moment last.pt appears (best.pt of the same epoch is being written);
    2. `--resume last.pt`, killed while a checkpoint is half-written (its temporary file exists and grows);
    3. `--resume last.pt` to the end.
    """
    out = tmp_path_factory.mktemp("killed")
    run_dir = out / "k"
    state: dict = {"run_dir": run_dir}
    # a fine-tuned encoder: its optimizer state is in the checkpoints too
    first = start_script("train.py", *tiny_train_args(tiny_shapes, out, "--fine-tune-encoder", "--epochs", "3", "--run",
                                                      "k"), log=out / "first")
    assert kill_when(first, (run_dir / "last.pt").exists), (out / "first.err").read_text()[-3000:]
    state["after_first"] = snapshot(run_dir)

    second = start_script("train.py", "--resume", run_dir / "last.pt", log=out / "second")

    def half_written() -> bool:
        return any(size(p) > 0 for p in temps(run_dir, second.pid, ("last.pt", "best.pt")))

    state["second_killed_mid_write"] = kill_when(second, half_written)
    state["second_err"] = (out / "second.err").read_text()
    state["after_second"] = snapshot(run_dir)
    state["second_temps"] = temps(run_dir, second.pid)
    state["third"] = run_script("train.py", "--resume", run_dir / "last.pt")
    state["after_third"] = snapshot(run_dir)
    return state


def snapshot(run_dir: Path) -> dict:
    """The run folder's file names, and what last.pt and best.pt hold (both read with load_checkpoint)."""
    snap: dict = {"files": sorted(p.name for p in run_dir.iterdir())}
    for name in ("last", "best"):
        path = run_dir / f"{name}.pt"
        ck = load_checkpoint(path) if path.exists() else None  # a half-written file would raise here
        snap[name] = None if ck is None else {"epoch": ck["epoch"], "best_epoch": ck.get("best_epoch"),
                                              "history": [h["epoch"] for h in ck["history"]]}
    return snap


FINAL_RUN_FILES = {"last.pt", "best.pt", "config.json", "metrics.jsonl", "curves.png"}


def test_sigkill_during_training_leaves_loadable_checkpoints_and_resume_finishes(killed_training) -> None:
    s = killed_training
    first, second, third = s["after_first"], s["after_second"], s["after_third"]
    # 1. killed right after last.pt appeared: last.pt is whole (epoch 1); best.pt is absent or whole
    assert first["last"]["epoch"] == 1 and first["best"] in (None, first["last"])
    # 2. killed while a checkpoint was half-written: that file is a hidden temporary; the final names
    # load (snapshot() read them with checkpoints.load_checkpoint) and hold complete epochs
    assert s["second_killed_mid_write"] and s["second_temps"], \
        "the resumed run was not caught writing a checkpoint\n" + s["second_err"][-3000:]
    last = second["last"]
    assert last["epoch"] in (1, 2) and last["history"] == list(range(1, last["epoch"] + 1))
    for snap in (first, second):
        assert {n for n in snap["files"] if not n.startswith(".")} <= FINAL_RUN_FILES, snap["files"]
        assert all(TEMP_NAME.match(n) for n in snap["files"] if n.startswith(".") and n != ".lock"), snap["files"]
    # 3. --resume goes on from there to the end
    assert s["third"].rc == 0, str(s["third"])
    assert third["last"]["epoch"] == 3 and third["last"]["history"] == [1, 2, 3]


def test_best_pt_is_never_behind_last_pt(killed_training) -> None:
    """Whenever last.pt exists, best.pt holds the epoch last.pt calls the best (or a later one)."""
    for when in ("after_first", "after_second", "after_third"):
        snap = killed_training[when]
        assert snap["best"] is not None, f"{when}: no best.pt, but last.pt says epoch {snap['last']['best_epoch']}"
        assert snap["best"]["epoch"] >= snap["last"]["best_epoch"], when


def test_training_removes_the_temporary_files_of_a_killed_run(killed_training) -> None:
    assert killed_training["third"].rc == 0
    left = temps(killed_training["run_dir"])
    assert not left, f"stale temporary files: {sorted(p.name for p in left)}"


def test_the_lock_of_a_killed_run_is_taken_over(killed_training) -> None:
    """SIGKILL leaves the run's .lock behind; the next train.py on the folder takes it over, saying so in one
    line, and removes it when it ends."""
    s = killed_training
    assert ".lock" in s["after_first"]["files"] and ".lock" in s["after_second"]["files"]
    lock = s["run_dir"] / ".lock"
    assert f"train.py: taking over the stale lock {lock} of pid " in s["second_err"]
    third = [line for line in s["third"].err.splitlines() if "stale lock" in line]
    assert len(third) == 1 and "which is no longer running" in third[0], s["third"].err[-2000:]
    assert ".lock" not in s["after_third"]["files"]


# ----------------------------------------------------------------------------------------------
# A run owns its folder; SIGTERM


def folder_bytes(folder: Path) -> dict[str, str]:
    """Every file of a folder (hidden ones too) -> the sha1 of its bytes."""
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def busy_run(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A real train.py on run "busy" (one DataLoader worker), a second train.py on the same run while the first
    trains, then SIGTERM to the first one's process group (its worker included), as a scheduler or systemd
    sends it."""
    out = tmp_path_factory.mktemp("busy")
    run_dir = out / "busy"
    args = tiny_train_args(tiny_shapes, out, "--epochs", "100", "--early-stop", "100", "--run", "busy", "--workers",
                           "1")
    first = start_script("train.py", *args)
    state: dict = {"run_dir": run_dir, "pid": first.pid}
    try:
        for line in first.stdout:  # epoch 1 is done: training is under way
            if line.startswith("epoch 1/100"):
                break
        state["lock"] = (run_dir / ".lock").read_text()
        state["before"] = folder_bytes(run_dir)
        state["second"] = run_script("train.py", *args)
        state["after_second"] = folder_bytes(run_dir)
        os.killpg(first.pid, signal.SIGTERM)
        _, state["err"] = first.communicate(timeout=60)
    finally:
        first.kill()
    state["rc"] = first.returncode
    state["files"] = sorted(p.name for p in run_dir.iterdir())
    return state


def test_a_second_run_on_a_busy_folder_is_refused(busy_run) -> None:
    """While a run trains, its folder holds .lock with its pid; a second train.py with the same --run is refused in
    one line naming that pid, and writes nothing there (config.json is still the first run's)."""
    s = busy_run
    assert s["lock"].split()[0] == str(s["pid"])
    one_line(s["second"], 1, f"{s['run_dir']}: the run folder is in use by another process (pid {s['pid']}",
             f"lock file {s['run_dir'] / '.lock'}")
    before, after = s["before"], s["after_second"]
    for name in ("config.json", ".lock"):
        assert after[name] == before[name], name


def test_sigterm_saves_last_and_says_how_to_resume(busy_run) -> None:
    """SIGTERM to the process group ends training like Ctrl-C: last.pt saved after the current step, one last
    line with the --resume command, exit status 143 (128 + SIGTERM), the lock removed. The DataLoader worker
    ignores SIGTERM: had it died, the main process would have failed instead of saving."""
    s = busy_run
    last = s["run_dir"] / "last.pt"
    assert s["rc"] == 143, s["err"][-3000:]
    assert "Traceback" not in s["err"]
    final = s["err"].strip().splitlines()[-1]
    assert final.startswith("train.py: terminated (SIGTERM) in epoch ") and f"--resume {last}" in final, final
    assert ".lock" not in s["files"]
    ck = load_resume(last, train.TrainConfig)  # every field of the training state is there and usable
    assert 1 <= ck["epoch"] < 100


@pytest.mark.parametrize("keep", [("best.pt", "config.json", "metrics.jsonl"), ("config.json",), ("metrics.jsonl",)])
def test_a_new_run_never_replaces_another_runs_files(trained: Path, tiny_shapes: Path, tmp_path: Path,
                                                      keep: tuple[str, ...]) -> None:
    """A folder with best.pt but no last.pt (or only a config.json, or a metrics.jsonl) holds a run: a new run there
    is refused in one line (exit 2) that says --overwrite, and every file stays as it was."""
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    for name in keep:
        shutil.copy(trained / name, run_dir / name)
    before = folder_bytes(run_dir)
    r = run_script("train.py", *tiny_train_args(tiny_shapes, tmp_path, "--run", "r"), mode="in_process")
    line = one_line(r, 2, f"{run_dir} already holds a run ({', '.join(keep)})", "--overwrite")
    assert "--resume" not in line  # there is no last.pt to continue from
    assert folder_bytes(run_dir) == before


def test_resume_into_another_runs_folder_is_refused(trained: Path, tmp_path: Path) -> None:
    shutil.copytree(trained, tmp_path / "a")
    shutil.copytree(trained, tmp_path / "b")
    before = folder_bytes(tmp_path / "b")
    r = run_script("train.py", "--resume", tmp_path / "a/last.pt", "--run", "b", "--out-dir", tmp_path,
                   mode="in_process")
    line = one_line(r, 2, f"{tmp_path / 'b'} already holds another run", "resume", "in its own folder")
    assert "--overwrite" not in line  # which would delete run b to go on with run a
    assert folder_bytes(tmp_path / "b") == before


def test_checkpoints_with_removed_options_resume_and_init(trained: Path, tiny_shapes: Path, tmp_path: Path) -> None:
    """A run saved with --scst-bleu-weight, --scst-entropy-weight or --annotation-dropout (options that are gone)
    resumes and starts a new run with --init-from: those saved fields are not read, and neither is a stopped
    epoch's sum of a statistic the objective no longer reports."""
    copy_dir = tmp_path / "old"
    shutil.copytree(trained, copy_dir)
    for name in ("last.pt", "best.pt"):
        ck = torch.load(copy_dir / name, weights_only=True)
        ck["train_config"].update(scst_bleu_weight=0.5, scst_entropy_weight=0.02, annotation_dropout=0.3)
        ck["model_config"]["annotation_dropout"] = 0.3
        if name == "last.pt":  # stopped after step 1 of epoch 2
            ck["step_in_epoch"], ck["partial_epoch"] = 1, {"loss": 50.0, "ce": 48.0, "dsr": 20.0, "entropy": 30.0,
                                                           "n": 16, "seconds": 0.5}
        torch.save(ck, copy_dir / name)
    r = run_script("train.py", "--resume", copy_dir / "last.pt", "--epochs", "2", mode="in_process")
    assert r.rc == 0, str(r)
    ck = load_checkpoint(copy_dir / "last.pt")
    assert ck["epoch"] == 2 and "scst_bleu_weight" not in ck["train_config"]
    assert "annotation_dropout" not in ck["train_config"] and "annotation_dropout" not in ck["model_config"]
    assert {"train_loss", "train_ce", "train_dsr"} <= ck["history"][1].keys()
    assert "train_entropy" not in ck["history"][1]
    r = run_script("train.py", *tiny_train_args(tiny_shapes, tmp_path, "--init-from", copy_dir / "best.pt",
                                                "--run", "new", "--scst", "--scst-samples", "2"), mode="in_process")
    assert r.rc == 0, str(r)


def test_a_run_from_before_hard_attention_resumes_as_soft(trained: Path, tmp_path: Path) -> None:
    """A checkpoint without the attention fields (model and train config) and without an objective state, as every
    run written before hard attention, resumes as the soft run it was."""
    copy_dir = tmp_path / "old"
    shutil.copytree(trained, copy_dir)
    ck = torch.load(copy_dir / "last.pt", weights_only=True)
    for key in ("attention", "hard_expected_p", "hard_entropy_weight"):
        ck["train_config"].pop(key)
    del ck["model_config"]["attention"], ck["objective_state"]
    torch.save(ck, copy_dir / "last.pt")
    r = run_script("train.py", "--resume", copy_dir / "last.pt", "--epochs", "2", mode="in_process")
    assert r.rc == 0, str(r)
    ck = load_checkpoint(copy_dir / "last.pt")
    assert ck["epoch"] == 2 and ck["model_config"]["attention"] == ck["train_config"]["attention"] == "soft"
    assert ck["objective_state"] == {} and "train_dsr" in ck["history"][1]


def test_resume_from_a_copied_run_writes_into_the_copy(trained: Path, tmp_path: Path) -> None:
    """A copy (or a move) of a run folder goes on in that folder, not in the folder its config names, which
    keeps its files; one line says where."""
    before = folder_bytes(trained)
    copy_dir = tmp_path / "copy"
    shutil.copytree(trained, copy_dir)
    r = run_script("train.py", "--resume", copy_dir / "last.pt", "--epochs", "2")
    assert r.rc == 0, str(r)
    assert f"writing into {copy_dir}" in r.out
    assert load_checkpoint(copy_dir / "last.pt")["epoch"] == 2
    assert len((copy_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((copy_dir / "config.json").read_text())["out_dir"] == str(tmp_path)
    assert folder_bytes(trained) == before


@pytest.mark.parametrize("extra, needle", [
    (("--group-captions", "--captions-per-image", "1000"), "--captions-per-image 1000: the images of --data "
                                                           "{data} have 5 captions each"),
    (("--val-max-images", "1000"), "--val-max-images 1000: the val split of --data {data} holds 16 images"),
    (("--scst-samples", "3"), "--scst-samples only applies with --scst"),
    (("--lr-schedule", "cosine", "--lr-patience", "2"), "--lr-patience only applies with --lr-schedule plateau"),
    (("--encoder-lr", "1e-3"), "--encoder-lr only applies with --fine-tune-encoder"),
    (("--scst", "--init-from", "X", "--label-smoothing", "0.1"), "--label-smoothing smooths a cross-entropy loss: "
                                                                   "under --scst it needs --scst-ce-weight > 0"),
])
def test_an_option_that_cannot_mean_what_it_says_is_refused(tiny_shapes: Path, tmp_path: Path, extra: tuple,
                                                           needle: str) -> None:
    """Options that would be recorded in the run and do something else (or nothing): one line, exit 2, no run."""
    r = run_script("train.py", *tiny_train_args(tiny_shapes, tmp_path / "out", *extra), mode="in_process")
    one_line(r, 2, needle.format(data=tiny_shapes))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.json"))


@pytest.mark.parametrize("extra, needle", [
    (("--lr-schedule", "cosine"), "--lr-schedule cosine: the run in {last} was trained with plateau"),
    (("--epochs", "2"), "--epochs 2: the run in {last} has already trained 3 epochs"),
    (("--init-from", "{last}"), "--init-from starts a new run; --resume continues one"),
    (("--ema-decay", "0.99"), "--ema-decay 0.99: the run in {last} was trained without a weight average"),
])
def test_a_resume_option_that_cannot_mean_what_it_says_is_refused(trained: Path, tmp_path: Path, extra: tuple,
                                                                 needle: str) -> None:
    """Resuming with another schedule (a finished cosine run would go on at its last rate, ~0), with fewer epochs
    than done, or with --init-from: one line, exit 2, the run's files as they were."""
    run_dir = tmp_path / "r"
    shutil.copytree(trained, run_dir)
    last = run_dir / "last.pt"
    ck = torch.load(last, weights_only=True)
    ck["epoch"] = ck["train_config"]["epochs"] = 3  # as if a 3-epoch run had finished
    torch.save(ck, last)
    before = folder_bytes(run_dir)
    r = run_script("train.py", "--resume", last, *[e.format(last=last) for e in extra], mode="in_process")
    one_line(r, 2, needle.format(last=last))
    assert folder_bytes(run_dir) == before


def test_sigterm_during_the_feature_cache_build_is_one_line_and_leaves_nothing(tiny_shapes: Path, tmp_path: Path,
                                                                              monkeypatch) -> None:
    """SIGTERM while --cache-features computes the cache: the temporary cache file is removed, the run folder
    unlocked, one line, exit 143 (as SIGTERM during training)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_shapes, data)
    real, calls = feature_cache.to_model_input, []

    def then_sigterm(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGTERM)
        return real(*args, **kw)

    def not_here(signum, frame):  # before the fix SIGTERM killed the process; here it must not kill pytest
        raise AssertionError("SIGTERM reached the default handler")

    monkeypatch.setattr(feature_cache, "to_model_input", then_sigterm)
    old = signal.signal(signal.SIGTERM, not_here)
    try:
        r = run_script("train.py", *tiny_train_args(data, tmp_path / "out", "--cache-features", "--run", "c",
                                                    "--batch-size", "8"), mode="in_process")
    finally:
        signal.signal(signal.SIGTERM, old)
    one_line(r, 143, "train.py: terminated (SIGTERM)")
    assert sorted(p.name for p in data.iterdir()) == sorted(p.name for p in tiny_shapes.iterdir())
    assert list((tmp_path / "out" / "c").iterdir()) == []  # no lock, no config.json


def test_overwrite_removes_the_old_runs_files_first(trained: Path, tiny_shapes: Path, tmp_path: Path,
                                                   monkeypatch) -> None:
    """--overwrite: the old run's best.pt never passes for the new run's, even when the new run stops before it has
    a best epoch (here: Ctrl-C at step 2 of epoch 1)."""
    run_dir = tmp_path / "r"
    shutil.copytree(trained, run_dir)
    (run_dir / "last.pt").unlink()  # the case that used to be overwritten silently
    with sigint_after_step(monkeypatch, 2), pytest.raises(train.Interrupted, match="epoch 1 after step 2/"):
        train.train(tiny_train_config(tiny_shapes, tmp_path, run="r", overwrite=True, seed=11), progress=False)
    files = sorted(p.name for p in run_dir.iterdir())
    assert files == ["config.json", "last.pt", "metrics.jsonl"], files
    ck = load_checkpoint(run_dir / "last.pt")
    assert (ck["epoch"], ck["step_in_epoch"], ck["train_config"]["seed"]) == (0, 2, 11)
    assert json.loads((run_dir / "config.json").read_text())["seed"] == 11
    assert (run_dir / "metrics.jsonl").read_text() == ""


def test_resume_does_not_inherit_overwrite(trained: Path) -> None:
    ck = load_checkpoint(trained / "last.pt")
    ck["train_config"]["overwrite"] = True
    assert not train.config_for_resume(ck, {}).overwrite
    assert train.config_for_resume(ck, {"overwrite": True}).overwrite


# ----------------------------------------------------------------------------------------------
# Resume and --init-from check everything evaluate.py checks, and leave the checkpoint as it was


@pytest.fixture(scope="module")
def size64(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_shapes, its training splits saying 64 px images (a folder built with --image-size 64)."""
    data = tmp_path_factory.mktemp("size64") / "d"
    shutil.copytree(tiny_shapes, data)
    for split in ("train", "val"):
        with h5py.File(data / f"{split}.h5", "r+") as f:
            f.attrs["image_size"] = 64
    return data


@pytest.mark.parametrize("option", ["--resume", "--init-from"])
@pytest.mark.parametrize("data, message", [("size64", "was trained on 32 px images but --data {data} holds 64 px"),
                                           ("other_vocab", "trained with another vocabulary")])
def test_resume_or_init_onto_other_data_is_refused_and_touches_nothing(trained: Path, datasets, size64: Path,
                                                                       tmp_path: Path, option: str, data: str,
                                                                       message: str) -> None:
    folder = size64 if data == "size64" else datasets[data]
    run_dir = tmp_path / "r"
    shutil.copytree(trained, run_dir)
    before = folder_bytes(run_dir)
    ckpt = run_dir / ("last.pt" if option == "--resume" else "best.pt")
    if option == "--resume":
        argv = ["--resume", ckpt, "--data", folder, "--out-dir", tmp_path]
    else:
        argv = tiny_train_args(folder, tmp_path, "--init-from", ckpt, "--run", "new")
    one_line(run_script("train.py", *argv, mode="in_process"), 1, f"{option} {ckpt}", message.format(data=folder))
    assert folder_bytes(run_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no new run folder either


def test_a_saved_option_out_of_range_is_named_and_can_be_overridden(last_ckpt: dict, tmp_path: Path) -> None:
    """A saved train config whose value is now out of range (a 25-digit seed, 64 workers) is refused in one line
    naming the checkpoint and the option that overrides it, exit 1 (bad input, not a bad option), before anything is
    written; the option given on the command line replaces it."""
    ck = copy.deepcopy(last_ckpt)
    ck["train_config"].update(seed=10**25, workers=64)
    torch.save(ck, path := tmp_path / "old.pt")
    out = tmp_path / "out"
    r = run_script("train.py", "--resume", path, "--out-dir", out, "--seed", "3", mode="in_process")
    one_line(r, 1, f"--resume {path}: its train_config's workers must be <= 32, got 64", "give --workers")
    assert not out.exists()
    assert train.config_for_resume(ck, {"seed": 3, "workers": 0}).validate() is None
