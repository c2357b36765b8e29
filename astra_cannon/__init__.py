"""astra_cannon: The Cannon, vectorised, with an Astra-style Luigi/peewee pipeline."""

__version__ = "0.1.0"

from .vectorizer import PolynomialVectorizer  # noqa: E402
from .model import CannonModel, ModelFileError  # noqa: E402

__all__ = ["__version__", "PolynomialVectorizer", "CannonModel", "ModelFileError"]
