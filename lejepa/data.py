"""Datasets as uint8 image tensors, with the facts the trainer needs about them.

:func:`build_datasets` turns a :class:`~lejepa.config.DataConfig` into train and test splits
whose items are ``(uint8 tensor [3, S, S], int label)``. Small datasets (the scikit-learn
digits, the MNIST family's IDX files — Fashion-MNIST from Debian's ``dataset-fashion-mnist`` by
default —, CIFAR, STL-10) are decoded once into a :class:`TensorImageDataset` that hands a whole
batch out with one index operation; image folders (ImageNet, Imagenette, Galaxy10, any
class-per-folder tree) stay on disk and are decoded per item (PIL, as torchvision's
ImageFolder does; ``torchvision.io`` decoding is deprecated since torchvision 0.29).
Augmentation is not done here: :mod:`lejepa.views` makes the views from these batches.
Every missing or malformed dataset is a one-line :class:`~lejepa.errors.DataError` that
says how to obtain it. torchvision and scikit-learn are imported where a dataset is built, so
:func:`check_data` (a sweep's pre-flight) costs no import of them (about 4 CPU-seconds).
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as NF
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from lejepa.config import DataConfig
from lejepa.errors import DataError, did_you_mean, first_line
from lejepa.idx import read_idx

if TYPE_CHECKING:
    from torchvision import datasets as tvd

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FOLDER_CROP = 0.875  # image folders are stored at resolution / 0.875 (256 px for 224), eval centre-crops
DIGIT_FRACTION = 0.5  # digits-shifted: a digit's side is this fraction of the canvas, times U(0.8, 1.2)
ITEM_FRACTION = 0.6  # fashion-mnist-shifted: the same for a 28 px item
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
PAD_LIMIT = 4  # data.fit=auto pads 28 px images when the canvas is at most this many px larger per side


@dataclass
class DatasetSplits:
    """Train and test splits plus what the views, model and probes need to know."""

    train: Dataset  # items: (uint8 tensor [3, S, S], int label)
    test: Dataset
    num_classes: int
    resolution: int  # side of the global views and of the eval images
    source_size: int  # side S of the stored images; may be below `resolution` (CIFAR at 64 px): views resample
    mean: tuple[float, float, float]  # per-channel normalisation, on the [0, 1] scale
    std: tuple[float, float, float]
    name: str


class TensorImageDataset(Dataset):
    """In-memory images ``uint8 [N, 3, S, S]`` with ``int64 [N]`` labels.

    ``__getitems__`` returns a whole batch as ``(images[idx], labels[idx])`` (one index
    operation); use ``collate_fn=batch_collate`` in the DataLoader. ``sources`` optionally
    records which original image each item was made from (digits-shifted placements).
    """

    def __init__(self, images: Tensor, labels: Tensor, sources: Tensor | None = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be [N={images.shape[0]}], got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()
        self.sources = sources

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], self.labels[idx]


def batch_collate(batch):
    """DataLoader ``collate_fn``: a batch already stacked by ``__getitems__`` (a tuple of
    tensors) passes through; a list of items goes to ``default_collate``."""
    if isinstance(batch, tuple) and all(isinstance(t, Tensor) for t in batch):
        return batch
    return default_collate(batch)


def build_datasets(cfg: DataConfig) -> DatasetSplits:
    """The train / test splits named by ``cfg.name`` (see :data:`BUILDERS`), each cut to a
    stratified, seeded subset when ``cfg.train_size`` / ``cfg.test_size`` ask for one."""
    splits = _builder(cfg.name)(cfg)
    if cfg.name.endswith("-shifted"):  # the builder subsets source images, before placing them
        return splits
    splits.train = _limit(splits.train, cfg.train_size, cfg.seed, "data.train_size")
    splits.test = _limit(splits.test, cfg.test_size, cfg.seed, "data.test_size")
    return splits


def check_data(cfg: DataConfig) -> None:
    """Pre-flight without reading an image (a sweep runs it on every data config it expands to,
    before any trial): the dataset name is known and its files or folders are where ``cfg``
    says. Raises the one-line :class:`DataError` its builder would."""
    _builder(cfg.name)
    if cfg.name in ("cifar10", "cifar100"):
        _require_files(cfg, *_cifar_files(_dataset_class(cfg.name), cfg.name))
    elif cfg.name == "stl10":
        _require_files(cfg, *_stl10_files())
    elif cfg.name in _FOLDER_HELP:
        _folder_splits(cfg)
    elif cfg.name.removesuffix("-shifted") in _IDX_HELP:
        idx_files(*_idx_root(cfg))


def _builder(name: str) -> Callable[[DataConfig], DatasetSplits]:
    if name not in BUILDERS:
        raise DataError(f"unknown dataset {name!r}{did_you_mean(name, BUILDERS)}; choose one of: {', '.join(BUILDERS)}")
    return BUILDERS[name]


def _limit(dataset: TensorImageDataset | tvd.ImageFolder, size: int | None, seed: int, what: str) -> Dataset:
    """``dataset`` cut to a stratified subset of ``size`` items (unchanged when already that size)."""
    if size is None or len(dataset) == size:
        return dataset
    labels = dataset.labels if isinstance(dataset, TensorImageDataset) else torch.as_tensor(dataset.targets)
    keep = _subset_indices(labels, size, seed, what)
    if isinstance(dataset, TensorImageDataset):
        sources = dataset.sources[keep] if dataset.sources is not None else None
        return TensorImageDataset(dataset.images[keep], dataset.labels[keep], sources)
    return torch.utils.data.Subset(dataset, keep.tolist())


# ---------------------------------------------------------------------------- digits


def _digit_arrays() -> tuple[Tensor, Tensor]:
    """The 1,797 scikit-learn digits as float [N, 1, 8, 8] in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)
    return images, torch.from_numpy(digits.target).long()


def _split_indices(labels: Tensor, cfg: DataConfig) -> tuple[Tensor, Tensor]:
    """Stratified train / test indices (``cfg.test_fraction``, ``cfg.seed``); both splits must
    hold every class at least once."""
    from sklearn.model_selection import train_test_split

    classes = int(labels.unique().numel())
    n_test = int(np.ceil(cfg.test_fraction * len(labels)))
    if n_test < classes or len(labels) - n_test < classes:
        raise DataError(
            f"data.test_fraction={cfg.test_fraction} gives {n_test} test and {len(labels) - n_test} "
            f"training items of {len(labels)}: each split needs at least the {classes} classes once; "
            f"use a test_fraction between {classes / len(labels):.3g} and {1 - classes / len(labels):.3g}"
        )
    train, test = train_test_split(
        np.arange(len(labels)), test_size=cfg.test_fraction, stratify=labels.numpy(), random_state=cfg.seed
    )
    return torch.from_numpy(np.sort(train)), torch.from_numpy(np.sort(test))


def _to_uint8(x: Tensor) -> Tensor:
    """float in [0, 1] to uint8 (rounded, clamped)."""
    return x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def _to_uint8_rgb(gray: Tensor) -> Tensor:
    """float [N, 1, H, W] in [0, 1] to uint8 [N, 3, H, W]."""
    return _to_uint8(gray).expand(-1, 3, -1, -1).contiguous()


def _splits(name: str, cfg: DataConfig, train: TensorImageDataset, test: TensorImageDataset, num_classes: int) -> DatasetSplits:
    mean, std = _channel_stats(train.images)
    return DatasetSplits(
        train=train,
        test=test,
        num_classes=num_classes,
        resolution=cfg.resolution,
        source_size=train.images.shape[-1],
        mean=mean,
        std=std,
        name=name,
    )


def _digits(cfg: DataConfig) -> DatasetSplits:
    """8x8 digits upsampled (bilinear, antialiased) to the resolution, stratified split."""
    images, labels = _digit_arrays()
    big = NF.interpolate(images, size=(cfg.resolution, cfg.resolution), mode="bilinear", align_corners=False, antialias=True)
    rgb = _to_uint8_rgb(big.clamp(0.0, 1.0))
    train, test = _split_indices(labels, cfg)
    return _splits(
        "digits", cfg, TensorImageDataset(rgb[train], labels[train], train), TensorImageDataset(rgb[test], labels[test], test), 10
    )


def _place(digits: Tensor, size: int, generator: torch.Generator, fraction: float = DIGIT_FRACTION) -> Tensor:
    """Each image [n, 1, h, w] (float) drawn once on a black ``size``-px canvas: side
    ``fraction * U(0.8, 1.2)`` of the canvas, centre uniform over the positions that keep
    it whole. One affine ``grid_sample``: output point u reads the image at (u - c) / s."""
    n = digits.shape[0]
    s = fraction * (0.8 + 0.4 * torch.rand(n, generator=generator))
    c = (2.0 * torch.rand(n, 2, generator=generator) - 1.0) * (1.0 - s)[:, None]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / s
    theta[:, :, 2] = -c / s[:, None]
    grid = NF.affine_grid(theta, [n, 1, size, size], align_corners=False)
    return NF.grid_sample(digits, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _digits_shifted(cfg: DataConfig) -> DatasetSplits:
    """Real digits rescaled and placed at random on a canvas, ``cfg.placements`` per digit,
    split by source digit (stratified) so no digit appears in both splits; ``train_size`` /
    ``test_size`` count source digits."""
    images, labels = _digit_arrays()
    generator = torch.Generator().manual_seed(cfg.seed)
    parts = []
    for index, size, what in zip(
        _split_indices(labels, cfg), (cfg.train_size, cfg.test_size), ("data.train_size", "data.test_size")
    ):
        index = index[_subset_indices(labels[index], size, cfg.seed, what)]
        sources = index.repeat_interleave(cfg.placements)
        placed = _place(images[sources], cfg.resolution, generator)
        parts.append(TensorImageDataset(_to_uint8_rgb(placed.clamp(0.0, 1.0)), labels[sources], sources))
    return _splits("digits-shifted", cfg, parts[0], parts[1], 10)


# ---------------------------------------------------------------------------- CIFAR / STL-10


def _existence_checked(cls: type, lists: Sequence[str]) -> type:
    """A torchvision dataset class whose file check is existence only (md5 None): repacked
    copies and test fixtures load; a download still verifies the archive's md5."""
    attrs: dict[str, Any] = {key: [[name, None] for name, _ in getattr(cls, key)] for key in lists}
    if hasattr(cls, "meta"):
        attrs["meta"] = {**cls.meta, "md5": None}
    return type(cls.__name__, (cls,), attrs)


@functools.cache
def _dataset_class(name: str) -> type[Any]:
    """torchvision's class of ``name`` (cifar10, cifar100, stl10) with existence-only file checks."""
    from torchvision import datasets as tvd

    if name == "stl10":
        # Labelled splits only (train 5k, test 8k), as the probes need labels; the 100k unlabeled
        # images (unlabeled_X.bin, split "unlabeled") could be added to the training set for SSL.
        splits = {
            "train_list": [["train_X.bin", None], ["train_y.bin", None]],
            "test_list": [["test_X.bin", None], ["test_y.bin", None]],
        }
        return type("STL10", (tvd.STL10,), splits)
    return _existence_checked(tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100, ("train_list", "test_list"))


def _root(cfg: DataConfig, title: str) -> Path:
    if cfg.root is None:
        raise DataError(f"{title} needs data.root=<folder> (the folder holding it, or where data.download=true should put it)")
    return Path(cfg.root).expanduser()


def _require_files(cfg: DataConfig, title: str, files: Sequence[str], how: str) -> tuple[Path, list[str]]:
    """(root, files missing under it); raises when some are missing and ``data.download`` is off."""
    root = _root(cfg, title)
    missing = [f for f in files if not (root / f).is_file()]
    if missing and not cfg.download:
        raise DataError(f"{title} not found under {root} ({missing[0]} is missing): {how}")
    return root, missing


_D = TypeVar("_D", bound=Dataset)


def _torchvision_split(title: str, cfg: DataConfig, make: Callable[[bool], _D], files: Sequence[str], how: str) -> tuple[_D, _D]:
    """Load train and test with a torchvision class; map every failure to one DataError line."""
    root, missing = _require_files(cfg, title, files, how)
    try:
        return make(True), make(False)
    except DataError:
        raise
    except Exception as exc:  # download errors, unpickling, reshape: all one line
        what = "download failed" if missing else "files are malformed"
        raise DataError(f"{title} under {root}: {what}: {first_line(exc)}") from None


_ARRAY_PICKLE_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)
"""The only callables a pickled data file may name: NumPy array reconstruction and bytes decoding."""


class _ArrayUnpickler(pickle.Unpickler):
    """Reads dicts, lists, strings, numbers and NumPy arrays, and nothing that runs code: any other
    global a pickle names (``os.system`` in a crafted ``__reduce__``) is refused before it is called."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ARRAY_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: a dataset file may hold only arrays, lists and strings")


def load_array_pickle(path: Path) -> dict:
    """A CIFAR-style pickled batch (Python 2 or 3) through :class:`_ArrayUnpickler`; keys as str."""
    with open(path, "rb") as f:
        entry = _ArrayUnpickler(f, encoding="latin1").load()
    if not isinstance(entry, dict):
        raise pickle.UnpicklingError(f"expected a dict of arrays, got {type(entry).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _read_cifar(folder: Path, names: Sequence[str]) -> TensorImageDataset:
    """Batches of rows R-plane, G-plane, B-plane (3 × 32 × 32 bytes) and their labels."""
    entries = [load_array_pickle(folder / name) for name in names]
    data = np.concatenate([np.asarray(e["data"], dtype=np.uint8) for e in entries]).reshape(-1, 3, 32, 32)
    labels = [y for e in entries for y in (e["labels"] if "labels" in e else e["fine_labels"])]
    return TensorImageDataset(torch.from_numpy(data), torch.as_tensor(labels, dtype=torch.long))


def _cifar_files(cls: type[tvd.CIFAR10], name: str) -> tuple[str, list[str], str]:
    """(title, files under data.root, how to get them) of CIFAR-10 or CIFAR-100."""
    base = cls.base_folder
    files = [f"{base}/{n}" for n, _ in cls.train_list + cls.test_list] + [f"{base}/{cls.meta['filename']}"]
    return (
        "CIFAR-10" if name == "cifar10" else "CIFAR-100",
        files,
        f"pass data.download=true or put {base} there (https://www.cs.toronto.edu/~kriz/cifar.html, {cls.filename})",
    )


def _cifar(cfg: DataConfig, cls: type[tvd.CIFAR10], num_classes: int) -> DatasetSplits:
    """CIFAR-10/100 from their python batches, read with the restricted unpickler (torchvision's
    reader unpickles with ``pickle.load``, which runs whatever a crafted file names)."""
    title, files, how = _cifar_files(cls, cfg.name)
    base = cls.base_folder
    root, missing = _require_files(cfg, title, files, how)
    try:
        if missing:
            from torchvision.datasets.utils import download_and_extract_archive

            download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
        train = _read_cifar(root / base, [name for name, _ in cls.train_list])
        test = _read_cifar(root / base, [name for name, _ in cls.test_list])
    except Exception as exc:  # download errors, refused or malformed pickles, reshape: all one line
        what = "download failed" if missing and not (root / files[0]).is_file() else "files are malformed"
        raise DataError(f"{title} under {root}: {what}: {first_line(exc)}") from None
    return _splits(cfg.name, cfg, train, test, num_classes)


def _stl10_files() -> tuple[str, list[str], str]:
    stl10 = _dataset_class("stl10")
    base = stl10.base_folder
    return (
        "STL-10",
        [f"{base}/{name}" for name, _ in stl10.train_list + stl10.test_list],
        f"pass data.download=true or put {base} there (https://cs.stanford.edu/~acoates/stl10/, stl10_binary.tar.gz)",
    )


def _stl10(cfg: DataConfig) -> DatasetSplits:
    title, files, how = _stl10_files()
    root = _root(cfg, title)
    train, test = _torchvision_split(
        title,
        cfg,
        lambda t: _dataset_class("stl10")(str(root), split="train" if t else "test", download=cfg.download),
        files,
        how,
    )
    parts = [
        TensorImageDataset(torch.from_numpy(np.ascontiguousarray(d.data)), torch.from_numpy(d.labels.astype(np.int64)))
        for d in (train, test)
    ]
    return _splits("stl10", cfg, parts[0], parts[1], 10)


def _channel_stats(images: Tensor, chunk: int = 4096) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and std of uint8 [N, 3, H, W] images on the [0, 1] scale."""
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    for part in images.split(chunk):
        x = part.transpose(0, 1).reshape(3, -1).double()
        total += x.sum(1)
        squares += x.square().sum(1)
    count = images.numel() / 3
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-6).sqrt()
    mean_r, mean_g, mean_b = (mean / 255).tolist()
    std_r, std_g, std_b = (std / 255).tolist()
    return (mean_r, mean_g, mean_b), (std_r, std_g, std_b)


# ---------------------------------------------------------------------------- image folders

_FOLDER_HELP = {
    "imagefolder": ("image folder", "a class-per-folder tree <root>/train/<class>/*.jpg and <root>/val (or test)/<class>/*.jpg"),
    "imagenet": (
        "ImageNet",
        "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG from https://image-net.org (sort the "
        "validation images into class folders, e.g. with the usual valprep.sh)",
    ),
    "imagenette": (
        "Imagenette",
        "the extracted imagenette2-320.tgz (train/ and val/) from "
        "https://github.com/fastai/imagenette; point data.root at imagenette2-320",
    ),
    "galaxy10": (
        "Galaxy10",
        "class folders train/<class>/*.png and test/<class>/*.png: Galaxy10 ships as "
        "Galaxy10_DECals.h5 (https://github.com/henrysky/Galaxy10); write its 'images' with PIL into the "
        "folder of their 'ans' label, split as you like",
    ),
}


def _load_image(path: str, size: int) -> Tensor:
    """Decode with PIL to uint8 RGB [3, size, size]: shorter side resized to ``size``
    (antialiased), centre crop. JPEGs much larger than ``size`` are decoded at a reduced scale
    (PIL draft mode, never below ``size``), which makes ImageNet-sized files cheap."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (size, size))
            rgb = image.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise DataError(f"image {path} is too large to decode ({first_line(exc)}): resize or remove it") from None
    except (OSError, ValueError) as exc:  # PIL.UnidentifiedImageError is an OSError; so is a truncated file
        raise DataError(f"cannot decode image {path}: {first_line(exc)}") from None
    import torchvision.transforms.v2.functional as TF

    tensor = TF.resize(TF.pil_to_tensor(rgb), [size], antialias=True)
    return TF.center_crop(tensor, [size, size])


def _folder_splits(cfg: DataConfig) -> tuple[str, str, Path, Path]:
    """(title, how, root, test folder) of an image-folder dataset: root/train and root/val or root/test."""
    title, how = _FOLDER_HELP[cfg.name]
    root = _root(cfg, title)
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise DataError(f"{title} not found under {root}: expected {how}")
    return title, how, root, test_dir


def _image_folder(cfg: DataConfig) -> DatasetSplits:
    """Lazy class-per-folder splits root/train and root/val (or root/test) (torchvision
    ImageFolder: any PIL-readable extension it lists), decoded per item at
    ``round(resolution / 0.875)`` px so crops see some context and eval centre-crops."""
    title, how, root, test_dir = _folder_splits(cfg)
    size = max(cfg.resolution, round(cfg.resolution / FOLDER_CROP))
    loader = functools.partial(_load_image, size=size)
    from torchvision.datasets import ImageFolder

    try:
        train, test = (ImageFolder(str(d), loader=loader) for d in (root / "train", test_dir))
    except FileNotFoundError as exc:
        raise DataError(f"{title} under {root}: {first_line(exc)} (expected {how})") from None
    if train.classes != test.classes:
        extra = sorted(set(train.classes) ^ set(test.classes))
        raise DataError(f"{title} under {root}: train/ and {test_dir.name}/ have different class folders (e.g. {extra[0]!r})")
    return DatasetSplits(
        train=train,
        test=test,
        num_classes=len(train.classes),
        resolution=cfg.resolution,
        source_size=size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        name=cfg.name,
    )


# ---------------------------------------------------------------------------- IDX (MNIST family)

IDX_PARTS = {  # file-name stems of the four files, as the MNIST family names them
    "train images": "train-images",
    "train labels": "train-labels",
    "test images": "t10k-images",
    "test labels": "t10k-labels",
}

_IDX_HELP = {
    "fashion-mnist": (
        "Fashion-MNIST",
        "install Debian's package dataset-fashion-mnist (apt-get install "
        "dataset-fashion-mnist) or pass data.root=<folder holding the four IDX files>",
    ),
    "mnist": (
        "MNIST",
        "pass data.root=<folder holding train-images-idx3-ubyte(.gz), train-labels-idx1-ubyte, "
        "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte>",
    ),
    "kmnist": ("KMNIST", "pass data.root=<folder holding the four KMNIST IDX files (train-images-idx3-ubyte.gz, ...)>"),
    "emnist": (
        "EMNIST",
        "pass data.root=<folder holding the four IDX files of one EMNIST split, e.g. "
        "emnist-balanced-train-images-idx3-ubyte.gz, ...>",
    ),
}


def _idx_file(root: Path, stem: str, title: str, how: str) -> Path:
    """The one file under ``root`` named ``[prefix-]<stem>[-.]idx?-ubyte[.gz]``."""
    found = sorted(
        p
        for p in root.glob(f"*{stem}[-.]idx*-ubyte*")
        if p.is_file() and (p.name.startswith(stem) or p.name.split(stem)[0].endswith("-"))
    )
    if not found:
        raise DataError(f"{title} not found under {root} (no {stem}-idx*-ubyte[.gz]): {how}")
    if len(found) > 1:
        raise DataError(
            f"{title} under {root}: several {stem} files ({', '.join(p.name for p in found[:3])}); "
            f"point data.root at a folder holding one set"
        )
    return found[0]


def idx_files(root: Path, title: str = "IDX dataset", how: str = "") -> dict[str, Path]:
    """The four files of an MNIST-style folder, by part (``train images``, …), unread."""
    if not root.is_dir():
        raise DataError(f"{title} not found: {root} is not a folder: {how}")
    return {part: _idx_file(root, stem, title, how) for part, stem in IDX_PARTS.items()}


def idx_arrays(root: Path, title: str = "IDX dataset", how: str = "") -> dict[str, np.ndarray]:
    """The four arrays of an MNIST-style folder: ``train images`` uint8 [N, H, W], ``train
    labels`` int64 [N], and the same for ``test``; shapes checked against each other."""
    arrays = {part: read_idx(path) for part, path in idx_files(root, title, how).items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split} images"], arrays[f"{split} labels"]
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataError(f"{title} under {root}: {split} images must be uint8 [N, H, W], got {images.dtype} {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(f"{title} under {root}: {len(images)} {split} images but labels of shape {labels.shape}")
        arrays[f"{split} labels"] = labels.astype(np.int64)
    if arrays["train images"].shape[1:] != arrays["test images"].shape[1:]:
        raise DataError(f"{title} under {root}: train and test images differ in size")
    return arrays


def stratified_subset(labels: Tensor, size: int, seed: int) -> Tensor:
    """Sorted indices of ``size`` items whose class counts are proportional to ``labels``'
    (largest remainder), drawn per class with a generator seeded by ``seed``."""
    classes, counts = labels.unique(return_counts=True)
    quota = counts.double() * size / len(labels)
    take = quota.floor().long()
    extra = torch.argsort(-(quota - take), stable=True)[: size - int(take.sum())]
    take[extra] += 1
    generator = torch.Generator().manual_seed(seed)
    picks = []
    for cls, k in zip(classes.tolist(), take.tolist()):
        members = torch.nonzero(labels == cls).flatten()
        picks.append(members[torch.randperm(len(members), generator=generator)[:k]])
    return torch.cat(picks).sort().values


def _subset_indices(labels: Tensor, size: int | None, seed: int, what: str) -> Tensor:
    """All indices, or a stratified subset of ``size`` (``what`` names the field in errors)."""
    if size is None or size == len(labels):
        return torch.arange(len(labels))
    if size > len(labels):
        raise DataError(f"{what}={size} exceeds the {len(labels)} images of that split")
    classes = len(labels.unique())
    if size < classes:
        raise DataError(f"{what}={size} is below the {classes} classes: a stratified subset needs one per class")
    return stratified_subset(labels, size, seed)


def _gray_rgb(gray: Tensor) -> Tensor:
    """uint8 [N, H, W] to uint8 [N, 3, H, W] as a view (the three channels share memory)."""
    return gray.unsqueeze(1).expand(-1, 3, -1, -1)


def _fit(gray: Tensor, resolution: int, fit: str) -> Tensor:
    """uint8 [N, H, W] fitted to the resolution: ``pad`` centres it on a black canvas of side
    ``resolution``; ``resize`` stores it at ``resolution`` when that is smaller (antialiased),
    else keeps the native side (views and eval resample). ``auto`` pads when the canvas is at
    most ``PAD_LIMIT`` px larger per side (28 -> 32, LeNet's padding), else resizes."""
    side = gray.shape[-1]
    if fit == "auto":
        fit = "pad" if side <= resolution <= side + 2 * PAD_LIMIT else "resize"
    if fit == "pad" and resolution > side:
        before = (resolution - side) // 2
        return NF.pad(gray, (before, resolution - side - before, before, resolution - side - before))
    if resolution < side:
        small = NF.interpolate(
            gray.unsqueeze(1).float().div(255.0),
            size=(resolution, resolution),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
        return _to_uint8(small)[:, 0]
    return gray


def _idx_root(cfg: DataConfig) -> tuple[Path, str, str]:
    """(folder, title, how to get it) of an IDX dataset; Fashion-MNIST defaults to Debian's copy."""
    family = cfg.name.removesuffix("-shifted")
    title, how = _IDX_HELP[family]
    root = Path(cfg.root).expanduser() if cfg.root else (Path(FASHION_MNIST_DIR) if family == "fashion-mnist" else None)
    if root is None:
        raise DataError(f"{title} needs data.root: {how}")
    return root, title, how


def _idx_dataset(cfg: DataConfig, shifted: bool = False) -> DatasetSplits:
    """An MNIST-style IDX folder: the official train / test split, optionally a stratified
    subset of each (``data.train_size``, ``data.test_size``), grey kept as 3 channels.
    ``shifted``: each image placed ``data.placements`` times at random positions and scales
    (side ``ITEM_FRACTION * U(0.8, 1.2)`` of the canvas) on a black canvas of side
    ``data.resolution``; placements of one source stay in its split. ``sources`` holds each
    item's index in the official files, test indices offset by the train size."""
    family = cfg.name.removesuffix("-shifted")
    arrays = idx_arrays(*_idx_root(cfg))
    generator = torch.Generator().manual_seed(cfg.seed)
    num_classes = int(max(arrays["train labels"].max(), arrays["test labels"].max())) + 1
    parts, offset = [], 0
    for split, size in (("train", cfg.train_size), ("test", cfg.test_size)):
        labels = torch.from_numpy(arrays[f"{split} labels"])
        keep = _subset_indices(labels, size, cfg.seed, f"data.{split}_size")
        images = torch.from_numpy(arrays[f"{split} images"])[keep]
        if family == "emnist":  # EMNIST's IDX files store each image transposed
            images = images.transpose(1, 2)
        sources, labels = keep + offset, labels[keep]
        offset += len(arrays[f"{split} labels"])
        if shifted:
            sources = sources.repeat_interleave(cfg.placements)
            labels = labels.repeat_interleave(cfg.placements)
            gray = torch.cat(
                [
                    _to_uint8(_place(chunk.unsqueeze(1).float().div(255.0), cfg.resolution, generator, ITEM_FRACTION))[:, 0]
                    for chunk in images.repeat_interleave(cfg.placements, dim=0).split(8192)
                ]
            )
        else:
            gray = _fit(images.contiguous(), cfg.resolution, cfg.fit)
        parts.append(TensorImageDataset(_gray_rgb(gray), labels, sources))
    return _splits(cfg.name, cfg, parts[0], parts[1], num_classes)


BUILDERS: dict[str, Callable[[DataConfig], DatasetSplits]] = {
    "digits": _digits,
    "digits-shifted": _digits_shifted,
    "cifar10": lambda cfg: _cifar(cfg, _dataset_class("cifar10"), 10),
    "cifar100": lambda cfg: _cifar(cfg, _dataset_class("cifar100"), 100),
    "stl10": _stl10,
    **{name: _image_folder for name in _FOLDER_HELP},
    **{name: _idx_dataset for name in _IDX_HELP},
    "fashion-mnist-shifted": functools.partial(_idx_dataset, shifted=True),
}
