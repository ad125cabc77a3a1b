"""How a training run starts: the checks of what it starts from (the checkpoint --resume reads, the --init-from
one, this command line's options against them and the data), then building it: the model, the optimizer and its
schedule, the data loaders and the objective. Nothing is written before the checks pass.

Also train.py --check-device: the model these options build, on the cpu and on a device.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Subset

from all_models import MODEL_LIMITS, Captioner, ModelConfig
from checkpoints import check_fits, checkpoint_config, load_checkpoint, with_packaged_encoder
from cli import EXIT_BAD_OPTION, UserError, cut, field_type_problem, pick_device, short_repr
from feature_cache import build_split_caches
from files import atomic_write_text
from optim import Plateau, Rates, WeightAverage, make_optimizer, make_schedule
from pytorch_dataset_class import CaptionDataset, DataInfo, EpochSampler, ImageDataset, ignore_stop_signals, open_data
from run import Loaders, Run, RunState, TrainOptions, dsr_weight
from run_folder import open_tensorboard, write_metrics
from runtime import allow_tf32, check_device, compile_model, make_autocast, rng_state_problem, seed_everything
from scst import HardConfig, ScstConfig, make_objective

# ----------------------------------------------------------------------------------------------
# Resuming: the checks of the checkpoint that --resume reads, and of the options against it


def load_resume(path: str | os.PathLike, options: type) -> dict:
    """A training checkpoint for --resume, every field of its training state checked, its train config's against
    the dataclass `options` (train.py's TrainConfig; fields it no longer has are not read); a problem is one line
    naming the file."""
    ckpt = load_checkpoint(path, option="--resume")
    missing = [k for k in ("train_config", "optimizer_state", "epoch", "rng_state") if k not in ckpt]
    if missing:
        raise UserError(f"--resume {path}: not a training checkpoint (it has no {', '.join(missing)}); "
                        "resume from a run's last.pt")
    raw = ckpt["train_config"]
    problem = None if isinstance(raw, dict) and raw else \
        f"its train_config is not a non-empty dict but {short_repr(raw)}"
    problem = problem or _position_problem(ckpt) or _objective_problem(ckpt) or _average_problem(ckpt) \
        or _optimizer_problem(ckpt)
    if problem:
        raise UserError(f"--resume {path}: {problem}; {RESUME_FIX}")
    problem = field_type_problem(options, ckpt["train_config"])
    if problem:
        raise UserError(f"--resume {path}: its train_config: {problem}; {RESUME_FIX}")
    return ckpt


RESUME_FIX = "resume from a run's last.pt as train.py wrote it"
HISTORY_KEYS = ("epoch", "train_loss", "val_loss", "val_ce", "val_bleu4")  # what plot_curves reads
PARTIAL_KEYS = ("loss", "n", "seconds")  # the running sums of an epoch stopped part-way (and the step's statistics)


def _position_problem(ckpt: dict) -> str | None:
    """The epoch, step, best score, history and the sums of a stopped epoch."""
    for key in ("epoch", "step_in_epoch", "best_epoch", "epochs_since_improvement"):
        value = ckpt.get(key)
        if (value is not None or key == "epoch") and (type(value) is not int or value < 0):
            return f"its {key} must be an integer >= 0, got {short_repr(value)}"
    best = ckpt.get("best_score")
    if best is not None and (type(best) not in (int, float) or math.isnan(best)):
        return f"its best_score must be a number, got {short_repr(best)}"

    def numbers(d: object, keys: tuple[str, ...]) -> bool:
        return isinstance(d, dict) and all(type(d.get(k)) in (int, float) for k in keys)

    history, partial = ckpt.get("history") or [], ckpt.get("partial_epoch")
    if not isinstance(history, list) or not all(numbers(h, HISTORY_KEYS) for h in history):
        return f"its history must be a list of per-epoch metrics ({', '.join(HISTORY_KEYS)})"
    if partial is not None and not (numbers(partial, PARTIAL_KEYS) and numbers(partial, tuple(partial))):
        return f"its partial_epoch must be the running sums of a stopped epoch, got {short_repr(partial)}"
    return None


def _objective_problem(ckpt: dict) -> str | None:
    """The objective's run state (hard attention's moving baseline): a dict of numbers or None, when there is one."""
    state = ckpt.get("objective_state")
    if state is None or (isinstance(state, dict) and all(type(v) in (int, float, type(None)) for v in state.values())):
        return None
    return f"its objective_state must be a dict of numbers, got {short_repr(state)}"


def _average_problem(ckpt: dict) -> str | None:
    """With --ema-decay, model_state is the weight average: the trained weights and the count of updates too."""
    if not ckpt["train_config"].get("ema_decay"):
        return None
    updates, trained = ckpt.get("ema_updates"), ckpt.get("trained_state")
    if type(updates) is not int or updates < 0:
        return f"its ema_updates must be an integer >= 0, got {short_repr(updates)}"
    if not isinstance(trained, dict) or set(trained) != set(ckpt["model_state"]):
        return "its trained_state (the weights --ema-decay averages) is missing or does not fit its model_state"
    return None


def _optimizer_problem(ckpt: dict) -> str | None:
    """The RNG states, tried; the optimizer and (--lr-schedule plateau) scheduler states, loaded into a model built
    on the meta device (no memory), as Run.restore will load them into the real one."""
    problem = rng_state_problem(ckpt["rng_state"])
    if problem:
        return f"its rng_state cannot be restored ({problem})"
    for key in ("scheduler_state", "scaler_state"):
        if not isinstance(ckpt.get(key), (dict, type(None))):
            return f"its {key} must be a dict, got {short_repr(ckpt.get(key))}"
    with torch.device("meta"):
        model = Captioner(checkpoint_config(ckpt))
    optimizer = make_optimizer(model, 1.0, 1.0)  # its groups are what matters: load_state_dict sets the rates
    try:
        optimizer.load_state_dict(ckpt["optimizer_state"])
        if ckpt["train_config"].get("lr_schedule", "plateau") == "plateau":  # the one schedule with a state
            schedule = Plateau(optimizer, decay=0.8, patience=8)  # the rule's values: Run.restore keeps the options'
            schedule.load_state_dict(ckpt.get("scheduler_state"))  # as Run.restore loads it
            schedule.end_epoch(0.0)  # reads the fields that the epochs to come read
    except Exception as err:  # KeyError, ValueError, TypeError...: torch checks little and says it in many ways
        return (f"its optimizer or scheduler state does not fit its model ({type(err).__name__}: "
                f"{cut(str(err), 120)})")
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if name != "step" and not (isinstance(value, torch.Tensor) and value.shape == p.shape):
                    return f"its optimizer_state's {name} of a {tuple(p.shape)} weight is {short_repr(value)}"
    return None


def check_starts(cfg: TrainOptions, data: DataInfo, ckpt: dict | None) -> dict | None:
    """Check what the run starts from against these options and this data before anything is written: the
    --resume checkpoint `ckpt` (from load_resume), or the --init-from one, loaded here and returned."""
    model_cfg = make_model_config(cfg, vocab_size_of(data))
    check_options_fit(cfg, data, ckpt)
    fit = dict(word_map=data.vocab.word_map, word_map_sha1=data.vocab.sha1, image_size=data.image_size,
               model_cfg=model_cfg)
    if ckpt is not None:
        check_fits(ckpt, cfg.resume, "--resume", data.folder, **fit, fix="resume with the data it was trained on")
        return None
    if not cfg.init_from:
        return None
    init = load_checkpoint(cfg.init_from, option="--init-from")
    check_fits(init, cfg.init_from, "--init-from", data.folder, **fit, ignore=("fine_tune_encoder",))
    return init


def check_options_fit(cfg: TrainOptions, data: DataInfo, ckpt: dict | None) -> None:
    """Refuse (one line, exit 2) before anything is written an option that cannot mean what it says with this
    data or this resumed run, rather than train on something else than it records. (--val-max-images is checked
    against the val split where make_loaders opens it.)"""
    if cfg.captions_per_image > data.captions_per_image:
        n = data.captions_per_image
        raise UserError(f"--captions-per-image {cfg.captions_per_image}: the images of --data {data.folder} have {n} "
                        f"captions each (pass at most {n}, or 0 for all)", EXIT_BAD_OPTION)
    if ckpt is None:
        return
    saved = ckpt["train_config"]
    done = int(ckpt["epoch"])
    if cfg.epochs < done:
        raise UserError(f"--epochs {cfg.epochs}: the run in {cfg.resume} has already trained {done} epochs (pass "
                        f"--epochs N with N > {done} to go on)", EXIT_BAD_OPTION)
    if bool(cfg.ema_decay) != bool(saved.get("ema_decay")):
        was = "with" if saved.get("ema_decay") else "without"
        raise UserError(f"--ema-decay {cfg.ema_decay}: the run in {cfg.resume} was trained {was} a weight average; "
                        f"resume it {was} one, or start a new run from it with --init-from {cfg.resume}",
                        EXIT_BAD_OPTION)
    before = saved.get("lr_schedule", "plateau")
    if cfg.lr_schedule != before:
        # cosine leaves its rates where its curve was (near 0 at its end): another schedule would go on from there
        raise UserError(f"--lr-schedule {cfg.lr_schedule}: the run in {cfg.resume} was trained with {before}, which "
                        f"set its learning rates; resume it with {before}, or start a new run from it with "
                        f"--init-from {cfg.resume}", EXIT_BAD_OPTION)


# ----------------------------------------------------------------------------------------------
# Building a run: model, optimizer, schedule, loaders, objective


MODEL_FIELDS = ("encoder", "encoded_size", "fine_tune_encoder", "embed_dim", "attention_dim", "decoder_dim",
                "dropout", "deep_output", "position", "attention")  # TrainOptions' fields of ModelConfig


def vocab_size_of(data: DataInfo) -> int:
    """The size of the data's vocabulary, checked to be one a model can have: a larger one is the data's fault (its
    word_map.json), not an option's."""
    if len(data.vocab) > MODEL_LIMITS["vocab_size"]:
        raise UserError(f"--data {data.folder}: its word_map.json holds {len(data.vocab):,} words, more than a model "
                        f"takes ({MODEL_LIMITS['vocab_size']:,}); rebuild the folder with make_dataset.py and a "
                        "higher --min-word-freq")
    return len(data.vocab)


def make_model_config(cfg: TrainOptions, vocab_size: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, **{k: getattr(cfg, k) for k in MODEL_FIELDS})


def scst_config(cfg: TrainOptions) -> ScstConfig | None:
    """The self-critical loss's options under --scst, else None (cross-entropy)."""
    if not cfg.scst:
        return None
    return ScstConfig(samples=cfg.scst_samples, baseline=cfg.scst_baseline, max_len=cfg.max_decode_len,
                      dropout=cfg.scst_dropout, ce_weight=cfg.scst_ce_weight, alpha_c=dsr_weight(cfg),
                      label_smoothing=cfg.label_smoothing)


# ----------------------------------------------------------------------------------------------
# Building a run: model, optimizer, schedule, loaders, objective


def new_model(model_cfg: ModelConfig, encoder_weights: str) -> Captioner:
    """The model, its encoder's weights loaded; weights that do not load (no download, no such file) are one line."""
    try:
        return Captioner(model_cfg, encoder_weights=encoder_weights)
    except ValueError as err:
        raise UserError(str(err)) from None


def build_run(cfg: TrainOptions, data: DataInfo, run_dir: Path, rank: int, world: int, device: torch.device,
              resuming: bool, init: dict | None = None) -> Run:
    """Model, optimizer and schedule from the seed. The same seed on every rank gives the same weights.
    `init`: the --init-from checkpoint (checked already), whose weights the model starts from."""
    model_cfg = make_model_config(cfg, len(data.vocab))
    seed_everything(cfg.seed)
    # Resumed or initialised weights come from a checkpoint: never load pretrained ones for that.
    model = new_model(model_cfg, "none" if resuming or init is not None else cfg.encoder_weights).to(device)
    if init is not None:  # only fine_tune_encoder may differ: the usual second stage
        src_cfg = dataclasses.replace(model_cfg, fine_tune_encoder=bool(init["model_config"].get("fine_tune_encoder")))
        model.load_state_dict(with_packaged_encoder(src_cfg, init["model_state"]))
    optimizer = make_optimizer(model, cfg.decoder_lr, cfg.encoder_lr)
    schedule = make_schedule(cfg.lr_schedule, optimizer, Rates(cfg.decoder_lr, cfg.encoder_lr), epochs=cfg.epochs,
                             decay=cfg.lr_decay, patience=cfg.lr_patience)
    autocast_ctx, scaler, cache_autocast = make_autocast(device, cfg.amp, say=rank == 0, cache=cfg.cache_features)
    allow_tf32(device)
    run = Run(cfg, model_cfg, data, run_dir, device, rank, world, model, optimizer, schedule, autocast_ctx, scaler,
              cache_autocast)
    if cfg.ema_decay > 0:
        run.ema = WeightAverage(model, cfg.ema_decay)  # (an --init-from model is its start)
    return run


VAL_BATCH_CACHED = 64  # photos a validation batch holds when the annotations come from the feature cache


def make_loaders(run: Run, show: bool) -> Loaders:
    """Cached annotations when asked for (built here by rank 0), else images through the CNN."""
    cfg, folder = run.cfg, run.data.folder
    train_feats = val_feats = None
    if cfg.cache_features:
        train_feats, val_feats = build_split_caches(
            run.model.encoder, folder, run.model_cfg, cfg.encoder_weights, batch_size=cfg.batch_size,
            workers=cfg.workers, autocast=run.cache_autocast, build=run.master, progress=show)
        if run.ddp:
            torch.distributed.barrier()
    dataset_class = ImageDataset if cfg.group_captions or cfg.scst else CaptionDataset  # --scst: images
    train_ds = dataset_class(folder / "train.h5", feature_path=train_feats)
    sampler = EpochSampler(train_ds, num_replicas=run.world, rank=run.rank, shuffle=True, seed=cfg.seed)
    # Own generators: making a DataLoader iterator draws a seed for its workers, which must not come from
    # the global RNG (dropout's), or a run resumed mid-epoch would see other dropout masks.
    pin = run.device.type == "cuda"
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                        pin_memory=pin, persistent_workers=cfg.workers > 0,
                        generator=torch.Generator().manual_seed(cfg.seed), worker_init_fn=ignore_stop_signals)
    val_loader, references = None, []
    if run.master:
        val_ds = ImageDataset(folder / "val.h5", feature_path=val_feats)
        if cfg.val_max_images is not None and cfg.val_max_images > len(val_ds):  # before the run writes a file
            raise UserError(f"--val-max-images {cfg.val_max_images}: the val split of --data {folder} holds "
                            f"{len(val_ds)} images (pass at most {len(val_ds)}, or none for all)", EXIT_BAD_OPTION)
        n_val = len(val_ds) if cfg.val_max_images is None else cfg.val_max_images
        # Cached annotations are small, and decoding many photos at once shares each step's fixed costs: 64
        # photos a batch validated Flickr8k's 1,000 in 20 s against 25-30 s at 16 (greedy captions the same).
        val_batch = max(cfg.batch_size, VAL_BATCH_CACHED) if cfg.cache_features else cfg.batch_size
        val_loader = DataLoader(Subset(val_ds, range(n_val)), batch_size=val_batch, shuffle=False,
                                num_workers=cfg.workers, pin_memory=pin,
                                generator=torch.Generator().manual_seed(cfg.seed), worker_init_fn=ignore_stop_signals)
        references = val_ds.references()[:n_val]
    return Loaders(loader, sampler, math.ceil(sampler.num_samples / cfg.batch_size), val_loader, references)


def start_run(cfg: TrainOptions, data: DataInfo, run_dir: Path, ckpt: dict | None, init: dict | None, rank: int,
              world: int, device: torch.device, show: bool) -> tuple[Run, RunState]:
    """The run and its state, once its folder is settled (by rank 0): from `ckpt` when resuming, from `init`'s
    weights with --init-from. Its files are written once the model and the data are ready: a run that fails
    before (weights that do not download, a feature cache that cannot be built) leaves no config.json that would
    pass for a run."""
    run = build_run(cfg, data, run_dir, rank, world, device, resuming=ckpt is not None, init=init)
    state = run.restore(ckpt) if ckpt is not None else RunState()
    if ckpt is not None and run.master:
        where = f"epoch {state.epoch + 1}, step {state.step + 1}" if state.step else f"epoch {state.epoch + 1}"
        print(f"resuming {cfg.resume} at {where}, writing into {run_dir}", flush=True)
    if run.ddp and ckpt is None:
        torch.manual_seed(cfg.seed + rank)  # different dropout masks on each rank
    run.loaders = make_loaders(run, show)
    hard = HardConfig(cfg.hard_expected_p, cfg.hard_entropy_weight) if cfg.attention == "hard" else None
    run.objective = make_objective(scst_config(cfg), alpha_c=dsr_weight(cfg), label_smoothing=cfg.label_smoothing,
                                   model=run.model, vocab=data.vocab, train_split=run.loaders.train.dataset, hard=hard,
                                   autocast=run.autocast)
    if ckpt is not None:  # its run state (hard attention's moving baseline), as Run.checkpoint saved it
        run.objective.load_state_dict(ckpt.get("objective_state") or {})
    if cfg.compile:
        compile_model(run.model)
    run.train_model = DDP(run.model, device_ids=[device.index] if device.type == "cuda" else None) if run.ddp \
        else run.model
    if run.master:
        atomic_write_text(run_dir / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        write_metrics(run_dir, state.history)
        if state.epoch >= cfg.epochs:
            print(f"nothing to do: {state.epoch} epochs already trained (pass --epochs N with N > {state.epoch} to "
                  "go on)")
        if cfg.tensorboard:  # last: a run that fails to start leaves no event file (train.py closes the writer)
            run.tb = open_tensorboard(run_dir, run.loaders.val, data.folder / "val.h5", run.loaders.references,
                                      data.vocab, steps_per_epoch=run.steps, epoch=state.epoch, step=state.step,
                                      max_decode_len=cfg.max_decode_len, autocast=run.autocast)
    return run, state


def check_device_for(cfg: TrainOptions, device_name: str) -> bool:
    """runtime.check_device on the model these options train (dropout off) and the first batch of the training
    split (train.py --check-device DEV)."""
    device = pick_device(device_name)
    data = open_data(cfg.data)
    seed_everything(cfg.seed)
    model_cfg = dataclasses.replace(make_model_config(cfg, vocab_size_of(data)), dropout=0.0)
    model = new_model(model_cfg, cfg.encoder_weights)
    ds = CaptionDataset(data.folder / "train.h5")
    batch = next(iter(DataLoader(ds, batch_size=min(cfg.batch_size, len(ds)), shuffle=False)))
    return check_device(model, batch, device, rates=Rates(cfg.decoder_lr, cfg.encoder_lr), alpha_c=cfg.alpha_c)


