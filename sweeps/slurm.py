"""A sweep as one SLURM batch job: ``lejepa sweep SPEC --slurm``.

The job follows Ray's documented pattern for SLURM: one task per node; the batch script (on the
first node) starts the Ray head there with ``srun ray start --head --block``, a Ray worker on each
other node, waits until every node has joined, runs the sweep driver against that cluster, and
stops its Ray at the end (its own ``srun`` steps; never ``ray stop``, which would stop other jobs' Ray
on a shared node). Ray's token authentication is on: a fresh token per job, in a file only the
user can read, beside the sweep on the shared storage (every node reads it through
``RAY_AUTH_TOKEN_PATH``). The same script resumes: if the sweep's folder exists when it starts, it
runs ``lejepa sweep --resume``, so re-submitting it (or ``lejepa sweep --resume NAME --slurm``, or
``lejepa sweep --resume NAME`` anywhere) finishes a cancelled or timed-out job's sweep. SLURM is
asked to send SIGTERM to the batch shell two minutes before the time limit (``--signal``); the
script passes it to the driver, which stops like Ctrl-C (state saved, runs marked KILLED).

Options come from the spec's ``slurm:`` section, then the command line (which wins).
"""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from lejepa.errors import ConfigError
from lejepa.record import SWEEP_FILE

SCRIPT_SUFFIX = ".sbatch"
"""The job script is written beside the sweep's folder: ``<storage>/<name>.sbatch``."""
TERM_BEFORE_LIMIT_S = 120
"""SIGTERM reaches the driver this long before the job's time limit, so it can save its state."""
JOIN_TIMEOUT_S = 300
"""How long the job waits for every node's Ray to join before it gives up."""


@dataclass
class SlurmJob:
    """What the job asks SLURM for, and how the sweep inside it is called."""

    name: str  # the sweep's name (its folder under storage)
    storage: Path  # absolute, shared by every node
    spec: Path | None  # absolute; None for a resume
    tracking_uri: str | None  # None for a resume (the sweep keeps its own)
    nodes: int = 1
    cpus_per_task: int | None = None
    gpus_per_node: int = 0
    time: str = "04:00:00"
    partition: str | None = None
    account: str | None = None
    sbatch: list[str] = field(default_factory=list)  # extra "#SBATCH" options, e.g. "--mem=64G"
    setup: list[str] = field(default_factory=list)  # shell lines run first, e.g. "module load cuda"
    workdir: Path = field(default_factory=Path.cwd)
    python: str = sys.executable

    @property
    def script_path(self) -> Path:
        return self.storage / f"{self.name}{SCRIPT_SUFFIX}"

    @property
    def output_pattern(self) -> Path:
        return self.storage / f"{self.name}.slurm-%j.out"


def sbatch_lines(job: SlurmJob) -> list[str]:
    """The ``#SBATCH`` header."""
    lines = [
        f"--job-name=lejepa-{job.name}",
        f"--nodes={job.nodes}",
        "--ntasks-per-node=1",
        f"--time={job.time}",
        f"--output={job.output_pattern}",
        f"--signal=B:TERM@{TERM_BEFORE_LIMIT_S}",
    ]
    if job.cpus_per_task:
        lines.append(f"--cpus-per-task={job.cpus_per_task}")
    if job.gpus_per_node:
        lines.append(f"--gpus-per-node={job.gpus_per_node}")
    if job.partition:
        lines.append(f"--partition={job.partition}")
    if job.account:
        lines.append(f"--account={job.account}")
    for extra in job.sbatch:
        extra = extra.strip()
        if extra.startswith("#SBATCH"):
            extra = extra[len("#SBATCH") :].strip()
        if not extra.startswith("-") or "\n" in extra:
            raise ConfigError(f"slurm.sbatch {extra!r}: give one sbatch option per entry, e.g. '--mem=64G'")
        lines.append(extra)
    return [f"#SBATCH {line}" for line in lines]


def render(job: SlurmJob) -> str:
    """The batch script (a ``bash`` script SLURM runs on the job's first node)."""
    q = shlex.quote
    lejepa = f"{q(job.python)} -m lejepa"
    ray = f"{q(job.python)} -m ray.scripts.scripts"
    folder = job.storage / job.name
    if job.spec is not None:
        new = f"{lejepa} sweep {q(str(job.spec))} --name {q(job.name)} --storage {q(str(job.storage))}"
        if job.tracking_uri:
            new += f" --tracking-uri {q(job.tracking_uri)}"
    else:
        new = f"echo 'lejepa: no sweep {job.name} in {job.storage} to resume' >&2; exit 2"
    resume = f"{lejepa} sweep --resume {q(job.name)} --storage {q(str(job.storage))}"
    cpus = '--num-cpus="${SLURM_CPUS_PER_TASK:-1}"'
    gpus = f"--num-gpus={job.gpus_per_node}"
    where = f"MLflow: {job.tracking_uri}" if job.tracking_uri else f"MLflow: as recorded in {folder / SWEEP_FILE}"
    setup = "\n".join(job.setup)
    return f"""#!/bin/bash
{chr(10).join(sbatch_lines(job))}
# Written by `lejepa sweep --slurm` on {datetime.now():%Y-%m-%d %H:%M}: the sweep {job.name}, a Ray
# cluster over this job's nodes (head on the first). Submitting this file again resumes the sweep.
set -uo pipefail
{setup}
cd {q(str(job.workdir))}
echo "lejepa: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST: sweep {job.name}"
echo "lejepa: sweep folder {folder} (Ray Tune state, trial run folders, checkpoints)"
echo "lejepa: {where}"

export RAY_AUTH_MODE=token  # every Ray process of the job authenticates with this job's token
export RAY_AUTH_TOKEN_PATH={q(str(job.storage))}/.{job.name}.ray-token-$SLURM_JOB_ID
(umask 077 && {q(job.python)} -c 'import secrets; print(secrets.token_urlsafe(32))' > "$RAY_AUTH_TOKEN_PATH")
trap 'rm -f "$RAY_AUTH_TOKEN_PATH"' EXIT  # however the job ends
export RAY_ADDRESS=  # the driver joins this job's cluster only
# scancel sends SIGTERM to every process of the job at once, Ray's GCS included. Without this and the
# driver's GCS reconnect timeout (set below), the job outlived its state by SLURM's KillWait: `ray start`
# tries to drain its node for up to 30 s (a Ray Serve feature) and the driver, its sweep state saved,
# waits up to 60 s on the dead GCS. The driver runs on the head's node, and this cluster has no GCS
# fault tolerance: a GCS gone for 10 s is gone for good.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0

nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
head_node=${{nodes[0]}}
head_ip=$(srun --nodes=1 --ntasks=1 -w "$head_node" {q(job.python)} -m sweeps.slurm ip)
port=$({q(job.python)} -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
address="$head_ip:$port"
echo "lejepa: Ray head on $head_node at $address, {job.nodes} node(s)"
steps=()
srun --nodes=1 --ntasks=1 -w "$head_node" {ray} start --head --block --node-ip-address="$head_ip" --port="$port" \\
    {cpus} {gpus} --include-dashboard=false --temp-dir=/tmp/ray-$SLURM_JOB_ID &
steps+=($!)
{q(job.python)} -m sweeps.slurm wait "$address" 1 {JOIN_TIMEOUT_S} || exit 3
for node in "${{nodes[@]:1}}"; do
  srun --nodes=1 --ntasks=1 -w "$node" {ray} start --block --address="$address" {cpus} {gpus} \\
      --temp-dir=/tmp/ray-$SLURM_JOB_ID &
  steps+=($!)
done
{q(job.python)} -m sweeps.slurm wait "$address" {job.nodes} {JOIN_TIMEOUT_S} || exit 3

# Each `ray start --block` stops its own node's processes on the SIGTERM its srun forwards. Not `ray stop`:
# that stops every Ray on the node, another job's too.
stop_ray() {{
  kill -TERM "${{steps[@]}}" 2>/dev/null
  wait "${{steps[@]}}" 2>/dev/null
  rm -f "$RAY_AUTH_TOKEN_PATH"
}}
export RAY_gcs_rpc_server_reconnect_timeout_s=10  # set after the Ray nodes started: the driver's only
if [ -d {q(str(folder))} ]; then
  {resume} --address "$address" &
else
  {new} --address "$address" &
fi
driver=$!
trap 'echo "lejepa: job stopping: the sweep saves its state (resume: sbatch {job.script_path})"; kill -TERM $driver' TERM INT
wait $driver
status=$?
if kill -0 $driver 2>/dev/null; then  # the trap interrupted the first wait
  wait $driver
  status=$?
fi
stop_ray
echo "lejepa: sweep driver exited $status; resume with: sbatch {job.script_path}"
exit $status
"""


def wait_for_nodes(address: str, count: int, timeout: float) -> None:
    """Wait until the Ray cluster at ``address`` has ``count`` live nodes (or raise after ``timeout`` s)."""
    import ray

    deadline = time.monotonic() + timeout
    while True:
        try:
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
            try:
                alive = sum(1 for n in ray.nodes() if n.get("Alive"))
            finally:
                ray.shutdown()
            if alive >= count:
                return
        except (ConnectionError, RuntimeError, ValueError):
            alive = 0
        if time.monotonic() > deadline:
            raise ConfigError(f"only {alive} of {count} Ray nodes joined {address} within {timeout:g} s")
        time.sleep(2)


def reachable_ip() -> str:
    """This node's address as other nodes reach it: the source address of its route out (no packet is
    sent), else its host name's address. Debian maps the host name to 127.0.1.1, so ``hostname
    --ip-address`` (Ray's SLURM recipe) can give an address no other node can reach."""
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.254.254.254", 1))  # UDP: chooses a route, sends nothing
            ip = probe.getsockname()[0]
        if not ip.startswith("127.") and ip != "0.0.0.0":
            return ip
    except OSError:
        pass
    return socket.gethostbyname(socket.gethostname())


def submit(job: SlurmJob) -> str:
    """Write the job's script beside the sweep and submit it with ``sbatch``; returns the job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ConfigError("--slurm needs SLURM's sbatch on PATH (run this on a login node of the cluster)")
    job.storage.mkdir(parents=True, exist_ok=True)
    job.script_path.write_text(render(job))
    done = subprocess.run([sbatch, "--parsable", str(job.script_path)], capture_output=True, text=True)
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise ConfigError(f"sbatch refused the job: {said[0] if said else f'exit {done.returncode}'}")
    return done.stdout.strip().split(";")[0]


def main(argv: list[str]) -> int:
    """The job script's helpers: ``python -m sweeps.slurm ip`` prints :func:`reachable_ip`;
    ``python -m sweeps.slurm wait ADDRESS COUNT TIMEOUT`` waits for the nodes to join."""
    if argv == ["ip"]:
        print(reachable_ip())
        return 0
    if len(argv) != 4 or argv[0] != "wait":
        print("usage: python -m sweeps.slurm ip | wait ADDRESS COUNT TIMEOUT", file=sys.stderr)
        return 2
    try:
        wait_for_nodes(argv[1], int(argv[2]), float(argv[3]))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
