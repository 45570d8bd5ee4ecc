"""Classification heads for margin-based face-recognition training.

* :class:`NormalizedFC`: cosine classifier (normalised embeddings x normalised class centres).
* :class:`PartialFC`: model-parallel classifier in the style of insightface's PartialFC v2.
  Class centres are sharded across the ranks of a process group in contiguous ranges (rank
  ``r`` owns ``[start_r, end_r)``, the first ``num_classes % world`` ranks one row more).
  Every rank all-gathers the embeddings and labels of the global batch, optionally samples
  negative class centres of its shard (positives always kept), applies the margin loss and
  computes a distributed softmax cross-entropy (all-reduce of the row max, of the sum of
  exponentials and of the target logit). The returned loss is the mean over the global batch
  and is identical on every rank. Without ``torch.distributed`` (or with world size 1) it is
  an ordinary full-softmax margin loss.

Host synchronisation: none in the forward or backward pass (sampling uses ``torch.rand``,
``scatter_reduce``, ``topk`` and ``searchsorted`` on the device, at a fixed sample count).
The collectives themselves are the only synchronisation points; ``full_state_dict`` /
``load_full_state_dict`` are meant for checkpointing and may move data freely.

All ranks must pass batches of the same size (``all_gather`` needs equal shapes). Do not wrap
a :class:`PartialFC` in ``DistributedDataParallel``: its shards differ by design. Gradients: the
embedding gradient each rank receives is the full gradient of the global-mean loss for its own
samples (summed over the shards), so after DDP averages the backbone gradients they are
``1 / world_size`` of the single-process gradient on the same global batch (as in insightface).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import IGNORE_INDEX, CombinedMarginLoss

__all__ = ["NormalizedFC", "PartialFC", "shard_range"]


def _group_info(group: Any) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group), dist.get_rank(group)
    return 1, 0


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """Contiguous ``[start, end)`` class range held by ``rank`` out of ``world_size`` ranks."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class _AllGather(torch.autograd.Function):
    """Concatenate a tensor of every rank along dim 0; backward sums gradients over ranks and
    returns this rank's slice."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        world, rank = _group_info(group)
        ctx.group, ctx.world, ctx.rank, ctx.n = group, world, rank, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            out = torch.empty((ctx.n, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
            return out, None
        # gloo has no reduce_scatter: sum everything, keep this rank's rows
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n].clone(), None


def _all_reduce(t: Tensor, op: Any, group: Any, world: int) -> Tensor:
    if world > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _DistSoftmaxCE(torch.autograd.Function):
    """Softmax cross-entropy over class columns split across ranks.

    ``logits`` [N, C_local] float32; ``labels`` [N] local column or -1 (target on another rank
    or ignored); ``weights`` [N] per-sample weight of the mean (0 for ignored samples).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits: Tensor, labels: Tensor, weights: Tensor, group: Any, world: int
    ) -> Tensor:
        has = labels != IGNORE_INDEX
        safe = torch.where(has, labels, torch.zeros_like(labels)).unsqueeze(1)
        row_max = logits.detach().amax(dim=1, keepdim=True)
        row_max = _all_reduce(row_max, dist.ReduceOp.MAX, group, world)
        exp = (logits - row_max).exp_()
        sum_exp = _all_reduce(exp.sum(dim=1, keepdim=True), dist.ReduceOp.SUM, group, world)
        target = torch.where(has.unsqueeze(1), logits.gather(1, safe), torch.zeros_like(row_max))
        target = _all_reduce(target, dist.ReduceOp.SUM, group, world)
        per_sample = (row_max + sum_exp.log() - target).squeeze(1)
        loss = (per_sample * weights).sum()
        exp.div_(sum_exp)  # softmax
        ctx.save_for_backward(exp, safe, has, weights)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        softmax, safe, has, weights = ctx.saved_tensors
        grad = softmax * weights.unsqueeze(1)
        grad.scatter_add_(1, safe, -(weights * has.to(weights.dtype)).unsqueeze(1))
        return grad * grad_out, None, None, None, None


def _cosines(embeddings: Tensor, weight: Tensor, dtype: torch.dtype | None) -> Tensor:
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        e = F.normalize(embeddings.float(), dim=1)
        w = F.normalize(weight.float(), dim=1)
        if dtype is not None and dtype != torch.float32:
            e, w = e.to(dtype), w.to(dtype)
        return F.linear(e, w).float().clamp(-1.0, 1.0)


class NormalizedFC(nn.Module):
    """Cosine classifier: ``normalize(x) @ normalize(W).T`` (float32, in ``[-1, 1]``).

    Args:
        embedding_size: embedding dimension D.
        num_classes: number of class centres C (weight ``[C, D]``, init N(0, 0.01)).
    """

    def __init__(self, embedding_size: int, num_classes: int) -> None:
        super().__init__()
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (self.num_classes, embedding_size)))

    def forward(self, embeddings: Tensor) -> Tensor:
        """Embeddings ``[N, D]`` -> cosines ``[N, C]``."""
        return _cosines(embeddings, self.weight, None)

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, num_classes={self.num_classes}"


MarginFn = Callable[[Tensor, Tensor], Tensor]


class PartialFC(nn.Module):
    """Sharded, optionally sampled margin-softmax classifier (insightface PartialFC v2 style).

    Args:
        embedding_size: embedding dimension D.
        num_classes: total number of classes C over all ranks.
        sample_rate: fraction of this rank's class centres used per step in training
            (positives always kept). The sample count is fixed at
            ``min(num_local, max(int(sample_rate * num_local), global_batch))`` so that every
            positive fits without a host sync; this equals ``int(sample_rate * num_local)``
            whenever that is at least the global batch size. No sampling in eval mode.
        margin_loss: object mapping ``(cosines [N, C_local], local_labels [N])`` to scaled
            logits, either through a ``margin_logits`` method (as :class:`CombinedMarginLoss`)
            or by being called (insightface's ``CombinedMarginLoss`` returns logits).
            Default: CosFace ``CombinedMarginLoss(64, 1.0, 0.0, 0.4)`` (the CRAFT paper's).
        process_group: process group to shard over (default: the world group when
            ``torch.distributed`` is initialised, otherwise a single process).
        compute_dtype: dtype of the cosine matmul (e.g. ``torch.float16`` on GPU for speed);
            None keeps float32. Margins and softmax are always float32.

    ``forward(embeddings [B, D], labels [B]) -> loss`` (scalar, mean over the global batch,
    same value on every rank; labels ``-1`` are ignored). The parameter ``weight`` holds this
    rank's ``[num_local, D]`` shard; :meth:`full_state_dict` / :meth:`load_full_state_dict`
    convert to and from the whole ``[C, D]`` matrix for checkpoints that outlive a world size.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        margin_loss: CombinedMarginLoss | MarginFn | None = None,
        process_group: Any = None,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        world, rank = _group_info(process_group)
        if num_classes < world:
            raise ValueError(f"num_classes ({num_classes}) < world size ({world})")
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)
        self.sample_rate = float(sample_rate)
        self.process_group = process_group
        self.world_size, self.rank = world, rank
        self.class_start, self.class_end = shard_range(self.num_classes, world, rank)
        self.num_local = self.class_end - self.class_start
        self.num_sample = max(1, int(self.sample_rate * self.num_local))
        self.compute_dtype = compute_dtype
        if margin_loss is None:
            margin_loss = CombinedMarginLoss(64.0, 1.0, 0.0, 0.4)
        self.margin_loss = margin_loss
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (self.num_local, embedding_size)))
        #: indices (into the local shard) of the centres used by the last sampled forward
        self.last_index: Tensor | None = None

    # ------------------------------------------------------------------ forward
    def _margin_logits(self, cosines: Tensor, labels: Tensor) -> Tensor:
        fn = getattr(self.margin_loss, "margin_logits", None)
        out = fn(cosines, labels) if fn is not None else self.margin_loss(cosines, labels)
        return out.float()

    def sample(self, local_labels: Tensor, global_batch: int) -> tuple[Tensor, Tensor]:
        """Choose the class centres of this shard to use: all positives plus random negatives.

        Args:
            local_labels: ``[N]`` shard-local label or -1.
            global_batch: N (bounds the number of distinct positives).

        Returns:
            ``(index, remapped_labels)``: sorted shard-local indices ``[k]`` and the labels
            re-expressed as positions in ``index`` (-1 kept).
        """
        k = min(self.num_local, max(self.num_sample, global_batch))
        has = local_labels != IGNORE_INDEX
        safe = torch.where(has, local_labels, torch.zeros_like(local_labels))
        with torch.no_grad():
            score = torch.rand(self.num_local, device=self.weight.device)
            score.scatter_reduce_(0, safe, has.to(score.dtype) * 2.0, reduce="amax")
            index = score.topk(k, sorted=False).indices.sort().values
        remapped = torch.searchsorted(index, safe)
        return index, torch.where(has, remapped, torch.full_like(remapped, IGNORE_INDEX))

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Margin softmax loss of this rank's batch within the global batch (scalar)."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings must be [B, {self.embedding_size}], got {tuple(embeddings.shape)}"
            )
        labels = labels.reshape(-1).long()
        if labels.shape[0] != embeddings.shape[0]:
            raise ValueError("labels and embeddings differ in batch size")
        world, group = self.world_size, self.process_group
        if world > 1:
            embeddings = _AllGather.apply(embeddings, group)
            parts = [torch.empty_like(labels) for _ in range(world)]
            dist.all_gather(parts, labels.contiguous(), group=group)
            labels = torch.cat(parts, 0)
        valid = labels != IGNORE_INDEX
        in_shard = valid & (labels >= self.class_start) & (labels < self.class_end)
        local = torch.where(in_shard, labels - self.class_start, torch.full_like(labels, -1))

        weight = self.weight
        if self.training and self.sample_rate < 1.0:
            index, local = self.sample(local, labels.shape[0])
            self.last_index = index
            weight = weight[index]
        cosines = _cosines(embeddings, weight, self.compute_dtype)
        logits = self._margin_logits(cosines, local)
        weights = valid.float() / valid.sum().clamp_min(1).float()
        return _DistSoftmaxCE.apply(logits, local, weights, group, world)

    # ------------------------------------------------------------------ checkpoints
    def full_state_dict(self) -> dict[str, Tensor]:
        """The whole ``{"weight": [num_classes, D]}`` gathered from every rank (collective:
        call it on all ranks). Returned on the weight's device, detached."""
        w = self.weight.detach()
        if self.world_size == 1:
            return {"weight": w.clone()}
        rows = math.ceil(self.num_classes / self.world_size)
        padded = w.new_zeros((rows, self.embedding_size))
        padded[: self.num_local] = w
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.process_group)
        chunks = []
        for r, p in enumerate(parts):
            s, e = shard_range(self.num_classes, self.world_size, r)
            chunks.append(p[: e - s])
        return {"weight": torch.cat(chunks, 0)}

    def load_full_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load this rank's rows from a whole ``{"weight": [num_classes, D]}`` (any world size
        may have saved it; no communication)."""
        w = state_dict["weight"]
        if tuple(w.shape) != (self.num_classes, self.embedding_size):
            raise ValueError(
                f"expected weight [{self.num_classes}, {self.embedding_size}], got {tuple(w.shape)}"
            )
        with torch.no_grad():
            self.weight.copy_(w[self.class_start : self.class_end])

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"sample_rate={self.sample_rate}, world_size={self.world_size}, rank={self.rank}, "
            f"classes=[{self.class_start}, {self.class_end})"
        )


def check_steps(steps: object) -> int:
    """``steps`` as a positive number of SGD steps, else a ValueError naming it."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    return steps


def margin_sgd_steps(
    model: nn.Module,
    head: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    data: Any,
    steps: int,
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
) -> list[Tensor]:
    """Train ``model`` (images -> embeddings) and ``head`` for ``steps`` SGD steps over ``data``.

    ``data`` is a re-iterable of ``(images, labels)`` batches (list, DataLoader), cycled. A
    fresh SGD optimizer holds the trainable parameters of both (build it after pruning or
    masking, hence here). ``loss_fn(head(model(x)), y)`` is minimised, e.g.
    :class:`CombinedMarginLoss` on a :class:`NormalizedFC`. Returns every step's loss,
    detached, on the device (nothing is read back to the host).

    Raises:
        ValueError: ``steps`` is not a positive int.
    """
    check_steps(steps)
    device = next(model.parameters()).device
    head.to(device)
    params = [p for p in [*model.parameters(), *head.parameters()] if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    model.train()
    losses: list[Tensor] = []
    while len(losses) < steps:
        before = len(losses)
        for images, labels in data:
            loss = loss_fn(head(model(images.to(device))), labels.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
            if len(losses) >= steps:
                break
        if len(losses) == before:
            raise ValueError("training data yielded no batches")
    return losses
