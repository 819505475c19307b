"""The streaming merge: plan a delta against a checkpoint, then apply or revert it."""

from .engine import Report, apply_delta, plan_apply, revert_delta

__all__ = ["Report", "apply_delta", "plan_apply", "revert_delta"]
