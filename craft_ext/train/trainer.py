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
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

import craft_ext
from craft_ext.channel import channels_of
from craft_ext.data.image import ImageDecodeError
from craft_ext.train.config import TrainConfig
from craft_ext.train.errors import (
    RunError,
    StopRequest,
    TrainingDiverged,
    TrainingInterrupted,
    decode_error_text,
    ignore_sigint,
)
from craft_ext.train.filters import FilterWatch
from craft_ext.train.inputs import (
    EpochBatches,
    SkipReporting,
    build_train_set,
    build_val_sets,
    collate,
    collate_with_skips,
    val_specs,
)
from craft_ext.train.logging import RunLogger
from craft_ext.train.report import EpochTable, format_summary
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


def _poly_lambda(total: int, warmup: int, power: float):
    def fn(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        span = max(1, total - warmup)
        return max(0.0, 1.0 - (step - warmup) / span) ** power

    return fn


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


class Trainer(Checkpointing, FilterWatch):
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

    # -- construction ----------------------------------------------------------------------

    def _build_model(self) -> None:
        from craft_ext.heads import PartialFC
        from craft_ext.losses import CombinedMarginLoss
        from craft_ext.models import get_model

        cfg = self.cfg
        residual_scale: Any = cfg.residual_scale
        if residual_scale not in (None, "trainable"):
            try:
                residual_scale = float(residual_scale)
            except ValueError:
                raise ValueError(
                    f"--residual-scale must be a number or 'trainable', got {residual_scale!r}"
                ) from None
        self.backbone = get_model(
            cfg.network,
            width=cfg.width,
            widths=cfg.widths,
            num_features=cfg.embedding_size,
            dropout=cfg.dropout,
            input_size=cfg.image_size,
            activation=cfg.activation,
            residual_scale=residual_scale,
        ).to(self.device)
        if cfg.channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self.head = PartialFC(
            cfg.embedding_size,
            self.num_classes,
            sample_rate=cfg.sample_rate,
            margin_loss=CombinedMarginLoss(cfg.scale, *cfg.margin),
        ).to(self.device)
        params = dict(self.backbone.named_parameters())
        #: the layers whose filters are logged (and watched, unless --reactivation none)
        self.layers = list(cfg.reactivate_layers) or [self._first_conv_name()]
        unknown = [n for n in self.layers if n not in params]
        if unknown:
            raise ValueError(
                f"--reactivate-layers: {unknown} are not parameters of {cfg.network}; e.g. "
                f"{list(params)[:4]}"
            )
        #: each layer's channel (its BatchNorm / PReLU, found by craft_ext.channels_of)
        self.channels = {
            ch.name: ch for ch in channels_of(self.backbone, self.layers, trainable=False)
        }
        self.watched = list(self.layers) if cfg.reactivation != "none" else []

    def _targets(self) -> list[Any]:
        """What the reactivation watches: ``(name, weight)`` pairs, or with ``--criterion
        folded`` ``(name, Channel)`` pairs (detected on the BN-folded filter, reactivated as a
        whole channel)."""
        if self.cfg.criterion != "folded":
            params = dict(self.backbone.named_parameters())
            return [(n, params[n]) for n in self.watched]
        no_bn = [n for n in self.layers if not self.channels[n].has_bn]
        if no_bn:
            raise ValueError(
                f"--criterion folded: {no_bn} {'is' if len(no_bn) == 1 else 'are'} followed "
                "by no BatchNorm with running statistics; use --criterion weight"
            )
        return [(ch.name, ch) for ch in channels_of(self.backbone, self.watched)]

    def _build_optimizers(self) -> None:
        """The backbone's optimizer with CRAFT (``self.reactivator``) and the head's."""
        cfg = self.cfg
        craft: dict[str, Any] = {
            "method": cfg.reactivation if cfg.reactivation != "none" else "craft",
            "criterion": cfg.criterion,
            "threshold": cfg.threshold,
            "seed": cfg.seed,
        }
        if cfg.optimizer == "adamw":
            hyper: dict[str, Any] = {
                "lr": cfg.lr,
                "betas": (cfg.momentum, 0.999),
                "weight_decay": cfg.weight_decay,
            }
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(
                self.backbone.parameters(), **hyper
            )
            self.reactivator = craft_ext.Reactivator(self._targets(), **craft).attach(
                self.optimizer, interval=cfg.reactivate_every
            )
            self.head_optimizer: torch.optim.Optimizer = torch.optim.AdamW(
                self.head.parameters(), **hyper
            )
            return
        hyper = {"lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay}
        sgd = craft_ext.ReactivatingSGD(
            self.backbone.parameters(),
            reactivate=self._targets(),
            interval=cfg.reactivate_every,
            **hyper,
            **craft,
        )
        self.optimizer, self.reactivator = sgd, sgd.reactivator
        self.head_optimizer = torch.optim.SGD(self.head.parameters(), **hyper)

    # -- printing ----------------------------------------------------------------------------

    def say(self, text: str) -> None:
        """Print a line on rank 0 (above the progress bar while there is one)."""
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def _say_row(self, entry: dict[str, Any], label: str | None = None) -> None:
        table = EpochTable([vs.name for vs in self.val_sets])
        if not getattr(self, "_table_started", False):
            self.say(table.header())
            self._table_started = True
        self.say(table.row(entry, label))

    def _epoch_label(self) -> str:
        return f"epoch {min(self.epoch + 1, self.planned_epochs)}/{self.planned_epochs}"

    # -- a step ------------------------------------------------------------------------------

    def _images(self, images: Tensor, micro: int = 0) -> Tensor:
        g = torch.Generator().manual_seed(
            self.cfg.seed * 7_000_003 + self.step * self.cfg.grad_accum + micro
        )
        flip = torch.rand(images.shape[0], generator=g) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
        x = images.to(self.device, non_blocking=True)
        x = x.float().div_(127.5).sub_(1.0) if x.dtype == torch.uint8 else x.float()
        size = self.cfg.image_size
        if x.shape[-2:] != (size, size):  # only a data set not built by build_train_set
            x = torch.nn.functional.interpolate(
                x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _loader(self, skips: bool = False) -> DataLoader:
        """This epoch's remaining micro-batches ``(images, labels)``; with ``skips``
        ``(images, labels, skipped)``, ``skipped`` the ``(path, reason)`` of unreadable images
        passed over (``--on-error skip`` on an image folder)."""
        dataset: Any = self.train_set
        if skips and hasattr(dataset, "load_item"):
            dataset = SkipReporting(dataset)
        sampler = EpochBatches(
            len(self.train_set),
            self.cfg.batch_size,
            seed=self.cfg.seed,
            epoch=self.epoch,
            rank=self.rank,
            world=self.world,
            skip=self.batch_in_epoch * self.cfg.grad_accum,
            accumulate=self.cfg.grad_accum,
        )
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=self.cfg.workers,
            collate_fn=collate_with_skips if skips else collate,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=ignore_sigint if self.cfg.workers else None,
            # the loader's own seed source: creating an iterator must not draw from the global
            # RNG (dropout's), or a run resumed mid-epoch would diverge from an unbroken one
            generator=torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.epoch),
        )

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

    # -- evaluation ------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Verification accuracy on every ``--val`` set (rank 0; others return {})."""
        if not self.is_main or not self.val_sets:
            return {}
        from craft_ext.eval import evaluate

        out = {}
        for vs in self.val_sets:
            res = evaluate(
                self.backbone,
                vs,
                batch_size=max(32, self.cfg.batch_size),
                device=self.device,
                flip=True,
                progress=False,
            )
            out[f"val/{vs.name}/accuracy"] = float(res["accuracy"])
            out[f"val/{vs.name}/accuracy_std"] = float(res["std"])
        self.backbone.train()
        return out

    def _update_best(self, metrics: dict[str, float]) -> bool:
        """Record ``metrics`` in :attr:`best`; whether the first set's accuracy improved
        (it decides checkpoint_best.pt)."""
        accuracies = [k for k in metrics if k.endswith("/accuracy")]
        improved = bool(accuracies) and metrics[accuracies[0]] > self.best.get(accuracies[0], -1.0)
        for key in accuracies:
            self.best[key] = max(metrics[key], self.best.get(key, -1.0))
        return improved

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

    @staticmethod
    def _accuracies(metrics: dict[str, float]) -> str:
        return ", ".join(
            f"{k.split('/')[1]} {v:.4f}" for k, v in metrics.items() if k.endswith("/accuracy")
        )

    def _epoch_mean_loss(self) -> float | None:
        """The mean loss of the epoch's steps (None when it had none here); checked finite,
        then the sums restart."""
        total, count = self._epoch_loss
        self._epoch_loss = [torch.zeros((), device=self.device), 0]
        if not count:
            return None
        value = float(total / count)
        self._check_finite(value)
        return value

    def _end_epoch(self) -> None:
        """Epoch end: CRAFT reactivation (every epoch end but the last), statistics,
        verification (every ``val_every_epochs`` and after the last), a table row,
        checkpoints."""
        if self.cfg.plant_inactive and self.epoch == 0:
            # demo only: filters die over a long run (weight decay outweighs their gradient);
            # a few-minute demo simulates that state at the first epoch end
            self._plant_inactive(self.cfg.plant_inactive)
        before = self._record_filter_stats("before")
        last = self.epoch + 1 >= self.cfg.epochs or self.step >= self.total_steps
        # not after the last epoch: a channel reactivated then would never train, and the
        # final model (and its verification) would carry untrained rewrites
        if self.watched and self.cfg.reactivate_every is None and not last:
            self.reactivator.reactivate()
        reactivated = self._drain_events()
        after = self._record_filter_stats("after")
        every = self.cfg.val_every_epochs
        verify = bool(self.val_specs) and (last or bool(every and (self.epoch + 1) % every == 0))
        metrics = self.evaluate() if verify else {}
        if verify:
            self.last_val_step = self.step
        loss = self._epoch_mean_loss()
        entry = {
            "kind": "epoch",
            "epoch": self.epoch,
            "step": self.step,
            "loss": loss,
            "inactive_filters": self._count(before),
            "inactive_after": self._count(after),
            "dead_weight": self._count(before, "weight"),
            "dead_folded": self._count(before, "folded"),
            "reactivated": reactivated,
            "reactivated_total": self.reactivated_total,
            "lr": self.schedulers[0].get_last_lr()[0],
            **metrics,
        }
        self.logger.log(entry)
        self.history.append(entry)
        self._say_row(entry)
        self.epoch += 1
        self.batch_in_epoch = 0
        improved = self._update_best(metrics)
        # verification runs on rank 0 only, so only rank 0 knows whether this epoch improved:
        # gather the (collective) state once on every rank, then write last (and best)
        self.save(also_best=improved)  # the first --val set decides which checkpoint is best

    def _finish(self) -> dict[str, Any]:
        """End of the run: verify it where no epoch end just did (a run stopped by
        ``--max-steps`` inside an epoch), save, write backbone.pth and summary.json."""
        if self._window[1]:
            self._check_finite(float(self._window[0] / self._window[1]))
        improved = False
        verify = bool(self.val_specs) and self.last_val_step != self.step  # same on all ranks
        if verify:
            step, metrics = self._step_metrics
            if step != self.step:
                metrics = self.evaluate()
            self.last_val_step = self.step
            dead = self.dead_counts()
            loss = self._epoch_mean_loss()
            self.final = {
                "kind": "final",
                "epoch": self.epoch,
                "step": self.step,
                "loss": loss,
                "inactive_filters": self._count(dead),
                "dead_weight": self._count(dead, "weight"),
                "dead_folded": self._count(dead, "folded"),
                "reactivated": self._drain_events(),
                "reactivated_total": self.reactivated_total,
                "lr": self.schedulers[0].get_last_lr()[0],
                **metrics,
            }
            self.logger.log(self.final)
            self._say_row(self.final, label="end")
            improved = self._update_best(metrics)
        if self.saved_step != self.step or verify:
            self.save(also_best=improved)
        summary = self._summary()
        if self.is_main:
            torch.save(self.backbone.state_dict(), self.out / "backbone.pth.tmp")
            os.replace(self.out / "backbone.pth.tmp", self.out / "backbone.pth")
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.logger.close()
        return summary

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

    def _summary(self) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "steps": self.step,
            "epochs_completed": self.epoch,
            "reactivated_total": self.reactivated_total,
            "decay_budget": self.decay_budget,
            "inactive_filters_now": self.inactive_counts(),
            "dead_now": self.dead_counts(),
            "best": self.best,
            "epochs": self.history,
            "final": self.final,
            "skipped_images": {
                "count": len(self.skipped_images),
                "files": list(self.skipped_images),
                "reasons": list(self.skipped_images.values()),
            },
            "output": str(self.out),
        }


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run a training job and return its summary (then :meth:`Trainer.close`)."""
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.close()
