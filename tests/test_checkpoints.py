"""Checkpoint formats: ours, the TimeCycle release, CRW's release and torchvision ResNets.

Each foreign file is written the way its project wrote it, with exactly its key names and
shapes (random values), from a torchvision ResNet whose strides and padding are then set
by hand; the features ``load_model`` gives must equal that hand-built network's.
"""
from __future__ import annotations

import argparse
import collections
import types

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from timecycle.cli import _parser, main
from timecycle.config import preset, to_dict
from timecycle.model import affinity, l2_normalize
from timecycle.model.checkpoints import (
    convert_checkpoint,
    load_checkpoint,
    load_model,
    load_timecycle,
    read_checkpoint,
)
from timecycle.train import Progress, build_model, save_training_state

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def random_resnet(arch: str, seed: int = 0) -> nn.Module:
    """torchvision's ResNet, eval mode, with random BatchNorm affines and statistics too,
    so that every tensor of its state dict shows in the features."""
    torch.manual_seed(seed)
    net = getattr(torchvision.models, arch)(weights=None)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def set_stride_one(net: nn.Module, *layers: str) -> nn.Module:
    for layer in layers:
        for m in getattr(net, layer).modules():
            if isinstance(m, nn.Conv2d):
                m.stride = (1, 1)
    return net


def set_padding(net: nn.Module, mode: str) -> nn.Module:
    for m in net.modules():
        if isinstance(m, nn.Conv2d) and sum(m.padding) > 0:
            m.padding_mode = mode
    return net


@torch.no_grad()
def to_layer3(net: nn.Module, rgb: torch.Tensor) -> torch.Tensor:
    x = (rgb - MEAN) / STD
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer3(net.layer2(net.layer1(x)))


@pytest.fixture(scope="module")
def rgb() -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))  # (B, 3, H, W) in [0, 1]


def features(path, rgb, **kw) -> torch.Tensor:
    with torch.no_grad():
        return load_model(path, **kw)(rgb)


# ----------------------------------------------------------------------------- the TimeCycle release


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """checkpoint_14.pth.tar as PyTorch 0.4 wrote it: the legacy (non-zip) serialisation,
    keys under module., 3-D convs with a temporal size of 1, no BatchNorm batch counters."""
    net = random_resnet("resnet50")
    g = torch.Generator().manual_seed(2)
    head = {
        "module.afterconv1.weight": torch.randn(512, 1024, 1, 1, 1, generator=g) * 0.05,
        "module.afterconv3_trans.weight": torch.randn(128, 900, 4, 4, generator=g) * 0.05,
        "module.afterconv4_trans.weight": torch.randn(64, 128, 4, 4, generator=g) * 0.05,
        "module.linear2.weight": torch.randn(3, 1024, generator=g) * 0.05,
        "module.linear2.bias": torch.randn(3, generator=g) * 0.1,
    }
    state = collections.OrderedDict()
    for k, v in net.state_dict().items():
        if not (k.startswith("fc.") or k.endswith("num_batches_tracked")):
            state[f"module.encoderVideo.{k}"] = v[:, :, None] if v.dim() == 4 else v  # (out, in, 1, kh, kw)
    state.update(head)
    path = tmp_path_factory.mktemp("release") / "checkpoint_14.pth.tar"
    torch.save({"epoch": 14, "state_dict": state}, path, _use_new_zipfile_serialization=False)
    return types.SimpleNamespace(path=path, net=set_stride_one(net, "layer3"), head=head)


def test_timecycle_release_features_equal_a_hand_built_resnet50(release, rgb):
    proj = release.head["module.afterconv1.weight"][:, :, 0]  # (512, 1024, 1, 1)
    expected = F.relu(F.conv2d(to_layer3(release.net, rgb), proj))
    got = features(release.path, rgb)
    assert got.shape == (2, 512, 8, 8)
    assert torch.equal(got, expected)


def release_theta(query: torch.Tensor, frame: torch.Tensor, head: dict) -> torch.Tensor:
    """One hop's theta as the release computed it: frame positions flattened column by
    column, softmax at temperature 512 ** -0.5, its localiser, rotation + translation at scale 1/3."""
    b, c = query.shape[:2]
    frame_vec = frame.transpose(2, 3).reshape(b, c, -1).transpose(1, 2)  # (B, 900, C), x-major positions
    corr = (frame_vec @ query.reshape(b, c, -1) / 512**-0.5).softmax(1).view(b, 900, 10, 10)
    x = F.leaky_relu(F.conv2d(corr, head["module.afterconv3_trans.weight"]), 0.1)
    x = F.leaky_relu(F.conv2d(x, head["module.afterconv4_trans.weight"]), 0.1)
    tx, ty, angle = F.linear(x.flatten(1), head["module.linear2.weight"], head["module.linear2.bias"]).unbind(1)
    cos, sin = angle.cos() / 3, angle.sin() / 3
    return torch.stack([torch.stack([cos, -sin, tx], -1), torch.stack([sin, cos, ty], -1)], 1)  # (B, 2, 3)


@torch.no_grad()
def test_timecycle_release_localiser_tracks_as_the_release(release):
    model = load_timecycle(release.path)
    assert model.training and all(p.requires_grad for p in model.parameters())  # ready to fine-tune
    g = torch.Generator().manual_seed(3)
    frame = F.relu(torch.randn(2, 512, 30, 30, generator=g))  # (B, C, 30, 30) post-ReLU features
    query = l2_normalize(frame[..., 8:18, 12:22] + 0.1 * torch.rand(2, 512, 10, 10, generator=g))
    expected = release_theta(query, l2_normalize(frame), release.head)
    torch.testing.assert_close(model.tracker(query, frame).theta, expected, rtol=1e-5, atol=1e-6)
    # The permutation of the localiser's input channels is what makes them agree.
    aff = affinity(query, l2_normalize(frame))
    unpermuted = F.conv2d(aff, release.head["module.afterconv3_trans.weight"])
    assert not torch.allclose(unpermuted, model.tracker.localiser.convs[0](aff), atol=1e-3)


def test_converted_release_loads_and_trains_like_the_release(release, rgb, tmp_path):
    out = tmp_path / "release.pt"
    assert main(["convert", str(release.path), str(out)]) == 0
    assert torch.equal(features(out, rgb), features(release.path, rgb))
    payload = load_checkpoint(out)  # what training reads
    assert payload["source"] == {"format": "timecycle-release", "epoch": 14}
    cfg = preset("timecycle-r50")
    assert payload["config"]["sample"] == to_dict(cfg.sample) and payload["config"]["optim"] == to_dict(cfg.optim)
    model = build_model(cfg)
    model.load_state_dict(payload["model"])  # strict: every weight of the model, tracker included
    direct = load_timecycle(release.path).state_dict()
    assert all(torch.equal(v, direct[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- CRW's release


def write_crw(path, net: nn.Module, conv_names: str = "conv1.weight", args=None) -> None:
    """pretrained.pth as CRW's train.py saved it: model, optimizer, lr_scheduler, epoch, args."""
    state = collections.OrderedDict()
    for k, v in net.state_dict().items():
        if not k.startswith("fc."):
            if conv_names == "conv1.1.weight":
                k = k.replace("conv1.weight", "conv1.1.weight").replace("conv2.weight", "conv2.1.weight")
            state[f"encoder.model.{k}"] = v
    state["selfsim_fc.0.weight"] = torch.randn(128, 512)
    state["selfsim_fc.0.bias"] = torch.randn(128)
    params = [nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[1000, 2000], gamma=0.3)
    args = args or argparse.Namespace(model_type="scratch", temp=0.05, dropout=0.1, clip_len=4, lr=1e-4)
    torch.save({"model": state, "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
                "epoch": 24, "args": args}, path)


@pytest.mark.parametrize(("conv_names", "model_type", "padding"), [
    ("conv1.weight", "scratch", "reflect"),
    ("conv1.1.weight", "scratch", "reflect"),
    ("conv1.weight", "scratch_zeropad", "zeros"),
])
def test_crw_release_features_equal_a_hand_built_resnet18(tmp_path, rgb, conv_names, model_type, padding):
    net = random_resnet("resnet18", seed=4)
    path = tmp_path / "pretrained.pth"
    write_crw(path, net, conv_names, argparse.Namespace(model_type=model_type, temp=0.05))
    hand = set_padding(set_stride_one(net, "layer3", "layer4"), padding)
    got = features(path, rgb)
    assert got.shape == (2, 256, 8, 8)
    assert torch.equal(got, to_layer3(hand, rgb))
    if padding == "reflect":  # and the padding mode matters: zero padding gives other features
        assert not torch.allclose(got, to_layer3(set_padding(hand, "zeros"), rgb), atol=1e-3)


def test_crw_converts_without_a_tracker(tmp_path, rgb):
    src, out = tmp_path / "pretrained.pth", tmp_path / "crw.pt"
    write_crw(src, random_resnet("resnet18", seed=5))
    assert convert_checkpoint(src, out) == "crw"
    assert torch.equal(features(out, rgb), features(src, rgb))
    assert load_checkpoint(out)["config"]["model"]["encoder"] == {
        "arch": "resnet18", "dim": None, "weights": None, "padding_mode": "reflect"}
    with pytest.warns(UserWarning, match=r"crw\.pt: holds no tracker weights"):
        model = load_timecycle(out)
    assert model.encoder.layer3[0].conv1.padding_mode == "reflect"


# ----------------------------------------------------------------------------- torchvision


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_state_dict_features_equal_a_hand_built_resnet(tmp_path, rgb, arch):
    net = random_resnet(arch, seed=6)
    path = tmp_path / f"{arch}.pth"
    torch.save(net.state_dict(), path)
    assert read_checkpoint(path)[0] == "torchvision"
    assert torch.equal(features(path, rgb), to_layer3(set_stride_one(net, "layer3"), rgb))


# ----------------------------------------------------------------------------- ours


def test_ours_round_trips_through_convert(tmp_path, rgb):
    cfg = preset("cpu-small")
    model = build_model(cfg)
    nn.init.normal_(model.encoder.conv1.weight)  # weights no fresh model has
    src, out = tmp_path / "run" / "checkpoint_last.pt", tmp_path / "copy.pt"
    save_training_state(src, model, torch.optim.Adam(model.parameters()), cfg, Progress(step=7))
    assert main(["convert", str(src), str(out)]) == 0
    assert torch.equal(features(out, rgb), features(src, rgb))
    before, after = load_checkpoint(src), load_checkpoint(out)
    assert after["progress"]["step"] == 7 and after["config"] == before["config"] == to_dict(cfg)
    assert after.keys() == before.keys()  # optimiser and random states too: training resumes from the copy
    assert all(torch.equal(v, after["model"][k]) for k, v in before["model"].items())
    assert load_timecycle(out).tracker.localiser.head.weight.equal(model.tracker.localiser.head.weight)


# ----------------------------------------------------------------------------- errors


def test_truncated_files_are_named_as_unreadable(tmp_path, release):
    cfg = preset("cpu-small")
    model = build_model(cfg)
    ours = tmp_path / "ours.pt"
    save_training_state(ours, model, torch.optim.Adam(model.parameters()), cfg, Progress())
    for src, name in ((ours, "cut.pt"), (release.path, "cut.pth.tar")):  # zip and legacy serialisations
        data = src.read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) - 100])
        with pytest.raises(ValueError, match=rf"{name}: not a readable PyTorch checkpoint \(\d+ bytes; truncated"):
            load_model(tmp_path / name)


def test_unrelated_networks_are_refused_with_what_was_expected_and_found(tmp_path):
    other = tmp_path / "mlp.pth"
    torch.save(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).state_dict(), other)
    with pytest.raises(ValueError, match=r"mlp\.pth: not a checkpoint format timecycle recognises") as err:
        load_model(other)
    message = str(err.value)
    assert "Expected a timecycle checkpoint" in message and "torchvision ResNet-18/50" in message
    assert "Found a dict with keys [0.weight, 0.bias, 2.weight, 2.bias]" in message

    deeper = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), deeper)
    expected = (r"resnet34\.pth \(a torchvision ResNet state dict\): its weights do not fit the encoder its "
                r"config describes \(resnet18, .*unexpected \[layer1\.2\.conv1\.weight")
    with pytest.raises(ValueError, match=expected):
        load_model(deeper)


def test_a_foreign_class_needs_trust(tmp_path, rgb, capsys):
    """A CRW file whose args are a SimpleNamespace, a class weights_only refuses."""
    net = random_resnet("resnet18", seed=7)
    src = tmp_path / "legacy.pth"
    write_crw(src, net, args=types.SimpleNamespace(model_type="scratch"))
    with pytest.raises(ValueError, match=r"legacy\.pth: holds a types\.SimpleNamespace object.*--trust-checkpoint"):
        load_model(src)
    with pytest.warns(UserWarning, match=r"legacy\.pth: unpickling types\.SimpleNamespace .* as trusted"):
        got = features(src, rgb, trust=True)
    hand = set_padding(set_stride_one(net, "layer3", "layer4"), "reflect")
    assert torch.equal(got, to_layer3(hand, rgb))

    out = tmp_path / "legacy.pt"
    assert main(["convert", str(src), str(out)]) == 1
    assert "--trust-checkpoint" in capsys.readouterr().err and not out.exists()
    with pytest.warns(UserWarning, match="as trusted"):
        assert main(["convert", str(src), str(out), "--trust-checkpoint"]) == 0
    assert "converted" in capsys.readouterr().out
    assert torch.equal(features(out, rgb), got)  # the converted file is ours: no trust needed any more
    args = _parser().parse_args(["propagate", "--video", "v", "--mask", "m.png", "--out", "o", "--trust-checkpoint"])
    assert args.trust_checkpoint
