"""Self-supervised methods: one file each, looked up by name with :func:`get`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from onepoch.errors import ConfigError


@dataclass(frozen=True)
class MethodEntry:
    """A method: its config dataclass and its module class (built as ``cls(backbone, config)``).

    The module's ``forward(views, num_views)`` takes view-major views (V·B, C, h, w) and returns
    ``(loss, parts, features)``: the loss, a dict of detached loss parts for the metrics, and the
    backbone features (V·B, F) of the views (rows 0..B-1: the first view; the online probe reads them).
    """

    name: str
    config_class: type
    module_class: Callable[..., Any]


def _registry() -> dict[str, MethodEntry]:
    from onepoch.methods.barlow_twins import BarlowTwins, BarlowTwinsConfig
    from onepoch.methods.emp_ssl import EmpSSL, EmpSSLConfig
    from onepoch.methods.simclr import SimCLR, SimCLRConfig
    from onepoch.methods.vicreg import VICReg, VICRegConfig

    entries = [MethodEntry("emp_ssl", EmpSSLConfig, EmpSSL), MethodEntry("simclr", SimCLRConfig, SimCLR),
               MethodEntry("vicreg", VICRegConfig, VICReg),
               MethodEntry("barlow_twins", BarlowTwinsConfig, BarlowTwins)]
    return {e.name: e for e in entries}


def names() -> list[str]:
    return list(_registry())


def get(name: str) -> MethodEntry:
    """The method registered as ``name`` (e.g. ``"emp_ssl"``)."""
    registry = _registry()
    if name not in registry:
        from onepoch.config import suggest

        raise ConfigError(f"unknown method {name!r}{suggest(name, registry)}; choose one of: {', '.join(registry)}")
    return registry[name]
