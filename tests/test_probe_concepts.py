"""`vpatch probe -c a -c b`: one delta whose edit is the projection onto the complement of both
concepts' joint span, on one loaded model."""

from __future__ import annotations

import torch
from click.testing import CliRunner

from patcher.cli import main
from patcher.vud.delta import read_delta
from tests import tiny_pipes

SITE = "transformer/condition_embedder.text_embedder.linear_1.weight"


def _entry(path):
    (e,) = [e for e in read_delta(path).entries if e.key == SITE]
    return e


def test_two_concepts_give_the_joint_projection(tmp_path):
    pipe, _ = tiny_pipes.wan(tmp_path / "wan")
    run = CliRunner()
    for args in (
        ["-c", "nudity", "-o", "a.vud"],
        ["-c", "gore", "-o", "b.vud"],
        ["-c", "nudity", "-c", "gore", "-o", "ab.vud"],
    ):
        res = run.invoke(
            main,
            [
                "probe",
                str(pipe),
                *[str(tmp_path / a) if a.endswith(".vud") else a for a in args],
                "-q",
            ],
        )
        assert res.exit_code == 0, res.output
    a, b, ab = (_entry(tmp_path / n) for n in ("a.vud", "b.vud", "ab.vud"))
    assert ab.kind == "project_input" and ab.rank == a.rank + b.rank == 2
    assert read_delta(tmp_path / "ab.vud").concept["name"] == "nudity+gore"
    # the joint span, computed here: an orthonormal basis of [u_a u_b]
    Q, _ = torch.linalg.qr(torch.cat([a.V, b.V], dim=1).double())
    P = ab.V.double() @ ab.V.double().T
    assert torch.allclose(P, Q @ Q.T, atol=1e-6)
    # at λ = 1 the edited weight reads nothing along either concept's direction
    W = torch.randn(ab.shape, dtype=torch.float64)
    W2 = W - ab.strength * (W @ ab.V.double()) @ ab.V.double().T
    assert ab.strength == 1.0
    for u in (a.V.double(), b.V.double()):
        assert (W2 @ u).norm() < 1e-6 * (W @ u).norm()


def test_several_concepts_refuse_save_activations(tmp_path):
    pipe, _ = tiny_pipes.wan(tmp_path / "wan")
    res = CliRunner().invoke(
        main,
        [
            "probe",
            str(pipe),
            "-c",
            "nudity",
            "-c",
            "gore",
            "--save-activations",
            str(tmp_path / "x.safetensors"),
        ],
    )
    assert res.exit_code == 2 and "takes one concept" in res.output
    assert not (tmp_path / "x.safetensors").exists()
