"""scripts/test.sh on a fresh machine: CPU torch first when none is installed, an installed torch
left alone. A stub interpreter records what the script asks of pip and pytest."""

import os
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STUB = """#!/usr/bin/env bash
echo "$*" >> "$STUB_LOG"
if [ "$1" = "-c" ]; then
  case "$2" in
    *print*) echo 9.9.9; exit 0 ;;
    *) exit "$STUB_HAS_TORCH_RC" ;;
  esac
fi
if [ "$1 $2" = "-m pip" ] && [[ "$*" == *"+cpu"* ]]; then exit "$STUB_CPU_WHEEL_RC"; fi
exit 0
"""


def _run(tmp_path: Path, has_torch: bool, cpu_wheel_local: bool = True) -> list[str]:
    stub = tmp_path / "python-stub"
    stub.write_text(STUB)
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.log"
    env = {
        **os.environ,
        "PYTHON": str(stub),
        "STUB_LOG": str(log),
        "STUB_HAS_TORCH_RC": "0" if has_torch else "1",
        "STUB_CPU_WHEEL_RC": "0" if cpu_wheel_local else "1",
    }
    env.pop("VPATCH_TORCH_INDEX", None)
    env.pop("VPATCH_TORCH_VERSION", None)
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "test.sh"), "-k", "nothing"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return log.read_text().splitlines()


def _pip(calls: list[str]) -> list[str]:
    return [c for c in calls if c.startswith("-m pip")]


def test_fresh_machine_installs_the_cpu_wheel_before_the_package(tmp_path):
    calls = _run(tmp_path, has_torch=False)
    pip = _pip(calls)
    assert pip[0] == "-m pip install -q torch==2.13.0+cpu"
    assert pip[-1] == "-m pip install -q -e .[probe,eval,nudenet,test]"
    assert calls[-1] == "-m pytest -q -k nothing"


def test_without_a_local_cpu_wheel_it_uses_pytorchs_cpu_index(tmp_path):
    pip = _pip(_run(tmp_path, has_torch=False, cpu_wheel_local=False))
    assert (
        pip[1] == "-m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    )
    # never a bare torch requirement from the default index (that is the multi-GB CUDA build)
    assert not any(p.endswith("torch==2.13.0") for p in pip)


def test_an_installed_torch_is_left_alone(tmp_path):
    pip = _pip(_run(tmp_path, has_torch=True))
    assert pip == ["-m pip install -q -e .[probe,eval,nudenet,test]"]


def test_ci_runs_exactly_the_readme_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in ci
    assert "pip install" not in ci  # test.sh owns the torch decision
    assert "bash scripts/test.sh" in (ROOT / "README.md").read_text()
