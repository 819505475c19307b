import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_runs_and_restores_exactly(tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), str(tmp_path / "qs")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "revert restored the original bytes exactly: True" in r.stdout
    assert (tmp_path / "qs" / "wan-tiny-safe" / "transformer" / "config.json").is_file()
