"""The architecture catalog: contents, no drift from timm, queries, and the whole-catalog walk.

The walk builds every entry with ``pretrained=False`` at 32 px (or its minimum) and runs one
LeJEPA training step on the CPU (B=4, 2 global + 2 local views); GPU-scale entries run it on
the meta device. An entry marked ``runs_small=false`` must still fail (strict xfail), so the
marks cannot go stale.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from lejepa.catalog import (
    SMALL_RESOLUTION,
    TIMM_NAMES,
    ArchInfo,
    check_arch_name,
    families,
    format_table,
    get_arch,
    load_catalog,
    parse_param_budget,
    query,
)
from lejepa.catalog.build import HEADLINE, describe, make_step, select
from lejepa.errors import ArchitectureError, ConfigError

REPO = Path(__file__).resolve().parents[1]
CATALOG = load_catalog()


pytestmark = pytest.mark.usefixtures("one_thread")


def test_catalog_size_and_families():
    assert len(CATALOG) >= 60
    assert len(families()) >= 10
    assert len({a.name for a in CATALOG}) == len(CATALOG)
    runnable = [a for a in CATALOG if a.runs_small and not a.gpu_scale]
    assert len(runnable) >= 60 and len({a.family for a in runnable}) >= 10
    for name in HEADLINE:
        assert get_arch(name).gpu_scale


def test_entries_are_consistent():
    for a in CATALOG:
        assert a.params > 0 and a.embed_dim > 0 and a.min_input >= 4
        if a.fixed_input is not None:
            assert a.min_input == a.fixed_input
        if not a.runs_small:
            assert "does not run small" in a.notes


# Families whose timm candidates are few enough to re-select quickly (~100 meta-device builds);
# the whole selection (~350 builds) is what `python -m lejepa.catalog.build` does.
RESELECTED = [
    "convnext",
    "convnextv2",
    "efficientnet",
    "levit",
    "inception_next",
    "deit",
    "efficientformer",
    "ghostnet",
    "tiny_vit",
]


def test_names_match_a_fresh_selection_from_timm():
    fresh = select(RESELECTED)
    assert len({f for _, f in fresh}) == len(RESELECTED)
    assert sorted(fresh) == sorted((a.name, a.family) for a in CATALOG if a.family in RESELECTED)


def _one_per_family() -> list[ArchInfo]:
    return list({a.family: a for a in reversed(CATALOG)}.values())


@pytest.mark.parametrize("entry", _one_per_family(), ids=lambda a: a.name)
def test_measurements_match_a_fresh_build(entry: ArchInfo):
    fresh = describe(entry.name, entry.family)
    for field in ("params", "embed_dim", "min_input", "fixed_input", "small_stem", "gpu_scale"):
        assert getattr(fresh, field) == getattr(entry, field), field
    assert entry.notes.startswith(fresh.notes)  # the adaptation, as the builder describes it


def _walk_params() -> list:
    return [
        pytest.param(a, marks=[] if a.runs_small else [pytest.mark.xfail(strict=True, reason=a.notes)], id=a.name)
        for a in CATALOG
    ]


@pytest.mark.parametrize("entry", _walk_params())
def test_every_entry_runs_a_lejepa_step(entry: ArchInfo):
    device = "meta" if entry.gpu_scale else "cpu"
    step = make_step(entry.name, SMALL_RESOLUTION, batch=4, global_views=2, local_views=2, device=device)
    loss = step()
    assert loss.shape == ()
    if device == "cpu":
        assert math.isfinite(loss.item())


def test_an_arch_that_cannot_run_small_is_marked_not_dropped(monkeypatch):
    from lejepa.catalog import build

    monkeypatch.setattr(build, "select", lambda: [("crossvit_tiny_240", "deit")])  # needs 240-px multiples
    [entry] = build.build(log=lambda line: None)
    assert entry.name == "crossvit_tiny_240" and not entry.runs_small
    assert entry.notes.startswith("does not run small: ") and entry.params > 0


def test_query_by_family_budget_and_pattern():
    vits = query(family="vit")
    assert vits and all(a.family == "vit" and not a.gpu_scale for a in vits)
    assert {a.name for a in query(family="vit", include_gpu_scale=True)} >= {"vit_large_patch14_224", "vit_huge_patch14_224"}
    both = query(family=["ResNet", "resnext"])
    assert {a.family for a in both} == {"resnet", "resnext"}
    small = query(max_params="5M")
    assert small and all(a.params <= 5_000_000 for a in small)
    mid = query(min_params="10M", max_params=20_000_000)
    assert mid and all(10_000_000 <= a.params <= 20_000_000 for a in mid)
    resnets = query(pattern="resnet*")
    assert resnets and all(a.name.startswith("resnet") for a in resnets)
    assert [a.name for a in query(names=["resnet18", "convnext_atto"])] == ["resnet18", "convnext_atto"]
    assert query(family="vit", max_params="20M", pattern="*tiny*")
    rest = query(family=["resnet", "vit"], exclude=["resnet18", "vit_tiny_patch16_224"])
    assert {a.name for a in rest} == {a.name for a in query(family=["resnet", "vit"])} - {"resnet18", "vit_tiny_patch16_224"}


def test_query_keeps_catalog_order():
    names = [a.name for a in CATALOG]
    picked = [a.name for a in query(max_params="20M")]
    assert picked == sorted(picked, key=names.index)


def test_round_robin_order_takes_each_family_in_turn_smallest_first():
    walk = query(max_params="20M", order="round-robin")
    assert sorted(a.name for a in walk) == sorted(a.name for a in query(max_params="20M"))
    walked = list(dict.fromkeys(a.family for a in query(max_params="20M")))
    first = walk[: len(walked)]
    assert [a.family for a in first] == walked
    assert all(a.params == min(b.params for b in walk if b.family == a.family) for a in first)
    with pytest.raises(ArchitectureError, match="unknown order 'random'"):
        query(order="random")


def test_walk_outcome_columns_round_trip():
    entry = replace(CATALOG[0], walk_outcome="learns", walk_gain=0.0123, gpu_walk_outcome="no gain", gpu_walk_gain=-0.01)
    assert ArchInfo.from_row(entry.to_row()) == entry
    row = {k: v for k, v in CATALOG[0].to_row().items() if "walk_" not in k}  # an older catalog file
    old = ArchInfo.from_row(row)
    assert old.walk_outcome == old.gpu_walk_outcome == "" and old.walk_gain is None and old.gpu_walk_gain is None
    assert "gpu walk" in format_table([entry]) and "no gain -0.01" in format_table([entry])


def test_query_errors_are_one_line():
    for kwargs, needle in [
        ({"family": "vitt"}, "'vit'"),
        ({"pattern": "nothing*"}, "pattern='nothing*'"),
        ({"family": "vit", "max_params": "1k"}, "max_params=1k"),
        ({"names": ["resnet181"]}, "'resnet18'"),
        ({"exclude": ["resnet181"]}, "'resnet18'"),
        ({"family": "vit", "exclude": [a.name for a in query(family="vit")]}, "exclude="),
    ]:
        with pytest.raises(ArchitectureError) as err:
            query(**kwargs)
        assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20M", 20_000_000),
        ("1.5M", 1_500_000),
        ("300k", 300_000),
        ("300K", 300_000),
        ("1G", 10**9),
        ("2B", 2 * 10**9),
        ("2e7", 20_000_000),
        (" 20 M ", 20_000_000),
        ("12345", 12345),
        (5_000_000, 5_000_000),
    ],
)
def test_parse_param_budget(text, expected):
    assert parse_param_budget(text) == expected


@pytest.mark.parametrize("bad", ["20X", "M", "", "-1M", True, None, [20]])
def test_parse_param_budget_rejects(bad):
    with pytest.raises(ConfigError):
        parse_param_budget(bad)


def test_unknown_name_gives_closest():
    with pytest.raises(ArchitectureError) as err:
        get_arch("convnext_ato")
    assert "'convnext_atto'" in str(err.value) and "\n" not in str(err.value)


def test_timm_names_snapshot_is_the_installed_timms_registry():
    """lejepa/catalog/timm_models.txt lists timm.list_models() of the installed timm (rewrite it with
    ``python -m lejepa.catalog.build --timm-names`` after a timm upgrade); the catalog is in it."""
    import timm

    header, *names = TIMM_NAMES.read_text().splitlines()
    assert header == f"# timm {timm.__version__}"
    assert names == timm.list_models()
    assert {a.name for a in CATALOG} <= set(names)


def test_check_arch_name_uses_the_snapshot_only_when_the_installed_timm_wrote_it(tmp_path, monkeypatch):
    import timm

    import lejepa.catalog as catalog

    snapshot = tmp_path / "timm_models.txt"
    monkeypatch.setattr(catalog, "TIMM_NAMES", snapshot)
    for version, listed_name_passes in ((timm.__version__, True), ("0.0.1", False)):
        snapshot.write_text(f"# timm {version}\nresnet18\nnot_in_timm\n")
        catalog._snapshot_names.cache_clear()
        check_arch_name("resnet18")
        check_arch_name("convnext_atto")  # not in the snapshot: timm answers
        if listed_name_passes:
            check_arch_name("not_in_timm")  # answered from the snapshot, timm not asked
        else:
            with pytest.raises(ArchitectureError, match="unknown architecture 'not_in_timm'"):
                check_arch_name("not_in_timm")
        with pytest.raises(ArchitectureError, match="unknown architecture 'resnet_18'; closest: resnet18"):
            check_arch_name("resnet_18")
    catalog._snapshot_names.cache_clear()


def test_a_sweep_spec_is_checked_without_importing_timm_torchvision_or_sklearn(tmp_path):
    """Loading a spec checks its architectures and data (the sweep pre-flight) without the imports
    that cost 3-4 CPU-seconds per process; the trials import them."""
    import subprocess
    import sys

    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\nbase: {data: {name: digits}}\nspace: {model.arch: [resnet10t, test_resnet]}\n")
    code = (
        "import sys; from sweeps.spec import load_spec; load_spec(sys.argv[1]); "
        "print(sorted(m for m in ('timm', 'torchvision', 'sklearn') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(spec)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_format_table():
    table = format_table(query(family="levit"))
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["name", "family", "params"]
    assert "levit_128s" in table and lines[-1] == f"{len(lines) - 2} architectures, 1 family"


def test_cli_archs(capsys):
    from lejepa.cli import main

    assert main(["archs", "--family", "vit", "--max-params", "20M"]) == 0
    out = capsys.readouterr().out
    assert "vit_tiny_patch16_224" in out and "vit_large" not in out
    assert main(["archs", "--family", "nope"]) == 2
    assert "unknown architecture family 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("spec_file, lams", [("architectures.yaml", 2), ("stability.yaml", 1)])
def test_catalog_sweeps_expand_to_the_catalog_families_interleaved(spec_file, lams):
    from sweeps.spec import load_spec

    spec = load_spec(REPO / "sweeps" / spec_file)
    archs = next(p.values for p in spec.space if p.key == "model.arch")
    assert list(archs) == [a.name for a in query(max_params="20M", order="round-robin")]
    assert len(archs) >= 50 and len({get_arch(a).family for a in archs}) >= 10
    assert spec.num_trials() == lams * len(archs)
    base = spec.base_config
    assert base.model.small_stem is None and base.train.eval_at_init and base.loss.lam == 0.05
