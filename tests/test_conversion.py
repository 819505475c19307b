"""The generic [convert] interpreter on hand-made tensors, and its schema errors."""

from __future__ import annotations

import pytest
import torch

from patcher.errors import ProbeError, RecipeError
from patcher.families.conversion import convert_tensors, module_config, one_to_one
from patcher.families.recipes import parse_family

BASE = {
    "name": "x",
    "detect": {"keys": ["a.weight"]},
    "sites": {"s": {"why": "w", "mode": "denoise", "components": ["t"], "weights": ["a"]}},
    "defaults": {"sites": ["s"]},
    "encoders": {},
}


def _conv(convert: dict):
    return parse_family({**BASE, "convert": convert}, "x.toml").convert


CONV = {
    "why": "test",
    "module": "torch.nn:Linear",
    "config": {
        "heads": 'count:blk\\.(\\d+)\\.',
        "width": "shape:lin.weight:1 / shape:norm.weight:0",
    },
    "keys": [
        {"from": "w_in\\.(weight|bias)", "to": "lin.{1}"},
        {"from": "c_in\\.weight", "to": "lin.weight", "merge": "cat_in"},
        {"from": "c_in\\.bias", "to": "lin.bias", "merge": "add"},
        {"from": "fused\\.(\\d+)", "to": ["blk.{1}.a", "blk.{1}.b"], "split": [1, 3]},
        {"from": "n", "to": "norm.weight"},
        {"from": "f", "to": "final"},
    ],
    "tensors": [
        {"keys": "blk\\.\\d+\\.a", "op": "interleave_halves", "block": 4},
        {"keys": "final", "op": "swap_halves"},
    ],
}


def test_every_rule_kind_on_known_tensors():
    src = {
        "w_in.weight": torch.ones(2, 3),
        "w_in.bias": torch.tensor([1.0, 2.0]),
        "c_in.weight": torch.full((2, 1), 5.0),
        "c_in.bias": torch.tensor([10.0, 20.0]),
        "fused.0": torch.arange(16.0).reshape(16, 1),
        "fused.1": torch.arange(16.0).reshape(16, 1),
        "n": torch.ones(2),
        "f": torch.tensor([1.0, 2.0, 3.0, 4.0]),
    }
    out, cfg = convert_tensors(_conv(CONV), list(src), lambda k: src[k])
    assert out["lin.weight"].tolist() == [
        [1, 1, 1, 5],
        [1, 1, 1, 5],
    ]  # concatenated on the input dim
    assert out["lin.bias"].tolist() == [11, 22]  # summed
    # rows 0..3 are "a" (1 part of 4), permuted inside its block of 4: (0, 2, 1, 3)
    assert out["blk.0.a"].flatten().tolist() == [0, 2, 1, 3]
    assert out["blk.1.b"].flatten().tolist() == list(range(4, 16))
    assert out["final"].tolist() == [3, 4, 1, 2]
    assert cfg == {"heads": 2, "width": 2}  # 2 blocks; 4 input columns / 2 norm rows


def test_head_permutation_matches_the_rotate_half_pairing():
    """interleave_halves with block 8 on two heads: row (i, i + 4) of each head become (2i, 2i + 1)."""
    conv = _conv(
        {
            "why": "t",
            "module": "m:C",
            "keys": [{"from": "q", "to": "q"}],
            "tensors": [{"keys": "q", "op": "interleave_halves", "block": 8}],
        }
    )
    src = {"q": torch.arange(16.0)}
    out, _ = convert_tensors(conv, ["q"], lambda k: src[k])
    assert out["q"].tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_head_permutation_on_the_device_the_tensor_is_read_to():
    """A denoise-mode probe on CUDA reads the stored tensors onto the GPU; the permutation's index
    must follow them there (it was built on the CPU and index_select failed on the H200)."""
    conv = _conv(
        {
            "why": "t",
            "module": "m:C",
            "keys": [{"from": "q", "to": "q"}],
            "tensors": [{"keys": "q", "op": "interleave_halves", "block": 8}],
        }
    )
    src = {"q": torch.arange(16.0, device="cuda")}
    out, _ = convert_tensors(conv, ["q"], lambda k: src[k])
    assert out["q"].device.type == "cuda"
    assert out["q"].tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_unclaimed_keys_and_bad_splits_fail():
    conv = _conv(CONV)
    with pytest.raises(ProbeError, match="no rule for extra"):
        convert_tensors(conv, ["n", "extra"], lambda k: torch.ones(2))
    with pytest.raises(ProbeError, match="do not split"):
        convert_tensors(conv, ["fused.0"], lambda k: torch.ones(6, 1))
    with pytest.raises(ProbeError, match="no earlier rule filled"):
        convert_tensors(conv, ["c_in.bias"], lambda k: torch.ones(2))


def test_one_to_one_only_for_plain_renames():
    conv = _conv(CONV)
    keys = ["w_in.weight", "c_in.weight", "fused.0", "n", "f"]
    assert one_to_one(conv, "n", keys) == "norm.weight"
    assert one_to_one(conv, "w_in.weight", keys) is None  # c_in folds into lin.weight
    assert one_to_one(conv, "w_in.weight", ["w_in.weight", "n"]) == "lin.weight"  # no fold here
    assert one_to_one(conv, "fused.0", keys) is None
    assert one_to_one(conv, "f", keys) is None  # halves swapped


@pytest.mark.parametrize(
    ("patch", "msg"),
    [
        ({"module": "NoColon"}, "package:Class"),
        ({"keys": [{"from": "a", "to": ["b", "c"]}]}, "split"),
        ({"keys": [{"from": "a", "to": "b", "split": [1]}]}, "split"),
        ({"keys": [{"from": "a", "to": "b", "merge": "mul"}]}, "merge"),
        ({"keys": [{"from": "a", "to": "b", "typo": 1}]}, "unknown field"),
        ({"keys": [{"from": "(a", "to": "b"}]}, "regular expression"),
        ({"keys": [{"from": "a", "to": "{2}"}]}, "may only use"),
        ({"config": {"w": "size:x"}}, "shape:KEY:DIM"),
        ({"tensors": [{"keys": "a", "op": "interleave_halves"}]}, "block"),
        ({"tensors": [{"keys": "a", "op": "interleave_halves", "block": "nope"}]}, "nope"),
        ({"tensors": [{"keys": "a", "op": "rotate"}]}, "op"),
    ],
)
def test_malformed_convert_tables_name_the_field(patch, msg):
    with pytest.raises(RecipeError, match=msg):
        _conv({**CONV, **patch})


def test_runner_needs_a_conversion():
    with pytest.raises(RecipeError, match=r"\[convert\]"):
        parse_family({**BASE, "denoise": {"runner": "mmdit_video"}}, "x.toml")


def test_config_refs_must_divide():
    conv = _conv({**CONV, "config": {"h": "shape:a:0 / shape:b:0"}})
    with pytest.raises(ProbeError, match="whole number"):
        module_config(conv, {"a": (5,), "b": (2,)})
