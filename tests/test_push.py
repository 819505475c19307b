"""`vpatch push`: the staged folder and the card are real files, checked field by field. Only the
network boundary (HfApi) is faked, because no hub is reachable here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import patcher
from patcher.cli import main
from patcher.push import PushError, push

from .conftest import make_delta, model_tensors, save_pipeline


class FakeApi:
    def __init__(self, fail=None):
        self.calls = []
        self.fail = fail

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type="model"):
        self.calls.append(("create_repo", repo_id, private, exist_ok))
        if self.fail:
            raise self.fail

    def upload_folder(self, folder_path, repo_id, repo_type="model", commit_message=""):
        from pathlib import Path

        self.calls.append(
            (
                "upload_folder",
                repo_id,
                sorted(
                    str(p.relative_to(folder_path))
                    for p in Path(folder_path).rglob("*")
                    if p.is_file()
                ),
                commit_message,
            )
        )

        class Info:
            commit_url = f"https://hub.example/{repo_id}/commit/1"

        return Info()


@pytest.fixture
def patched(tmp_path):
    t = model_tensors()
    src = save_pipeline(tmp_path / "base", t)
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    make_delta(tmp_path / "d.vud", t, concept="nudity")
    patcher.apply_delta(src, tmp_path / "d.vud", tmp_path / "safe")
    report = {
        "judge": "organism",
        "seeds": 2,
        "presence": {
            "probe": {
                "before": {"rate": 1.0, "ci95": [0.7, 1.0], "n": 10},
                "after": {"rate": 0.0, "ci95": [0.0, 0.3], "n": 10},
            }
        },
        "collateral": {"colour": {"before": {"rate": 1.0}, "after": {"rate": 0.95}}},
    }
    (tmp_path / "eval.json").write_text(json.dumps(report))
    return tmp_path


def _front_matter(text):
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_dry_run_stages_the_folder_and_writes_the_card(patched):
    r = push(
        patched / "safe",
        "me/base-no-nudity",
        base_model=str(patched / "base"),
        delta=patched / "d.vud",
        eval_report=patched / "eval.json",
        dry_run=True,
    )
    assert (
        not r.uploaded
        and "README.md" in r.files
        and "transformer/diffusion_pytorch_model.safetensors" in r.files
    )
    card = (patched / "safe.push-staged" / "README.md").read_text()
    fm = _front_matter(card)
    # a local folder gives the license; its path is not published (it was the card's base_model)
    assert "base_model" not in fm and str(patched) not in card
    assert fm["license"] == "apache-2.0"  # inherited from the base card
    assert (
        "vpatch" in fm["tags"]
        and "erased-nudity" in fm["tags"]
        and fm["pipeline_tag"] == "text-to-video"
    )
    d = patcher.read_delta(patched / "d.vud")
    assert d.sha256[:16] in card and "nudity" in card and "## Limits" in card and "undo" in card
    assert "| probe | 100% [70%, 100%] | 0% [0%, 30%] |" in card
    assert "`cpca`" in card
    assert not list((patched / "safe.push-staged").rglob("*.vud"))


def test_a_folder_named_like_an_id_is_refused_until_the_user_says_which(patched, monkeypatch):
    """`hf download acme/base --local-dir acme/base` names a folder as the id: the card named no
    base model for it, and said nothing (and a folder's name proves no repo)."""
    import shutil

    monkeypatch.chdir(patched)
    shutil.copytree(patched / "base", patched / "acme" / "base")
    with pytest.raises(PushError, match=r"both a Hub id and a folder here; write \./acme/base"):
        push(patched / "safe", "me/a", base_model="acme/base", dry_run=True)
    assert not (patched / "safe.push-staged").exists()  # refused before anything is staged
    res = CliRunner().invoke(
        main, ["push", str(patched / "safe"), "--repo-id", "me/a", "--base-model", "acme/base", "--dry-run"]
    )  # fmt: skip
    assert res.exit_code == 2 and "hf://acme/base" in res.stderr, res.output
    # hf://: the Hub id, its license looked up on the Hub (offline here: unknown), not the folder's
    r = push(
        patched / "safe", "me/a", base_model="hf://acme/base", dry_run=True, stage=patched / "s1"
    )
    fm = _front_matter(Path(r.card).read_text())
    assert fm["base_model"] == "acme/base" and fm.get("license") != "apache-2.0"
    # ./: the folder, which lends its license only
    r = push(patched / "safe", "me/a", base_model="./acme/base", dry_run=True, stage=patched / "s2")
    fm = _front_matter(Path(r.card).read_text())
    assert "base_model" not in fm and fm["license"] == "apache-2.0"
    with pytest.raises(PushError, match="after hf://, a Hub id"):
        push(patched / "safe", "me/a", base_model="hf://not an id", dry_run=True)


def test_upload_goes_through_hfapi(patched):
    api = FakeApi()
    r = push(patched / "safe", "me/safe", private=True, api=api)
    assert r.uploaded and r.url.endswith("/commit/1")
    assert api.calls[0] == ("create_repo", "me/safe", True, False)
    name, repo, files, msg = api.calls[1]
    assert (
        name == "upload_folder"
        and "README.md" in files
        and "model_index.json" in files
        and "nudity" in msg
    )
    fm = _front_matter((patched / "safe.push-staged" / "README.md").read_text())
    assert fm["license"] == "other"  # no base given: not guessed


def test_a_variant_file_beside_unedited_default_weights_is_refused(patched, tmp_path):
    """`vpatch apply FOLDER/transformer/x.safetensors D` writes x.no-nudity.safetensors beside the
    untouched original; push staged both and its card said the concept was removed, while
    from_pretrained loads the original."""
    import shutil

    folder = tmp_path / "mixed"
    shutil.copytree(patched / "base", folder)
    (w,) = (folder / "transformer").glob("*.safetensors")
    variant = patcher.apply_delta(w, patched / "d.vud").output
    assert ".no-nudity." in variant and (folder / "transformer" / w.name).exists()
    res = CliRunner().invoke(
        main, ["push", str(folder), "--repo-id", "me/x", "--dry-run", "--stage", tmp_path / "st"]
    )
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert "is not in" in lines[0] and "from_pretrained loads" in lines[0]
    assert not (tmp_path / "st").exists()
    # inspect says so too (it listed the delta as applied to the folder, with no word of this)
    res = CliRunner().invoke(main, ["inspect", str(folder), "--json"])
    warns = json.loads(res.stdout)["warnings"]
    assert res.exit_code == 0 and len(warns) == 1 and "from_pretrained loads" in warns[0]
    res = CliRunner().invoke(main, ["inspect", str(folder)])
    assert "warning: " in res.stderr and "from_pretrained loads" in res.stderr
    assert "[yellow]" not in res.stderr  # rich markup is off on stderr: it was printed as text
    # the same folder once its default weights carry the delta too is pushed
    shutil.rmtree(folder)
    shutil.copytree(patched / "safe", folder)
    (w,) = (folder / "transformer").glob("*.safetensors")
    shutil.copy(w, w.with_name(w.name.replace(".safetensors", ".fp16.safetensors")))
    assert push(folder, "me/x", dry_run=True, stage=tmp_path / "st2").files


def test_a_patched_copy_inside_the_pipeline_that_it_does_not_load_is_refused(patched, tmp_path):
    """`vpatch apply wan/transformer D` writes wan/transformer-no-nudity/ (a sharded transformer
    too): a sibling that model_index.json does not name, so from_pretrained loads the untouched
    transformer/; and in a folder of fp16 variants only, apply on the fp16 file writes another
    variant beside it. push accepted both."""
    import shutil

    folder = tmp_path / "sib"
    shutil.copytree(patched / "base", folder)
    out = patcher.apply_delta(folder / "transformer", patched / "d.vud").output
    assert Path(out).parent == folder
    with pytest.raises(PushError, match="model_index.json names no"):
        push(folder, "me/x", dry_run=True, stage=tmp_path / "st")
    only = tmp_path / "only"
    shutil.copytree(patched / "base", only)
    (w,) = (only / "transformer").glob("*.safetensors")
    w.rename(w.with_name(w.name.replace(".safetensors", ".fp16.safetensors")))
    (w16,) = (only / "transformer").glob("*.safetensors")
    patcher.apply_delta(w16, patched / "d.vud")
    with pytest.raises(PushError, match="variant fp16"):
        push(only, "me/x", dry_run=True, stage=tmp_path / "st2")
    assert not (tmp_path / "st").exists() and not (tmp_path / "st2").exists()


def test_the_card_states_the_edit_each_method_made(tmp_path):
    """The card said "W' = W − λ (W u) uᵀ" and "refusal direction" for a twin delta (an input-side
    map), and "method: merge (refusal direction from ? pairs)", "rank k = None" for a merged one."""
    from patcher.push import _method_lines

    twin = {
        "method": {"name": "twin", "sites": ["cross_kv"], "family": "wan", "beta": 1.0,
                   "ridge": 0.001, "null": 0, "strength": 1.0, "scan": 64,
                   "scan_picked": {"transformer:cross_kv": {"picked": ["scarlet", "crimson"]}}},
        "concept": {"pairs": [{}] * 5},
        "entries": 60,
        "kinds": ["map_input"],
    }  # fmt: skip
    text = "\n".join(_method_lines(twin))
    assert "W' = W (I + λ P Qᵀ)" in text and "(W B) Bᵀ" not in text
    assert "5 unsafe/safe prompt pairs" in text and "crimson, scarlet" in text
    assert "refusal direction" not in text
    cpca = {
        "method": {"name": "cpca", "sites": ["text_proj"], "family": "wan", "rank": 8,
                   "alpha": 1.0, "strength": 1.2, "directions": 1, "pooling": "tokens"},
        "concept": {"pairs": [{}] * 5},
        "entries": 1,
        "kinds": ["project_input"],
    }  # fmt: skip
    text = "\n".join(_method_lines(cpca))
    assert "W' = W − λ (W B) Bᵀ" in text and "rank k = 8" in text and "P Qᵀ" not in text
    merged = {
        "method": {"name": "merge", "family": "wan", "parts": [twin["method"], twin["method"]]},
        "concept": {
            "concepts": [{"name": "red", "pairs": [{}] * 5}, {"name": "blue", "pairs": [{}] * 4}]
        },
        "entries": 60,
        "kinds": ["map_input"],
    }
    text = "\n".join(_method_lines(merged))
    assert "merged from 2 deltas (red, blue)" in text and text.count("method: `twin`") == 2
    assert "None" not in text and "?" not in text and "{" not in text
    assert "fitted on 5 unsafe" in text and "fitted on 4 unsafe" in text
    # a merge of a merge: its parts are the probes, not a "merge" method with None fields
    nested = {
        "method": {"name": "merge", "parts": [merged["method"], cpca["method"]]},
        "concept": {"concepts": [merged["concept"], {"name": "green", "pairs": [{}] * 3}]},
        "entries": 61,
        "kinds": ["map_input", "project_input"],
    }
    text = "\n".join(_method_lines(nested))
    assert "merged from 3 deltas (red, blue, green)" in text and "`merge`" not in text
    assert "None" not in text and "fitted on 4 unsafe" in text and "from 3 unsafe" in text
    # odd shapes (old or hand-made records) still give a card, never a crash
    for odd in (
        {"method": {"name": "twin", "scan": 64, "scan_picked": ["scarlet"]}, "kinds": []},
        {"method": {"name": "twin", "scan": 64, "scan_picked": {"a": ["x"]}}, "kinds": []},
        {"method": {"name": "merge", "parts": 3}, "concept": {"concepts": 3}},
        {"method": [1], "concept": "x"},
    ):
        assert _method_lines(odd)


def test_base_model_and_eval_report_are_what_they_claim(patched, tmp_path):
    """A Hub id names the base; a string that is neither an id nor a folder is refused; an eval
    report must be one (any JSON object was accepted and made an empty table 'Judge: None')."""
    r = push(patched / "safe", "me/x", base_model="Org/base-1", dry_run=True, stage=tmp_path / "a")
    fm = _front_matter((tmp_path / "a" / "README.md").read_text())
    assert r.files and fm["base_model"] == "Org/base-1" and fm["base_model_relation"] == "merge"
    # the Hub's old ids without an owner are ids too
    push(patched / "safe", "me/x", base_model="gpt2", dry_run=True, stage=tmp_path / "g")
    assert _front_matter((tmp_path / "g" / "README.md").read_text())["base_model"] == "gpt2"
    for bad in ("not an id", str(tmp_path / "missing" / "folder")):
        with pytest.raises(PushError, match="neither a Hub id"):
            push(patched / "safe", "me/x", base_model=bad, dry_run=True, stage=tmp_path / "b")
    (tmp_path / "x.json").write_text('{"x": 1}')
    with pytest.raises(PushError, match="an eval report"):
        push(patched / "safe", "me/x", eval_report=tmp_path / "x.json", dry_run=True)
    with pytest.raises(PushError, match="no such file"):
        push(patched / "safe", "me/x", eval_report=tmp_path / "nope.json", dry_run=True)
    assert not (tmp_path / "b").exists() and not (patched / "safe.push-staged").exists()


def test_refusals(patched, tmp_path):
    with pytest.raises(PushError, match="no vpatch provenance"):
        push(patched / "base", "me/x", dry_run=True)
    (patched / "safe" / "leak.vud").write_bytes((patched / "d.vud").read_bytes())
    with pytest.raises(PushError, match="undo the edit"):
        push(patched / "safe", "me/x", dry_run=True)
    (patched / "safe" / "leak.vud").unlink()
    from huggingface_hub.errors import HfHubHTTPError

    class Resp:
        status_code = 409
        headers = {}
        url = "https://hub.example"
        request = None

    err409 = HfHubHTTPError("conflict", response=Resp())
    with pytest.raises(PushError, match="already exists; pass --exist-ok"):
        push(patched / "safe", "me/x", api=FakeApi(fail=err409), stage=tmp_path / "s1")
    with pytest.raises(PushError, match="could not reach the hub"):
        push(
            patched / "safe",
            "me/x",
            api=FakeApi(fail=ConnectionError("down")),
            stage=tmp_path / "s2",
        )
    res = CliRunner().invoke(
        main, ["push", str(patched / "safe"), "--repo-id", "nouser", "--dry-run"]
    )
    assert res.exit_code == 2 and "expected 'user/name'" in res.output
