"""Luigi layer of astra_cannon (installed as ``astra_cannon.tasks``).

Usage with Luigi's own command line::

    luigi --module astra_cannon.tasks astra_cannon.InferAll --training-set ... --local-scheduler

or, simpler, the ``astra-cannon`` command (:mod:`astra_cannon.cli`), which builds the tasks
from a :class:`astra_cannon.pipeline.Job`. Importing this package installs the shipped Luigi
defaults (``luigi.cfg`` here) below any user configuration.
"""

from .defaults import DEFAULTS_PATH, install_luigi_defaults, read_defaults
from .cannon import (
    InferAll,
    InferChunk,
    LabelNamesParameter,
    TrainingSetFile,
    TrainModel,
    clear_completion_cache,
)
from .validation import ChooseRegularization, CrossValidate
from .runner import build, exit_code, job_tasks

install_luigi_defaults()

__all__ = [
    "TrainingSetFile",
    "TrainModel",
    "InferChunk",
    "InferAll",
    "CrossValidate",
    "ChooseRegularization",
    "LabelNamesParameter",
    "clear_completion_cache",
    "install_luigi_defaults",
    "read_defaults",
    "DEFAULTS_PATH",
    "build",
    "exit_code",
    "job_tasks",
]
