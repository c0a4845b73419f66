"""Views: parameter ranges, per-op semantics against an independent per-view reference, determinism."""

import colorsys
import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image

from onepoch.errors import ConfigError
from onepoch.views import (
    PRESETS,
    ViewSpec,
    apply_view_params,
    load_view_spec,
    make_views,
    sample_view_params,
)

EMP = PRESETS["emp_ssl_cifar"]


def natural_images(n, h=32, w=32, c=3, seed=0):
    """Smooth random colour images (a few blobs + gradients), uint8 (n, h, w, c)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = np.zeros((n, h, w, c))
    for i in range(n):
        for ch in range(c):
            f = rng.uniform(1, 4, 2)
            out[i, :, :, ch] = 0.5 + 0.5 * np.sin(2 * np.pi * (f[0] * yy + f[1] * xx) + rng.uniform(0, 6))
        out[i] += rng.normal(0, 0.05, (h, w, c))
    return torch.from_numpy(np.clip(out * 255, 0, 255).round().astype(np.uint8))


# ------------------------------------------------------------------------------------------------
# An independent reference: one view at a time, with Pillow for crop + resize and colorsys for hue.
# ------------------------------------------------------------------------------------------------


def ref_view(image, params, i, spec):
    top, left, h, w = (int(v) for v in params.crop[i])
    x = image.numpy().astype(np.float32) / 255
    resample = Image.BILINEAR if spec.interpolation == "bilinear" else Image.BICUBIC
    chans = [np.asarray(Image.fromarray(x[:, :, c], mode="F").crop((left, top, left + w, top + h))
                        .resize((spec.size, spec.size), resample)) for c in range(x.shape[2])]
    v = np.stack(chans, 0).astype(np.float64)  # (C, s, s)
    if params.flip[i]:
        v = v[:, :, ::-1]
    v = np.clip(v * float(params.brightness[i]), 0, 1)
    gray = lambda a: 0.299 * a[0] + 0.587 * a[1] + 0.114 * a[2] if a.shape[0] == 3 else a[0]
    f = float(params.contrast[i])
    v = np.clip(f * v + (1 - f) * gray(v).mean(), 0, 1)
    if v.shape[0] == 3:
        f = float(params.saturation[i])
        v = np.clip(f * v + (1 - f) * gray(v)[None], 0, 1)
        shift = float(params.hue[i])
        if shift != 0:
            out = np.empty_like(v)
            for yy in range(v.shape[1]):
                for xx in range(v.shape[2]):
                    hh, ss, vv = colorsys.rgb_to_hsv(*v[:, yy, xx])
                    out[:, yy, xx] = colorsys.hsv_to_rgb((hh + shift) % 1.0, ss, vv)
            v = out
        if params.grayscale[i]:
            v = np.repeat(gray(v)[None], 3, 0)
    sigma = float(params.blur_sigma[i])
    if sigma > 0:
        r = max(1, math.ceil(3 * spec.blur_sigma[1]))
        t = np.arange(-r, r + 1)
        k = np.exp(-0.5 * (t / sigma) ** 2)
        k /= k.sum()
        pad = np.pad(v, ((0, 0), (r, r), (r, r)), mode="reflect")
        v = np.stack([np.stack([np.convolve(row, k, mode="valid") for row in ch]) for ch in pad])
        v = np.stack([np.stack([np.convolve(col, k, mode="valid") for col in ch.T]).T for ch in v])
    if params.solarize[i]:
        v = np.where(v >= spec.solarize_threshold, 1 - v, v)
    if spec.mean is not None:
        v = (v - np.array(spec.mean).reshape(-1, 1, 1)) / np.array(spec.std).reshape(-1, 1, 1)
    return v


def check_against_reference(images, spec, seed=0, atol=2e-4, **kwargs):
    g = torch.Generator().manual_seed(seed)
    b, h, w, _ = images.shape
    params = sample_view_params(spec, b, h, w, g)
    out = apply_view_params(images, params, spec, **kwargs)
    assert out.shape == (spec.count * b, images.shape[-1], spec.size, spec.size)
    for i in range(out.shape[0]):
        ref = ref_view(images[i % b], params, i, spec)
        np.testing.assert_allclose(out[i].double().numpy(), ref, atol=atol, err_msg=f"view {i}")
    return params


MIXED = ViewSpec(count=3, size=24, crop_scale=(0.2, 1.0), crop_ratio=(0.6, 1.6), flip_p=0.5,
                 jitter_p=0.7, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.3,
                 grayscale_p=0.3, blur_p=0.4, blur_sigma=(0.3, 1.5), solarize_p=0.3,
                 mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


def test_full_pipeline_matches_reference_varied_crops():
    # crops of many sizes -> the per-view matrix path, up- and down-scaling, all ops mixed
    params = check_against_reference(natural_images(6), MIXED, seed=1, chunk=5)
    assert len(set(params.crop[:, 2].tolist())) > 3
    for op in (params.flip, params.grayscale, params.blur_sigma > 0, params.solarize, params.hue != 0):
        assert 0 < int(op.sum()) < len(op)  # every op both applied and skipped somewhere


def test_emp_recipe_matches_reference_shared_crops():
    # all crops the same size -> the shared-matrix path
    spec = dataclasses.replace(EMP, count=4)
    check_against_reference(natural_images(5, seed=3), spec, seed=2)


def test_blur_of_views_smaller_than_its_radius_matches_reference():
    # 5x5 views, blur radius ceil(3 * 2.0) = 6: one reflection cannot pad them (the matrix path)
    spec = ViewSpec(count=4, size=5, crop_scale=(0.3, 1.0), blur_p=1.0, blur_sigma=(0.5, 2.0))
    check_against_reference(natural_images(3, 12, 12, seed=7), spec, seed=4)


def test_bicubic_and_one_channel_match_reference():
    spec = dataclasses.replace(MIXED, interpolation="bicubic", mean=(0.5,), std=(0.25,), count=2)
    check_against_reference(natural_images(4, 28, 28, 1, seed=4), spec, seed=3, atol=3e-4)


def test_emp_crop_is_a_quarter_of_the_image():
    p = sample_view_params(EMP, 50, 32, 32, torch.Generator().manual_seed(0))
    assert torch.all(p.crop[:, 2] == 16) and torch.all(p.crop[:, 3] == 16)
    assert torch.all((p.crop[:, 0] >= 0) & (p.crop[:, 0] <= 16))
    assert torch.all((p.crop[:, 1] >= 0) & (p.crop[:, 1] <= 16))
    # every position is used: the crop is not stuck in a corner
    assert len(set(p.crop[:, 0].tolist())) == 17


def test_crop_scale_and_ratio_ranges():
    spec = ViewSpec(count=1, crop_scale=(0.3, 0.6), crop_ratio=(0.5, 2.0))
    p = sample_view_params(spec, 4000, 64, 64, torch.Generator().manual_seed(0))
    top, left, h, w = p.crop.T.double()
    area = h * w / (64 * 64)
    # integer rounding of sides moves the area by at most ~ (h + w + 1) / 4096
    slack = (h + w + 1) / (64 * 64)
    assert torch.all(area >= 0.3 - slack) and torch.all(area <= 0.6 + slack)
    ratio = w / h
    assert ratio.min() > 0.5 * 0.85 and ratio.max() < 2.0 / 0.85
    assert torch.all(top + h <= 64) and torch.all(left + w <= 64)
    assert area.mean().item() == pytest.approx(0.45, abs=0.02)


def test_crop_falls_back_to_centre_when_nothing_fits():
    spec = ViewSpec(count=1, crop_scale=(1.0, 1.0), crop_ratio=(3.0, 4.0))  # impossible on a square
    p = sample_view_params(spec, 10, 30, 30, torch.Generator().manual_seed(0))
    # whole width, height = round(30 / 3) = 10, centred
    assert p.crop.tolist() == [[10, 0, 10, 30]] * 10


def test_probabilities_and_factor_ranges():
    spec = ViewSpec(count=2, flip_p=0.5, jitter_p=0.8, brightness=0.4, contrast=0.3, saturation=0.2,
                    hue=0.1, grayscale_p=0.2, blur_p=0.1, solarize_p=0.3)
    n = 20000
    p = sample_view_params(spec, n // 2, 32, 32, torch.Generator().manual_seed(0))
    tol = 4 * math.sqrt(0.25 / n)  # 4 standard deviations
    assert p.flip.float().mean().item() == pytest.approx(0.5, abs=tol)
    assert p.grayscale.float().mean().item() == pytest.approx(0.2, abs=tol)
    assert (p.blur_sigma > 0).float().mean().item() == pytest.approx(0.1, abs=tol)
    assert p.solarize.float().mean().item() == pytest.approx(0.3, abs=tol)
    jittered = p.hue != 0
    assert jittered.float().mean().item() == pytest.approx(0.8, abs=tol)
    assert torch.all(p.brightness[~jittered] == 1) and torch.all(p.contrast[~jittered] == 1)
    for f, s in ((p.brightness, 0.4), (p.contrast, 0.3), (p.saturation, 0.2)):
        assert f[jittered].min() >= 1 - s and f[jittered].max() <= 1 + s
        assert f[jittered].min() < 1 - 0.9 * s and f[jittered].max() > 1 + 0.9 * s
    assert p.hue.abs().max() <= 0.1
    sig = p.blur_sigma[p.blur_sigma > 0]
    assert sig.min() >= 0.1 and sig.max() <= 2.0


def test_identity_settings_return_the_input():
    images = natural_images(4, 20, 20)
    spec = ViewSpec(count=2, size=20, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0,
                    jitter_p=0, grayscale_p=0, blur_p=0, solarize_p=0)
    out = make_views(images, spec, torch.Generator().manual_seed(0))
    expect = images.permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(out, torch.cat([expect, expect]), atol=1e-6, rtol=0)
    # jitter applied with identity strengths is also the identity (hue is recomputed through HSV)
    spec = dataclasses.replace(spec, jitter_p=1.0, brightness=0, contrast=0, saturation=0, hue=0)
    torch.testing.assert_close(make_views(images, spec), torch.cat([expect, expect]), atol=1e-6, rtol=0)


def test_always_flip_mirrors_the_image():
    images = natural_images(3, 16, 16)
    spec = ViewSpec(count=1, size=16, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=1.0,
                    jitter_p=0, grayscale_p=0)
    out = make_views(images, spec)
    torch.testing.assert_close(out, images.permute(0, 3, 1, 2).float().flip(3) / 255, atol=1e-6, rtol=0)


def test_patch_major_order():
    images = natural_images(3, 16, 16)
    images[1] = 0  # image 1 is black: every view of it is black
    spec = ViewSpec(count=4, size=8, jitter_p=0, grayscale_p=0)
    out = make_views(images, spec, torch.Generator().manual_seed(0))
    assert out.shape == (12, 3, 8, 8)
    for v in range(4):
        assert out[v * 3 + 1].abs().max() == 0
        assert out[v * 3].abs().max() > 0 and out[v * 3 + 2].abs().max() > 0


def test_same_seed_same_views_and_chunking_does_not_matter():
    images = natural_images(8)
    a = make_views(images, EMP, torch.Generator().manual_seed(5))
    b = make_views(images, EMP, torch.Generator().manual_seed(5), chunk=7)
    c = make_views(images, EMP, torch.Generator().manual_seed(6))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert (a - c).abs().mean() > 0.05


def test_output_dtype_and_memory_format():
    images = natural_images(2)
    spec = dataclasses.replace(EMP, count=2)
    ref = make_views(images, spec, torch.Generator().manual_seed(0))
    bf = make_views(images, spec, torch.Generator().manual_seed(0), dtype=torch.bfloat16, channels_last=True)
    assert bf.dtype == torch.bfloat16 and bf.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(bf.float(), ref, atol=1e-2, rtol=1e-2)


def test_normalize_uses_mean_and_std():
    images = torch.full((2, 8, 8, 3), 255, dtype=torch.uint8)
    spec = ViewSpec(count=1, size=8, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0, jitter_p=0,
                    grayscale_p=0, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    out = make_views(images, spec)
    torch.testing.assert_close(out[:, :, 0, 0], torch.tensor([[1.0, 3.0, 0.5]] * 2))


def test_bad_images_shape_is_rejected():
    with pytest.raises(ValueError, match="B, H, W, C"):
        make_views(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), EMP)


@pytest.mark.cuda
def test_cpu_and_cuda_give_the_same_views():
    images = natural_images(16)
    for spec in (EMP, MIXED):
        cpu = make_views(images, spec, torch.Generator().manual_seed(0))
        gpu = make_views(images.cuda(), spec, torch.Generator().manual_seed(0))
        assert gpu.is_cuda
        torch.testing.assert_close(gpu.cpu(), cpu, atol=2e-4, rtol=0)


# ------------------------------------------------------------------------------------------------
# ViewSpec validation and loading
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    ({"count": 0}, "count"), ({"crop_scale": (0.5, 0.2)}, "crop_scale"), ({"flip_p": 1.5}, "flip_p"),
    ({"hue": 0.7}, "hue"), ({"interpolation": "nearest"}, "interpolation"),
    ({"mean": (0.5,)}, "mean"), ({"mean": (0.5,), "std": (0.0,)}, "std"),
])
def test_invalid_spec_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"ViewSpec.{field}"):
        ViewSpec(**kwargs)


def test_load_view_spec_from_preset_file_and_overrides(tmp_path):
    assert load_view_spec("emp_ssl_cifar") == EMP
    path = tmp_path / "spec.yaml"
    path.write_text("count: 4\nsize: 16\ncrop_scale: [0.2, 0.5]\n")
    spec = load_view_spec(path, {"blur_p": 1.0})
    assert (spec.count, spec.size, spec.crop_scale, spec.blur_p) == (4, 16, (0.2, 0.5), 1.0)
    with pytest.raises(ConfigError, match=r"unknown ViewSpec key 'blurp' \(did you mean 'blur_p'\?\)"):
        load_view_spec("emp_ssl_cifar", {"blurp": 1.0})
    with pytest.raises(ConfigError, match="unknown view preset 'emp_ssl_cifr'.*did you mean 'emp_ssl_cifar'"):
        load_view_spec("emp_ssl_cifr")
    with pytest.raises(ConfigError, match="ViewSpec.count: expected an integer"):
        load_view_spec("emp_ssl_cifar", {"count": "many"})


def test_rendering_into_a_given_output():
    images = natural_images(3)
    spec = dataclasses.replace(MIXED, count=2)
    params = sample_view_params(spec, 3, 32, 32, torch.Generator().manual_seed(2))
    expected = apply_view_params(images, params, spec)
    buffer = torch.full((4, *expected.shape[1:]), float("nan"))
    strided = buffer.view(2, 2, *expected.shape[1:])[:, 0]  # rows of a larger batch: each view contiguous
    for out in (torch.empty_like(expected), buffer[1:3].new_empty(expected.shape)):
        assert apply_view_params(images, params, spec, out=out) is out and torch.equal(out, expected)
    with pytest.raises(ValueError, match="out must be"):
        apply_view_params(images, params, spec, out=torch.empty(5, *expected.shape[1:]))
    few = sample_view_params(spec, 1, 32, 32, torch.Generator().manual_seed(3))
    one = apply_view_params(images[:1], few, spec)
    assert torch.equal(apply_view_params(images[:1], few, spec, out=strided), one) and torch.equal(strided, one)


def test_one_torch_thread_restores_the_thread_count():
    from onepoch.views import one_torch_thread

    before = torch.get_num_threads()
    with one_torch_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
