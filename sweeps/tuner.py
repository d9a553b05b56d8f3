"""The Ray Tune ``Tuner`` of a sweep: the trainable (:func:`~sweeps.trainable.run_trial` with the
sweep's shared context and per-architecture resources), the search algorithm and scheduler, the
run config; new, or restored from the sweep's folder."""

from __future__ import annotations

import math
from typing import Any

from ray import tune

from lejepa.record import EPOCH
from sweeps.layout import Sweep
from sweeps.progress import ProgressTable
from sweeps.spec import SweepSpec
from sweeps.trainable import TrialContext, run_trial


def make_trainable(spec: SweepSpec, sweep: Sweep) -> Any:
    """:func:`~sweeps.trainable.run_trial` bound to the sweep's :class:`~sweeps.trainable.TrialContext`,
    each trial asking for its architecture's resources."""
    ctx = TrialContext(
        sweep=sweep.name,
        base=spec.base,
        trials_dir=str(sweep.trials_dir),
        train_storage=str(sweep.train_storage),
        tracking_uri=sweep.tracking_uri,
        experiment=sweep.experiment,
        parent_run_id=sweep.parent_run_id,
        score_alpha=spec.score_alpha,
        arch_resources=spec.arch_resources,
        arch_params=spec.arch_params,
        worst={
            m: math.inf if mode == "min" else -math.inf
            for m, mode in ((spec.scheduler.metric, spec.scheduler.mode), (spec.search.metric, spec.search.mode))
        },
    )
    # Ray's annotation omits a callable returning a resource dict, which with_resources accepts
    return tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), spec.trial_resources)  # type: ignore[arg-type]


def new_tuner(spec: SweepSpec, sweep: Sweep) -> tune.Tuner:
    """A Tuner starting the sweep in its folder (``<storage>/<name>``)."""
    search_alg = scheduler = None
    if spec.search.algo == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(metric=spec.search.metric, mode=spec.search.mode, seed=spec.search.seed)
    if spec.scheduler.type == "asha":
        from ray.tune.schedulers import ASHAScheduler

        # time is the trial's epoch; a trial reaching max_t is not stopped but finishes and evaluates
        scheduler = ASHAScheduler(
            time_attr=EPOCH,
            metric=spec.scheduler.metric,
            mode=spec.scheduler.mode,
            max_t=spec.epochs,
            grace_period=spec.scheduler.grace_period,
            reduction_factor=spec.scheduler.reduction_factor,
            stop_last_trials=False,
        )
    return tune.Tuner(
        make_trainable(spec, sweep),
        param_space=spec.param_space(),
        tune_config=tune.TuneConfig(
            num_samples=spec.num_samples,
            search_alg=search_alg,
            scheduler=scheduler,
            max_concurrent_trials=spec.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=sweep.name,
            storage_path=str(sweep.path.parent),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[ProgressTable(spec.keys())],
        ),
    )


def restore_tuner(spec: SweepSpec, sweep: Sweep) -> tune.Tuner:
    """The sweep's Tuner restored from its folder: finished trials stay, errored ones resume."""
    return tune.Tuner.restore(str(sweep.path), make_trainable(spec, sweep), resume_errored=True)
