"""The training loop: DDP (NCCL on GPU, gloo on CPU), AMP, gradient accumulation, checkpoints, eval.

One optimizer step ("iteration") consumes ``accumulate`` batches of ``images_per_gpu`` images on
every process; gradients are synchronised only on the last of them (``no_sync``). The learning
rate is set before every step by :class:`~training.config.WarmupMultiStepLR`. Checkpoints are
written by rank 0 after the step (every ``checkpoint_interval`` steps, at each epoch end and at
the end), with every rank's RNG state, so ``--resume`` continues exactly where the run stopped.
Launch with ``torchrun --nproc-per-node N -m training train ...`` (multi-node: torchrun's
``--nnodes/--rdzv-*`` options); a plain ``gnws train`` runs one process.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.config import config_to_json
from models.files import atomic_write_bytes
from models.zoo import get_entry

from .checkpoint import (
    BEST,
    BEST_JSON,
    capture_rng,
    checkpoint_name,
    load_checkpoint,
    prune,
    restore_rng,
    save_checkpoint,
    write_latest,
)
from .config import TrainConfig, WarmupMultiStepLR
from .data import CocoDetection, collate
from .errors import ResumeError, TrainingError
from .evaluate import evaluate
from .init import build_initial_model, freeze_stages, set_image_scale
from .losses import TrainingModel, total_loss
from .runtime import DistContext, MetricsLog, seed_everything, setup_distributed, state_digest
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
        self.train_set = CocoDetection(
            Path(cfg.train_ann), Path(cfg.train_images), image_scale=cfg.image_scale, flip_prob=cfg.flip_prob,
            with_masks=get_arch_has_mask(cfg.model), min_size=cfg.min_image_size, seed=cfg.seed,
        )  # fmt: skip
        detector = build_initial_model(
            cfg.model, cfg.init, self.train_set.categories,
            init_checkpoint=Path(cfg.init_checkpoint) if cfg.init_checkpoint else None,
        )  # fmt: skip
        set_image_scale(detector, cfg.image_scale)
        frozen = freeze_stages(detector, cfg.frozen_stages)
        logger.info("frozen_stages=%d: %d parameter tensors frozen", cfg.frozen_stages, len(frozen))
        self.detector = detector.to(ctx.device).train()
        self.model = TrainingModel(self.detector, rpn_samples=cfg.rpn_samples, rcnn_samples=cfg.rcnn_samples)
        self.ddp: torch.nn.Module = self.model
        if ctx.distributed:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids, broadcast_buffers=False)
        params = [p for p in self.detector.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(
            params, lr=cfg.scaled_lr(ctx.world_size), momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
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
        seed_everything(cfg.seed + ctx.rank)  # ranks sample differently; the model is identical (DDP broadcast)
        if resume_from is not None:
            self._restore(resume_from)
        self.log = MetricsLog(self.run_dir, ctx.is_main, cfg.tensorboard)

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
                "training %s on %d images, %d process(es) x %d images x %d accumulation, lr %.5g, %d iterations",
                cfg.model,
                len(self.train_set),
                ctx.world_size,
                cfg.images_per_gpu,
                cfg.accumulate,
                cfg.scaled_lr(ctx.world_size),
                self.total_iters,
            )
        bar = tqdm(total=self.total_iters, initial=self.iteration, desc="train", unit="it", disable=not ctx.is_main)
        window: list[dict[str, float]] = []
        try:
            while not self._done():
                self.train_set.set_epoch(self.epoch)
                self.sampler.set_position(self.epoch, self.batch_in_epoch)
                generator = torch.Generator().manual_seed(cfg.seed + self.epoch)  # leaves the global RNG alone
                loader = DataLoader(
                    self.train_set, batch_sampler=self.sampler, collate_fn=collate, num_workers=cfg.workers,
                    pin_memory=ctx.device.type == "cuda", generator=generator,
                )  # fmt: skip
                step_losses: list[dict[str, torch.Tensor]] = []
                for batch in loader:
                    step_losses.append(self._forward_backward(batch))
                    if not self._at_step_boundary():
                        continue
                    self._step()
                    window.append(self._reduce(step_losses))
                    step_losses = []
                    bar.update(1)
                    if ctx.is_main:
                        bar.set_postfix(loss=f"{window[-1]['loss']:.4f}")
                    if self.iteration % cfg.log_interval == 0 or self.iteration == 1:
                        self._log_train(window)
                        window = []
                    epoch_end = self.batch_in_epoch == self.sampler.batches_per_epoch()
                    if epoch_end:
                        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    interval_due = cfg.checkpoint_interval and self.iteration % cfg.checkpoint_interval == 0
                    if epoch_end or interval_due or self._done():
                        self._save()
                    if epoch_end and cfg.eval_interval and self.epoch % cfg.eval_interval == 0:
                        self._evaluate()
                    if self._done():
                        break
            if cfg.eval_interval and self.last_eval_iter != self.iteration:
                self._evaluate()  # a run stopped by max_iters mid-epoch is still evaluated
        finally:
            bar.close()
            self.log.close()
        return {"iteration": self.iteration, "epoch": self.epoch, "best": self.best}

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

    def _log_train(self, window: list[dict[str, float]]) -> None:
        means = {k: sum(w[k] for w in window) / len(window) for k in window[-1]}
        record = {
            "type": "train",
            "iter": self.iteration,
            "epoch": self.epoch + 1,
            "lr": self.optimizer.param_groups[0]["lr"],
            **means,
        }
        self.log.write(record, self.iteration, "train")
        if self.ctx.is_main:
            logger.debug("iter %d: %s", self.iteration, record)

    # ---- checkpoints, eval ---------------------------------------------------------------
    def _save(self) -> None:
        ctx = self.ctx
        rng = capture_rng()
        digest = state_digest(self.detector.state_dict())
        rngs, digests = [rng], [digest]
        if ctx.distributed:
            gathered: list[Any] = [None] * ctx.world_size
            dist.all_gather_object(gathered, (rng, digest))
            rngs, digests = [g[0] for g in gathered], [g[1] for g in gathered]
        if not ctx.is_main:
            return
        if len(set(digests)) != 1:
            raise TrainingError(f"DDP replicas diverged at iteration {self.iteration}: weight digests {digests}")
        state = {
            "model": self.detector.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "position": {"epoch": self.epoch, "batch": self.batch_in_epoch, "iteration": self.iteration},
            "rng": rngs, "world_size": ctx.world_size, "config": self.cfg.to_json(),
            "detector": config_to_json(self.detector.cfg), "best": dict(self.best),
        }  # fmt: skip
        name = checkpoint_name(self.iteration)
        save_checkpoint(self.ckpt_dir / name, state)
        write_latest(self.ckpt_dir, name)
        prune(self.ckpt_dir, self.cfg.keep_checkpoints)
        self.log.write(
            {
                "type": "checkpoint",
                "iter": self.iteration,
                "epoch": self.epoch,
                "file": name,
                "world_size": ctx.world_size,
                "rank_digests": digests,
            },
            self.iteration,
            "checkpoint",
        )
        logger.info("saved %s (iteration %d, epoch %d)", name, self.iteration, self.epoch)

    def _restore(self, path: Path) -> None:
        state = load_checkpoint(path)
        if state["config"] != self.cfg.to_json():
            saved = json.loads(state["config"])
            changed = sorted(
                k
                for k, v in json.loads(self.cfg.to_json()).items()
                if saved.get(k) != v and k not in RESUMABLE_OVERRIDES
            )
            if changed:
                raise ResumeError(
                    f"{path} was written with different settings ({', '.join(changed)}); resume with the run's config"
                )
        self.detector.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        pos = state["position"]
        self.epoch, self.batch_in_epoch, self.iteration = int(pos["epoch"]), int(pos["batch"]), int(pos["iteration"])
        self.best = dict(state.get("best") or {})
        best_json = self.ckpt_dir / BEST_JSON
        if best_json.is_file():  # best.pt may be newer than the checkpoint (eval runs after the epoch's save)
            self.best = json.loads(best_json.read_text())
        rngs = state["rng"]
        if len(rngs) == self.ctx.world_size:
            restore_rng(rngs[self.ctx.rank])
        else:
            logger.warning(
                "checkpoint was written by %d processes, this run has %d: RNG streams are re-seeded, so "
                "sampling will not match the original run exactly",
                len(rngs),
                self.ctx.world_size,
            )
            seed_everything(self.cfg.seed + self.ctx.rank + self.iteration)
        if self.ctx.is_main:
            logger.info(
                "resumed from %s at iteration %d (epoch %d, batch %d)",
                path,
                self.iteration,
                self.epoch + 1,
                self.batch_in_epoch,
            )

    def _evaluate(self) -> None:
        cfg = self.cfg
        self.last_eval_iter = self.iteration
        if not (cfg.val_ann and cfg.val_images):
            return
        result = evaluate(
            self.detector,
            Path(cfg.val_ann),
            Path(cfg.val_images),
            image_scale=cfg.image_scale,
            device=self.ctx.device,
            progress=True,
        )
        if result is None:  # not rank 0
            return
        key = "bbox_mAP"
        record = {"type": "val", "iter": self.iteration, "epoch": self.epoch, **result.metrics}
        self.log.write(record, self.iteration, "val")
        for summary in result.summaries.values():
            logger.info("evaluation at iteration %d:\n%s", self.iteration, summary)
        if not self.best or result.metrics[key] > self.best["metrics"][key]:
            self.best = {"iteration": self.iteration, "epoch": self.epoch, "metrics": result.metrics, "key": key}
            state = {
                "model": self.detector.state_dict(),
                "config": cfg.to_json(),
                "detector": config_to_json(self.detector.cfg),
                "best": self.best,
                "position": {"epoch": self.epoch, "batch": self.batch_in_epoch, "iteration": self.iteration},
            }
            save_checkpoint(self.ckpt_dir / BEST, state)
            atomic_write_bytes(self.ckpt_dir / BEST_JSON, json.dumps(self.best).encode())
            logger.info("new best %s %.4f at iteration %d", key, result.metrics[key], self.iteration)


RESUMABLE_OVERRIDES = ("max_iters", "workers", "device", "log_interval", "tensorboard", "keep_checkpoints")


def get_arch_has_mask(model_key: str) -> bool:
    return get_entry(model_key).config.has_mask


def run_training(cfg: TrainConfig, *, resume_from: Path | None = None) -> dict[str, Any]:
    """Train (or resume) ``cfg`` in this process, joining a torchrun job when launched by one."""
    ctx = setup_distributed(cfg.device)
    try:
        run_dir = Path(cfg.work_dir)
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(run_dir / "config.json", (cfg.to_json() + "\n").encode())
        trainer = Trainer(cfg, ctx, resume_from=resume_from)
        return trainer.train()
    finally:
        if ctx.distributed and dist.is_initialized():
            dist.destroy_process_group()
