"""One exception family for everything a user can get wrong.

Every message says what is wrong *and* how to fix it. The CLI prints the message on one line and
exits 2; anything that is not a ``VpatchError`` is a bug in vpatch and keeps its traceback.
"""

from __future__ import annotations


class VpatchError(Exception):
    """Base of all user-facing errors."""


class FormatError(VpatchError):
    """A file is not valid safetensors (bad header, offsets, sizes, JSON...)."""


class PickleRefused(VpatchError):
    """A pickle checkpoint was given; vpatch never unpickles silently."""


class DeltaError(VpatchError):
    """A ``.vud`` file is valid safetensors but not a valid delta."""


class IntegrityError(DeltaError):
    """A ``.vud`` file's factor hash does not match its bytes."""


class CompatibilityError(VpatchError):
    """The delta does not fit the checkpoint (missing keys, wrong shapes, ambiguous component)."""


class DtypeError(VpatchError):
    """A targeted tensor has a dtype vpatch will not edit."""


class NumericError(VpatchError):
    """An edit produced NaN or Inf."""


class AlreadyApplied(VpatchError):
    """The checkpoint's provenance says this delta is already in it."""


class OutputError(VpatchError):
    """The output cannot be written (missing folder, would overwrite the input, disk full...)."""


class RevertError(VpatchError):
    """A revert could not restore the original bytes."""


class RecipeError(VpatchError):
    """A model-family or concept recipe (TOML) is malformed; the message names the field."""


class ProbeError(VpatchError):
    """The probe cannot run on this model (missing component, nothing matched, degenerate activations...)."""


class ActivationsError(VpatchError):
    """A saved activations file (``probe --save-activations``) is not valid, or not one."""
