"""The layout by role holds: one way for dependencies, no circle, each room its own process.

``lint-imports`` checks the contracts in pyproject.toml (layers, the central side independent
of the gate, no circle among siblings); mypy checks types (strict on the shared base and the
gate). The rest is checked here, on the code's own syntax tree and in fresh interpreters.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scanner import cli

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "scanner"
BIN = Path(sys.executable).parent
ROOMS = ("gate", "central", "fleet", "bench", "sim")

# Third-party modules a function may import itself, because loading them at import time costs
# a gate what it cannot spare (the comment on the line says which). Nothing of our own is here.
LAZY_ALLOWED = {
    "picamera2": "Pi-only: libcamera's bindings exist nowhere else",
    "zxingcpp": "native decoder: the parent of an isolated decoder never loads it",
    "pyzbar": "native libzbar: loaded only when the fallback first runs",
    "psycopg": "the optional postgres extra: never installed on a gate",
    "segno": "only rendering a pass needs it",
    "matplotlib": "only `trace --plot` draws: tens of MB a collector never needs",
    "cv2": "OpenCV: only `pass verify --image` of the office tools reads images",
    "scanner.gate.decode": "OpenCV and the native decoders, for the same `pass verify --image`",
}


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_in_functions(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            found += [n for n in ast.walk(fn) if isinstance(n, ast.Import | ast.ImportFrom)]
    return found


def imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.ImportFrom):
        return [node.module or ""]
    return [alias.name for alias in node.names]


def run(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_import_contracts_hold() -> None:
    result = run(str(BIN / "lint-imports"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_types_check() -> None:
    result = run(sys.executable, "-m", "mypy", "--no-error-summary")
    assert result.returncode == 0, result.stdout + result.stderr


def loaded_after(statement: str) -> set[str]:
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    result = run(sys.executable, "-c", code, timeout=60)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout))


def test_the_collector_loads_no_line_of_the_gate() -> None:
    loaded = loaded_after("import scanner.central.collector, scanner.central.trace, scanner.central.monitor")
    assert "scanner.central.collector" in loaded
    assert not {m for m in loaded if m == "scanner.gate" or m.startswith("scanner.gate.")}


def test_the_daemon_loads_only_the_gate_and_the_base() -> None:
    # What `gate-scanner run` imports is what a Pi Zero 2 W keeps in its 512 MB.
    loaded = loaded_after("from scanner import cli; cli.parser_for(['run'])")
    ours = {m for m in loaded if m.startswith("scanner.")}
    assert "scanner.gate.app" in ours
    others = {m for m in ours if m.split(".")[1] in ("central", "fleet", "bench", "sim")}
    assert not others


def test_relay_off_after_a_crash_does_not_wait_for_opencv_or_the_decoders() -> None:
    loaded = loaded_after("from scanner import cli; cli.parser_for(['relay-off'])")
    assert "scanner.gate.relay_off" in loaded
    assert not {"cv2", "zxingcpp", "pyzbar", "scanner.gate.decode", "scanner.gate.app"} & loaded


def test_nothing_imports_the_command_router() -> None:
    importers = []
    for path in modules():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and "scanner.cli" in imported(node):
                importers.append(module_name(path))
    assert importers == ["scanner.__main__"]


def test_functions_import_only_what_is_too_heavy_to_load_at_start_and_say_so() -> None:
    offenders = []
    for path in modules():
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        for node in imports_in_functions(ast.parse(source)):
            names = imported(node)
            allowed = all(n in LAZY_ALLOWED or n.split(".")[0] in LAZY_ALLOWED for n in names)
            said = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
            if not (allowed and said):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {', '.join(names)}")
    assert not offenders, "imports inside functions:\n" + "\n".join(offenders)


def command_modules(table: cli.Table) -> list[str]:
    found = []
    for entry in table.values():
        if isinstance(entry, cli.Command):
            found.append(entry.module)
        else:
            found += command_modules(entry[1])
    return found


def test_every_command_module_offers_the_pair_and_every_such_module_is_a_command() -> None:
    listed = command_modules(cli.COMMANDS)
    for name in listed:
        module = cli.load(name)
        assert callable(module.add_arguments) and callable(module.main), name
    offering = set()
    for path in modules():
        defined = {
            n.name for n in ast.parse(path.read_text(encoding="utf-8")).body if isinstance(n, ast.FunctionDef)
        }
        if {"add_arguments", "main"} <= defined:
            offering.add(module_name(path))
    assert offering == set(listed)


@pytest.mark.parametrize("room", ROOMS)
def test_each_room_says_what_runs_where(room: str) -> None:
    doc = ast.get_docstring(ast.parse((PACKAGE / room / "__init__.py").read_text(encoding="utf-8")))
    assert doc and len(doc.split()) >= 25, f"scanner/{room}/__init__.py needs a paragraph"


def test_docstrings_cite_nothing_outside_the_repository() -> None:
    cited = []
    for path in modules():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"DESIGN §|data/README|\bissue \d", line):
                cited.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not cited, "\n".join(cited)
