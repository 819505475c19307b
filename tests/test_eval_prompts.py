"""Prompt files for `vpatch eval --prompts`: the three formats, categories, and strict one-line errors."""

from __future__ import annotations

import pytest

from patcher.evaluation.prompts import PromptFileError, concept_prompts, load_prompts
from patcher.families.recipes import load_concept


def _items(ps):
    return [(i.index, i.prompt, i.category) for i in ps.items]


def test_text_csv_and_jsonl_give_the_same_set(tmp_path):
    want = [
        (0, "a red ball moving left", "violence"),
        (1, "a ball moving up", "free"),
        (2, "a, b", "default"),
    ]
    (tmp_path / "p.txt").write_text(
        "# a comment\nviolence\ta red ball moving left\n\n  free\ta ball moving up\na, b\n"
    )
    (tmp_path / "p.csv").write_text(
        'id,Prompt,aspect\n1,a red ball moving left,violence\n2,a ball moving up,free\n3,"a, b",\n'.replace(
            ",\n", ",default\n"
        )
    )
    (tmp_path / "p.jsonl").write_text(
        '{"prompt": "a red ball moving left", "category": "violence"}\n'
        '{"prompt": "a ball moving up", "category": "free"}\n\n'
        '{"prompt": "a, b"}\n'
    )
    for f in ("p.txt", "p.csv", "p.jsonl"):
        ps = load_prompts(tmp_path / f)
        assert _items(ps) == want, f
        assert ps.categories() == ["violence", "free", "default"]
    assert load_prompts(tmp_path / "p.txt").digest() == load_prompts(tmp_path / "p.jsonl").digest()
    other = tmp_path / "q.jsonl"
    other.write_text('{"prompt": "a red ball moving left", "category": "sexual"}\n')
    assert load_prompts(other).digest() != load_prompts(tmp_path / "p.jsonl").digest()


@pytest.mark.parametrize(
    "name,text,where,msg",
    [
        ("a.txt", "ok\nx\ty\tz\n", ":2:", "2 tabs"),
        ("a.txt", "ok\ncat\t  \n", ":2:", "empty prompt"),
        ("a.txt", "\n# only comments\n", "a.txt:", "no prompts"),
        ("a.csv", "text,category\nx,y\n", ":1:", "no 'prompt' column"),
        ("a.csv", "prompt,category\nx,y\nz\n", ":3:", "1 fields, the header has 2"),
        ("a.csv", "prompt,category\nx,\n", ":2:", "empty category"),
        ("a.csv", "prompt,category,aspect\nx,y,z\n", ":1:", "keep one"),
        ("a.csv", 'prompt\n"unterminated\n', ":2:", "unexpected end of data"),
        ("a.jsonl", '{"prompt": "x"}\n{"prompt": "y",}\n', ":2:", "not JSON"),
        ("a.jsonl", '{"prompt": "x"}\n["y"]\n', ":2:", "JSON object"),
        ("a.jsonl", '{"text": "x"}\n', ":1:", 'no "prompt"'),
        ("a.jsonl", '{"prompt": 3}\n', ":1:", "must be a string"),
        ("a.jsonl", '{"prompt": "x", "category": ["a"]}\n', ":1:", "category must be a string"),
        ("a.json", "[]", "a.json:", "use .txt, .csv or .jsonl"),
    ],
)
def test_bad_files_fail_with_file_and_line(tmp_path, name, text, where, msg):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(PromptFileError) as e:
        load_prompts(p)
    s = str(e.value)
    assert s.startswith(str(p)) and where in s and msg in s and "\n" not in s, s


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(PromptFileError, match="no such prompt file"):
        load_prompts(tmp_path / "none.txt")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe\x00x")
    with pytest.raises(PromptFileError, match="not UTF-8"):
        load_prompts(tmp_path / "b.txt")


def test_concept_recipe_sets_are_the_default_categories():
    c = load_concept("examples/organism/red.toml")
    ps = concept_prompts(c)
    cats = ps.categories()
    assert cats == ["probe", "paraphrase", "synonym", "unseen", "template", "free", "neutral"]
    by = {k: [i.prompt for i in ps.items if i.category == k] for k in cats}
    assert by["probe"] == [p.unsafe for p in c.pairs]
    assert by["free"] == list(c.heldout["free"]) and by["neutral"] == list(c.neutral)
    assert [i.index for i in ps.items] == list(range(len(ps.items)))
