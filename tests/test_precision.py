"""The precision policy under bf16 autocast, exercised on the CPU (``train.amp=bf16``): views in
float32 outside autocast, the network under autocast, losses in float32 -- for every method's
training step, the online probe and every evaluation feature kind."""

import sys

import pytest
import torch
from test_methods import TINY_HEADS
from test_train import make_blobs

import onepoch.views.render
from onepoch import methods
from onepoch.eval import embed_split
from onepoch.run import build_model, view_spec_for, view_specs_for
from onepoch.runconfig import load_config
from onepoch.train import train
from onepoch.views import get_preset, load_view_spec, make_views
from onepoch.views.stream import step_view_groups

HEADS = {**TINY_HEADS, "emp_ssl": ["method.pre_feature=32", "method.projector=32-16"]}
# blur and solarize on half the views each, so both run under every test below
VIEW_KEYS = ["views.blur_p=0.5", "views.solarize_p=0.5", "views.size=12"]
SMALL = ["model.arch=resnet10", "model.width=0.125", "data.batch_size=8", "train.threads=1",
         "train.checkpoint_every=100", *VIEW_KEYS]


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    return make_blobs(tmp_path_factory.mktemp("blobs") / "blobs", n_train=32, n_test=16)


@pytest.fixture
def views_never_under_autocast(monkeypatch):
    """Fails the test if any view is rendered while autocast is on (the public renderer, which
    make_views and every caller go through, is wrapped: in its module and in every module that imported it)."""
    real = onepoch.views.render.apply_view_params
    calls = []

    def checked(images, *args, **kwargs):
        calls.append(torch.is_autocast_enabled(images.device.type))
        return real(images, *args, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.startswith("onepoch") and getattr(module, "apply_view_params", None) is real:
            monkeypatch.setattr(module, "apply_view_params", checked)
    yield calls
    assert calls, "no view was rendered"
    assert not any(calls), f"{sum(calls)} of {len(calls)} view renderings ran inside autocast"


def test_views_inside_autocast_stay_float32_and_equal():
    """The crash of `onepoch eval` on a GPU, reproduced on the CPU: the EMP-SSL CIFAR patches with blur
    under bf16 autocast raised in index_copy_. The renderer now turns autocast off itself."""
    images = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    spec = load_view_spec(get_preset("emp_ssl_cifar"), {"blur_p": 1.0, "count": 4})
    plain = make_views(images, spec, torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = make_views(images, spec, torch.Generator().manual_seed(0))
    assert inside.dtype == torch.float32
    assert torch.equal(inside, plain)


@pytest.mark.parametrize("name", list(dict.fromkeys(["emp_ssl", *TINY_HEADS])))
def test_every_method_trains_under_bf16_with_views_outside_autocast(tmp_path, blobs, name,
                                                                     views_never_under_autocast):
    recipe = None if name == "emp_ssl" else f"{name}/fashion_mnist_1epoch"
    extra = ["views.count=4", "views.preset=emp_ssl_fashion_mnist"] if name == "emp_ssl" else []
    config = load_config(recipe, [*SMALL, *HEADS[name], *extra, "train.amp=bf16", "train.max_steps=3",
                                  f"data.root={blobs}", f"train.out={tmp_path}", "name=t"])
    result = train(config, progress_bar=False)
    assert result.steps == 3
    assert torch.isfinite(torch.tensor(result.final_loss))
    for p in result.model.parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all()  # autocast never changes the weights


@pytest.mark.parametrize("kind", ["bag", "full", "map2x2", "grid"])
def test_every_eval_feature_kind_under_bf16(tmp_path, blobs, kind, views_never_under_autocast):
    from onepoch.data.prepared import open_split

    config = load_config(None, [*SMALL, *HEADS["emp_ssl"], "views.preset=emp_ssl_fashion_mnist", "views.count=3",
                                f"data.root={blobs}"])
    split = open_split(blobs, "train")
    torch.manual_seed(0)
    model = build_model(config, 1).eval()
    spec = view_spec_for(config, split.mean, split.std, count=5)
    kw = dict(spec=spec, batch_size=8, device=torch.device("cpu"), seed=0)
    if kind != "bag":
        views_never_under_autocast.append(False)  # only the bag renders views
    low = embed_split(model, split.images[:16], kind, amp=True, **kw)
    full = embed_split(model, split.images[:16], kind, amp=False, **kw)
    assert low.dtype == torch.float32 and low.shape == full.shape and torch.isfinite(low).all()
    # bf16 features: about 3 significant digits per op; relative error of the whole feature matrix
    assert (low - full).norm() / full.norm() < 0.05


def test_bag_features_do_not_depend_on_the_chunking(blobs):
    """A bag of 6 patches embedded 1 view at a time (max_patches = the batch) equals one pass."""
    from onepoch.data.prepared import open_split

    config = load_config(None, [*SMALL, *HEADS["emp_ssl"], "views.preset=emp_ssl_fashion_mnist", f"data.root={blobs}"])
    split = open_split(blobs, "train")
    torch.manual_seed(0)
    model = build_model(config, 1).eval()
    spec = view_spec_for(config, split.mean, split.std, count=6)
    kw = dict(spec=spec, batch_size=8, device=torch.device("cpu"), seed=3)
    one_pass = embed_split(model, split.images[:16], "bag", max_patches=48, **kw)
    chunked = embed_split(model, split.images[:16], "bag", max_patches=8, **kw)
    torch.testing.assert_close(chunked, one_pass, rtol=1e-5, atol=1e-6)


def test_bag_embeds_in_chunks_that_do_not_grow_with_the_bag(blobs, monkeypatch):
    from onepoch.data.prepared import open_split

    config = load_config(None, [*SMALL, *HEADS["emp_ssl"], "views.preset=emp_ssl_fashion_mnist", f"data.root={blobs}"])
    split = open_split(blobs, "train")
    model = build_model(config, 1).eval()
    rows, projector_calls = [], []
    real_backbone = model.backbone.forward
    monkeypatch.setattr(model.backbone, "forward", lambda x: rows.append(x.shape[0]) or real_backbone(x))
    monkeypatch.setattr(model.projection, "forward", lambda x: projector_calls.append(1) or x)
    spec = view_spec_for(config, split.mean, split.std, count=64)
    embed_split(model, split.images[:16], "bag", spec=spec, batch_size=8, device=torch.device("cpu"), seed=0,
                max_patches=40)
    assert max(rows) <= 40 and sum(rows) == 16 * 64
    assert not projector_calls  # the bag reads pre_feature: the projector is never run


@pytest.mark.parametrize("name", ["emp_ssl", "simclr", "vicreg", "barlow_twins", "byol", "swav", "ressl"])
def test_bf16_loss_and_gradients_agree_with_float32(blobs, name):
    """The same model and views with and without autocast: the loss within 1 % (relative), and the
    gradient of all weight tensors together pointing the same way (cosine > 0.9) with a norm within
    15 %. Why these tolerances: bf16 keeps 8 bits of mantissa (rounding 2^-9 ~ 0.2 % per op) and the
    errors add up through ~10 layers; measured on these tiny random-init networks: loss <= 0.5 %,
    cosine 0.945-0.98, norm ratio 0.93-1.09 (the first conv's gradient alone, a sum of cancelling
    terms, drops to a cosine of 0.65 for BYOL, so no per-tensor bound is asserted)."""
    from onepoch.data.prepared import open_split

    recipe = None if name == "emp_ssl" else f"{name}/fashion_mnist_1epoch"
    extra = ["views.count=4", "views.preset=emp_ssl_fashion_mnist"] if name == "emp_ssl" else []
    config = load_config(recipe, [*SMALL, *HEADS[name], *extra, f"data.root={blobs}"])
    split = open_split(blobs, "train")
    specs = view_specs_for(config, split.mean, split.std)
    images = torch.from_numpy(split.images[:16].copy())
    views = step_view_groups([images], specs, seed=0, first_step=0, channels_last=False)[0]

    def loss_and_gradient(amp: bool):
        torch.manual_seed(0)
        model = build_model(config, 1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss, _, _ = model(views)
        assert loss.dtype == torch.float32  # losses in float32 under autocast too
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()
                                         if p.grad is not None and p.ndim > 1])

    loss32, grad32 = loss_and_gradient(False)
    loss16, grad16 = loss_and_gradient(True)
    assert abs(loss16 - loss32) <= 0.01 * abs(loss32)
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.9
    assert abs(grad16.norm() / grad32.norm() - 1) < 0.15


def test_method_registry_is_covered():
    assert set(methods.names()) == set(HEADS)


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(dict.fromkeys(["emp_ssl", *TINY_HEADS])))
def test_every_method_trains_on_cuda_with_the_default_autocast(tmp_path, blobs, name, views_never_under_autocast):
    """On a GPU, train.amp=auto means bf16 autocast and channels_last: 5 steps (of two 4-step epochs),
    views rendered 2 steps per call (the last call renders one), give finite float32 weights."""
    recipe = None if name == "emp_ssl" else f"{name}/fashion_mnist_1epoch"
    extra = ["views.count=4", "views.preset=emp_ssl_fashion_mnist"] if name == "emp_ssl" else []
    config = load_config(recipe, [*SMALL, *HEADS[name], *extra, "train.device=cuda", "train.epochs=2", "train.max_steps=5",
                                  "train.view_steps=2", "train.log_every=2", f"data.root={blobs}",
                                  f"train.out={tmp_path}", "name=t"])
    result = train(config, progress_bar=False)
    assert result.steps == 5 and torch.isfinite(torch.tensor(result.final_loss))
    assert all(p.is_cuda and p.dtype == torch.float32 and torch.isfinite(p).all() for p in result.model.parameters())


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["bag", "full", "map2x2", "grid"])
def test_every_eval_feature_kind_on_cuda_matches_the_cpu(blobs, kind):
    """The same model's features on CUDA under bf16 autocast and on the CPU in float32 agree to the
    bf16 tolerance of the CPU test (the views are the same on both devices)."""
    from onepoch.data.prepared import open_split

    config = load_config(None, [*SMALL, *HEADS["emp_ssl"], "views.preset=emp_ssl_fashion_mnist", f"data.root={blobs}"])
    split = open_split(blobs, "train")
    torch.manual_seed(0)
    model = build_model(config, 1).eval()
    spec = view_spec_for(config, split.mean, split.std, count=5)
    cpu = embed_split(model, split.images[:16], kind, spec=spec, batch_size=8, device=torch.device("cpu"), seed=0)
    gpu = embed_split(model.cuda(), split.images[:16], kind, spec=spec, batch_size=8, device=torch.device("cuda"),
                      seed=0, amp=True, channels_last=True).cpu()
    assert (gpu - cpu).norm() / cpu.norm() < 0.05


@pytest.mark.cuda
def test_step_views_on_cuda_equal_the_cpu_views():
    images = torch.randint(0, 256, (3, 8, 32, 32, 3), dtype=torch.uint8)
    specs = [load_view_spec(get_preset("emp_ssl_cifar"), {"count": 4, "blur_p": 0.5, "solarize_p": 0.5})]
    cpu = step_view_groups(list(images), specs, seed=1, first_step=7, channels_last=False)
    gpu = step_view_groups([b.cuda() for b in images], specs, seed=1, first_step=7, channels_last=True)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b[0].cpu(), a[0], rtol=0, atol=1e-5)
