"""`vpatch eval`: generate with the original and the patched model, judge, and compare.

Pieces: ``generators`` (model folder -> clips, any device and dtype), ``judges`` (clips -> verdicts
and features; ``JUDGES`` registry), ``prompts`` (prompt sets and safe twins), ``metrics`` (twin
fidelity, drift, shifts, texture), ``organism_judge`` (the organism world's analytic judge) and
``core`` (runs them: ``evaluate``)."""

from .core import EvalOptions, EvalReport, evaluate

__all__ = ["EvalOptions", "EvalReport", "evaluate"]
