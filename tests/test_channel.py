"""The BN-aware channel: finding it, detecting dead channels through BN, reviving them whole."""

from __future__ import annotations

import pytest
import torch
from helpers import require_backend
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import craft_ext
from craft_ext import reference
from craft_ext.channel import channel_keys, channels_from_state_dict
from craft_ext.models import get_model

THR = 1e-3


def stem(n=16, *, seed=0, bn_dead=(), w_dead=(), dtype=torch.float32):
    """A conv [n, 3, 3, 3] + BatchNorm2d(n) + PReLU(n) with trained-looking entries.

    Channels in ``bn_dead`` are dead only through BN: gamma 1e-4 and raw max |w| 5e-3 (above
    the paper's 1e-3, so the weight rule misses them); channels in ``w_dead`` have |w| <= 1e-4.
    """
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(3, n, 3, padding=1, bias=False)
    bn = nn.BatchNorm2d(n)
    prelu = nn.PReLU(n)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.2)
        bn.weight.copy_(torch.rand(n, generator=g) + 0.2)
        bn.bias.copy_(torch.randn(n, generator=g) * 0.1)
        bn.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
        bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
        prelu.weight.copy_(torch.rand(n, generator=g) * 0.3)
        for i in bn_dead:
            conv.weight[i] *= 5e-3 / conv.weight[i].abs().max()
            bn.weight[i] = 1e-4
        for i in w_dead:
            conv.weight[i] *= 1e-4 / conv.weight[i].abs().max()
    return conv.to(dtype), bn.to(dtype), prelu.to(dtype)


# ---------------------------------------------------------------------------------------------
# Finding the channel
# ---------------------------------------------------------------------------------------------


def test_channels_of_iresnet_stem_and_blocks():
    net = get_model("r18", width=0.25, num_features=16, input_size=32)
    (c,) = craft_ext.channels_of(net)  # default: the first conv
    assert (c.name, c.bn_name, c.prelu_name) == ("conv1.weight", "bn1", "prelu")
    assert c.weight is net.conv1.weight and c.bn_weight is net.bn1.weight
    assert c.running_var is net.bn1.running_var and c.prelu is net.prelu.weight
    found = {
        ch.name: (ch.bn_name, ch.prelu_name)
        for ch in craft_ext.channels_of(
            net,
            [
                "layer1.0.conv1",
                "layer1.0.conv2.weight",
                "layer1.0.downsample.0",
                "fc",
            ],
            trainable=False,  # the embedding BN `features` has a frozen weight (insightface)
        )
    }
    assert found == {
        "layer1.0.conv1.weight": ("layer1.0.bn2", "layer1.0.prelu"),  # bn1 comes before conv1
        "layer1.0.conv2.weight": ("layer1.0.bn3", None),
        "layer1.0.downsample.0.weight": ("layer1.0.downsample.1", None),
        "fc.weight": ("features", None),
    }
    with pytest.raises(ValueError, match="not a conv / linear layer"):
        craft_ext.channels_of(net, "bn1")
    with pytest.raises(ValueError, match="'features' .* is frozen"):
        craft_ext.channels_of(net, "fc")  # reactivating it could never train its BN entries


def test_channels_of_mobilefacenet_stem():
    net = get_model("mbf", width=0.5, num_features=32, input_size=48)
    (c,) = craft_ext.channels_of(net)
    assert c.filters == 64
    assert (c.name, c.bn_name, c.prelu_name) == (
        "layers.0.layers.0.weight",
        "layers.0.layers.1",
        "layers.0.layers.2",
    )


@pytest.mark.parametrize("network", ["r18", "mbf"])
def test_state_dict_matching_equals_module_matching(network):
    net = get_model(network, width=0.5, num_features=32, input_size=48)
    sd = {f"module.backbone.{k}": v for k, v in net.state_dict().items()}
    by_keys = channels_from_state_dict(sd)
    names = [k for k, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for ch in craft_ext.channels_of(net, names, trainable=False):
        got = by_keys[f"module.backbone.{ch.name}"]
        want_bn = f"module.backbone.{ch.bn_name}" if ch.bn_name else None
        want_prelu = f"module.backbone.{ch.prelu_name}" if ch.prelu_name else None
        assert (got.bn_name, got.prelu_name) == (want_bn, want_prelu), ch.name
    assert channel_keys(net.state_dict())["conv1" if network == "r18" else "layers.0.layers.0"]


def test_channel_of_rejects_bad_entries_and_changes_nothing():
    conv, bn, prelu = stem(8)
    with pytest.raises(ValueError, match=r"bn: .* has 6 channels, the layer has 8 filters"):
        craft_ext.channel_of(conv, nn.BatchNorm2d(6))
    with pytest.raises(TypeError, match="expected a BatchNorm module .* got LayerNorm"):
        craft_ext.channel_of(conv, nn.LayerNorm(8))
    frozen = nn.BatchNorm2d(8)
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        craft_ext.channel_of(conv, frozen)
    assert craft_ext.channel_of(conv, frozen, trainable=False).has_bn  # fine for statistics
    with pytest.raises(ValueError, match="not affine"):
        craft_ext.channel_of(conv, nn.BatchNorm2d(8, affine=False))
    with pytest.raises(ValueError, match="no running statistics"):
        craft_ext.channel_of(conv, nn.BatchNorm2d(8, track_running_stats=False))
    with pytest.raises(ValueError, match="shared slope"):
        craft_ext.channel_of(conv, bn, nn.PReLU())
    with pytest.raises(TypeError, match="prelu"):
        craft_ext.channel_of(conv, bn, nn.ReLU())
    # nothing was modified by the refused reactivations
    before = [t.clone() for t in (conv.weight, bn.weight, bn.bias, bn.running_mean)]
    with torch.no_grad():
        conv.weight[0] *= 1e-6
    before[0] = conv.weight.clone()
    for bad in (nn.BatchNorm2d(6), nn.LayerNorm(8), frozen):
        with pytest.raises((ValueError, TypeError)):
            craft_ext.reactivate_(conv.weight, bn=bad, criterion="folded")
        with pytest.raises((ValueError, TypeError)):
            craft_ext.Reactivator(conv, bn=bad, criterion="folded")
    after = (conv.weight, bn.weight, bn.bias, bn.running_mean)
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    with pytest.raises(ValueError, match="needs bn="):
        craft_ext.reactivate_(conv.weight, criterion="folded")
    with pytest.raises(ValueError, match="criterion must be one of"):
        craft_ext.reactivate_(conv.weight, bn=bn, criterion="gamma")
    with pytest.raises(ValueError, match="no BatchNorm after it"):
        craft_ext.Reactivator(conv, criterion="folded")


# ---------------------------------------------------------------------------------------------
# Detection: the folded criterion
# ---------------------------------------------------------------------------------------------


def test_bn_dead_channel_is_found_by_folded_not_by_weight():
    conv, bn, _ = stem(12, bn_dead=[3, 7])
    raw = craft_ext.filter_stats(conv.weight)
    folded = craft_ext.filter_stats(conv.weight, bn=bn)
    assert (raw.max_abs > THR).all(), "the weight rule sees every filter as alive"
    assert torch.nonzero(folded.max_abs <= THR).flatten().tolist() == [3, 7]
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(folded.max_abs, raw.max_abs * s.abs())
    torch.testing.assert_close(folded.mean, raw.mean * s)
    w = conv.weight.detach().clone()
    r = craft_ext.reactivate_(w, bn=bn, criterion="weight")
    assert int(r.count) == 0 and torch.equal(w, conv.weight)
    r = craft_ext.reactivate_(conv.weight.detach(), bn=bn, criterion="folded")
    assert torch.nonzero(r.reactivated).flatten().tolist() == [3, 7]


# ---------------------------------------------------------------------------------------------
# Reactivation of the whole channel
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_craft_mirror_identity_through_bn(backend):
    """w_i = -w_d, gamma_i = gamma_d, beta_i = -beta_d, mean_i = -mean_d, var_i = var_d,
    slope_i = slope_d bit for bit; then BN_i(conv_i(x)) = -BN_d(conv_d(x)) in eval and train
    mode."""
    require_backend("cpu", backend, "reactivate_")
    conv, bn, prelu = stem(16, bn_dead=[1, 5, 9], w_dead=[12])
    before = {k: v.detach().clone() for k, v in {**dict(bn.state_dict()), "w": conv.weight,
                                                 "slope": prelu.weight}.items()}  # fmt: skip
    with torch.no_grad():
        r = craft_ext.reactivate_(
            conv.weight, bn=bn, prelu=prelu, criterion="folded", backend=backend
        )
    rows = torch.nonzero(r.reactivated).flatten().tolist()
    assert rows == [1, 5, 9, 12]
    d = r.donor[rows]
    assert torch.equal(conv.weight[rows], -before["w"][d])
    assert torch.equal(bn.weight[rows], before["weight"][d])
    assert torch.equal(bn.bias[rows], -before["bias"][d])
    assert torch.equal(bn.running_mean[rows], -before["running_mean"][d])
    assert torch.equal(bn.running_var[rows], before["running_var"][d])
    assert torch.equal(prelu.weight[rows], before["slope"][d])
    keep = [i for i in range(16) if i not in rows]
    assert torch.equal(bn.weight[keep], before["weight"][keep])
    x = torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for mode in ("eval", "train"):
            getattr(bn, mode)()
            y = bn(conv(x))
            torch.testing.assert_close(y[:, rows], -y[:, d], rtol=1e-5, atol=1e-6)
    folded = craft_ext.filter_stats(conv.weight, bn=bn)
    assert (folded.max_abs[rows] > THR).all(), "revived channels are alive through BN"


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 24),
    n_bn_dead=st.integers(0, 24),
    n_w_dead=st.integers(0, 24),
    method=st.sampled_from(craft_ext.METHODS),
    folded=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_channel_rules_property(backend, n, n_bn_dead, n_w_dead, method, folded, seed):
    """Every channel entry of a reactivated channel follows reference.CHANNEL_RULES; other
    channels are bit-identical; detection follows the criterion."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    bn_dead = perm[: min(n, n_bn_dead)]
    w_dead = perm[len(bn_dead) : len(bn_dead) + n_w_dead]
    conv, bn, prelu = stem(n, seed=seed, bn_dead=bn_dead, w_dead=w_dead)
    entries = {
        "bn_weight": bn.weight,
        "bn_bias": bn.bias,
        "running_mean": bn.running_mean,
        "running_var": bn.running_var,
        "prelu": prelu.weight,
    }
    before = {k: v.detach().clone() for k, v in entries.items()}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        r = craft_ext.reactivate_(
            conv.weight,
            bn=bn,
            prelu=prelu,
            criterion="folded" if folded else "weight",
            method=method,
            generator=gen,
            backend=backend,
        )
    dead = set(w_dead) | (set(bn_dead) if folded else set())
    assert set(torch.nonzero(r.inactive).flatten().tolist()) == dead
    hit = r.reactivated
    for name, t in entries.items():
        was = before[name]
        assert torch.equal(t[~hit], was[~hit]), name
        rule = reference.CHANNEL_RULES[name][method]
        if not hit.any() or rule is None:
            assert torch.equal(t, was), name
            continue
        src = r.donor[hit]
        if rule == "copy":
            want = was[src]
        elif rule == "neg":
            want = -was[src]
        else:
            want = torch.full_like(t[hit], float(rule))
        assert torch.equal(t[hit], want), (name, method)


def optimizer_for(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)
    return torch.optim.AdamW(params, lr=1e-2)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_optimizer_state_rows_of_the_channel_are_reset(kind):
    conv, bn, prelu = stem(10)
    model = nn.Sequential(conv, bn, prelu)
    opt = optimizer_for(kind, model.parameters())
    reactivator = craft_ext.Reactivator(conv, bn=bn, prelu=prelu, criterion="folded").attach(opt)
    x = torch.randn(3, 3, 8, 8)
    model(x).square().mean().backward()
    opt.step()
    with torch.no_grad():
        bn.weight[[2, 6]] = 1e-5  # now dead through BN
    state_before = {
        id(p): {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
        for p in (conv.weight, bn.weight, bn.bias, prelu.weight)
    }
    (r,) = reactivator.reactivate()
    assert torch.nonzero(r.reactivated).flatten().tolist() == [2, 6]
    for p in (conv.weight, bn.weight, bn.bias, prelu.weight):
        for key, value in opt.state[p].items():
            if not torch.is_tensor(value) or value.dim() == 0:
                continue  # Adam's step keeps counting
            old = state_before[id(p)][key]
            assert (value[[2, 6]] == 0).all(), (key, p.shape)
            keep = [i for i in range(10) if i not in (2, 6)]
            assert torch.equal(value[keep], old[keep]), (key, p.shape)


def _train(steps, state=None, *, interval=2):
    torch.manual_seed(0)
    conv, bn, prelu = stem(8, seed=3)
    model = nn.Sequential(conv, bn, prelu, nn.Flatten(), nn.Linear(8 * 36, 4))
    opt = craft_ext.ReactivatingSGD(
        model.parameters(),
        lr=0.05,
        momentum=0.9,
        weight_decay=0.5,  # strong decay: channels die and are revived within a few steps
        reactivate=craft_ext.channels_of(model, "0"),
        criterion="folded",
        interval=interval,
        seed=7,
    )
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    log = list(state["log"]) if state else []
    for _ in range(steps):
        x = torch.randn(6, 3, 6, 6, generator=torch.Generator().manual_seed(len(log)))
        loss = model(x).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        with torch.no_grad():  # keep killing a channel (its gamma and filter) before the step
            model[0].weight[len(log) % 8] = 0.0
            model[1].weight[len(log) % 8] = 0.0
        opt.step()
        log.append(float(loss.detach()))
    return {"model": model.state_dict(), "opt": opt.state_dict(), "log": log}, opt


def test_resume_is_bit_identical_with_bn_aware_reactivation():
    straight, opt = _train(10)
    assert opt.total_reactivated > 0
    first, _ = _train(4)
    first = {
        "model": {k: v.clone() for k, v in first["model"].items()},
        "opt": first["opt"],
        "log": first["log"],
    }
    resumed, _ = _train(6, first)
    assert straight["log"] == resumed["log"]
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


def test_reactivator_from_model_and_events():
    net = get_model("r18", width=0.25, num_features=16, input_size=32)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    r = craft_ext.Reactivator.from_model(net).attach(opt)
    assert r.criterion == "folded" and r.names == ["conv1.weight"]
    assert r.channels[0].describe() == "conv1.weight (16 filters) + bn1 + prelu"
    with torch.no_grad():
        net.bn1.weight[[0, 3]] = 0.0
    r.reactivate()
    (ev,) = r.drain_events()
    assert ev.filters == [0, 3] and all(d not in (0, 3) for d in ev.donors)
    assert (net.bn1.weight[[0, 3]] != 0).all()


def _ddp_bn_worker(rank: int, world: int, port: int, out: str) -> None:
    """Each rank holds the same weights but its own BN running variance (as after DDP's last
    forward): rank 1's would call channel 4 dead, rank 0's not."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        conv, bn, prelu = stem(12, seed=5, bn_dead=[1])
        with torch.no_grad():
            s = bn.weight[4] / torch.sqrt(bn.running_var[4] + bn.eps)
            conv.weight[4] *= 2e-3 / (conv.weight[4].abs().max() * s.abs())  # folded max 2e-3
            if rank == 1:
                bn.running_var[4] *= 100.0  # folded max 2e-4 here: dead on rank 1 only
        opt = torch.optim.SGD([*conv.parameters(), *bn.parameters(), *prelu.parameters()], lr=0.1)
        r = craft_ext.Reactivator(conv, bn=bn, prelu=prelu, criterion="folded", seed=3)
        r.attach(opt)
        (res,) = r.reactivate()
        torch.save(
            {
                "weight": conv.weight.detach(),
                "bn": {k: v.clone() for k, v in bn.state_dict().items()},
                "reactivated": res.reactivated,
            },
            f"{out}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_with_different_running_stats_reactivate_identically(tmp_path):
    import socket

    from helpers import spawn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spawn(_ddp_bn_worker, args=(2, port, str(tmp_path)))
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert torch.equal(r0["reactivated"], r1["reactivated"])
    assert torch.nonzero(r0["reactivated"]).flatten().tolist() == [1], "rank 0's statistics"
    assert torch.equal(r0["weight"], r1["weight"])
    for key, value in r0["bn"].items():
        assert torch.equal(value, r1["bn"][key]), key
