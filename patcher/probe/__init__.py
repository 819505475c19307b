"""The probe: run a concept's prompt pairs through a model and turn the captured activations into a delta."""

from .core import ProbeOptions, ProbeReport, probe

__all__ = ["ProbeOptions", "ProbeReport", "probe"]
