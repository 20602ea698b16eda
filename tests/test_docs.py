"""The README is part of the contract: its quick start and config reference must match the code."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from scanner.config import describe

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_quick_start_is_exactly_two_commands_and_ci_runs_the_test_one():
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands == ["./quickstart demo", "./quickstart test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./quickstart test" in ci


def test_every_config_key_is_documented_with_its_default():
    for key, default, _doc in describe():
        assert f"| `{key}` | `{default}` |" in README, key


def test_code_is_ruff_clean():
    ruff = shutil.which("ruff") or str(Path(__import__("sys").executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    result = subprocess.run([ruff, "check", "scanner", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
