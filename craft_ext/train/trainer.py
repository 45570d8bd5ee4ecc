"""The ``craft-train`` training loop: ArcFace/CosFace on an iresnet backbone with CRAFT.

The CRAFT paper's setting (Bhatta et al., arXiv 2312.00072): SGD (momentum 0.9, weight decay
5e-4), combined-margin loss, and reactivation of the first conv layer's inactive filters at
every epoch end (``ReactivatingSGD``); or AdamW with a :class:`craft_ext.Reactivator`
attached. Runs on one device or many (torchrun: DDP, partial FC sharded across ranks).

Steps are optimizer steps: with ``--grad-accum N`` each takes N micro-batches. The LR
schedule spans the steps that will run, ``min(epochs * steps_per_epoch, max_steps)``, and
every run is verified at its end.

Determinism: the batch order of epoch e comes from a generator seeded by (seed, e); flips from
one seeded by (seed, step, micro-batch); so a run resumed from a checkpoint (which carries the
model, head, optimizer, scheduler, RNG, data position and loss accumulators) continues exactly
as an uninterrupted run would (bit-identical on CPU). Checkpoints, including the one Ctrl-C
saves, fall on optimizer-step boundaries.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from craft_ext.data.image import ImageDecodeError
from craft_ext.train.config import TrainConfig
from craft_ext.train.construction import Construction, _poly_lambda, _resolve_device
from craft_ext.train.epochs import EpochEnds
from craft_ext.train.errors import (
    RunError,
    StopRequest,
    TrainingDiverged,
    TrainingInterrupted,
    decode_error_text,
)
from craft_ext.train.filters import FilterWatch
from craft_ext.train.inputs import (
    EpochBatches,
    InputFeed,
    build_train_set,
    build_val_sets,
    val_specs,
)
from craft_ext.train.logging import RunLogger
from craft_ext.train.report import Printing, format_summary
from craft_ext.train.resume import load_for_resume
from craft_ext.train.state import Checkpointing

__all__ = [
    "EpochBatches",
    "TrainingDiverged",
    "Trainer",
    "build_train_set",
    "build_val_sets",
    "decay_budget",
    "format_summary",
    "train",
]


def decay_budget(
    lrs: list[float], weight_decay: float, momentum: float, *, decoupled: bool = False
) -> float:
    """The decay budget D of a schedule: sum_t lr_t * weight_decay / (1 - momentum) for SGD
    (coupled decay, amplified by momentum mu), sum_t lr_t * weight_decay for AdamW
    (``decoupled``).

    A weight that gets no useful gradient shrinks by about exp(-D) over the run: channels
    whose gradient fades die when D is large (arcface_torch's r50 recipes have D of about 17
    or more; a few-minute CPU run well under 1).
    """
    total = float(sum(lrs)) * weight_decay
    return total if decoupled else total / (1.0 - momentum)


class Trainer(Construction, Checkpointing, FilterWatch, InputFeed, EpochEnds, Printing):
    """One ``craft-train`` run: construct with a :class:`TrainConfig`, then :meth:`run`.

    Construction checks everything that can be checked before training (data, verification
    sets, the checkpoint to resume) and writes nothing until all of it passed.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = _resolve_device(cfg.device, local_rank)
        #: whether this Trainer started the process group (and so ends it in :meth:`close`)
        self.owns_process_group = False
        if self.world > 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.owns_process_group = True
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.is_main = self.rank == 0
        self.out = Path(cfg.output)
        self._bar: Any = None
        self.resume_note: str | None = None

        torch.manual_seed(cfg.seed)
        self.train_set, self.num_classes = build_train_set(cfg)
        # the checkpoint to resume is checked before anything slower is built
        resumed = load_for_resume(cfg.resume, cfg, self.num_classes) if cfg.resume else None
        #: the verification sets' specs (the same on every rank; loaded on rank 0 only)
        self.val_specs = val_specs(cfg)
        self.val_sets = build_val_sets(cfg) if self.is_main else []
        self._build_model()
        self._build_optimizers()

        micro_batches = EpochBatches(
            len(self.train_set),
            cfg.batch_size,
            seed=cfg.seed,
            epoch=0,
            world=self.world,
            accumulate=cfg.grad_accum,
        )
        #: optimizer steps per epoch (each of --grad-accum micro-batches)
        self.steps_per_epoch = len(micro_batches) // cfg.grad_accum
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"--batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum} x {self.world} "
                f"process(es) exceeds the {len(self.train_set)} training images: no full step "
                "per epoch"
            )
        #: optimizer steps this run takes in all (the LR schedule spans them)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        #: epochs that (at least partly) run
        self.planned_epochs = min(cfg.epochs, math.ceil(self.total_steps / self.steps_per_epoch))
        warmup = int(cfg.warmup_epochs * self.steps_per_epoch)
        lam = _poly_lambda(self.total_steps, warmup, cfg.poly_power)
        self.decay_budget = decay_budget(
            [cfg.lr * lam(t) for t in range(self.total_steps)],
            cfg.weight_decay,
            cfg.momentum,
            decoupled=cfg.optimizer == "adamw",
        )
        self.schedulers = [
            torch.optim.lr_scheduler.LambdaLR(self.optimizer, lam),
            torch.optim.lr_scheduler.LambdaLR(self.head_optimizer, lam),
        ]
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
        use_scaler = cfg.amp == "fp16" and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.model: nn.Module = self.backbone
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.backbone, device_ids=ids)

        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0  # optimizer steps done in the current epoch
        self.best: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []
        self.final: dict[str, Any] | None = None
        self.reactivated_total = 0
        self.skipped_images: dict[str, str] = {}  # path -> reason, in the order met
        self.last_good_checkpoint: Path | None = None
        self.saved_step = -1  # the step of the last checkpoint written (or loaded)
        self.last_val_step = -1  # the step of the last epoch-end / final verification
        # loss sums on the device (read at log steps and epoch ends), and their step counts
        self._window = [torch.zeros((), device=self.device), 0]
        self._epoch_loss = [torch.zeros((), device=self.device), 0]
        self._stopping = False
        self._step_metrics: tuple[int, dict[str, float]] = (-1, {})  # the last --val-every's
        if cfg.plant_inactive:  # checked now, not after the first epoch that plants them
            self._first_conv_weight(cfg.plant_inactive)
            if cfg.plant_through == "bn" and not self.channels[self.layers[0]].has_bn:
                raise ValueError(
                    f"--plant-through bn: {self.layers[0]} is followed by no BatchNorm"
                )
        if resumed is not None:
            self._load(resumed, str(cfg.resume))
        if self.is_main:  # everything checked: now the run directory may be written
            self.out.mkdir(parents=True, exist_ok=True)
        self.logger = RunLogger(
            self.out, enabled=self.is_main, resume_step=self.step if cfg.resume else None
        )

    # -- a step ------------------------------------------------------------------------------

    def train_step(self, images: Tensor, labels: Tensor) -> Tensor:
        """One optimizer step on one batch; returns the loss (on device, not read back)."""
        return self.step_on([(images, labels)])

    def step_on(self, batches: list[tuple[Tensor, Tensor]]) -> Tensor:
        """One optimizer step over ``batches`` (micro-batches: gradients accumulate, each
        loss weighted 1 / len(batches)); returns the mean loss (on device, not read back)."""
        k = len(batches)
        self.model.train()
        self.head.train()
        self.optimizer.zero_grad(set_to_none=True)
        self.head_optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for j, (images, labels) in enumerate(batches):
            x = self._images(images, j)
            labels = labels.to(self.device, non_blocking=True)
            if j == k - 1 or self.model is self.backbone:
                sync: Any = contextlib.nullcontext()
            else:  # DDP: gradients all-reduced once, with the last micro-batch's
                sync = self.model.no_sync()
            with sync:
                with torch.autocast(
                    self.device.type,
                    dtype=self.amp_dtype or torch.float32,
                    enabled=self.amp_dtype is not None,
                ):
                    emb = self.model(x)
                loss = self.head(emb.float(), labels)
                self.scaler.scale(loss if k == 1 else loss / k).backward()
            total += loss.detach()
        if self.cfg.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.backbone.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.step(self.head_optimizer)
        self.scaler.update()
        for s in self.schedulers:
            s.step()
        self.step += 1
        return total if k == 1 else total / k

    # -- the loop ----------------------------------------------------------------------------

    def _check_finite(self, loss_value: float) -> None:
        if math.isfinite(loss_value):
            return
        where = self.last_good_checkpoint or "none saved yet"
        raise TrainingDiverged(
            f"loss is {loss_value} at step {self.step} (epoch {self.epoch + 1}); stopping. The "
            f"last good checkpoint is kept: {where}. Try a lower --lr, --clip-grad, or "
            "--amp bf16."
        )

    def _stop_now(self, stop: StopRequest, *, boundary: bool = False) -> bool:
        """Whether Ctrl-C asked to stop, agreed by every rank: checked at every step on one
        process; under DDP (an all-reduce) at log steps and epoch boundaries only."""
        if not self._stopping:
            if self.world == 1:
                self._stopping = stop.requested
            elif boundary or self.step % self.cfg.log_every == 0:
                flag = torch.tensor([float(stop.requested)], device=self.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                self._stopping = bool(flag.item())
        return self._stopping

    def run(self) -> dict[str, Any]:
        """Train to ``epochs`` (or ``max_steps``); verify at the end; returns the summary
        (also summary.json). Raises :class:`TrainingInterrupted` after saving a checkpoint on
        Ctrl-C, :class:`RunError` for an unreadable image, :class:`TrainingDiverged` for a
        NaN / Inf loss."""
        cfg = self.cfg
        if self.resume_note:
            self.say(self.resume_note)
        if self.is_main and cfg.progress:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total_steps,
                initial=self.step,
                desc=self._epoch_label(),
                unit="step",
                dynamic_ncols=True,
            )
        self._clock = (time.perf_counter(), 0)
        stop = StopRequest()
        try:
            with stop:
                while (
                    self.epoch < cfg.epochs
                    and self.step < self.total_steps
                    and not self._stop_now(stop, boundary=True)
                ):
                    if not self._train_epoch(stop):
                        break
                    self._end_epoch()
                    if self._bar is not None:
                        self._bar.set_description(self._epoch_label())
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        if self._stopping:
            saved = None
            if self.step > 0 and self.saved_step != self.step:
                saved = self.save()
            self.logger.close()
            raise TrainingInterrupted(
                self.step, self.position(), saved or self.last_good_checkpoint
            )
        return self._finish()

    def _train_epoch(self, stop: StopRequest) -> bool:
        """Train the rest of the current epoch; False when the run stopped inside it
        (``--max-steps`` reached, or Ctrl-C)."""
        accum = self.cfg.grad_accum
        loader = iter(self._loader(skips=True))
        while self.batch_in_epoch < self.steps_per_epoch:
            if self.step >= self.total_steps or self._stop_now(stop):
                return False
            group = []
            for _ in range(accum):
                try:
                    images, labels, skipped = next(loader)
                except ImageDecodeError as exc:
                    raise self._unreadable(exc) from None
                for path, reason in skipped:
                    if path not in self.skipped_images:
                        self.skipped_images[path] = reason
                        self.say(f"craft-train: skipping unreadable image ({reason})")
                group.append((images, labels))
            loss = self.step_on(group)
            self.batch_in_epoch += 1
            self._after_step(loss, sum(b[0].shape[0] for b in group) * self.world)
        return True

    def _unreadable(self, exc: ImageDecodeError) -> RunError:
        """The one-line error of an image that does not decode (``--on-error raise``); the
        steps trained since the last checkpoint are saved first (one process)."""
        saved = ""
        if self.world == 1 and self.step > max(self.saved_step, 0):
            saved = f"; stopped at step {self.step}, saved {self.save()}"
        return RunError(
            f"{decode_error_text(exc)}{saved} (remove or replace the file, or pass "
            "--on-error skip; then --resume continues)"
        )

    def _after_step(self, loss: Tensor, images: int) -> None:
        """Bookkeeping of a step: loss sums, step statistics, metric records, checkpoints."""
        cfg = self.cfg
        for acc in (self._window, self._epoch_loss):
            acc[0] += loss
            acc[1] += 1
        if cfg.stats_every and self.step % cfg.stats_every == 0:
            self._record_filter_stats("step")
        t_last, images_since = self._clock
        self._clock = (t_last, images_since + images)
        if self._bar is not None:
            self._bar.update(1)
        if self.step % cfg.log_every == 0 or self.step >= self.total_steps:
            loss_value = float(self._window[0] / max(self._window[1], 1))
            self._check_finite(loss_value)
            now = time.perf_counter()
            ips = (images_since + images) / max(now - t_last, 1e-9)
            inactive = sum(self.inactive_counts().values())
            record = {
                "kind": "step",
                "step": self.step,
                "epoch": self.epoch,
                "loss": loss_value,
                "lr": self.schedulers[0].get_last_lr()[0],
                "inactive_filters": inactive,
                "reactivated": self._drain_events(),
                "reactivated_total": self.reactivated_total,
                "images_per_s": ips,
            }
            if cfg.val_every and self.step % cfg.val_every == 0:
                metrics = self.evaluate()
                self._step_metrics = (self.step, metrics)  # reused if the run ends here
                record.update(metrics)
                if metrics:
                    self.say(f"  step {self.step}: verification {self._accuracies(metrics)}")
            self.logger.log(record)
            if self._bar is not None:
                self._bar.set_postfix(
                    loss=f"{loss_value:.3f}", img_s=f"{ips:.0f}", inactive=inactive
                )
            self._window = [torch.zeros((), device=self.device), 0]
            self._clock = (now, 0)
        if cfg.save_every and self.step % cfg.save_every == 0:
            self.save()

    def close(self) -> None:
        """Release the DistributedDataParallel wrapper, then end the process group if this
        Trainer started it. Call once done (``craft-train`` does).

        The order matters with gloo: DDP's C++ ``Reducer`` holds a reference to the process
        group, and when it is the last one, freeing it from Python (which keeps the GIL) joins
        gloo's worker threads, one of which may be waiting for the GIL to free a finished
        allreduce: the process hangs at exit (seen in about 1 of 4 two-process CPU runs). Freed
        first, the Reducer is not the last owner; ``destroy_process_group`` then frees the group
        with the GIL released.
        """
        if self.model is not self.backbone:
            self.model = self.backbone
            gc.collect()  # DDP modules sit in reference cycles: free the Reducer now
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_process_group = False


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run a training job and return its summary (then :meth:`Trainer.close`)."""
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.close()
