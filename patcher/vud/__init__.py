"""The `.vud` delta format and the files that travel with it."""

from .delta import Delta, DeltaEntry, projection_entry, read_delta, write_delta

__all__ = ["Delta", "DeltaEntry", "projection_entry", "read_delta", "write_delta"]
