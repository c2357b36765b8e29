"""Result flag bits for ``cannon_result.flags``.

Each bit has a stable value (never renumber: rows in databases depend on them) and a one-line
description. ``FAILURE_FLAGS`` are the bits that mean "no labels": such a row has NULL labels and
is selected by ``astra-cannon rerun-failed``. The other bits are warnings on a usable result.

Query a bit in SQL with ``flags & 4 != 0``.
"""

from __future__ import annotations

# value, name, description, is_failure
_BITS = (
    (1 << 0, "NO_INFORMATION", "no usable pixel (every ivar is zero, masked or non-finite)", True),
    (1 << 1, "FEW_PIXELS", "fewer usable pixels than labels + 1", True),
    (1 << 2, "BAD_INPUT_SHAPE", "flux/ivar pixel count or shape differs from the model's", True),
    (1 << 3, "BAD_WAVELENGTH_GRID", "the spectrum's wavelength grid differs from the model's", True),
    (1 << 4, "UNREADABLE_INPUT", "the input file is missing, not FITS, truncated or fails its checksum", True),
    (1 << 5, "OPTIMIZER_FAILED", "the optimiser did not converge (see ier and nfev)", False),
    (1 << 6, "OUTSIDE_TRAINING_HULL", "labels lie outside the training set's label distribution", False),
    (1 << 7, "NONFINITE_COVARIANCE", "the label covariance is singular or not finite", False),
    (1 << 8, "AT_INITIAL_GUESS", "the optimum equals its starting point", False),
    (1 << 9, "DUPLICATE_INPUT", "the same spectrum appeared more than once in a batch", False),
    (1 << 10, "LARGE_RCHI2", "reduced chi-squared above the configured threshold", False),
    (1 << 11, "UNNORMALISED_FLUX", "the median flux is far from 1: the spectrum does not look normalised", True),
    (1 << 12, "PROCESSING_ERROR", "an unexpected error while processing this spectrum (see reason)", True),
    (1 << 13, "MODEL_NOISE_DOMINATED", "the model's own noise dominates a label direction here (too few "
     "training stars near these labels): the fit is not corrected for it, and its expected bias is in "
     "the covariance", False),
)

BITS = {name: value for value, name, _, _ in _BITS}
DESCRIPTIONS = {name: text for _, name, text, _ in _BITS}
FAILURE_FLAGS = sum(value for value, _, _, failure in _BITS if failure)

NO_INFORMATION = BITS["NO_INFORMATION"]
FEW_PIXELS = BITS["FEW_PIXELS"]
BAD_INPUT_SHAPE = BITS["BAD_INPUT_SHAPE"]
BAD_WAVELENGTH_GRID = BITS["BAD_WAVELENGTH_GRID"]
UNREADABLE_INPUT = BITS["UNREADABLE_INPUT"]
OPTIMIZER_FAILED = BITS["OPTIMIZER_FAILED"]
OUTSIDE_TRAINING_HULL = BITS["OUTSIDE_TRAINING_HULL"]
NONFINITE_COVARIANCE = BITS["NONFINITE_COVARIANCE"]
AT_INITIAL_GUESS = BITS["AT_INITIAL_GUESS"]
DUPLICATE_INPUT = BITS["DUPLICATE_INPUT"]
LARGE_RCHI2 = BITS["LARGE_RCHI2"]
UNNORMALISED_FLUX = BITS["UNNORMALISED_FLUX"]
PROCESSING_ERROR = BITS["PROCESSING_ERROR"]
MODEL_NOISE_DOMINATED = BITS["MODEL_NOISE_DOMINATED"]


def decode(flags: int) -> list[str]:
    """Return the names of the bits set in ``flags``, lowest bit first."""
    return [name for value, name, _, _ in _BITS if int(flags) & value]


def is_failure(flags: int) -> bool:
    """True when ``flags`` carries a bit that means the row has no labels."""
    return bool(int(flags) & FAILURE_FLAGS)


def documentation() -> str:
    """A Markdown table of every bit, for the README and ``astra-cannon flags``."""
    lines = ["| bit | value | name | meaning | failure |", "|---|---|---|---|---|"]
    for value, name, text, failure in _BITS:
        lines.append(f"| {value.bit_length() - 1} | {value} | `{name}` | {text} | {'yes' if failure else 'no'} |")
    return "\n".join(lines)
