"""The features cache beside a run: a second evaluation embeds nothing, a changed checkpoint or dataset is a miss."""

import json
import os

import pytest
import torch
from test_train import blobs, tiny_config  # noqa: F401  (fixture)

from onepoch import eval as evaluation
from onepoch.data.prepared import open_split
from onepoch.eval import evaluate_run
from onepoch.feature_cache import FeatureCache, checkpoint_identity, split_identity
from onepoch.train import train


def test_cache_serves_only_an_equal_description(tmp_path, blobs):  # noqa: F811
    ckpt = tmp_path / "step_1.pt"
    ckpt.write_bytes(b"weights")
    cache = FeatureCache(tmp_path / "features", checkpoint_identity(ckpt, 1))
    split = open_split(blobs, "train")
    description = {"data": split_identity(split), "kind": "full", "seed": 0}
    features = torch.randn(64, 5)
    calls = []

    def compute():
        calls.append(1)
        return features

    first = cache.features(description, compute, torch.device("cpu"))
    again = cache.features(description, compute, torch.device("cpu"))
    assert torch.equal(first, features) and torch.equal(again, features) and len(calls) == 1
    assert (cache.hits, cache.misses) == (1, 1)
    # any other setting, the checkpoint rewritten, the dataset's files changed: a miss
    assert cache.get({**description, "seed": 1}) is None
    ckpt.write_bytes(b"other weights")
    assert FeatureCache(tmp_path / "features", checkpoint_identity(ckpt, 1)).get(description) is None
    st = os.stat(ckpt)
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert FeatureCache(tmp_path / "features", checkpoint_identity(ckpt, 1)).get(description) is None
    images = blobs / "train" / "images.npy"
    st = os.stat(images)
    os.utime(images, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache.get({**description, "data": split_identity(split)}) is None
    # an entry whose stored description differs (a damaged or foreign file) is a miss, not a hit
    for path in (tmp_path / "features").glob("*.json"):
        path.write_text(json.dumps({"something": "else"}))
    assert cache.get(description) is None


@pytest.mark.slow
def test_second_evaluation_embeds_nothing_and_a_new_checkpoint_misses(tmp_path, blobs, monkeypatch):  # noqa: F811
    config = tiny_config(tmp_path, blobs, "train.max_steps=4", "eval.features=[full,bag]", "eval.probes=[knn]")
    train(config, progress_bar=False)
    calls = []
    original = evaluation.embed_split

    def counted(*args, **kwargs):
        calls.append(args[2])
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluation, "embed_split", counted)
    quiet = {"log": lambda *_: None}
    first = evaluate_run(config.run_dir, **quiet)
    assert sorted(calls) == ["bag", "bag", "full", "full"]
    assert len(list((config.run_dir / "features").glob("*.npy"))) == 4
    second = evaluate_run(config.run_dir, **quiet)
    assert len(calls) == 4  # nothing embedded again
    for kind in ("full", "bag"):
        assert second["evaluated"][kind]["knn"]["test_acc"] == first["evaluated"][kind]["knn"]["test_acc"]
    # another bag size: only the bag is embedded again
    evaluate_run(config.run_dir, overrides={"eval.bag_patches": 3}, **quiet)
    assert sorted(calls[4:]) == ["bag", "bag"]
    # a newer checkpoint: everything is embedded again
    train(tiny_config(tmp_path, blobs, "train.max_steps=6", "eval.features=[full,bag]", "eval.probes=[knn]",
                      "train.resume=on"), progress_bar=False)
    evaluate_run(config.run_dir, **quiet)
    assert sorted(calls[6:]) == ["bag", "bag", "full", "full"]
