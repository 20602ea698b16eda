"""The benchmark command keeps working (its figures are read by people, not asserted here)."""

import json
import subprocess
import sys

from scanner.bench.pipeline import bench_pipeline


def test_bench_pipeline_measures_every_figure():
    figures = bench_pipeline(frames=8)
    for variant in ("in_process", "isolated"):
        assert figures[variant]["relay_opened_on"] == "8/8"
        for key in ("decode_ms", "frame_to_relay_on_ms"):
            measured = figures[variant][key]
            assert measured["n"] == 8 and 0 < measured["p50"] <= measured["p99"]
    assert set(figures["decision_ms_by_type"]) == {"plain", "cccd", "signed", "dcc"}
    assert figures["outbox_commits_per_s"] > 0
    daemon = figures["daemon"]
    assert daemon["exit_code"] == 0 and daemon["ready_s"] is not None and daemon["peak_rss_mb"] > 0


def test_decode_cli_prints_one_json_line_per_image(tmp_path):
    import cv2
    import numpy as np

    from scanner.sim import synth

    code = tmp_path / "code.png"
    cv2.imwrite(str(code), synth.render_scene("EMP-0001", np.random.default_rng(3)))
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((480, 640), 200, np.uint8))
    result = subprocess.run(
        [sys.executable, "-m", "scanner", "decode", str(code), str(blank)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["file"] for line in lines] == [str(code), str(blank)]
    (symbol,) = lines[0]["symbols"]
    assert symbol["text"] == "EMP-0001" and symbol["engine"] == "zxing" and len(symbol["polygon"]) == 4
    assert lines[1]["symbols"] == []
    assert all(line["ms"] >= 0 for line in lines)


def test_bench_fuzz_counts_outcomes_and_exceptions():
    from scanner.bench.fuzz import bench_fuzz

    figures = bench_fuzz(3000, seed=7)
    assert figures["exceptions"] == 0, figures
    assert sum(figures["outcomes"].values()) == 3000
    # The seeds are valid credentials of every type, and mutations reach every parser's reject paths.
    for outcome in ("plain/ok", "cccd/ok", "signed/ok", "dcc/ok", "signed/bad_signature", "dcc/malformed"):
        assert figures["outcomes"].get(outcome, 0) > 0, outcome


def test_bench_occupancy_measures_propagation_and_the_cap_check(tmp_path):
    from scanner.bench.occupancy import bench_decision, bench_propagation

    figures = bench_propagation(6, tmp_path)
    for key in ("count_durable_to_every_sibling_ms", "entry_call_to_every_sibling_ms"):
        assert figures[key]["n"] == 6 and 0 < figures[key]["p50"] <= figures[key]["p99"]
    decision = bench_decision(2000)
    assert decision["decisions_each"] == 2000
    assert decision["decision_us_without_cap"] > 0 and decision["decision_us_with_cap"] > 0


def test_bench_door_measures_both_edges_on_a_busy_daemon(tmp_path):
    from scanner.bench.door import bench_door

    figures = bench_door(10, isolate=True, workdir=tmp_path)
    assert figures["relay_missed"] == 0
    assert figures["pipeline_fps_while_measuring"] > 0  # it was decoding meanwhile
    for key in ("exit_button_to_relay_on_ms", "fire_to_relay_held_ms"):
        measured = figures[key]
        assert measured["n"] == 5 and 0 < measured["p50"] <= measured["p99"] <= measured["max"]
