"""Model wrappers and the tiny-model factory."""

from .base import NNsight
from .language import LanguageModel
from .tiny import make_tiny

__all__ = ["LanguageModel", "NNsight", "make_tiny"]
