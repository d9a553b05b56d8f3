"""The sweep's Ray: joined or started for the sweep and left afterwards, checked to grant every
trial's resources, and probed from every node for the shared sweep storage."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from lejepa.errors import ConfigError, LejepaError, first_line
from lejepa.record import sqlite_path
from sweeps.spec import SweepSpec


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Use the Ray already initialised in this process, else join ``address`` / ``RAY_ADDRESS``, else start a
    local Ray; disconnect (or shut down) what was started here."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise LejepaError(
                f"cannot join the Ray cluster at {address}: {first_line(exc)} (start one with `ray start --head`)"
            ) from None
    else:  # a fresh local instance, never a cluster that happens to run on this machine
        ray.init(address="local", include_dashboard=False)
    if threading.current_thread() is threading.main_thread():
        from lejepa.cli import _stop_on_sigterm_as_on_sigint

        _stop_on_sigterm_as_on_sigint()  # Ray's driver replaced the CLI's SIGTERM handler when it connected
    try:
        yield
    finally:
        ray.shutdown()


def check_grantable(spec: SweepSpec, address: str | None = None) -> None:
    """Refuse, before anything is created, a sweep whose trials need more CPUs or GPUs than the
    whole Ray cluster has (Ray would keep them pending forever, its autoscaler printing that no
    node type can fulfil the request). Before a local Ray starts, the machine's own CPUs and
    CUDA devices are counted (so the refusal comes before Ray's start-up lines); in a running or
    joined Ray, its cluster resources."""
    import ray

    if ray.is_initialized():
        total = ray.cluster_resources()
        have = {"CPU": total.get("CPU", 0.0), "GPU": total.get("GPU", 0.0)}
        where = "this machine" if len(ray.nodes()) <= 1 else "the Ray cluster"
    elif not (address or os.environ.get("RAY_ADDRESS")):
        import torch

        have = {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
        where = "this machine"
    else:
        return  # checked once joined
    for arch, res in sorted(spec.arch_resources.items()):
        for kind, need in zip(("CPU", "GPU"), res.total()):
            if need > have[kind] + 1e-9:
                raise ConfigError(
                    f"a {arch} trial needs {need:g} {kind}{'s' if need != 1 else ''} but {where} has "
                    f"{have[kind]:g}: lower resources.{'cpus' if kind == 'CPU' else 'gpus'}_per_trial "
                    f"(or workers_per_trial), or join a cluster that has them (--address)"
                )


def check_shared_storage(path: Path, tracking_uri: str) -> None:
    """On a multi-node cluster, check from every node that the sweep folder ``path`` (and a SQLite
    store) is visible; warn, never fail."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    marker = path / f".shared-check-{uuid.uuid4().hex[:8]}"
    marker.write_text("")
    paths = [str(marker)]
    db = sqlite_path(tracking_uri)
    if db is not None:
        paths.append(db)
    probe = ray.remote(num_cpus=0)(_visible)
    try:
        seen = ray.get(
            [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(paths) for n in nodes],
            timeout=120,
        )
    except Exception as exc:  # a failed check is reported, not fatal
        print(f"warning: could not check that every node sees {path}: {first_line(exc)}", file=sys.stderr)
        return
    finally:
        marker.unlink(missing_ok=True)
    blind = [n[:8] for n, ok in zip(nodes, seen) if not ok[0]]
    if blind:
        print(
            f"warning: {len(blind)} of {len(nodes)} Ray nodes ({', '.join(blind)}) cannot see the sweep storage "
            f"{path.parent}: trials there write run folders and checkpoints to their own disk, so retries "
            f"and --resume lose them. Pass --storage on a filesystem shared by all nodes (NFS, …).",
            file=sys.stderr,
        )
    if len(paths) > 1 and not all(ok[1] for ok in seen):
        print(
            f"warning: the MLflow SQLite store {paths[1]} is not visible on every node: trials there cannot log "
            f"to it. Run `mlflow server` and pass --tracking-uri http://HOST:PORT.",
            file=sys.stderr,
        )


def _visible(paths: list[str]) -> list[bool]:
    return [os.path.exists(p) for p in paths]
