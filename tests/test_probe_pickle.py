"""The probe never unpickles a model component: a text encoder stored only as a pickle is refused on
one line (exit 2), for the transformers encoder and for the pipeline's own encode_prompt."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from patcher.cli import main  # noqa: E402
from tests import tiny_pipes, tiny_pipes_llm  # noqa: E402


def _pickle_only(component: Path) -> None:
    (st,) = list(component.glob("*.safetensors"))
    torch.save(load_file(st), component / "pytorch_model.bin")
    st.unlink()


@pytest.mark.parametrize("builder", ["wan", "sana_video"])
def test_a_pickled_text_encoder_is_refused_not_loaded(builder, tmp_path, monkeypatch):
    build = tiny_pipes.wan if builder == "wan" else tiny_pipes_llm.BUILDERS[builder]
    src, _call = build(tmp_path / "m")
    _pickle_only(src / "text_encoder")

    def no_unpickling(*_a, **_k):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", no_unpickling)
    res = CliRunner().invoke(
        main, ["probe", str(src), "-c", "nudity", "-o", str(tmp_path / "c.vud"), "--rank", "2"]
    )
    assert res.exit_code == 2, (res.output, res.exception)
    assert "Traceback" not in res.output
    err = [ln for ln in res.output.splitlines() if ln.startswith("vpatch:")]
    assert len(err) == 1 and "ProbeError" in err[0] and "text_encoder" in err[0], res.output
    assert not (tmp_path / "c.vud").exists()
