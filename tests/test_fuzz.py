"""Property fuzzing at CI size (derandomized: every run draws the same cases). Any input either
works or fails with a VpatchError; a failure leaves nothing behind; no existing file changes.
The long run is benchmarks/fuzz.py."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from . import fuzz_cases as fc

N = int(os.environ.get("VPATCH_FUZZ_EXAMPLES", "25"))
CI = settings(
    max_examples=N,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
# a known failure needs no minimal example on every CI run
KNOWN = settings(CI, phases=[Phase.explicit, Phase.generate])


@KNOWN
@example([("drop", "blocks.0.attn2.to_k.weight::fix_index")])
@example([("meta", "vpatch.originals", "[1]")])
@example([("meta", "vpatch.originals", "[" * 100_000)])  # past the JSON parser's depth
@example([("dtype", "blocks.0.attn2.to_k.weight::U", fc.torch.bfloat16)])
@example([("values", "blocks.0.attn2.to_k.weight::fix_index", 2**40)])
@given(fc.record_mutations())
def test_fuzz_revert_records(ops):
    fc.revert_record_case(ops)


@CI
@given(fc.provenance_values())
def test_fuzz_provenance(value):
    fc.provenance_case(value, calls=("inspect", "apply", "push"))


@KNOWN
@example(fc.known_provenance(strength=None))
@example(fc.known_provenance(diverged=5))
@given(fc.provenance_values())
def test_fuzz_provenance_revert(value):
    fc.provenance_case(value, calls=("revert",))


@CI
@given(fc.layer_maps())
def test_fuzz_layer_maps(drawn):
    fc.layer_map_case(drawn)


@CI
@given(fc.push_inputs())
def test_fuzz_push_inputs(inp):
    fc.push_case(inp)


@CI
@given(fc.output_names, st.booleans())
def test_fuzz_output_paths(name, suffix):
    fc.output_path_case(name, suffix)


@pytest.mark.parametrize("length", [240, 300])
def test_long_output_names_are_clean_errors(length):
    fc.output_path_case("n" * length, False)
