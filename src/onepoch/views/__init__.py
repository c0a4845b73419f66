"""Batched multi-view augmentation on CPU or CUDA tensors.

``make_views(images, spec, generator)`` turns a uint8 batch ``(B, H, W, C)`` into a float tensor of
``V*B`` views ``(V*B, C, h, w)``, **patch-major**: rows ``v*B .. v*B+B-1`` are view ``v`` of every
image. Every random parameter is drawn per view from one ``torch.Generator``; the ops then run as a
handful of batched tensor kernels (no per-sample Python loop, no PIL). The semantics follow
torchvision's ``RandomResizedCrop``/``ColorJitter``/``RandomGrayscale``/``GaussianBlur``; with a CPU
generator the same seed gives the same views on every device.

The package, one job per module:

* :mod:`~onepoch.views.spec`: :class:`ViewSpec`, the presets, :func:`load_view_spec`;
* :mod:`~onepoch.views.params`: the random parameters of views (:func:`sample_view_params`);
* :mod:`~onepoch.views.ops`: resampling matrices, colour ops and blur, batched over views;
* :mod:`~onepoch.views.render`: rendering views from their parameters (:func:`apply_view_params`,
  :func:`make_views`);
* :mod:`~onepoch.views.kernels` (and ``_numba``): optional fused CPU kernels of the colour ops (numba);
* :mod:`~onepoch.views.encoded`: the views of JPEG-at-rest batches, each image decoded once per step;
* :mod:`~onepoch.views.stream`: the per-step views the trainer consumes;
* :mod:`~onepoch.views.tiles`: pictures of images and their views.

This module re-exports the public names of the first four.
"""

from onepoch.views.ops import GRAY_WEIGHTS, one_torch_thread, resample_matrices, resize_view
from onepoch.views.params import CROP_TRIES, ViewParams, concat_view_params, sample_view_params, seeded_generator
from onepoch.views.render import PER_VIEW_RESIZE_ABOVE, apply_view_params, make_views
from onepoch.views.spec import PRESETS, ViewSpec, get_preset, load_view_spec

__all__ = [
    "CROP_TRIES",
    "GRAY_WEIGHTS",
    "PER_VIEW_RESIZE_ABOVE",
    "PRESETS",
    "ViewParams",
    "ViewSpec",
    "apply_view_params",
    "concat_view_params",
    "get_preset",
    "load_view_spec",
    "make_views",
    "one_torch_thread",
    "resample_matrices",
    "resize_view",
    "sample_view_params",
    "seeded_generator",
]
