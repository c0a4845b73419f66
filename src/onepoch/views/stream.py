"""The views the trainer consumes, step after step: :func:`steps_with_views` turns the loader's
``(step, batch)`` pairs into ``(step, batch, view groups)``, rendering the views of several steps per
call (:func:`step_view_groups`) or, for a JPEG-at-rest split, decoding the next call's images in a thread
pool while the previous steps train (:mod:`onepoch.views.encoded`).

The random parameters of step s, view group g are drawn from :func:`onepoch.views.params.seeded_generator`
``(seed, s, g)`` for the global batch and each rank renders its own rows, so the views of an image do not
depend on the number of processes, on how many steps are rendered together, nor on where a run resumed.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import torch

from onepoch.data.encoded import default_threads
from onepoch.views.encoded import device_jpeg_decoder, finish_encoded_views, start_encoded_views
from onepoch.views.params import concat_view_params, rank_view_params, seeded_generator
from onepoch.views.render import apply_view_params, make_views


def make_view_groups(images: torch.Tensor, specs: list, generator: torch.Generator, *,
                     channels_last: bool) -> list[torch.Tensor]:
    """The views of a uint8 batch (B, H, W, C) for each spec: a list of (count, B, C, size, size)."""
    b = images.shape[0]
    return [make_views(images, spec, generator, channels_last=channels_last).unflatten(0, (spec.count, b))
            for spec in specs]


def step_view_groups(batches: list[torch.Tensor], specs: list, seed: int, first_step: int, *,
                     channels_last: bool, rank: int = 0, world_size: int = 1) -> list[list[torch.Tensor]]:
    """The views of consecutive training steps, rendered in one call per view group.

    ``batches[k]`` is this rank's uint8 batch (b, H, W, C) of step ``first_step + k``: rows
    ``rank*b .. rank*b + b - 1`` of the global batch of ``b * world_size`` images. The random
    parameters of step s, group g are drawn for the global batch from
    :func:`onepoch.views.params.seeded_generator` ``(seed, s, g)`` and each rank renders its own rows, so
    the views of an image do not depend on the number of processes, on how many steps are rendered
    together, nor on where a run resumed. Returns, per step, a list of (count, b, C, size, size) per
    group (float32, outside autocast).
    """
    sizes = [b.shape[0] for b in batches]
    images = batches[0] if len(batches) == 1 else torch.cat(batches)
    h, w = images.shape[1], images.shape[2]
    per_step: list[list[torch.Tensor]] = [[] for _ in batches]
    for g, spec in enumerate(specs):
        params = [rank_view_params(spec, n, h, w, seeded_generator(seed, first_step + k, g), rank=rank,
                                   world_size=world_size) for k, n in enumerate(sizes)]
        views = apply_view_params(images, concat_view_params(params, sizes), spec, channels_last=channels_last)
        for k, part in enumerate(views.split([spec.count * n for n in sizes])):
            per_step[k].append(part.unflatten(0, (spec.count, sizes[k])))
    return per_step


def steps_with_views(steps: Iterator[tuple[int, Any]], specs: list, seed: int, per_call: int, channels_last: bool,
                     world: Any, device: torch.device, decode_threads: int = 0
                     ) -> Iterator[tuple[int, Any, list[torch.Tensor]]]:
    """(step, batch, view groups) for the loader's (step, batch) pairs ``steps``, with the views of
    ``per_call`` consecutive steps rendered per call, this process's rows of them (``world.rank`` of
    ``world.size``). Batches of an encoded (JPEG-at-rest) split are decoded in a thread pool of
    ``decode_threads`` (0: the default) one call ahead, while the previous steps train."""
    chunk = []

    def render():
        views = step_view_groups([b.images for _, b in chunk], specs, seed, chunk[0][0], channels_last=channels_last,
                                 rank=world.rank, world_size=world.size)
        return [(s, b, v) for (s, b), v in zip(chunk, views)]

    first = next(steps, None)
    if first is None:
        return
    steps = itertools.chain([first], steps)
    if not isinstance(first[1].images, torch.Tensor):
        yield from _encoded_steps_with_views(steps, specs, seed, per_call, channels_last, world, device,
                                             decode_threads)
        return
    for item in steps:
        chunk.append(item)
        if len(chunk) == per_call:
            yield from render()
            chunk = []
    if chunk:
        yield from render()


def _encoded_steps_with_views(steps, specs: list, seed: int, per_call: int, channels_last: bool, world,
                              device: torch.device, decode_threads: int):
    device_decode = device_jpeg_decoder(device)  # nvJPEG on CUDA where torchvision offers it

    trained = None  # the call before the one training: when a call starts, its steps have trained, and
    # the new call's views are rendered into its buffers (start_encoded_views' reuse)
    training = None

    def start(chunk):
        return chunk, start_encoded_views([b.images for _, b in chunk], specs, seed, chunk[0][0], pool,
                                          rank=world.rank, world_size=world.size, device_decode=device_decode,
                                          render_in_pool=device.type == "cpu", reuse=trained)

    def finish(started):
        nonlocal trained, training
        chunk, pending = started
        views = finish_encoded_views(pending, specs, device, channels_last=channels_last)
        trained, training = training, pending
        return [(s, b, v) for (s, b), v in zip(chunk, views)]

    with ThreadPoolExecutor(decode_threads or default_threads()) as pool:
        ahead = None  # the previous call's steps, decoding while the ones before them train
        chunk = []
        for item in steps:
            chunk.append(item)
            if len(chunk) == per_call:
                started = start(chunk)
                chunk = []
                if ahead is not None:
                    yield from finish(ahead)
                ahead = started
        if chunk:
            started = start(chunk)
            if ahead is not None:
                yield from finish(ahead)
            ahead = started
        if ahead is not None:
            yield from finish(ahead)
