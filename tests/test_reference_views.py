"""onepoch.views against an independent implementation: torchvision.transforms.v2.

``tests/reference/views.npz`` is written by ``tests/reference/make_view_reference.py`` (run in the
reference venv; its docstring has the command). It holds

- statistics of torchvision's random parameters over N = 20,000 draws each: for a quantity x
  (RandomResizedCrop's box area fraction, log aspect ratio, height, width, centre; ColorJitter's
  factors; GaussianBlur's sigma) the empirical CDF F_ref(t_k) at thresholds t_k (torchvision's sample
  quantiles), and the rates of flip, RandomApply(jitter), grayscale, RandomApply(blur), solarize;
- torchvision's outputs of the deterministic ops on fixed float images.

Tolerances for the statistics. Our parameters are drawn N_ours = 20,000 times with a fixed seed. If
our sampler has torchvision's distribution, F_ours(t) and F_ref(t) are independent binomial
proportions with the same mean p = F(t), so their difference has standard deviation
σ = sqrt(p (1 − p) (1/N_ours + 1/N_ref)) (p estimated by the pooled proportion). We allow 5σ: a
two-sided normal tail of 6e-7 per comparison, 2e-4 for the 345 comparisons here, while a CDF
shift of 0.025 at p = 0.5 (5σ = 0.025) is caught. Where F is 0 or 1 (e.g. the fixed EMP-SSL crop
size) σ = 0 and the values must agree exactly. A rate r is held to the same bound against
torchvision's rate and against its nominal probability (σ = sqrt(p (1 − p) / N)).

Tolerances for the outputs: float32 rounding, 5e-6 absolute on values in [0, 1], except where our
op differs by definition (README "Views"): our gray is ITU-R 601 / Pillow's 0.299 R + 0.587 G +
0.114 B where torchvision's tensor kernel uses 0.2989 R, so a gray differs by exactly 1e-4·R and a
contrast or saturation blend by at most 1e-4·|1 − factor|; we clamp to [0, 1] after resizing, which
torchvision does only for uint8 (bicubic overshoot); and the blur kernel is truncated at
ceil(3·sigma_max), which torchvision matches with kernel_size = 2·ceil(3σ) + 1 (both reflect-pad).
Jitter runs in our fixed order brightness, contrast, saturation, hue; the reference applies the
functional ops in that order.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from onepoch.views import ViewParams, ViewSpec, apply_view_params, sample_view_params

FIXTURE = Path(__file__).parent / "reference" / "views.npz"
N_OURS = 20000
SIGMAS = 5.0
ATOL = 5e-6
CROPS = ["crop_simclr", "crop_fashion", "crop_wide_image", "crop_fixed", "crop_fallback"]


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


def assert_same_distribution(ours: np.ndarray, ref: dict, name: str) -> None:
    """Our sample's CDF at the reference thresholds within 5 binomial standard errors of the reference's."""
    t, f_ref, n_ref = ref[f"{name}.thresholds"], ref[f"{name}.cdf"], int(ref[f"{name}.n"])
    f_ours = (np.asarray(ours, np.float64)[:, None] <= t[None, :]).mean(0)
    pooled = (f_ours * len(ours) + f_ref * n_ref) / (len(ours) + n_ref)
    sigma = np.sqrt(pooled * (1 - pooled) * (1 / len(ours) + 1 / n_ref))
    gap = np.abs(f_ours - f_ref)
    worst = int(np.argmax(gap - SIGMAS * sigma))
    assert np.all(gap <= SIGMAS * sigma + 1e-12), (
        f"{name}: at x <= {t[worst]:.4g} our CDF is {f_ours[worst]:.4f}, torchvision's {f_ref[worst]:.4f} "
        f"(allowed {SIGMAS * sigma[worst]:.4f})")


def assert_rate(ours: np.ndarray, ref: dict, key: str) -> None:
    p, r_ref, n_ref = float(ref[f"rate.{key}_p"]), float(ref[f"rate.{key}"]), int(ref["rate.n"])
    r = float(np.mean(ours))
    assert abs(r - r_ref) <= SIGMAS * np.sqrt(p * (1 - p) * (1 / len(ours) + 1 / n_ref)), (key, r, r_ref)
    assert abs(r - p) <= SIGMAS * np.sqrt(p * (1 - p) / len(ours)), (key, r, p)
    assert abs(r_ref - p) <= SIGMAS * np.sqrt(p * (1 - p) / n_ref), (key, r_ref, p)  # the fixture itself


def sample(spec: ViewSpec, height: int = 32, width: int = 32, seed: int = 0) -> ViewParams:
    return sample_view_params(spec, 1, height, width, torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("case", CROPS)
def test_random_resized_crop_boxes_have_torchvisions_distribution(ref, case):
    height, width, s_lo, s_hi, r_lo, r_hi = ref[f"{case}.setting"]
    height, width = int(height), int(width)
    spec = ViewSpec(count=N_OURS, size=8, crop_scale=(s_lo, s_hi), crop_ratio=(r_lo, r_hi))
    top, left, h, w = sample(spec, height, width, seed=CROPS.index(case)).crop.double().numpy().T
    assert_same_distribution(h * w / (height * width), ref, f"{case}.area")
    assert_same_distribution(np.log(w / h), ref, f"{case}.log_ratio")
    assert_same_distribution(h, ref, f"{case}.height")
    assert_same_distribution(w, ref, f"{case}.width")
    assert_same_distribution((top + h / 2) / height, ref, f"{case}.centre_y")
    assert_same_distribution((left + w / 2) / width, ref, f"{case}.centre_x")


def test_color_jitter_factors_and_blur_sigma_have_torchvisions_distribution(ref):
    spec = ViewSpec(count=N_OURS, jitter_p=1.0, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
                    blur_p=1.0, blur_sigma=(0.1, 2.0))
    params = sample(spec, seed=10)
    for key in ("brightness", "contrast", "saturation", "hue"):
        assert_same_distribution(getattr(params, key).numpy(), ref, f"jitter.{key}")
    assert_same_distribution(params.blur_sigma.numpy(), ref, "blur.sigma")


def test_op_probabilities_match_torchvisions_rates(ref):
    p = {k: float(ref[f"rate.{k}_p"]) for k in ("flip", "jitter", "grayscale", "blur", "solarize")}
    spec = ViewSpec(count=N_OURS, flip_p=p["flip"], jitter_p=p["jitter"], brightness=0.4, grayscale_p=p["grayscale"],
                    blur_p=p["blur"], solarize_p=p["solarize"])
    params = sample(spec, seed=11)
    assert_rate(params.flip.numpy(), ref, "flip")
    assert_rate((params.brightness != 1).numpy(), ref, "jitter")
    assert_rate(params.grayscale.numpy(), ref, "grayscale")
    assert_rate((params.blur_sigma > 0).numpy(), ref, "blur")
    assert_rate(params.solarize.numpy(), ref, "solarize")


# -------------------------------------------------------------------------------- deterministic ops


def render(image: np.ndarray, spec: ViewSpec, box=None, *, flip=False, brightness=1.0, contrast=1.0,
           saturation=1.0, hue=0.0, grayscale=False, blur_sigma=0.0, solarize=False) -> np.ndarray:
    """Our view of one float image (C, H, W) with the given parameters, as (C, size, size)."""
    x = torch.from_numpy(image)
    _, height, width = x.shape

    def one(value, dtype=torch.float32):
        return torch.tensor([value], dtype=dtype)

    params = ViewParams(
        image_index=one(0, torch.int64), crop=torch.tensor([box or (0, 0, height, width)], dtype=torch.int64),
        flip=one(flip, torch.bool), brightness=one(brightness), contrast=one(contrast), saturation=one(saturation),
        hue=one(hue), grayscale=one(grayscale, torch.bool), blur_sigma=one(blur_sigma),
        solarize=one(solarize, torch.bool))
    return apply_view_params(x.permute(1, 2, 0)[None].contiguous(), params, spec)[0].numpy()


def assert_output(ours: np.ndarray, reference: np.ndarray, what: str, atol: float | np.ndarray = ATOL) -> None:
    assert ours.shape == reference.shape, (what, ours.shape, reference.shape)
    error = np.abs(ours - reference) - atol
    assert error.max() <= 0, f"{what}: off by {np.abs(ours - reference).max():.2e} (allowed {np.max(atol):.2e})"


def test_flip_matches_torchvision(ref):
    assert_output(render(ref["image.rgb"], ViewSpec(count=1, size=24), flip=True), ref["out.flip_rgb"], "flip")


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("box,size", [((3, 5, 17, 13), 12), ((2, 4, 9, 11), 20), ((0, 0, 24, 24), 16)])
def test_resized_crop_matches_torchvision_antialiased(ref, mode, box, size):
    key = f"out.resized_crop_{mode}_{'_'.join(map(str, box))}_to_{size}"
    ours = render(ref["image.rgb"], ViewSpec(count=1, size=size, interpolation=mode), box)
    assert_output(ours, np.clip(ref[key], 0, 1), key)  # we clamp after resizing (bicubic overshoot)


@pytest.mark.parametrize("i", [0, 1, 2])
def test_color_jitter_at_fixed_factors_matches_torchvision(ref, i):
    b, c, s, h = (float(f) for f in ref[f"out.jitter_{i}_factors"])
    for name in ("rgb", "gray"):
        image = ref[f"image.{name}"]
        spec = ViewSpec(count=1, size=image.shape[-1], jitter_p=1.0, brightness=0.4, contrast=0.4, saturation=0.4,
                        hue=0.5)
        ours = render(image, spec, brightness=b, contrast=c, saturation=s, hue=h)
        # Our gray weights 0.299 R (torchvision's tensor kernel: 0.2989 R) enter the contrast mean and the
        # saturation blend, each scaled by |1 - factor|.
        gray_weights = 1e-4 * (abs(1 - c) + (abs(1 - s) if name == "rgb" else 0.0))
        assert_output(ours, ref[f"out.jitter_{i}_{name}"], f"jitter {i} {name}", ATOL + gray_weights)


def test_grayscale_matches_torchvision_up_to_the_red_weight(ref):
    image = ref["image.rgb"]
    ours = render(image, ViewSpec(count=1, size=24, grayscale_p=1.0), grayscale=True)
    # ITU-R 601 (ours, Pillow): 0.299 R; torchvision's tensor kernel: 0.2989 R. The difference is 1e-4·R.
    assert_output(ours, ref["out.grayscale_rgb"] + np.float32(1e-4) * image[0:1], "grayscale")


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_solarize_matches_torchvision(ref, threshold):
    spec = ViewSpec(count=1, size=24, solarize_p=1.0, solarize_threshold=threshold)
    assert_output(render(ref["image.rgb"], spec, solarize=True), ref[f"out.solarize_{threshold}_rgb"], "solarize",
                  atol=0.0)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 1.7])
def test_gaussian_blur_at_fixed_sigma_matches_torchvision(ref, sigma):
    for name in ("rgb", "gray"):
        image = ref[f"image.{name}"]
        spec = ViewSpec(count=1, size=image.shape[-1], blur_p=1.0, blur_sigma=(sigma, sigma))
        assert_output(render(image, spec, blur_sigma=sigma), ref[f"out.blur_{sigma}_{name}"], f"blur {sigma} {name}")
