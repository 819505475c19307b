import errno
import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import patcher
from patcher.errors import (
    AlreadyApplied,
    CompatibilityError,
    DtypeError,
    FormatError,
    NumericError,
    OutputError,
    PickleRefused,
    RevertError,
)
from patcher.merge import kernel as merge
from patcher.merge import plan as merge_plan
from patcher.safetensors_io import read_header

from .conftest import (
    K1,
    UNTOUCHED,
    K,
    V,
    add_delta,
    directions,
    make_delta,
    model_tensors,
    save_pipeline,
    save_sharded,
)

TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def raw_bytes(path, key):
    h = read_header(path)
    a, b = h.abs_range(key)
    with open(path, "rb") as f:
        f.seek(a)
        return f.read(b - a)


def reference(W: torch.Tensor, B: torch.Tensor, lam: float) -> torch.Tensor:
    W32 = W.float()
    return W32 - lam * (W32 @ B) @ B.T


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_single_file_edit_matches_reference_and_copies_the_rest(tmp_path, dtype):
    t = model_tensors(dtype)
    src = tmp_path / "m.safetensors"
    save_file(t, src, metadata={"format": "pt", "note": "keep me"})
    make_delta(tmp_path / "d.vud", t)
    r = patcher.apply_delta(src, tmp_path / "d.vud", tmp_path / "out.safetensors")
    out = load_file(tmp_path / "out.safetensors")
    B = directions()
    for k in (K, V):
        assert out[k].dtype == dtype
        ref = reference(t[k], B, 1.0)
        assert torch.allclose(
            out[k].float(), ref, atol=TOL[dtype] * float(t[k].float().abs().max())
        )
        assert (
            float((out[k].float() @ B).abs().max()) < float((t[k].float() @ B).abs().max()) * 0.05
        )
    for k in (*UNTOUCHED, K1):
        assert raw_bytes(tmp_path / "out.safetensors", k) == raw_bytes(src, k)
    with safe_open(tmp_path / "out.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["note"] == "keep me" and meta["format"] == "pt"
    applied = json.loads(meta["vpatch.applied"])
    assert applied[0]["delta_sha256"] == r.delta_sha256 and applied[0]["concept"] == "red"
    assert applied[0]["strength"] == 1.0 and applied[0]["vpatch"] == patcher.__version__
    assert {s.key for s in r.tensors} == {K, V} and all(s.base_match for s in r.tensors)


def test_strength_scales_lambda(tmp_path):
    t = model_tensors(torch.float32)
    save_file(t, tmp_path / "m.safetensors")
    make_delta(tmp_path / "d.vud", t, strength=1.0)
    patcher.apply_delta(
        tmp_path / "m.safetensors", tmp_path / "d.vud", tmp_path / "o.safetensors", strength=0.5
    )
    out = load_file(tmp_path / "o.safetensors")
    assert torch.allclose(out[K], reference(t[K], directions(), 0.5), atol=1e-6)


def test_add_kind_adds_the_factors(tmp_path):
    t = model_tensors(torch.float32)
    save_file(t, tmp_path / "m.safetensors")
    d = add_delta(tmp_path / "a.vud", tuple(t[K].shape))
    patcher.apply_delta(
        tmp_path / "m.safetensors", tmp_path / "a.vud", tmp_path / "o.safetensors", strength=2.0
    )
    e = d.entries[0]
    assert torch.allclose(
        load_file(tmp_path / "o.safetensors")[K], t[K] + 2.0 * e.U @ e.V.T, atol=1e-6
    )


def test_fine_tune_recompute_vs_factors(tmp_path):
    base = model_tensors(torch.float32, seed=0)
    ft = {k: v + 0.01 * torch.randn_like(v) for k, v in base.items()}
    save_file(ft, tmp_path / "ft.safetensors")
    d = make_delta(tmp_path / "d.vud", base)
    B = directions()
    r = patcher.apply_delta(
        tmp_path / "ft.safetensors", tmp_path / "d.vud", tmp_path / "rec.safetensors"
    )
    assert all(s.base_match is False for s in r.tensors)
    assert any("differs from the probed base" in w for w in r.warnings)
    assert torch.allclose(
        load_file(tmp_path / "rec.safetensors")[K], reference(ft[K], B, 1.0), atol=1e-6
    )
    patcher.apply_delta(
        tmp_path / "ft.safetensors",
        tmp_path / "d.vud",
        tmp_path / "fac.safetensors",
        use_factors=True,
    )
    e = d.entries[0]
    assert torch.allclose(
        load_file(tmp_path / "fac.safetensors")[K], ft[K] + e.U @ e.V.T, atol=1e-6
    )


def test_sharded_index_rewritten_and_untouched_shards_identical(tmp_path):
    t = model_tensors(torch.bfloat16)
    (tmp_path / "in").mkdir()
    idx = save_sharded(tmp_path / "in", t, "diffusion_pytorch_model")
    make_delta(tmp_path / "d.vud", t, keys=(K,))
    r = patcher.apply_delta(idx, tmp_path / "d.vud", tmp_path / "out")
    new_idx = json.loads((tmp_path / "out" / idx.name).read_text())
    old_idx = json.loads(idx.read_text())
    assert new_idx["weight_map"] == old_idx["weight_map"]
    assert new_idx["metadata"]["total_size"] == old_idx["metadata"]["total_size"]
    assert new_idx["metadata"]["vpatch.applied"][0]["delta_sha256"] == r.delta_sha256
    edited_file = old_idx["weight_map"][K]
    for f in set(old_idx["weight_map"].values()):
        same = (tmp_path / "in" / f).read_bytes() == (tmp_path / "out" / f).read_bytes()
        assert same == (f != edited_file)
    merged = {}
    for f in set(new_idx["weight_map"].values()):
        merged.update(load_file(tmp_path / "out" / f))
    assert torch.allclose(merged[K].float(), reference(t[K], directions(), 1.0), atol=2e-3)


@pytest.mark.parametrize("shard", [False, True])
def test_pipeline_folder_patches_components_and_copies_everything_else(tmp_path, shard):
    t = model_tensors(torch.bfloat16)
    src = save_pipeline(tmp_path / "pipe", t, shard=shard, variant=not shard)
    make_delta(tmp_path / "d.vud", t)
    r = patcher.apply_delta(src, tmp_path / "d.vud", tmp_path / "safe")
    out = tmp_path / "safe"
    src_files = sorted(p.relative_to(src) for p in src.rglob("*") if p.is_file())
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == src_files
    for rel in src_files:
        if rel.parts[0] != "transformer" or rel.suffix == ".json" and "index" not in rel.name:
            assert (src / rel).read_bytes() == (out / rel).read_bytes(), rel
    if (
        not shard
    ):  # the fp16 variant is patched as well, or loading variant="fp16" would skip the edit
        v = load_file(out / "transformer" / "diffusion_pytorch_model.fp16.safetensors")
        assert float((v[K].float() @ directions()).abs().max()) < 0.05 * float(
            (t[K].float() @ directions()).abs().max()
        )
        assert len(r.tensors) == 4
    info = patcher.inspect_path(out)
    assert info["layout"] == "pipeline" and info["applied"][0]["delta_sha256"] == r.delta_sha256


def test_bare_component_inferred_or_named(tmp_path):
    t = model_tensors(torch.float32)
    save_file(t, tmp_path / "m.safetensors")
    # a Wan 2.2-like delta: the same keys for transformer and transformer_2
    from patcher.vud.delta import Delta, projection_entry, write_delta

    B = directions()
    ents = [projection_entry(f"{c}/{K}", t[K], B, 1.0) for c in ("transformer", "transformer_2")]
    write_delta(tmp_path / "two.vud", Delta(ents, {"name": "x"}, {}))
    with pytest.raises(CompatibilityError, match="--component"):
        patcher.apply_delta(
            tmp_path / "m.safetensors", tmp_path / "two.vud", tmp_path / "o.safetensors"
        )
    r = patcher.apply_delta(
        tmp_path / "m.safetensors",
        tmp_path / "two.vud",
        tmp_path / "o.safetensors",
        component="transformer_2",
    )
    assert r.coverage["component"] == "transformer_2" and r.coverage["other_component"] == [
        f"transformer/{K}"
    ]
    r = patcher.apply_delta(
        tmp_path / "m.safetensors",
        tmp_path / "d.vud" if False else tmp_path / "two.vud",
        tmp_path / "o2.safetensors",
        component="transformer",
        dry_run=True,
    )
    assert r.coverage["matched"] == 1


def test_missing_keys_fail_with_coverage_unless_allow_partial(tmp_path):
    t = model_tensors(torch.float32)
    make_delta(tmp_path / "d.vud", t)
    del t[V]
    save_file(t, tmp_path / "m.safetensors")
    with pytest.raises(CompatibilityError, match="1/2 entries matched") as ei:
        patcher.apply_delta(
            tmp_path / "m.safetensors", tmp_path / "d.vud", tmp_path / "o.safetensors"
        )
    assert ei.value.plan.coverage()["missing"] == [f"transformer/{V}"]
    assert not (tmp_path / "o.safetensors").exists()
    r = patcher.apply_delta(
        tmp_path / "m.safetensors",
        tmp_path / "d.vud",
        tmp_path / "o.safetensors",
        allow_partial=True,
    )
    assert any("partial: 1/2" in w for w in r.warnings)


def test_delta_for_another_model_is_refused(tmp_path):
    t = model_tensors(torch.float32)
    make_delta(tmp_path / "d.vud", t)
    other = model_tensors(torch.float32, in_dim=16)
    save_file(other, tmp_path / "m.safetensors")
    with pytest.raises(CompatibilityError, match="another model"):
        patcher.apply_delta(
            tmp_path / "m.safetensors", tmp_path / "d.vud", tmp_path / "o.safetensors"
        )


def test_targeted_unsupported_dtype_is_refused_untargeted_is_copied(tmp_path):
    t = model_tensors(torch.float32)
    make_delta(tmp_path / "d.vud", t)
    t8 = dict(t)
    t8[K] = t[K].to(torch.int8)
    save_file(t8, tmp_path / "i8.safetensors")
    with pytest.raises(
        DtypeError, match="I8 is not a weight dtype.*F32, F16, BF16, and F8_E4M3/F8_E5M2"
    ):
        patcher.apply_delta(
            tmp_path / "i8.safetensors", tmp_path / "d.vud", tmp_path / "o.safetensors"
        )
    assert not (tmp_path / "o.safetensors").exists()
    t8 = dict(t)
    t8["proj_out.weight"] = t["proj_out.weight"].to(torch.float8_e5m2)
    t8["ids"] = torch.arange(7, dtype=torch.int32)
    save_file(t8, tmp_path / "mixed.safetensors")
    patcher.apply_delta(
        tmp_path / "mixed.safetensors", tmp_path / "d.vud", tmp_path / "o.safetensors"
    )
    for k in ("proj_out.weight", "ids"):
        assert raw_bytes(tmp_path / "o.safetensors", k) == raw_bytes(
            tmp_path / "mixed.safetensors", k
        )


def test_second_application_refused_unless_force(tmp_path, bf16_model):
    src, d, t, _ = bf16_model
    patcher.apply_delta(src, d, tmp_path / "o1.safetensors")
    with pytest.raises(AlreadyApplied, match="--force"):
        patcher.apply_delta(tmp_path / "o1.safetensors", d, tmp_path / "o2.safetensors")
    patcher.apply_delta(tmp_path / "o1.safetensors", d, tmp_path / "o2.safetensors", force=True)
    meta = read_header(tmp_path / "o2.safetensors").metadata
    assert len(json.loads(meta["vpatch.applied"])) == 2


def test_nan_guard_writes_nothing(tmp_path):
    t = model_tensors(torch.float32)
    make_delta(tmp_path / "d.vud", t)
    t[K][3, 3] = float("inf")
    save_file(t, tmp_path / "m.safetensors")
    # the Inf is the input's: the message blamed the delta and --strength
    with pytest.raises(
        NumericError, match="already holds 1 NaN/Inf values .* damaged, not the delta"
    ):
        patcher.apply_delta(
            tmp_path / "m.safetensors", tmp_path / "d.vud", tmp_path / "o.safetensors"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.vud", "m.safetensors"]


@pytest.mark.parametrize(
    "row", [0, 1, 2, 5, 39]
)  # with 1-row blocks, rows 1, 2, 5 lie outside the rounding sample
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_nan_guard_covers_blocks_outside_the_rounding_sample(tmp_path, monkeypatch, row, bad):
    monkeypatch.setattr(
        merge, "ROW_BLOCK_BYTES", 24 * 4
    )  # one row per block: 40 blocks, every 4th sampled
    t = model_tensors(torch.bfloat16)
    make_delta(tmp_path / "d.vud", t)
    t[K][row, 7] = bad
    save_file(t, tmp_path / "m.safetensors")
    with pytest.raises(NumericError, match="NaN/Inf"):
        patcher.apply_delta(
            tmp_path / "m.safetensors", tmp_path / "d.vud", tmp_path / "o.safetensors"
        )
    assert not (tmp_path / "o.safetensors").exists()


def test_output_data_keeps_the_inputs_offset_modulo_64k_and_loads_identically(tmp_path, bf16_model):
    from patcher.safetensors_io import COPY_ALIGN

    src, d, t, _ = bf16_model
    patcher.apply_delta(src, d, tmp_path / "o.safetensors")
    a, b = read_header(src), read_header(tmp_path / "o.safetensors")
    assert b.data_start > a.data_start  # the provenance made the header longer...
    assert (
        b.data_start - a.data_start
    ) % COPY_ALIGN == 0 and b.data_start % 8 == 0  # ...padded so the copy stays aligned
    with safe_open(tmp_path / "o.safetensors", "pt") as f:
        assert set(f.keys()) == set(t)
        for k in UNTOUCHED:
            assert torch.equal(f.get_tensor(k), t[k])


def test_every_file_of_a_folder_output_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    t = model_tensors(torch.bfloat16)
    root = save_pipeline(tmp_path / "pipe", t, shard=True)
    make_delta(tmp_path / "d.vud", t)
    synced: set[str] = set()
    real = os.fsync

    def recording(fd):
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    patcher.apply_delta(root, tmp_path / "d.vud", tmp_path / "out")
    files = [p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(files) >= 8
    for rel in files:  # synced under the temporary name, before the folder became "out"
        assert any(s.endswith("/" + rel.as_posix()) and ".vpatch-tmp" in s for s in synced), rel


def test_rounding_report_warns_when_the_edit_is_below_resolution(tmp_path):
    t = model_tensors(torch.bfloat16)
    t[K] = (torch.ones(40, 24) + 0.001 * torch.randn(40, 24)).to(torch.bfloat16)
    save_file(t, tmp_path / "m.safetensors")
    d = add_delta(tmp_path / "tiny.vud", (40, 24))  # |ΔW| ~ 1e-2 * |N(0,1)| ... scaled down below
    e = d.entries[0]
    from patcher.vud.delta import Delta, DeltaEntry, write_delta

    write_delta(
        tmp_path / "tiny2.vud",
        Delta([DeltaEntry(e.key, e.shape, "add", 1.0, e.U * 0.05, e.V)], {"name": "tiny"}, {}),
    )
    r = patcher.apply_delta(
        tmp_path / "m.safetensors", tmp_path / "tiny2.vud", tmp_path / "o.safetensors"
    )
    s = r.tensors[0]
    assert s.rounding_error > 0.5 and s.changed_fraction < 0.5
    assert any("survived rounding to BF16" in w for w in r.warnings)
    r = patcher.apply_delta(
        tmp_path / "m.safetensors", tmp_path / "tiny.vud", tmp_path / "o2.safetensors", strength=50
    )
    assert r.tensors[0].rounding_error < 0.1 and not any("survived" in w for w in r.warnings)


def test_dry_run_writes_nothing_and_reports_the_plan(tmp_path, bf16_model):
    src, d, t, _ = bf16_model
    r = patcher.apply_delta(src, d, tmp_path / "o.safetensors", dry_run=True)
    assert not (tmp_path / "o.safetensors").exists()
    assert r.action == "dry-run" and {p["key"] for p in r.planned} == {
        f"transformer/{K}",
        f"transformer/{V}",
    }
    assert r.bytes_edited == 2 * 40 * 24 * 2 and r.bytes_total == src.stat().st_size
    assert all(p["fingerprint"] == "base" for p in r.planned) and r.peak_estimate > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_revert_with_record_restores_original_bytes(tmp_path, dtype):
    t = model_tensors(dtype)
    src = tmp_path / "m.safetensors"
    save_file(t, src)
    make_delta(tmp_path / "d.vud", t)
    patcher.apply_delta(
        src, tmp_path / "d.vud", tmp_path / "p.safetensors", revert_record=tmp_path / "rec.vurr"
    )
    r = patcher.revert_delta(
        tmp_path / "p.safetensors",
        tmp_path / "d.vud",
        tmp_path / "back.safetensors",
        record=tmp_path / "rec.vurr",
    )
    assert all(s.exact for s in r.tensors)
    for k in t:
        assert raw_bytes(tmp_path / "back.safetensors", k) == raw_bytes(src, k)
    assert "vpatch.applied" not in read_header(tmp_path / "back.safetensors").metadata


def test_revert_record_works_for_a_fine_tune_at_lambda_one(tmp_path):
    base = model_tensors(torch.bfloat16)
    ft = {k: (v.float() + 0.01 * torch.randn(v.shape)).to(torch.bfloat16) for k, v in base.items()}
    save_file(ft, tmp_path / "ft.safetensors")
    make_delta(tmp_path / "d.vud", base)
    patcher.apply_delta(
        tmp_path / "ft.safetensors",
        tmp_path / "d.vud",
        tmp_path / "p.safetensors",
        revert_record=tmp_path / "rec",
    )
    with pytest.raises(RevertError, match="revert record"):
        patcher.revert_delta(
            tmp_path / "p.safetensors", tmp_path / "d.vud", tmp_path / "x.safetensors"
        )
    patcher.revert_delta(
        tmp_path / "p.safetensors",
        tmp_path / "d.vud",
        tmp_path / "back.safetensors",
        record=tmp_path / "rec",
    )
    for k in ft:
        assert raw_bytes(tmp_path / "back.safetensors", k) == raw_bytes(
            tmp_path / "ft.safetensors", k
        )


def test_revert_without_record_is_verified_and_honest(tmp_path, bf16_model):
    src, d, t, _ = bf16_model
    patcher.apply_delta(src, d, tmp_path / "p.safetensors")
    with pytest.raises(RevertError, match="--allow-inexact"):
        patcher.revert_delta(tmp_path / "p.safetensors", d, tmp_path / "b.safetensors")
    assert not (tmp_path / "b.safetensors").exists()
    r = patcher.revert_delta(
        tmp_path / "p.safetensors", d, tmp_path / "b.safetensors", allow_inexact=True
    )
    back = load_file(tmp_path / "b.safetensors")
    assert all(s.exact is False for s in r.tensors)
    assert torch.allclose(
        back[K].float(), t[K].float(), atol=2e-3
    )  # off by a few rounding steps only
    with pytest.raises(RevertError, match="no record"):
        patcher.revert_delta(src, d, tmp_path / "c.safetensors")


def test_revert_sharded_pipeline_with_record(tmp_path):
    t = model_tensors(torch.bfloat16)
    src = save_pipeline(tmp_path / "pipe", t, shard=True)
    make_delta(tmp_path / "d.vud", t)
    patcher.apply_delta(src, tmp_path / "d.vud", tmp_path / "safe", revert_record=tmp_path / "rec")
    patcher.revert_delta(
        tmp_path / "safe", tmp_path / "d.vud", tmp_path / "back", record=tmp_path / "rec"
    )
    for p in (src / "transformer").glob("*.safetensors"):
        assert p.read_bytes() == (tmp_path / "back" / "transformer" / p.name).read_bytes()
    idx = json.loads(
        (
            tmp_path / "back" / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
        ).read_text()
    )
    assert "vpatch.applied" not in idx["metadata"]


@pytest.mark.parametrize("suffix", [".bin", ".ckpt", ".pt"])
def test_pickle_checkpoints_are_refused_with_a_conversion_hint(tmp_path, bf16_model, suffix):
    _, d, t, _ = bf16_model
    p = tmp_path / f"model{suffix}"
    torch.save(t, p)
    with pytest.raises(PickleRefused, match="weights_only=True"):
        patcher.apply_delta(p, d, tmp_path / "o.safetensors")


def test_pickle_beside_targeted_component_is_refused(tmp_path):
    t = model_tensors(torch.bfloat16)
    src = save_pipeline(tmp_path / "pipe", t)
    torch.save({}, src / "transformer" / "diffusion_pytorch_model.bin")
    make_delta(tmp_path / "d.vud", t)
    with pytest.raises(PickleRefused, match="unpatched"):
        patcher.apply_delta(src, tmp_path / "d.vud", tmp_path / "safe")


def test_output_safety(tmp_path, bf16_model):
    src, d, t, _ = bf16_model
    before = src.read_bytes()
    with pytest.raises(OutputError, match="does not exist"):
        patcher.apply_delta(src, d, tmp_path / "no" / "dir" / "o.safetensors")
    with pytest.raises(OutputError, match="never overwrites its input"):
        patcher.apply_delta(src, d, src, overwrite=True)
    (tmp_path / "o.safetensors").write_text("old")
    with pytest.raises(OutputError, match="--overwrite"):
        patcher.apply_delta(src, d, tmp_path / "o.safetensors")
    patcher.apply_delta(src, d, tmp_path / "o.safetensors", overwrite=True)
    assert read_header(tmp_path / "o.safetensors").tensors
    assert src.read_bytes() == before


def _no_leftovers(folder):
    return [p.name for p in folder.iterdir() if "vpatch-tmp" in p.name]


def test_interrupted_run_leaves_no_finished_looking_file(tmp_path, bf16_model, monkeypatch):
    src, d, t, _ = bf16_model
    calls = {"n": 0}
    real = merge._edit_rows

    def boom(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(merge, "_edit_rows", boom)
    with pytest.raises(KeyboardInterrupt):
        patcher.apply_delta(src, d, tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists() and _no_leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["pwrite", "copy_file_range", "posix_fallocate"])
def test_full_disk_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch, where):
    t = model_tensors(torch.bfloat16)
    src = save_pipeline(tmp_path / "pipe", t)
    make_delta(tmp_path / "d.vud", t)
    real = getattr(os, where)
    budget = {"left": 1000}

    def small_disk(*a):
        if budget["left"] <= 0 or where == "posix_fallocate":
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real(*a)
        budget["left"] -= n
        return n

    monkeypatch.setattr(os, where, small_disk)
    with pytest.raises(OutputError, match="no space left"):
        patcher.apply_delta(src, tmp_path / "d.vud", tmp_path / "safe")
    assert not (tmp_path / "safe").exists() and _no_leftovers(tmp_path) == []


def test_truncated_shard_in_checkpoint_is_a_format_error(tmp_path):
    t = model_tensors(torch.bfloat16)
    (tmp_path / "in").mkdir()
    idx = save_sharded(tmp_path / "in", t, "model")
    make_delta(tmp_path / "d.vud", t)
    shard = tmp_path / "in" / json.loads(idx.read_text())["weight_map"][K]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(FormatError, match="truncated"):
        patcher.apply_delta(idx, tmp_path / "d.vud", tmp_path / "out")


def test_peak_memory_estimate_is_bounded_by_row_blocks(tmp_path):
    big = {"w": torch.zeros(4096, 4096, dtype=torch.bfloat16)}
    save_file(big, tmp_path / "m.safetensors")
    from patcher.vud.delta import Delta, projection_entry, write_delta

    write_delta(
        tmp_path / "d.vud",
        Delta(
            [projection_entry("transformer/w", big["w"].float(), directions(4096), 1.0)],
            {"name": "x"},
            {},
        ),
    )
    r = patcher.apply_delta(tmp_path / "m.safetensors", tmp_path / "d.vud", dry_run=True)
    assert r.peak_estimate <= merge_plan.BASE_RSS + 5 * merge.ROW_BLOCK_BYTES + 4096 * 2 * 4 * 2 + 1


def test_output_hash_of_edit_is_deterministic(tmp_path, bf16_model):
    src, d, t, _ = bf16_model
    patcher.apply_delta(src, d, tmp_path / "a.safetensors")
    patcher.apply_delta(src, d, tmp_path / "b.safetensors")
    assert (
        hashlib.sha256((tmp_path / "a.safetensors").read_bytes()).digest()
        == hashlib.sha256((tmp_path / "b.safetensors").read_bytes()).digest()
    )


def test_rounding_report_of_a_large_tensor_is_sampled_not_the_bytes(tmp_path, monkeypatch):
    """From 2 * STAT_EVERY row blocks on, the rounding figures come from a systematic sample; the written
    bytes, the exact intended norm and the NaN/Inf guard cover every block."""
    g = torch.Generator().manual_seed(4)
    t = {
        K: (torch.randn(400, 24, generator=g) * 0.05).to(torch.bfloat16),
        "other.weight": torch.randn(4, 4).to(torch.bfloat16),
    }
    save_file(t, tmp_path / "m.safetensors")
    make_delta(tmp_path / "d.vud", t, keys=(K,))
    monkeypatch.setattr(merge, "ROW_BLOCK_BYTES", 24 * 4 * 10)  # 40 row blocks of 10 rows
    monkeypatch.setattr(merge, "STAT_EVERY", 4)  # sample every 4th block
    sampled = patcher.apply_delta(
        tmp_path / "m.safetensors", tmp_path / "d.vud", tmp_path / "a.safetensors"
    ).tensors[0]
    monkeypatch.setattr(merge, "STAT_EVERY", 10**9)  # every block
    full = patcher.apply_delta(
        tmp_path / "m.safetensors", tmp_path / "d.vud", tmp_path / "b.safetensors"
    ).tensors[0]
    assert raw_bytes(tmp_path / "a.safetensors", K) == raw_bytes(tmp_path / "b.safetensors", K)
    assert sampled.intended_norm == pytest.approx(full.intended_norm, rel=1e-9)
    assert sampled.rounding_error == pytest.approx(full.rounding_error, rel=0.3)
    assert sampled.changed_fraction == pytest.approx(full.changed_fraction, abs=0.1)

    # an overflow confined to a block outside the sample is still caught
    monkeypatch.setattr(merge, "STAT_EVERY", 4)
    from patcher.vud.delta import Delta, DeltaEntry, write_delta

    U = torch.zeros(400, 1)
    U[15, 0] = 3e38  # row 15 lies in block 1, which the sample skips
    write_delta(
        tmp_path / "big.vud",
        Delta(
            [DeltaEntry(f"transformer/{K}", (400, 24), "add", 1.0, U, torch.ones(24, 1))],
            {"name": "x"},
            {},
        ),
    )
    with pytest.raises(NumericError, match="produced .* NaN/Inf .* Check the delta"):
        patcher.apply_delta(
            tmp_path / "m.safetensors",
            tmp_path / "big.vud",
            tmp_path / "c.safetensors",
            strength=10,
        )
    assert not (tmp_path / "c.safetensors").exists()
