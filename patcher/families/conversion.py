"""A family's weight conversion as data: key renames, row splits, folds and row permutations.

Some checkpoints (Open-Sora 2.0's single file) have no diffusers port of their own, but a diffusers
module runs their architecture once the weights are renamed and a few tensors rearranged. The
recipe's ``[convert]`` table declares that mapping; this module only interprets it:

- ``[[convert.keys]]``: a source-key regex and its target key template(s). One target is a rename;
  several targets split the tensor's rows in the given proportions (a fused ``qkv``); ``merge``
  folds the tensor into a target another rule already filled (``cat_in``: concatenated along the
  input dimension, ``add``: summed, in fp32).
- ``[[convert.tensors]]``: row permutations on converted keys (``interleave_halves``: inside each
  block of ``block`` rows, rows (i, i + block/2) become neighbours (2i, 2i+1), the rotate-half to
  interleaved RoPE layout; ``swap_halves``: the two row halves trade places).
- ``[convert.config]``: the module's constructor arguments, literal or read from the converted shapes
  (``shape:KEY:DIM``, ``count:REGEX`` distinct first groups, ``A / B``).

A source key that no rule claims is an error: a conversion never silently drops a weight.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..errors import ProbeError, RecipeError

MERGES = ("cat_in", "add")
TENSOR_OPS = ("interleave_halves", "swap_halves")
_REF = re.compile(r"^(shape:[^:\s]+:-?\d+|count:\S+)$")


@dataclass(frozen=True)
class KeyRule:
    source: re.Pattern
    targets: tuple[str, ...]  # templates; {1} is the source regex's first group
    split: tuple[int, ...] | None = None  # row proportions, one per target
    merge: str | None = None  # fold into a target another rule filled: cat_in | add

    def apply(self, key: str) -> list[str] | None:
        m = self.source.fullmatch(key)
        return None if m is None else [t.format(m.group(0), *m.groups()) for t in self.targets]


@dataclass(frozen=True)
class TensorRule:
    keys: re.Pattern  # converted keys
    op: str  # interleave_halves | swap_halves
    block: int | str | None = None  # interleave: rows per block, or a config name


@dataclass(frozen=True)
class Conversion:
    module: str  # "package:Class" of the module that runs the converted weights
    why: str
    config: dict
    keys: tuple[KeyRule, ...]
    tensors: tuple[TensorRule, ...]


# --------------------------------------------------------------------------- parsing


def parse_conversion(t, tables: Callable[[list, str], list]) -> Conversion:
    """``t``: the recipe's ``[convert]`` table (recipes._Table); ``tables`` checks a list of tables."""
    module = t.get("module", str)
    if ":" not in module:
        raise RecipeError(
            f"{t.where}: field 'module' must look like 'package:Class', e.g. 'diffusers:FluxTransformer2DModel'"
        )
    why = t.get("why", str)
    config = t.get("config", dict, {})
    for name, val in config.items():
        if isinstance(val, str) and not all(_REF.match(p.strip()) for p in val.split(" / ")):
            raise RecipeError(
                f"{t.where}.config: field '{name}' is {val!r}; a string value must be shape:KEY:DIM, "
                "count:REGEX or 'A / B' of those"
            )
    keys = []
    for rt in tables(t.get("keys", list), f"{t.where}.keys"):
        w = rt.where
        try:
            rx = re.compile(rt.get("from", str))
        except re.error as e:
            raise RecipeError(
                f"{w}: field 'from' is not a valid regular expression ({e})"
            ) from None
        to = rt.get("to", (str, list))
        targets = (to,) if isinstance(to, str) else tuple(to)
        if not targets or not all(isinstance(x, str) and x for x in targets):
            raise RecipeError(f"{w}: field 'to' must be a key template or a list of them")
        for x in targets:
            try:
                x.format(*(["x"] * (rx.groups + 1)))
            except (IndexError, KeyError, ValueError):
                raise RecipeError(
                    f"{w}: field 'to' may only use {{0}}..{{{rx.groups}}} (the regex has {rx.groups} group(s))"
                ) from None
        split = rt.get("split", list, None)
        if (len(targets) > 1) != (split is not None):
            raise RecipeError(
                f"{w}: several targets need 'split' (row proportions), one needs none"
            )
        if split is not None and (
            len(split) != len(targets)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in split)
        ):
            raise RecipeError(
                f"{w}: field 'split' must give one positive integer proportion per target"
            )
        merge = rt.get("merge", str, None, MERGES)
        if merge is not None and len(targets) > 1:
            raise RecipeError(f"{w}: field 'merge' needs a single target")
        rt.done()
        keys.append(KeyRule(rx, targets, tuple(split) if split else None, merge))
    tensors = []
    for rt in tables(t.get("tensors", list, []), f"{t.where}.tensors"):
        try:
            rx = re.compile(rt.get("keys", str))
        except re.error as e:
            raise RecipeError(
                f"{rt.where}: field 'keys' is not a valid regular expression ({e})"
            ) from None
        op = rt.get("op", str, choices=TENSOR_OPS)
        block = rt.get("block", (int, str), None)
        if op == "interleave_halves" and block is None:
            raise RecipeError(
                f"{rt.where}: op interleave_halves needs 'block' (rows per head, or a config name)"
            )
        if isinstance(block, str) and block not in config:
            raise RecipeError(
                f"{rt.where}: field 'block' names {block!r}, not a [convert.config] key"
            )
        rt.done()
        tensors.append(TensorRule(rx, op, block))
    t.done()
    if not keys:
        raise RecipeError(f"{t.where}: field 'keys' declares no rule")
    return Conversion(module, why, config, tuple(keys), tuple(tensors))


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class _Step:
    source: str
    targets: tuple[str, ...]
    split: tuple[int, ...] | None
    merge: str | None


def _plan(conv: Conversion, keys: Iterable[str]) -> list[_Step]:
    """Every source key's rule (the first that matches), in rule order so that folds come after
    the tensor they fold into; fails on a key no rule claims."""
    by_rule: list[list[_Step]] = [[] for _ in conv.keys]
    left = []
    for k in sorted(keys):
        for i, r in enumerate(conv.keys):
            tg = r.apply(k)
            if tg is not None:
                by_rule[i].append(_Step(k, tuple(tg), r.split, r.merge))
                break
        else:
            left.append(k)
    if left:
        more = f" and {len(left) - 3} more" if len(left) > 3 else ""
        raise ProbeError(
            f"conversion to {conv.module}: no rule for {', '.join(left[:3])}{more}; "
            "this checkpoint is not the layout the family recipe's [convert] describes"
        )
    return [s for steps in by_rule for s in steps]


def one_to_one(conv: Conversion, key: str, keys: Iterable[str]) -> str | None:
    """The converted key of ``key`` when the conversion only renames it (nothing is split, folded
    or permuted), so that an edit of the converted weight is the same edit of the stored one."""
    plan = _plan(conv, keys)
    folded = {s.targets[0] for s in plan if s.merge}
    for s in plan:
        if s.source != key:
            continue
        tgt = s.targets[0]
        if len(s.targets) > 1 or s.merge or tgt in folded:
            return None
        if any(r.keys.fullmatch(tgt) for r in conv.tensors):
            return None
        return tgt
    return None


# --------------------------------------------------------------------------- converting


def _split_rows(x: torch.Tensor, split: tuple[int, ...], key: str) -> list[torch.Tensor]:
    unit, rem = divmod(x.shape[0], sum(split))
    if rem:
        raise ProbeError(
            f"{key}: {x.shape[0]} rows do not split in proportions {list(split)}; wrong layout for this family"
        )
    return list(torch.split(x, [unit * s for s in split], dim=0))


def _interleave(x: torch.Tensor, block: int, key: str) -> torch.Tensor:
    if block % 2 or x.shape[0] % block:
        raise ProbeError(f"{key}: {x.shape[0]} rows are not whole blocks of {block} (even) rows")
    half = block // 2
    within = torch.stack([torch.arange(half), torch.arange(half, block)], dim=1).reshape(-1)
    idx = (torch.arange(0, x.shape[0], block)[:, None] + within[None, :]).reshape(-1)
    return x.index_select(0, idx.to(x.device))


def _swap_halves(x: torch.Tensor, key: str) -> torch.Tensor:
    if x.shape[0] % 2:
        raise ProbeError(f"{key}: an odd row count ({x.shape[0]}) has no halves to swap")
    a, b = x.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _ref(val: str, shapes: dict[str, tuple[int, ...]]) -> int:
    if val.startswith("count:"):
        rx = re.compile(val[len("count:") :])
        return len({m.group(1) for k in shapes if (m := rx.match(k))})
    _, key, dim = val.split(":")
    if key not in shapes:
        raise ProbeError(
            f"conversion config reads the shape of {key}, which the converted weights lack"
        )
    return int(shapes[key][int(dim)])


def module_config(conv: Conversion, shapes: dict[str, tuple[int, ...]]) -> dict:
    """The module's constructor arguments: literals, or values read from the converted shapes."""
    out = {}
    for name, val in conv.config.items():
        if isinstance(val, str):
            parts = [_ref(p.strip(), shapes) for p in val.split(" / ")]
            v = parts[0]
            for p in parts[1:]:
                if p == 0 or v % p:
                    raise ProbeError(
                        f"conversion config {name} = {val!r} is not a whole number here"
                    )
                v //= p
            out[name] = v
        else:
            out[name] = val
    return out


def convert_tensors(
    conv: Conversion,
    keys: Iterable[str],
    read: Callable[[str], torch.Tensor],
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], dict]:
    """The converted state dict (in ``dtype``) and the module config, reading one source tensor at a
    time. Folds are computed in fp32 and cast once, so a bf16 sum does not add its own rounding."""
    plan = _plan(conv, keys)
    folded = {s.targets[0] for s in plan if s.merge}
    out: dict[str, torch.Tensor] = {}
    for s in plan:
        x = read(s.source).to(torch.float32)
        parts = _split_rows(x, s.split, s.source) if s.split else [x]
        for tgt, part in zip(s.targets, parts):
            if s.merge is None:
                if tgt in out:
                    raise ProbeError(f"conversion: {s.source} and another key both become {tgt}")
                out[tgt] = part if tgt in folded else part.to(dtype)
            elif tgt not in out:
                raise ProbeError(
                    f"conversion: {s.source} folds into {tgt}, which no earlier rule filled"
                )
            elif s.merge == "add":
                out[tgt] = out[tgt] + part
            else:  # cat_in
                out[tgt] = torch.cat([out[tgt], part], dim=1)
    for tgt in folded:
        out[tgt] = out[tgt].to(dtype)
    config = module_config(conv, {k: tuple(v.shape) for k, v in out.items()})
    for r in conv.tensors:
        for k in [k for k in out if r.keys.fullmatch(k)]:
            if r.op == "swap_halves":
                out[k] = _swap_halves(out[k], k)
            else:
                block = config[r.block] if isinstance(r.block, str) else r.block
                out[k] = _interleave(out[k], int(block), k)
    return out, config


def build_module(
    conv: Conversion,
    keys: Iterable[str],
    read: Callable[[str], torch.Tensor],
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> torch.nn.Module:
    """The converted weights loaded (strictly: every key and shape must match) into the module."""
    pkg, cls_name = conv.module.split(":", 1)
    try:
        cls = getattr(importlib.import_module(pkg), cls_name)
    except (ImportError, AttributeError):
        raise ProbeError(
            f"conversion needs {conv.module}; install or upgrade {pkg} (pip install 'vpatch[probe]')"
        ) from None
    sd, config = convert_tensors(conv, keys, read, dtype)
    with torch.device("meta"):
        model = cls(**config)
    missing = sorted(set(model.state_dict()) - set(sd))
    extra = sorted(set(sd) - set(model.state_dict()))
    bad = [
        k for k, v in model.state_dict().items() if k in sd and tuple(v.shape) != tuple(sd[k].shape)
    ]
    if missing or extra or bad:
        raise ProbeError(
            f"converted weights do not fit {cls_name}({config}): missing {missing[:3]}, "
            f"unexpected {extra[:3]}, wrong shape {bad[:3]}; the recipe's [convert] does not fit this checkpoint"
        )
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device).eval()
