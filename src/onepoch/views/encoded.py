"""Training views of JPEG-at-rest batches: decode once, crop many.

For a step of ``b`` images and view groups ``specs``:

1. the random parameters of every view are drawn first, exactly as for raw images
   (:func:`onepoch.views.params.sample_view_params` with each image's own stored size, from the generator of
   ``(seed, step, group)``), so the crops are boxes in full-size pixels;
2. each image is decoded **once**, at the smallest scale its crops need: the largest reduction r in
   (1, 2, 4, 8) at which the shorter side of every one of its crops, in every group, still has at
   least that group's output size (:func:`onepoch.data.encoded.reduction_for`); the decodes run in a
   thread pool (Pillow releases the GIL) and can start while the previous steps train;
3. the crop boxes are moved onto the decoded images (:func:`onepoch.data.encoded.scale_crops`: at
   1/r scale a box's corners fall on multiples of r full-size pixels, at most r/2 pixels from where
   they were drawn, under 1/(2 x size) of the crop's side: another valid random crop), the
   decoded images are padded into one uint8 batch, and every group's views are rendered from it by
   the batched view code (:func:`onepoch.views.render.apply_view_params`), on the training device.

On CUDA, when the installed torchvision offers batched nvJPEG decoding (``torchvision.io.decode_jpeg``
with ``device="cuda"``), step 2 decodes the step's images on the GPU instead, at full scale (nvJPEG has
no reduced-DCT decode), and step 3 pads them into the canvas there: :func:`device_jpeg_decoder`.

Every result is a function of (seed, step, image bytes): the same views whatever the number of decode
threads, their timing, or how many steps are decoded together.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import torch

from onepoch.data.encoded import EncodedImages, decode_image, pad_into_canvas, reduction_for, scale_crops
from onepoch.data.loader import EncodedBatch
from onepoch.views.ops import one_torch_thread, resize_view
from onepoch.views.params import ViewParams, rank_view_params, seeded_generator
from onepoch.views.render import apply_view_params


@dataclass
class PendingViews:
    """Steps whose images are being decoded: per step and group, the view parameters (in full-size
    pixels, ``image_index`` into the steps' images stacked in order); the decodes as futures."""

    params: list[list[ViewParams]]
    counts: list[int]
    full_sizes: np.ndarray  # (sum of counts, 2) height, width as stored
    decodes: list[Future]  # host decodes, one per image (empty when the device decodes)
    encoded: list[torch.Tensor] | None = None  # the images' bytes for a device decoder
    device_decode: Callable | None = None
    outputs: list[torch.Tensor] | None = None  # per group, the float32 views the pool tasks render (CPU)
    resized: list[torch.Tensor] | None = None  # per group, their uint8 crops resized, before the colour ops


DeviceDecoder = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]


def device_jpeg_decoder(device: torch.device) -> DeviceDecoder | None:
    """``decode(list of uint8 byte tensors, device) -> list of uint8 (3, h, w) tensors on device``
    with torchvision's batched nvJPEG decoder, or None (not CUDA, or torchvision without it)."""
    if device.type != "cuda":
        return None
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception:  # noqa: BLE001 - torchvision missing or broken: the host decodes
        return None

    streams: dict[torch.device, torch.cuda.Stream] = {}

    def decode(data: list[torch.Tensor], dev: torch.device) -> list[torch.Tensor]:
        # torchvision allocates the outputs on the caller's current stream but writes them on a stream
        # of its own that waits for nothing: memory just freed by kernels still queued on the training
        # stream could be handed to the decoder and overwritten under them (seen on an H200: views'
        # index tensors corrupted, an index_copy_ out of bounds, then nvJPEG failing). So the outputs
        # come from the pool of a stream of our own, which sees no other allocation, and the training
        # stream waits for the decodes and keeps the outputs from reuse until its own work on them ends.
        current = torch.cuda.current_stream(dev)
        if dev not in streams:
            streams[dev] = torch.cuda.Stream(dev)
        side = streams[dev]
        side.wait_stream(current)
        with torch.cuda.stream(side):
            out = decode_jpeg(data, mode=ImageReadMode.RGB, device=dev)
        current.wait_stream(side)
        for t in out:
            t.record_stream(current)
        return out

    return decode


def start_encoded_views(batches: list[EncodedBatch], specs: list, seed: int, first_step: int,
                        pool: ThreadPoolExecutor, *, rank: int = 0, world_size: int = 1,
                        device_decode: DeviceDecoder | None = None, render_in_pool: bool = False,
                        reuse: PendingViews | None = None) -> PendingViews:
    """Draw the views of consecutive steps and start decoding their images in ``pool`` (step 1-2 of
    the module docstring), or leave them to ``device_decode`` (full scale, in
    :func:`finish_encoded_views`, which renders them).

    ``render_in_pool`` (for views rendered on the CPU): all the views are rendered in the pool, off the
    training thread, on one torch thread per task. One task per image decodes it, then cuts and resizes
    its views one at a time (:func:`onepoch.views.ops.resize_view`) into their rows of a uint8 buffer per
    group; once a step's images are done, tasks of ``RENDER_CHUNK`` consecutive views each apply the
    colour ops, blur, solarize and normalisation (:func:`onepoch.views.render.apply_view_params`) into a float32
    output per group. ``reuse``: earlier pending views whose rendered views are no longer used (in the
    trainer, the call before the one training now): their buffers are written again where the shapes
    match, instead of fresh memory, whose page faults cost ~0.4 s per 2000 views of 224x224. Those
    earlier views are overwritten."""
    params: list[list[ViewParams]] = []
    counts = [len(b.index) for b in batches]
    reduce = []  # per step: each image's decode reduction, the smallest over its groups' crops
    for k, batch in enumerate(batches):
        sizes = batch.images.image_sizes(batch.global_index)
        n = counts[k]
        step_params = [rank_view_params(spec, n, sizes[:, 0], sizes[:, 1],
                                        seeded_generator(seed, first_step + k, g), rank=rank, world_size=world_size)
                       for g, spec in enumerate(specs)]
        r = np.full(n, 8, np.int64)
        for spec, p in zip(specs, step_params):
            crop = p.crop.numpy()
            side = np.full(n, np.iinfo(np.int64).max)
            np.minimum.at(side, p.image_index.numpy(), crop[:, 2:].min(1))
            r = np.minimum(r, reduction_for(side, spec.size))
        reduce.append(r)
        params.append(step_params)
    full_sizes = np.concatenate([b.images.image_sizes(b.index) for b in batches])
    if device_decode is not None:
        encoded = [torch.frombuffer(bytearray(b.images.encoded(int(i))), dtype=torch.uint8)
                   for b in batches for i in b.index]
        return PendingViews(params, counts, full_sizes, [], encoded, device_decode)
    decodes = []
    if not render_in_pool:
        for batch, r in zip(batches, reduce):
            for i, factor in zip(batch.index, r):
                decodes.append(pool.submit(decode_image, batch.images.encoded(int(i)), int(factor), f"image {int(i)}"))
        return PendingViews(params, counts, full_sizes, decodes)
    # Each image's views in every group (patch-major: view v of image b is row v*n + b of its step), and
    # their rows in the group's views stacked over the steps, where its pool task writes them.
    group_offsets = [np.cumsum([0] + [spec.count * n for n in counts[:-1]]) for spec in specs]
    resized = _buffers(specs, sum(counts), torch.uint8, reuse.resized if reuse is not None else None)
    outputs = _buffers(specs, sum(counts), torch.float32, reuse.outputs if reuse is not None else None)
    image = 0
    for k, (batch, r) in enumerate(zip(batches, reduce)):
        step_decodes = []
        for local, (i, factor) in enumerate(zip(batch.index, r)):
            views = []
            for g, spec in enumerate(specs):
                rows = slice(local, spec.count * counts[k], counts[k])  # strided by the step's batch size
                first = group_offsets[g][k] + local
                target = resized[g][first:first + (spec.count - 1) * counts[k] + 1:counts[k]]
                views.append((target, params[k][g].rows(rows), spec))  # (views of the parameters, no copies)
            step_decodes.append(pool.submit(_decode_and_resize, batch.images.encoded(int(i)), int(factor),
                                            f"image {int(i)}", full_sizes[image], views))
            image += 1
        decodes += step_decodes
        # the colour ops of the step's views, in chunks of consecutive rows, once its images are resized:
        # one kernel call for many views (per image, the call's fixed cost was as large as its work at 96x96)
        for g, spec in enumerate(specs):
            first, rows = group_offsets[g][k], spec.count * counts[k]
            for a in range(0, rows, RENDER_CHUNK):
                b = min(rows, a + RENDER_CHUNK)
                decodes.append(pool.submit(_render_resized, step_decodes, resized[g][first + a:first + b],
                                           params[k][g].rows(slice(a, b)), spec, outputs[g][first + a:first + b]))
    return PendingViews(params, counts, full_sizes, decodes, outputs=outputs, resized=resized)


# Views per colour task of the pool (CPU training path): enough that a kernel call's fixed cost is small,
# few enough that the pool's threads share a step's views evenly (2000 views per step: 8 tasks).
RENDER_CHUNK = 256


def _buffers(specs: list, images: int, dtype: torch.dtype, old: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """Per group, a ``(count * images, 3, size, size)`` tensor of ``dtype``: the group's buffer in ``old``
    where its shape matches, else fresh memory."""
    old = old or []
    out = []
    for g, spec in enumerate(specs):
        shape = (spec.count * images, 3, spec.size, spec.size)
        buffer = old[g] if g < len(old) else None
        out.append(buffer if buffer is not None and tuple(buffer.shape) == shape and buffer.dtype == dtype
                   else torch.empty(shape, dtype=dtype))
    return out


def _decode_and_resize(data: Any, reduce: int, name: str, full_size: np.ndarray, views: list) -> None:
    """Decode one image at 1/``reduce``, then cut and resize each of its views into its rows of its group's
    uint8 buffer: ``views`` holds per group (those rows (count, 3, s, s), the views' parameters, spec)."""
    decoded = decode_image(data, reduce, name)
    source = torch.from_numpy(np.array(decoded)).permute(2, 0, 1)[None]
    sizes = np.array(decoded.shape[:2])[None]
    with one_torch_thread():  # a pool thread: see one_torch_thread
        for out, params, spec in views:
            k = out.shape[0]
            moved = scale_crops(params.crop.numpy(), np.broadcast_to(full_size, (k, 2)), np.broadcast_to(sizes, (k, 2)))
            for row, crop, flip in zip(out, moved, params.flip.numpy()):
                row.copy_(resize_view(source, crop, bool(flip), spec.size, spec.interpolation)[0])


def _render_resized(resized_by: list[Future], resized: torch.Tensor, params: ViewParams, spec: Any,
                    out: torch.Tensor) -> None:
    """Once the futures ``resized_by`` are done, the colour ops, blur, solarize and normalisation of the
    views ``resized`` (uint8 (m, 3, s, s)) into ``out`` (float32, the same shape)."""
    for f in resized_by:
        f.result()
    with one_torch_thread():
        apply_view_params(resized.permute(0, 2, 3, 1), params, spec, resized=resized, out=out)


def _device_canvas(pending: PendingViews, device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
    """The step's images decoded by the device decoder, padded into one uint8 (N, H, W, 3) batch there."""
    decoded = pending.device_decode(pending.encoded, device)
    sizes = np.array([tuple(a.shape[1:]) for a in decoded], np.int64)
    canvas = torch.zeros(len(decoded), int(sizes[:, 0].max()), int(sizes[:, 1].max()), 3, dtype=torch.uint8,
                         device=device)
    for i, a in enumerate(decoded):
        canvas[i, :a.shape[1], :a.shape[2]] = a.permute(1, 2, 0)
    return canvas, sizes


def finish_encoded_views(pending: PendingViews, specs: list, device: torch.device, *,
                         channels_last: bool = False) -> list[list[torch.Tensor]]:
    """Wait for the decodes and render every view (step 3 of the module docstring), or, when the pool
    rendered them (``render_in_pool``), wait for it: per step, a list of (count, b, C, size, size) per
    group (float32, outside autocast)."""
    if pending.outputs is not None:
        return _finish_rendered(pending, device, channels_last)
    if pending.device_decode is not None:
        canvas, decoded_sizes = _device_canvas(pending, device)
    else:
        decoded = [f.result() for f in pending.decodes]
        decoded_sizes = np.array([a.shape[:2] for a in decoded], np.int64)
        canvas = torch.from_numpy(pad_into_canvas(decoded))
        if device.type == "cuda":
            canvas = canvas.pin_memory()
        canvas = canvas.to(device, non_blocking=True)
    offsets = np.cumsum([0] + pending.counts[:-1])
    per_step: list[list[torch.Tensor]] = [[] for _ in pending.counts]
    for g, spec in enumerate(specs):
        moved = []
        for k, off in enumerate(offsets):
            p = pending.params[k][g]
            rows = p.image_index.numpy() + off
            crop = scale_crops(p.crop.numpy(), pending.full_sizes[rows], decoded_sizes[rows])
            moved.append(replace(p, image_index=torch.from_numpy(rows), crop=torch.from_numpy(crop)))
        stacked = ViewParams(**{name: torch.cat([getattr(m, name) for m in moved])
                                for name in ViewParams.__dataclass_fields__})
        views = apply_view_params(canvas, stacked, spec, channels_last=channels_last)
        for k, part in enumerate(views.split([spec.count * n for n in pending.counts])):
            per_step[k].append(part.unflatten(0, (spec.count, pending.counts[k])))
    return per_step


def _finish_rendered(pending: PendingViews, device: torch.device, channels_last: bool) -> list[list[torch.Tensor]]:
    """finish_encoded_views when the pool rendered every view."""
    for f in pending.decodes:
        f.result()
    per_step: list[list[torch.Tensor]] = [[] for _ in pending.counts]
    for out in pending.outputs:
        views = out.to(device)
        if channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        count = out.shape[0] // sum(pending.counts)
        for k, part in enumerate(views.split([count * n for n in pending.counts])):
            per_step[k].append(part.unflatten(0, (count, pending.counts[k])))
    return per_step


def first_images_views(images: EncodedImages, n: int, specs: list, seed: int) -> list[torch.Tensor]:
    """The training views of the first ``n`` images (as step 0 of a run seeded ``seed`` would draw them
    for a batch of these images), rendered on the CPU: per group, (count, n, C, size, size). For
    pictures (``onepoch views``, run reports)."""
    index = np.arange(n)
    with ThreadPoolExecutor(images.threads) as pool:
        pending = start_encoded_views([EncodedBatch(images, index, index)], specs, seed, 0, pool)
        return finish_encoded_views(pending, specs, torch.device("cpu"))[0]
