"""Image-classification training: any timm model (CycleMLP or a peer) on a built-in dataset or
an ImageNet-layout folder, one process or many (``torchrun``).

Python use::

    from cyclemlp.training.train import TrainConfig, train

    result = train(TrainConfig.from_recipe("fashion-mnist", epochs=2,
                                           model_kwargs=dict(stepsize=7, pattern="paper")))
    print(result.top1, result.weights)

    result = train(resume=result.output_dir, epochs=4)   # continue it, extended to 4 epochs

    # a ready-made module (e.g. an ablation variant): called as factory(num_classes=, in_chans=)
    result = train(TrainConfig.from_recipe("fashion-mnist", epochs=1), model_factory=my_builder)

The configuration and the recipes are in :mod:`cyclemlp.training.config`; what a run folder holds
and how a resumed run is kept one run, in :mod:`cyclemlp.training.record`. The loop itself is
:func:`train_one_epoch`: forward, NaN/Inf guard, backward (gradient accumulation, DDP ``no_sync``
on the micro-steps), clipping, optimizer and EMA steps, all on one screen. Each epoch ends with an
evaluation, an atomic checkpoint (``last.pth``, ``best.pth``) and a metrics row; the run ends with
``curves.png`` and ``model.safetensors``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import timm
import torch
from safetensors import safe_open
from timm.data import Mixup, resolve_data_config
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..data import (
    CachedLoader,
    build_dataset,
    build_loader,
    build_sampler,
    build_transform,
    cache_images,
    cacheable,
    default_splits,
    native_in_chans,
    static_part,
)
from ..io import CheckpointError, save_weights
from ..models.factory import create_model, load_weights, model_args
from . import engine, record
from .config import RECIPES, TrainConfig, jsonable, recipe, resume_config
from .evaluate import evaluate

__all__ = ["RECIPES", "TrainConfig", "TrainResult", "build_model", "recipe", "train", "train_one_epoch"]

logger = logging.getLogger(__name__)

# timm optimizer names whose torch class has a fused step (``fused=True``)
FUSED_OPTIMIZERS = frozenset({"adam", "adamw"})
# metrics columns that measure time, not the result (they differ between a run and its resumption)
TIMING_COLUMNS = ("train_img_per_s", "epoch_s", "cpu_s", "time_s")


@dataclass
class TrainResult:
    """What a finished run produced (accuracies in percent)."""

    output_dir: Path
    epochs: int
    top1: float
    top5: float
    loss: float
    best_top1: float
    best_epoch: int
    train_img_per_s: float
    wall_s: float
    params: int
    weights: Path | None
    last_checkpoint: Path
    best_checkpoint: Path
    history: list[dict[str, Any]]
    config: dict[str, Any]
    trained_epochs: int = 0  # epochs this call trained (0: the run was complete)


# --- building blocks ------------------------------------------------------------------------------


def build_model(
    config: TrainConfig, num_classes: int, in_chans: int, model_factory: Callable[..., nn.Module] | None = None
) -> nn.Module:
    """The model to train: ``model_factory(num_classes=, in_chans=)`` if given, else
    ``timm.create_model(config.model, ...)`` with :func:`model_kwargs`."""
    if model_factory is not None:
        return model_factory(num_classes=num_classes, in_chans=in_chans)
    return create_model(config.model, pretrained=config.pretrained, num_classes=num_classes, in_chans=in_chans,
                        **model_kwargs(config))


def model_kwargs(config: TrainConfig) -> dict[str, Any]:
    """The constructor arguments the config gives the model (besides classes and channels)."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.model_kwargs.items()}
    kwargs.setdefault("drop_rate", config.drop_rate)
    if config.drop_path is not None:
        kwargs.setdefault("drop_path_rate", config.drop_path)
    return kwargs


def _data_config(config: TrainConfig, model: nn.Module, dataset: Any, in_chans: int) -> dict[str, Any]:
    """Input size, interpolation, crop and normalisation: the config's values, else the data's
    (built-in datasets) or the model's (image folders)."""
    resolved = resolve_data_config({}, model=model)
    if getattr(dataset, "native_size", None):
        mean, std = dataset.mean * in_chans, dataset.std * in_chans
        resolved.update(input_size=(in_chans, dataset.native_size, dataset.native_size), crop_pct=1.0,
                        mean=mean, std=std)
    size = config.img_size or resolved["input_size"][-1]
    out = dict(
        input_size=(in_chans, size, size),
        interpolation=config.interpolation or resolved["interpolation"],
        crop_pct=config.crop_pct if config.crop_pct is not None else resolved["crop_pct"],
        mean=tuple(config.mean) if config.mean else tuple(resolved["mean"]),
        std=tuple(config.std) if config.std else tuple(resolved["std"]),
    )
    if len(out["mean"]) != in_chans or len(out["std"]) != in_chans:
        if len(out["mean"]) == 3 and in_chans == 1:  # an RGB model default on grey input
            out["mean"], out["std"] = (sum(out["mean"]) / 3,), (sum(out["std"]) / 3,)
        else:
            raise ValueError(f"mean/std need {in_chans} value(s); got {out['mean']} / {out['std']}")
    return out


def _new_output_dir(config: TrainConfig) -> Path:
    if config.output:
        out = Path(config.output)
        record.check_new_run_folder(out)
        return out
    data = config.dataset or Path(str(config.data)).name
    base = Path("runs") / f"{config.model}-{data}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def _autocast(config: TrainConfig, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    if not config.amp:
        return contextlib.nullcontext
    dtype = torch.bfloat16 if (config.amp_dtype == "bfloat16" or device.type != "cuda") else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def _versions() -> dict[str, str]:
    import cyclemlp

    return {"cyclemlp": cyclemlp.__version__, "torch": str(torch.__version__), "timm": str(timm.__version__)}


# --- one epoch ------------------------------------------------------------------------------------


def train_one_epoch(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    scheduler: Any,
    epoch: int,
    num_updates: int,
    dist: engine.DistInfo,
    *,
    accum_steps: int = 1,
    updates_per_epoch: int,
    sched_on_updates: bool = False,
    mixup: Mixup | None = None,
    scaler: torch.amp.GradScaler | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    clip_grad: float | None = None,
    ema: ModelEmaV3 | None = None,
    channels_last: bool = False,
    last_checkpoint: Path | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Train for one epoch; returns ``train_loss`` (mean over images), ``train_img_per_s``,
    ``skipped`` (unreadable images) and ``num_updates`` (optimizer steps so far)."""
    model.train()
    device = dist.device
    total_batches = updates_per_epoch * accum_steps
    bar = engine.progress_bar(total_batches * loader.batch_size * dist.world_size, f"train {epoch}",
                              progress and dist.is_main)
    loss_sum = torch.zeros((), device=device)
    seen = torch.zeros((), device=device)
    skipped = 0
    start = shown = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for step, (images, targets, n_skipped) in enumerate(loader):
        if step >= total_batches:  # a trailing group smaller than accum_steps is not used
            break
        skipped += n_skipped
        micro = step % accum_steps
        if micro == 0 and sched_on_updates:
            scheduler.step_update(num_updates)
        if images is not None:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if mixup is not None and len(images) % 2:
                images, targets = images[:-1], targets[:-1]  # mixup pairs images within the batch
            n_images = len(images)
            if mixup is not None:
                images, targets = mixup(images, targets)
            last_micro = micro == accum_steps - 1
            sync = contextlib.nullcontext() if (last_micro or not dist.distributed) else model.no_sync()
            with sync:
                with autocast():
                    loss = criterion(model(images), targets)
                engine.check_finite(engine.reduce_mean(loss.detach(), dist), epoch, step, last_checkpoint)
                scaled = loss / accum_steps
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            loss_sum += loss.detach() * n_images
            seen += n_images
        if micro == accum_steps - 1:
            if scaler is not None:
                if clip_grad is not None:
                    scaler.unscale_(optimizer)
                    dispatch_clip_grad(model.parameters(), clip_grad)
                scaler.step(optimizer)
                scaler.update()
            else:
                if clip_grad is not None:
                    dispatch_clip_grad(model.parameters(), clip_grad)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            num_updates += 1
            if ema is not None:
                ema.update(model, step=num_updates)
        bar.update(loader.batch_size * dist.world_size)
        if bar.n and time.perf_counter() - shown > 1.0:  # the loss .item() syncs: once a second
            shown = time.perf_counter()
            bar.set_postfix(loss=f"{(loss_sum / seen.clamp(min=1)).item():.4f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.2e}", refresh=False)
    bar.close()
    elapsed = time.perf_counter() - start
    totals = engine.reduce_sum(torch.stack([loss_sum, seen, torch.tensor(float(skipped), device=device)]), dist)
    return dict(
        train_loss=(totals[0] / totals[1].clamp(min=1)).item(),
        train_img_per_s=totals[1].item() / max(elapsed, 1e-9),
        skipped=int(totals[2].item()),
        num_updates=num_updates,
    )


# --- the run --------------------------------------------------------------------------------------


def train(
    config: TrainConfig | Mapping[str, Any] | None = None,
    model_factory: Callable[..., nn.Module] | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train and evaluate a classifier; see :class:`TrainConfig` for every setting.

    Args:
        config: a :class:`TrainConfig` or a mapping of its fields (``recipe`` in a mapping selects
            the starting values).
        model_factory: builds the model instead of timm: ``factory(num_classes=, in_chans=)``.
        overrides: fields replacing the config's. ``train(resume=RUN, **changes)`` continues a run
            from its record: ``changes`` may only be values that cannot change the result
            (:data:`~cyclemlp.training.config.RUN_FIELDS`) or a larger ``epochs`` (an
            extension: the schedule is rebuilt for the new length from the next step on).

    Under ``torchrun`` every process calls this; rank 0 writes the files. Raises ValueError /
    FileNotFoundError / CheckpointError for bad settings, data or checkpoints (a resume with
    values that differ from the record raises :class:`~cyclemlp.training.config.ResumeConflictError`
    listing them), and :class:`cyclemlp.training.engine.NonFiniteLossError` when the loss becomes
    NaN/Inf.
    """
    if isinstance(config, Mapping):
        values = dict(config)
        config = TrainConfig.from_recipe(values.pop("recipe", None), **values)
    folder = None
    resume = overrides.get("resume") or (config.resume if config is not None else None)
    if resume:
        folder = record.open_run_folder(resume)
        given = dict(overrides) if config is None else {**dataclasses.asdict(config), **overrides}
        if "output" in given and given["output"] is not None and Path(given["output"]) != folder.path:
            raise ValueError(f"--output {given['output']} is not the run being resumed ({folder.path}); leave it out")
        config = resume_config(folder.config, given, str(folder.path), folder.epochs_done)
        config.resume, config.output = str(folder.path), str(folder.path)
    else:
        config = dataclasses.replace(config or TrainConfig(), **overrides)
    config.check()
    joined = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    dist = engine.setup_distributed(config.device)
    try:
        return _run(config, model_factory, dist, folder)
    finally:
        if joined:
            engine.cleanup_distributed()


def _run(config: TrainConfig, model_factory: Callable[..., nn.Module] | None, dist: engine.DistInfo,
         folder: record.RunFolder | None) -> TrainResult:
    wall_start = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    engine.seed_everything(config.seed + dist.rank)
    device = dist.device

    # data (classes first: they size the model's head)
    train_split, val_split = default_splits(config.dataset)
    train_split, val_split = config.train_split or train_split, config.val_split or val_split
    in_chans = config.in_chans or native_in_chans(config.dataset)
    train_set = build_dataset(config.dataset, config.data, train_split, in_chans=in_chans, strict=config.strict,
                              subset=config.train_subset)
    classes = list(train_set.classes)
    val_set = build_dataset(config.dataset, config.data, val_split, in_chans=in_chans, strict=config.strict,
                            subset=config.val_subset, classes=classes)

    # model
    model = build_model(config, len(classes), in_chans, model_factory)
    if config.initial_checkpoint:
        load_weights(model, config.initial_checkpoint, reset_head=True)  # logs what it loaded
    if config.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
        model.set_grad_checkpointing(True)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    params = sum(p.numel() for p in model.parameters())

    data_config = _data_config(config, model, getattr(train_set, "dataset", train_set), in_chans)
    aug = dict(scale=tuple(config.scale), ratio=tuple(config.ratio), hflip=config.hflip,
               color_jitter=config.color_jitter, auto_augment=config.aa, re_prob=config.reprob,
               re_mode=config.remode, re_count=config.recount, pad_crop=config.pad_crop, no_aug=config.no_aug)
    size = data_config["input_size"]
    not_cacheable = cacheable(train_set, aug, size) or cacheable(val_set, dict(no_aug=True), size)
    if config.cache_data and not_cacheable:
        raise ValueError(f"cannot cache the data in memory: {not_cacheable}")
    cache = not not_cacheable if config.cache_data is None else config.cache_data
    train_loader: Any
    val_loader: Any
    if cache:  # timm's transform once per image (flip, translation, erasing drawn per batch), then indexing
        train_x, train_y = cache_images(train_set, build_transform(data_config, True, **static_part(aug)),
                                        config.workers)
        val_x, val_y = cache_images(val_set, build_transform(data_config, False), config.workers)
        train_sampler = build_sampler(train_set, config.batch_size, True, dist.rank, dist.world_size, config.seed,
                                      config.aug_repeats, config.samples_per_epoch)
        black = [-m / s for m, s in zip(data_config["mean"], data_config["std"])]  # 0 after normalising
        erasing = None
        if config.reprob > 0 and not config.no_aug:  # timm's, on the normalised batch (as its PrefetchLoader)
            erasing = RandomErasing(config.reprob, mode=config.remode, max_count=config.recount, device="cpu")
        train_loader = CachedLoader(train_set, train_x, train_y, train_sampler, config.batch_size, True,
                                    hflip=0.0 if config.no_aug else config.hflip,
                                    pad_crop=0 if config.no_aug else config.pad_crop, fill=black, erasing=erasing)
        val_loader = CachedLoader(val_set, val_x, val_y, build_sampler(val_set, config.batch_size, False, dist.rank,
                                                                       dist.world_size), config.batch_size, False)
    else:
        _set_transform(train_set, build_transform(data_config, True, **aug))
        _set_transform(val_set, build_transform(data_config, False))
        pin = device.type == "cuda"
        train_loader = build_loader(train_set, config.batch_size, True, dist.rank, dist.world_size, config.seed,
                                    config.workers, config.aug_repeats, pin, config.samples_per_epoch)
        val_loader = build_loader(val_set, config.batch_size, False, dist.rank, dist.world_size, config.seed,
                                  config.workers, 0, pin)
    updates_per_epoch = len(train_loader) // config.grad_accum_steps
    if updates_per_epoch < 1:
        raise ValueError(
            f"{len(train_loader)} batch(es) per epoch cannot fill one accumulation of {config.grad_accum_steps}"
        )

    # optimisation
    global_batch = config.batch_size * dist.world_size * config.grad_accum_steps
    lr = config.lr if config.lr is not None else config.lr_base * global_batch / config.lr_base_size
    opt_kwargs: dict[str, Any] = {}
    if config.opt_eps is not None:
        opt_kwargs["eps"] = config.opt_eps
    if config.opt_betas is not None:
        opt_kwargs["betas"] = tuple(config.opt_betas)
    fused_opt = config.opt.lower() in FUSED_OPTIMIZERS
    if config.opt_fused and not fused_opt:
        raise ValueError(f"--opt-fused: torch has a fused step for {sorted(FUSED_OPTIMIZERS)}, not {config.opt!r}")
    opt_fused = bool(config.opt_fused or (config.opt_fused is None and fused_opt and device.type in ("cpu", "cuda")))
    if opt_fused:
        opt_kwargs["fused"] = True  # the same update as the per-tensor loop, in one kernel per step
    optimizer = create_optimizer_v2(model, opt=config.opt, lr=lr, weight_decay=config.weight_decay,
                                    momentum=config.momentum, **opt_kwargs)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=config.sched, num_epochs=config.epochs, warmup_epochs=config.warmup_epochs,
        warmup_lr=config.warmup_lr, min_lr=config.min_lr, cooldown_epochs=config.cooldown_epochs,
        step_on_epochs=not config.sched_on_updates, updates_per_epoch=updates_per_epoch,
    )
    autocast = _autocast(config, device)
    use_scaler = config.amp and device.type == "cuda" and config.amp_dtype == "float16"
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    ema = ModelEmaV3(model, decay=config.model_ema_decay) if config.model_ema else None
    mixup = None
    if config.mixup > 0 or config.cutmix > 0:
        mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, prob=config.mixup_prob,
                      switch_prob=config.mixup_switch_prob, mode=config.mixup_mode,
                      label_smoothing=config.smoothing, num_classes=len(classes))
        criterion: nn.Module = SoftTargetCrossEntropy()
    elif config.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(config.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    train_model: nn.Module = model
    if dist.distributed:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # the record: every value resolved, the model's full arguments, the classes and preprocessing
    name = config.model if model_factory is None else getattr(model_factory, "__name__", "custom")
    run_info = dict(
        model=name, model_kwargs=model_args(name, model_kwargs(config)) if model_factory is None else {},
        num_classes=len(classes), in_chans=in_chans, classes=classes, data_config=jsonable(data_config),
        dataset=config.dataset or str(config.data), custom_model=model_factory is not None,
    )
    resolved = dataclasses.replace(
        config, img_size=size[-1], crop_pct=data_config["crop_pct"], interpolation=data_config["interpolation"],
        mean=tuple(data_config["mean"]), std=tuple(data_config["std"]), in_chans=in_chans,
        train_split=train_split, val_split=val_split, lr=lr, cache_data=cache, opt_fused=opt_fused,
    )
    run_record = dict(
        config=resolved.as_dict(), run=run_info, world_size=dist.world_size, global_batch=global_batch,
        params=params, train_images=len(train_set), val_images=len(val_set), versions=_versions(), extended=[],
    )

    # files
    ckpt: engine.CheckpointManager
    start_epoch, num_updates = 0, 0
    if folder is None:
        out_dir = Path(engine.all_gather_objects(str(_new_output_dir(config)) if dist.is_main else None, dist)[0])
    else:
        out_dir = folder.path
        run_record = _resumed_record(folder, run_record, config)
    ckpt = engine.CheckpointManager(out_dir, enabled=dist.is_main, mode="max")
    log = engine.MetricsLogger(out_dir, enabled=dist.is_main, tensorboard=False, read_existing=False)
    with contextlib.ExitStack() as stack:
        if dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            stack.enter_context(record.lock(out_dir))
            record.remove_temporaries(out_dir)  # what a killed write left behind
            if folder is None:
                record.write_json(out_dir / record.RECORD, run_record)
        if folder is not None and folder.state is not None:
            state = folder.state
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if not run_record["extended"] or run_record["extended"][-1]["at_epoch"] < folder.epochs_done:
                scheduler.load_state_dict(state["scheduler"])  # else: the schedule of the extended length
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            if ema is not None:
                ema.module.load_state_dict(state["model_ema"])
            engine.restore_rng_state(state["rng"], dist)
            ckpt.best, ckpt.best_epoch = state.get("best_metric"), state.get("best_epoch")
            start_epoch, num_updates = folder.epochs_done, state["num_updates"]
            log.rows = [dict(r) for r in state.get("history", [])]
            if dist.is_main:
                _repair(out_dir, state, log, ema is not None)
        if start_epoch >= config.epochs:
            engine.print0(f"{out_dir} is complete ({config.epochs} epochs); nothing to train (pass --epochs N with "
                          f"N > {config.epochs} to extend it)", dist=dist)
        else:
            if config.tensorboard:
                log.open_tensorboard()
            if folder is not None:
                engine.print0(f"resuming {out_dir} at epoch {start_epoch + 1} of {config.epochs}", dist=dist)
            engine.print0(
                f"training {run_info['model']} ({params / 1e6:.2f}M params) "
                f"on {run_info['dataset']}: {len(train_set)} train / {len(val_set)} eval images, {len(classes)} "
                f"classes, input {data_config['input_size']}, global batch {global_batch}, lr {lr:.3g}, "
                f"{config.epochs} epochs{f' from epoch {start_epoch + 1}' if start_epoch else ''} (recipe "
                f"{config.recipe or 'none'}), {dist.world_size} process(es) on {device}"
                f"{', images cached in memory' if cache else ''}; writing to {out_dir}",
                dist=dist,
            )
        train_stats: dict[str, float] = {}
        for epoch in range(start_epoch, config.epochs):
            epoch_start, cpu_start = time.perf_counter(), time.process_time()
            train_loader.sampler.set_epoch(epoch)
            if not config.sched_on_updates:
                scheduler.step(epoch)
            train_stats = train_one_epoch(
                train_model, train_loader, optimizer, criterion, scheduler, epoch, num_updates, dist,
                accum_steps=config.grad_accum_steps, updates_per_epoch=updates_per_epoch,
                sched_on_updates=config.sched_on_updates, mixup=mixup, scaler=scaler, autocast=autocast,
                clip_grad=config.clip_grad, ema=ema, channels_last=config.channels_last,
                last_checkpoint=ckpt.latest() if dist.is_main else None, progress=config.progress,
            )
            num_updates = int(train_stats.pop("num_updates"))
            result = evaluate(model, val_loader, dist, autocast=autocast, desc=f"eval {epoch}",
                              progress=config.progress, channels_last=config.channels_last)
            row = dict(epoch=epoch, lr=optimizer.param_groups[0]["lr"], **train_stats,
                       eval_loss=result.loss, eval_top1=result.top1, eval_top5=result.top5,
                       eval_skipped=result.skipped)
            if ema is not None:
                ema_result = evaluate(ema.module, val_loader, dist, autocast=autocast, desc=f"eval ema {epoch}",
                                      progress=config.progress, channels_last=config.channels_last)
                row.update(eval_ema_loss=ema_result.loss, eval_ema_top1=ema_result.top1,
                           eval_ema_top5=ema_result.top5)
            row["epoch_s"] = round(time.perf_counter() - epoch_start, 2)
            row["cpu_s"] = round(time.process_time() - cpu_start, 2)  # this process's CPU time (not its loaders')
            row["time_s"] = round((log.rows[-1].get("time_s", 0.0) if log.rows else 0.0) + row["epoch_s"], 2)
            # last.pth first: the other files follow it, and a resumed run repairs them from it
            improved = ckpt.save(
                dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                     scaler=scaler.state_dict() if scaler is not None else None,
                     model_ema=ema.module.state_dict() if ema is not None else None, epoch=epoch,
                     num_updates=num_updates, rng=engine.capture_rng_state(dist), metrics=row,
                     history=log.rows + [row], record=run_record, run=run_info, config=run_record["config"]),
                metric=result.top1,
            )
            if dist.is_main:
                record.write_json(out_dir / record.RECORD, run_record)
            log.log(row)
            skipped = row["skipped"] + result.skipped
            engine.print0(
                f"epoch {epoch + 1}/{config.epochs}: train loss {row['train_loss']:.4f} "
                f"({row['train_img_per_s']:.0f} img/s), eval loss {result.loss:.4f}, top-1 {result.top1:.2f}%, "
                f"top-5 {result.top5:.2f}%{' (best)' if improved else ''}"
                f"{f', skipped {skipped} unreadable image(s)' if skipped else ''}",
                dist=dist,
            )
            if epoch == config.epochs - 1 and dist.is_main:
                _finish(out_dir, model, ema, log, run_info, row)
        log.close()
    engine.barrier(dist)

    final = log.rows[-1] if log.rows else {}
    best_row = max(log.rows, key=lambda r: r["eval_top1"]) if log.rows else final
    return TrainResult(
        output_dir=out_dir, epochs=config.epochs, top1=final.get("eval_top1", float("nan")),
        top5=final.get("eval_top5", float("nan")), loss=final.get("eval_loss", float("nan")),
        best_top1=best_row.get("eval_top1", float("nan")), best_epoch=best_row.get("epoch", -1),
        train_img_per_s=train_stats.get("train_img_per_s", float("nan")),
        wall_s=time.perf_counter() - wall_start, params=params,
        weights=out_dir / record.WEIGHTS if (out_dir / record.WEIGHTS).is_file() else None,
        last_checkpoint=ckpt.last_path, best_checkpoint=ckpt.best_path,
        history=list(log.rows), config=run_record["config"], trained_epochs=max(0, config.epochs - start_epoch),
    )


def _resumed_record(folder: record.RunFolder, fresh: dict[str, Any], config: TrainConfig) -> dict[str, Any]:
    """The record of a resumed run: its own, checked against what this process rebuilt from it,
    with an extension of the schedule added when ``config.epochs`` is larger."""
    old = folder.record
    if fresh["run"] != old["run"]:
        differ = sorted(k for k in fresh["run"] if fresh["run"][k] != old["run"].get(k))
        raise CheckpointError(
            f"cannot resume {folder.path}: rebuilding it from its record gave another {', '.join(differ)} "
            f"(recorded {[old['run'].get(k) for k in differ]}, now {[fresh['run'][k] for k in differ]}); has the "
            "data or the model code changed?"
        )
    if old["config"].get("data") != fresh["config"]["data"] and (
            fresh["train_images"], fresh["val_images"]) != (old.get("train_images"), old.get("val_images")):
        raise ValueError(
            f"cannot resume {folder.path} with --data {fresh['config']['data']}: it holds {fresh['train_images']} / "
            f"{fresh['val_images']} images, the recorded data {old.get('train_images')} / {old.get('val_images')}"
        )
    if fresh["versions"] != old.get("versions"):
        logger.warning("resuming %s under %s (recorded: %s); the continuation may not be bit-exact",
                       folder.path, fresh["versions"], old.get("versions"))
    new = dict(old)  # run-only values (threads, workers, ...) stay as the run was started
    new["config"] = {**old["config"], "epochs": fresh["config"]["epochs"], "data": fresh["config"]["data"]}
    if config.epochs > old["config"]["epochs"]:
        new["extended"] = [*old.get("extended", []), dict(at_epoch=folder.epochs_done,
                                                          epochs_before=old["config"]["epochs"],
                                                          epochs_after=config.epochs)]
    return new


def _repair(out_dir: Path, state: Mapping[str, Any], log: engine.MetricsLogger, ema: bool) -> None:
    """Bring a resumed run's files into agreement with its ``last.pth`` (a kill may have left any
    of them one epoch behind). Writes only what differs."""
    record.write_json(out_dir / record.RECORD, state["record"])
    record.repair_best(out_dir, state)
    metrics_changed = log.sync()
    complete = int(state["epoch"]) + 1 >= int(state["record"]["config"]["epochs"])
    if complete and (metrics_changed or not _final_weights_match(out_dir / record.WEIGHTS, state, "model")
                     or (ema and not _final_weights_match(out_dir / record.EMA_WEIGHTS, state, "model_ema"))
                     or not (out_dir / record.CURVES).is_file()):
        model = _StateModule(state["model"])
        ema_module = _StateModule(state["model_ema"]) if ema else None
        _finish(out_dir, model, ema_module, log, state["run"], state["metrics"])


class _StateModule:
    """What :func:`_finish` needs of a model, from a state dict."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self._state = state

    def state_dict(self) -> Mapping[str, torch.Tensor]:
        return self._state

    @property
    def module(self) -> "_StateModule":
        return self


def _finish(out_dir: Path, model: Any, ema: Any, log: engine.MetricsLogger, run_info: Mapping[str, Any],
            final: Mapping[str, Any]) -> None:
    """The end-of-run files: the curves, then the final weights (``model.safetensors`` last: its
    presence, matching ``last.pth``, marks a finished run)."""
    log.plot(title=f"{run_info['model']} on {run_info['dataset']}")
    meta = dict(run=run_info, epoch=final.get("epoch"), eval_top1=final.get("eval_top1"))
    if ema is not None:
        save_weights(ema.module, out_dir / record.EMA_WEIGHTS, metadata=meta)
    save_weights(model, out_dir / record.WEIGHTS, metadata=meta)


def _final_weights_match(path: Path, state: Mapping[str, Any], key: str) -> bool:
    """Whether ``path`` holds ``state[key]``'s weights, written at ``state``'s epoch."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("epoch") != str(state["epoch"]) or set(handle.keys()) != set(state[key]):
                return False
            return all(torch.equal(handle.get_tensor(k), v.cpu()) for k, v in state[key].items())
    except Exception:  # noqa: BLE001  (an unreadable file is one to rewrite)
        return False


def _set_transform(dataset: Any, transform: Callable) -> None:
    getattr(dataset, "dataset", dataset).transform = transform  # through a Subset
