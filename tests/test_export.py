"""`onepoch export`: backbones for torchvision / timm (checked against their own parameter names and
features, tests/reference/export.npz) and as safetensors (read back into a fresh onepoch model)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from reference.formula_weights import formula_input, formula_tensor
from test_train import blobs, tiny_config  # noqa: F401  (fixture)

import onepoch
from onepoch.checkpoints import CHECKPOINT_FORMAT
from onepoch.cli import main
from onepoch.data import open_split
from onepoch.errors import ConfigError
from onepoch.export import resnet_layout
from onepoch.models import build_backbone
from onepoch.run import build_model
from onepoch.runconfig import load_config
from onepoch.train import train

REFERENCE = np.load(Path(__file__).parent / "reference" / "export.npz")
CLASSIFIER = {"fc.weight", "fc.bias"}


def reference_shapes(lib: str, arch: str) -> dict[str, tuple[int, ...]]:
    names, shapes = REFERENCE[f"{lib}.{arch}.names"], REFERENCE[f"{lib}.{arch}.shapes"]
    return {str(n): tuple(json.loads(str(s))) for n, s in zip(names, shapes)}


def fake_checkpoint(tmp_path: Path, arch: str, stem: str = "imagenet", width: float = 1.0, *extra: str) -> Path:
    """An onepoch checkpoint of an EMP-SSL model whose backbone holds the formula weights."""
    config = load_config(None, [f"model.arch={arch}", f"model.stem={stem}", f"model.width={width}",
                                "method.pre_feature=16", "method.projector=16-8", f"data.root={tmp_path / 'none'}",
                                *extra])
    model = build_model(config, 3)
    state = {k: torch.from_numpy(formula_tensor(k.removeprefix("backbone."), tuple(v.shape)))
             if k.startswith("backbone.") else v for k, v in model.state_dict().items()}
    path = tmp_path / "step_0000010.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "step": 10, "model": state, "config": config.to_dict()}, path)
    return path


@pytest.mark.parametrize("lib", ["torchvision", "timm"])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_onepoch_resnets_have_the_libraries_parameter_names(lib, arch):
    ours = {k: tuple(v.shape) for k, v in build_backbone(arch, stem="imagenet").state_dict().items()}
    theirs = reference_shapes(lib, arch)
    assert set(theirs) - set(ours) == CLASSIFIER           # strict=True apart from the classifier
    assert ours == {k: v for k, v in theirs.items() if k not in CLASSIFIER}


@pytest.mark.parametrize("arch", ["resnet18", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_exported_weights_give_the_libraries_features(tmp_path, capsys, arch):
    """The exported file holds, under the libraries' names, the weights for which torchvision's and
    timm's models computed the reference features; loaded back into onepoch, they give those features."""
    ckpt = fake_checkpoint(tmp_path, arch)
    shapes = reference_shapes("torchvision", arch)
    expected = {name: formula_tensor(name, shape) for name, shape in shapes.items() if name not in CLASSIFIER}
    for lib in ("torchvision", "timm"):
        out = tmp_path / f"{lib}.pth"
        assert main(["export", str(ckpt), "--format", lib, "--out", str(out)]) == 0
        assert "strict=False" in capsys.readouterr().out
        exported = torch.load(out, weights_only=True)
        assert reference_shapes(lib, arch) == shapes and set(exported) == set(expected)
        assert all(np.array_equal(tensor.numpy(), expected[name]) for name, tensor in exported.items())
        assert resnet_layout(exported) == (arch, {"stem": "imagenet", "width": 1.0, "in_chans": 3})
        model = onepoch.load_backbone(out)
        with torch.no_grad():
            features = model.double()(torch.from_numpy(formula_input()).double()).numpy()
        assert np.allclose(features, REFERENCE[f"{lib}.{arch}.features"], rtol=1e-6, atol=1e-9)


def test_exported_weights_load_into_torchvision_itself(tmp_path, capsys):
    torchvision = pytest.importorskip("torchvision")     # only where it imports beside this torch
    out = tmp_path / "r18.pth"
    assert main(["export", str(fake_checkpoint(tmp_path, "resnet18")), "--format", "torchvision",
                 "--out", str(out)]) == 0
    model = torchvision.models.resnet18()
    result = model.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert set(result.missing_keys) == CLASSIFIER and not result.unexpected_keys
    model.fc = torch.nn.Identity()
    with torch.no_grad():
        features = model.double().eval()(torch.from_numpy(formula_input()).double()).numpy()
    assert np.allclose(features, REFERENCE["torchvision.resnet18.features"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("args, problem", [
    (("resnet18", "cifar"), r"the cifar stem \(3x3 conv, no max-pool\) is not theirs"),
    (("resnet10", "imagenet"), r"resnet10 is not one of their ResNets"),
    (("resnet18", "imagenet", 0.5), r"width 0.5 is not theirs"),
])
def test_backbones_the_libraries_lack_are_refused_with_advice(tmp_path, capsys, args, problem):
    ckpt = fake_checkpoint(tmp_path, *args)
    assert main(["export", str(ckpt), "--format", "timm", "--out", str(tmp_path / "x.pth")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "use --format safetensors" in err
    assert re.search(problem, err) and not (tmp_path / "x.pth").exists()


def test_a_cifar_stem_run_exports_as_safetensors_and_loads_back(tmp_path, blobs, capsys):  # noqa: F811
    pytest.importorskip("safetensors")
    from safetensors import safe_open

    config = tiny_config(tmp_path, blobs, "train.max_steps=3")     # resnet10, width 1/16, CIFAR stem, 1 channel
    trained = train(config, progress_bar=False).model.backbone.eval()
    out = tmp_path / "exports" / "backbone.safetensors"
    assert main(["export", str(config.run_dir), "--format", "safetensors", "--out", str(out)]) == 0
    assert "onepoch.load_backbone" in capsys.readouterr().out
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(trained.state_dict())
    assert meta["onepoch.constructor"] == "onepoch.models.resnet10"
    assert json.loads(meta["onepoch.kwargs"]) == {"stem": "cifar", "width": 0.0625, "in_chans": 1}
    assert meta["onepoch.step"] == "3" and meta["onepoch.method"] == "emp_ssl"
    split = open_split(blobs, "train")
    assert json.loads(meta["onepoch.normalization"]) == {"mean": split.mean, "std": split.std}

    x = torch.randn(5, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained.float()(x)
        for source in (out, config.run_dir, sorted((config.run_dir / "checkpoints").iterdir())[-1]):
            model = onepoch.load_backbone(source)          # a fresh onepoch model each time
            assert not model.training and model.normalization == {"mean": split.mean, "std": split.std}
            assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-5)


def test_export_errors(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing"), "--format", "safetensors", "--out", str(tmp_path / "x")]) == 2
    assert "neither a run directory nor a checkpoint file" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    assert main(["export", str(tmp_path / "run"), "--format", "timm", "--out", str(tmp_path / "x")]) == 2
    assert "has no checkpoint" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be loaded safely"):
        onepoch.load_backbone(tmp_path / "junk.pt")
    torch.save({"conv1.weight": torch.zeros(8, 3, 5, 5)}, tmp_path / "odd.pth")
    with pytest.raises(ConfigError, match=r"not a ResNet onepoch knows: basic blocks \(0, 0, 0, 0\), 5x5 stem"):
        onepoch.load_backbone(tmp_path / "odd.pth")


def test_export_never_replaces_an_existing_file_without_force(tmp_path, capsys):
    """Issue 29: --out naming an existing file (any file) is refused, byte-identical, unless --force."""
    ckpt = fake_checkpoint(tmp_path, "resnet18")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    for fmt in ("torchvision", "safetensors"):
        assert main(["export", str(ckpt), "--format", fmt, "--out", str(notes)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("onepoch: error: ") and len(err.strip().splitlines()) == 1
        assert f"--out {notes} already exists; pass --force to replace it" in err
        assert notes.read_text() == "my notes\n"
    assert main(["export", str(ckpt), "--format", "torchvision", "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a directory" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--format", "torchvision", "--out", str(notes), "--force"]) == 0
    assert "conv1.weight" in torch.load(notes, weights_only=True)


def test_the_pth_hint_says_how_inputs_were_normalised_since_the_file_cannot(tmp_path, capsys):
    """Issue 29: the .pth export (a bare state_dict) drops the input normalisation that safetensors keeps,
    and its hint did not say so. It now gives the mean/std to apply, or says they are unknown."""
    known = fake_checkpoint(tmp_path, "resnet18", "imagenet", 1.0, "views.mean=[0.5,0.4,0.3]",
                            "views.std=[0.25,0.2,0.125]")
    assert main(["export", str(known), "--format", "timm", "--out", str(tmp_path / "k.pth")]) == 0
    out = capsys.readouterr().out
    assert ("the .pth file does not keep the input normalisation: feed images on the 0..1 scale normalised with "
            "mean [0.5, 0.4, 0.3] and std [0.25, 0.2, 0.125] (per channel)") in out
    unknown = fake_checkpoint(tmp_path, "resnet18")                     # its dataset cannot be opened here
    assert main(["export", str(unknown), "--format", "torchvision", "--out", str(tmp_path / "u.pth")]) == 0
    out = capsys.readouterr().out
    assert ("the .pth file does not keep the input normalisation, and it is unknown here (the run's dataset "
            "cannot be opened): normalise inputs as its training views were") in out
