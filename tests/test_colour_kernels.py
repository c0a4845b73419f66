"""The fused numba colour kernels (onepoch.views.kernels) against the eager torch ops they replace on
CPU, and their hue rotation against Python's colorsys."""

from __future__ import annotations

import colorsys
import threading

import numpy as np
import pytest
import torch

from onepoch.views import kernels as colour_kernels
from onepoch.errors import ConfigError
from onepoch.views import ViewParams, ViewSpec, apply_view_params, get_preset, sample_view_params, seeded_generator

pytest.importorskip("numba")

TOL = 3e-6  # float rounding: the kernel sums the contrast mean in float64 and forms the hue per sector


def render_both(monkeypatch, images, params, spec, **kwargs):
    """(eager torch, fused kernel) renders of the same views."""
    monkeypatch.setenv("ONEPOCH_CPU_KERNELS", "torch")
    assert not colour_kernels.available()
    eager = apply_view_params(images, params, spec, **kwargs)
    monkeypatch.setenv("ONEPOCH_CPU_KERNELS", "auto")
    assert colour_kernels.available()
    return eager, apply_view_params(images, params, spec, **kwargs)


def uint8_images(n: int, side: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(n, 3, side // 8, side // 8, generator=g), size=(side, side),
                                             mode="bilinear", align_corners=False)
    noisy = (smooth + 0.15 * torch.rand(n, 3, side, side, generator=g)).clamp(0, 1)
    return (noisy * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


RECIPES = {
    "emp_ssl_cifar": {},  # jitter 0.8, grayscale 0.2, no blur
    "simclr_cifar": {"blur_p": 0.5, "solarize_p": 0.2},  # every op, blurred and solarized views mixed
}


@pytest.mark.parametrize("preset", sorted(RECIPES))
# dense resampling (views blurred in the kernel, or by the eager ops when no larger than the radius 6);
# then resized one at a time
@pytest.mark.parametrize("side,size", [(32, 32), (24, 16), (12, 6), (200, 96)])
def test_fused_kernel_equals_the_eager_ops(monkeypatch, preset, side, size):
    spec = ViewSpec(**{**get_preset(preset).to_dict(), "count": 12, "size": size, **RECIPES[preset]})
    images = uint8_images(3, side)
    params = sample_view_params(spec, 3, side, side, seeded_generator(5))
    eager, fused = render_both(monkeypatch, images, params, spec)
    assert fused.dtype == torch.float32 and fused.shape == eager.shape
    assert (fused - eager).abs().max().item() <= TOL
    # every kind of view occurs, so each branch of the kernel was compared
    assert params.grayscale.any() and (~params.grayscale).any() and (params.hue != 0).any() and (params.hue == 0).any()
    if RECIPES[preset]:
        assert (params.blur_sigma > 0).any() and (params.solarize & (params.blur_sigma > 0)).any()
        assert (params.solarize & (params.blur_sigma == 0)).any()


def test_fused_kernel_on_float_images_strided_rows_and_bf16(monkeypatch):
    spec = ViewSpec(**{**get_preset("simclr_cifar").to_dict(), "count": 8, "size": 16, "blur_p": 0.5})
    images = uint8_images(2, 32).float() / 255
    params = sample_view_params(spec, 2, 32, 32, seeded_generator(9))
    eager, fused = render_both(monkeypatch, images, params, spec, dtype=torch.bfloat16)
    assert fused.dtype == eager.dtype == torch.bfloat16
    # a float32 difference of ~1e-6 flips a bf16 rounding now and then: one bf16 step at most, rarely
    assert (fused.float() - eager.float()).abs().max().item() <= 2e-2
    assert (fused == eager).float().mean().item() > 0.99
    # rows of a larger batch (each view contiguous, the rows strided): one kernel call per view
    rows = {}
    for mode in ("torch", "auto"):
        monkeypatch.setenv("ONEPOCH_CPU_KERNELS", mode)
        big = torch.full((32, 3, 16, 16), -7.0)
        apply_view_params(images, params, spec, out=big[::2])
        assert (big[1::2] == -7).all()  # nothing written between the rows
        rows[mode] = big[::2]
    assert (rows["torch"] - rows["auto"]).abs().max().item() <= TOL


def test_hue_rotation_matches_colorsys():
    """Python's colorsys (rgb -> hsv, H + shift mod 1, hsv -> rgb) as the independent reference."""
    rng = np.random.default_rng(0)
    pixels = rng.random((3, 400)).astype(np.float32)
    pixels[:, :6] = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0.5, 0.5, 0.5], [0, 0, 0]], np.float32).T
    for shift in (0.1, -0.25, 1 / 3, 0.5):
        src = torch.from_numpy(pixels).view(1, 3, 20, 20)
        out = torch.empty_like(src)
        colour_kernels.render_colour(src, out, gain=torch.ones(1), contrast=None, saturation=None,
                                     hue=torch.tensor([shift]), grayscale=np.zeros(1, bool), blur_taps=None,
                                     finish=np.ones(1, bool),
                                     solarize=np.zeros(1, bool), threshold=0.5, mean=None, std=None)
        expected = np.empty_like(pixels)
        for j in range(pixels.shape[1]):
            h, s, v = colorsys.rgb_to_hsv(*pixels[:, j].astype(float))
            expected[:, j] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
        got = out.view(3, -1).numpy()
        assert np.abs(got - expected).max() <= 2e-6, shift
        assert np.array_equal(got[:, 4], [0.5] * 3) and np.array_equal(got[:, 5], [0] * 3)  # no hue: unchanged
        if shift == 1 / 3:  # red, green, blue a third of a turn on: green, blue, red
            assert np.allclose(got[:, :3], [[0, 0, 1], [1, 0, 0], [0, 1, 0]], atol=1e-6)


def test_kernel_results_do_not_depend_on_threads(monkeypatch):
    monkeypatch.setenv("ONEPOCH_CPU_KERNELS", "auto")
    spec = ViewSpec(**{**get_preset("emp_ssl_cifar").to_dict(), "count": 16, "size": 96})
    images = uint8_images(2, 160, seed=3)
    params = sample_view_params(spec, 2, 160, 160, seeded_generator(2))
    alone = apply_view_params(images, params, spec)
    results: list[torch.Tensor] = [None] * 4

    def work(k: int) -> None:
        results[k] = apply_view_params(images, params, spec)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, alone) for r in results)


def test_kernel_switch_and_bad_shapes(monkeypatch):
    monkeypatch.setenv("ONEPOCH_CPU_KERNELS", "torch")
    assert not colour_kernels.available()
    for choice in ("auto", "numba", "", " Numba "):
        monkeypatch.setenv("ONEPOCH_CPU_KERNELS", choice)
        assert colour_kernels.available()
    monkeypatch.setenv("ONEPOCH_CPU_KERNELS", "fast")
    with pytest.raises(ConfigError, match="ONEPOCH_CPU_KERNELS='fast' is not one of auto, numba, torch"):
        colour_kernels.available()
    monkeypatch.setenv("ONEPOCH_CPU_KERNELS", "auto")
    with monkeypatch.context() as without_numba:
        without_numba.setattr(colour_kernels, "_compiled", lambda: None)
        assert not colour_kernels.available()  # auto: the eager ops
        without_numba.setenv("ONEPOCH_CPU_KERNELS", "numba")
        with pytest.raises(ConfigError, match=r"numba is not installed: pip install \"onepoch\[fast\]\""):
            colour_kernels.available()
    gray = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match=r"\(m, 3, s, s\)"):
        colour_kernels.render_colour(gray, gray.clone(), gain=torch.ones(1), contrast=None, saturation=None, hue=None,
                                     grayscale=np.zeros(1, bool), blur_taps=None, finish=np.ones(1, bool),
                                     solarize=np.zeros(1, bool), threshold=0.5, mean=None, std=None)


def test_single_view_params_use_every_op(monkeypatch):
    """One view with every op on at once, normalised: kernel and eager ops agree."""
    spec = ViewSpec(count=1, size=24, jitter_p=1.0, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
                    grayscale_p=1.0, solarize_p=1.0, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    one = lambda v, dt=torch.float32: torch.tensor([v], dtype=dt)  # noqa: E731
    params = ViewParams(image_index=one(0, torch.int64), crop=torch.tensor([[2, 3, 20, 18]]), flip=one(True, torch.bool),
                        brightness=one(1.2), contrast=one(0.7), saturation=one(1.3), hue=one(0.05),
                        grayscale=one(True, torch.bool), blur_sigma=one(0.0), solarize=one(True, torch.bool))
    eager, fused = render_both(monkeypatch, uint8_images(1, 32, seed=4), params, spec)
    assert (fused - eager).abs().max().item() <= TOL
