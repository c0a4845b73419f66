"""JPEG at rest: what is stored, decoding against Pillow, the prepared format, and decode-once views."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from onepoch.data.encoded import (
    REDUCTIONS,
    EncodedSource,
    decode_image,
    jpeg_decoder,
    normalize_image,
    pad_into_canvas,
    reduction_for,
    resize_center_crop,
    scale_crops,
)
from onepoch.data.loader import BatchLoader, EncodedBatch
from onepoch.data.prepared import SourceData, open_split, write_prepared
from onepoch.errors import ConfigError, DataError
from onepoch.views import ViewSpec, apply_view_params, sample_view_params, seeded_generator
from onepoch.views.encoded import finish_encoded_views, start_encoded_views


def photo(rng, h, w, mode="RGB", noise=10):
    """A smooth random field plus noise: photo-like entropy, so JPEG's DCT scaling has work to do."""
    small = rng.random((h // 8 + 2, w // 8 + 2, 3))
    img = Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    a = np.asarray(img).astype(np.int16) + rng.integers(-noise, noise + 1, (h, w, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).convert(mode)


def encode(img, fmt="JPEG", **kw):
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


def jpeg_records(n, seed, lo=40, hi=120):
    rng = np.random.default_rng(seed)
    return [(f"img{i}.jpg", encode(photo(rng, int(rng.integers(lo, hi)), int(rng.integers(lo, hi))), quality=90),
             i % 3) for i in range(n)]


def prepare(path, train, test, **kw):
    data = SourceData("gen", {"train": EncodedSource(len(train), lambda: iter(train)),
                              "test": EncodedSource(len(test), lambda: iter(test))},
                      ["a", "b", "c"], "generated", {"seed": 0}, **kw)
    return write_prepared(data, path)


# --------------------------------------------------------------------------------------------------
# What is stored, and decoding
# --------------------------------------------------------------------------------------------------


def test_rgb_and_gray_jpegs_are_kept_byte_for_byte_and_decode_like_pillow():
    rng = np.random.default_rng(0)
    for mode in ("RGB", "L"):
        data = encode(photo(rng, 75, 101, mode), quality=85)
        stored, h, w = normalize_image(data, "x.jpg")
        assert stored == data and (h, w) == (75, 101)
        full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert np.array_equal(decode_image(stored), full)          # scale 1: Pillow's full decode, exactly
        for r in (2, 4, 8):
            ref = Image.open(io.BytesIO(data))
            ref.draft(ref.mode, (101 // r, 75 // r))                # Pillow's own reduced-DCT decode
            ref = np.asarray(ref.convert("RGB"))
            got = decode_image(stored, r)
            assert got.shape == (-(-75 // r), -(-101 // r), 3)      # ceil(H / r) x ceil(W / r)
            assert np.array_equal(got, ref)


@pytest.mark.parametrize("kind", ["png", "cmyk", "palette", "rgba_png", "exif_rotated", "oversized"])
def test_other_images_are_stored_as_upright_rgb_jpegs(kind):
    rng = np.random.default_rng(1)
    img = photo(rng, 48, 64, noise=0)
    if kind == "png":
        data = encode(img, "PNG")
    elif kind == "cmyk":
        data = encode(img.convert("CMYK"), quality=95)
    elif kind == "palette":
        data = encode(img.convert("P"), "PNG")
    elif kind == "rgba_png":
        data = encode(img.convert("RGBA"), "PNG")
    elif kind == "exif_rotated":
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees clockwise to display
        data = encode(img, quality=95, exif=exif)
    else:
        data = encode(photo(rng, 150, 200, noise=0), quality=90)
    stored, h, w = normalize_image(data, f"x.{kind}", max_side=100 if kind == "oversized" else None, quality=95)
    decoded = Image.open(io.BytesIO(stored))
    assert decoded.format == "JPEG" and decoded.mode == "RGB" and decoded.size == (w, h)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    if kind == "oversized":
        assert (h, w) == (75, 100)
        expected = expected.resize((100, 75), Image.BICUBIC)
    if kind == "exif_rotated":
        assert (h, w) == (64, 48)                                   # upright: width and height swapped
    diff = np.abs(np.asarray(decoded, np.int16) - np.asarray(expected, np.int16))
    assert diff.mean() < 4, diff.mean()     # one JPEG encode at quality 95 away (measured 0.5-3.1; a wrong turn or colour: > 20)


@pytest.mark.parametrize("decoder", ["pillow", "simplejpeg"])
def test_both_jpeg_decoders_give_pillows_pixels_at_every_scale(decoder, monkeypatch):
    """simplejpeg (the `fast` extra) against Pillow's own decode and draft, an independent reference: baseline
    and progressive, 4:2:0 / 4:2:2 / 4:4:4, gray, odd sizes, and images under 8 pixels (left to Pillow)."""
    if decoder == "simplejpeg":
        pytest.importorskip("simplejpeg")
    monkeypatch.setenv("ONEPOCH_JPEG_DECODER", decoder)
    assert jpeg_decoder() == decoder
    rng = np.random.default_rng(3)
    cases = [("RGB", 75, 101, {}), ("L", 75, 101, {}), ("RGB", 64, 48, {"progressive": True}),
             ("RGB", 37, 53, {"subsampling": 0}), ("RGB", 37, 53, {"subsampling": 1}), ("L", 33, 17, {"progressive": True}),
             ("RGB", 6, 9, {}), ("RGB", 9, 40, {})]
    for mode, h, w, kw in cases:
        data = encode(photo(rng, h, w, mode), quality=90, **kw)
        for r in (r for r in REDUCTIONS if min(h, w) // r >= 1):
            ref = Image.open(io.BytesIO(data))
            if r > 1:
                ref.draft(ref.mode, (w // r, h // r))
            ref = np.asarray(ref.convert("RGB"))
            got = decode_image(memoryview(data), r)
            assert got.shape == (-(-h // r), -(-w // r), 3) and got.dtype == np.uint8, (mode, h, w, kw, r)
            assert np.array_equal(got, ref), (mode, h, w, kw, r)
        with pytest.raises(DataError, match=r"^images/7\.jpg: ") as e:      # damaged after it was stored
            decode_image(data[: len(data) // 2], 2, "images/7.jpg")
        assert "\n" not in str(e.value)


def test_the_jpeg_decoder_switch(monkeypatch):
    import onepoch.data.encoded as encoded

    monkeypatch.setenv("ONEPOCH_JPEG_DECODER", "libjpeg")
    with pytest.raises(ConfigError, match="ONEPOCH_JPEG_DECODER='libjpeg' is not one of auto, simplejpeg, pillow"):
        jpeg_decoder()
    monkeypatch.setattr(encoded, "_simplejpeg", lambda: None)     # not installed
    monkeypatch.setenv("ONEPOCH_JPEG_DECODER", "simplejpeg")
    with pytest.raises(ConfigError, match=r'pip install "onepoch\[fast\]"'):
        jpeg_decoder()
    monkeypatch.setenv("ONEPOCH_JPEG_DECODER", "auto")
    assert jpeg_decoder() == "pillow"
    data = encode(photo(np.random.default_rng(4), 40, 40), quality=90)
    assert decode_image(data, 2).shape == (20, 20, 3)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_file_is_a_one_line_error_naming_it(damage):
    data = encode(photo(np.random.default_rng(2), 64, 64), quality=90)
    data = data[: len(data) // 2] if damage == "truncated" else b"not an image at all"
    with pytest.raises(DataError, match=r"^photos/bad\.jpg: ") as e:
        normalize_image(data, "photos/bad.jpg")
    assert "\n" not in str(e.value)


def test_reduction_and_crop_scaling():
    assert reduction_for(np.array([31, 32, 63, 64, 128, 256, 1000]), 32).tolist() == [1, 1, 1, 2, 4, 8, 8]
    full = np.array([[100, 200]])
    crops = scale_crops(np.array([[10, 20, 50, 80]]), full, np.array([[50, 100]]))
    assert crops.tolist() == [[5, 10, 25, 40]]
    # a box at the border stays inside the decoded image, and is at least one pixel
    crops = scale_crops(np.array([[99, 199, 1, 1]]), full, np.array([[13, 25]]))
    t, l, h, w = crops[0]
    assert h >= 1 and w >= 1 and t + h <= 13 and l + w <= 25
    canvas = pad_into_canvas([np.ones((2, 3, 3), np.uint8), np.full((4, 1, 3), 2, np.uint8)])
    assert canvas.shape == (2, 4, 3, 3) and canvas[0, 2:].sum() == 0 and canvas[1, :, 1:].sum() == 0


def test_resize_center_crop_matches_pillow():
    img = photo(np.random.default_rng(3), 60, 90)
    out = resize_center_crop(np.asarray(img), 40)
    ref = img.resize((60, 40), Image.BILINEAR).crop((10, 0, 50, 40))
    assert np.array_equal(out, np.asarray(ref))


# --------------------------------------------------------------------------------------------------
# The prepared format
# --------------------------------------------------------------------------------------------------


def test_prepare_open_verify_and_read_at_the_eval_resolution(tmp_path):
    train, test = jpeg_records(12, 0), jpeg_records(5, 1)
    out = prepare(tmp_path / "ds", train, test)
    info = json.loads((out / "dataset.json").read_text())
    assert info["layout"] == "jpeg" and info["splits"] == ["train", "test"]
    split = open_split(out, "train", verify=True, image_size=32)
    assert split.encoded and split.num_images == 12 and split.images.shape == (12, 32, 32, 3)
    assert split.labels.tolist() == [r[2] for r in train]
    assert bytes(split.images.encoded(3)) == train[3][1]                       # the bytes, as given
    batch = split.images[2:5]
    for k, i in enumerate(range(2, 5)):
        full = np.asarray(Image.open(io.BytesIO(train[i][1])).convert("RGB"))
        r = int(reduction_for(np.array(min(full.shape[:2])), 32))
        expected = resize_center_crop(decode_image(train[i][1], r), 32)
        assert np.array_equal(batch[k], expected)
    meta = json.loads((out / "train" / "meta.json").read_text())
    pixels = np.concatenate([np.asarray(Image.open(io.BytesIO(d)).convert("RGB")).reshape(-1, 3) / 255
                             for _, d, _ in train])
    assert np.allclose(meta["mean"], pixels.mean(0), atol=0.02)                 # measured on reduced decodes
    assert split.subset(4).images.shape == (4, 32, 32, 3)

    # a changed byte is caught by verify
    blob = out / "train" / "encoded.bin"
    raw = bytearray(blob.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    blob.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="encoded.bin: checksum does not match"):
        open_split(out, "train", verify=True)


def test_a_corrupt_image_stops_prepare_and_writes_nothing(tmp_path):
    train = jpeg_records(6, 0)
    train[4] = ("cats/broken.jpg", train[4][1][:200], 1)
    with pytest.raises(DataError, match="cats/broken.jpg"):
        prepare(tmp_path / "ds", train, jpeg_records(3, 1))
    assert not (tmp_path / "ds").exists()
    assert [p.name for p in tmp_path.iterdir()] == []                           # no staging left behind


def test_an_existing_dataset_is_recognised_and_another_refused(tmp_path):
    from onepoch.data.prepared import check_out_dir

    train, test = jpeg_records(4, 0), jpeg_records(2, 1)
    out = prepare(tmp_path / "ds", train, test)
    assert check_out_dir(out, "gen", {"seed": 0}, force=False)                  # the same request: nothing to do
    other = SourceData("gen", {"train": EncodedSource(4, lambda: iter(train))}, ["a", "b", "c"], "generated",
                       {"seed": 1})
    with pytest.raises(DataError, match="already holds another prepared dataset"):
        write_prepared(other, out)


# --------------------------------------------------------------------------------------------------
# Decode once, crop many
# --------------------------------------------------------------------------------------------------

SPECS = [ViewSpec(count=3, size=16, crop_scale=(0.08, 1.0)), ViewSpec(count=2, size=24, crop_scale=(0.5, 1.0),
                                                                      blur_p=0.5, solarize_p=0.5)]


def step_views(images, index, threads, first_step=0, world_size=1, rank=0, global_index=None, in_pool=False):
    from concurrent.futures import ThreadPoolExecutor

    batch = EncodedBatch(images, np.asarray(index), np.asarray(index if global_index is None else global_index))
    with ThreadPoolExecutor(threads) as pool:
        pending = start_encoded_views([batch], SPECS, 7, first_step, pool, rank=rank, world_size=world_size,
                                      render_in_pool=in_pool)
        return finish_encoded_views(pending, SPECS, torch.device("cpu"))[0]


def test_views_do_not_depend_on_the_number_of_decode_threads(tmp_path):
    out = prepare(tmp_path / "ds", jpeg_records(10, 0, 30, 200), jpeg_records(2, 1))
    images = open_split(out, "train").images
    one = step_views(images, range(10), threads=1)
    four = step_views(images, range(10), threads=4)
    assert [v.shape for v in one] == [(3, 10, 3, 16, 16), (2, 10, 3, 24, 24)]
    assert all(torch.equal(a, b) for a, b in zip(one, four))
    # cut and resized in the pool (the CPU training path): the same for any number of threads, and the
    # same views as rendering them after the decodes up to uint8 rounding (the pool always resizes one
    # view at a time in uint8; after the decodes, crops up to 64 pixels go through the float matrices)
    pool_one = step_views(images, range(10), threads=1, in_pool=True)
    pool_four = step_views(images, range(10), threads=4, in_pool=True)
    assert all(torch.equal(a, b) for a, b in zip(pool_one, pool_four))
    assert all((a - b).abs().max() < 0.05 and (a - b).abs().mean() < 0.005 for a, b in zip(pool_one, one))


def test_rendering_into_an_earlier_calls_buffers_gives_the_same_views(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    out = prepare(tmp_path / "ds", jpeg_records(8, 0, 30, 200), jpeg_records(2, 1))
    images = open_split(out, "train").images
    batch = EncodedBatch(images, np.arange(8), np.arange(8))
    fresh = step_views(images, range(8), threads=2, first_step=5, in_pool=True)
    with ThreadPoolExecutor(2) as pool:
        earlier = start_encoded_views([batch], SPECS, 7, 4, pool, render_in_pool=True)
        finish_encoded_views(earlier, SPECS, torch.device("cpu"))
        pending = start_encoded_views([batch], SPECS, 7, 5, pool, render_in_pool=True, reuse=earlier)
        reused = finish_encoded_views(pending, SPECS, torch.device("cpu"))[0]
        assert all(a.data_ptr() == b.data_ptr() for a, b in zip(pending.outputs, earlier.outputs))
        assert all(torch.equal(a, b) for a, b in zip(reused, fresh))
        # a batch of another size cannot use those buffers: fresh ones, the same views
        small = EncodedBatch(images, np.arange(5), np.arange(5))
        other = start_encoded_views([small], SPECS, 7, 5, pool, render_in_pool=True, reuse=earlier)
        views = finish_encoded_views(other, SPECS, torch.device("cpu"))[0]
        assert all(a.data_ptr() != b.data_ptr() for a, b in zip(other.outputs, earlier.outputs))
        five = step_views(images, range(5), threads=1, first_step=5, in_pool=True)
        assert all(torch.equal(a, b) for a, b in zip(views, five))


def test_colour_tasks_split_across_steps_and_chunks_give_the_same_views(tmp_path, monkeypatch):
    """Several steps per call and colour tasks of a few views (chunk edges inside a step, across views of
    one image): the same views as one step per call, each rendered whole."""
    from concurrent.futures import ThreadPoolExecutor

    import onepoch.views.encoded as encoded_views

    out = prepare(tmp_path / "ds", jpeg_records(9, 0, 30, 200), jpeg_records(2, 1))
    images = open_split(out, "train").images
    alone = [step_views(images, range(4 * k, 4 * k + 4), threads=2, first_step=3 + k, in_pool=True) for k in (0, 1)]
    alone.append(step_views(images, [8], threads=2, first_step=5, in_pool=True))
    monkeypatch.setattr(encoded_views, "RENDER_CHUNK", 5)  # 12 and 8 views per step: chunks of 5, 5, 2 and 5, 3
    batches = [EncodedBatch(images, np.arange(4 * k, 4 * k + 4), np.arange(4 * k, 4 * k + 4)) for k in (0, 1)]
    batches.append(EncodedBatch(images, np.array([8]), np.array([8])))
    with ThreadPoolExecutor(3) as pool:
        pending = start_encoded_views(batches, SPECS, 7, 3, pool, render_in_pool=True)
        together = finish_encoded_views(pending, SPECS, torch.device("cpu"))
    assert len(pending.decodes) == 9 + (3 + 2) + (3 + 2) + (1 + 1)   # image tasks, then colour tasks per step
    for step_alone, step_together in zip(alone, together):
        assert all(torch.equal(a, b) for a, b in zip(step_alone, step_together))


def test_at_full_scale_the_views_are_the_batched_views_of_the_decoded_images(tmp_path):
    """Images of one size too small for any reduction: decode-once views must equal onepoch.views
    rendering the fully decoded images with the same random parameters."""
    rng = np.random.default_rng(5)
    records = [(f"{i}.jpg", encode(photo(rng, 40, 40), quality=90), 0) for i in range(6)]
    out = prepare(tmp_path / "ds", records, records[:2])
    images = open_split(out, "train").images
    views = step_views(images, range(6), threads=2, first_step=3)
    decoded = torch.from_numpy(np.stack([decode_image(d) for _, d, _ in records]))
    for g, spec in enumerate(SPECS):
        params = sample_view_params(spec, 6, 40, 40, seeded_generator(7, 3, g))
        expected = apply_view_params(decoded, params, spec).unflatten(0, (spec.count, 6))
        assert torch.equal(views[g], expected)


def test_reduced_decodes_render_the_same_boxes_as_full_decodes(tmp_path):
    """Large images, small views: the images decode at 1/8 scale, each crop box moves onto that grid
    (its corners on multiples of 8 full-size pixels), and the views equal those rendered from the full
    decode with the moved boxes up to filtering (DCT downscaling instead of a triangle filter): measured
    mean absolute difference 0.011; a box one decoded pixel off gives 0.095, an unscaled one 0.38."""
    import dataclasses
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(6)
    records = [(f"{i}.jpg", encode(photo(rng, 240, 320), quality=92), 0) for i in range(4)]
    out = prepare(tmp_path / "ds", records, records[:2])
    images = open_split(out, "train").images
    spec = ViewSpec(count=4, size=16, crop_scale=(0.3, 1.0), jitter_p=0.0, grayscale_p=0.0)
    with ThreadPoolExecutor(2) as pool:
        pending = start_encoded_views([EncodedBatch(images, np.arange(4), np.arange(4))], [spec], 1, 0, pool)
        assert [f.result().shape for f in pending.decodes] == [(30, 40, 3)] * 4        # 1/8 scale
        got = finish_encoded_views(pending, [spec], torch.device("cpu"))[0][0]
    decoded = torch.from_numpy(np.stack([decode_image(d) for _, d, _ in records]))
    params = sample_view_params(spec, 4, 240, 320, seeded_generator(1, 0, 0))
    moved = scale_crops(params.crop.numpy(), np.full((16, 2), [240, 320]), np.full((16, 2), [30, 40])) * 8
    params = dataclasses.replace(params, crop=torch.from_numpy(moved))
    full = apply_view_params(decoded, params, spec).unflatten(0, (4, 4))
    assert (got - full).abs().mean() < 0.03


def test_ranks_render_their_rows_of_the_global_views(tmp_path):
    out = prepare(tmp_path / "ds", jpeg_records(8, 0, 30, 90), jpeg_records(2, 1))
    images = open_split(out, "train").images
    whole = step_views(images, range(8), threads=2)
    for rank in (0, 1):
        part = step_views(images, range(4 * rank, 4 * rank + 4), threads=2, world_size=2, rank=rank,
                          global_index=range(8))
        assert all(torch.equal(p, w[:, 4 * rank:4 * rank + 4]) for p, w in zip(part, whole))


def test_the_loader_yields_encoded_batches(tmp_path):
    out = prepare(tmp_path / "ds", jpeg_records(10, 0), jpeg_records(2, 1))
    loader = BatchLoader(open_split(out, "train"), 4, seed=3)
    batches = list(loader.epoch(0))
    assert len(batches) == 2 and not loader.resident
    assert all(isinstance(b.images, EncodedBatch) and b.images.index.tolist() == b.indices.tolist() for b in batches)


def test_large_uint8_crops_resized_one_by_one_agree_with_the_resampling_matrices():
    """On CPU, uint8 crops over PER_VIEW_RESIZE_ABOVE pixels are resized by torch's antialiased uint8
    interpolation (Pillow-like, rounded to uint8) instead of the dense matrices; both draw the same
    views from the same parameters (float input takes the dense path: the reference)."""
    import onepoch.views.render as views

    rng = np.random.default_rng(8)
    images = torch.from_numpy(np.stack([np.asarray(photo(rng, 160, 200, noise=0)) for _ in range(3)]))
    for interpolation in ("bilinear", "bicubic"):
        spec = ViewSpec(count=4, size=48, crop_scale=(0.3, 1.0), interpolation=interpolation)
        params = sample_view_params(spec, 3, 160, 200, torch.Generator().manual_seed(0))
        assert int(params.crop[:, 2:].max()) > views.PER_VIEW_RESIZE_ABOVE
        fast = apply_view_params(images, params, spec)
        dense = apply_view_params(images.float() / 255, params, spec)
        diff = (fast - dense).abs()
        assert diff.mean() < 2 / 255 and diff.max() < 12 / 255, (interpolation, diff.mean(), diff.max())


def full_scale_host_decodes(data, device):
    """A host stand-in for a device decoder: each image's bytes decoded at full scale, (3, h, w) uint8."""
    return [torch.from_numpy(np.array(decode_image(bytes(d.numpy())))).permute(2, 0, 1) for d in data]


def test_a_device_decoder_gets_the_bytes_and_gives_the_full_scale_views(tmp_path):
    """The nvJPEG path's plumbing, with a host stand-in for the device decoder: every image's bytes go to
    it in order, and the views equal those rendered from full-scale decodes (no reduction)."""
    from concurrent.futures import ThreadPoolExecutor

    records = jpeg_records(5, 0, 100, 180)
    out = prepare(tmp_path / "ds", records, records[:2])
    images = open_split(out, "train").images
    seen = []

    def fake_device_decode(data, device):
        seen.extend(bytes(d.numpy()) for d in data)
        return full_scale_host_decodes(data, device)

    with ThreadPoolExecutor(2) as pool:
        pending = start_encoded_views([EncodedBatch(images, np.arange(5), np.arange(5))], SPECS, 7, 2, pool,
                                      device_decode=fake_device_decode)
        assert pending.decodes == []
        views = finish_encoded_views(pending, SPECS, torch.device("cpu"))[0]
    assert seen == [d for _, d, _ in records]
    decoded = [decode_image(d) for _, d, _ in records]
    sizes = np.array([a.shape[:2] for a in decoded])
    canvas = torch.from_numpy(pad_into_canvas(decoded))
    for g, spec in enumerate(SPECS):
        params = sample_view_params(spec, 5, sizes[:, 0], sizes[:, 1], seeded_generator(7, 2, g))
        assert torch.equal(views[g], apply_view_params(canvas, params, spec).unflatten(0, (spec.count, 5)))


def test_training_on_jpeg_at_rest_resumes_exactly(tmp_path):
    """Decoding in a thread pool one call ahead does not break exact resume: 3 steps, stop, resume to 6
    gives the weights of 6 steps in one go (and of a run with another number of decode threads)."""
    from onepoch.checkpoints import checkpoint_paths, load_checkpoint
    from onepoch.runconfig import load_config
    from onepoch.train import train

    root = prepare(tmp_path / "ds", jpeg_records(24, 0, 40, 90), jpeg_records(6, 1))
    common = ["model.arch=resnet10", "model.width=0.0625", "method.pre_feature=32", "method.projector=32-16",
              "views.count=3", "views.size=16", "data.batch_size=4", "train.threads=1", "train.checkpoint_every=3",
              "train.online_probe=false", f"data.root={root}", f"train.out={tmp_path / 'runs'}", "train.max_steps=6"]

    def weights(name):
        return load_checkpoint(checkpoint_paths(tmp_path / "runs" / name)[-1])["model"]

    train(load_config("emp_ssl/imagenet100_1epoch", [*common, "name=whole", "data.decode_threads=1"]),
          progress_bar=False)
    train(load_config("emp_ssl/imagenet100_1epoch", [*common, "name=parts", "train.max_steps=3",
                                                     "data.decode_threads=3"]), progress_bar=False)
    train(load_config("emp_ssl/imagenet100_1epoch", [*common, "name=parts", "data.decode_threads=3"]),
          resume=True, progress_bar=False)
    whole, parts = weights("whole"), weights("parts")
    assert all(torch.equal(whole[k], parts[k]) for k in whole)


@pytest.mark.cuda
def test_nvjpeg_views_while_the_training_stream_is_busy(tmp_path):
    """The nvJPEG decoder under load, as the trainer runs it: the next step's images decoded while the
    last step's views are still being rendered on the device and then freed. torchvision writes its
    outputs on a stream of its own, which waits for nothing; called plainly, it overwrote memory the
    queued kernels still used (on an H200: an index_copy_ out of bounds, then 'Failed to decode batch'),
    while onepoch's decoder ran. The views must also match those of host decodes (nvJPEG's IDCT differs
    from libjpeg's by a few levels: on the H200, 2.2 of 255 on average)."""
    from concurrent.futures import ThreadPoolExecutor

    from onepoch.views.encoded import device_jpeg_decoder

    decoder = device_jpeg_decoder(torch.device("cuda"))
    if decoder is None:
        pytest.skip("torchvision with nvJPEG is not installed")
    records = jpeg_records(64, 0, 150, 300)
    out = prepare(tmp_path / "ds", records, records[:2])
    images = open_split(out, "train").images
    spec = [ViewSpec(count=8, size=96, crop_scale=(0.25, 0.25), blur_p=0.5, solarize_p=0.2)]
    cuda = torch.device("cuda")

    with ThreadPoolExecutor(4) as pool:
        for step in range(6):
            index = np.arange(64)[np.random.default_rng(step).permutation(64)[:32]]
            batch = [EncodedBatch(images, index, index)]
            ahead = start_encoded_views(batch, spec, 7, step, pool, device_decode=decoder)
            busy = torch.randn(4096, 4096, device=cuda)
            for _ in range(20):  # queued work on the training stream, then its memory freed
                busy = busy @ busy.T / 4096
            del busy
            on_device = finish_encoded_views(ahead, spec, cuda)[0][0]
            host_pending = start_encoded_views(batch, spec, 7, step, pool, device_decode=full_scale_host_decodes)
            host = finish_encoded_views(host_pending, spec, cuda)[0][0]
            torch.cuda.synchronize()
            assert torch.isfinite(on_device).all()
            assert (on_device - host).abs().mean() < 0.03
