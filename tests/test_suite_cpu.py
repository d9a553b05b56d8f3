"""benchmarks/suite_cpu.py: process-accounting records parsed, named and summed by kind."""

from __future__ import annotations

import sys
from datetime import datetime

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import suite_cpu  # noqa: E402

# three records as Debian's dump-acct prints them, padding shortened (utime, stime in ticks of 1/100 s)
DUMP = """\
ray::ImplicitFu |v3| 1305.00| 408.00| 1812.00| 0| 0|13266944.00| 0.00| 4721| 4436|S X| 0|__ |Tue Dec 8 01:36:53 2026
python3.11 |v3| 423.00| 88.00| 541.00| 0| 0| 55936.00| 0.00| 4003| 4002| | 0|__ |Tue Dec 8 01:31:50 2026
bash |v3| 0.00| 1.00| 2.00| 0| 0| 2920.00| 0.00| 4003| 1| | 0|__ |Tue Dec 8 01:40:00 2026
not a record
"""

WORKER = "/v/bin/python /v/lib/python3.11/site-packages/ray/_private/workers/default_worker.py --node-ip-address=10.0.0.1"


def test_records_are_parsed_into_seconds_of_cpu_and_start_times():
    procs = suite_cpu.parse_dump_acct(DUMP)
    assert [(p.pid, p.ppid, p.comm) for p in procs] == [
        (4721, 4436, "ray::ImplicitFu"),
        (4003, 4002, "python3.11"),
        (4003, 1, "bash"),
    ]
    assert [p.cpu_s for p in procs] == [17.13, 5.11, 0.01]
    assert procs[0].elapsed_s == 18.12
    assert procs[0].start == datetime(2026, 12, 8, 1, 36, 53).timestamp()


def test_a_reused_pid_takes_the_command_line_of_the_process_that_started_nearest():
    procs = suite_cpu.parse_dump_acct(DUMP)
    t = datetime(2026, 12, 8, 1, 31, 50).timestamp()
    seen = {
        4003: [(t + 0.3, "/v/bin/python -m lejepa train model.arch=resnet10t"), (t + 490.1, "bash -c true")],
        4721: [(t, WORKER)],
    }
    suite_cpu.name_processes(procs, seen)
    assert [p.kind for p in procs] == ["Ray worker processes (trials; idle prestarted ones)", "lejepa train", "other (bash)"]


def test_kinds_of_the_processes_a_test_run_starts():
    cases = {
        WORKER: "Ray worker processes (trials; idle prestarted ones)",
        "/v/ray/core/src/ray/gcs/gcs_server --log_dir=/t": "Ray daemons (GCS, raylet, dashboard agent, monitors)",
        "/v/bin/python -u -c import sys;exec(eval(sys.stdin.readline()))": "pytest-xdist workers (tests run in-process)",
        "/v/bin/python -m lejepa sweep spec.yaml --name c": "lejepa sweep",
        ".venv/bin/lejepa select quickstart --out runs/sel": "lejepa select",
        "/v/bin/python -m lejepa --help": "lejepa",
        "/v/bin/python /v/bin/mlflow server --backend-store-uri sqlite:////t/m.db": "MLflow servers",
        "/v/bin/python3.11 .venv/bin/pip install -e .[test]": "pip",
        "/v/bin/python /v/lib/site-packages/pip/__pip-runner__.py install": "pip",
        "/v/bin/python -m pytest -n 2": "pytest",
        "/v/bin/python benchmarks/gpu_check.py --quick": "other Python (gpu_check.py)",
        "python3 -c print(1)": "other Python (-c)",
    }
    for args, kind in cases.items():
        assert suite_cpu.kind_of("x", args) == kind, args
    assert suite_cpu.kind_of("postgres", "") == "PostgreSQL" and suite_cpu.kind_of("slurmd", "") == "SLURM"
    # named by what they run, not by a word in their arguments
    assert suite_cpu.kind_of("postgres", "postgres: lejepa mlflow_4488aa4f 127.0.0.1(49212) idle") == "PostgreSQL"
    cli = "/v/bin/python -c import sys; from lejepa.cli import main; rc = main(['train', '--tracking-uri', 'http://h:5/mlflow'])"
    assert suite_cpu.kind_of("python", cli) == "lejepa train"
    uvicorn = "/v/bin/python -m uvicorn --log-config /v/site-packages/mlflow/server/uvicorn.json mlflow.server:app"
    assert suite_cpu.kind_of("python", uvicorn) == "MLflow servers"
    assert suite_cpu.kind_of("python", "/v/bin/python -m lejepa train --tracking-uri sqlite:////t/mlflow.db") == "lejepa train"
    assert suite_cpu.kind_of("sort", "") == "other (sort)"


def test_the_table_sums_each_kind_and_its_share_of_the_whole():
    procs = [
        suite_cpu.Proc(i, 1, "c", cpu, 1.0, 0.0, kind=kind)
        for i, (cpu, kind) in enumerate([(30, "a"), (10, "a"), (50, "b"), (6, "c"), (4, "d")])
    ]
    lines = suite_cpu.table(procs, top=2).splitlines()
    assert lines[2:] == [
        "| b | 1 | 50 | 50.0 | 50% |",
        "| a | 2 | 40 | 20.0 | 40% |",
        "| 2 other kinds | 2 | 10 | | 10% |",
        "| **all** | 5 | 100 | | 100% |",
    ]


def test_no_command_is_one_error_line_and_writes_nothing(tmp_path, capsys):
    assert suite_cpu.main(["--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == "error: give the command to measure after --, e.g. -- bash .ci/run\n"
    assert not (tmp_path / "x").exists()
