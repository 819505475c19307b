"""Recipes are data: every shipped one parses, and a malformed one fails with the field's name."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from patcher.cli import main
from patcher.errors import RecipeError
from patcher.families.recipes import (
    RECIPES_DIR,
    apply_overrides,
    family_files,
    load_concept,
    load_family,
    parse_concept,
    parse_family,
)

FAMILIES = {
    "wan",
    "zeroscope",
    "cogvideox",
    "ltx",
    "hunyuan",
    "mochi",
    "animatediff",
    "opensora12",
    "opensora2",
}


def test_every_required_family_ships_and_parses():
    fams = {f.stem: load_family(f) for f in family_files()}
    assert FAMILIES <= set(fams)
    for name, fam in fams.items():
        assert fam.name == name and fam.default_sites
        for site in fam.sites.values():
            assert len(site.why.split()) >= 8, f"{name}.{site.name}: say why this site was chosen"
    # at least one family offers a text-encoder site
    assert any(s.components == ["text_encoder"] for f in fams.values() for s in f.sites.values())


@pytest.mark.parametrize("name", ["nudity", "violence", "gore", "trademark"])
def test_shipped_concepts(name):
    c = load_concept(name)
    assert len(c.pairs) == 5 and len(c.neutral) >= 5
    for kind in ("paraphrase", "synonym", "unseen"):
        assert c.heldout[kind], f"{name}: held-out {kind} prompts"
    probe_prompts = {p.unsafe for p in c.pairs} | {p.safe for p in c.pairs}
    assert not probe_prompts & {s for v in c.heldout.values() for s in v}, (
        "held-out prompts must not be probe prompts"
    )
    # twin fidelity needs every held-out prompt's twin; the word edits derived none for "a woman
    # without any clothes on the beach" and "the a concert emblem" for "the Acme emblem"
    from patcher.evaluation.prompts import RecipePrompts

    derived = {  # the only held-out twins left to the word edits, each checked here by eye
        "nude figures bathing in a river, cinematic": "figures bathing in a river, cinematic",
        "a naked person jogging in a park at dawn": "a person jogging in a park at dawn",
    }
    for ps in RecipePrompts().sets(c):
        for p, t in zip(ps.prompts, ps.twins):
            assert t is not None, (name, ps.name, p)
            if ps.name != "probe":
                assert t == c.twins.get(p, derived.get(p)), (name, ps.name, p, t)


def test_a_twin_the_recipe_gives_comes_before_a_derived_one():
    from patcher.evaluation.prompts import RecipePrompts

    data = {
        **GOOD_CONCEPT,
        "pairs": [{"unsafe": "a nude woman", "safe": "a woman"}],
        "heldout": {"synonym": ["a woman in the nude dancing", "a nude man"]},
        "twins": {"a woman in the nude dancing": "a woman dancing"},
    }
    sets = {s.name: s for s in RecipePrompts().sets(parse_concept(data, "t.toml"))}
    assert sets["synonym"].twins == ("a woman dancing", "a man")  # given; derived ("nude" deleted)


GOOD_FAMILY = {
    "name": "x",
    "detect": {"pipeline_classes": ["XPipeline"]},
    "defaults": {"sites": ["a"]},
    "encoders": {"text": {"kind": "text", "component": "text_encoder"}},
    "sites": {
        "a": {
            "why": "because",
            "mode": "text",
            "encoder": "text",
            "components": ["transformer"],
            "weights": ["w\\.weight"],
        }
    },
}


def _fam(**edits):
    import copy

    d = copy.deepcopy(GOOD_FAMILY)
    for path, val in edits.items():
        node = d
        parts = path.split("__")
        for p in parts[:-1]:
            node = node[p]
        if val is None:
            node.pop(parts[-1])
        else:
            node[parts[-1]] = val
    return d


@pytest.mark.parametrize(
    "edits, field",
    [
        ({"name": None}, "'name' is required"),
        ({"sites__a__why": None}, "sites.a: field 'why' is required"),
        ({"sites__a__mode": "video"}, "sites.a: field 'mode' is 'video'"),
        (
            {"sites__a__weights": ["(unclosed"]},
            "field 'weights[0]' is not a valid regular expression",
        ),
        ({"sites__a__encoder": "t5"}, "field 'encoder' is 't5'"),
        ({"sites__a__typo": 1}, "unknown field(s) typo"),
        ({"encoders__text__max_length": "long"}, "field 'max_length' must be int"),
        ({"encoders__text__template": "no slot"}, "field 'template' must contain exactly one {}"),
        ({"defaults__sites": ["zzz"]}, "names 'zzz'"),
        ({"defaults__rank": 0}, "field 'rank' must be a positive integer"),
        ({"sites__a__chain": [{"op": "linear"}]}, "chain[0]: field 'weight' is required"),
        ({"detect": {}}, "field 'detect' needs pipeline_classes or keys"),
    ],
)
def test_malformed_family_names_the_field(edits, field):
    parse_family(_fam(), "ok.toml")  # the baseline is valid
    with pytest.raises(RecipeError) as ei:
        parse_family(_fam(**edits), "bad.toml")
    assert field in str(ei.value) and "bad.toml" in str(ei.value)


GOOD_CONCEPT = {
    "name": "c",
    "pairs": [{"unsafe": "a red ball", "safe": "a ball"}],
    "neutral": ["a dog", "a tree"],
}


@pytest.mark.parametrize(
    "data, field",
    [
        ({"pairs": []}, "field 'pairs' is empty"),
        (
            {"pairs": [{"unsafe": "a ball", "safe": "a ball"}]},
            "pairs[0]: 'unsafe' and 'safe' are identical",
        ),
        ({"pairs": [{"unsafe": "x"}]}, "pairs[0]: field 'safe' is required"),
        (
            {"pairs": [{"unsafe": "x", "safe": "y", "unsafe_image": "a.png"}]},
            "give both 'unsafe_image' and 'safe_image'",
        ),
        ({"neutral": ["one"]}, "field 'neutral' needs at least 2 entries"),
        ({"name": "has space"}, "field 'name' must be letters"),
        ({"heldout": {"synonyms": ["x"]}}, "unknown field(s) synonyms"),
        ({"twins": {"not held out": "y"}}, "'not held out' is not a held-out concept prompt"),
        (
            {"heldout": {"synonym": ["a b"]}, "twins": {"a b": " a b "}},
            "the twin of 'a b' must be a non-empty prompt without the concept",
        ),
        ({"heldout": {"synonym": ["a b"]}, "twins": {"a b": 3}}, "field 'a b' must be str"),
        ({"heldout": {"free": ["a b"]}, "twins": {"a b": "c"}}, "is not a held-out concept"),
        (
            {
                "pairs": [
                    {"unsafe": "x", "safe": "y", "unsafe_image": "no.png", "safe_image": "no.png"}
                ]
            },
            "image 'no.png' not found",
        ),
    ],
)
def test_malformed_concept_names_the_field(data, field, tmp_path):
    parse_concept(dict(GOOD_CONCEPT), "ok.toml", tmp_path)
    with pytest.raises(RecipeError) as ei:
        parse_concept({**GOOD_CONCEPT, **data}, "bad.toml", tmp_path)
    assert field in str(ei.value)


def test_overrides_parse_toml_values():
    d = apply_overrides(
        {"denoise": {"steps": 4}},
        [
            "denoise.steps=2",
            "denoise.call.height=16",
            "encoders.text.template=\"{} x\"",
            "a.b=word",
        ],
    )
    assert d["denoise"] == {"steps": 2, "call": {"height": 16}}
    assert d["encoders"]["text"]["template"] == "{} x" and d["a"]["b"] == "word"
    with pytest.raises(RecipeError, match="expected dotted.key=value"):
        apply_overrides({}, ["nothing"])


def test_bad_recipe_on_the_cli_is_one_line_exit_2(tmp_path):
    (tmp_path / "bad.toml").write_text(
        'name = "c"\npairs = [{ unsafe = "a", safe = "a" }]\nneutral = ["x", "y"]\n'
    )
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    res = CliRunner().invoke(
        main,
        [
            "probe",
            str(tmp_path / "m"),
            "-c",
            str(tmp_path / "bad.toml"),
            "-o",
            str(tmp_path / "o.vud"),
        ],
    )
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert (
        len(lines) == 1 and lines[0].startswith("vpatch: RecipeError:") and "pairs[0]" in lines[0]
    )
    assert not (tmp_path / "o.vud").exists()
    res = CliRunner().invoke(
        main,
        [
            "probe",
            str(tmp_path / "m"),
            "-c",
            "nudity",
            "-o",
            str(tmp_path / "o.vud"),
            "--family",
            "nope",
        ],
    )
    assert (
        res.exit_code == 2 and "unknown model family 'nope'" in res.output and "wan" in res.output
    )
    bad_toml = tmp_path / "broken.toml"
    bad_toml.write_text("name = ")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_concept(bad_toml)


def test_recipes_dir_is_the_repository_folder():
    assert (RECIPES_DIR / "models" / "wan.toml").is_file() and (RECIPES_DIR / "README.md").is_file()


def test_a_shipped_recipe_that_does_not_parse_is_an_error(tmp_path, monkeypatch):
    import shutil

    import patcher.families.recipes as R

    shutil.copytree(RECIPES_DIR, tmp_path / "shipped")
    (tmp_path / "shipped" / "models" / "zz_broken.toml").write_text(
        'name = "zz_broken"\nbogus = 1\n'
    )
    monkeypatch.setattr(R, "RECIPES_DIR", tmp_path / "shipped")
    with pytest.raises(RecipeError, match=r"zz_broken\.toml: field "):
        R.shipped_families()
    res = CliRunner().invoke(main, ["families"])
    assert res.exit_code == 2 and "zz_broken.toml" in res.output


def test_each_recipe_is_parsed_once_per_process(tmp_path, monkeypatch):
    import shutil

    import patcher.families.recipes as R

    calls = []
    real = R.parse_family
    monkeypatch.setattr(R, "parse_family", lambda *a, **k: calls.append(1) or real(*a, **k))
    shutil.copy(RECIPES_DIR / "models" / "wan.toml", tmp_path / "wan.toml")
    R._parsed.cache_clear()
    first = load_family(tmp_path / "wan.toml")
    assert load_family(tmp_path / "wan.toml") is first and len(calls) == 1
    # an edited file is read again; overrides never come from (or land in) the cache
    (tmp_path / "wan.toml").write_text((tmp_path / "wan.toml").read_text() + "\n# edited\n")
    os.utime(tmp_path / "wan.toml", ns=(1, 1))
    assert load_family(tmp_path / "wan.toml") is not first and len(calls) == 2
    over = load_family(tmp_path / "wan.toml", ["defaults.rank=7"])
    assert over.defaults["rank"] == 7 and load_family(tmp_path / "wan.toml").defaults["rank"] != 7


def test_a_user_folder_adds_recipes(tmp_path, monkeypatch):
    import shutil

    from patcher.families.recipes import concept_files

    (tmp_path / "models").mkdir()
    (tmp_path / "concepts").mkdir()
    text = (
        (RECIPES_DIR / "models" / "wan.toml")
        .read_text()
        .replace('name = "wan"', 'name = "mywan"', 1)
    )
    (tmp_path / "models" / "mywan.toml").write_text(text)
    shutil.copy(RECIPES_DIR / "concepts" / "gore.toml", tmp_path / "concepts" / "mygore.toml")
    monkeypatch.setenv("VPATCH_RECIPES", str(tmp_path))
    stems = [f.stem for f in family_files()]
    assert "mywan" in stems and "wan" in stems
    assert load_family("mywan").name == "mywan"
    assert load_concept("mygore").pairs == load_concept("gore").pairs
    assert "mygore" in [f.stem for f in concept_files()]
    monkeypatch.setenv("VPATCH_RECIPES", str(tmp_path / "nope"))
    with pytest.raises(RecipeError, match="VPATCH_RECIPES.*not a folder"):
        family_files()


def test_detect_family_by_pipeline_class_then_by_keys_through_a_prefix():
    from patcher.families.recipes import detect_family

    assert detect_family("WanImageToVideoPipeline", set()) == "wan"
    wan_keys = {
        "model.diffusion_model.condition_embedder.text_embedder.linear_1.weight",
        "model.diffusion_model.blocks.0.attn2.to_k.weight",
    }
    assert detect_family(None, wan_keys) == "wan"
    # one detection key missing: no family is claimed
    assert detect_family(None, {next(iter(sorted(wan_keys)))}) is None
    assert detect_family("NoSuchPipeline", {"x.weight"}) is None
