"""``lejepa sweep``: run, dry-run or resume a sweep spec (a plug-in of the ``lejepa`` command).

Exit status: 0 when every trial finished, was pruned, collapsed or diverged (results, not errors); 1 when
some failed; 130 when the sweep was interrupted (the summary says how to ``--resume`` it); 2 for
bad input.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lejepa.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``sweep`` sub-command to the ``lejepa`` parser."""
    p = sub.add_parser(
        "sweep",
        help="run a Ray Tune sweep of LeJEPA trials, tracked in MLflow",
        description="Run the sweep SPEC (YAML, see sweeps/quickstart.yaml): every trial is a LeJEPA run and a "
        "child of the sweep's MLflow run. --dry-run prints the trials without running anything; "
        "--resume NAME continues an interrupted sweep.",
    )
    p.add_argument("spec", nargs="?", metavar="SPEC", help="sweep spec file (optional with --resume)")
    p.add_argument("--dry-run", action="store_true", help="print the expanded trial table and exit")
    p.add_argument(
        "--no-estimate",
        action="store_true",
        help="with --dry-run: skip measuring each architecture's steps for the estimated wall time",
    )
    p.add_argument("--resume", metavar="NAME", help="continue the sweep NAME (its folder under the storage)")
    p.add_argument("--address", help="join a running Ray cluster ('auto', or host:port; default RAY_ADDRESS, else a local Ray)")
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: the spec's, MLFLOW_TRACKING_URI, or <out_dir>/mlflow.db)"
    )
    p.add_argument("--storage", help="folder holding sweeps (default <train.out_dir>/sweeps); shared by all nodes on a cluster")
    p.add_argument("--name", help="sweep name (default: the spec's name plus a timestamp)")
    g = p.add_argument_group(
        "SLURM", "submit the sweep as one SLURM job (a Ray cluster over its nodes); defaults from the spec's slurm: section"
    )
    g.add_argument("--slurm", action="store_true", help="write and submit an sbatch job (with --dry-run: print it)")
    g.add_argument("--nodes", type=int, help="nodes (one Ray node each; the first is the head)")
    g.add_argument("--cpus-per-task", type=int, help="CPUs per node given to Ray")
    g.add_argument("--gpus-per-node", type=int, help="GPUs per node")
    g.add_argument("--time", help="time limit, e.g. 12:00:00 (the driver gets SIGTERM 2 min before it)")
    g.add_argument("--partition", help="SLURM partition")
    g.add_argument("--account", help="SLURM account")
    g.add_argument("--sbatch", action="append", metavar="OPTION", help="an extra sbatch option, e.g. --sbatch=--mem=64G")
    g.add_argument("--setup", action="append", metavar="LINE", help="a shell line the job runs first, e.g. 'module load cuda'")
    p.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from sweeps.spec import load_spec

    if args.spec is None and args.resume is None:
        raise ConfigError("lejepa sweep needs a SPEC file (or --resume NAME)")
    tracking_checked = bool(args.tracking_uri and args.resume is None and not args.dry_run)
    if tracking_checked:
        from lejepa.preflight import check_tracking_uri

        # before the spec, whose architecture and data checks import timm and torchvision (seconds):
        # a server that is down is reported at once; the sweep's own preflight then skips it
        check_tracking_uri(args.tracking_uri)
    spec = load_spec(args.spec) if args.spec is not None else None
    if args.slurm:
        return _slurm(args, spec, tracking_checked=tracking_checked)
    if args.dry_run:
        if spec is None:
            raise ConfigError("--dry-run needs a SPEC file")
        from sweeps.estimate import process_age

        joins_ray = bool(args.address or os.environ.get("RAY_ADDRESS"))
        print(dry_run(spec, estimate=not args.no_estimate, process_start_s=process_age(), joins_ray=joins_ray))
        return 0
    from sweeps.runner import resume_sweep, run_sweep

    if args.resume is not None:
        if args.tracking_uri or args.name:
            raise ConfigError("--resume continues the sweep where it was tracked and named: drop --tracking-uri/--name")
        from sweeps.layout import default_storage

        storage = args.storage if args.storage is not None or spec is None else default_storage(spec)
        outcome = resume_sweep(args.resume, storage=storage, address=args.address)
    else:
        assert spec is not None  # without --resume a SPEC is required (checked above)
        outcome = run_sweep(
            spec,
            storage=args.storage,
            name=args.name,
            address=args.address,
            tracking_uri=args.tracking_uri,
            tracking_checked=tracking_checked,
        )
    print(outcome.render())
    if outcome.interrupted:
        return 130
    return 1 if outcome.count("failed") else 0


def _slurm(args: argparse.Namespace, spec, *, tracking_checked: bool = False) -> int:
    """``--slurm``: print (``--dry-run``) or submit the sweep's SLURM job (``tracking_checked``: the
    ``--tracking-uri`` store was checked already)."""
    from datetime import datetime

    from lejepa.preflight import check_tracking_uri
    from sweeps.layout import RESOLVED_SPEC, storage_root, tracking_uri_for
    from sweeps.names import check_name
    from sweeps.schema import SlurmSpec
    from sweeps.slurm import SlurmJob, render, submit
    from sweeps.spec import load_spec

    if args.address:
        raise ConfigError("--slurm starts its own Ray cluster in the job: drop --address")
    root = storage_root(args.storage, spec)
    if args.resume is not None:
        if args.tracking_uri or args.name:
            raise ConfigError("--resume continues the sweep where it was tracked and named: drop --tracking-uri/--name")
        name = check_name(args.resume, "--resume")
        if not (root / name).is_dir():
            raise ConfigError(f"--resume {name}: no sweep folder {root / name}; pass --storage where it lives")
        if spec is None and (root / name / RESOLVED_SPEC).is_file():
            spec = load_spec(root / name / RESOLVED_SPEC)
        spec_path, uri = None, None
    else:
        assert spec is not None  # checked by the caller
        name = check_name(args.name, "--name") if args.name else f"{spec.name}-{datetime.now():%Y%m%d-%H%M%S}"
        if (root / name).exists():
            raise ConfigError(f"sweep {name!r} already exists in {root}: continue it with --resume {name} --slurm")
        spec_path, uri = Path(args.spec).expanduser().resolve(), tracking_uri_for(spec, args.tracking_uri)
        if not args.dry_run and not tracking_checked:
            check_tracking_uri(uri)
    defaults = spec.slurm if spec is not None else SlurmSpec()
    job = SlurmJob(
        name=name,
        storage=root,
        spec=spec_path,
        tracking_uri=uri,
        nodes=args.nodes or defaults.nodes,
        cpus_per_task=args.cpus_per_task or defaults.cpus_per_task,
        gpus_per_node=args.gpus_per_node if args.gpus_per_node is not None else defaults.gpus_per_node,
        time=args.time or defaults.time,
        partition=args.partition or defaults.partition,
        account=args.account or defaults.account,
        sbatch=[*defaults.sbatch, *(args.sbatch or [])],
        setup=[*defaults.setup, *(args.setup or [])],
    )
    if args.dry_run:
        print(render(job), end="")
        return 0
    job_id = submit(job)
    print(f"submitted SLURM job {job_id}: sweep {name}")
    print(f"  job script:  {job.script_path} (sbatch it again to resume the sweep)")
    print(f"  job output:  {str(job.output_pattern).replace('%j', job_id)}")
    print(f"  sweep:       {root / name}")
    print(f"  MLflow:      {uri or 'as recorded in the sweep folder'}")
    print(f"  watch:       squeue -j {job_id};  stop: scancel {job_id}")
    print(f"  resume:      lejepa sweep --resume {name} --storage {root} [--slurm]")
    return 0


def dry_run(spec, estimate: bool = False, process_start_s: float | None = None, joins_ray: bool = False) -> str:
    """The expanded trial table: count, per-trial overrides, resources, expected concurrency on this machine;
    with ``estimate``, the sweep's measured wall-time estimate (:func:`sweeps.estimate.estimate_wall_time`,
    ``process_start_s`` and ``joins_ray`` passed on; it times each architecture's steps here)."""
    from lejepa.tables import format_table

    keys = spec.columns()
    uniform = len(set(spec.arch_resources.values())) == 1
    rows = []
    for i, row in enumerate(spec.trials(), 1):
        arch = row.get("model.arch", spec.base_config.model.arch)
        res = next(iter(spec.arch_resources.values())) if uniform else spec.arch_resources.get(arch)
        rows.append([i, *(row[k] for k in keys), *((res.cpus, res.gpus, res.workers) if res else ("by arch",) * 3)])
    cpus, gpus = _local_resources()
    search = "optuna (TPE)" if spec.search.algo == "optuna" else "grid/random"
    lines = [
        f"sweep {spec.name} ({spec.path}): {spec.num_trials()} trials × {spec.epochs} epochs"
        + (f" — {spec.description}" if spec.description else ""),
        f"search: {search} on {spec.search.metric} ({spec.search.mode}); scheduler: {spec.scheduler.type}"
        + (
            f" on {spec.scheduler.metric} ({spec.scheduler.mode}), grace {spec.scheduler.grace_period}, "
            f"reduction {spec.scheduler.reduction_factor:g}"
            if spec.scheduler.type != "none"
            else ""
        ),
        format_table(["#", *keys, "cpus", "gpus", "workers"], rows),
        f"expected concurrency on this machine ({cpus} CPUs, {gpus} GPUs): {spec.expected_concurrency(cpus, gpus)} "
        f"trial(s) at a time (max_concurrent_trials={spec.max_concurrent_trials or 'unlimited'})",
        *(
            f"  {arch}: {res.cpus:g} CPUs, {res.gpus:g} GPUs × {res.workers} worker(s)"
            for arch, res in spec.arch_resources.items()
            if not uniform
        ),
        f"max failures per trial: {spec.max_failures}; MLflow experiment {spec.tracking.experiment!r}",
    ]
    if estimate:
        from lejepa.errors import first_line
        from sweeps.estimate import estimate_wall_time, stderr_progress

        try:
            lines.append(
                estimate_wall_time(
                    spec, cpus=cpus, gpus=gpus, process_start_s=process_start_s, joins_ray=joins_ray, progress=stderr_progress
                ).line()
            )
        except Exception as exc:  # the table stands without the estimate
            lines.append(f"estimated wall time on this machine: not available ({first_line(exc, type(exc).__name__)})")
    warnings = [w for w in (walk_warning(spec), collapse_warning(spec)) if w]
    return "\n".join(lines + warnings)


WALK_RESOLUTION = 32
"""The side the stability walk trained at (sweeps/stability_base.yaml); its outcomes hold at small sides."""


def walk_warning(spec) -> str | None:
    """One ``warning:`` line naming the spec's architectures that did not beat their random-init
    probe in the stability walk (the catalog's measured outcome, the GPU walk's where it ran), when
    the spec trains them at a small side (≤ 2 × the walk's)."""
    from lejepa.catalog import get_arch
    from lejepa.errors import ArchitectureError

    base = spec.base_config
    archs: dict[str, int] = {}
    for row in spec.trials():
        arch, side = row.get("model.arch", base.model.arch), row.get("data.resolution", base.data.resolution)
        if isinstance(arch, str) and isinstance(side, int) and side <= 2 * WALK_RESOLUTION:
            archs.setdefault(arch, side)
    weak = []
    for arch in archs:
        try:
            entry = get_arch(arch)
        except ArchitectureError:  # outside the catalog: not measured
            continue
        outcome = entry.gpu_walk_outcome or entry.walk_outcome
        if outcome and outcome != "learns":
            weak.append(f"{arch} ({outcome})")
    if not weak:
        return None
    shown = ", ".join(weak[:8]) + (f", and {len(weak) - 8} more" if len(weak) > 8 else "")
    return (
        f"warning: {len(weak)} of {len(archs)} architectures did not beat their random-init probe in the stability "
        f"walk ({WALK_RESOLUTION} px, 93 steps; the catalog's walk outcome, README: Architectures): {shown}"
    )


def collapse_warning(spec) -> str | None:
    """One ``warning:`` line when trials lie in the collapse region (:func:`lejepa.health.collapse_risk`):
    grid values are checked trial by trial, a sampled λ or batch size at its low end."""
    from lejepa.health import collapse_risk

    base = spec.base_config
    params = {p.key: p for p in spec.space}

    def value(row: dict, key: str, default: float) -> tuple[float, str]:
        """The trial's value of ``key`` and '' — or, when sampled, its low end and 'down to '."""
        if isinstance(row.get(key), (int, float)):
            return float(row[key]), ""
        if key in params:
            return min(float(v) for v in params[key].probes()), "down to "
        return float(default), ""

    rows = spec.trials()
    risky = [(value(r, "loss.lam", base.loss.lam), value(r, "optim.batch_size", base.optim.batch_size)) for r in rows]
    risky = [(lam, batch) for lam, batch in risky if collapse_risk(lam[0], int(batch[0]))]
    if not risky:
        return None
    (lam, lam_note), (batch, batch_note) = risky[0]
    risk = collapse_risk(lam, int(batch))
    assert risk is not None  # the same (λ, batch) as risky[0]
    if lam > 0:
        risk = f"λ {lam_note}{lam:g} at batch {batch_note}{int(batch)} lies in {risk.split(' lies in ', 1)[1]}"
    return f"warning: {len(risky)} of {len(rows)} trials may collapse: {risk}; `prune_collapsed: 2` stops them early"


def _local_resources() -> tuple[int, int]:
    """(CPUs, GPUs) of this machine; no Ray is started for a dry run."""
    gpus = 0
    if os.environ.get("CUDA_VISIBLE_DEVICES") != "":
        import torch

        gpus = torch.cuda.device_count()
    return os.cpu_count() or 1, gpus
