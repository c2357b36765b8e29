"""Luigi tasks for the scientist's checks on a training set: cross-validation and the choice of
the regularisation strength.

``CrossValidate``         k-fold cross-validation of the job's model (labels, order, Lambda) on
                          its training set; one ``validation_run`` row and a one-to-one PNG.
``ChooseRegularization``  a grid of Lambda values scored on held-out stars; one
                          ``validation_run`` row with the chosen Lambda and ``at_grid_edge``.

Thin, like the other tasks: the work is in :mod:`astra_cannon.workflow`. Completion is a
``done`` task_run row, written in the same transaction as the result row. Neither task needs a
trained model (each trains its own fold/grid models), so neither requires ``TrainModel``.
"""

from __future__ import annotations

import luigi

from astra_cannon import workflow

from .cannon import NAMESPACE, TrainingSetFile, _ModelParameters, task_done_in_database

__all__ = ["CrossValidate", "ChooseRegularization"]


class LambdaGridParameter(luigi.ListParameter):
    """A list of Lambda values, normalised to sorted distinct floats (order does not matter)."""

    def normalize(self, x):
        return super().normalize(sorted({float(v) for v in x}))


class _ValidationTask(_ModelParameters, luigi.Task):
    task_namespace = NAMESPACE
    seed = luigi.IntParameter(default=0, description="random seed of the split into folds / validation stars")
    plot_dir = luigi.Parameter(default="", significant=False, description="directory for figures")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_model_parameters()

    def requires(self):
        return TrainingSetFile(path=self.training_set)

    def complete(self):
        return task_done_in_database(self.task_id)


class CrossValidate(_ValidationTask):
    """K-fold cross-validation of one model identity; stores per-label bias and scatter."""

    n_folds = luigi.IntParameter(default=5, description="number of folds")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.n_folds < 2:
            raise ValueError(f"n_folds must be >= 2, got {self.n_folds}")

    def parameters(self) -> dict:
        return workflow.cross_validation_parameters(self.identity(), self.n_folds, self.seed)

    def run(self):
        def work(task_run):
            row, _ = workflow.run_cross_validation(training_set=self.training_set, identity=self.identity(),
                                                   n_folds=self.n_folds, seed=self.seed,
                                                   plot_dir=self.plot_dir or None, task_run=task_run,
                                                   report=self._reporter())
            return row

        self._run_recorded(work)


class ChooseRegularization(_ValidationTask):
    """Score a Lambda grid on held-out stars; stores the choice and whether it is at the edge."""

    # The job's own Lambda does not change the answer here.
    regularization = luigi.FloatParameter(default=0.0, significant=False,
                                          description="ignored: the grid is searched")
    grid = LambdaGridParameter(description="Lambda values, e.g. [0, 10, 100, 1000]")
    validation_fraction = luigi.FloatParameter(default=0.2, description="fraction of stars held out")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        values = [float(v) for v in self.grid]
        if len(set(values)) < 2 or any(not (v >= 0 and v != float("inf")) for v in values):
            raise ValueError(f"grid needs at least two distinct finite values >= 0, got {list(self.grid)}")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")

    def parameters(self) -> dict:
        return workflow.regularization_parameters(self.identity(), self.grid, self.validation_fraction, self.seed)

    def run(self):
        def work(task_run):
            row, _ = workflow.run_choose_regularization(training_set=self.training_set, identity=self.identity(),
                                                        grid=[float(v) for v in self.grid],
                                                        validation_fraction=self.validation_fraction,
                                                        seed=self.seed, task_run=task_run, report=self._reporter())
            return row

        self._run_recorded(work)
