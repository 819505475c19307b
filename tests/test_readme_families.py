"""The README's families table and `vpatch families` describe the same families, and every row says
its default site was checked against the model's own forward. (The checks themselves are the
capture-vs-forward tests of tests/test_probe_families.py, test_families_*.py and the Open-Sora golden
files; this test keeps the table honest about which families exist.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

from click.testing import CliRunner

from patcher.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
HEADER = "| family (`--family`) |"


def _table_rows() -> list[list[str]]:
    text = README.read_text()
    start = text.index(HEADER)
    table = text[start : text.index("\n\n", start)].splitlines()
    cols = [c.strip() for c in table[0].strip("|").split("|")]
    assert cols[-1].startswith("site checked against"), cols
    # cells may hold escaped pipes (\|): split on unescaped ones only
    return [
        [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        for line in table[2:]
        if line.startswith("| `")
    ]


def test_readme_table_lists_exactly_the_shipped_families_and_every_row_says_checked():
    res = CliRunner().invoke(main, ["families", "--json"])
    assert res.exit_code == 0, res.output
    shipped = {f["family"] for f in json.loads(res.stdout)}
    rows = _table_rows()
    names = [r[0].strip("`") for r in rows]
    assert len(names) == len(set(names)), "a family has two rows"
    assert set(names) == shipped
    for r in rows:
        assert len(r) == 7, r[0]
        assert r[-1].startswith("yes"), f"{r[0]}: {r[-1]}"
