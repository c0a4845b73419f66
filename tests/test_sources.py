"""load_source dispatch, the cache location and the offline switch (downloads: test_download.py)."""

from __future__ import annotations

import pytest

from onepoch.data import download as dl
from onepoch.data.sources import SOURCE_NAMES, load_source
from onepoch.errors import DataError


def test_source_names():
    assert SOURCE_NAMES == ("fashion-mnist", "mnist", "cifar10", "cifar100", "folder", "npz", "imagenette",
                            "imagenette-320", "imagenette-160", "imagenet", "imagenet100", "tiny-imagenet", "stl10")


def test_unknown_source_lists_the_valid_names():
    with pytest.raises(DataError, match=r"unknown dataset source 'imagenet-21k' \(valid: fashion-mnist, mnist, "
                                        r"cifar10, cifar100, folder, npz, imagenette, .*, stl10\)"):
        load_source("imagenet-21k")


@pytest.mark.parametrize("name", ["folder", "npz"])
def test_path_sources_need_a_path(name):
    with pytest.raises(DataError, match=rf"the {name} source needs a path \(--source PATH\)"):
        load_source(name)


def test_cache_location_precedence(tmp_path, monkeypatch):
    assert dl.download_dir("mnist") == tmp_path / "cache" / "downloads" / "mnist"
    monkeypatch.delenv("ONEPOCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dl.cache_root() == tmp_path / "xdg" / "onepoch"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dl.cache_root() == tmp_path / "home" / ".cache" / "onepoch"


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("0", False), ("", False)])
def test_offline_switch(monkeypatch, value, expected):
    monkeypatch.setenv("ONEPOCH_OFFLINE", value)
    assert dl.offline() is expected
