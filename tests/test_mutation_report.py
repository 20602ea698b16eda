"""tools/mutation_report.py is the mutation run's verdict: it must fail on what it exists to catch.

A survivor the table of docs/mutation.md does not explain, and a table row that no longer names a
survivor (renumbered, killed or gone), each make it exit 1; an explained survivor does not. The
mutmut results are written here in mutmut's own format (``mutants/**/*.meta``).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "mutation_report.py"
KILLED, SURVIVED = 1, 0


@pytest.fixture
def report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("mutation_report", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "ROOT", tmp_path)
    monkeypatch.setattr(module, "DOC", tmp_path / "docs" / "mutation.md")
    shown: list[str] = []

    def fake_show(cmd: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        shown.append(cmd[-1])
        return subprocess.CompletedProcess(cmd, 0, stdout=f"diff of {cmd[-1]}", stderr="")

    monkeypatch.setattr(module.subprocess, "run", fake_show)
    module.shown = shown  # type: ignore[attr-defined]
    (tmp_path / "docs").mkdir()
    (tmp_path / "scanner" / "gate").mkdir(parents=True)
    (tmp_path / "scanner" / "gate" / "relay.py").write_text(
        "def f():\n    return 1  # pragma: no mutate (tie)\n"
    )
    meta = tmp_path / "mutants" / "scanner" / "gate" / "relay.py.meta"
    meta.parent.mkdir(parents=True)
    codes = {
        "scanner.gate.relay.x_f__mutmut_1": KILLED,
        "scanner.gate.relay.x_f__mutmut_2": SURVIVED,
        "scanner.gate.relay.x_f__mutmut_3": SURVIVED,
    }
    meta.write_text(json.dumps({"exit_code_by_key": codes}))
    return module


def table(report: ModuleType, *numbers: int) -> None:
    rows = "".join(f"| `scanner.gate.relay.x_f__mutmut_{n}` | why |\n" for n in numbers)
    report.DOC.write_text(f"| mutant | why |\n|---|---|\n{rows}")


def test_every_survivor_explained_passes_and_the_figures_add_up(report, capsys):
    table(report, 2, 3)
    assert report.main([]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines[0] == {
        "equivalent": 2,
        "generated": 3,
        "killed": 1,
        "module": "scanner.gate.relay",
        "not_mutated_lines": 1,
    }
    assert lines[-1]["module"] == "total"
    assert report.shown == []


def test_a_survivor_the_table_does_not_explain_fails_and_its_diff_is_shown(report, capsys):
    table(report, 2)
    assert report.main([]) == 1
    out = capsys.readouterr().out
    assert "not killed and not explained in docs/mutation.md: scanner.gate.relay.x_f__mutmut_3" in out
    assert report.shown == ["scanner.gate.relay.x_f__mutmut_3"]


@pytest.mark.parametrize(
    ("row", "now"),
    [(1, "killed"), (9, "not generated")],
    ids=["row names a killed mutant", "row names a mutant no longer generated"],
)
def test_a_row_that_names_no_survivor_fails(report, capsys, row, now):
    table(report, 2, 3, row)
    assert report.main([]) == 1
    assert f"but {now} now: scanner.gate.relay.x_f__mutmut_{row}" in capsys.readouterr().out


def test_a_partial_run_judges_only_the_rows_it_selected(report):
    table(report, 2, 3, 9)
    assert report.main(["scanner.gate.relay.x_f__mutmut_2"]) == 0
    assert report.main(["scanner.gate.relay.x_f__mutmut_[29]"]) == 1


def test_timeouts_are_listed_for_a_second_run(report, capsys):
    meta = report.ROOT / "mutants" / "scanner" / "gate" / "relay.py.meta"
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    codes["scanner.gate.relay.x_f__mutmut_2"] = -24  # SIGXCPU: mutmut's timeout
    meta.write_text(json.dumps({"exit_code_by_key": codes}))
    assert report.main(["--timeouts", "scanner.gate.relay.*"]) == 0
    assert capsys.readouterr().out.split() == ["scanner.gate.relay.x_f__mutmut_2"]
