"""The ``lejepa`` command.

Sub-commands are plug-ins: each is a ``register(subparsers)`` function published under the
``lejepa.commands`` entry-point group (see pyproject.toml), so ``sweeps`` and ``analysis`` add
``sweep`` and ``select`` without the core importing them. Every user error is a
:class:`~lejepa.errors.LejepaError`, printed as one line with a non-zero exit and no traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import NoReturn

from lejepa.errors import ConfigError, LejepaError, first_line, out_of_memory
from lejepa.serve import register_server, register_ui
from lejepa.sync import register_sync


def split_config_args(items: list[str]) -> tuple[str | None, list[str]]:
    """Positional arguments → (config file or None, ``key=value`` overrides)."""
    paths = [i for i in items if "=" not in i]
    overrides = [i for i in items if "=" in i]
    for item in paths:
        if Path(item).suffix.lower() not in (".yaml", ".yml") and not Path(item).exists():
            raise ConfigError(f"{item!r} is neither a config file (.yaml) nor a key=value override (e.g. loss.lam=0.02)")
    if len(paths) > 1:
        raise ConfigError(f"expected one config file and key=value overrides, got several files: {paths}")
    return (paths[0] if paths else None), overrides


# --------------------------------------------------------------------------- train
def _cmd_train(args: argparse.Namespace) -> int:
    from lejepa.config import CONFIG_FILE, load_config  # torch loads after the config is known to be valid

    config_path, overrides = split_config_args(args.items)
    run_dir = resume = None
    if args.resume:
        run_dir = resume = Path(args.resume).expanduser().resolve()
        if not run_dir.is_dir():
            raise ConfigError(f"--resume {args.resume}: no such run folder")
        if run_dir.parent.name == "checkpoints" and (run_dir.parent.parent / CONFIG_FILE).is_file():
            # one checkpoint of a run: continue that run (its folder, config, MLflow run) from it
            run_dir = run_dir.parent.parent
            print(f"lejepa: resuming run {run_dir} from its checkpoint {resume.name}", file=sys.stderr)
        if config_path is None and (run_dir / CONFIG_FILE).is_file():
            config_path = str(run_dir / CONFIG_FILE)
    cfg = load_config(config_path, overrides)
    if args.no_tracking:
        cfg.tracking.enabled = False
    uri = _train_preflight(cfg, run_dir, args.tracking_uri)
    from lejepa.callbacks import ConsoleProgress
    from lejepa.health import collapse_risk
    from lejepa.trainer import Trainer

    risk = collapse_risk(cfg.loss.lam, cfg.optim.batch_size)
    if risk is not None:
        print(f"lejepa: warning: {risk}", file=sys.stderr)
    callbacks = [] if args.quiet else [ConsoleProgress()]
    trainer = Trainer(cfg, callbacks=callbacks, run_dir=run_dir, resume=resume)
    if uri is not None and trainer.rt.is_main:
        from lejepa.tracking import MLflowCallback

        experiment = args.experiment or cfg.tracking.experiment
        trainer.add_callback(
            MLflowCallback(uri, experiment=experiment, flush_every=cfg.tracking.flush_every, final_wait=cfg.tracking.final_wait_s)
        )
    metrics = trainer.fit()
    if trainer.rt.is_main and args.quiet:
        print(" ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return 0


def _train_preflight(cfg, run_dir: Path | None, tracking_uri: str | None) -> str | None:
    """Before any data is loaded or anything written: the run folder can be written, the tracking
    store answers, the architecture exists (timm's registry snapshot), the dataset's files are there
    (last: it imports torch, 2 CPU-seconds; the trainer then imports timm, torchvision and
    scikit-learn, 5 more, so that a bad config is refused before them). Returns the tracking URI
    (None without tracking)."""
    from lejepa.preflight import check_tracking_uri, check_writable

    check_writable(run_dir or Path(cfg.train.out_dir), "run folder" if run_dir else "train.out_dir")
    uri = None
    if cfg.tracking.enabled:
        from lejepa.record import default_tracking_uri

        uri = tracking_uri or cfg.tracking.uri or default_tracking_uri(cfg.train.out_dir)
        check_tracking_uri(uri)
    from lejepa.catalog import check_arch_name

    check_arch_name(cfg.model.arch)
    from lejepa.data import check_data

    check_data(cfg.data)
    return uri


def _register_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train one LeJEPA model",
        description="Train one LeJEPA model. CONFIG is a YAML file; key=value pairs override "
        "fields by dotted path (e.g. loss.lam=0.02 model.arch=vit_tiny_patch16_224).",
    )
    p.add_argument("items", nargs="*", metavar="CONFIG|key=value")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest valid checkpoint")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or <out_dir>/mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment name (default: tracking.experiment)")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("--quiet", action="store_true", help="no progress lines; print the final metrics only")
    p.set_defaults(func=_cmd_train)


# --------------------------------------------------------------------------- archs
def _cmd_archs(args: argparse.Namespace) -> int:
    from lejepa.catalog import format_table, query

    entries = query(
        family=args.family,
        max_params=args.max_params,
        min_params=args.min_params,
        pattern=args.pattern,
        include_gpu_scale=args.all,
        runnable_only=not args.all,
    )
    print(format_table(entries))
    return 0


def _register_archs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "archs",
        help="list the architecture catalog",
        description="List catalog architectures, filtered by family, parameter budget and name.",
    )
    p.add_argument("--family", action="append", help="family name (repeatable), e.g. vit, resnet, convnext")
    p.add_argument("--max-params", help="parameter budget, e.g. 20M")
    p.add_argument("--min-params", help="lower parameter bound, e.g. 1M")
    p.add_argument("--pattern", help="glob on the name, e.g. 'resnet*'")
    p.add_argument("--all", action="store_true", help="include GPU-scale and not-runnable-small entries")
    p.set_defaults(func=_cmd_archs)


# --------------------------------------------------------------------------- main
CORE_COMMANDS = (_register_train, _register_archs, register_ui, register_server, register_sync)


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors in one line (``error: ...``, exit 2) like every other user error;
    sub-command parsers inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lejepa", description="LeJEPA training, sweeps and label-free selection.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in CORE_COMMANDS:
        register(sub)
    for ep in sorted(entry_points(group="lejepa.commands"), key=lambda e: e.name):
        try:
            _check_not_shadowed(ep.module.partition(".")[0])
            ep.load()(sub)
        except Exception as exc:  # one broken plug-in must not take the other commands down
            _unavailable(sub, ep.name, exc)
    return parser


class ShadowedPackage(ImportError):
    """A plug-in's package name resolves to someone else's file or package."""


def _check_not_shadowed(top: str) -> None:
    """Raise if the top-level package ``top`` (``sweeps``, ``analysis``: installed beside ``lejepa``)
    would be imported from somewhere else: a user's ``analysis.py`` in the working folder (first
    on ``sys.path`` under ``python -m``) or another distribution's package of that name."""
    ours = Path(__file__).resolve().parents[1] / top
    spec = importlib.util.find_spec(top) if top not in sys.modules else sys.modules[top].__spec__
    origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
    if origin is not None and origin.parent != ours:
        raise ShadowedPackage(
            f"'{top}' resolves to {origin}, not to this installation's {ours}: a file or package of "
            f"that name shadows it; rename it or run lejepa from another folder"
        )


def _unavailable(sub: argparse._SubParsersAction, name: str, exc: Exception) -> None:
    """Register ``name`` as a command that reports, in one line, why its plug-in could not be loaded."""
    reason = f"{type(exc).__name__}: {first_line(exc, '')}".rstrip(": ")

    def fail(_args: argparse.Namespace) -> int:
        fix = "" if isinstance(exc, ShadowedPackage) else "; reinstall with `pip install -e .`"
        raise LejepaError(f"the '{name}' command is unavailable: its plug-in failed to load ({reason}){fix}")

    if name in sub.choices:  # it registered itself before failing
        sub.choices[name].set_defaults(func=fail)
        return
    # no option prefix: whatever follows the name is taken as-is, so the reason is always what is shown
    parser = sub.add_parser(name, help=f"unavailable ({reason})", add_help=False, prefix_chars="\x00")
    parser.add_argument("rest", nargs="*")
    parser.set_defaults(func=fail)


def _stop_on_sigterm_as_on_sigint() -> None:
    """A scheduler's preemption (SIGTERM: SLURM, Kubernetes, ``kill``) stops a command as Ctrl-C
    does: the signal is re-raised as SIGINT, so training ends between steps with its checkpoints
    consistent and its MLflow run KILLED, and a sweep stops through Ray Tune's own SIGINT handler;
    ``--resume`` continues both. Only the first SIGTERM is passed on: a scheduler may send it twice
    (SLURM signals both a batch script, which forwards it, and its children), and a second SIGINT
    would make Ray Tune stop without saving; a forced stop is SIGKILL's job. A command started as a
    script's background job (``lejepa train … &``, ``nohup``) inherits SIGINT ignored: there the
    SIGTERM raises KeyboardInterrupt itself, as Python's own SIGINT handler would."""
    passed: list[int] = []

    def as_sigint(signum, frame) -> None:
        if not passed:
            passed.append(signum)
            if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGINT)

    signal.signal(signal.SIGTERM, as_sigint)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a sub-command; user errors → one line on stderr and their exit code."""
    _stop_on_sigterm_as_on_sigint()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that went away fails here, not in the interpreter's exit
        return code
    except BrokenPipeError:  # `lejepa runs list | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a writer stopped by a closed pipe
    except LejepaError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as exc:
        message = out_of_memory(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
