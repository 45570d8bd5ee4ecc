"""Tests of craft_ext.losses.CombinedMarginLoss against formulas written out here."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from craft_ext.losses import CombinedMarginLoss


def direct_loss(
    cos: torch.Tensor, labels: torch.Tensor, s: float, m1: float, m2: float, m3: float
) -> torch.Tensor:
    """Cross-entropy written per sample, float64: target logit s*(cos(m1*acos(c)+m2) - m3),
    ArcFace fallback c - delta*sin(delta) where the angle passes pi; rows labelled -1 skipped."""
    cos = cos.double()
    losses = []
    for i in range(cos.shape[0]):
        y = int(labels[i])
        if y == -1:
            continue
        row = cos[i] * s
        c = cos[i, y].clamp(-1 + 1e-6, 1 - 1e-6)
        theta = torch.acos(c)
        angle = m1 * theta + m2
        if angle.item() <= math.pi:
            phi = torch.cos(angle)
        else:
            delta = math.pi - (math.pi - m2) / m1
            phi = c - delta * math.sin(delta)
        row = torch.cat([row[:y], (s * (phi - m3)).reshape(1), row[y + 1 :]])
        losses.append(torch.logsumexp(row, 0) - row[y])
    if not losses:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack(losses).mean()


def _cosines(n: int, c: int, seed: int, lo: float = -0.7, hi: float = 0.95) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, c, generator=g)


SETTINGS = {
    "arcface": (64.0, 1.0, 0.5, 0.0),
    "cosface": (64.0, 1.0, 0.0, 0.4),
    "combined": (32.0, 1.0, 0.3, 0.2),
    "sphere_like": (30.0, 1.35, 0.0, 0.0),
    "all_three": (16.0, 0.9, 0.4, 0.15),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_matches_direct_formula(setting: str) -> None:
    s, m1, m2, m3 = SETTINGS[setting]
    cos = _cosines(12, 9, seed=1, lo=-0.99).requires_grad_()
    cos.data[:3, :] = -0.97  # targets past the ArcFace threshold (fallback branch)
    labels = torch.randint(0, 9, (12,), generator=torch.Generator().manual_seed(2))
    loss = CombinedMarginLoss(s, m1, m2, m3)(cos, labels)
    ref = direct_loss(cos, labels, s, m1, m2, m3)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(loss, cos)
    (g_ref,) = torch.autograd.grad(ref, cos)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_arcface_target_logit_values() -> None:
    loss = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)
    c = torch.tensor([0.9, 0.0, -0.5])
    expected = torch.cos(torch.acos(c) + 0.5)
    torch.testing.assert_close(loss.target_logit(c), expected)
    # past the threshold (theta + m > pi) the fallback c - m*sin(m) keeps it monotonic
    c_hard = torch.tensor([-0.95, -0.99])
    torch.testing.assert_close(loss.target_logit(c_hard), c_hard - 0.5 * math.sin(0.5))
    grid = torch.linspace(-1, 1, 2001)
    t = loss.target_logit(grid)
    assert torch.all(t[1:] >= t[:-1])


def test_cosface_is_shifted_cosine() -> None:
    loss = CombinedMarginLoss(64.0, 1.0, 0.0, 0.4)
    cos = _cosines(5, 4, seed=3)
    labels = torch.tensor([0, 1, 2, 3, 0])
    logits = loss.margin_logits(cos, labels)
    expected = cos.clone() * 64
    expected[torch.arange(5), labels] -= 64 * 0.4
    torch.testing.assert_close(logits, expected)


def test_margin_logits_scale_non_targets() -> None:
    cos = _cosines(4, 6, seed=4)
    labels = torch.tensor([1, -1, 5, 0])
    logits = CombinedMarginLoss(10.0, 1.0, 0.5, 0.0).margin_logits(cos, labels)
    mask = torch.ones_like(cos, dtype=torch.bool)
    mask[[0, 2, 3], [1, 5, 0]] = False
    torch.testing.assert_close(logits[mask], 10 * cos[mask])
    torch.testing.assert_close(logits[1], 10 * cos[1])


def test_ignores_label_minus_one() -> None:
    loss_fn = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)
    cos = _cosines(6, 5, seed=5).requires_grad_()
    labels = torch.tensor([0, -1, 3, -1, 4, 1])
    loss = loss_fn(cos, labels)
    keep = labels != -1
    sub = loss_fn(cos[keep], labels[keep])
    torch.testing.assert_close(loss, sub)
    torch.testing.assert_close(loss.double(), direct_loss(cos, labels, 64.0, 1.0, 0.5, 0.0))
    loss.backward()
    assert torch.all(cos.grad[~keep] == 0)
    assert torch.all(cos.grad[keep].abs().sum(1) > 0)
    none = loss_fn(cos, torch.full((6,), -1))
    assert none.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("setting", ["arcface", "cosface", "combined"])
def test_half_precision_near_unit_cosine_is_finite(dtype: torch.dtype, setting: str) -> None:
    s, m1, m2, m3 = SETTINGS[setting]
    loss_fn = CombinedMarginLoss(s, m1, m2, m3)
    base = torch.tensor([[1.0, -1.0, 0.3], [0.9999, 0.2, -1.0], [-1.0, 1.0, 0.0], [0.5, 0.5, 1.0]])
    labels = torch.tensor([0, 0, 0, 2])
    cos = base.to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        loss = loss_fn(cos, labels)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(cos.grad).all()
    ref = direct_loss(base.to(dtype).float(), labels, s, m1, m2, m3)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-4)


def test_autocast_matmul_input() -> None:
    """Cosines produced inside autocast (half dtype) still give a float32, accurate loss."""
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    w = torch.nn.functional.normalize(torch.randn(10, 16), dim=1)
    labels = torch.randint(0, 10, (8,))
    loss_fn = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos = emb @ w.T
        loss = loss_fn(cos, labels)
    assert cos.dtype == torch.bfloat16 and loss.dtype == torch.float32
    ref = loss_fn((emb @ w.T), labels)
    assert abs(float(loss) - float(ref)) < 0.05 * float(ref)


def test_interclass_filtering() -> None:
    cos = torch.tensor([[0.8, 0.5, 0.1], [0.6, 0.2, 0.55]])
    labels = torch.tensor([0, -1])
    loss_fn = CombinedMarginLoss(1.0, 1.0, 0.0, 0.0, interclass_filtering_threshold=0.4)
    logits = loss_fn.margin_logits(cos, labels)
    # row 0: target 0.8 kept, negative 0.5 > 0.4 zeroed; row 1 has no target: all > 0.4 zeroed
    expected = torch.tensor([[0.8, 0.0, 0.1], [0.0, 0.2, 0.0]])
    torch.testing.assert_close(logits, expected)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        CombinedMarginLoss(0.0, 1.0, 0.5, 0.0)
    with pytest.raises(ValueError):
        CombinedMarginLoss(64.0, 0.0, 0.5, 0.0)
    with pytest.raises(ValueError):
        CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))


@settings(max_examples=25, deadline=None)
@given(
    s=st.floats(1.0, 64.0),
    m1=st.floats(0.8, 1.5),
    m2=st.floats(0.0, 0.6),
    m3=st.floats(0.0, 0.5),
    seed=st.integers(0, 2**16),
)
def test_matches_direct_formula_property(
    s: float, m1: float, m2: float, m3: float, seed: int
) -> None:
    cos = _cosines(5, 4, seed=seed, lo=-0.999, hi=0.999)
    labels = torch.randint(-1, 4, (5,), generator=torch.Generator().manual_seed(seed + 1))
    loss = CombinedMarginLoss(s, m1, m2, m3)(cos, labels)
    ref = direct_loss(cos, labels, s, m1, m2, m3)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-4)
