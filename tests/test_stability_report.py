"""benchmarks/stability.py: the seed spread, the learns rule, the page, the plot and the catalog update."""

from __future__ import annotations

import csv
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import stability


def _rows(arch: str, probes: list[float], inits: list[float], verdict: str = "healthy") -> list[dict]:
    return [
        {
            "run_id": f"{arch}{i}",
            "arch": arch,
            "status": "finished",
            "verdict": verdict,
            "loss": 0.3,
            "collapse_ratio": 0.1,
            "proj_rank": 0.4,
            "init_probe": b,
            "probe": p,
            "gain": p - b,
            "init_knn": b,
            "knn": p,
            "images_per_s": 50.0,
            "wall_s": 100.0,
        }
        for i, (p, b) in enumerate(zip(probes, inits))
    ]


def test_spread_over_seeds_and_learning_needs_more_gain_than_that(tmp_path):
    seeds = pd.DataFrame(
        _rows("regnetx_002", [0.66, 0.68, 0.67], [0.60, 0.61, 0.60]) + _rows("levit_128s", [0.50, 0.53, 0.52], [0.45, 0.44, 0.46])
    )
    spread, strict, table = stability.seed_spread(seeds)
    assert strict == pytest.approx(0.03)
    assert spread == pytest.approx(np.sqrt((np.var([0.66, 0.68, 0.67], ddof=1) + np.var([0.50, 0.53, 0.52], ddof=1)) / 2))
    assert set(table["arch"]) == {"regnetx_002", "levit_128s"}

    walk = pd.DataFrame(
        _rows("resnet10t", [0.70], [0.65])
        + _rows("mobilenetv2_050", [0.25], [0.23])
        + _rows("ghostnet_050", [0.90], [0.20], verdict="collapsed")
        + [{"run_id": "x", "arch": "vit_tiny_patch16_224", "status": "diverged", "verdict": "diverged"}]
    )
    for col in stability.COLUMNS:
        if col not in walk and col not in ("family", "params", "adaptation", "learns"):
            walk[col] = np.nan
    walk = stability.describe(walk, 0.03, strict)
    learns = dict(zip(walk["arch"], walk["learns"]))
    assert learns == {
        "resnet10t": True,
        "mobilenetv2_050": False,
        "ghostnet_050": False,
        "vit_tiny_patch16_224": False,
    }  # +0.05 > 0.03; +0.02 is not; unhealthy never counts
    assert walk.set_index("arch").loc["resnet10t", "family"] == "resnet"

    page = stability.markdown(walk, 0.03, strict, table, "# walk")
    assert "1 of 3 = 33%" in page and "ghostnet_050 (collapsed)" in page and "vit_tiny_patch16_224 (diverged)" in page
    stability.plot(walk, 0.03, tmp_path / "walk.png")
    assert (tmp_path / "walk.png").stat().st_size > 10_000

    catalog = tmp_path / "catalog.csv"
    assert stability.update_catalog(walk, catalog) == 4
    rows = {r["name"]: r for r in csv.DictReader(catalog.open())}
    assert rows["resnet10t"]["walk_outcome"] == "learns" and float(rows["resnet10t"]["walk_gain"]) == pytest.approx(0.05)
    assert rows["mobilenetv2_050"]["walk_outcome"] == "no gain"
    assert rows["vit_tiny_patch16_224"]["walk_outcome"] == "diverged" and rows["vit_tiny_patch16_224"]["walk_gain"] == ""
    gpu_before = rows["vit_tiny_patch16_224"]["gpu_walk_outcome"]  # the GPU budget's columns are apart
    assert stability.update_catalog(walk[walk["arch"] == "mobilenetv2_050"], catalog, budget="gpu") == 1
    after = {r["name"]: r for r in csv.DictReader(catalog.open())}
    assert after["mobilenetv2_050"]["gpu_walk_outcome"] == "no gain"
    assert float(after["mobilenetv2_050"]["gpu_walk_gain"]) == pytest.approx(0.02)
    assert after["vit_tiny_patch16_224"]["gpu_walk_outcome"] == gpu_before
    assert {(n, k): v for n in after for k, v in after[n].items() if not k.startswith("gpu_")} == {
        (n, k): v for n in rows for k, v in rows[n].items() if not k.startswith("gpu_")
    }
    from lejepa.catalog import get_arch

    assert rows["resnet18"] == get_arch("resnet18").to_row()  # not in this walk: untouched


def test_a_later_walk_part_supersedes_an_earlier_one_per_architecture():
    first = pd.DataFrame(_rows("vit_tiny_patch16_224", [0.19], [0.39]) + _rows("resnet10t", [0.70], [0.65])).assign(
        sweep="walk1", lr=1e-2
    )
    second = pd.DataFrame(_rows("vit_tiny_patch16_224", [0.55], [0.39])).assign(sweep="walk2", lr=1e-3)
    walk = stability.latest_per_arch([first, second]).set_index("arch")
    assert sorted(walk.index) == ["resnet10t", "vit_tiny_patch16_224"]
    assert walk.loc["vit_tiny_patch16_224", ["sweep", "lr", "probe"]].tolist() == ["walk2", 1e-3, 0.55]
    assert walk.loc["resnet10t", "sweep"] == "walk1"


def test_a_seeds_sweep_without_repeated_architectures_is_an_error():
    with pytest.raises(stability.LejepaError, match="2 or more finished seeds"):
        stability.seed_spread(pd.DataFrame(_rows("regnetx_002", [0.66], [0.60])))


@pytest.mark.slow
def test_direct_walk_applies_the_walk_specs_family_values_as_lejepa_sweep_does():
    """benchmarks/stability_direct.py trains each architecture with the values that
    sweeps/stability.yaml's arch_overrides give its family (a learning rate per family)."""
    import stability_direct

    from lejepa.catalog import get_arch
    from sweeps.spec import load_spec

    spec = load_spec(REPO / "sweeps" / "stability.yaml")
    overridden = sorted(spec.arch_params)
    assert {get_arch(a).family for a in overridden} == {"tiny_vit", "maxvit", "deit", "resnet", "resnext", "efficientformer"}
    for arch in overridden:
        assert stability_direct.family_overrides(arch) == [f"{k}={v}" for k, v in spec.arch_params[arch].items()]
    assert stability_direct.family_overrides("tiny_vit_5m_224") == ["optim.lr=0.001"]
    assert stability_direct.family_overrides("maxxvit_rmlp_nano_rw_256") == ["optim.lr=0.001"]
    assert stability_direct.family_overrides("deit_tiny_distilled_patch16_224") == ["optim.lr=0.001"]
    assert stability_direct.family_overrides("seresnext26d_32x4d") == ["optim.lr=0.002"]
    assert stability_direct.family_overrides("efficientformer_l1") == ["optim.lr=0.003"]  # a name pattern
    assert stability_direct.family_overrides("efficientformerv2_s0") == []  # the same family, not the pattern
    assert stability_direct.family_overrides("regnetx_002") == []  # a family without a rule: the base values
    seeds = yaml.safe_load((REPO / "sweeps" / "stability_seeds.yaml").read_text())
    assert stability_direct.seed_archs() == tuple(sorted(seeds["space"]["model.arch"]["catalog"]["names"]))


@pytest.mark.parametrize(
    "item, start",
    [
        ("optim.lr=1e-3", "error: --set optim.lr: the walk spec sets it per family"),
        (" optim.lr =1e-3", "error: --set optim.lr: the walk spec sets it per family"),  # parsed as the trainer parses it
        ("optim.lr", "error: --set: override 'optim.lr' is not of the form key=value"),
    ],
)
def test_direct_walk_refuses_a_set_that_a_family_rule_would_override(tmp_path, item, start):
    """--set of a key the walk spec's arch_overrides set (optim.lr) would be silently replaced for
    those families: one error line, exit 2, nothing written; so is a --set that is not key=value."""
    import subprocess

    script = REPO / "benchmarks" / "stability_direct.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--set", item, "--limit", "1", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), proc.stderr
    assert not (tmp_path / "out").exists()


def test_direct_walk_trains_reports_and_resumes_only_what_is_missing(tmp_path):
    """benchmarks/stability_direct.py: real trainer processes, the report of benchmarks/stability.py,
    and --resume trains only the trials not finished in trials.csv."""
    import subprocess

    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "stability_direct.py"),
        "--workers",
        "2",
        "--limit",
        "0",
        "--seed-archs",
        "test_resnet",
        "--seeds",
        "2",
        "--out",
        str(tmp_path),
        "--set",
        "data.name=digits-shifted",
        "data.resolution=16",
        "data.train_size=256",
        "data.test_size=128",
        "optim.batch_size=64",
        "train.epochs=1",
        "loss.num_slices=32",
        "model.proj_hidden=32",
        "train.eval_probe_epochs=2",
    ]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    trials = pd.read_csv(tmp_path / "trials.csv")
    assert sorted(zip(trials["arch"], trials["seed"])) == [("test_resnet", 0), ("test_resnet", 1)]
    assert (trials["status"] == "finished").all() and trials["init_probe"].notna().all()
    table = pd.read_csv(tmp_path / "stability.csv")
    assert list(table.columns) == stability.COLUMNS and len(table) == 1  # seed 0 of each architecture
    assert (tmp_path / "stability.png").stat().st_size > 0

    trials[trials["seed"] == 0].to_csv(tmp_path / "trials.csv", index=False)  # as if cut short
    again = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "1 trials (1 done before)" in again.stdout
    assert sorted(pd.read_csv(tmp_path / "trials.csv")["seed"]) == [0, 1]

    missing = subprocess.run(
        cmd[:-1] + ["--report-only", "--out", str(tmp_path / "none")], capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "does not exist" in missing.stderr


def test_parts_from_earlier_reports_merge_with_later_ones(tmp_path, capsys):
    """A part walked in an earlier session is read back from the CSVs its report wrote; a later
    part's trial of an architecture supersedes it; seeds.csv gives back the same spread."""
    seeds = pd.DataFrame(_rows("regnetx_002", [0.66, 0.68, 0.67], [0.60, 0.61, 0.60]))
    part1 = pd.DataFrame(_rows("resnet10t", [0.70], [0.69]) + _rows("levit_128s", [0.55], [0.40]))
    part1["arch"] = ["resnet10t", "levit_128s"]
    part2 = pd.DataFrame(_rows("resnet10t", [0.80], [0.69]))
    for name, frame in (("seeds", stability.seed_spread(seeds)[2]), ("part1", part1), ("part2", part2)):
        frame.to_csv(tmp_path / f"{name}.csv", index=False)
    first = tmp_path / "first"
    assert (
        stability.main(
            [
                "--walk",
                str(tmp_path / "part1.csv"),
                str(tmp_path / "part2.csv"),
                "--seeds",
                str(tmp_path / "seeds.csv"),
                "--out",
                str(first),
            ]
        )
        == 0
    )
    walk = pd.read_csv(first / "stability.csv").set_index("arch")
    assert walk.loc["resnet10t", "probe"] == pytest.approx(0.80) and bool(walk.loc["resnet10t", "learns"])
    spread, strict, _ = stability.seed_spread(seeds)
    again = stability.load_seeds(str(first / "seeds.csv"), None)
    assert again[:2] == pytest.approx((spread, strict), abs=1e-4)

    capsys.readouterr()
    assert (
        stability.main(
            ["--walk", str(tmp_path / "gone.csv"), "--seeds", str(tmp_path / "seeds.csv"), "--out", str(tmp_path / "x")]
        )
        == 2
    )
    assert capsys.readouterr().err.startswith("error: walk part") and not (tmp_path / "x").exists()
    assert stability.main(["--walk", "stability_walk", "--seeds", str(tmp_path / "seeds.csv"), "--out", str(tmp_path / "y")]) == 2
    assert "--tracking-uri is needed" in capsys.readouterr().err
