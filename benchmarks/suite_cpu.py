"""Where a command's CPU time goes, by kind of process: Ray's trial workers, the ``lejepa``
commands the tests start, the pytest workers themselves, MLflow servers, Ray's daemons…

Linux process accounting (acct(2); Debian's ``acct`` package gives ``accton`` and ``dump-acct``;
root only) writes one record per process at its exit: command name, parent, start, elapsed, and
user + system CPU time of all its threads, in ticks of 1/100 s. A sampler reads each new pid's
command line from /proc every 0.2 s to say what the process was; one that lived less than that
keeps its 15-character command name. Processes still running when the command ends are not
counted; accounting is machine-wide, so run it on an otherwise idle machine. Accounting is
switched off at the end (``accton off``), also if it was on before.

    sudo .venv/bin/python benchmarks/suite_cpu.py --out runs/suite_cpu -- bash .ci/run

prints the table (kind, processes, CPU s, CPU s per process, share) and writes
``processes.csv`` (one row per process) and ``kinds.md`` to ``--out``; exits with the command's status.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path

TICKS_PER_S = 100  # acct v3 records times in AHZ = 100 ticks per second

RAY_DAEMONS = ("gcs_server", "raylet", "dashboard", "log_monitor", "ray/autoscaler", "monitor.py", "runtime_env")
MLFLOW_SERVERS = ("mlflow", "gunicorn", "uvicorn", "huey_consumer", "huey_consumer.py")
BY_COMMAND_NAME = {"postgres": "PostgreSQL", "slurm": "SLURM", "munged": "SLURM", "chrom": "Chromium"}
CLI_IN_PYTHON_C = re.compile(r"lejepa\.cli import main.*?main\(\[\s*'(\w+)'")  # python -c "…; main(['sweep', …])"


@dataclass
class Proc:
    pid: int
    ppid: int
    comm: str
    cpu_s: float
    elapsed_s: float
    start: float  # seconds since the epoch, to the second
    args: str = ""
    kind: str = ""


def parse_dump_acct(text: str) -> list[Proc]:
    """``dump-acct`` lines (``comm|v3|utime|stime|etime|uid|gid|mem|io|pid|ppid|…|start``) as processes."""
    procs = []
    for line in text.splitlines():
        f = [x.strip() for x in line.split("|")]
        if len(f) < 12 or f[1] != "v3":
            continue
        start = datetime.strptime(f[-1], "%a %b %d %H:%M:%S %Y").timestamp()
        cpu = (float(f[2]) + float(f[3])) / TICKS_PER_S
        procs.append(Proc(int(f[9]), int(f[10]), f[0], cpu, float(f[4]) / TICKS_PER_S, start))
    return procs


def name_processes(procs: list[Proc], seen: dict[int, list[tuple[float, str]]]) -> None:
    """Give each process the command line sampled for its pid that started nearest its start (pids are reused)."""
    for p in procs:
        lines = seen.get(p.pid)
        if lines:
            p.args = min(lines, key=lambda s: abs(s[0] - p.start))[1]
        p.kind = kind_of(p.comm, p.args)


def program(words: list[str]) -> str:
    """What a command line runs: the module after ``-m``, ``-c``, or the script a Python interpreter
    is given; else the executable's name."""
    if not words:
        return ""
    if not Path(words[0]).name.startswith("python"):
        return Path(words[0]).name
    rest = words[1:]
    if "-m" in rest[:-1]:
        return rest[rest.index("-m") + 1]
    if "-c" in rest:
        return "-c"
    return Path(next((w for w in rest if not w.startswith("-")), "")).name


def kind_of(comm: str, args: str) -> str:
    """The kind of a process, from its name (``comm``) and its command line (``args``)."""
    for prefix, kind in BY_COMMAND_NAME.items():
        if comm.startswith(prefix):
            return kind
    a, words = args.lower(), args.split()
    prog = program(words)
    if prog in ("default_worker.py", "setup_worker.py"):
        return "Ray worker processes (trials; idle prestarted ones)"
    if any(k in a for k in RAY_DAEMONS):
        return "Ray daemons (GCS, raylet, dashboard agent, monitors)"
    if "execnet" in a or "import sys;exec(eval(sys.stdin.readline()))" in a:
        return "pytest-xdist workers (tests run in-process)"
    if prog == "lejepa":
        after = words[next(i for i, w in enumerate(words) if Path(w).name == "lejepa") + 1 :]
        return f"lejepa {after[0]}" if after and not after[0].startswith("-") else "lejepa"
    cli = CLI_IN_PYTHON_C.search(args) if prog == "-c" else None
    if cli:
        return f"lejepa {cli.group(1)}"
    if prog in MLFLOW_SERVERS:
        return "MLflow servers"
    for tool in ("pytest", "pip", "mypy", "ruff"):
        if prog == tool or any(f"/{tool}/" in w for w in words[:2]):
            return tool
    for prefix, kind in BY_COMMAND_NAME.items():
        if f"/{prefix}" in a:
            return kind
    if prog and Path(words[0]).name.startswith("python"):
        return f"other Python ({prog})"
    return f"other ({comm})"


def table(procs: list[Proc], top: int = 25) -> str:
    """Markdown: CPU seconds per kind of process, the largest first."""
    total = sum(p.cpu_s for p in procs) or 1.0
    kinds: dict[str, list[Proc]] = {}
    for p in procs:
        kinds.setdefault(p.kind, []).append(p)
    rows = sorted(((sum(p.cpu_s for p in ps), kind, len(ps)) for kind, ps in kinds.items()), reverse=True)
    out = ["| kind | processes | CPU s | CPU s each | share |", "|---|---:|---:|---:|---:|"]
    for cpu, kind, n in rows[:top]:
        out.append(f"| {kind} | {n} | {cpu:.0f} | {cpu / n:.1f} | {cpu / total:.0%} |")
    rest = rows[top:]
    if rest:
        cpu = sum(r[0] for r in rest)
        out.append(f"| {len(rest)} other kinds | {sum(r[2] for r in rest)} | {cpu:.0f} | | {cpu / total:.0%} |")
    out.append(f"| **all** | {len(procs)} | {total:.0f} | | 100% |")
    return "\n".join(out)


class _Sampler(threading.Thread):
    """Every ``interval`` s, the start and command line of each process not seen before
    (pid -> [(start, args)], start in seconds since the epoch)."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.interval, self.seen, self.stop = interval, {}, threading.Event()
        self._known: set[tuple[int, int]] = set()
        with open("/proc/stat") as f:
            self._boot = next(float(line.split()[1]) for line in f if line.startswith("btime "))
        self._hz = os.sysconf("SC_CLK_TCK")

    def run(self) -> None:
        while not self.stop.is_set():
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    self._sample(int(entry))
            self.stop.wait(self.interval)

    def _sample(self, pid: int) -> None:
        try:
            with open(f"/proc/{pid}/stat") as f:
                ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start, ticks since boot
            if (pid, ticks) in self._known:
                return
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError, ValueError):
            return
        if args:
            self._known.add((pid, ticks))
            self.seen.setdefault(pid, []).append((self._boot + ticks / self._hz, args[:500]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="folder for processes.csv and kinds.md")
    p.add_argument("--top", type=int, default=25, help="kinds listed before the rest are summed (25)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("error: give the command to measure after --, e.g. -- bash .ci/run", file=sys.stderr)
        return 2
    missing = [tool for tool in ("accton", "dump-acct") if shutil.which(tool) is None]
    if missing:
        print(f"error: {' and '.join(missing)} not found: install Debian's acct package", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("error: process accounting needs root: run it with sudo", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="suite-cpu-") as tmp:
        pacct = Path(tmp) / "pacct"
        pacct.touch()
        on = subprocess.run(["accton", str(pacct)], capture_output=True, text=True)
        if on.returncode != 0:
            print(f"error: accton could not switch accounting on: {on.stderr.strip()}", file=sys.stderr)
            return 2
        sampler = _Sampler()
        sampler.start()
        try:
            status = subprocess.run(command).returncode
        finally:
            subprocess.run(["accton", "off"], capture_output=True)
            sampler.stop.set()
            sampler.join()
        dump = subprocess.run(["dump-acct", str(pacct)], capture_output=True, text=True, check=True).stdout
    procs = parse_dump_acct(dump)
    name_processes(procs, sampler.seen)
    text = table(procs, args.top)
    own = resource.getrusage(resource.RUSAGE_SELF)
    text += f"\n\nNot in the table: this script's sampler, {own.ru_utime + own.ru_stime:.0f} CPU s."
    print(f"\nCPU time of `{' '.join(command)}` (exit {status}), by kind of process:\n\n{text}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kinds.md").write_text(text + "\n")
        with open(args.out / "processes.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[field.name for field in fields(Proc)])
            writer.writeheader()
            writer.writerows(asdict(p) for p in sorted(procs, key=lambda p: p.start))
    return status


if __name__ == "__main__":
    sys.exit(main())
