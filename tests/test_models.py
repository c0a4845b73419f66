import pytest
import torch

from onepoch.errors import ConfigError
from onepoch.models import build_backbone, mlp, parse_mlp_spec


@pytest.mark.parametrize("arch,feature_dim", [("resnet10", 512), ("resnet18", 512), ("resnet34", 512),
                                               ("resnet50", 2048)])
def test_backbone_shapes(arch, feature_dim):
    net = build_backbone(arch, stem="cifar", width=0.125, in_chans=1)
    assert net.feature_dim == feature_dim // 8
    assert net(torch.randn(2, 1, 16, 16)).shape == (2, feature_dim // 8)


def test_stems():
    cifar = build_backbone("resnet18", stem="cifar", width=0.25)
    imagenet = build_backbone("resnet18", stem="imagenet", width=0.25)
    x = torch.randn(1, 3, 64, 64)
    assert cifar.forward_map(x).shape[-1] == 8      # strides 2,2,2 after a stride-1 stem
    assert imagenet.forward_map(x).shape[-1] == 2   # stem 2 + max-pool 2 + 2,2,2
    assert cifar.conv1.kernel_size == (3, 3) and imagenet.conv1.kernel_size == (7, 7)


def test_parameter_names_follow_torchvision():
    names = set(build_backbone("resnet18", stem="imagenet").state_dict())
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
                "layer2.0.downsample.1.weight", "layer4.1.bn2.bias"):
        assert key in names
    assert not any(k.startswith("fc.") for k in names)
    shapes = {k: tuple(v.shape) for k, v in build_backbone("resnet50", stem="imagenet").state_dict().items()}
    assert shapes["conv1.weight"] == (64, 3, 7, 7)
    assert shapes["layer1.0.conv3.weight"] == (256, 64, 1, 1)
    assert shapes["layer4.2.bn3.weight"] == (2048,)
    assert len([k for k in shapes if k.endswith("weight")]) == 106  # torchvision resnet50 minus fc


def test_bad_model_arguments():
    with pytest.raises(ConfigError, match="did you mean 'resnet18'"):
        build_backbone("resnet81")
    with pytest.raises(ConfigError, match="stem"):
        build_backbone("resnet18", stem="tiny")
    with pytest.raises(ConfigError, match="width"):
        build_backbone("resnet18", width=0)


def test_mlp_from_spec():
    head = mlp(32, "64-64-8")
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert head(torch.randn(4, 32)).shape == (4, 8)
    assert parse_mlp_spec("4096-4096-1024") == [4096, 4096, 1024]
    assert parse_mlp_spec(128) == [128]
    for bad in ("4096-x", "0-3", ""):
        with pytest.raises(ConfigError, match="MLP spec"):
            parse_mlp_spec(bad)


def test_strided_1x1_shortcut_matches_conv2d_on_narrow_channels_last_input():
    """The CPU path of the shortcut conv (subsample, then a stride-1 1x1 conv) gives nn.Conv2d's
    values and gradients; on torch 2.13's CPU build the plain strided kernel corrupts the heap here."""
    import torch.nn.functional as F

    from onepoch.models import Conv1x1

    torch.manual_seed(0)
    conv = Conv1x1(4, 8, stride=2).to(memory_format=torch.channels_last)
    x = torch.randn(6, 4, 9, 9).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = conv(x)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    xr = x.detach().contiguous().requires_grad_()
    wr = conv.weight.detach().clone().requires_grad_()
    yr = F.conv2d(xr, wr, stride=2)  # NCHW reference: a kernel that is fine
    (yr * gy).sum().backward()
    assert y.shape == yr.shape == (6, 8, 5, 5)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(conv.weight.grad, wr.grad, rtol=1e-5, atol=1e-5)
    assert [n for n, _ in conv.named_parameters()] == ["weight"]
