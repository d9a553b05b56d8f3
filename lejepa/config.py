"""The typed, validated training configuration.

One :class:`Config` holds everything a LeJEPA run needs. It is built from a YAML file plus
``key=value`` overrides with dotted paths (``loss.lam=0.02``), validated by pydantic, and
every problem is reported as a one-line :class:`~lejepa.errors.ConfigError` that names the
field, the value and what is allowed (unknown keys get the closest valid name).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from lejepa.errors import ConfigError, did_you_mean, first_line
from lejepa.record import CONFIG_FILE as CONFIG_FILE  # re-exported: where it has always been imported from

PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
"""A name safe as one folder: never ``..``, a hidden name, an option-like ``-x`` or a path."""
PLAIN_NAME_RULE = "letters, digits, '_', '-', '.'; not starting with '.' or '-'; at most 128 characters"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """``true``/``false`` is not a number (pydantic's lax mode would read it as 1/0)."""
        if isinstance(value, bool) and info.field_name is not None and _numeric(cls.model_fields[info.field_name].annotation):
            raise ValueError("expected a number, got a boolean")
        return value


def _numeric(annotation: Any) -> bool:
    """``int``, ``float`` or one of them ``| None``."""
    if annotation in (int, float):
        return True
    args = set(get_args(annotation)) - {type(None)}
    return bool(args) and args <= {int, float}


class DataConfig(_Section):
    """Which dataset, where it lives and at which resolution the encoder sees it."""

    name: str = Field(
        "digits-shifted",
        description="digits | digits-shifted | fashion-mnist | fashion-mnist-shifted | "
        "mnist | kmnist | emnist | cifar10 | cifar100 | stl10 | imagefolder | imagenet | imagenette | galaxy10",
    )
    root: str | None = Field(
        None,
        description="folder holding the dataset files (file-backed datasets; "
        "fashion-mnist defaults to Debian's /usr/share/datasets/fashion-mnist)",
    )
    resolution: int = Field(32, ge=8, le=1024, description="side of the global views, in pixels")
    download: bool = Field(False, description="allow torchvision to download CIFAR/STL-10 into root")
    placements: int = Field(4, ge=1, le=64, description="*-shifted: random placements per source image")
    test_fraction: float = Field(0.25, gt=0.0, lt=1.0, description="digits*: fraction held out for testing")
    train_size: int | None = Field(
        None, ge=1, description="stratified, seeded subset of the training split (source images for *-shifted); None = all"
    )
    test_size: int | None = Field(None, ge=1, description="the same for the test split")
    fit: Literal["auto", "pad", "resize"] = Field(
        "auto", description="MNIST-style 28 px images: pad onto the canvas, or resize; auto = pad up to 4 px per side (28 -> 32)"
    )
    seed: int = Field(0, description="seed for synthetic splits, subsets and placements")


class ModelConfig(_Section):
    """Backbone (any timm model) and projector."""

    arch: str = Field("resnet10t", description="timm architecture name (see `lejepa archs`)")
    small_stem: bool | None = Field(
        False,
        description="the family's small-input adaptation (lejepa/backbones.py): "
        "CNN stems down-sample 2x less (output stride 16, 4x the compute), strided 1x1 "
        "shortcuts become average-pooled, EfficientNet squeeze-excite gates start open, "
        "class-token ViTs are built as reg1_gap ViTs; None = on below 64 px",
    )
    proj_layers: int = Field(3, ge=1, le=8, description="projector MLP depth")
    proj_hidden: int = Field(512, ge=8, description="projector hidden width")
    proj_dim: int = Field(64, ge=2, description="projector output dimension (SIGReg acts here)")


class ViewsConfig(_Section):
    """Multi-crop views and the paper's augmentations (docs/method.md §2)."""

    global_views: int = Field(2, ge=1, le=16)
    local_views: int = Field(6, ge=0, le=64)
    global_scale: tuple[float, float] = (0.3, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.3)
    local_size: int | None = Field(None, ge=4, description="side of local views; None = resolution * 96/224")
    flip_p: float = Field(0.5, ge=0.0, le=1.0)
    jitter_p: float = Field(0.8, ge=0.0, le=1.0)
    jitter: tuple[float, float, float, float] = Field(
        (0.4, 0.4, 0.2, 0.1), description="ColorJitter (brightness, contrast, saturation, hue) strengths"
    )
    grayscale_p: float = Field(0.2, ge=0.0, le=1.0)
    blur_p: float = Field(0.5, ge=0.0, le=1.0)
    solarize_p: float = Field(0.2, ge=0.0, le=1.0)

    @field_validator("global_scale", "local_scale")
    @classmethod
    def _scale_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError("must be (low, high) with 0 < low <= high <= 1")
        return v

    @field_validator("jitter")
    @classmethod
    def _jitter_range(cls, v: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        if min(v) < 0.0 or v[3] > 0.5:
            raise ValueError("must be (brightness, contrast, saturation, hue) >= 0 with hue <= 0.5")
        return v


class LossConfig(_Section):
    """LeJEPA objective: (1 - lam) * invariance + lam * SIGReg."""

    lam: float = Field(0.05, ge=0.0, le=1.0, description="SIGReg weight λ in [0, 1]")
    num_slices: int = Field(1024, ge=1, description="number M of random 1-D projections")
    knots: int = Field(17, ge=3, description="quadrature knots on [0, t_max] (odd)")
    t_max: float = Field(3.0, gt=0.0, description="upper end of the integration range")
    kernel: Literal["torch", "triton"] = Field(
        "torch",
        description="SIGReg's implementation: torch (any device) or triton (two fused CUDA kernels; needs the triton package)",
    )

    @field_validator("knots")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("must be odd (trapezoid grid symmetric around the centre)")
        return v


class OptimConfig(_Section):
    """AdamW with linear warm-up then cosine decay to lr * final_lr_ratio, per step."""

    lr: float = Field(2e-3, gt=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = Field(1.0, ge=0.0)
    final_lr_ratio: float = Field(1e-3, ge=0.0, le=1.0)
    grad_clip: float | None = Field(None, gt=0.0, description="max gradient norm; None = no clipping")
    batch_size: int = Field(128, ge=2, description="images per step (global batch under DDP)")
    probe_lr: float = Field(1e-3, gt=0.0, description="online linear probe learning rate")
    fused: bool | None = Field(None, description="fused AdamW kernel; None = on CUDA (foreach elsewhere)")


class TrainConfig(_Section):
    """Loop, devices, checkpoints, evaluation and output."""

    epochs: int = Field(10, ge=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 autocast on CUDA, fp32 elsewhere; bf16 is refused on CPU"
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (pinned memory on CUDA)")
    prefetch_factor: int = Field(4, ge=1, description="batches each DataLoader worker loads ahead (num_workers > 0)")
    compile: Literal["auto", "eager", "default", "reduce-overhead", "max-autotune"] = Field(
        "auto",
        description="torch.compile mode of the backbone and projector (false = eager, true = default); "
        "auto = default on CUDA, eager elsewhere (on 2 CPU cores compiling did not pay: benchmarks/gpu_check.py)",
    )
    channels_last: bool | None = Field(
        None, description="channels-last memory format for convolutional backbones; None = on CUDA only"
    )
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; None = leave as is")
    keep_checkpoints: int = Field(2, ge=1, description="how many epoch checkpoints to keep")
    log_every: int = Field(10, ge=1, description="steps between per-step metric events")
    eval_knn_k: int = Field(20, ge=1)
    online_eval_images: int | None = Field(
        2048,
        ge=1,
        description="test images scored by the online probe after "
        "each epoch (an evenly spaced subset); None = the whole test split",
    )
    eval_probe_epochs: int = Field(100, ge=1, description="epochs of the final frozen linear probe")
    eval_at_init: bool = Field(
        False,
        description="also score the untrained backbone (frozen linear probe and "
        "kNN, logged at the end as eval/init_*): the random-init baseline of this run",
    )
    out_dir: str = Field("runs", description="folder for checkpoints and the embedded MLflow store")
    run_name: str | None = Field(None, description="run folder name under out_dir; None = <arch>-<timestamp>")
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps (for smoke tests)")
    health: bool = Field(
        True,
        description="measure run health (collapse ratio every step, effective ranks every "
        "log_every steps) and log a verdict per epoch",
    )
    collapse_patience: int | None = Field(
        None, ge=1, description="stop the run after this many consecutive epochs with the verdict 'collapsed'; None = never"
    )

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_flag(cls, v: object) -> object:
        return {False: "eager", True: "default"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("run_name", mode="before")
    @classmethod
    def _number_as_name(cls, v: object) -> object:
        """``train.run_name=2024`` is a folder name, though YAML reads it as a number."""
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("run_name")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        if v is not None and not is_plain_name(v):
            raise ValueError(f"must be a plain folder name ({PLAIN_NAME_RULE})")
        return v


class TrackingConfig(_Section):
    """MLflow tracking; the core loop never imports MLflow, the CLI plugs it in."""

    enabled: bool = True
    uri: str | None = Field(None, description="tracking URI; None = MLFLOW_TRACKING_URI or sqlite:///<out_dir>/mlflow.db")
    experiment: str = "lejepa"
    flush_every: int = Field(10, ge=1, description="per-step metric events buffered before each send to MLflow")
    final_wait_s: float = Field(
        180.0,
        ge=0.0,
        description="how long the end of a run waits for MLflow to take its queued metrics; what is left "
        "is kept in the run folder (mlflow_undelivered.json) for `lejepa sync` or --resume",
    )


class Config(_Section):
    """A complete LeJEPA training configuration."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    views: ViewsConfig = ViewsConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.views.local_size is not None and self.views.local_size > self.data.resolution:
            raise ValueError(f"views.local_size={self.views.local_size} exceeds data.resolution={self.data.resolution}")
        return self

    def flat(self) -> dict[str, Any]:
        """The config as ``{"section.key": value}`` (for MLflow params and sweep tables)."""
        return flatten(self.model_dump(mode="json"))


def is_plain_name(name: str) -> bool:
    """Whether ``name`` is safe as one folder name: letters, digits, ``_ - .``, not starting with
    ``.`` or ``-`` (so never ``..``, a hidden file or an option), at most 128 characters."""
    return bool(PLAIN_NAME.fullmatch(name))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys; lists and tuples stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def valid_keys() -> list[str]:
    """Every dotted key a config accepts."""
    return sorted(flatten(Config().model_dump(mode="json")))


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` to ``("a.b", parsed value)``; the value is parsed as YAML (safe)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. loss.lam=0.02)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``tree[a][b] = value`` for ``key == "a.b"``; a path that runs through a leaf is unknown."""
    parts = key.split(".")
    known = valid_keys()
    if any(".".join(parts[:i]) in known for i in range(1, len(parts))):
        raise ConfigError(f"unknown config key {key!r}{did_you_mean(key, known)}")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"unknown config key {key!r}{did_you_mean(key, known)}")
        node = child
    node[parts[-1]] = value


def load_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """Safe-load a YAML mapping, with one-line errors for missing, unreadable or malformed files."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML text file (not UTF-8)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or first_line(exc)
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections, got {type(data).__name__}")
    return data


def build_config(tree: dict[str, Any], source: str = "config") -> Config:
    """Validate a nested dict into a :class:`Config`, raising one-line :class:`ConfigError`."""
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc, tree)}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``key=value`` overrides."""
    tree: dict[str, Any] = load_yaml(path) if path is not None else {}
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(tree, key, value)
    return build_config(tree, source=str(path) if path is not None else "config")


def _describe(exc: ValidationError, tree: dict[str, Any]) -> str:
    """The first validation error as 'field: problem' with the closest valid key if unknown."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
    field = ".".join(loc) or "config"
    if err["type"] == "extra_forbidden":
        return f"unknown config key {field!r}{did_you_mean(field, valid_keys())}"
    value = err.get("input")
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if err["type"] == "literal_error":
        return f"{field}={value!r} is not allowed: {msg[0].lower() + msg[1:]}"
    if isinstance(value, dict):
        return f"{field}: {msg}"
    return f"{field}={value!r} is invalid: {msg[0].lower() + msg[1:]}"
