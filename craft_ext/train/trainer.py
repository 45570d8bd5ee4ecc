"""The ``craft-train`` training loop: ArcFace/CosFace on an iresnet backbone with CRAFT.

The CRAFT paper's setting (Bhatta et al., arXiv 2312.00072): SGD (momentum 0.9, weight decay
5e-4), combined-margin loss, and reactivation of the first conv layer's inactive filters at
every epoch end (``ReactivatingSGD``). Runs on one device or many (torchrun: DDP, partial FC
sharded across ranks).

Determinism: the batch order of epoch e comes from a generator seeded by (seed, e); flips from
one seeded by (seed, step); so a run resumed from a checkpoint (which carries the model,
head, optimizer, scheduler, RNG and data position) continues exactly as an uninterrupted run
would (bit-identical on CPU).
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

import craft_ext
from craft_ext.channel import channels_of
from craft_ext.checkpoint import CHECKPOINT_FORMAT, atomic_copy, atomic_save, load_checkpoint
from craft_ext.train.config import TrainConfig
from craft_ext.train.logging import RunLogger
from craft_ext.train.toy import ToyFaces, toy_pairs

__all__ = ["EpochBatches", "TrainingDiverged", "Trainer", "decay_budget", "train"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the run stopped without overwriting good checkpoints."""


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


class EpochBatches(Sampler[list[int]]):
    """Deterministic, resumable, rank-sharded batches of one epoch.

    Epoch ``e``'s order is a permutation drawn from a generator seeded by ``(seed, e)``; the
    first ``len // (batch_size * world)`` global batches are kept (drop_last), global batch b is
    split across ranks, and the first ``skip`` batches of this rank are left out (resume).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        rank: int = 0,
        world: int = 1,
        skip: int = 0,
    ) -> None:
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.rank, self.world, self.skip = rank, world, skip
        self.batches_per_epoch = n // (batch_size * world)

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.skip)

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        usable = self.batches_per_epoch * self.batch_size * self.world
        grid = perm[:usable].view(self.batches_per_epoch, self.world, self.batch_size)
        for b in range(self.skip, self.batches_per_epoch):
            yield grid[b, self.rank].tolist()


def _collate(items: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    images = torch.stack([torch.as_tensor(img) for img, _ in items])
    labels = torch.tensor([int(label) for _, label in items], dtype=torch.int64)
    return images, labels


def _parse_toy(spec: str) -> tuple[int, int]:
    parts = spec.split(":")
    try:
        classes = int(parts[1]) if len(parts) > 1 else 100
        per_class = int(parts[2]) if len(parts) > 2 else 24
    except ValueError:
        raise ValueError(f"--data {spec!r}: expected toy[:CLASSES[:IMAGES_PER_CLASS]]") from None
    return classes, per_class


def build_train_set(cfg: TrainConfig) -> tuple[Dataset, int]:
    """The training data set named by ``cfg.data`` and its number of identities."""
    spec = cfg.data
    if spec == "toy" or spec.startswith("toy:"):
        classes, per_class = _parse_toy(spec)
        return ToyFaces(classes, per_class, size=cfg.image_size, seed=cfg.seed), classes
    from craft_ext import data as cdata

    if spec == "synthetic" or spec.startswith("synthetic:"):
        classes, per_class = _parse_toy(spec)
        ds = cdata.SyntheticFaceDataset(
            num_classes=classes,
            num_samples=classes * per_class,
            size=cfg.image_size,
            seed=cfg.seed,
        )
        return ds, classes
    path = Path(spec)
    # resized in the loader workers as the verification sets are (PIL bilinear + centre crop)
    resize = cdata.Resize(cfg.image_size)
    if (path / "train.rec").is_file():
        ds = cdata.RecordIODataset(path, transform=resize)
        return ds, ds.num_classes
    if path.is_dir():
        ds = cdata.ImageFolderDataset(
            path,
            transform=resize,
            identities=cfg.identities,
            min_images=cfg.min_images,
            on_error=cfg.on_error,
            progress=cfg.progress,
        )
        return ds, ds.num_classes
    raise FileNotFoundError(
        f"--data {spec!r}: not 'toy', 'synthetic', an image folder or a RecordIO directory"
    )


def build_val_sets(cfg: TrainConfig) -> list[Any]:
    """Verification sets named by ``cfg.val`` (:class:`craft_ext.eval.VerificationSet`)."""
    from craft_ext.eval import VerificationSet, load_verification_set

    out = []
    for spec in cfg.val:
        if spec == "toy":
            images, issame = toy_pairs(600, size=cfg.image_size, seed=cfg.seed)
            out.append(VerificationSet("toy", images, issame, 10))
        else:
            out.append(load_verification_set(spec, image_size=cfg.image_size, progress=False))
    return out


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


def decay_budget(lrs: list[float], weight_decay: float, momentum: float) -> float:
    """The decay budget D = sum_t lr_t * weight_decay / (1 - momentum) of an SGD schedule.

    With coupled weight decay and momentum mu, a weight that gets no useful gradient shrinks
    by about exp(-D) over the run: channels whose gradient fades die when D is large
    (arcface_torch's r50 recipes have D of about 17 or more; a few-minute CPU run well under 1).
    """
    return float(sum(lrs)) * weight_decay / (1.0 - momentum)


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


class Trainer:
    """One ``craft-train`` run: construct with a :class:`TrainConfig`, then :meth:`run`."""

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
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)

        torch.manual_seed(cfg.seed)
        self.train_set, self.num_classes = build_train_set(cfg)
        self.val_sets = build_val_sets(cfg) if self.is_main else []

        from craft_ext.heads import PartialFC
        from craft_ext.losses import CombinedMarginLoss
        from craft_ext.models import get_model

        residual_scale: Any = cfg.residual_scale
        if residual_scale not in (None, "trainable"):
            residual_scale = float(residual_scale)
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
                f"reactivate_layers: {unknown} are not parameters of {cfg.network}; e.g. "
                f"{list(params)[:4]}"
            )
        #: each layer's channel (its BatchNorm / PReLU, found by craft_ext.channels_of)
        self.channels = {
            ch.name: ch for ch in channels_of(self.backbone, self.layers, trainable=False)
        }
        self.watched = list(self.layers) if cfg.reactivation != "none" else []
        if cfg.criterion == "folded":
            # BN-aware: detect on the folded filter, reactivate the whole channel
            no_bn = [n for n in self.layers if not self.channels[n].has_bn]
            if no_bn:
                raise ValueError(
                    f"--criterion folded: {no_bn} {'is' if len(no_bn) == 1 else 'are'} followed "
                    "by no BatchNorm with running statistics; use --criterion weight"
                )
            targets: list[Any] = [(ch.name, ch) for ch in channels_of(self.backbone, self.watched)]
        else:
            targets = [(n, params[n]) for n in self.watched]
        self.optimizer = craft_ext.ReactivatingSGD(
            self.backbone.parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            reactivate=targets,
            method=cfg.reactivation if cfg.reactivation != "none" else "craft",
            criterion=cfg.criterion,
            threshold=cfg.threshold,
            interval=cfg.reactivate_every,
            seed=cfg.seed,
        )
        self.head_optimizer = torch.optim.SGD(
            self.head.parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
        )
        self.steps_per_epoch = len(
            EpochBatches(
                len(self.train_set), cfg.batch_size, seed=cfg.seed, epoch=0, world=self.world
            )
        )
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"batch_size {cfg.batch_size} x {self.world} process(es) exceeds the "
                f"{len(self.train_set)} training images: no full batch per epoch"
            )
        self.total_steps = cfg.epochs * self.steps_per_epoch
        warmup = int(cfg.warmup_epochs * self.steps_per_epoch)
        lam = _poly_lambda(self.total_steps, warmup, cfg.poly_power)
        self.decay_budget = decay_budget(
            [cfg.lr * lam(t) for t in range(self.total_steps)], cfg.weight_decay, cfg.momentum
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
        self.batch_in_epoch = 0
        self.best: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []
        self.reactivated_total = 0
        self.last_good_checkpoint: Path | None = None
        if cfg.plant_inactive:  # checked now, not after the first epoch that plants them
            self._first_conv_weight(cfg.plant_inactive)
            if cfg.plant_through == "bn" and not self.channels[self.layers[0]].has_bn:
                raise ValueError(
                    f"--plant-through bn: {self.layers[0]} is followed by no BatchNorm"
                )
        if cfg.resume is not None:
            self._load(cfg.resume)
        self.logger = RunLogger(
            self.out, enabled=self.is_main, resume_step=self.step if cfg.resume else None
        )

    # -- helpers ---------------------------------------------------------------------------

    def _first_conv_name(self) -> str:
        """The parameter name of the first conv's weight (conv1.weight for an iresnet)."""
        from craft_ext.models import first_conv

        conv = first_conv(self.backbone)
        return next(f"{n}.weight" for n, m in self.backbone.named_modules() if m is conv)

    def _first_conv_weight(self, plant: int) -> Tensor:
        """The first conv's weight; raises if it has fewer than ``plant`` filters."""
        from craft_ext.models import first_conv

        w = first_conv(self.backbone).weight
        if plant > w.shape[0]:
            raise ValueError(f"plant_inactive {plant} exceeds the {w.shape[0]} first-layer filters")
        return w

    def _plant_inactive(self, count: int) -> None:
        """Kill ``count`` first-layer channels (demo / stress test), chosen by the seed:
        ``plant_through="weight"`` scales their filters by 1e-4 (dead by the paper's rule);
        ``"bn"`` sets their BatchNorm gamma to 1e-4 and scales their filters to max |w| = 5e-3
        (dead only through BN, as in released models: the weight rule misses them)."""
        w = self._first_conv_weight(count)
        g = torch.Generator().manual_seed(self.cfg.seed + 99)
        rows = torch.randperm(w.shape[0], generator=g)[:count].to(w.device)
        with torch.no_grad():
            if self.cfg.plant_through == "bn":
                ch = self.channels[self.layers[0]]
                peak = w[rows].abs().flatten(1).amax(1).clamp_min(1e-30)
                w[rows] *= (5e-3 / peak).view(-1, *[1] * (w.dim() - 1)).to(w.dtype)
                ch.bn_weight[rows] = 1e-4  # type: ignore[index]
            else:
                w[rows] *= 1e-4

    def _layer_stats(self, name: str) -> dict[str, Tensor]:
        """Filter statistics of layer ``name`` on the host: ``max_abs``, ``l1``, ``mean``,
        ``std`` of the raw filters, and with a BatchNorm after the layer ``folded_max_abs`` /
        ``folded_l1`` (times |gamma / sqrt(running_var + eps)|, the BN-folded filters, as
        ``craft_ext.filter_stats(w, bn=bn)``) and ``bn_weight``."""
        ch = self.channels[name]
        with torch.no_grad():
            stats = craft_ext.filter_stats(ch.weight.detach())
            out = dict(stats._asdict())
            scale = ch.folded_scale()
            if scale is not None:
                a = scale.abs()
                out["folded_max_abs"] = stats.max_abs * a
                out["folded_l1"] = stats.l1 * a
                out["bn_weight"] = ch.bn_weight.detach().float()  # type: ignore[union-attr]
        return {k: v.cpu() for k, v in out.items()}  # one read-back per tensor: logging only

    def _dead(self, stats: dict[str, Tensor]) -> dict[str, int]:
        """Dead filters by each criterion (folded only with a BatchNorm)."""
        thr = self.cfg.threshold
        out = {"weight": int((stats["max_abs"] <= thr).sum())}
        if "folded_max_abs" in stats:
            out["folded"] = int((stats["folded_max_abs"] <= thr).sum())
        return out

    def dead_counts(self) -> dict[str, dict[str, int]]:
        """Per logged layer, dead filters by the weight and the folded criterion (host
        read-back: logging only)."""
        return {name: self._dead(self._layer_stats(name)) for name in self.layers}

    def inactive_counts(self) -> dict[str, int]:
        """Inactive filters per logged layer by the run's ``--criterion``."""
        key = self.cfg.criterion
        return {n: d.get(key, d["weight"]) for n, d in self.dead_counts().items()}

    def _record_filter_stats(self, when: str) -> dict[str, dict[str, int]]:
        """Log every logged layer's filter statistics; returns their dead counts (as
        :meth:`dead_counts`, from the same statistics)."""
        counts = {}
        for name in self.layers:
            stats = self._layer_stats(name)
            counts[name] = self._dead(stats)
            self.logger.log_filter_stats(
                {
                    "epoch": self.epoch,
                    "step": self.step,
                    "layer": name,
                    "when": when,
                    "threshold": self.cfg.threshold,
                    **{k: v.tolist() for k, v in stats.items()},
                }
            )
        return counts

    def _count(self, dead: dict[str, dict[str, int]], criterion: str | None = None) -> int:
        key = criterion or self.cfg.criterion
        return sum(d.get(key, d["weight"]) for d in dead.values())

    def _drain_events(self) -> int:
        count = 0
        for ev in self.optimizer.drain_events():
            filters = list(ev.filters)
            count += len(filters)
            self.logger.log_reactivation(
                {
                    "step": ev.step,
                    "epoch": self.epoch,
                    "param": ev.name,
                    "method": ev.method,
                    "filters": filters,
                    "donors": list(ev.donors),
                }
            )
        self.reactivated_total += count
        return count

    def _images(self, images: Tensor) -> Tensor:
        g = torch.Generator().manual_seed(self.cfg.seed * 7_000_003 + self.step)
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

    def _loader(self) -> DataLoader:
        sampler = EpochBatches(
            len(self.train_set),
            self.cfg.batch_size,
            seed=self.cfg.seed,
            epoch=self.epoch,
            rank=self.rank,
            world=self.world,
            skip=self.batch_in_epoch,
        )
        return DataLoader(
            self.train_set,
            batch_sampler=sampler,
            num_workers=self.cfg.workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            # the loader's own seed source: creating an iterator must not draw from the global
            # RNG (dropout's), or a run resumed mid-epoch would diverge from an unbroken one
            generator=torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.epoch),
        )

    def train_step(self, images: Tensor, labels: Tensor) -> Tensor:
        """One optimizer step; returns the loss (on device, not read back)."""
        x = self._images(images)
        labels = labels.to(self.device, non_blocking=True)
        self.model.train()
        self.head.train()
        with torch.autocast(
            self.device.type,
            dtype=self.amp_dtype or torch.float32,
            enabled=self.amp_dtype is not None,
        ):
            emb = self.model(x)
        loss = self.head(emb.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.head_optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.backbone.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.step(self.head_optimizer)
        self.scaler.update()
        for s in self.schedulers:
            s.step()
        self.step += 1
        return loss.detach()

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

    # -- checkpoints -----------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        head_full = self.head.full_state_dict()  # collective under DDP: every rank calls it
        return {
            "format": CHECKPOINT_FORMAT,
            "backbone": self.backbone.state_dict(),
            "head": head_full,
            "optimizer": self.optimizer.state_dict(),
            "head_optimizer": self.head_optimizer.state_dict() if self.world == 1 else None,
            "schedulers": [s.state_dict() for s in self.schedulers],
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "batch_in_epoch": self.batch_in_epoch,
            "world_size": self.world,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device)
            if self.device.type == "cuda"
            else None,
            "best": dict(self.best),
            "history": list(self.history),
            "reactivated_total": self.reactivated_total,
            "config": self.cfg.to_dict(),
        }

    def save(self, name: str = "checkpoint_last.pt", *, also_best: bool = False) -> Path | None:
        """Write a checkpoint atomically (rank 0; collective: call on every rank); returns its
        path. ``also_best`` (read on rank 0 only) also writes ``checkpoint_best.pt``."""
        state = self._state()
        if not self.is_main:
            return None
        path = atomic_save(state, self.out / name)
        if name == "checkpoint_last.pt":
            self.last_good_checkpoint = path
        if also_best:  # the same bytes: copied, not serialised a second time
            atomic_copy(path, self.out / "checkpoint_best.pt")
        return path

    def _load(self, where: str) -> None:
        ckpt = load_checkpoint(where, map_location="cpu")
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"--resume {where}: not a craft-train checkpoint")
        self.backbone.load_state_dict(ckpt["backbone"])
        self.head.load_full_state_dict(ckpt["head"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("head_optimizer") is not None and ckpt.get("world_size") == self.world:
            self.head_optimizer.load_state_dict(ckpt["head_optimizer"])
        elif self.is_main:
            print("craft-train: world size changed; head momentum restarts from zero")
        for s, sd in zip(self.schedulers, ckpt["schedulers"], strict=True):
            s.load_state_dict(sd)
        self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.batch_in_epoch = int(ckpt["batch_in_epoch"])
        if ckpt.get("world_size", 1) != self.world:
            # batch positions are per world size: restart the interrupted epoch's remainder
            done = self.batch_in_epoch * ckpt.get("world_size", 1)
            self.batch_in_epoch = min(done // self.world, self.steps_per_epoch)
        torch.set_rng_state(ckpt["rng"])
        if ckpt.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["cuda_rng"], self.device)
        self.best = dict(ckpt.get("best", {}))
        self.history = list(ckpt.get("history", []))
        self.reactivated_total = int(ckpt.get("reactivated_total", 0))

    # -- the loop ----------------------------------------------------------------------------

    def _check_finite(self, loss_value: float) -> None:
        if math.isfinite(loss_value):
            return
        where = self.last_good_checkpoint or "none saved yet"
        raise TrainingDiverged(
            f"loss is {loss_value} at step {self.step} (epoch {self.epoch}); stopping. The last "
            f"good checkpoint is kept: {where}. Try a lower --lr, --clip-grad, or --amp bf16."
        )

    def run(self) -> dict[str, Any]:
        """Train to ``epochs`` (or ``max_steps``); returns the summary (also summary.json)."""
        cfg = self.cfg
        max_steps = cfg.max_steps if cfg.max_steps is not None else self.total_steps
        progress = None
        if self.is_main and cfg.progress:
            from tqdm import tqdm

            progress = tqdm(
                total=min(max_steps, self.total_steps),
                initial=self.step,
                desc="craft-train",
                unit="step",
                dynamic_ncols=True,
            )
        loss_sum = torch.zeros((), device=self.device)
        loss_count = 0
        t_last, images_since = time.perf_counter(), 0
        stopped_early = False
        try:
            while self.epoch < cfg.epochs and self.step < max_steps:
                for images, labels in self._loader():
                    loss_sum += self.train_step(images, labels)
                    loss_count += 1
                    self.batch_in_epoch += 1
                    if cfg.stats_every and self.step % cfg.stats_every == 0:
                        self._record_filter_stats("step")
                    images_since += images.shape[0] * self.world
                    if progress is not None:
                        progress.update(1)
                    if self.step % cfg.log_every == 0 or self.step >= max_steps:
                        loss_value = float(loss_sum / max(loss_count, 1))
                        self._check_finite(loss_value)
                        now = time.perf_counter()
                        ips = images_since / max(now - t_last, 1e-9)
                        inactive = sum(self.inactive_counts().values())
                        reactivated = self._drain_events()
                        record = {
                            "kind": "step",
                            "step": self.step,
                            "epoch": self.epoch,
                            "loss": loss_value,
                            "lr": self.schedulers[0].get_last_lr()[0],
                            "inactive_filters": inactive,
                            "reactivated": reactivated,
                            "reactivated_total": self.reactivated_total,
                            "images_per_s": ips,
                        }
                        if cfg.val_every and self.step % cfg.val_every == 0:
                            record.update(self.evaluate())
                        self.logger.log(record)
                        if progress is not None:
                            progress.set_postfix(
                                loss=f"{loss_value:.3f}", img_s=f"{ips:.0f}", inactive=inactive
                            )
                        loss_sum.zero_()
                        loss_count, t_last, images_since = 0, now, 0
                    if cfg.save_every and self.step % cfg.save_every == 0:
                        self.save()
                    if self.step >= max_steps:
                        break
                if self.batch_in_epoch >= self.steps_per_epoch:
                    self._end_epoch()
                elif self.step >= max_steps:
                    stopped_early = True
                    break
        finally:
            if progress is not None:
                progress.close()
        if loss_count:
            self._check_finite(float(loss_sum / loss_count))
        if stopped_early or self.cfg.max_steps is not None:
            self.save()
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

    def _end_epoch(self) -> None:
        """Epoch end: CRAFT reactivation (every epoch end but the last), statistics,
        verification (every ``val_every_epochs`` and after the last), checkpoints."""
        if self.cfg.plant_inactive and self.epoch == 0:
            # demo only: filters die over a long run (weight decay outweighs their gradient);
            # a few-minute demo simulates that state at the first epoch end
            self._plant_inactive(self.cfg.plant_inactive)
        before = self._record_filter_stats("before")
        last = self.epoch + 1 >= self.cfg.epochs
        # not after the last epoch: a channel reactivated then would never train, and the
        # final model (and its verification) would carry untrained rewrites
        if self.watched and self.cfg.reactivate_every is None and not last:
            self.optimizer.reactivate()
        reactivated = self._drain_events()
        after = self._record_filter_stats("after")
        every = self.cfg.val_every_epochs
        metrics = self.evaluate() if last or (every and (self.epoch + 1) % every == 0) else {}
        entry = {
            "kind": "epoch",
            "epoch": self.epoch,
            "step": self.step,
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
        self.epoch += 1
        self.batch_in_epoch = 0
        accuracies = [k for k in metrics if k.endswith("/accuracy")]
        improved = bool(accuracies) and metrics[accuracies[0]] > self.best.get(accuracies[0], -1.0)
        for key in accuracies:
            self.best[key] = max(metrics[key], self.best.get(key, -1.0))
        # verification runs on rank 0 only, so only rank 0 knows whether this epoch improved:
        # gather the (collective) state once on every rank, then write last (and best)
        self.save(also_best=improved)  # the first --val set decides which checkpoint is best

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
            "output": str(self.out),
        }


def format_summary(summary: dict[str, Any]) -> str:
    """A readable table of a run's epochs."""
    accs = sorted({k for e in summary["epochs"] for k in e if k.endswith("/accuracy")})
    head = f"{'epoch':>5} {'step':>6} {'inactive':>8} {'reactiv.':>8} {'after':>6}"
    head += "".join(f" {k.split('/')[1][:14]:>14}" for k in accs)
    lines = [head]
    for e in summary["epochs"]:
        row = (
            f"{e['epoch']:>5} {e['step']:>6} {e['inactive_filters']:>8} "
            f"{e['reactivated']:>8} {e['inactive_after']:>6}"
        )
        row += "".join(f" {e.get(k, float('nan')):>14.4f}" for k in accs)
        lines.append(row)
    lines.append(
        f"steps {summary['steps']}, reactivated filters in total {summary['reactivated_total']}, "
        f"inactive now {summary['inactive_filters_now']}, best {summary['best']}"
    )
    lines.append(f"outputs in {summary['output']}")
    return "\n".join(lines)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run a training job and return its summary (then :meth:`Trainer.close`)."""
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.close()
