"""The LeJEPA training loop.

One objective, (1 − λ)·invariance + λ·SIGReg on projector outputs of V_g global and V_l local
views; AdamW with per-step warm-up + cosine; an online linear probe on detached backbone
features; atomic, checksummed checkpoints every epoch with exact resume; a frozen-backbone
linear probe and kNN at the end. Runs on CPU, CUDA (bf16 autocast) or MPS, and under torchrun
(DDP). Tracking and Tune reporting plug in through :mod:`lejepa.callbacks`; this module
imports neither MLflow nor Ray.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
import yaml
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from lejepa.backbones import build_backbone
from lejepa.callbacks import Callback, CallbackList, RunInfo
from lejepa.checkpoint import (
    check_free_space,
    checkpoint_bytes,
    disk_full,
    is_disk_full,
    latest_valid_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from lejepa.config import Config
from lejepa.data import DatasetSplits, batch_collate, build_datasets
from lejepa.errors import CheckpointError, ConfigError, first_line
from lejepa.errors import TrainingCollapsed as TrainingCollapsed  # re-exported: raised by fit()
from lejepa.errors import TrainingDiverged as TrainingDiverged
from lejepa.health import batch_health, collapsed_ep, verdict
from lejepa.locks import ProcessLock
from lejepa.model import LeJEPAModel
from lejepa.objective import lejepa_loss
from lejepa.probes import OnlineProbe, knn_accuracy, linear_probe
from lejepa.record import (
    CHECKPOINTS_DIR,
    COLLAPSE_RATIO,
    COLLAPSED,
    CONFIG_FILE,
    EPOCH_IMAGES_PER_SEC,
    EPOCH_INVARIANCE,
    EPOCH_LOSS,
    EPOCH_LR,
    EPOCH_PROBE_LOSS,
    EPOCH_SIGREG,
    EPOCH_TIME_S,
    HEALTH_METRICS,
    KNN_ACC,
    LINEAR_PROBE_ACC,
    ONLINE_PROBE_ACC,
    ONLINE_TEST_ACC,
    ONLINE_TRAIN_ACC,
    RUN_LOCK,
    TRAIN_INVARIANCE,
    TRAIN_LOSS,
    TRAIN_LR,
    TRAIN_PROBE_LOSS,
    TRAIN_SIGREG,
    VERDICT,
    VERDICTS,
    init_metric,
)
from lejepa.runtime import Runtime, adamw_kernel, compile_mode, seed_everything, setup_runtime, use_channels_last
from lejepa.schedule import warmup_cosine
from lejepa.sigreg import SIGReg, triton_available
from lejepa.views import ViewSampler, eval_images


def default_run_dir(cfg: Config) -> Path:
    """``<out_dir>/<run_name>``, absolute; run_name defaults to ``<arch>-<timestamp>``."""
    name = cfg.train.run_name or f"{cfg.model.arch}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(cfg.train.out_dir).expanduser().resolve() / name


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices and kernels only; biases and norm parameters are not decayed."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


class Trainer:
    """Trains one LeJEPA model from a :class:`Config`.

    ``resume`` may be a run folder (its newest valid checkpoint is used) or a checkpoint
    folder. Metrics reach the outside world only through ``callbacks`` (rank 0 only).
    """

    def __init__(
        self,
        cfg: Config,
        callbacks: Sequence[Callback] = (),
        run_dir: Path | str | None = None,
        resume: Path | str | None = None,
        runtime: Runtime | None = None,
        data: DatasetSplits | None = None,
    ) -> None:
        self.cfg = cfg
        self.rt = runtime or setup_runtime(cfg.train.device, cfg.train.precision)
        self.callbacks = CallbackList(list(callbacks) if self.rt.is_main else [])
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.run_dir = self._agree_run_dir(Path(run_dir).resolve() if run_dir else None)
        self.resume_path = self._find_resume(Path(resume)) if resume else None

        seed_everything(cfg.train.seed)
        self.data = data or build_datasets(cfg.data)
        self.num_global = cfg.views.global_views
        self.views = ViewSampler(cfg.views, self.data.resolution, self.data.mean, self.data.std)
        self.view_gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + self.rt.rank)

        backbone = build_backbone(cfg.model.arch, self.data.resolution, cfg.model.small_stem)
        model = LeJEPAModel(backbone, cfg.model.proj_hidden, cfg.model.proj_dim, cfg.model.proj_layers)
        probe = OnlineProbe(model.embed_dim, self.data.num_classes)
        self.model: nn.Module = model.to(self.rt.device)  # DistributedDataParallel(model) under DDP
        if use_channels_last(cfg.train.channels_last, self.rt.device, backbone):
            self.model = self.model.to(memory_format=torch.channels_last)
        self.probe: nn.Module = probe.to(self.rt.device)
        if cfg.loss.kernel == "triton" and (self.rt.device.type != "cuda" or not triton_available()):
            raise ConfigError("loss.kernel=triton needs a CUDA device and the triton package; use loss.kernel=torch")
        self.sigreg = SIGReg(cfg.loss.num_slices, cfg.loss.knots, cfg.loss.t_max, cfg.loss.kernel).to(self.rt.device)
        # SIGReg sees the global batch (its statistics are all-reduced under DDP)
        self.collapsed_ep = collapsed_ep(cfg.optim.batch_size, cfg.loss.t_max, cfg.loss.knots)
        if self.rt.distributed:
            ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.model, device_ids=ids)
            self.probe = DistributedDataParallel(self.probe, device_ids=ids)
        # the training forward, compiled or not; evaluation and checkpoints use self.model (eager, same weights).
        # Static shapes: a run trains at fixed view sizes, one graph per size.
        self.compile_mode = compile_mode(cfg.train.compile, self.rt.device)
        self.train_model = (
            torch.compile(self.model, mode=self.compile_mode, dynamic=False) if self.compile_mode is not None else self.model
        )
        self._compiled_once = False

        self.loader, self.sampler = self._train_loader()
        self.steps_per_epoch = len(self.loader)
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        self.optimizer = torch.optim.AdamW(
            _param_groups(self.model, cfg.optim.weight_decay),
            lr=cfg.optim.lr,
            betas=cfg.optim.betas,
            **adamw_kernel(cfg.optim.fused, self.rt.device),
        )
        self.probe_optimizer = torch.optim.AdamW(self.probe.parameters(), lr=cfg.optim.probe_lr, weight_decay=0.0)
        warmup = min(self.total_steps, round(cfg.optim.warmup_epochs * self.steps_per_epoch))
        self.scheduler = warmup_cosine(self.optimizer, warmup, self.total_steps, cfg.optim.final_lr_ratio)
        self.epoch = 0
        self.step = 0
        self.init_eval: dict[str, float] = {}
        if self.resume_path is not None:
            self._load(self.resume_path)

    def add_callback(self, callback: Callback) -> None:
        """Plug ``callback`` in after the ones given at construction (ignored off the main process,
        as those are); call it before :meth:`fit`."""
        if self.rt.is_main:
            self.callbacks.callbacks.append(callback)

    # ------------------------------------------------------------------ set-up helpers
    def _agree_run_dir(self, run_dir: Path | None) -> Path:
        run_dir = run_dir or default_run_dir(self.cfg)
        if self.rt.distributed:
            box = [str(run_dir)]
            dist.broadcast_object_list(box, src=0)
            run_dir = Path(box[0])
        return run_dir

    def _find_resume(self, path: Path) -> Path:
        path = path.expanduser().resolve()
        if (path / CHECKPOINTS_DIR).is_dir() or (path / CONFIG_FILE).is_file():
            found = latest_valid_checkpoint(path / CHECKPOINTS_DIR)
            if found is None:
                raise CheckpointError(f"no valid checkpoint to resume from under {path / CHECKPOINTS_DIR}")
            return found
        return path

    def _train_loader(self) -> tuple[DataLoader, DistributedSampler]:
        per_rank = self.cfg.optim.batch_size // self.rt.world_size
        if per_rank * self.rt.world_size != self.cfg.optim.batch_size:
            raise ConfigError(
                f"optim.batch_size={self.cfg.optim.batch_size} is not divisible by the {self.rt.world_size} processes"
            )
        train = self.data.train
        n_train = len(train)  # type: ignore[arg-type]  # a map-style dataset; torch's Dataset type has no __len__
        if n_train < self.cfg.optim.batch_size:
            raise ConfigError(
                f"optim.batch_size={self.cfg.optim.batch_size} exceeds the {n_train} training images of {self.data.name}"
            )
        sampler: DistributedSampler[int] = DistributedSampler(
            train, num_replicas=self.rt.world_size, rank=self.rt.rank, shuffle=True, seed=self.cfg.train.seed, drop_last=True
        )
        workers = self.cfg.train.num_workers
        loader = DataLoader(
            train,
            batch_size=per_rank,
            sampler=sampler,
            drop_last=True,
            num_workers=workers,
            collate_fn=batch_collate,
            pin_memory=self.rt.device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=self.cfg.train.prefetch_factor if workers > 0 else None,
        )
        return loader, sampler

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict[str, Any]:
        views_rng = [self.view_gen.get_state()]
        if self.rt.distributed:
            gathered: list[Any] = [None] * self.rt.world_size
            dist.all_gather_object(gathered, views_rng[0])
            views_rng = gathered
        return {
            "model": _unwrap(self.model).state_dict(),
            "probe": _unwrap(self.probe).state_dict(),
            "sigreg": self.sigreg.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "probe_optimizer": self.probe_optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "views": views_rng},
            "epoch": self.epoch,
            "step": self.step,
            "init_eval": self.init_eval,
        }

    def _load(self, path: Path) -> None:
        state, meta = load_checkpoint(path, map_location=self.rt.device)
        arch = meta.get("arch")
        if arch is not None and arch != self.cfg.model.arch:
            raise CheckpointError(f"checkpoint {path} is for architecture {arch!r}, the config asks for {self.cfg.model.arch!r}")
        try:
            _unwrap(self.model).load_state_dict(state["model"])
            self.sigreg.load_state_dict(state["sigreg"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path} does not match this model/config: {first_line(exc)}") from None
        try:  # the online probe only measures; one from an older probe layout restarts
            _unwrap(self.probe).load_state_dict(state["probe"])
            self.probe_optimizer.load_state_dict(state["probe_optimizer"])
        except (KeyError, RuntimeError, ValueError):
            print(
                f"lejepa: warning: {path} holds an online probe of an older layout; the probe restarts "
                "(training state is unaffected)",
                file=sys.stderr,
            )
        torch.set_rng_state(state["rng"]["torch"].cpu())
        views_rng = state["rng"]["views"]
        if len(views_rng) != self.rt.world_size:
            raise CheckpointError(
                f"checkpoint {path} was written by {len(views_rng)} processes, resuming with {self.rt.world_size}"
            )
        self.view_gen.set_state(views_rng[self.rt.rank].cpu())
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.init_eval = dict(state.get("init_eval") or {})

    def _checkpoint(self, metrics: dict[str, float]) -> Path | None:
        state = self._state()  # collective under DDP: every rank takes part
        if not self.rt.is_main:
            return None
        meta = {"step": self.step, "arch": self.cfg.model.arch, "metrics": metrics, "config": self.cfg.model_dump(mode="json")}
        return save_checkpoint(self.run_dir / CHECKPOINTS_DIR, self.epoch, state, meta, self.cfg.train.keep_checkpoints)

    # ------------------------------------------------------------------ training
    def _train_step(
        self, images: Tensor, labels: Tensor, measure: bool = False
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """One optimisation step; returns loss, invariance, SIGReg, probe loss, correct probe
        predictions and, when ``measure``, the batch's health measures
        (:func:`lejepa.health.batch_health` of the first global view; else None), all detached."""
        images = images.to(self.rt.device, non_blocking=True)
        labels = labels.to(self.rt.device, non_blocking=True)
        views = self.views(images, self.view_gen)
        view_list = list(views.global_views)
        if views.local_views is not None:
            view_list += list(views.local_views)
        feats, proj = self._forward(view_list)
        terms = lejepa_loss(proj.float(), self.num_global, self.sigreg, self.cfg.loss.lam)
        global_feats = feats[: self.num_global].detach().flatten(0, 1).float()
        logits = self.probe(global_feats)
        probe_targets = labels.repeat(self.num_global)
        probe_loss = nn.functional.cross_entropy(logits, probe_targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.probe_optimizer.zero_grad(set_to_none=True)
        (terms.loss + probe_loss).backward()
        if self.cfg.optim.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.probe_optimizer.step()
        self.scheduler.step()
        correct = (logits.argmax(dim=1) == probe_targets).sum()
        health = batch_health(proj[0].detach().float(), feats[0].detach().float()) if measure else None
        return (terms.loss.detach(), terms.invariance.detach(), terms.sigreg.detach(), probe_loss.detach(), correct, health)

    def _forward(self, view_list: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(features, projections) of the views; a compilation that fails on the first step falls
        back to eager under ``train.compile=auto`` (a warning) and is a ConfigError otherwise."""
        first_compiled = self.train_model is not self.model and not self._compiled_once
        try:
            with self.rt.autocast():
                out = self.train_model(view_list)
        except Exception as exc:
            if not first_compiled:
                raise
            reason = f"{type(exc).__name__}: {first_line(exc, '')}"[:300]
            if self.cfg.train.compile != "auto":
                raise ConfigError(
                    f"train.compile={self.cfg.train.compile} failed for {self.cfg.model.arch} ({reason}); use train.compile=eager"
                ) from None
            print(
                f"lejepa: warning: torch.compile failed for {self.cfg.model.arch} ({reason}); training eager "
                "(train.compile=eager skips compiling)",
                file=sys.stderr,
            )
            self.train_model = self.model
            with self.rt.autocast():
                out = self.model(view_list)
        self._compiled_once = True
        return out

    def _check_finite(self, loss: Tensor) -> None:
        value = float(loss)
        if not math.isfinite(value):
            raise TrainingDiverged(self.step, value)

    def _run_epoch(self) -> dict[str, float]:
        self.sampler.set_epoch(self.epoch)
        self.model.train()
        self.probe.train()
        sums = torch.zeros(9, device=self.rt.device, dtype=torch.float64)  # 5 terms, 3 health measures, count
        seen = steps = 0
        start = time.perf_counter()
        for images, labels in self.loader:
            if self.cfg.train.max_steps is not None and self.step >= self.cfg.train.max_steps:
                break
            # health every log_every steps (and on each epoch's first): a small eigensolve per measure
            measure = self.cfg.train.health and steps % self.cfg.train.log_every == 0
            loss, inv, reg, probe_loss, correct, health = self._train_step(images, labels, measure)
            self.step += 1
            steps += 1
            seen += images.shape[0]
            sums[:5] += torch.stack([loss, inv, reg, probe_loss, correct.to(loss.dtype)]).double()
            if health is not None:
                sums[5:8] += health
                sums[8] += 1
            if self.step % self.cfg.train.log_every == 0:
                self._check_finite(loss)
                self.callbacks.on_step_end(
                    self.step,
                    {
                        TRAIN_LOSS: float(loss),
                        TRAIN_INVARIANCE: float(inv),
                        TRAIN_SIGREG: float(reg),
                        TRAIN_PROBE_LOSS: float(probe_loss),
                        TRAIN_LR: float(self.scheduler.get_last_lr()[0]),
                    },
                )
        if self.rt.device.type == "cuda":
            torch.cuda.synchronize(self.rt.device)  # the epoch's time includes its queued kernels
        elapsed = time.perf_counter() - start
        steps = max(1, steps)
        if self.rt.distributed:
            dist.all_reduce(sums)
            sums /= self.rt.world_size
        (loss_sum, inv_sum, reg_sum, probe_loss_sum, correct_sum, proj_rank, spread, feat_rank, measured) = (
            float(v) for v in sums
        )
        if not math.isfinite(loss_sum):
            raise TrainingDiverged(self.step, loss_sum)
        images_per_sec = seen * self.rt.world_size / max(elapsed, 1e-9)
        collapse = reg_sum / steps / self.collapsed_ep
        metrics = {
            EPOCH_LOSS: loss_sum / steps,
            EPOCH_INVARIANCE: inv_sum / steps,
            EPOCH_SIGREG: reg_sum / steps,
            EPOCH_PROBE_LOSS: probe_loss_sum / steps,
            ONLINE_TRAIN_ACC: correct_sum / max(1, seen * self.num_global),
            EPOCH_IMAGES_PER_SEC: images_per_sec,
            EPOCH_TIME_S: elapsed,
            EPOCH_LR: float(self.scheduler.get_last_lr()[0]),
        }
        if measured:
            measured_means = (v / measured for v in (proj_rank, spread, feat_rank))
            metrics.update(zip(HEALTH_METRICS, (collapse, *measured_means)))
            metrics[VERDICT] = float(VERDICTS.index(verdict(collapse, proj_rank / measured)))
        return metrics

    @torch.no_grad()
    def features(self, dataset: torch.utils.data.Dataset, batch_size: int = 512) -> tuple[Tensor, Tensor]:
        """Backbone features [N, E] (eval mode, no augmentation) and labels [N] of ``dataset``."""
        backbone = cast(LeJEPAModel, _unwrap(self.model)).backbone
        was_training = backbone.training
        backbone.eval()
        loader = DataLoader(
            dataset, batch_size=batch_size, shuffle=False, collate_fn=batch_collate, num_workers=self.cfg.train.num_workers
        )
        feats, labels = [], []
        for images, y in loader:
            x = eval_images(images.to(self.rt.device), self.data.resolution, self.data.mean, self.data.std)
            with self.rt.autocast():
                feats.append(backbone(x).float().cpu())
            labels.append(torch.as_tensor(y))
        backbone.train(was_training)
        return torch.cat(feats), torch.cat(labels)

    def _online_eval_split(self) -> torch.utils.data.Dataset:
        """The test images the online probe is scored on each epoch: all of them, or
        ``train.online_eval_images`` evenly spaced ones (the same every epoch), so the per-epoch
        cost stays bounded on large test sets."""
        test, limit = self.data.test, self.cfg.train.online_eval_images
        n_test = len(test)  # type: ignore[arg-type]  # a map-style dataset; torch's Dataset type has no __len__
        if limit is None or n_test <= limit:
            return test
        return torch.utils.data.Subset(test, torch.linspace(0, n_test - 1, limit).round().long().tolist())

    @torch.no_grad()
    def _online_test_acc(self, test_feats: Tensor, test_labels: Tensor) -> float:
        probe = _unwrap(self.probe)
        probe.eval()
        pred = probe(test_feats.to(self.rt.device)).argmax(dim=1).cpu()
        probe.train()
        return float((pred == test_labels).float().mean())

    def _final_eval(self, online: bool = True) -> dict[str, float]:
        train_x, train_y = self.features(self.data.train)
        test_x, test_y = self.features(self.data.test)
        metrics = {
            LINEAR_PROBE_ACC: linear_probe(
                train_x,
                train_y,
                test_x,
                test_y,
                self.data.num_classes,
                epochs=self.cfg.train.eval_probe_epochs,
                seed=self.cfg.train.seed,
            ),
            KNN_ACC: knn_accuracy(train_x, train_y, test_x, test_y, k=self.cfg.train.eval_knn_k),
        }
        if online:
            metrics[ONLINE_PROBE_ACC] = self._online_test_acc(test_x, test_y)
        return metrics

    def _init_eval(self) -> dict[str, float]:
        """The frozen probe and kNN of the untrained backbone, as ``eval/init_*``; the global RNG
        is left as it was, so a run trains identically with or without this baseline."""
        with torch.random.fork_rng(devices=[]):
            return {init_metric(k): v for k, v in self._final_eval(online=False).items()}

    def _write_config(self) -> None:
        """``config.yaml`` written whole or not at all; before it, the run's folder must have room for
        a checkpoint (the last one's size, else weights and AdamW's two moments)."""
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        check_free_space(self.run_dir, checkpoint_bytes(self.run_dir / CHECKPOINTS_DIR, 3 * params), "this run's checkpoints")
        path = self.run_dir / CONFIG_FILE
        tmp = path.with_suffix(".yaml.tmp")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tmp.write_text(yaml.safe_dump(self.cfg.model_dump(mode="json"), sort_keys=False))
            tmp.replace(path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if is_disk_full(exc, self.run_dir, 0):
                raise disk_full(self.run_dir, 2**20, CONFIG_FILE) from None
            raise

    def fit(self) -> dict[str, float]:
        """Train the remaining epochs, checkpoint each, evaluate; returns the final metrics. The run
        folder is locked for the call (:mod:`lejepa.locks`): a second writer is refused in one line."""
        lock = ProcessLock(self.run_dir / RUN_LOCK, f"run folder {self.run_dir}")
        if self.rt.is_main:
            lock.acquire()
        try:
            return self._fit()
        finally:
            lock.release()

    def _fit(self) -> dict[str, float]:
        if self.rt.is_main:
            self._write_config()
        info = RunInfo(
            self.cfg,
            self.run_dir,
            self.epoch,
            self.step,
            self.steps_per_epoch,
            self.total_steps,
            str(self.rt.device),
            self.rt.world_size,
            sum(p.numel() for p in cast(LeJEPAModel, _unwrap(self.model)).backbone.parameters()),
        )
        checkpoint: Path | None = self.resume_path
        collapsed_epochs = 0
        try:
            self.callbacks.on_train_start(info)
            if self.cfg.train.eval_at_init and self.rt.is_main and self.step == 0 and not self.init_eval:
                self.init_eval = self._init_eval()
            while self.epoch < self.cfg.train.epochs:
                if self.cfg.train.max_steps is not None and self.step >= self.cfg.train.max_steps:
                    break
                metrics = self._run_epoch()
                self.epoch += 1
                if self.rt.is_main:
                    test_x, test_y = self.features(self._online_eval_split())
                    metrics[ONLINE_TEST_ACC] = self._online_test_acc(test_x, test_y)
                    self.callbacks.on_epoch_end(self.epoch, self.step, metrics)
                checkpoint = self._checkpoint(metrics)
                if checkpoint is not None:
                    self.callbacks.on_checkpoint(self.epoch, self.step, checkpoint, metrics)
                collapsed = metrics.get(VERDICT) == VERDICTS.index(COLLAPSED)
                collapsed_epochs = collapsed_epochs + 1 if collapsed else 0
                patience = self.cfg.train.collapse_patience
                if patience is not None and collapsed_epochs >= patience:
                    raise TrainingCollapsed(self.epoch, metrics[COLLAPSE_RATIO], patience)
            final = {**self.init_eval, **self._final_eval()} if self.rt.is_main else {}
            if self.rt.distributed:
                dist.barrier()
            self.callbacks.on_train_end(final, checkpoint)
            return final
        except BaseException as exc:
            self.callbacks.on_failure(exc)
            raise
