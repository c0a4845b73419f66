"""Self-supervised methods: one file each, looked up by name with :func:`get`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from onepoch.config import suggest
from onepoch.errors import ConfigError
from onepoch.methods.barlow_twins import BarlowTwins, BarlowTwinsConfig
from onepoch.methods.byol import BYOL, BYOLConfig
from onepoch.methods.emp_ssl import EmpSSL, EmpSSLConfig
from onepoch.methods.ressl import ReSSL, ReSSLConfig
from onepoch.methods.simclr import SimCLR, SimCLRConfig
from onepoch.methods.swav import SwAV, SwAVConfig
from onepoch.methods.vicreg import VICReg, VICRegConfig


@dataclass(frozen=True)
class MethodEntry:
    """A method: its config dataclass and its module class (built as ``cls(backbone, config)``).

    The module's ``forward(views)`` takes a list of view groups, each (V_g, B, C, h, w) (one group,
    or several from ``views.groups``: asymmetric views, multi-crop sizes), and returns
    ``(loss, parts, features)``: the loss, a dict of detached loss parts for the metrics, and the
    backbone features (V·B, F) of the views the online network saw (rows 0..B-1: one view of each
    image, in batch order; the online probe reads them). Its ``features(x)`` gives the layers an
    evaluation reads (``"backbone"`` at least). Optional hooks, called by the trainer with the 0-based
    step and the total number of steps: ``before_optimizer_step`` (gradients are there, e.g. to
    freeze SwAV's prototypes) and ``after_optimizer_step`` (e.g. an EMA target update).
    """

    name: str
    config_class: type
    module_class: Callable[..., Any]


def _registry() -> dict[str, MethodEntry]:
    entries = [MethodEntry("emp_ssl", EmpSSLConfig, EmpSSL), MethodEntry("simclr", SimCLRConfig, SimCLR),
               MethodEntry("byol", BYOLConfig, BYOL), MethodEntry("vicreg", VICRegConfig, VICReg),
               MethodEntry("barlow_twins", BarlowTwinsConfig, BarlowTwins), MethodEntry("swav", SwAVConfig, SwAV),
               MethodEntry("ressl", ReSSLConfig, ReSSL)]
    return {e.name: e for e in entries}


def names() -> list[str]:
    return list(_registry())


def get(name: str) -> MethodEntry:
    """The method registered as ``name`` (e.g. ``"emp_ssl"``)."""
    registry = _registry()
    if name not in registry:
        raise ConfigError(f"unknown method {name!r}{suggest(name, registry)}; choose one of: {', '.join(registry)}")
    return registry[name]
