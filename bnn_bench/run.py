"""The pipeline, in order: config -> data -> model -> method.fit -> members -> metrics -> files.

``run(cfg, out_dir)`` is the one entry point behind the CLI and the tests.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
from omegaconf import DictConfig

from bnn_bench import checkpoint, dry_run, run_folder
from bnn_bench.config import build, to_dict, validate, without_unread_trainer
from bnn_bench.evaluation import EvalInputs, diagnostics, fidelity, tables
from bnn_bench.evaluation.complexity import flops_per_input
from bnn_bench.evaluation.sets import evaluation_sets, labels_of
from bnn_bench.evaluation.tasks import task_of
from bnn_bench.methods.base import RunContext
from bnn_bench.models import build_model, num_params
from bnn_bench.parts import Parts
from bnn_bench.reporting import cost
from bnn_bench.reporting.loggers import HistoryLogger, Loggers, RunInfo
from bnn_bench.reporting.outputs import read_metrics, write_metrics

log = logging.getLogger(__name__)


def run(cfg: DictConfig, out_dir: str | Path) -> dict[str, float]:
    """Runs one experiment and writes its run folder; returns the flat metrics."""
    out_dir = Path(out_dir)
    cfg = without_unread_trainer(cfg)
    if cfg.get("dry_run"):  # the run's checks without data, then the plan; nothing is written
        validate(cfg)
        return dry_run.plan(Parts.of(cfg))
    config, record = to_dict(cfg), run_folder.RunRecord(out_dir)
    # new | resume | skip (finished here already). Before anything is written: a folder
    # holding another job's finished results, or an unreadable run.json, stays untouched
    todo = record.decide(config, cfg.resume)
    if todo != "skip":  # a finished job keeps its .hydra/
        run_folder.write_hydra(cfg, out_dir)
    validate(cfg)  # a misspelt key stops here, before any data is read
    if todo == "skip":
        log.info(
            "%s holds this job's metrics.json already; skipping (resume=false reruns it).", out_dir
        )
        return read_metrics(out_dir)
    parts = Parts.of(cfg, out_dir)  # cfg becomes typed objects once; the layers below get these
    dry_run.check(parts)  # what a dry run refuses, by the same code, before anything is cleared
    record.start(config, todo)  # a new run clears the folder's old results and checkpoints
    with cost.Meter() as meter:  # gradient evaluations, samples, compile time, peak memory
        return _run(cfg, parts, out_dir, config, record, meter)


def _run(
    cfg: DictConfig,
    parts: Parts,
    out_dir: Path,
    config: dict,
    record: run_folder.RunRecord,
    meter: cost.Meter,
) -> dict[str, float]:
    k_fit, k_predict = jax.random.split(jax.random.key(cfg.seed))
    settings, method, module = parts.settings, parts.method, parts.module
    timings: dict[str, float] = {}
    tic = time.perf_counter()

    # --- data and model
    data = parts.dataset.load()
    model = build_model(
        module,
        data.spec,
        parts.model_name,
        settings.batch_size,
        parts.likelihood,
    )
    n_params = num_params(jax.eval_shape(model.init, jax.random.key(0))[0])
    log.info(
        "model %s: %s parameters, input %s; method %s; device %s",
        model.name,
        f"{n_params:,}",
        data.spec.input_shape,
        type(method).__name__,
        jax.devices()[0].platform,
    )
    task = task_of(data, settings)  # classification or regression: its summaries and metrics
    evalsets = evaluation_sets(data, settings)  # test, val, ood, shift/*: all known before fit
    prints = task.fingerprints(evalsets)  # an eval.reference must match them
    reference = task.reference(prints, evalsets)
    if note := fidelity.augmentation_note(data.spec.augment, settings.reference):
        log.warning("%s", note)
    inputs = EvalInputs(
        {name: split.x for name, split in evalsets.items()},
        keep=settings.keep_inputs,
        capacity=settings.keep_members,
        labels=labels_of(evalsets),  # the test labels feed a sampler's trace (test/rhat)
        summary=task.summary,
    )
    # history.jsonl always; a tracker if chosen (an unfinished W&B run is closed at exit)
    logger = Loggers(HistoryLogger(), build(cfg.logger, "logger"))
    record.set_logger_run_id(
        logger.start(out_dir, config, RunInfo.current(out_dir), run_id=record.logger_run_id)
    )
    timings["time/setup"] = time.perf_counter() - tic

    # --- inference
    tic = time.perf_counter()
    checkpoints = checkpoint.Session(record.root, cfg.checkpoint.every, resume=cfg.resume)
    with checkpoints:  # SIGTERM: save at the next chunk end, then stop
        posterior = method.fit(
            k_fit, model, data, RunContext(inputs, logger.log, checkpoints, meter)
        )
    timings["time/fit"] = time.perf_counter() - tic
    method.save(out_dir, posterior)  # MAP's parameters (for init_from), SG-MCMC samples, ...
    tic = time.perf_counter()
    summaries = method.predict(k_predict, posterior, inputs)
    jax.block_until_ready(summaries)
    timings["time/predict"] = time.perf_counter() - tic

    # --- evaluation
    tic = time.perf_counter()
    metrics: dict[str, float] = {
        "model/params": float(n_params),
        "model/flops": flops_per_input(model),
        "data/augment": float(data.spec.augment),  # crops and flips: another likelihood
    }
    set_metrics, curves = task.evaluate(summaries, evalsets)
    metrics.update(set_metrics)
    task.write_predictive(out_dir, summaries, prints)  # predictive/*.npy before metrics.json
    diagnostics.write_traces(out_dir, summaries)  # a sampler's traces.npy, for test/rhat, test/ess
    metrics.update(task.fidelity(reference, summaries))
    metrics.update(method.report(k_predict, posterior, evalsets, settings.num_bins))
    timings["time/evaluate"] = time.perf_counter() - tic
    metrics.update(timings)
    metrics.update({k: float(v) for k, v in posterior.info.items()})  # the method's own numbers
    meter.counts["attempts"] = record.saved["attempts"]  # > 1: time/* covers the last one only
    metrics.update(meter.metrics())

    # --- reporting: plots, logger, and metrics.json last
    title = f"{type(method).__name__} · {model.name} · {data.spec.name}"
    if settings.plots:
        for name, png in task.plots(
            out_dir / run_folder.PLOTS, title, summaries, evalsets, metrics, curves, reference
        ).items():
            logger.image(name, png)
    logger.summary(metrics)
    logger.curves(curves)
    path = write_metrics(out_dir, metrics, curves)
    logger.finish()
    log.info("wrote %s", path)
    log.info("results (%s)\n%s", title, tables.metrics_table(metrics))
    return metrics
