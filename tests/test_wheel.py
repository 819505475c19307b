"""The built wheel works on its own: recipes ship inside it, and nothing reads the source tree.

The wheel is installed (not editable) into a fresh virtual environment that borrows only the heavy
third-party packages from this interpreter, and every command runs from a folder outside the checkout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from patcher.vud.delta import read_delta
from tests import tiny_pipes

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.stem for p in (REPO / "recipes" / "models").glob("*.toml"))
CONCEPTS = sorted(p.stem for p in (REPO / "recipes" / "concepts").glob("*.toml"))
SITE = "condition_embedder.text_embedder.linear_1"  # Wan's default site
COMFY = "model.diffusion_model.text_embedding.0"  # the same weight in ComfyUI's Wan layout


def _run(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VPATCH_RECIPES")}
    built = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(root / "dist"),
            str(REPO),
        ],
        root,
        env,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (root / "dist").glob("vpatch-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    for stem in SHIPPED:
        assert f"patcher/families/recipes_data/models/{stem}.toml" in names
    for stem in CONCEPTS:
        assert f"patcher/families/recipes_data/concepts/{stem}.toml" in names
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(root / "venv")
    py = root / "venv" / "bin" / "python"
    inst = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        root,
        env,
    )
    assert inst.returncode == 0, inst.stderr[-2000:]
    where = _run([str(py), "-c", "import patcher; print(patcher.__file__)"], root, env)
    assert str(root / "venv") in where.stdout, "the wheel's copy must be the one imported"
    return root, env


def test_families_lists_every_shipped_family(installed):
    root, env = installed
    out = _run([str(root / "venv" / "bin" / "vpatch"), "families", "--json"], root, env)
    assert out.returncode == 0, out.stderr
    names = sorted(f["family"] for f in json.loads(out.stdout))
    assert names == SHIPPED and len(names) >= 9


def test_probe_by_concept_name_and_apply_onto_a_comfyui_file(installed):
    root, env = installed
    pipe, _ = tiny_pipes.wan(root / "wan")
    vp = str(root / "venv" / "bin" / "vpatch")
    probed = _run(
        [vp, "probe", str(pipe), "-c", "nudity", "-o", str(root / "d.vud"), "--json"], root, env
    )
    assert probed.returncode == 0, probed.stderr[-2000:]

    # the transformer in ComfyUI's layout: prefix and Wan's original names for the edited weight
    weights = load_file(pipe / "transformer" / "diffusion_pytorch_model.safetensors")
    comfy = {}
    for k, t in weights.items():
        k = k.replace(SITE, COMFY) if k.startswith(SITE) else "model.diffusion_model." + k
        comfy[k] = t
    save_file(comfy, root / "comfy.safetensors")
    out = _run(
        [
            vp,
            "apply",
            str(root / "comfy.safetensors"),
            str(root / "d.vud"),
            "-o",
            str(root / "o.safetensors"),
            "--json",
        ],
        root,
        env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    patched = load_file(root / "o.safetensors")
    before, after = comfy[f"{COMFY}.weight"].float(), patched[f"{COMFY}.weight"].float()
    (entry,) = [e for e in read_delta(root / "d.vud").entries if e.tensor_key == f"{SITE}.weight"]
    assert entry.kind == "project_input"
    B = entry.V.double()  # W' = W - λ (W B) Bᵀ, written out here rather than taken from vpatch
    expected = before.double() - entry.strength * (before.double() @ B) @ B.T
    assert not torch.equal(before, after), "the ComfyUI-named weight must be edited"
    assert torch.allclose(after.double(), expected, atol=1e-5)
    untouched = [k for k in comfy if not k.startswith(COMFY)]
    assert all(torch.equal(comfy[k], patched[k]) for k in untouched)
