"""MNIST-family datasets: the IDX reader against numpy on files written here, MNIST / KMNIST /
EMNIST-style folders, stratified subsets, the real Fashion-MNIST of Debian's
``dataset-fashion-mnist`` and its shifted variant, and one epoch of ``lejepa train`` on it."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from lejepa.config import DataConfig
from lejepa.data import FASHION_MNIST_DIR, build_datasets, stratified_subset
from lejepa.errors import DataError
from lejepa.idx import parse_idx, read_idx

from helpers import TINY, run_cli

HAVE_FASHION = (Path(FASHION_MNIST_DIR) / "train-images-idx3-ubyte.gz").is_file()
needs_fashion = pytest.mark.skipif(
    not HAVE_FASHION, reason=f"Debian's dataset-fashion-mnist is not installed ({FASHION_MNIST_DIR}); `make install` installs it"
)
TYPE_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of ``array``, written from the format's definition (not via lejepa.idx)."""
    header = bytes([0, 0, TYPE_CODES[array.dtype.type], array.ndim])
    sizes = b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    return header + sizes + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if compress else data)


def write_mnist_folder(
    root: Path,
    n_train: int = 60,
    n_test: int = 30,
    prefix: str = "",
    compress: bool = True,
    side: int = 28,
    classes: int = 10,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Four MNIST-style IDX files of random images with balanced labels; returns the arrays."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for stem, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, side, side), dtype=np.uint8)
        labels = (np.arange(n) % classes).astype(np.uint8)
        suffix = ".gz" if compress else ""
        write_idx(root / f"{prefix}{stem}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(root / f"{prefix}{stem}-labels-idx1-ubyte{suffix}", labels, compress)
        arrays[stem] = (images, labels)
    return arrays


# ------------------------------------------------------------------ the IDX reader


@pytest.mark.parametrize("dtype", list(TYPE_CODES))
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_matches_numpy(tmp_path, dtype, compress):
    rng = np.random.default_rng(1)
    array = (rng.normal(size=(5, 4, 3)) * 50).astype(dtype)
    write_idx(tmp_path / "a.idx", array, compress)
    read = read_idx(tmp_path / "a.idx")
    assert read.dtype == np.dtype(dtype) and read.shape == (5, 4, 3)
    np.testing.assert_array_equal(read, array)
    assert read.dtype.byteorder in ("=", "|")  # native order, safe for torch.from_numpy


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b"\x01\x00\x08\x01" + (3).to_bytes(4, "big") + b"abc", "bad magic"),
        (b"\x00\x00\x07\x01" + (3).to_bytes(4, "big") + b"abc", "unknown IDX type code 0x07"),
        (b"\x00\x00\x08\x03\x00\x00", "truncated IDX header"),
        (b"\x00\x00\x08\x02" + (3).to_bytes(4, "big") + (2).to_bytes(4, "big") + b"abcde", "holds 5"),
        (b"", "bad magic"),
    ],
)
def test_malformed_idx_is_one_line(raw, fragment):
    with pytest.raises(DataError, match=fragment) as info:
        parse_idx(raw, "x.idx")
    assert "\n" not in str(info.value)


def test_truncated_gzip_is_one_line(tmp_path):
    (tmp_path / "t.gz").write_bytes(gzip.compress(idx_bytes(np.zeros((4, 4), np.uint8)))[:-10])
    with pytest.raises(DataError, match="t.gz"):
        read_idx(tmp_path / "t.gz")


# ------------------------------------------------------------------ MNIST-style folders


@pytest.mark.parametrize(
    "name, prefix, compress", [("mnist", "", False), ("kmnist", "", True), ("emnist", "emnist-balanced-", True)]
)
def test_mnist_style_folders_load_exactly(tmp_path, name, prefix, compress):
    arrays = write_mnist_folder(tmp_path / name, prefix=prefix, compress=compress)
    splits = build_datasets(DataConfig(name=name, root=str(tmp_path / name), resolution=28))
    assert (splits.num_classes, splits.resolution, splits.source_size) == (10, 28, 28)
    for part, (images, labels) in zip((splits.train, splits.test), (arrays["train"], arrays["t10k"])):
        expected = torch.from_numpy(images)
        if name == "emnist":  # EMNIST stores images transposed; the loader turns them upright
            expected = expected.transpose(1, 2)
        assert part.images.shape == (len(images), 3, 28, 28) and part.images.dtype == torch.uint8
        for channel in range(3):
            assert torch.equal(part.images[:, channel], expected)
        assert torch.equal(part.labels, torch.from_numpy(labels.astype(np.int64)))
    assert torch.equal(splits.test.sources, torch.arange(60, 90))  # test sources offset past train


def test_fit_pads_at_32_and_resizes_below(tmp_path):
    arrays = write_mnist_folder(tmp_path, n_train=20, n_test=10)
    padded = build_datasets(DataConfig(name="mnist", root=str(tmp_path), resolution=32))
    image = padded.train.images[:, 0]
    assert image.shape[-1] == 32 and torch.equal(image[:, 2:30, 2:30], torch.from_numpy(arrays["train"][0]))
    assert image[:, :2].sum() == 0 and image[:, :, 30:].sum() == 0
    small = build_datasets(DataConfig(name="mnist", root=str(tmp_path), resolution=16))
    assert small.source_size == 16
    large = build_datasets(DataConfig(name="mnist", root=str(tmp_path), resolution=64))
    assert large.source_size == 28  # kept native: views and eval resample
    forced = build_datasets(DataConfig(name="mnist", root=str(tmp_path), resolution=64, fit="pad"))
    assert forced.source_size == 64


def test_several_splits_in_one_folder_are_refused(tmp_path):
    write_mnist_folder(tmp_path, prefix="emnist-letters-")
    write_mnist_folder(tmp_path, prefix="emnist-digits-")
    with pytest.raises(DataError, match="several train-images files"):
        build_datasets(DataConfig(name="emnist", root=str(tmp_path)))


@pytest.mark.parametrize(
    "name, root, fragment",
    [
        ("mnist", None, "MNIST needs data.root"),
        ("fashion-mnist", "/nonexistent/fm", "dataset-fashion-mnist"),
        ("kmnist", "EMPTY", r"no train-images-idx\*-ubyte"),
    ],
)
def test_missing_dataset_is_one_line_naming_the_remedy(tmp_path, name, root, fragment):
    if root == "EMPTY":
        root = str(tmp_path)
    with pytest.raises(DataError, match=fragment) as info:
        build_datasets(DataConfig(name=name, root=root))
    assert "\n" not in str(info.value)
    if name == "fashion-mnist":
        assert "data.root" in str(info.value)


# ------------------------------------------------------------------ stratified subsets


def test_stratified_subset_is_proportional_and_deterministic():
    labels = torch.tensor([0] * 500 + [1] * 300 + [2] * 200)
    pick = stratified_subset(labels, 101, seed=3)
    assert len(pick) == 101 and len(set(pick.tolist())) == 101 and torch.equal(pick, pick.sort().values)
    counts = torch.bincount(labels[pick], minlength=3)
    assert counts.sum() == 101 and (counts - torch.tensor([50.5, 30.3, 20.2])).abs().max() < 1
    assert torch.equal(pick, stratified_subset(labels, 101, seed=3))
    assert not torch.equal(pick, stratified_subset(labels, 101, seed=4))


def test_subset_options_on_folders_and_digits(tmp_path):
    write_mnist_folder(tmp_path, n_train=100, n_test=50)
    cfg = DataConfig(name="mnist", root=str(tmp_path), train_size=40, test_size=20, seed=2)
    a, b = build_datasets(cfg), build_datasets(cfg)
    assert (len(a.train), len(a.test)) == (40, 20)
    assert torch.bincount(a.train.labels).tolist() == [4] * 10
    assert torch.equal(a.train.sources, b.train.sources) and torch.equal(a.train.images, b.train.images)
    digits = build_datasets(DataConfig(name="digits-shifted", train_size=100, test_size=50, placements=2))
    assert len(digits.train) == 200 and len(set(digits.train.sources.tolist())) == 100
    with pytest.raises(DataError, match="data.train_size=500 exceeds the 100"):
        build_datasets(DataConfig(name="mnist", root=str(tmp_path), train_size=500))
    with pytest.raises(DataError, match="below the 10 classes"):
        build_datasets(DataConfig(name="mnist", root=str(tmp_path), test_size=5))


# ------------------------------------------------------------------ the real Fashion-MNIST


@needs_fashion
def test_real_fashion_mnist_official_split():
    splits = build_datasets(DataConfig(name="fashion-mnist"))
    assert (len(splits.train), len(splits.test), splits.num_classes) == (60000, 10000, 10)
    assert torch.bincount(splits.train.labels).tolist() == [6000] * 10
    assert torch.bincount(splits.test.labels).tolist() == [1000] * 10
    assert splits.train.images.shape[1:] == (3, 32, 32)
    # the IDX files read by an independent decoder (numpy on the raw bytes)
    raw = gzip.decompress((Path(FASHION_MNIST_DIR) / "t10k-images-idx3-ubyte.gz").read_bytes())
    first = np.frombuffer(raw, dtype=np.uint8, count=28 * 28, offset=16).reshape(28, 28)
    assert torch.equal(splits.test.images[0, 1, 2:30, 2:30], torch.from_numpy(first.copy()))


@needs_fashion
def test_fashion_mnist_shifted_split_by_source_and_deterministic():
    cfg = DataConfig(name="fashion-mnist-shifted", train_size=200, test_size=100, placements=3, resolution=32)
    a, b = build_datasets(cfg), build_datasets(cfg)
    c = build_datasets(cfg.model_copy(update={"seed": 1}))
    assert (len(a.train), len(a.test)) == (600, 300)
    assert not set(a.train.sources.tolist()) & set(a.test.sources.tolist())
    assert a.test.sources.min() >= 60000 and a.train.sources.max() < 60000
    assert torch.bincount(a.train.sources).max() == 3 and torch.bincount(a.train.labels).tolist() == [60] * 10
    assert torch.equal(a.train.images, b.train.images) and not torch.equal(a.train.images, c.train.images)
    ink = a.train.images[:3, 0].float()  # three placements of one item: moved, similar ink
    assert not torch.equal(ink[0], ink[1]) and (ink.sum((1, 2)) / ink[0].sum() - 1).abs().max() < 0.6
    centres = [(img.nonzero().float().mean(0)) for img in a.train.images[:60, 0]]
    assert torch.stack(centres).std(0).min() > 2.0  # items land at different positions


@pytest.mark.slow
@needs_fashion
def test_train_one_epoch_on_fashion_mnist(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [o for o in TINY if not o.startswith("data.")] + [
        "data.name=fashion-mnist",
        "data.resolution=16",
        "data.train_size=640",
        "data.test_size=200",
        "train.epochs=1",
        "train.run_name=fm",
        f"train.out_dir={tmp_path / 'runs'}",
    ]
    proc = run_cli(["train", *overrides, "--tracking-uri", uri], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("lejepa").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["dataset"] == "fashion-mnist"
    assert run.data.params["data.train_size"] == "640"
    assert 0.1 < run.data.metrics["eval/linear_probe_acc"] <= 1.0
    assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch")] == [10]
