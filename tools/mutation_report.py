"""Per-module figures of the last ``tools/mutation.sh`` run, checked against docs/mutation.md.

Reads mutmut's results (``mutants/**/*.meta``) for the mutants the run selected and the table
of equivalent mutants in docs/mutation.md. Prints one JSON object per module and a total (with
the module's lines marked ``# pragma: no mutate``, which mutmut leaves alone), then every
surviving mutant that the table does not explain (with its diff), and every table row that no
longer names a surviving mutant of the run (the code changed: judge it again). Exit 1 if either
list is not empty, so a run is clean only when every survivor is explained.
"""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "mutation.md"
# Table rows of docs/mutation.md that name an equivalent mutant: | `name` | why |
EQUIVALENT_ROW = re.compile(r"^\|\s*`(scanner\.[^`]+__mutmut_\d+)`\s*\|")
# mutmut's exit codes (mutmut/stats.py); a timeout is a mutant the tests caught by hanging.
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 36: "timeout"}
STATUS.update({-24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout"})


def module_of(name: str) -> str:
    return name.split(".x", 1)[0] if ".xǁ" in name or ".x_" in name else name.rsplit(".", 1)[0]


def read_results(patterns: list[str]) -> dict[str, str]:
    results: dict[str, str] = {}
    for meta in sorted((ROOT / "mutants").rglob("*.meta")):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                results[name] = STATUS.get(code, "not checked" if code is None else f"exit {code}")
    return results


def list_timeouts(patterns: list[str]) -> int:
    """Print the mutants that timed out, one per line, for tools/mutation.sh to run again.

    mutmut 3.8 never cancels a mutant's wall-clock timer: when it expires it sends SIGXCPU to
    that pid, which by then can belong to a later mutant's run (pids, threads included, wrap at
    ``kernel.pid_max``, 32768 here). That run is then counted a timeout, which counts as caught.
    A mutant that really hangs times out again.
    """
    for name, status in read_results(patterns).items():
        if status == "timeout":
            print(name)
    return 0


def pragma_lines(module: str) -> int:
    path = ROOT / (module.replace(".", "/") + ".py")
    if not path.exists():
        return 0
    return sum("# pragma: no mutate" in line for line in path.read_text().splitlines())


def main(argv: list[str]) -> int:
    if argv[:1] == ["--timeouts"]:
        return list_timeouts(argv[1:] or ["*"])
    patterns = argv or ["*"]
    equivalent = {m.group(1) for line in DOC.read_text().splitlines() if (m := EQUIVALENT_ROW.match(line))}
    results = read_results(patterns)
    if not results:
        print("no results under mutants/: run tools/mutation.sh first", file=sys.stderr)
        return 2
    per_module: dict[str, Counter[str]] = {}
    for name, status in results.items():
        counts = per_module.setdefault(module_of(name), Counter())
        counts["generated"] += 1
        if status == "survived" and name in equivalent:
            status = "equivalent"
        counts[status] += 1
    total: Counter[str] = Counter()
    for module, counts in sorted(per_module.items()):
        total.update(counts)
        counts["not_mutated_lines"] = pragma_lines(module)
        print(json.dumps({"module": module, **dict(sorted(counts.items()))}))
    print(json.dumps({"module": "total", **dict(sorted(total.items()))}))
    caught = ("killed", "timeout")
    unexplained = sorted(n for n, s in results.items() if s not in caught and n not in equivalent)
    # A row inside the selection that names no survivor, or no mutant at all (renumbered or gone).
    selected = (n for n in equivalent if any(fnmatch.fnmatchcase(n, p) for p in patterns))
    stale = sorted(n for n in selected if results.get(n) != "survived")
    for name in unexplained:
        print(f"\n# not killed and not explained in docs/mutation.md: {name} ({results[name]})")
        show = [sys.executable, "-m", "mutmut", "show", name]
        diff = subprocess.run(show, cwd=ROOT, capture_output=True, text=True, check=False)
        print(diff.stdout.strip() or diff.stderr.strip())
    for name in stale:
        now = results.get(name, "not generated")
        print(f"\n# listed as equivalent in docs/mutation.md but {now} now: {name}")
    return 1 if unexplained or stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
