"""A run's config as typed objects, built once at the top of ``run``: the layers below
(the dry run's checks, the pipeline) receive these, never ``cfg``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from bnn_bench.config import build
from bnn_bench.data.resolve import DatasetConfig
from bnn_bench.evaluation.settings import EvalSettings
from bnn_bench.likelihoods import Likelihood, task_of
from bnn_bench.methods.base import Method
from bnn_bench.reporting.outputs import config_choice
from bnn_bench.schema import Objective


@dataclass(frozen=True)
class Parts:
    """The typed objects of one run.

    Attributes:
      dataset: the dataset's typed config (``load()`` reads it, ``locate()`` finds it).
      module: the model's flax module, with the likelihood's outputs for the dataset's
        classes or targets.
      method: the inference method.
      settings: the evaluation settings.
      objective: what a Hydra sweeper optimises.
      likelihood: the likelihood of the targets.
      model_name: the model's config choice (``reporting.outputs.config_choice``): Hydra's,
        else the shipped YAML it equals, else its module.
    """

    dataset: DatasetConfig
    module: Any
    method: Method
    settings: EvalSettings
    objective: Objective
    likelihood: Likelihood
    model_name: str

    @classmethod
    def of(cls, cfg: DictConfig, out_dir: Path | None = None) -> Parts:
        """Builds every part of a composed (and validated) ``cfg``; ``out_dir``: the run
        folder whose ``.hydra/`` names the model's choice (None: the dry run).

        Raises:
          UserError: a constructor refused a value (naming its config node), or the
            likelihood is not for the dataset's task (naming the ``likelihood=`` to choose).
        """
        dataset = build(cfg.dataset, "dataset")
        likelihood = build(cfg.likelihood, "likelihood")
        likelihood.check_task(task_of(dataset.spec))
        units = likelihood.outputs(dataset.spec.num_classes)
        module = build(cfg.model, "model", num_classes=units)
        return cls(
            dataset,
            module,
            build(cfg.method, "method"),
            build(cfg.eval, "eval"),
            Objective(str(cfg.objective.metric), str(cfg.objective.direction)),
            likelihood,
            config_choice(out_dir, "model", cfg.model),
        )
