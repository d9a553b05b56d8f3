"""Dataset loaders: the bundled digits, and the real CIFAR / STL-10 / image-folder loaders on
small files written here in each dataset's on-disk format."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits
from torch.utils.data import DataLoader

from lejepa.config import DataConfig
from lejepa.data import TensorImageDataset, batch_collate, build_datasets, check_data
from lejepa.errors import DataError

DIGITS = load_digits()


def build(**kwargs):
    return build_datasets(DataConfig(**kwargs))


def one_line_error(match: str, **kwargs) -> str:
    with pytest.raises(DataError, match=match) as info:
        build(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------ digits


def test_digits_shapes_ranges_and_labels():
    splits = build(name="digits", resolution=24)
    assert (splits.name, splits.num_classes, splits.resolution, splits.source_size) == ("digits", 10, 24, 24)
    assert len(splits.train) + len(splits.test) == 1797 and len(splits.test) == 450
    images = splits.train.images
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 24, 24)
    assert images.min() == 0 and images.max() > 200
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2])
    image, label = splits.test[0]
    assert image.shape == (3, 24, 24) and isinstance(label, int)
    for part in (splits.train, splits.test):  # each item is the upsampled sklearn digit it says
        assert torch.equal(part.labels, torch.from_numpy(DIGITS.target[part.sources.numpy()]))
        small = torch.nn.functional.interpolate(part.images[:, :1].float(), size=8, mode="area")[:, 0]
        original = torch.from_numpy(DIGITS.images[part.sources.numpy()]).float()
        assert np.corrcoef(small.flatten(), original.flatten())[0, 1] > 0.95
    assert len(splits.mean) == len(splits.std) == 3 and 0 < splits.mean[0] < 1 and 0 < splits.std[0] < 1


def test_digits_split_is_stratified_and_deterministic():
    a, b, c = build(name="digits"), build(name="digits"), build(name="digits", seed=1)
    train_counts = torch.bincount(a.train.labels, minlength=10).float()
    test_counts = torch.bincount(a.test.labels, minlength=10).float()
    expected = (train_counts + test_counts) * 0.25
    assert (test_counts - expected).abs().max() <= 1.0
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.sources, b.test.sources)
    assert not torch.equal(a.test.sources, c.test.sources)


def test_digits_shifted_split_by_source_and_deterministic():
    a = build(name="digits-shifted", placements=3)
    assert len(a.train) == 1347 * 3 and len(a.test) == 450 * 3 and a.source_size == 32
    assert not set(a.train.sources.tolist()) & set(a.test.sources.tolist())
    assert torch.bincount(a.train.sources).max() == 3
    assert torch.equal(a.train.labels, torch.from_numpy(DIGITS.target[a.train.sources.numpy()]))
    b, c = build(name="digits-shifted", placements=3), build(name="digits-shifted", placements=3, seed=5)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.images, b.test.images)
    assert not torch.equal(a.train.images, c.train.images)
    first = a.train.images[:3, 0].float()  # three placements of one digit: same ink, moved
    assert not torch.equal(first[0], first[1])
    assert (first.sum((1, 2)) / first[0].sum() - 1).abs().max() < 0.5


def _pixels(part: TensorImageDataset) -> tuple[np.ndarray, np.ndarray]:
    return part.images[:, 0].flatten(1).float().numpy() / 255, part.labels.numpy()


def _centred(part: TensorImageDataset) -> tuple[np.ndarray, np.ndarray]:
    """Each image shifted so its centre of mass is at the middle, central 20x20 kept."""
    x = part.images[:, 0].float() / 255
    side = x.shape[-1]
    grid = torch.arange(side, dtype=torch.float32)
    mass = x.sum((1, 2))
    rows = ((x.sum(2) * grid).sum(1) / mass).round().long()
    cols = ((x.sum(1) * grid).sum(1) / mass).round().long()
    out = torch.stack([torch.roll(im, (side // 2 - int(r), side // 2 - int(c)), (0, 1)) for im, r, c in zip(x, rows, cols)])
    return out[:, 6:26, 6:26].flatten(1).numpy(), part.labels.numpy()


def test_digits_shifted_defeats_a_raw_pixel_probe_but_is_learnable():
    splits = build(name="digits-shifted")
    probe = LogisticRegression(C=0.1, max_iter=200)
    with threadpool_limits(1):  # BLAS threads spin badly on a busy 2-core machine
        raw = probe.fit(*_pixels(splits.train)).score(*_pixels(splits.test))
        centred = probe.fit(*_centred(splits.train)).score(*_centred(splits.test))
    assert raw < 0.3  # chance is 0.1; about 0.19 at the defaults
    assert centred > 0.8  # about 0.96: a translation-invariant view recovers the digits


def test_getitems_batches_with_one_index_and_collate_passes_through():
    splits = build(name="digits", resolution=16)
    loader = DataLoader(splits.train, batch_size=32, shuffle=True, collate_fn=batch_collate)
    images, labels = next(iter(loader))
    assert images.shape == (32, 3, 16, 16) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    items = [splits.train[i] for i in range(4)]
    stacked, targets = batch_collate(items)
    assert torch.equal(stacked, splits.train.images[:4]) and targets.tolist() == splits.train.labels[:4].tolist()


# ------------------------------------------------------------------ CIFAR, in the real on-disk format


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` (SHORT_BINSTRING), as the original CIFAR pickles do:
    ``encoding="bytes"`` reads the keys back as b'data', ``encoding="latin1"`` as 'data'."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + len(obj).to_bytes(4, "little") + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def _write_pickle(path, obj) -> None:
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    path.write_bytes(buffer.getvalue())


def _cifar_images(n: int, seed: int) -> np.ndarray:
    """n x 3072 rows: R plane, G plane, B plane, each 32x32 row-major; R = row index + offset."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    images[:, 0] = np.arange(32, dtype=np.uint8)[:, None] + np.arange(n, dtype=np.uint8)[:, None, None]
    return images.reshape(n, 3072)


def write_cifar10(root, per_batch: int = 4) -> None:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    for i in range(1, 6):
        batch = {
            b"batch_label": b"training batch",
            b"data": _cifar_images(per_batch, i),
            b"labels": [(i + j) % 10 for j in range(per_batch)],
        }
        _write_pickle(base / f"data_batch_{i}", batch)
    _write_pickle(base / "test_batch", {b"data": _cifar_images(6, 0), b"labels": list(range(6))})
    _write_pickle(
        base / "batches.meta",
        {b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]},
    )


def write_cifar100(root) -> None:
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    _write_pickle(
        base / "train", {b"data": _cifar_images(10, 1), b"fine_labels": list(range(90, 100)), b"coarse_labels": [9] * 10}
    )
    _write_pickle(base / "test", {b"data": _cifar_images(5, 2), b"fine_labels": [0, 1, 2, 3, 99], b"coarse_labels": [0] * 5})
    _write_pickle(
        base / "meta",
        {
            b"fine_label_names": [f"c{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"s{i}".encode() for i in range(20)],
        },
    )


def test_cifar10_loads_the_real_format(tmp_path):
    write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        assert b"data" in pickle.load(f, encoding="bytes")  # as documented for the real files
    splits = build(name="cifar10", root=str(tmp_path))
    assert (splits.num_classes, splits.source_size, len(splits.train), len(splits.test)) == (10, 32, 20, 6)
    image, label = splits.train[1]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and label == 2
    assert torch.equal(image[0], (torch.arange(32)[:, None] + 1).expand(32, 32).to(torch.uint8))  # rows, planes
    expected = _cifar_images(4, 1).reshape(4, 3, 32, 32)
    assert torch.equal(splits.train.images[:4], torch.from_numpy(expected))
    assert splits.test.labels.tolist() == list(range(6))
    mean = splits.train.images.float().mean((0, 2, 3)) / 255
    assert np.allclose(splits.mean, mean.numpy(), atol=1e-5)


def test_cifar100_loads_fine_labels(tmp_path):
    write_cifar100(tmp_path)
    splits = build(name="cifar100", root=str(tmp_path))
    assert splits.num_classes == 100 and len(splits.train) == 10 and len(splits.test) == 5
    assert splits.train.labels.tolist() == list(range(90, 100)) and splits.test.labels.tolist()[-1] == 99
    assert torch.equal(splits.test.images, torch.from_numpy(_cifar_images(5, 2).reshape(5, 3, 32, 32)))


def test_cifar_malformed_file_is_one_line(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    message = one_line_error("malformed", name="cifar10", root=str(tmp_path))
    assert "CIFAR-10" in message


class _Payload:
    """What a crafted CIFAR batch can carry: unpickling it with pickle.load runs os.system."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_cifar_pickle_carrying_code_is_refused_and_nothing_runs(tmp_path):
    write_cifar10(tmp_path)
    marker = tmp_path / "payload-ran"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(pickle.dumps({"data": _Payload(marker), "labels": [0]}, protocol=2))
    with open(batch, "rb") as f:  # the payload is real: plain pickle.load would run it
        assert b"system" in f.read()
    message = one_line_error("refused to load posix.system", name="cifar10", root=str(tmp_path))
    assert "CIFAR-10" in message and "may hold only arrays" in message
    assert not marker.exists()


# ------------------------------------------------------------------ STL-10, binary format


def write_stl10(root) -> dict[str, np.ndarray]:
    """stl10_binary/*_X.bin: uint8 [N, 3, 96, 96] stored column-major per channel (the file holds
    each channel transposed); *_y.bin: labels 1..10."""
    base = root / "stl10_binary"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for split, n in (("train", 5), ("test", 3)):
        images = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        images[:, 1] = np.arange(96, dtype=np.uint8)[:, None]  # G = row index
        images.transpose(0, 1, 3, 2).tofile(base / f"{split}_X.bin")
        np.arange(1, n + 1, dtype=np.uint8).tofile(base / f"{split}_y.bin")
        written[split] = images
    (base / "class_names.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n")
    return written


def test_stl10_loads_the_binary_format(tmp_path):
    written = write_stl10(tmp_path)
    splits = build(name="stl10", root=str(tmp_path), resolution=64)
    assert (splits.num_classes, splits.source_size, splits.resolution) == (10, 96, 64)
    assert torch.equal(splits.train.images, torch.from_numpy(written["train"]))
    assert torch.equal(splits.test.images, torch.from_numpy(written["test"]))
    assert splits.train[0][0][1, 5, 0] == 5  # row-major after loading
    assert splits.train.labels.tolist() == [0, 1, 2, 3, 4] and splits.test.labels.tolist() == [0, 1, 2]


# ------------------------------------------------------------------ image folders


def write_folder(root, splits=("train", "val"), classes=("cat", "dog"), per_class: int = 2) -> None:
    colours = {"cat": (255, 0, 0), "dog": (0, 0, 255), "eel": (0, 255, 0)}
    for split in splits:
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                image = Image.new("RGB", (60 + 10 * i, 40), colours[name])  # landscape, varied sizes
                image.paste((255, 255, 255), (0, 0, 8, 40))  # a white strip on the far left
                image.save(folder / f"{i}.{'png' if i % 2 == 0 else 'jpg'}")


def test_image_folder_decodes_resizes_and_crops(tmp_path):
    write_folder(tmp_path)
    splits = build(name="imagefolder", root=str(tmp_path), resolution=32)
    assert (splits.num_classes, splits.source_size, len(splits.train), len(splits.test)) == (2, 37, 4, 4)
    assert splits.train.classes == ["cat", "dog"]
    image, label = splits.train[0]  # cat/0.png: red, 60x40 -> 56x37 -> centre 37x37
    assert image.dtype == torch.uint8 and image.shape == (3, 37, 37) and label == 0
    assert image[0].float().mean() > 250 and image[2].float().mean() < 5  # the white strip was cropped off
    jpeg, label = splits.test[3]  # dog/1.jpg
    assert label == 1 and jpeg[2].float().mean() > 240 and jpeg[0].float().mean() < 15
    loader = DataLoader(splits.train, batch_size=4, collate_fn=batch_collate)
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 37, 37) and labels.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("name", ["imagenet", "imagenette", "galaxy10"])
def test_image_folder_aliases_and_test_split(tmp_path, name):
    write_folder(tmp_path, splits=("train", "test"), classes=("cat", "dog", "eel"), per_class=1)
    splits = build(name=name, root=str(tmp_path), resolution=224)
    assert splits.name == name and splits.num_classes == 3 and splits.source_size == 256
    assert splits.mean == (0.485, 0.456, 0.406)


def test_image_folder_problems_are_one_line(tmp_path):
    write_folder(tmp_path / "a", classes=("cat",), per_class=1)
    (tmp_path / "a" / "val" / "dog").mkdir()
    (tmp_path / "a" / "val" / "dog" / "x.png").write_bytes(b"PNG? no")
    one_line_error("image folder under .*different class folders", name="imagefolder", root=str(tmp_path / "a"))
    (tmp_path / "a" / "train" / "dog").mkdir()
    (tmp_path / "a" / "train" / "dog" / "y.txt").write_text("not an image")
    one_line_error("no valid file", name="imagefolder", root=str(tmp_path / "a"))
    (tmp_path / "a" / "train" / "dog" / "z.png").write_bytes(b"PNG? no")
    splits = build(name="imagefolder", root=str(tmp_path / "a"))
    with pytest.raises(DataError, match="cannot decode image .*x.png"):
        splits.test[1]


# ------------------------------------------------------------------ missing datasets, unknown names


@pytest.mark.parametrize(
    "name,needle",
    [
        ("cifar10", r"CIFAR-10 not found under .*data\.download=true.*cifar-10-batches-py.*cs\.toronto\.edu"),
        ("cifar100", r"CIFAR-100 not found under .*data\.download=true.*cifar-100-python.*cs\.toronto\.edu"),
        ("stl10", r"STL-10 not found under .*data\.download=true.*stl10_binary.*stanford\.edu"),
        ("imagefolder", r"image folder not found under .*train/<class>"),
        ("imagenet", r"ImageNet not found under .*image-net\.org"),
        ("imagenette", r"Imagenette not found under .*fastai/imagenette"),
        ("galaxy10", r"Galaxy10 not found under .*Galaxy10_DECals\.h5"),
    ],
)
def test_missing_dataset_says_how_to_get_it(tmp_path, name, needle):
    line = one_line_error(needle, name=name, root=str(tmp_path / "nowhere"))
    with pytest.raises(DataError) as info:  # a sweep's pre-flight says the same, before any trial
        check_data(DataConfig(name=name, root=str(tmp_path / "nowhere")))
    assert str(info.value) == line


def test_the_pre_flight_finds_every_format_and_reads_no_image(tmp_path):
    write_cifar10(tmp_path / "c10")
    write_cifar100(tmp_path / "c100")
    write_stl10(tmp_path / "stl")
    write_folder(tmp_path / "folder")
    for name, root in [("cifar10", "c10"), ("cifar100", "c100"), ("stl10", "stl"), ("imagefolder", "folder")]:
        check_data(DataConfig(name=name, root=str(tmp_path / root)))
    check_data(DataConfig(name="digits-shifted"))
    for batch in (tmp_path / "c10" / "cifar-10-batches-py").iterdir():
        batch.write_bytes(b"not a pickle")  # present but unreadable: only training would find out
    check_data(DataConfig(name="cifar10", root=str(tmp_path / "c10")))
    one_line_error("files are malformed", name="cifar10", root=str(tmp_path / "c10"))
    with pytest.raises(DataError, match="unknown dataset 'cifar-10'"):
        check_data(DataConfig(name="cifar-10"))


def test_partial_download_names_the_missing_file(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    assert "test_batch is missing" in one_line_error("CIFAR-10 not found", name="cifar10", root=str(tmp_path))


def test_root_required_and_unknown_names():
    one_line_error(r"CIFAR-10 needs data\.root", name="cifar10")
    assert "'cifar10'" in one_line_error(r"unknown dataset 'cifar-10'.*did you mean", name="cifar-10")
    assert "'digits-shifted'" in one_line_error("did you mean", name="digit-shifted")


@pytest.mark.parametrize("fraction", [0.001, 0.999])
def test_a_test_fraction_that_leaves_a_class_out_is_one_line(fraction):
    message = one_line_error("each split needs at least the 10 classes", name="digits", test_fraction=fraction)
    assert f"data.test_fraction={fraction}" in message


def test_an_image_above_the_decompression_limit_is_one_line(tmp_path):
    write_folder(tmp_path, classes=("cat", "dog"), per_class=1)
    Image.new("1", (14000, 14000)).save(tmp_path / "train" / "dog" / "bomb.png")  # 196 M pixels, a few kB
    splits = build(name="imagefolder", root=str(tmp_path))
    index = [i for i, (path, _) in enumerate(splits.train.samples) if path.endswith("bomb.png")][0]
    with pytest.raises(DataError, match="image .*bomb.png is too large to decode .*resize or remove it") as info:
        splits.train[index]
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_a_truncated_jpeg_read_in_a_dataloader_worker_is_one_error_line(tmp_path):
    """Decoding happens in DataLoader workers (train.num_workers); PyTorch re-raises a worker's
    error with the worker's traceback: `lejepa train` still prints one line naming the file."""
    from helpers import TINY, run_cli

    write_folder(tmp_path / "data", classes=("cat", "dog"), per_class=40)
    jpeg = tmp_path / "data" / "train" / "dog" / "1.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:200])
    args = [a for a in TINY if not a.startswith("data.")] + [
        "data.name=imagefolder",
        f"data.root={tmp_path / 'data'}",
        "data.resolution=16",
        "train.num_workers=1",
        "optim.batch_size=16",
        f"train.out_dir={tmp_path / 'runs'}",
        "train.epochs=1",
    ]
    proc = run_cli(["train", "--no-tracking", *args], tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert lines[-1].startswith("error: cannot decode image ") and "1.jpg" in lines[-1]
    assert not any("Traceback" in line for line in lines)
