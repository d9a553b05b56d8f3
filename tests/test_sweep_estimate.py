"""The dry run's wall-time estimate (sweeps/estimate.py): the scheduling and per-trial arithmetic
against hand computations, real measurements of tiny set-ups, and the acceptance check: the
estimate of ``lejepa sweep SPEC --dry-run`` within a factor of 2 of the same sweep's measured wall
time (the real CLI, its own local Ray, from start to exit)."""

from __future__ import annotations

import re
import time

import pytest
import torch

from lejepa.config import build_config
from sweeps.estimate import ARCH_TABLE, Estimate, Timing, TrialTime, estimate_wall_time, schedule, trial_time
from sweeps.estimate import EPOCH_OVERHEAD_S as EPOCH_S
from sweeps.estimate import TRIAL_OVERHEAD_S as TRIAL_S
from sweeps.resources import TrialResources

from helpers import run_cli, spec_body, sweep_spec, tiny_base, write_spec

ESTIMATE = re.compile(r"^estimated wall time on this machine: about ([\d.]+) (s|min|h) \(", re.MULTILINE)


def seconds_in(text: str) -> float:
    """The estimate of a dry run's output, in seconds."""
    match = ESTIMATE.search(text)
    assert match, text
    return float(match.group(1)) * {"s": 1, "min": 60, "h": 3600}[match.group(2)]


# --------------------------------------------------------------------------- arithmetic
def test_schedule_is_longest_first_greedy_list_scheduling():
    # 5→A, 4→B, 3→B (4 < 5), 3→A (5 < 7), 3→B (7 < 8): A = 8, B = 10 (the optimum, {5,4} {3,3,3}, is 9)
    assert schedule([3, 5, 3, 4, 3], 2) == 10
    assert schedule([1, 2, 3], 1) == 6  # one slot: the sum
    assert schedule([2, 2, 2], 5) == 2  # more slots than trials: the longest
    assert schedule([6, 1, 1, 1, 1, 1, 1], 2) == 6  # the short ones fill the second slot
    assert schedule([], 3) == 0


def timing(**changes) -> Timing:
    base = dict(
        label="a",
        step_s=0.5,
        warmup_extra_s=1.0,
        model_s=2.0,
        data_s=3.0,
        image_s=0.01,
        checkpoint_s=0.25,
        probe_epoch_s=0.1,
        knn_s=0.5,
        n_train=1000,
        n_test=300,
        steps=3,
    )
    return Timing(**{**base, **changes})


def test_trial_time_by_hand():
    tree = tiny_base()  # batch 64, 5 probe epochs
    tree["train"].update(epochs=3, online_eval_images=200)
    cfg = build_config(tree)
    one = TrialResources(1, 0, 1)
    t = trial_time(timing(), cfg, one, process_start_s=10.0)
    assert t.startup_s == pytest.approx(10.0 + TRIAL_S + 3.0 + 2.0 + 1.0)
    assert t.train_s == pytest.approx(15 * 3 * 0.5)  # ⌊1000 / 64⌋ = 15 steps per epoch
    assert t.epochs_s == pytest.approx(3 * (200 * 0.01 + 0.25 + EPOCH_S))
    assert t.eval_s == pytest.approx(1300 * 0.01 + 5 * 0.1 + 0.5)
    assert t.total_s == pytest.approx(t.startup_s + t.train_s + t.epochs_s + t.eval_s)

    tree["train"].update(max_steps=20, eval_at_init=True, online_eval_images=None)
    capped = trial_time(timing(), build_config(tree), one, process_start_s=10.0)
    assert capped.train_s == pytest.approx(20 * 0.5)
    assert capped.epochs_s == pytest.approx(2 * (300 * 0.01 + 0.25 + EPOCH_S))  # ⌈20 / 15⌉ epochs, the whole test set
    assert capped.eval_s == pytest.approx(2 * t.eval_s)  # and once more at random init

    two = trial_time(timing(), cfg, TrialResources(1, 0, 2), process_start_s=10.0)  # DDP: ⌊500 / 32⌋ steps per epoch
    assert two.train_s == pytest.approx(15 * 3 * 0.5)


def test_line_names_the_measurements_trials_and_bounds():
    trials = [TrialTime("a", 20.0, 30.0, 5.0, 10.0), TrialTime("a", 20.0, 30.0, 5.0, 10.0)]
    est = Estimate(
        total_s=schedule([t.total_s for t in trials], 1) + 40.0,
        timings={"a": timing()},
        trials=trials,
        num_trials=3,
        concurrency=1,
        fixed_s=40.0,
        skipped={"b": "boom"},
        upper_bound="the asha scheduler may stop trials early",
    )
    assert est.partial and est.line() == (
        "estimated wall time on this machine: about 2.8 min (measured 3 steps per architecture: a 0.5 s/step; "
        "per trial ≈ 65 s incl. ≈ 30 s start-up and evaluation; 3 trials, 1 at a time, plus ≈ 40 s sweep start-up; "
        "an upper bound: the asha scheduler may stop trials early; partial: not counted b (boom) (1 trial))"
    )


# --------------------------------------------------------------------------- real measurements
def test_estimate_measures_each_setup_and_marks_a_scheduler_an_upper_bound(tmp_path, one_thread):
    spec = sweep_spec(
        tmp_path,
        epochs=2,
        space={"loss.lam": [0.05, 0.2], "optim.batch_size": [32, 64]},
        scheduler={"type": "asha", "grace_period": 1},
    )
    torch.set_num_threads(2)  # restored by one_thread
    est = estimate_wall_time(spec, cpus=2, gpus=0, process_start_s=5.0)
    # λ leaves the cost alone: 2 set-ups for 4 trials
    assert set(est.timings) == {"test_resnet [optim.batch_size=32]", "test_resnet [optim.batch_size=64]"}
    assert all(1 <= t.steps <= 3 and t.step_s > 0 and t.image_s > 0 for t in est.timings.values())
    assert len(est.trials) == 4 and est.concurrency == 2 and not est.partial
    assert est.total_s == pytest.approx(est.fixed_s + schedule([t.total_s for t in est.trials], 2))
    assert "an upper bound: the asha scheduler may stop trials early" in est.line()
    assert torch.get_num_threads() == 2  # the trial's one thread was set only while measuring


def test_unmeasured_architectures_are_scaled_from_the_table_and_failures_make_it_partial(tmp_path, one_thread):
    """With no time budget only the first set-up is measured; resnet18 is scaled from resnet10t by the
    table's step times. A trial needing a GPU on a machine without one is skipped: partial."""
    spec = sweep_spec(
        tmp_path,
        space={"model.arch": ["resnet10t", "resnet18", "test_vit"]},
        resources={"rules": [{"pattern": "test_vit", "gpus_per_trial": 1}]},
    )
    est = estimate_wall_time(spec, cpus=2, gpus=1, process_start_s=5.0, budget_s=0)
    table = {row.split(",")[0]: float(row.split(",")[6]) for row in ARCH_TABLE.read_text().splitlines()[1:]}
    measured, scaled = est.timings["resnet10t"], est.timings["resnet18"]
    assert measured.steps >= 1 and scaled.steps == 0 and scaled.source == f"{ARCH_TABLE.name} × resnet10t"
    assert scaled.step_s == pytest.approx(measured.step_s * table["resnet18"] / table["resnet10t"])
    line = est.line()
    assert f"scaled from {ARCH_TABLE.name}: resnet18" in line
    if torch.cuda.is_available():
        assert not est.partial
    else:
        assert est.skipped == {"test_vit": "its trials train on a GPU and this machine has none"}
        assert len(est.trials) == 2
        assert line.endswith("partial: not counted test_vit (its trials train on a GPU and this machine has none) (1 trial))")


def test_cli_dry_run_prints_the_estimate_and_no_estimate_skips_it(tmp_path):
    path = write_spec(tmp_path, spec_body(2, space={"loss.lam": [0.05, 0.2]}))
    proc = run_cli(["sweep", str(path), "--dry-run"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[-1].startswith("estimated wall time on this machine: about ") and "test_resnet" in lines[-1]
    assert "2 trials, 2 at a time" in lines[-1] and "estimating wall time: measuring test_resnet (1/1)" in proc.stderr
    assert seconds_in(proc.stdout) > 0 and not (tmp_path / "runs").exists()
    quick = run_cli(["sweep", str(path), "--dry-run", "--no-estimate"], tmp_path)
    assert quick.returncode == 0 and "estimated wall time" not in quick.stdout and "estimating" not in quick.stderr
    assert quick.stdout.splitlines() == lines[:-1]


# --------------------------------------------------------------------------- acceptance
@pytest.mark.slow
def test_dry_run_estimate_within_a_factor_of_two_of_the_measured_sweep(tmp_path):
    """Two architectures × 3 epochs on the tiny config, 2 trials at a time on this machine: the dry
    run's estimate (a fresh CLI process, as a user runs it) against the wall time of ``lejepa sweep``
    on the same spec, from the command's start to its exit (its own local Ray, a new SQLite store)."""
    path = write_spec(tmp_path, spec_body(3, space={"model.arch": ["test_resnet", "test_efficientnet"]}))
    dry = run_cli(["sweep", str(path), "--dry-run"], tmp_path)
    assert dry.returncode == 0, dry.stderr[-2000:]
    estimate = seconds_in(dry.stdout)

    start = time.perf_counter()
    proc = run_cli(
        ["sweep", str(path), "--storage", str(tmp_path / "sweeps"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
        tmp_path,
    )
    measured = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 trials (2 finished)" in proc.stdout
    print(f"\n{dry.stdout.splitlines()[-1]}")
    print(f"estimate {estimate:.0f} s, measured {measured:.1f} s, ratio {estimate / measured:.2f}")
    assert 0.5 <= estimate / measured <= 2.0
