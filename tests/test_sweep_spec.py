"""Sweep specs: parsing, validation messages, expansion to a Tune space, dry run. No Ray is started."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from lejepa.errors import ConfigError
from sweeps.cli import dry_run
from sweeps.spec import load_spec

from helpers import REPO, run_cli, tiny_base, write_spec

SHIPPED = sorted(p for p in (REPO / "sweeps").glob("*.yaml") if not p.stem.endswith("_base"))  # *_base: training configs


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_specs_load_and_dry_run(path):
    spec = load_spec(path)
    text = dry_run(spec)
    assert f"{spec.num_trials()} trials" in text
    assert len(text.splitlines()) >= spec.num_trials() + 4  # header lines + one row per trial


def test_grid_expansion_count_and_tune_space(tmp_path):
    from ray import tune
    from ray.tune.search.sample import Float, Integer

    spec = load_spec(
        write_spec(
            tmp_path,
            {
                "base": tiny_base(),
                "space": {
                    "loss.lam": [0.02, 0.1, 0.3],
                    "train.seed": {"grid": [0, 1]},
                    "optim.lr": {"loguniform": ["1e-4", "1e-2"]},
                    "loss.num_slices": {"randint": [16, 64]},
                },
                "num_samples": 2,
            },
        )
    )
    assert spec.num_trials() == 3 * 2 * 2
    rows = spec.trials()
    assert len(rows) == 12 and {(r["loss.lam"], r["train.seed"]) for r in rows} == {
        (lam, seed) for lam in (0.02, 0.1, 0.3) for seed in (0, 1)
    }
    assert rows[0]["optim.lr"] == "~loguniform(0.0001, 0.01)"
    space = spec.param_space()
    assert space["loss.lam"] == tune.grid_search([0.02, 0.1, 0.3])
    assert isinstance(space["optim.lr"], Float) and space["optim.lr"].lower == pytest.approx(1e-4)
    assert isinstance(space["loss.num_slices"], Integer)
    assert spec.name == "spec" and spec.epochs == 10  # name from the file, epochs from the config defaults


def test_base_file_relative_to_spec_and_resolved_round_trip(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "base.yaml").write_text(yaml.safe_dump({**tiny_base(), "train": {"epochs": 3}}))
    spec = load_spec(
        write_spec(
            tmp_path,
            {
                "name": "my sweep/../x",
                "base": "configs/base.yaml",
                "space": {"loss.lam": [0.05, 0.2], "optim.weight_decay": {"choice": [0.0, 5e-4]}},
                "scheduler": {"type": "asha", "grace_period": 1},
            },
        )
    )
    assert spec.name == "my-sweep-..-x" and "/" not in spec.name and spec.epochs == 3
    again = load_spec(write_spec(tmp_path, spec.resolved(), "resolved.yaml"))
    assert again.base == spec.base and again.trials() == spec.trials()
    assert again.param_space().keys() == spec.param_space().keys() and again.scheduler == spec.scheduler


def test_resources_rules_and_expected_concurrency(tmp_path):
    spec = load_spec(
        write_spec(
            tmp_path,
            {
                "base": tiny_base(),
                "space": {"model.arch": ["test_resnet", "test_vit"]},
                "resources": {
                    "cpus_per_trial": 1,
                    "rules": [
                        {"pattern": "test_vit", "cpus_per_trial": 2, "gpus_per_trial": 0.5},
                        {"max_params": "1G", "cpus_per_trial": 0.5},
                    ],
                },
                "max_concurrent_trials": 3,
            },
        )
    )
    vit, resnet = spec.resources_for("test_vit"), spec.resources_for("test_resnet")
    assert (vit.cpus, vit.gpus) == (2, 0.5)  # first matching rule wins
    assert (resnet.cpus, resnet.gpus) == (0.5, 0)  # counted on the backbone (not in the catalog), under 1G
    assert spec.trial_resources({"model.arch": "test_vit"}) == {"cpu": 2, "gpu": 0.5}
    assert spec.expected_concurrency(cpus=4, gpus=1) == 2  # the vit trials need 2 CPUs and half a GPU
    assert spec.expected_concurrency(cpus=4, gpus=0) == 0  # ... and cannot run without a GPU


def test_arch_overrides_set_base_values_per_architecture(tmp_path):
    spec = load_spec(
        write_spec(
            tmp_path,
            {
                "base": tiny_base(),
                "space": {"model.arch": ["test_resnet", "test_vit"], "loss.lam": [0.05, 0.1]},
                "arch_overrides": [
                    {"pattern": "test_v*", "set": {"optim.lr": 1e-3}},
                    {"max_params": "1G", "set": {"optim.lr": 5e-3, "optim.weight_decay": 0.01}},
                ],
            },
        )
    )
    base_wd = spec.base_config.optim.weight_decay
    assert spec.arch_params == {
        "test_vit": {"optim.lr": 1e-3},  # first matching rule wins, nothing merged
        "test_resnet": {"optim.lr": 5e-3, "optim.weight_decay": 0.01},
    }
    assert spec.columns() == ["loss.lam", "model.arch", "optim.lr", "optim.weight_decay"]  # (safe_dump sorts keys)
    assert [(r["loss.lam"], r["model.arch"], r["optim.lr"], r["optim.weight_decay"]) for r in spec.trials()] == [
        (0.05, "test_resnet", 5e-3, 0.01),
        (0.05, "test_vit", 1e-3, base_wd),
        (0.1, "test_resnet", 5e-3, 0.01),
        (0.1, "test_vit", 1e-3, base_wd),
    ]
    assert spec.trial_params({"model.arch": "test_vit", "loss.lam": 0.1}) == {
        "optim.lr": 1e-3,
        "model.arch": "test_vit",
        "loss.lam": 0.1,
    }
    again = load_spec(write_spec(tmp_path, spec.resolved(), "resolved.yaml"))  # what --resume reads
    assert again.arch_params == spec.arch_params and again.trials() == spec.trials()
    text = dry_run(spec)
    assert "optim.lr" in text.splitlines()[2] and "optim.weight_decay" in text.splitlines()[2]


def test_multi_worker_trials_reserve_only_a_driver_in_tune(tmp_path):
    spec = load_spec(write_spec(tmp_path, {"base": tiny_base(), "resources": {"cpus_per_trial": 1, "workers_per_trial": 2}}))
    res = spec.resources_for("test_resnet")
    assert res.total() == (2, 0) and spec.trial_resources({})["cpu"] < 0.1
    assert spec.expected_concurrency(cpus=5, gpus=0) == 1  # num_trials == 1


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"space": {"loss.lamda": [0.1]}}, "space.loss.lamda: unknown config key (did you mean 'loss.lam'"),
        ({"space": {"loss.lam": [0.1, 2]}}, "space.loss.lam: loss.lam=2 is invalid: input should be less than or equal to 1"),
        ({"space": {"loss.lam": 0.1}}, "space.loss.lam: expected a list (grid) or one of"),
        ({"space": {"optim.lr": {"logunifrom": [1e-4, 1e-2]}}}, "unknown distribution 'logunifrom' (did you mean 'loguniform'"),
        ({"space": {"optim.lr": {"uniform": [1e-2, 1e-4]}}}, "space.optim.lr.uniform: low must be below high"),
        ({"space": {"loss.num_slices": {"randint": [16.5, 64]}}}, "expected integers"),
        ({"space": {"train.out_dir": ["a", "b"]}}, "space.train.out_dir: is set by the sweep itself"),
        ({"space": {"tracking.experiment": ["a"]}}, "space.tracking.experiment: is set by the sweep itself"),
        ({"space": {"data.resolution": [16, 8]}, "base": {"views": {"local_size": 12}}}, "exceeds data.resolution=8"),
        ({"space": {"loss.lam": {"uniform": [0.0, 0.5]}}}, "space.loss.lam: λ = 0 leaves train/score"),
        ({"search": {"algo": "optuna"}, "space": {"loss.lam": [0.1, 0.2]}}, "search.algo=optuna cannot take a grid"),
        ({"search": {"algo": "hyperopt"}}, "search.algo=hyperopt is invalid: input should be 'default' or 'optuna'"),
        ({"scheduler": {"type": "asha", "metric": "epoch/los"}}, "scheduler.metric: 'epoch/los' is not a reported"),
        ({"scheduler": {"type": "asha", "grace": 2}}, "scheduler.grace: unknown key (did you mean 'grace_period'"),
        ({"scheduler": {"type": "asha"}, "space": {"train.epochs": [1, 2]}}, "cannot be swept together with a scheduler"),
        ({"schedulr": {"type": "asha"}}, "schedulr: unknown key (did you mean 'scheduler'"),
        ({"resources": {"rules": [{"gpus_per_trial": 0.5}]}}, "resources.rules[0]: a rule needs a condition"),
        ({"resources": {"gpus_per_trial": 1.5}}, "a fraction of one GPU or whole GPUs"),
        ({"num_samples": 0}, "num_samples=0 is invalid"),
        ({"base": "missing.yaml"}, "base: config file"),
        ({"base": {"optim": {"lr": 5}}}, "base: optim.lr=5 is invalid"),
        ({"space": {"loss.lam": {"catalog": {"family": "vit"}}}}, "a catalog query can only set model.arch"),
        ({"space": {"model.arch": {"catalog": {"famly": "vit"}}}}, "space.model.arch.catalog: unknown query field 'famly'"),
        ({"space": {"model.arch": {"catalog": {"family": "resnte"}}}}, "unknown architecture family 'resnte'"),
        ({"tracking": {"uri": "file:./mlruns"}}, "tracking.uri: MLflow 3 refuses file: stores"),
        ({"base": {"model": {"arch": "resnet_nope"}}}, "base.model.arch: unknown architecture 'resnet_nope'; closest"),
        (
            {
                "space": {
                    "train.seed": list(range(100)),
                    "optim.lr": [1e-3, 2e-3],
                    "loss.lam": [0.01 * i for i in range(1, 51)],
                    "loss.num_slices": list(range(16, 16 + 11)),
                }
            },
            "space: expands to 110,000 trials (50 loss.lam × 11 loss.num_slices × 2 optim.lr × 100 train.seed); "
            "the limit is 10,000",
        ),
        ({"space": {"model.arch": ["resnet10t", "resnet_nope"]}}, "space.model.arch: unknown architecture 'resnet_nope'"),
        ({"arch_overrides": [{"set": {"optim.lr": 1e-3}}]}, "arch_overrides[0]: a rule needs a condition"),
        ({"arch_overrides": [{"pattern": "*", "set": {}}]}, "arch_overrides[0]: a rule needs at least one key under set"),
        ({"arch_overrides": [{"pattern": "*", "set": {"optim.lr": 5}}]}, "arch_overrides[0] (resnet10t): optim.lr=5 is invalid"),
        ({"arch_overrides": [{"pattern": "*", "set": {"optim.lrr": 1e-3}}]}, "unknown config key 'optim.lrr'"),
        (
            {"space": {"optim.lr": [1e-3]}, "arch_overrides": [{"pattern": "*", "set": {"optim.lr": 1e-3}}]},
            "arch_overrides[0].set.optim.lr: is also swept in space",
        ),
        (
            {"arch_overrides": [{"family": "resnet", "set": {"train.out_dir": "x"}}]},
            "arch_overrides[0].set.train.out_dir: is set by the sweep itself",
        ),
    ],
)
def test_spec_errors_name_file_key_and_problem(tmp_path, body, fragment):
    path = write_spec(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and fragment in message and "\n" not in message


def test_cli_dry_run_prints_the_table_without_ray(tmp_path):
    path = write_spec(
        tmp_path,
        {
            "name": "dry",
            "base": tiny_base(),
            "space": {"loss.lam": [0.02, 0.2], "model.arch": ["test_resnet", "test_vit"]},
            "max_concurrent_trials": 1,
        },
    )
    code = (
        "import sys; from lejepa.cli import main; rc = main(['sweep', sys.argv[1], '--dry-run']); "
        "assert 'ray' not in sys.modules, 'the dry run imported ray'; sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("sweep dry (") and "4 trials × 10 epochs" in lines[0]
    assert [line.split()[:3] for line in lines[3:7]] == [
        ["1", "0.02", "test_resnet"],
        ["2", "0.02", "test_vit"],
        ["3", "0.2", "test_resnet"],
        ["4", "0.2", "test_vit"],
    ]
    assert "expected concurrency on this machine" in proc.stdout and ": 1 trial(s) at a time" in proc.stdout
    assert not list(tmp_path.rglob("*.db")) and not (tmp_path / "runs").exists()


def test_cli_errors_are_one_line(tmp_path):
    proc = run_cli(["sweep", str(write_spec(tmp_path, {"space": {"loss.lamda": [0.1]}})), "--dry-run"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "did you mean 'loss.lam'" in proc.stderr
    proc = run_cli(["sweep", "--resume", "nope", "--storage", str(tmp_path)], tmp_path)
    assert proc.returncode == 2 and "no resumable sweep" in proc.stderr and "Traceback" not in proc.stderr


def test_dry_run_warns_about_the_collapse_region(tmp_path):
    def last_line(space: dict, **base_changes) -> str:
        base = tiny_base()  # batch 64
        for key, value in base_changes.items():
            base[key.split(".")[0]][key.split(".")[1]] = value
        spec = load_spec(write_spec(tmp_path, {"name": "w", "base": base, "space": space}))
        return dry_run(spec).splitlines()[-1]

    line = last_line({"loss.lam": [0.001, 0.01, 0.05]})
    assert line.startswith("warning: 2 of 3 trials may collapse: λ 0.001 at batch 64 lies in the collapse region")
    assert "warning" not in last_line({"loss.lam": [0.05, 0.2]})
    assert "warning" not in last_line({"loss.lam": [0.01]}, **{"optim.batch_size": 128})  # λ·N = 1.28
    sampled = last_line({"loss.lam": {"loguniform": [1e-4, 1e-1]}, "optim.batch_size": [32, 256]})
    assert sampled.startswith("warning: 2 of 2 trials may collapse: λ down to 0.0001 at batch 32")


def test_dry_run_warns_about_architectures_the_stability_walk_found_not_learning(tmp_path):
    """resnet14t gained nothing over its random-init probe in the walk (the catalog says so) and is
    named at 32 px; resnet18 learned; test_resnet is outside the catalog; at 224 px nothing is said.
    Their GPU walk outcome is not measured at the family's lr, so the CPU walk's decides."""
    from lejepa.catalog import get_arch

    r14t, r18 = get_arch("resnet14t"), get_arch("resnet18")
    assert (r14t.gpu_walk_outcome, r14t.walk_outcome, r18.gpu_walk_outcome, r18.walk_outcome) == ("", "no gain", "", "learns")
    space = {"model.arch": ["resnet18", "resnet14t", "test_resnet"]}
    spec = load_spec(write_spec(tmp_path, {"name": "w", "base": tiny_base(), "space": {**space, "data.resolution": [32]}}))
    (line,) = [line for line in dry_run(spec).splitlines() if "stability walk" in line]
    assert line.startswith("warning: 1 of 3 architectures did not beat their random-init probe") and line.endswith(
        ": resnet14t (no gain)"
    )
    big = load_spec(write_spec(tmp_path, {"name": "w", "base": tiny_base(), "space": {**space, "data.resolution": [224]}}))
    assert "stability walk" not in dry_run(big)
