"""craft_ext.sparsify: correlation scores against a float64 unfold/corrcoef reference, the
Triton kernel under the interpreter, the dropping rule, masks through training, the schedule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import OPCHECK_TESTS
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import craft_ext
from craft_ext import sparsify as sp


def corr_with_zero_constants(z: torch.Tensor) -> torch.Tensor:
    """float64 Pearson matrix of the rows of ``z`` (variables x samples); constant rows -> 0."""
    z = z.double()
    c = torch.corrcoef(z)
    const = (z == z[:, :1]).all(1)
    c[const, :] = 0.0
    c[:, const] = 0.0
    return c


def reference_linear(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    y = y.reshape(-1, y.shape[-1])
    o = y.shape[1]
    return corr_with_zero_constants(torch.cat([y, x], 1).T)[:o, o:]


def reference_conv(mod: nn.Conv2d, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. 2 through the full float64 im2col (F.unfold) and corrcoef per output position."""
    pad = mod._reversed_padding_repeated_twice
    b = F.unfold(F.pad(x.double(), pad), mod.kernel_size, mod.dilation, 0, mod.stride)
    a = y.double().reshape(y.shape[0], y.shape[1], -1)
    o = a.shape[1]
    assert b.shape[2] == a.shape[2]
    out = torch.zeros(o, b.shape[1], dtype=torch.float64)
    for m in range(a.shape[2]):
        out += corr_with_zero_constants(torch.cat([a[:, :, m], b[:, :, m]], 1).T)[:o, o:].abs()
    return out.reshape(mod.weight.shape)


def conv_case(cin, cout, kernel, stride, padding, dilation, n=6, hw=(7, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    mod = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn((n, cin, *hw), generator=g, dtype=torch.float64)
    x[:, 0, 1, :] = 0.25  # a row constant over samples
    with torch.no_grad():
        y = F.conv2d(
            x, mod.weight.double(), mod.bias.double(), mod.stride, mod.padding, mod.dilation
        )
    return mod, x, y


CONV_CASES = [
    (3, 5, 3, 1, 1, 1),
    (2, 3, (3, 2), (2, 1), (1, 2), (1, 2)),
    (3, 4, 1, 2, 0, 1),
    (1, 2, (2, 3), (1, 3), (0, 1), (2, 1)),
    (2, 3, 3, 1, "same", 2),
]


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv_scores_match_unfold_reference(case):
    mod, x, y = conv_case(*case)
    want = reference_conv(mod, x, y)
    got = sp.connection_scores(mod, x, y, backend="reference")
    assert got.shape == mod.weight.shape and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    # tiny chunks (one output row at a time) give the same answer
    chunked = sp.connection_scores(mod, x, y, backend="reference", chunk_elements=1)
    torch.testing.assert_close(chunked, want, rtol=0, atol=1e-10)
    # float32 activations: float32 result within float32 accuracy
    got32 = sp.connection_scores(mod, (x.float(),), (y.float(),), backend="reference")
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=0, atol=2e-5 * y[0, 0].numel())


def test_conv_scores_large_mean_and_padding_only_taps():
    mod, x, y = conv_case(2, 3, 3, 1, 2, 2, n=9, hw=(5, 5))
    x = x + 1e3  # large means: centring keeps the float32 path accurate
    y = y + 1e3
    want = reference_conv(mod, x, y)
    got = sp.connection_scores(mod, x.float(), y.float(), backend="reference")
    torch.testing.assert_close(got.double(), want, rtol=0, atol=5e-3)


def test_linear_scores_match_corrcoef():
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(7, 5).double()
    x = torch.randn(4, 3, 7, generator=g, dtype=torch.float64)  # leading dims are samples
    x[..., 2] = -3.0  # constant input neuron
    with torch.no_grad():
        y = lin(x)
        y[..., 4] = 0.5  # dead output neuron
    want = reference_linear(x, y)
    x_before, y_before = x.clone(), y.clone()
    got = sp.connection_scores(lin, x, y)
    assert torch.equal(x, x_before) and torch.equal(y, y_before)  # inputs untouched
    assert got.shape == lin.weight.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert (got[:, 2] == 0).all() and (got[4] == 0).all()
    assert (got < 0).any() and (got > 0).any()  # signed for Linear
    got32 = sp.connection_scores(lin, x.float(), y.float())
    torch.testing.assert_close(got32.double(), want, rtol=0, atol=1e-5)


def _require_triton():
    if "triton" not in craft_ext.available_backends("cpu", "connection_scores"):
        pytest.skip("Triton (interpreter) not available for connection_scores")


@pytest.mark.parametrize("case", CONV_CASES[:3], ids=str)
def test_triton_kernel_matches_reference(case):
    _require_triton()
    mod, x, y = conv_case(*case, n=5, hw=(5, 4))
    want = reference_conv(mod, x, y)
    # non-contiguous float32 input (channels_last) exercises the strides
    xs = x.float().contiguous(memory_format=torch.channels_last)
    got = sp.connection_scores(mod, xs, y.float(), backend="triton")
    assert got.dtype == torch.float32 and got.shape == mod.weight.shape
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * y[0, 0].numel())


def test_triton_kernel_position_splits():
    _require_triton()
    mod, x, y = conv_case(2, 3, 3, 2, 1, 1, n=4, hw=(6, 5))
    op = torch.ops.craft_ext.connection_scores_triton
    whole = op(x.float(), y.float(), 3, 3, 2, 2, 1, 1, 1, 1, True)
    for splits in (2, 5, 100):  # 100 > Ho*Wo: clamped to one position per range
        parts = op(x.float(), y.float(), 3, 3, 2, 2, 1, 1, 1, 1, True, splits)
        torch.testing.assert_close(parts, whole, rtol=0, atol=1e-5)
    want = reference_conv(mod, x, y).reshape(3, -1)
    torch.testing.assert_close(whole.double(), want, rtol=0, atol=1e-4)


def test_triton_kernel_linear_and_float64():
    _require_triton()
    g = torch.Generator().manual_seed(2)
    lin = nn.Linear(18, 17).double()
    x = torch.randn(20, 18, generator=g, dtype=torch.float64)  # spans two sample blocks
    x[:, 5] = 2.0
    with torch.no_grad():
        y = lin(x)
    got = sp.connection_scores(lin, x, y, backend="triton")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, reference_linear(x, y), rtol=0, atol=1e-5)
    assert (got[:, 5] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_half_precision_activations(dtype, backend):
    if backend == "triton":
        _require_triton()
    mod, x, y = conv_case(2, 3, 3, 1, 1, 1, n=5, hw=(4, 4))
    x, y = x.to(dtype), y.to(dtype)
    got = sp.connection_scores(mod, x, y, backend=backend)
    assert got.dtype == torch.float32
    want = reference_conv(mod, x, y)  # float64 of the rounded activations
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)


def test_triton_op_fake_and_schema():
    _require_triton()
    x = torch.randn(3, 2, 4, 4)
    y = torch.randn(3, 3, 2, 2)
    op = torch.ops.craft_ext.connection_scores_triton.default
    args = (x, y, 3, 3, 1, 1, 0, 0, 1, 1, True)
    torch.library.opcheck(op, args, test_utils=[t for t in OPCHECK_TESTS if "aot" not in t])
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        out = op(mode.from_tensor(x), mode.from_tensor(y), 3, 3, 1, 1, 0, 0, 1, 1, True)
    assert out.shape == (3, 18) and out.dtype == torch.float32


def test_score_errors():
    conv = nn.Conv2d(2, 3, 3)
    x = torch.randn(4, 2, 5, 5)
    y = conv(x).detach()
    with pytest.raises(TypeError, match="nn.Linear or nn.Conv2d"):
        sp.connection_scores(nn.Conv1d(2, 3, 3), x, y)
    with pytest.raises(ValueError, match="inputs must be"):
        sp.connection_scores(conv, x[0], y)  # wrong rank
    with pytest.raises(ValueError, match="inputs must be"):
        sp.connection_scores(conv, x[:, :1], y)  # wrong channels
    with pytest.raises(ValueError, match="outputs must be"):
        sp.connection_scores(conv, x, y[:, :, :2])
    with pytest.raises(ValueError, match="outputs must be"):
        sp.connection_scores(conv, x, y[:3])
    with pytest.raises(ValueError, match="groups=1"):
        grouped = nn.Conv2d(2, 4, 3, groups=2)
        sp.connection_scores(grouped, x, grouped(x).detach())
    with pytest.raises(ValueError, match="padding_mode"):
        sp.connection_scores(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), x, y)
    with pytest.raises(ValueError, match="at least 2 samples"):
        sp.connection_scores(conv, x[:1], y[:1])
    with pytest.raises(TypeError, match="float"):
        sp.connection_scores(conv, x.long(), y)
    lin = nn.Linear(5, 3)
    with pytest.raises(ValueError, match="Linear inputs"):
        sp.connection_scores(lin, torch.randn(5), torch.randn(3))
    with pytest.raises(ValueError, match="Linear outputs"):
        sp.connection_scores(lin, torch.randn(4, 5), torch.randn(3, 3))
    with pytest.raises(ValueError, match="chunk_elements"):
        sp.connection_scores(conv, x, y, chunk_elements=0)


# --------------------------------------------------------------------------------------------
# Dropping masks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("shape", [(6, 3, 3, 3), (5, 40), (3, 1)])
def test_mask_exact_density(shape, density):
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(shape, generator=g)
    mask = sp.dropping_mask(scores, density, generator=g)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    k = scores[0].numel()
    want = min(k, max(1, round(density * k)))
    assert (mask.reshape(shape[0], -1).sum(1) == want).all()


def test_mask_lambda_split_nonnegative():
    g = torch.Generator().manual_seed(4)
    scores = torch.rand(8, 4, 3, 3, generator=g)  # K = 36, like conv scores (>= 0)
    density, lam = 0.25, 0.75
    mask = sp.dropping_mask(scores, density, lam, generator=g).reshape(8, -1)
    keep = round(density * 36)  # 9
    rank = scores.reshape(8, -1).argsort(1, descending=True).argsort(1)
    high = rank < 18
    assert ((mask & high).sum(1) == round(lam * keep)).all()
    assert ((mask & ~high).sum(1) == keep - round(lam * keep)).all()
    # lam = 1 keeps only from the higher half; lam = 0 only from the lower half
    only_high = sp.dropping_mask(scores, density, 1.0, generator=g).reshape(8, -1)
    assert not (only_high & ~high).any()
    only_low = sp.dropping_mask(scores, density, 0.0, generator=g).reshape(8, -1)
    assert not (only_low & high).any()


def test_mask_signed_split_for_linear():
    g = torch.Generator().manual_seed(5)
    k = 40
    scores = torch.rand(6, k, generator=g) * 2 - 1
    scores[0] = scores[0].abs()  # a row with positive correlations only
    density, lam = 0.3, 0.75
    mask = sp.dropping_mask(scores, density, lam, generator=g)
    keep = round(density * k)
    for i in range(6):
        r = scores[i].double()
        pos, neg = r >= 0, r < 0
        keep_pos = min(max(round(keep * int(pos.sum()) / k), keep - int(neg.sum())), int(pos.sum()))
        for sel, budget in ((pos, keep_pos), (neg, keep - keep_pos)):
            size = int(sel.sum())
            assert int((mask[i] & sel).sum()) == budget
            if size == 0:
                continue
            mags = r.abs().masked_fill(~sel, -1.0)
            high = torch.zeros(k, dtype=torch.bool)
            high[mags.argsort(descending=True)[: (size + 1) // 2]] = True
            n_high = min(max(round(lam * budget), budget - size // 2), (size + 1) // 2)
            assert int((mask[i] & high).sum()) == n_high
            assert int((mask[i] & sel & ~high).sum()) == budget - n_high


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 4), st.integers(1, 25)),
    fractions=st.tuples(st.floats(0.01, 1.0), st.floats(0.0, 1.0)),
    seed=st.integers(0, 2**16),
)
def test_mask_counts_property(shape, fractions, seed):
    (rows, k), (density, lam) = shape, fractions
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(-3, 4, (rows, k), generator=g).float()  # ties and zeros
    mask = sp.dropping_mask(scores, density, lam, generator=g)
    keep = min(k, max(1, round(density * k)))
    assert (mask.sum(1) == keep).all()
    # the kept share of each sign follows its size
    pos = scores >= 0
    n_pos = pos.sum(1)
    kept_pos = (mask & pos).sum(1)
    for i in range(rows):
        want = min(max(round(keep * int(n_pos[i]) / k), keep - (k - int(n_pos[i]))), int(n_pos[i]))
        assert int(kept_pos[i]) == want


def test_mask_random_and_reproducible():
    scores = torch.rand(4, 50)
    a = sp.dropping_mask(scores, 0.2, generator=torch.Generator().manual_seed(0))
    b = sp.dropping_mask(scores, 0.2, generator=torch.Generator().manual_seed(0))
    c = sp.dropping_mask(scores, 0.2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_mask_errors():
    s = torch.rand(3, 4)
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="density"):
            sp.dropping_mask(s, bad)
    with pytest.raises(TypeError, match="density"):
        sp.dropping_mask(s, "0.5")
    with pytest.raises(ValueError, match="lam"):
        sp.dropping_mask(s, 0.5, lam=1.5)
    with pytest.raises(ValueError, match="at least 2 dims"):
        sp.dropping_mask(torch.rand(5), 0.5)
    with pytest.raises(TypeError, match="floating"):
        sp.dropping_mask(torch.ones(3, 4, dtype=torch.long), 0.5)


# --------------------------------------------------------------------------------------------
# Masks through training, the schedule
# --------------------------------------------------------------------------------------------


def tiny_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 8),
    )


def toy_batches(n_batches=3, batch=8, classes=4):
    g = torch.Generator().manual_seed(7)
    return [
        (torch.randn(batch, 3, 7, 7, generator=g), torch.randint(0, classes, (batch,), generator=g))
        for _ in range(n_batches)
    ]


def test_masks_survive_sgd_momentum_weight_decay():
    net = tiny_net()
    masks = {
        "0": sp.dropping_mask(torch.rand(4, 3, 3, 3), 0.3),
        "5": sp.dropping_mask(torch.randn(8, 36), 0.5),
    }
    sp.apply_masks(net, masks)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for images, labels in toy_batches():
        loss = F.cross_entropy(net(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net(toy_batches(1)[0][0])  # recompute weight = weight_orig * mask
    for name, mask in masks.items():
        w = net.get_submodule(name).weight
        assert (w[~mask] == 0).all() and (w[mask] != 0).all()
    sp.remove_masks(net)
    for name, mask in masks.items():
        mod = net.get_submodule(name)
        assert isinstance(mod.weight, nn.Parameter) and not hasattr(mod, "weight_mask")
        assert (mod.weight[~mask] == 0).all()


def test_apply_masks_errors():
    net = tiny_net()
    with pytest.raises(ValueError, match="shape"):
        sp.apply_masks(net, {"0": torch.ones(4, 3, 3, dtype=torch.bool)})
    with pytest.raises(TypeError, match="bool"):
        sp.apply_masks(net, {"0": torch.ones(4, 3, 3, 3)})
    with pytest.raises(KeyError):
        sp.apply_masks(net, {"nope": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(ValueError, match="no weight"):
        sp.apply_masks(net, {"1": torch.ones(1, dtype=torch.bool)})
    assert not any(hasattr(m, "weight_mask") for m in net.modules())


def test_layerwise_schedule_top_down_with_default_retrain():
    net = tiny_net()
    data = toy_batches()
    inner = sp.make_retrain_fn(data, embedding_size=8, num_classes=4, steps=2, lr=0.01)
    calls = []

    def retrain(model, layer):
        # layers above (already masked) are masked when this one is retrained
        calls.append(
            (layer, sorted(n for n, m in model.named_modules() if hasattr(m, "weight_mask")))
        )
        return inner(model, layer)

    layers = ["5", "2", "0"]
    density = {"5": 0.25, "2": 0.5, "0": 0.6}
    masks = sp.layerwise_schedule(
        net, layers, density, retrain, data, generator=torch.Generator().manual_seed(0)
    )
    assert [c[0] for c in calls] == layers
    assert calls[0][1] == ["5"] and calls[1][1] == ["2", "5"] and calls[2][1] == ["0", "2", "5"]
    net(data[0][0])
    for name in layers:
        w = net.get_submodule(name).weight.reshape(masks[name].shape[0], -1)
        k = w.shape[1]
        assert (masks[name].reshape(w.shape[0], -1).sum(1) == round(density[name] * k)).all()
        assert (w[~masks[name].reshape(w.shape)] == 0).all()


def test_trainer_retrain_fn_runs_steps():
    class FakeTrainer:
        def __init__(self):
            self.steps = 0

        def _loader(self):
            return iter(toy_batches(2))

        def train_step(self, images, labels):
            self.steps += 1
            return torch.zeros(())

    t = FakeTrainer()
    sp.trainer_retrain_fn(t, 5)(nn.Linear(1, 1), "fc")
    assert t.steps == 5


def test_schedule_errors():
    net = tiny_net()
    with pytest.raises(ValueError, match="non-empty"):
        sp.layerwise_schedule(net, [], 0.5, None, toy_batches(1))
    with pytest.raises(TypeError, match="not nn.Linear"):
        sp.layerwise_schedule(net, ["1"], 0.5, None, toy_batches(1))
    with pytest.raises(ValueError, match="density"):  # checked before any layer is touched
        sp.layerwise_schedule(net, ["5", "0"], {"5": 0.5, "0": 1.5}, None, toy_batches(1))
    with pytest.raises(KeyError, match="no entry"):
        sp.layerwise_schedule(net, ["5", "0"], {"5": 0.5}, None, toy_batches(1))
    assert not any(hasattr(m, "weight_mask") for m in net.modules())


class _PlainSGD(torch.optim.SGD):
    """Stand-in for craft_ext.ReactivatingSGD where this checkout lacks it (no reactivation)."""

    def __init__(
        self,
        params,
        *,
        reactivate=(),
        method="craft",
        threshold=0.0,
        interval=None,
        seed=0,
        **kwargs,
    ):
        super().__init__(params, **kwargs)


def test_schedule_through_craft_trainer(tmp_path, monkeypatch):
    import itertools

    from craft_ext.train import Trainer, parse_config

    if not hasattr(craft_ext, "ReactivatingSGD"):
        monkeypatch.setattr(craft_ext, "ReactivatingSGD", _PlainSGD, raising=False)

    argv = ["--data", "toy:6:4", "--image-size", "16", "--width", "0.25", "--embedding-size"]
    argv += ["16", "--batch-size", "8", "--workers", "0", "--no-progress", "--val", "toy"]
    trainer = Trainer(parse_config([*argv, "--output", str(tmp_path)]))
    data = [trainer._images(images) for images, _ in itertools.islice(trainer._loader(), 1)]
    step0 = trainer.step
    masks = sp.layerwise_schedule(
        trainer.backbone, ["fc", "layer4.1.conv2"], 0.5, sp.trainer_retrain_fn(trainer, 1), data
    )
    assert trainer.step == step0 + 2  # one train_step per layer, with the masks attached
    trainer.backbone(data[0])
    for name, mask in masks.items():
        w = trainer.backbone.get_submodule(name).weight
        assert (w[~mask] == 0).all()
        assert mask.sum() == round(0.5 * mask[0].numel()) * mask.shape[0]
