"""Prepared datasets (atomic, idempotent, checksummed) and the device loader."""

import json
import os

import numpy as np
import pytest
import torch

from onepoch.data import SourceData, SplitArrays, is_prepared, open_split, write_prepared
from onepoch.data.loader import BatchLoader, epoch_permutation
from onepoch.data.prepared import check_out_dir
from onepoch.errors import ConfigError, DataError


def make_source(n_train=50, n_test=20, shape=(6, 5, 3), num_classes=4, seed=0):
    """Images whose every pixel equals the image's index (mod 256): a batch tells which rows it holds."""
    rng = np.random.default_rng(seed)
    def split(n, offset):
        idx = (np.arange(n) + offset) % 256
        images = np.broadcast_to(idx.reshape(-1, 1, 1, 1), (n, *shape)).astype(np.uint8).copy()
        return SplitArrays(images, rng.integers(0, num_classes, n))
    return SourceData("toy", {"train": split(n_train, 0), "test": split(n_test, 100)},
                      [f"c{i}" for i in range(num_classes)], "generated", {"name": "toy", "seed": seed})


@pytest.fixture
def toy(tmp_path):
    return write_prepared(make_source(), tmp_path / "toy")


def test_write_prepared_layout_and_meta(toy):
    assert is_prepared(toy)
    info = json.loads((toy / "dataset.json").read_text())
    assert info["splits"] == ["train", "test"] and info["shape"] == [6, 5, 3]
    train = open_split(toy, "train", verify=True)
    assert train.images.shape == (50, 6, 5, 3) and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int64
    expect_mean = np.arange(50).mean() / 255
    assert train.mean == pytest.approx([expect_mean] * 3, abs=1e-6)
    assert train.std == pytest.approx([np.arange(50).std() / 255] * 3, abs=1e-6)
    assert train.class_names == ["c0", "c1", "c2", "c3"]
    assert len(train.meta["sha256"]["images"]) == 64
    assert not any(p.name.startswith(".") for p in toy.parent.iterdir())  # no staging leftovers


def test_nhw_images_get_a_channel_axis(tmp_path):
    src = make_source()
    src.splits["train"].images = src.splits["train"].images[..., 0]
    src.splits["test"].images = src.splits["test"].images[..., 0]
    out = write_prepared(src, tmp_path / "gray")
    assert open_split(out, "test").images.shape == (20, 6, 5, 1)


def test_failed_prepare_leaves_nothing(tmp_path, monkeypatch):
    import onepoch.data.prepared as prepared

    def explode(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(prepared, "array_sha256", explode)
    with pytest.raises(OSError, match="disk full"):
        write_prepared(make_source(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_failed_replace_keeps_the_old_dataset(toy, monkeypatch):
    import onepoch.data.prepared as prepared

    before = (toy / "train" / "images.npy").read_bytes()
    monkeypatch.setattr(prepared, "channel_stats", lambda *a, **k: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        write_prepared(make_source(seed=1), toy, force=True)
    assert (toy / "train" / "images.npy").read_bytes() == before
    assert open_split(toy, "train", verify=True).num_images == 50


def test_out_dir_rules(tmp_path, toy):
    src = make_source()
    assert check_out_dir(toy, "toy", src.request, force=False) is True  # same dataset: nothing to do
    with pytest.raises(DataError, match="another prepared dataset.*--force"):
        check_out_dir(toy, "toy", {"name": "toy", "seed": 9}, force=False)
    assert check_out_dir(toy, "toy", {"name": "toy", "seed": 9}, force=True) is False
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="not an onepoch prepared dataset; refusing to overwrite"):
        write_prepared(src, other, force=True)
    assert (other / "thesis.tex").read_text() == "precious"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert is_prepared(write_prepared(src, empty))


def test_invalid_arrays_are_refused(tmp_path):
    src = make_source()
    src.splits["train"].labels = src.splits["train"].labels[:-1]
    with pytest.raises(DataError, match="50 images but 49 labels"):
        write_prepared(src, tmp_path / "a")
    src = make_source()
    src.splits["test"].labels[0] = 7
    with pytest.raises(DataError, match=r"test labels must lie in \[0, 3\]"):
        write_prepared(src, tmp_path / "b")
    src = make_source()
    src.splits["train"].images = src.splits["train"].images.astype(np.float32)
    with pytest.raises(DataError, match="train images must be uint8"):
        write_prepared(src, tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_verify_detects_a_changed_file(toy):
    path = toy / "train" / "images.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    open_split(toy, "train")  # opening without verification still works
    with pytest.raises(DataError, match="checksum does not match"):
        open_split(toy, "train", verify=True)


def test_open_split_errors(tmp_path, toy):
    with pytest.raises(DataError, match="not found"):
        open_split(tmp_path / "nope")
    with pytest.raises(DataError, match="not an onepoch prepared dataset"):
        open_split(tmp_path)
    with pytest.raises(DataError, match="no split 'val'"):
        open_split(toy, "val")
    os.remove(toy / "test" / "labels.npy")
    with pytest.raises(DataError, match="cannot read arrays"):
        open_split(toy, "test")


# ------------------------------------------------------------------------------------------------
# Loader
# ------------------------------------------------------------------------------------------------


def served(loader, epoch=0, start_step=0):
    return [b.indices.tolist() for b in loader.epoch(epoch, start_step)]


def test_batches_hold_the_right_rows_and_labels(toy):
    loader = BatchLoader(open_split(toy), 8, seed=3)
    labels = open_split(toy).labels
    assert len(loader) == 6  # 50 // 8, last partial batch dropped
    for batch in loader.epoch(0):
        assert batch.images.shape == (8, 6, 5, 3) and batch.images.dtype == torch.uint8
        assert batch.images[:, 0, 0, 0].tolist() == batch.indices.tolist()
        assert batch.labels.tolist() == labels[batch.indices.numpy()].tolist()


def test_epochs_are_seeded_permutations(toy):
    loader = BatchLoader(open_split(toy), 10, seed=1, drop_last=False)
    e0, e1 = served(loader, 0), served(loader, 1)
    assert sorted(sum(e0, [])) == list(range(50)) and sorted(sum(e1, [])) == list(range(50))
    assert e0 != e1
    assert served(BatchLoader(open_split(toy), 10, seed=1, drop_last=False), 0) == e0
    assert served(BatchLoader(open_split(toy), 10, seed=2, drop_last=False), 0) != e0
    assert torch.equal(epoch_permutation(50, 1, 0), epoch_permutation(50, 1, 0))


def test_start_mid_epoch_matches_a_full_pass(toy):
    loader = BatchLoader(open_split(toy), 7, seed=0)
    full = served(loader, 2)
    assert served(loader, 2, start_step=4) == full[4:]
    assert served(loader, 2, start_step=len(loader)) == []
    with pytest.raises(ConfigError, match="outside the epoch"):
        next(loader.epoch(0, start_step=99))


def test_memmap_and_resident_loaders_agree(toy):
    a = BatchLoader(open_split(toy), 9, seed=5, resident=True)
    b = BatchLoader(open_split(toy), 9, seed=5, resident=False)
    assert a.resident and not b.resident
    for x, y in zip(a.epoch(1), b.epoch(1)):
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)


def test_ranks_split_each_global_batch(toy):
    ranks = [BatchLoader(open_split(toy), 4, seed=0, rank=r, world_size=3) for r in range(3)]
    single = BatchLoader(open_split(toy), 12, seed=0)
    assert len(ranks[0]) == len(single) == 4
    for step, batches in enumerate(zip(*(r.epoch(0) for r in ranks))):
        joined = sum((b.indices.tolist() for b in batches), [])
        assert joined == served(single)[step]


def test_loader_errors(toy):
    with pytest.raises(ConfigError, match="batch size 64 is larger than the train split"):
        BatchLoader(open_split(toy), 64)
    with pytest.raises(ConfigError, match="batch size must be >= 1"):
        BatchLoader(open_split(toy), 0)


@pytest.mark.cuda
def test_loader_on_cuda_is_resident(toy):
    loader = BatchLoader(open_split(toy), 8, device="cuda")
    batch = next(iter(loader))
    assert loader.resident and batch.images.is_cuda and batch.labels.is_cuda
    assert batch.images[:, 0, 0, 0].cpu().tolist() == batch.indices.tolist()
