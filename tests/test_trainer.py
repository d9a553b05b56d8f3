"""Trainer behaviour: exact resume, reproducibility, checkpoints, divergence, DDP under torchrun."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lejepa import record
from lejepa.callbacks import Callback
from lejepa.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from lejepa.config import load_config
from lejepa.errors import CheckpointError, ConfigError
from lejepa.trainer import Trainer, TrainingDiverged

from helpers import REPO, TINY, free_port


class Recorder(Callback):
    def __init__(self, stop_after_epoch: int | None = None):
        self.steps: dict[int, dict[str, float]] = {}
        self.epochs: dict[int, dict[str, float]] = {}
        self.final: dict[str, float] | None = None
        self.stop_after_epoch = stop_after_epoch

    def on_step_end(self, step, metrics):
        self.steps[step] = dict(metrics)

    def on_epoch_end(self, epoch, step, metrics):
        self.epochs[epoch] = {k: v for k, v in metrics.items() if "time" not in k and "per_sec" not in k}

    def on_checkpoint(self, epoch, step, path, metrics):
        if epoch == self.stop_after_epoch:
            raise KeyboardInterrupt  # a kill right after the checkpoint landed

    def on_train_end(self, metrics, checkpoint):
        self.final = metrics


def tiny_cfg(tmp_path: Path, *extra: str):
    return load_config(None, TINY + [f"train.out_dir={tmp_path}", "train.epochs=4", *extra])


def test_resume_continues_exactly(tmp_path):
    full = Recorder()
    Trainer(tiny_cfg(tmp_path), [full], run_dir=tmp_path / "full").fit()

    first = Recorder(stop_after_epoch=2)
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_cfg(tmp_path), [first], run_dir=tmp_path / "split").fit()
    assert [p.name for p in list_checkpoints(tmp_path / "split" / "checkpoints")] == ["epoch_0001", "epoch_0002"]

    second = Recorder()
    Trainer(tiny_cfg(tmp_path), [second], run_dir=tmp_path / "split", resume=tmp_path / "split").fit()

    assert set(second.epochs) == {3, 4}
    for epoch in (1, 2):
        assert first.epochs[epoch] == pytest.approx(full.epochs[epoch], rel=1e-6, abs=1e-7)
    for epoch in (3, 4):
        assert second.epochs[epoch] == pytest.approx(full.epochs[epoch], rel=1e-6, abs=1e-7)
    assert second.steps.keys() == {s for s in full.steps if s > max(first.steps)}
    assert second.final == pytest.approx(full.final, rel=1e-6, abs=1e-7)
    # the run learned something: loss went down and metrics are probabilities
    assert full.epochs[4][record.EPOCH_LOSS] < full.epochs[1][record.EPOCH_LOSS]
    assert all(0.0 <= v <= 1.0 for v in full.final.values())


def test_checkpoint_keeps_last_k_and_resume_refuses_other_arch(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.epochs=3", "train.keep_checkpoints=2")
    Trainer(cfg, run_dir=tmp_path / "run").fit()
    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in ckpts] == ["epoch_0002", "epoch_0003"]
    state, meta = load_checkpoint(ckpts[-1])
    assert meta["epoch"] == 3 and state["step"] == meta["step"] > 0
    other = tiny_cfg(tmp_path, "model.arch=test_vit")
    with pytest.raises(CheckpointError, match="for architecture 'test_resnet'"):
        Trainer(other, run_dir=tmp_path / "run", resume=tmp_path / "run")


def test_resume_from_an_older_online_probe_layout_restarts_only_the_probe(tmp_path, capsys):
    """Checkpoints written before the probe became BatchNorm+Linear hold a LayerNorm probe:
    training resumes exactly, the probe restarts with a warning."""
    cfg = tiny_cfg(tmp_path, "train.epochs=2")
    Trainer(cfg, run_dir=tmp_path / "run").fit()
    path = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    state, meta = load_checkpoint(path)
    dim = state["probe"]["net.1.weight"].shape[1]
    old = torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, 10))
    state["probe"] = {f"net.{k}": v for k, v in old.state_dict().items()}
    state["probe_optimizer"] = torch.optim.AdamW(old.parameters()).state_dict()
    save_checkpoint(path.parent, meta["epoch"], state, {k: v for k, v in meta.items() if k not in ("epoch", "sha256")}, keep=5)
    capsys.readouterr()
    resumed = Trainer(tiny_cfg(tmp_path, "train.epochs=3"), run_dir=tmp_path / "run", resume=tmp_path / "run")
    assert "older layout; the probe restarts" in capsys.readouterr().err
    assert resumed.epoch == 2 and resumed.step == state["step"]
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, state["model"][key]), key
    assert all(0.0 <= v <= 1.0 for v in resumed.fit().values())


def test_divergence_is_reported_with_step(tmp_path):
    cfg = tiny_cfg(tmp_path, "optim.lr=0.5", "optim.warmup_epochs=0", "train.log_every=1")
    seen = []

    class Poison(Callback):
        def on_step_end(self, step, metrics):
            seen.append(step)
            if step == 3:  # corrupt the weights the way an exploding update would
                with torch.no_grad():
                    for p in trainer.model.parameters():
                        p.fill_(float("nan"))

    trainer = Trainer(cfg, [Poison()], run_dir=tmp_path / "nan")
    with pytest.raises(TrainingDiverged) as info:
        trainer.fit()
    assert info.value.step == 4 and math.isnan(info.value.value)


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path):
    """The real CLI under torchrun with 2 gloo processes: one run folder, one MLflow run, rank-1 state saved."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "lejepa",
        "train",
        *TINY,
        "train.epochs=2",
        f"train.out_dir={tmp_path}",
        "train.run_name=ddp",
        "--tracking-uri",
        uri,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state, meta = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "epoch_0002")
    views_rng = state["rng"]["views"]
    assert len(views_rng) == 2 and not torch.equal(views_rng[0], views_rng[1])
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("lejepa").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == record.FINISHED
    # each epoch is logged once (rank 0 only), and the batch is the global batch of 64 = 2 × 32
    epochs = client.get_metric_history(runs[0].info.run_id, record.EPOCH)
    assert [m.step for m in epochs] == [meta["step"] // 2, meta["step"]]
    assert runs[0].data.params["optim.batch_size"] == "64"


def test_online_probe_is_scored_on_a_bounded_evenly_spaced_test_subset(tmp_path):
    class Scores(Callback):
        def on_epoch_end(self, epoch, step, metrics):
            self.acc = metrics[record.ONLINE_TEST_ACC]

    scores = Scores()
    trainer = Trainer(tiny_cfg(tmp_path, "train.epochs=1", "train.online_eval_images=37"), [scores], run_dir=tmp_path / "r")
    subset = trainer._online_eval_split()
    n = len(trainer.data.test)
    assert n > 37 and len(subset) == 37
    assert subset.indices[0] == 0 and subset.indices[-1] == n - 1 and len(set(subset.indices)) == 37
    trainer.fit()
    # the logged accuracy is a fraction of the 37 images, computed from the probe's predictions on them
    feats, labels = trainer.features(subset)
    assert scores.acc == pytest.approx(trainer._online_test_acc(feats, labels))
    assert round(scores.acc * 37) == pytest.approx(scores.acc * 37, abs=1e-6)
    whole = Trainer(tiny_cfg(tmp_path, "train.online_eval_images=null"), [], run_dir=tmp_path / "w")
    assert whole._online_eval_split() is whole.data.test


def test_precision_auto_is_fp32_on_cpu_and_bf16_is_refused_there(tmp_path):
    from lejepa.errors import ConfigError
    from lejepa.runtime import setup_runtime

    assert setup_runtime("cpu", "auto").autocast_dtype is None
    with pytest.raises(ConfigError, match="bf16 is for CUDA"):
        Trainer(tiny_cfg(tmp_path, "train.precision=bf16", "train.device=cpu"), [], run_dir=tmp_path / "bf16")
    assert not (tmp_path / "bf16").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_trains_on_cuda(tmp_path):
    rec = Recorder()
    trainer = Trainer(
        tiny_cfg(tmp_path, "train.device=cuda", "train.epochs=1", "train.compile=eager"), [rec], run_dir=tmp_path / "cuda"
    )
    assert trainer.rt.autocast_dtype == torch.bfloat16  # auto = bf16 on CUDA
    trainer.fit()
    assert rec.steps and all(math.isfinite(m[record.TRAIN_LOSS]) for m in rec.steps.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_training_on_cuda_matches_eager_and_checkpoints_plain_keys(tmp_path):
    """train.compile=auto compiles on CUDA; the losses follow eager's and the checkpoint holds the
    plain module's keys (no ``_orig_mod``), so eager runs resume from it."""
    runs = {}
    for mode in ("eager", "auto"):
        rec = Recorder()
        cfg = tiny_cfg(tmp_path, "train.device=cuda", "train.epochs=1", "train.precision=fp32", f"train.compile={mode}")
        trainer = Trainer(cfg, [rec], run_dir=tmp_path / mode)
        assert (trainer.train_model is trainer.model) == (mode == "eager")
        trainer.fit()
        runs[mode] = [rec.steps[k][record.TRAIN_LOSS] for k in sorted(rec.steps)]
    assert runs["auto"] == pytest.approx(runs["eager"], rel=0.05)
    state, _ = load_checkpoint(list_checkpoints(tmp_path / "auto" / "checkpoints")[-1])
    assert not any("_orig_mod" in k for k in state["model"])


def test_random_init_baseline_scores_the_untrained_backbone_and_changes_nothing_else(tmp_path):
    """``train.eval_at_init``: ``eval/init_*`` are the probe and kNN of the backbone before any
    step (kept across a resume), and the run trains exactly as without them."""
    from lejepa.probes import knn_accuracy, linear_probe

    plain = Recorder()
    Trainer(tiny_cfg(tmp_path, "train.epochs=2"), [plain], run_dir=tmp_path / "plain").fit()
    cfg = tiny_cfg(tmp_path, "train.epochs=2", "train.eval_at_init=true")
    first, resumed = Recorder(stop_after_epoch=1), Recorder()
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, [first], run_dir=tmp_path / "based").fit()
    Trainer(cfg, [resumed], run_dir=tmp_path / "based", resume=tmp_path / "based").fit()

    assert first.epochs[1] == pytest.approx(plain.epochs[1], rel=1e-6, abs=1e-7)
    assert resumed.epochs[2] == pytest.approx(plain.epochs[2], rel=1e-6, abs=1e-7)
    final = dict(resumed.final)
    init = {k: final.pop(k) for k in (record.INIT_LINEAR_PROBE_ACC, record.INIT_KNN_ACC)}
    assert final == pytest.approx(plain.final, rel=1e-6, abs=1e-7)

    fresh = Trainer(cfg, run_dir=tmp_path / "fresh")  # same seed: the same untrained backbone
    train, test = fresh.features(fresh.data.train), fresh.features(fresh.data.test)
    assert init[record.INIT_LINEAR_PROBE_ACC] == pytest.approx(
        linear_probe(*train, *test, fresh.data.num_classes, epochs=cfg.train.eval_probe_epochs, seed=cfg.train.seed)
    )
    assert init[record.INIT_KNN_ACC] == pytest.approx(knn_accuracy(*train, *test, k=cfg.train.eval_knn_k))
    assert init[record.INIT_KNN_ACC] != pytest.approx(final[record.KNN_ACC])


def _failing_backend(gm, example_inputs):
    raise NotImplementedError("no kernel for this operator (test backend)")


@pytest.mark.parametrize("mode", ["auto", "default"])
def test_a_failing_compilation_falls_back_to_eager_under_auto_and_is_one_error_otherwise(tmp_path, monkeypatch, capsys, mode):
    """torch.compile fails on the first step for some timm models (seen on CUDA: regnet's
    ``aten::_unique2``); ``auto`` then trains eager with one warning, an explicit mode stops."""
    import lejepa.trainer as trainer_module

    real_compile = torch.compile
    monkeypatch.setattr(trainer_module, "compile_mode", lambda requested, device: "default")
    monkeypatch.setattr(trainer_module.torch, "compile", lambda model, **kw: real_compile(model, backend=_failing_backend))
    rec = Recorder()
    trainer = Trainer(tiny_cfg(tmp_path, "train.epochs=1", f"train.compile={mode}"), [rec], run_dir=tmp_path / mode)
    assert trainer.train_model is not trainer.model
    if mode == "auto":
        trainer.fit()
        assert trainer.train_model is trainer.model
        assert "torch.compile failed for test_resnet" in capsys.readouterr().err
        assert rec.steps and all(math.isfinite(m[record.TRAIN_LOSS]) for m in rec.steps.values())
    else:
        with pytest.raises(ConfigError, match="train.compile=default failed for test_resnet.*use train.compile=eager"):
            trainer.fit()


def test_throughput_options_resolve_per_device():
    from lejepa.backbones import build_backbone
    from lejepa.config import load_config
    from lejepa.runtime import adamw_kernel, compile_mode, is_convolutional, use_channels_last

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compile_mode("auto", cpu) is None and compile_mode("auto", cuda) == "default"
    assert compile_mode("eager", cuda) is None and compile_mode("max-autotune", cpu) == "max-autotune"
    assert load_config(None, ["train.compile=false"]).train.compile == "eager"
    assert load_config(None, ["train.compile=true"]).train.compile == "default"
    cnn, vit = build_backbone("resnet10t", 32), build_backbone("vit_tiny_patch16_224", 32)
    assert is_convolutional(cnn) and not is_convolutional(vit)
    assert use_channels_last(None, cuda, cnn) and not use_channels_last(None, cuda, vit)
    assert not use_channels_last(None, cpu, cnn) and use_channels_last(True, cpu, vit)
    assert adamw_kernel(None, cuda) == {"fused": True} and adamw_kernel(None, cpu) == {"foreach": True}


def test_triton_sigreg_kernel_is_refused_off_cuda_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="loss.kernel=triton needs a CUDA device"):
        Trainer(tiny_cfg(tmp_path, "loss.kernel=triton", "train.device=cpu"), [], run_dir=tmp_path / "t")
