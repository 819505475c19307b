"""`vpatch eval`: generate with the original and the patched model, judge, and compare."""

from .core import EvalOptions, EvalReport, evaluate

__all__ = ["EvalOptions", "EvalReport", "evaluate"]
