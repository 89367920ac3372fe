"""The training loop: DDP (NCCL on GPU, gloo on CPU), AMP, gradient accumulation, checkpoints, eval.

Before anything is built or written, the training and validation data are checked on rank 0
(:mod:`training.datacheck`: every image decoded once). One optimizer step ("iteration") consumes
``accumulate`` batches of ``images_per_gpu`` images on every process; gradients are synchronised
only on the last of them (``no_sync``). The learning rate is set before every step by
:class:`~training.optim.WarmupMultiStepLR`. A batch that cannot be read mid-run stops every rank
with the same message (:func:`next_batch`). Checkpoints are written by rank 0 after the step
(every ``checkpoint_interval`` steps, at each epoch end and at the end), with every rank's RNG
state, so ``--resume`` continues exactly where the run stopped (with the same number of processes;
the architecture comes from the checkpoint, the initial weights are not read again). A checkpoint
records whether an evaluation belongs to its point (``eval_due``) and ``checkpoints/evaluated.json``
when one completed, so a run killed between the save and the evaluation evaluates first when
resumed. ``best.pt`` is written when ``bbox_mAP`` strictly improves on the best so far and is above
0 (an untrained head scoring 0.0 is no "best"), so it may not exist after a run that never scored.

Rank 0 logs a line every ``log_interval`` iterations: iteration and epoch (1-based, the epoch the
iteration belongs to, as in every ``metrics.jsonl`` record), each loss, lr, time and data time per
iteration, images/s, ETA and memory (peak GPU memory, or the resident set size on CPU). Launch
with ``torchrun --nproc-per-node N -m training train ...`` (multi-node: torchrun's
``--nnodes/--rdzv-*`` options); a plain ``gnws train`` runs one process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from models.config import config_from_json, config_to_json
from models.detector import GNWSDetector, build_detector
from models.files import atomic_write_bytes, file_sha256
from models.zoo import get_entry

from .checkpoint import (
    BEST,
    BEST_JSON,
    capture_rng,
    check_resumable,
    checkpoint_name,
    epoch_of_position,
    load_checkpoint,
    prune,
    read_best,
    read_eval_done,
    restore_rng,
    save_checkpoint,
    write_eval_done,
    write_latest,
)
from .config import TrainConfig, read_resolved
from .data import CocoDetection, FailedBatch, TrainBatch, collate
from .datacheck import CACHE_FILE, check_run_data
from .errors import DatasetError, ResumeError, TrainingError
from .evaluate import evaluate
from .init import build_initial_model, freeze_stages, set_image_scale
from .losses import TrainingModel, total_loss
from .optim import WarmupMultiStepLR, build_optimizer
from .runtime import (
    DistContext,
    MetricsLog,
    Throughput,
    broadcast_from_main,
    first_failure,
    format_train_line,
    gather_replica_states,
    seed_everything,
    setup_distributed,
    show_progress,
    state_digest,
)
from .sampler import GroupedBatchSampler

logger = logging.getLogger(__name__)


class Trainer:
    """One training run in ``cfg.work_dir`` (created, or resumed from its latest checkpoint)."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, *, resume_from: Path | None = None) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.run_dir = Path(cfg.work_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        seed_everything(cfg.seed)
        # all data is checked before anything is written or built: a broken val set fails now, not after epoch 1
        self.eval_enabled = bool(cfg.eval_interval and cfg.val_ann and cfg.val_images)
        data = check_run_data(
            cfg, ctx, with_masks=get_arch_has_mask(cfg.model), evaluate=self.eval_enabled,
            cache_path=self.run_dir / CACHE_FILE,
        )  # fmt: skip
        report = data.train_report
        self.train_set = CocoDetection(
            Path(cfg.train_ann), Path(cfg.train_images), image_scale=cfg.image_scale, flip_prob=cfg.flip_prob,
            with_masks=get_arch_has_mask(cfg.model), min_size=cfg.min_image_size, seed=cfg.seed,
            multi_scale=cfg.multi_scale, scale_jitter=cfg.scale_jitter, coco=data.train_coco,
            exclude_images=report.excluded_image_ids, exclude_annotations=report.excluded_annotation_ids,
        )  # fmt: skip
        self.val_coco = data.val_coco
        if self.val_coco is not None and not set(self.val_coco.getCatIds()) & set(self.train_set.categories.ids):
            raise DatasetError(
                f"{cfg.val_ann} shares no category id with the training annotations; evaluation would score nothing"
            )
        state = load_checkpoint(resume_from) if resume_from is not None else None
        if state is not None and resume_from is not None:
            check_resumable(state, resume_from, cfg=cfg, world_size=ctx.world_size)
        if ctx.is_main:
            self._write_run_files(data.cache, resumed=state is not None)
        detector = self._build_detector(state, resume_from)
        set_image_scale(detector, cfg.image_scale)
        frozen = freeze_stages(detector, cfg.frozen_stages)
        logger.info("frozen_stages=%d: %d parameter tensors frozen", cfg.frozen_stages, len(frozen))
        self.detector = detector.to(ctx.device).train()
        self.model = TrainingModel(self.detector, rpn_samples=cfg.rpn_samples, rcnn_samples=cfg.rcnn_samples)
        self.ddp: torch.nn.Module = self.model
        if ctx.distributed:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids, broadcast_buffers=False)
        self.optimizer = build_optimizer(cfg, self.detector, cfg.scaled_lr(ctx.world_size))
        self.scheduler = WarmupMultiStepLR(
            cfg.scaled_lr(ctx.world_size), cfg.schedule_spec, cfg.warmup_iters, cfg.warmup_ratio
        )
        use_amp = cfg.amp != "none" and ctx.device.type == "cuda"
        if cfg.amp != "none" and not use_amp:
            logger.warning("--amp %s needs a GPU; training in float32 on %s", cfg.amp, ctx.device)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp) if use_amp else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype is torch.float16)
        self.sampler = GroupedBatchSampler(
            self.train_set.aspect_groups(), cfg.images_per_gpu, world_size=ctx.world_size, rank=ctx.rank, seed=cfg.seed
        )
        self.epoch, self.batch_in_epoch, self.iteration = 0, 0, 0
        self.best: dict[str, Any] = {}
        self.last_eval_iter = -1
        self.eval_pending = False  # the resumed checkpoint's evaluation never completed
        self.meter = Throughput(ctx, cfg.images_per_gpu * cfg.accumulate * ctx.world_size)
        seed_everything(cfg.seed + ctx.rank)  # ranks sample differently; the model is identical (DDP broadcast)
        if state is not None and resume_from is not None:
            self._restore(state, resume_from)
        self.log = MetricsLog(
            self.run_dir, ctx.is_main, cfg.tensorboard,
            resume_iteration=self.iteration if state is not None else None, redo_eval=self.eval_pending,
        )  # fmt: skip

    def _write_run_files(self, cache: Any, *, resumed: bool) -> None:
        """``config.json`` (with the resolved lr, world size and the annotation files' sha256) and the decode cache."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        data: dict[str, Any] = {}
        for key, path in (("train_ann", cfg.train_ann), ("val_ann", cfg.val_ann)):
            if path:
                data[key] = str(Path(path).absolute())
                data[f"{key}_sha256"] = file_sha256(path)
        if resumed:
            before = read_resolved(self.run_dir / "config.json").get("data") or {}
            changed = [
                k for k in ("train_ann", "val_ann") if before.get(f"{k}_sha256") not in (None, data.get(f"{k}_sha256"))
            ]
            if changed:
                logger.warning(
                    "%s changed since the run started (sha256 differs); the checkpoint's data order and "
                    "statistics refer to the old file", " and ".join(str(data[k]) for k in changed),
                )  # fmt: skip
        text = cfg.to_json(world_size=self.ctx.world_size, extra={"data": data}) + "\n"
        atomic_write_bytes(self.run_dir / "config.json", text.encode())
        if cache is not None:
            cache.write(self.run_dir / CACHE_FILE)

    def _build_detector(self, state: dict[str, Any] | None, path: Path | None) -> GNWSDetector:
        """The initial weights for a new run; for a resumed one only the architecture (its weights follow)."""
        cfg = self.cfg
        if state is None:
            return build_initial_model(
                cfg.model, cfg.init, self.train_set.categories,
                init_checkpoint=Path(cfg.init_checkpoint) if cfg.init_checkpoint else None,
            )  # fmt: skip
        try:
            detector_cfg = config_from_json(state["detector"])
        except (ValueError, TypeError) as exc:
            raise ResumeError(f"{path} holds no valid detector config ({exc})") from None
        if tuple(detector_cfg.category_ids) != self.train_set.categories.ids:
            raise ResumeError(
                f"{path} was trained on categories {list(detector_cfg.category_ids)[:8]}... but "
                f"{cfg.train_ann} now lists {list(self.train_set.categories.ids)[:8]}...; resume with the run's data"
            )
        return build_detector(detector_cfg)

    # ---- schedule bookkeeping -------------------------------------------------------------
    @property
    def iters_per_epoch(self) -> int:
        return -(-self.sampler.batches_per_epoch() // self.cfg.accumulate)

    @property
    def total_iters(self) -> int:
        total = self.iters_per_epoch * self.cfg.schedule_spec.epochs
        return min(total, self.cfg.max_iters) if self.cfg.max_iters else total

    def _done(self) -> bool:
        return self.epoch >= self.cfg.schedule_spec.epochs or bool(
            self.cfg.max_iters and self.iteration >= self.cfg.max_iters
        )

    # ---- main loop -------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        if ctx.is_main:
            logger.info(
                "training %s on %d images, %d process(es) x %d images x %d accumulation, %s lr %.5g, "
                "%d iterations (%d epochs of %d)",
                cfg.model, len(self.train_set), ctx.world_size, cfg.images_per_gpu, cfg.accumulate,
                cfg.optimizer.upper(), cfg.scaled_lr(ctx.world_size), self.total_iters,
                cfg.schedule_spec.epochs, self.iters_per_epoch,
            )  # fmt: skip
        show = show_progress(ctx)  # a terminal gets a bar; a log file only the interval lines
        bar = tqdm(total=self.total_iters, initial=self.iteration, desc="train", unit="it", disable=not show)
        window: list[dict[str, float]] = []
        try:
            with logging_redirect_tqdm() if show else contextlib.nullcontext():
                if self.eval_pending:
                    if ctx.is_main:
                        logger.info("evaluation at iteration %d did not complete before the run stopped: "
                                    "running it now", self.iteration)  # fmt: skip
                    self._evaluate()
                self.meter.start()
                while not self._done():
                    window = self._train_epoch(bar, window)
                if self.eval_enabled and self.last_eval_iter != self.iteration:
                    self._evaluate()  # a resumed run that was already complete but not evaluated
        finally:
            bar.close()
            self.log.close()
        if ctx.is_main and self.meter.steps:
            logger.info("trained %d iterations: %s", self.meter.steps, self.meter.summary())
        return {"iteration": self.iteration, "epoch": self.epoch, "best": self.best}

    def _train_epoch(self, bar: tqdm, window: list[dict[str, float]]) -> list[dict[str, float]]:
        """The rest of the current epoch (or up to ``max_iters``); returns the unlogged loss window."""
        cfg, ctx = self.cfg, self.ctx
        self.train_set.set_epoch(self.epoch)
        self.sampler.set_position(self.epoch, self.batch_in_epoch)
        generator = torch.Generator().manual_seed(cfg.seed + self.epoch)  # leaves the global RNG alone
        loader = DataLoader(
            self.train_set, batch_sampler=self.sampler, collate_fn=collate, num_workers=cfg.workers,
            pin_memory=ctx.device.type == "cuda", generator=generator,
        )  # fmt: skip
        batches = iter(loader)
        step_losses: list[dict[str, torch.Tensor]] = []
        while True:
            waited = time.perf_counter()
            batch = next_batch(batches, ctx, iteration=self.iteration, run_dir=self.run_dir)
            self.meter.data(time.perf_counter() - waited)
            if batch is None:
                return window
            step_losses.append(self._forward_backward(batch))
            if not self._at_step_boundary():
                continue
            self._step()
            self.meter.step()
            window.append(self._reduce(step_losses))
            step_losses = []
            bar.update(1)
            if ctx.is_main:
                bar.set_postfix(loss=f"{window[-1]['loss']:.4f}", **self.meter.postfix())
            if self.iteration % cfg.log_interval == 0 or self.iteration in (1, self.total_iters):
                self._log_train(window)
                window = []
            epoch_end = self.batch_in_epoch == self.sampler.batches_per_epoch()
            if epoch_end:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            eval_due = self.eval_enabled and ((epoch_end and self.epoch % cfg.eval_interval == 0) or self._done())
            interval_due = cfg.checkpoint_interval and self.iteration % cfg.checkpoint_interval == 0
            with self.meter.paused():  # throughput counts training only
                if epoch_end or interval_due or self._done():
                    self._save(eval_due=eval_due)  # eval_due: a resume re-runs an eval a kill cut short
                if eval_due:
                    self._evaluate()
            if self._done() or epoch_end:
                return window

    def _at_step_boundary(self) -> bool:
        total = self.sampler.batches_per_epoch()
        group_end = min(
            (self.batch_in_epoch - 1) // self.cfg.accumulate * self.cfg.accumulate + self.cfg.accumulate, total
        )
        return self.batch_in_epoch == group_end

    def _forward_backward(self, batch: Any) -> dict[str, torch.Tensor]:
        cfg, ctx = self.cfg, self.ctx
        if self.batch_in_epoch % cfg.accumulate == 0:
            self.scheduler.apply(self.optimizer, self.iteration, self.epoch)
        group_start = self.batch_in_epoch // cfg.accumulate * cfg.accumulate
        group_size = min(cfg.accumulate, self.sampler.batches_per_epoch() - group_start)
        self.batch_in_epoch += 1
        last = self._at_step_boundary()
        batch = batch.to(ctx.device)
        sync = contextlib.nullcontext() if last or not ctx.distributed else self.ddp.no_sync()  # type: ignore[operator]
        with sync:
            with torch.autocast(
                ctx.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
            ):
                losses = self.ddp(batch)
            loss = total_loss(losses)
            self._check_finite(loss, batch.image_ids)
            self.scaler.scale(loss / group_size).backward()
        return {k: v.detach() for k, v in losses.items()} | {"loss": loss.detach()}

    def _check_finite(self, loss: torch.Tensor, image_ids: list[int]) -> None:
        bad = torch.tensor([0.0 if bool(torch.isfinite(loss)) else 1.0], device=self.ctx.device)
        if self.ctx.distributed:
            dist.all_reduce(bad)  # every rank stops together instead of hanging in backward
        if bad.item() > 0:
            raise TrainingError(
                f"the loss became non-finite at iteration {self.iteration + 1} (images {image_ids} on "
                f"rank {self.ctx.rank} or another rank); lower --lr or check the annotations"
            )

    def _step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.iteration += 1

    def _reduce(self, step_losses: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        keys = sorted(step_losses[0])
        values = torch.stack([torch.stack([s[k].float() for s in step_losses]).mean() for k in keys])
        if self.ctx.distributed:
            dist.all_reduce(values)
            values /= self.ctx.world_size
        return dict(zip(keys, values.tolist(), strict=True))

    @property
    def step_epoch(self) -> int:
        """The 1-based epoch of the last step taken (what every record and log line calls ``epoch``)."""
        return epoch_of_position({"epoch": self.epoch, "batch": self.batch_in_epoch})

    def _log_train(self, window: list[dict[str, float]]) -> None:
        means = {k: sum(w[k] for w in window) / len(window) for k in window[-1]}
        record: dict[str, Any] = {
            "type": "train",
            "iter": self.iteration,
            "epoch": self.step_epoch,
            "lr": self.optimizer.param_groups[0]["lr"],
            **means,
            **self.meter.window(),
        }
        eta = self.meter.eta_seconds(self.total_iters - self.iteration)
        if eta is not None:
            record["eta_s"] = round(eta, 1)
        self.log.write(record, self.iteration, "train")
        if self.ctx.is_main:
            logger.info("%s", format_train_line(record, self.total_iters, self.cfg.schedule_spec.epochs))

    # ---- checkpoints, eval ---------------------------------------------------------------
    def _save(self, *, eval_due: bool) -> None:
        ctx = self.ctx
        rngs, digests = gather_replica_states(
            ctx, capture_rng(), state_digest(self.detector.state_dict()), self.iteration
        )  # raises on every rank if the replicas differ, so none is left waiting
        if not ctx.is_main:
            return
        state = self._checkpoint_state(rngs=rngs, eval_due=eval_due)
        name = checkpoint_name(self.iteration)
        save_checkpoint(self.ckpt_dir / name, state)
        write_latest(self.ckpt_dir, name)
        prune(self.ckpt_dir, self.cfg.keep_checkpoints)
        self.log.write(
            {
                "type": "checkpoint",
                "iter": self.iteration,
                "epoch": self.step_epoch,
                "file": name,
                "world_size": ctx.world_size,
                "rank_digests": digests,
            },
            self.iteration,
            "checkpoint",
        )
        logger.info("saved %s (iteration %d, epoch %d)", name, self.iteration, self.step_epoch)

    def _checkpoint_state(self, *, rngs: list[Any] | None = None, eval_due: bool = False) -> dict[str, Any]:
        """What a checkpoint holds; without ``rngs`` only the weights and their record (``best.pt``)."""
        state: dict[str, Any] = {
            "model": self.detector.state_dict(), "config": self.cfg.to_json(),
            "detector": config_to_json(self.detector.cfg), "best": dict(self.best),
            "position": {"epoch": self.epoch, "batch": self.batch_in_epoch, "iteration": self.iteration},
            "world_size": self.ctx.world_size, "lr": self.cfg.scaled_lr(self.ctx.world_size),
        }  # fmt: skip
        if rngs is not None:  # everything --resume needs
            state |= {
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rngs, "eval_due": eval_due,
                "train_images": len(self.train_set),
            }  # fmt: skip
        return state

    def _restore(self, state: dict[str, Any], path: Path) -> None:
        """Continue from ``state`` (already checked by :func:`check_resumable`)."""
        pos = state["position"]
        epoch, batch, iteration = int(pos["epoch"]), int(pos["batch"]), int(pos["iteration"])
        saved_images = state.get("train_images")
        if (saved_images is not None and saved_images != len(self.train_set)) or not (
            0 <= batch <= self.sampler.batches_per_epoch()
        ):
            raise ResumeError(
                f"{path} was written for {saved_images} usable training images, {self.cfg.train_ann} now has "
                f"{len(self.train_set)}: the data changed since the checkpoint; resume with the run's data"
            )
        self.detector.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch_in_epoch, self.iteration = epoch, batch, iteration
        restore_rng(state["rng"][self.ctx.rank])
        if self.ctx.is_main:
            self.best = read_best(self.ckpt_dir)  # what best.pt holds, whatever a kill did to best.json
        # rank 0 decides, so every rank runs the same (collective) evaluations
        self.last_eval_iter = int(broadcast_from_main(self.ctx, read_eval_done(self.ckpt_dir)))
        self.eval_pending = self.eval_enabled and bool(state.get("eval_due")) and self.last_eval_iter < iteration
        if self.ctx.is_main:
            logger.info(
                "resumed from %s at iteration %d (epoch %d, %d of %d batches of it done)", path, self.iteration,
                self.step_epoch, self.batch_in_epoch or self.sampler.batches_per_epoch(),
                self.sampler.batches_per_epoch(),
            )  # fmt: skip

    def _evaluate(self) -> None:
        cfg = self.cfg
        self.last_eval_iter = self.iteration
        if not (cfg.val_ann and cfg.val_images):
            return
        started = time.perf_counter()
        if self.ctx.is_main and self.val_coco is not None:
            logger.info("evaluating %d images at iteration %d", len(self.val_coco.getImgIds()), self.iteration)
        result = evaluate(
            self.detector, Path(cfg.val_ann), Path(cfg.val_images), image_scale=cfg.image_scale,
            device=self.ctx.device, progress=True, coco_gt=self.val_coco,
        )  # fmt: skip
        if result is None:  # not rank 0
            return
        key = "bbox_mAP"
        record = {"type": "val", "iter": self.iteration, "epoch": self.step_epoch, **result.metrics}
        self.log.write(record, self.iteration, "val")
        for summary in result.summaries.values():
            logger.info("evaluation at iteration %d (%.0f s):\n%s", self.iteration, time.perf_counter() - started,
                        summary)  # fmt: skip
        value, previous = result.metrics[key], (self.best.get("metrics") or {}).get(key)
        if improves(value, previous):
            self.best = {"iteration": self.iteration, "epoch": self.step_epoch, "metrics": result.metrics, "key": key}
            save_checkpoint(self.ckpt_dir / BEST, self._checkpoint_state())
            atomic_write_bytes(self.ckpt_dir / BEST_JSON, json.dumps(self.best).encode())
            logger.info("new best %s %.4f at iteration %d: saved %s", key, value, self.iteration, BEST)
        elif previous is None:
            logger.info("%s is %.4f at iteration %d: no %s until it is above 0", key, value, self.iteration, BEST)
        else:
            logger.info("%s %.4f at iteration %d: the best is still %.4f (iteration %s)", key, value,
                        self.iteration, previous, self.best.get("iteration"))  # fmt: skip
        write_eval_done(self.ckpt_dir, self.iteration)  # last: a kill before this re-runs the evaluation on resume


def improves(value: float, best: float | None) -> bool:
    """Whether an evaluation's metric earns ``best.pt``: above 0 and strictly above the best so far.

    A metric of exactly 0 (an untrained head, a set the model finds nothing in) is never a best,
    even at the first evaluation; ties keep the earlier checkpoint.
    """
    return value > 0 and (best is None or value > best)


def next_batch(
    batches: Iterator[TrainBatch | FailedBatch], ctx: DistContext, *, iteration: int, run_dir: Path
) -> TrainBatch | None:
    """The next batch of this rank's loader, ``None`` at the end of the epoch; collective under DDP.

    Every rank calls it once per batch (the sampler gives every rank the same number). When a rank
    could not read its batch (an image that became unreadable after the data check, a data-loader
    worker that died), every rank raises the same :class:`DatasetError` naming the first failing
    rank and its file, instead of the others waiting in the next all-reduce until a timeout.
    """
    failure: str | None = None
    batch: TrainBatch | None = None
    try:
        item = next(batches)
    except StopIteration:
        return None
    except Exception as exc:  # a worker crash: DataLoader re-raises it here with its traceback as text
        lines = [line for line in str(exc).splitlines() if line.strip()]
        failure = lines[-1] if lines else type(exc).__name__
    else:
        if isinstance(item, FailedBatch):
            failure = item.message
        else:
            batch = item
    first = first_failure(failure, ctx.device)
    if first is not None:
        rank, message = first
        where = f" on rank {rank} of {ctx.world_size}" if ctx.distributed else ""
        raise DatasetError(
            f"training stopped at iteration {iteration + 1}: reading its data failed{where} ({message}); "
            f"fix or replace the file, then continue with --resume {run_dir}"
        )
    return batch


def get_arch_has_mask(model_key: str) -> bool:
    return get_entry(model_key).config.has_mask


def run_training(cfg: TrainConfig, *, resume_from: Path | None = None) -> dict[str, Any]:
    """Train (or resume) ``cfg`` in this process, joining a torchrun job when launched by one."""
    ctx = setup_distributed(cfg.device)
    try:
        trainer = Trainer(cfg, ctx, resume_from=resume_from)  # checks the data, then writes config.json
        return trainer.train()
    finally:
        if ctx.distributed and dist.is_initialized():
            dist.destroy_process_group()
