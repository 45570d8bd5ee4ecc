"""craft_ext.sparsify: the dropping rule, masks through training, the layer-wise schedule.

The scores themselves (``connection_scores`` and its backends) are tested in
test_connection_scores.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from craft_ext import sparsify as sp

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
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="lam"):
            sp.dropping_mask(s, 0.5, lam=bad)
    for bad in ("0.5", True, None):
        with pytest.raises(TypeError, match="lam"):
            sp.dropping_mask(s, 0.5, lam=bad)
    for bad in (0, "cpu", torch.device("cpu")):
        with pytest.raises(TypeError, match="generator"):
            sp.dropping_mask(s, 0.5, generator=bad)
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


def test_schedule_rejects_one_shot_iterators():
    """``data`` is run once per layer: an iterator would be empty for the second layer, after
    the first was already masked, so it is refused before anything is touched."""
    net = tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    calls = []
    batches = toy_batches(2)
    one_shot = [iter(batches), (b for b in batches), map(lambda b: b, batches)]
    for data in one_shot:
        with pytest.raises(TypeError, match="re-iterable"):
            sp.layerwise_schedule(net, ["5", "0"], 0.5, lambda m, n: calls.append(n), data)
    assert not calls
    assert not any(hasattr(m, "weight_mask") for m in net.modules())
    after = net.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert next(one_shot[0]) is batches[0]  # nothing was consumed either
    # a re-iterable (list / tuple) runs every layer
    masks = sp.layerwise_schedule(net, ["5", "0"], 0.5, lambda m, n: calls.append(n), batches)
    assert calls == ["5", "0"] and list(masks) == ["5", "0"]


def test_schedule_through_craft_trainer(tmp_path):
    import itertools

    from craft_ext.train import Trainer, parse_config

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
