"""craft_ext.pruning and craft-prune (Diba & Khosravi, IASC 2023 filter pruning)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from craft_ext.data.synthetic import SyntheticFaceDataset
from craft_ext.models import get_model
from craft_ext.pruning import (
    _vote_threshold,
    find_prunable,
    load_pruned,
    profile,
    prunable_layers,
    prune,
    save_pruned,
    select_samples,
)
from craft_ext.pruning_cli import _load_backbone, finetune
from craft_ext.pruning_cli import main as prune_main
from craft_ext.train.toy import ToyFaces


def _small_iresnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = get_model("r18", width=0.125, num_features=16, input_size=32)
    for m in model.modules():  # non-trivial BN statistics so a wrong channel map shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
        if isinstance(m, nn.PReLU):
            m.weight.data.uniform_(0.1, 0.4)
    return model.eval()


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_prunable_layers_iresnet():
    chains = prunable_layers(_small_iresnet())
    assert list(chains)[:2] == ["layer1.0.conv1", "layer1.1.conv1"] and len(chains) == 8
    c = chains["layer2.1.conv1"]
    assert (c.bn, c.act, c.consumer) == ("layer2.1.bn2", "layer2.1.prelu", "layer2.1.conv2")
    assert "conv1" not in chains and "layer1.0.conv2" not in chains  # meet residual adds


def test_zero_downstream_channels_prune_without_changing_output():
    model = _small_iresnet()
    plan = {"layer1.0.conv1": [0, 5], "layer3.1.conv1": [1, 2, 30]}
    with torch.no_grad():
        for name, channels in plan.items():
            model.get_submodule(name.replace("conv1", "conv2")).weight[:, channels] = 0.0
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(x)
        pruned = prune(model, plan)
        got = pruned.eval()(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the original is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_state[k]), k
    assert pruned.layer3[1].conv1.out_channels == 29 and pruned.layer3[1].conv2.in_channels == 29
    assert pruned.layer3[1].prelu.num_parameters == 29 and pruned.layer3[1].bn2.num_features == 29
    # per channel: conv1 [cin, 3, 3] + bn2 weight, bias + prelu slope + conv2 [cout, 3, 3]
    expected = 2 * (8 * 9 + 2 + 1 + 8 * 9) + 3 * (32 * 9 + 2 + 1 + 32 * 9)
    assert _params(model) - _params(pruned) == expected


def test_generic_sequential_chain():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(5, 4, 1),
    ).eval()
    chains = prunable_layers(model)
    assert set(chains) == {"0", "3"}
    assert (chains["0"].bn, chains["0"].act, chains["0"].consumer) == ("1", "2", "3")
    assert (chains["3"].bn, chains["3"].act, chains["3"].consumer) == (None, "4", "5")
    plan = {"0": [2, 4], "3": [0]}
    with torch.no_grad():
        model[3].weight[:, [2, 4]] = 0.0
        model[5].weight[:, [0]] = 0.0
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
        pruned = prune(model, plan)
        torch.testing.assert_close(pruned(x), want, rtol=1e-5, atol=1e-5)
    # conv0 out (w + b) + bn (w + b) + conv3 in, then conv3 out (w + b) + conv5 in; the
    # conv3 weights of the dropped (in, out) pairs are counted once
    expected = 2 * (3 * 9 + 1 + 2 + 5 * 9) + (6 * 9 + 1 + 4) - 2 * 1 * 9
    assert _params(model) - _params(pruned) == expected


def _voting_model() -> nn.Module:
    """1x1 conv with known maps: 0 normal, 1 empty, 2 = 2 * map 0 (redundant), 3 = input 2."""
    conv = nn.Conv2d(3, 4, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[0, :, 0, 0] = torch.tensor([1.0, 0.5, 0.0])
        conv.weight[2] = 2 * conv.weight[0]
        conv.weight[3, 2, 0, 0] = 1.0
    return nn.Sequential(conv, nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()


@pytest.mark.parametrize("vote,want3", [(0.8, False), (0.6, True)])
def test_voting(vote, want3):
    images = torch.randn(10, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    images[:7, 2] = 0.0  # map 3 is empty in 70% of the images
    plan = find_prunable(_voting_model(), images, vote=vote)
    assert plan == {"0": [1, 2, 3] if want3 else [1, 2]}


def test_voting_keeps_one_filter_and_uses_populous_identities():
    model = _voting_model()
    with torch.no_grad():
        model[0].weight.zero_()  # every map empty: channel 0 is still kept
    assert find_prunable(model, torch.randn(4, 3, 5, 5), samples=4) == {"0": [1, 2, 3]}
    assert select_samples([0, 1, 1, 2, 2, 2, 3], 4) == [1, 3, 4, 5]
    assert select_samples(torch.tensor([5, 5, 6]), 10) == [0, 1, 2]

    # identity 2 (4 images) then identity 1 (3 images, ties broken by label) are the most
    # populous, and neither is at the front or the back of the data
    labels = [0, 1, 2, 2, 3, 1, 2, 4, 2, 1]
    want = [1, 2, 3, 6, 8]  # identity 2: 2, 3, 6, 8; then the first image of identity 1
    assert select_samples(labels, 5) == want

    class Labelled(torch.utils.data.Dataset):
        def __init__(self, with_labels: bool = True):
            if with_labels:
                self.labels = labels

        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            # every pixel of image i is i (+ noise far below 0.5): the model reads its index
            img = torch.full((3, 4, 4), float(i)) + 0.01 * torch.randn(3, 4, 4)
            return img, labels[i]

    def picked(data) -> tuple[list[int], dict[str, list[int]]]:
        seen: list[int] = []
        model = _voting_model()
        model[0].register_forward_pre_hook(
            lambda _m, inp: seen.extend(inp[0][:, 0].mean(dim=(1, 2)).round().int().tolist())
        )
        plan = find_prunable(model, data, samples=5, batch_size=2)
        return sorted(seen), plan

    from_dataset, plan = picked(Labelled())
    assert from_dataset == want
    loader = torch.utils.data.DataLoader(Labelled(), batch_size=3)
    from_loader, loader_plan = picked(loader)
    assert from_loader == want and loader_plan == plan
    assert picked(Labelled(with_labels=False)) == (want, plan)  # labels read from the items
    assert find_prunable(_voting_model(), Labelled(), samples=4) == find_prunable(
        _voting_model(), loader, samples=4
    )


def test_vote_threshold_is_exact():
    # k of n images as a vote fraction needs exactly k votes (0.55 * 100 = 55.00000000000001)
    for n in range(1, 201):
        for k in range(1, n + 1):
            assert _vote_threshold(k / n, n) == k, (k, n)
    # two-decimal votes: ceil(p * n / 100) in integers
    for n in (1, 7, 99, 100, 101, 200, 1000):
        for p in range(1, 101):
            assert _vote_threshold(p / 100, n) == -(-p * n // 100), (p, n)
    assert _vote_threshold(0.8, 100) == 80 and _vote_threshold(0.801, 100) == 81


@pytest.mark.parametrize("flagged,vote,want3", [(55, 0.55, True), (54, 0.55, False)])
def test_voting_exact_fraction(flagged, vote, want3):
    images = torch.randn(100, 3, 6, 6, generator=torch.Generator().manual_seed(4))
    images[:flagged, 2] = 0.0  # map 3 is empty in exactly `flagged` of the 100 images
    plan = find_prunable(_voting_model(), images, vote=vote, samples=100)
    assert plan == {"0": [1, 2, 3] if want3 else [1, 2]}


def test_find_prunable_reads_back_once(monkeypatch):
    model = _small_iresnet()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    want = find_prunable(model, x, corr_threshold=0.5)
    assert len(want) == 8 and any(want.values())
    calls = {"cpu": 0, "tolist": 0, "item": 0}
    for meth in calls:
        orig = getattr(torch.Tensor, meth)

        def counted(self, *args, _orig=orig, _meth=meth, **kwargs):
            calls[_meth] += 1
            return _orig(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, meth, counted)
    assert find_prunable(model, x, corr_threshold=0.5) == want
    monkeypatch.undo()
    assert calls["cpu"] == 1 and calls["tolist"] == 1 and calls["item"] == 0, calls


def test_find_prunable_layer_validation():
    model = _small_iresnet()
    x = torch.randn(2, 3, 32, 32)
    for name in ("conv1", "layer1.0.conv2", "layer2.0.downsample.0"):
        with pytest.raises(ValueError, match=rf"layer '{name}' cannot be pruned"):
            find_prunable(model, x, layers=["layer1.0.conv1", name])
    with pytest.raises(ValueError, match=r"'layer1\.1\.conv1' is listed more than once"):
        find_prunable(model, x, layers=["layer1.1.conv1", "layer2.0.conv1", "layer1.1.conv1"])
    with pytest.raises(TypeError, match="not the str"):
        find_prunable(model, x, layers="layer1.0.conv1")
    plan = find_prunable(model, x, layers=["layer2.0.conv1", "layer1.1.conv1"])
    assert list(plan) == ["layer2.0.conv1", "layer1.1.conv1"]
    prune(model, plan)  # every plan find_prunable returns is accepted


def test_synthetic_datasets_have_labels():
    syn = SyntheticFaceDataset(3, 7, size=8)
    assert syn.labels == [syn[i][1] for i in range(len(syn))] == [0, 1, 2, 0, 1, 2, 0]
    toy = ToyFaces(3, 2, size=16)
    assert toy.labels == [toy[i][1] for i in range(len(toy))] == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("kind", ["synthetic", "toy"])
def test_find_prunable_decodes_only_the_chosen_items(kind, monkeypatch):
    if kind == "synthetic":
        cls, data = SyntheticFaceDataset, SyntheticFaceDataset(4, 40, size=32)
    else:
        cls, data = ToyFaces, ToyFaces(4, 10, size=32)
    read: list[int] = []
    orig = cls.__getitem__

    def counted(self, i):
        read.append(i)
        return orig(self, i)

    monkeypatch.setattr(cls, "__getitem__", counted)
    find_prunable(_small_iresnet(), data, samples=6)
    want = select_samples([data.labels[i] for i in range(len(data))], 6)
    assert sorted(read) == want  # labels from the dataset: only the 6 chosen images decoded


def test_prune_plan_values_may_be_tensors_or_empty():
    model = _small_iresnet()
    want = prune(model, {"layer1.0.conv1": [0, 5], "layer2.0.conv1": []})
    got = prune(model, {"layer1.0.conv1": torch.tensor([0, 5]), "layer2.0.conv1": torch.tensor([])})
    assert got.layer1[0].conv1.out_channels == 6 and got.layer2[0].conv1.out_channels == 16
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(got.eval()(x), want.eval()(x))


def test_profile_counts():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(256, 5)
    )
    prof = profile(model, 8)
    assert prof["params"] == 4 * 27 + 256 * 5 + 5
    assert prof["macs"] == 64 * 4 * 27 + 256 * 5
    assert prof["flops"] == 2 * prof["macs"] + 5


def test_save_and_load_pruned(tmp_path):
    model = _small_iresnet()
    plan = {"layer2.0.conv1": [3, 7]}
    pruned = prune(model, plan)
    options = {"width": 0.125, "num_features": 16, "input_size": 32}
    save_pruned(pruned, tmp_path / "p.pt", network="r18", options=options, plan=plan)
    again = load_pruned(tmp_path / "p.pt").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), pruned.eval()(x))


def test_errors():
    model = _small_iresnet()
    with pytest.raises(ValueError, match="cannot be pruned"):
        prune(model, {"layer1.0.conv2": [0]})
    with pytest.raises(ValueError, match="cannot be pruned"):
        prune(model, {"nope": [0]})
    with pytest.raises(ValueError, match=r"distinct indices in \[0, 8\)"):
        prune(model, {"layer1.0.conv1": [8]})
    with pytest.raises(ValueError, match="distinct"):
        prune(model, {"layer1.0.conv1": [1, 1]})
    with pytest.raises(ValueError, match="cannot prune all 8 channels"):
        prune(model, {"layer1.0.conv1": list(range(8))})
    with pytest.raises(TypeError, match="plan must be a mapping"):
        prune(model, [("layer1.0.conv1", [0])])
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="vote must be in"):
        find_prunable(model, x, vote=0.0)
    with pytest.raises(ValueError, match="samples must be a positive int"):
        find_prunable(model, x, samples=0)
    with pytest.raises(ValueError, match="not a Conv2d"):
        find_prunable(model, x, layers=["layer1.0.bn2"])
    with pytest.raises(ValueError, match="not a module"):
        find_prunable(model, x, layers=["layer9"])
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        find_prunable(model, torch.randn(3, 32, 32))


def test_cli_smoke(tmp_path, capsys):
    torch.save(_small_iresnet().state_dict(), tmp_path / "backbone.pth")
    out = tmp_path / "out"
    argv = [str(tmp_path / "backbone.pth"), "--data", "synthetic", "--output", str(out)]
    argv += ["--samples", "8", "--synthetic-images", "16", "--synthetic-classes", "4"]
    argv += ["--corr-threshold", "0.5", "--finetune-steps", "2", "--finetune-batch-size", "4"]
    assert prune_main(argv) == 0
    plan = json.loads((out / "plan.json").read_text())["plan"]
    report = json.loads((out / "profile.json").read_text())
    n_pruned = sum(len(v) for v in plan.values())
    assert n_pruned > 0, "a 0.5 correlation threshold on 2x2 maps must flag filters"
    assert report["after"]["params"] < report["before"]["params"]
    assert len(report["finetune_losses"]) == 2
    tuned = load_pruned(out / "finetuned_backbone.pt")
    start = load_pruned(out / "pruned_backbone.pt")
    assert _params(tuned) == report["after"]["params"] == _params(start)
    assert any(
        not torch.equal(a, b) for a, b in zip(tuned.parameters(), start.parameters(), strict=True)
    )
    assert "pruned" in capsys.readouterr().out


def test_load_backbone_wrapped_and_prefixed(tmp_path):
    model = _small_iresnet(seed=3)
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd, "epoch": 7}, tmp_path / "wrapped.pth")
    loaded, network, options = _load_backbone(str(tmp_path / "wrapped.pth"), None)
    assert network == "r18" and options["num_features"] == 16
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x))
    # a run directory holding backbone.pth
    torch.save(model.state_dict(), tmp_path / "backbone.pth")
    assert _load_backbone(str(tmp_path), "r18")[1] == "r18"


def test_finetune_needs_steps():
    data = SyntheticFaceDataset(2, 4, size=32)
    for steps in (0, -1, 1.0, True):
        with pytest.raises(ValueError, match="steps must be a positive int"):
            finetune(_small_iresnet(), data, 2, steps=steps, batch_size=2)


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        prune_main(["--help"])
    assert "--finetune-steps" in capsys.readouterr().out
    assert prune_main([str(tmp_path / "missing.pth"), "--data", "synthetic", "--output", "o"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
