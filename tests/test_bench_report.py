"""BENCHMARKS.md rendering (bench/report.py), the runner (bench/all.py) and the result contract.

Rendering is checked on hand-made results; the runner is checked end to end on the real sandbox
benchmark at its smallest size, next to a benchmark that fails, whose stored section must survive.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import all as bench_all
from bench import report
from bench.contract import command_line, validate

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_result(name: str, **extra) -> dict:
    result = {
        "benchmark": name,
        "title": name.capitalize(),
        "command": f"python -m bench.{name} --size 3",
        "baseline": f"A plain loop doing what {name} does, same run.",
        "tables": [{"title": f"{name} numbers", "columns": ["method", "tok/s", "ratio"],
                    "rows": [[f"{name}-ours", 1234, "2.50×"], [f"{name}-loop", 493.6, "1.00×"]]}],
        "series": {},
        "notes": [f"{name} ours / loop: 2.50× (target ≥ 2×): met"],
        "machine": {"cpu": "Test CPU 9000", "cores": 2, "gpu": None, "torch": "2.13.0", "ray": "2.60.0",
                    "load_avg_1m": 0.5, "date": "2026-11-29 10:00 UTC"},
    }
    result.update(extra)
    return result


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000, f"{path} is too small to hold a plot"
    assert data.startswith(PNG_MAGIC), f"{path} is not a PNG"


def test_render_places_commands_tables_baselines_notes_and_plots(tmp_path):
    serving = make_result("serving", series={
        "throughput_vs_concurrency": {"stack": [[1, 80.0], [4, 160.0], [16, 230.0]], "static batch": [[16, 1500.0]]},
        "latency_cdf": {"stack, concurrency 16": [0.5, 0.7, 0.9, 3.1], "engine, concurrency 16": [0.2, 0.25, 0.3]},
    })
    engine = make_result("engine")
    sandbox = make_result("sandbox")  # no notes file: generated parts only
    notes = {
        "intro": "Hand-written intro paragraph.",
        "serving": "What serving measures, written by hand.\n\n<!-- bench:command -->\n\n"
                   "Conditions of the run, by hand.\n\n<!-- bench:results -->\n\nFindings, by hand: the stack loses.\n",
        "engine": "Engine prose without markers.\n",
    }
    plots_dir = tmp_path / "plots"
    plots_dir.mkdir()
    (plots_dir / "gone_series.png").write_bytes(PNG_MAGIC)  # from an older render: must be removed
    text = report.render([serving, engine, sandbox], notes, plots_dir, tmp_path / "BENCHMARKS.md")

    for result in (serving, engine, sandbox):
        assert f"\n    {result['command']}\n" in text
        assert result["baseline"] in text
        assert f"*{result['tables'][0]['title']}*" in text
        assert "| method | tok/s | ratio |" in text
        for row in result["tables"][0]["rows"]:
            assert "| " + " | ".join(str(c) for c in row) + " |" in text
        assert f"- {result['notes'][0]}" in text
        assert f"## {result['title']} (`bench/{result['benchmark']}.py`)" in text
    assert "Test CPU 9000, 2 cores, no GPU" in text and "2026-11-29 10:00 UTC" in text
    assert "Hand-written intro paragraph." in text
    # Section order follows report.ORDER (engine before serving), whatever the input order.
    assert text.index("## Engine") < text.index("## Serving")
    # Prose around the markers keeps its place relative to the generated parts.
    order = ["What serving measures", serving["command"], "Conditions of the run", "| serving-ours |",
             "serving_throughput_vs_concurrency.png", "Findings, by hand"]
    positions = [text.index(piece) for piece in order]
    assert positions == sorted(positions)
    # Without markers the generated parts come first, then the prose.
    assert text.index(engine["command"]) < text.index("Engine prose without markers.")

    for series in ("throughput_vs_concurrency", "latency_cdf"):
        path = plots_dir / f"serving_{series}.png"
        assert_png(path)
        assert f"](plots/serving_{series}.png)" in text  # relative to the output file
    assert not (plots_dir / "gone_series.png").exists()
    assert not list(plots_dir.glob("engine_*.png"))  # no series, no plot
    assert "<!-- bench:" not in text


def test_notes_only_sections_and_missing_results():
    notes = {"tiny_training": "## Training the embedded r1-tiny\n\n| model | level 1 |\n|---|---|\n| sft | 99.7 % |\n",
             "cpu_speed": "Why the CPU speed matters, by hand.\n\n<!-- bench:results -->\n"}
    text = report.render([], notes, Path("/nonexistent-plots"), ROOT / "BENCHMARKS.md")
    assert notes["tiny_training"].strip() in text
    assert "## cpu_speed" in text and "python -m bench.all --only cpu_speed" in text
    assert "Why the CPU speed matters, by hand." in text
    assert "<!-- bench:" not in text
    assert text.index("## cpu_speed") < text.index("## Training the embedded r1-tiny")


def test_unknown_marker_names_the_notes_file():
    with pytest.raises(ValueError, match=r"bench/notes/engine.md.*bench:tabels"):
        report.render([make_result("engine")], {"engine": "<!-- bench:tabels -->"}, Path("/nonexistent"), ROOT / "x.md")


@pytest.mark.parametrize("mutate, problem", [
    (lambda r: r.pop("command"), "'command'"),  # a section without its command cannot be reproduced
    (lambda r: r["tables"][0]["rows"].append([1, 2]), "rows[2]"),  # short row would shift the columns
    (lambda r: r.update(series={"latency_cdf": [0.1, 0.2]}), "series"),  # series must be keyed by method
    (lambda r: r.update(notes="one string"), "notes"),
])
def test_validate_reports_broken_results(mutate, problem):
    result = make_result("engine")
    assert validate(result) == []
    mutate(result)
    assert any(problem in p for p in validate(result))


def test_command_line_drops_the_json_path():
    assert command_line("engine", ["--repeats", "1", "--json", "/tmp/x.json", "--models", "tiny"]) == \
        "python -m bench.engine --repeats 1 --models tiny"
    assert command_line("training", ["--json", "--steps", "2"]) == "python -m bench.training --steps 2"


def test_sandbox_main_returns_what_it_writes(tmp_path):
    from bench import sandbox

    path = tmp_path / "sandbox.json"
    result = sandbox.main(["--runs", "2", "--levels", "rlimits", "--json", str(path)])
    assert json.loads(path.read_text()) == result
    assert validate(result) == []
    assert result["command"] == "python -m bench.sandbox --runs 2 --levels rlimits"
    modes = [row[0] for row in result["tables"][0]["rows"]]
    assert modes[0] == "bare subprocess" and "uid+rlimits" in modes
    assert all(len(v) == 2 for v in result["series"]["latency_cdf"].values())


def test_engine_bench_reports_each_rounds_ratios(tmp_path):
    from bench import engine

    result = engine.main(["--models", "tiny", "--repeats", "2", "--num-requests", "4", "--new-tokens", "4",
                          "--json", str(tmp_path / "engine.json")])
    assert validate(result) == []
    (raw,) = result["raw"]
    for baseline in ("static", "loop"):
        per_round = [e / b for e, b in zip(raw["engine_runs"], raw[f"{baseline}_runs"])]
        assert raw[f"vs_{baseline}_paired_runs"] == pytest.approx(per_round, rel=1e-2)
        assert min(per_round) <= raw[f"vs_{baseline}_paired"] <= max(per_round)
    (row,) = result["tables"][0]["rows"]
    assert len(row) == len(result["tables"][0]["columns"]) == 9
    assert any("median of the rounds' paired ratios" in note for note in result["notes"])


def run_bench_all(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.all", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_runner_runs_a_real_benchmark_and_keeps_a_failed_ones_section(tmp_path):
    results_dir, plots_dir, output = tmp_path / "results", tmp_path / "plots", tmp_path / "BENCHMARKS.md"
    results_dir.mkdir()
    stored = make_result("sessions", command="python -m bench.sessions --stored-earlier")
    (results_dir / "sessions.json").write_text(json.dumps(stored))
    done = run_bench_all("--quick", "--only", "sandbox,sessions", "--args", "sessions=--no-such-flag",
                         "--results-dir", str(results_dir), "--plots-dir", str(plots_dir), "--output", str(output),
                         "--notes-dir", str(tmp_path / "no-notes"), "--log-dir", str(tmp_path / "logs"),
                         "--timeout", "180")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "[1/2] sandbox: python -m bench.sandbox --runs" in done.stdout
    assert "[2/2] sessions: python -m bench.sessions --no-such-flag" in done.stdout
    assert "FAILED" in done.stdout and "--no-such-flag" in done.stdout  # the log tail shows argparse's complaint
    assert "sessions" in done.stderr

    sandbox = json.loads((results_dir / "sandbox.json").read_text())
    assert validate(sandbox) == []
    assert sandbox["benchmark"] == "sandbox" and sandbox["command"].startswith("python -m bench.sandbox --runs ")
    assert sandbox["elapsed_s"] > 0 and sandbox["machine"]["cores"] >= 1
    assert json.loads((results_dir / "sessions.json").read_text()) == stored

    text = output.read_text()
    assert "Smoke run (--quick)" in text
    assert sandbox["command"] in text and stored["command"] in text
    assert_png(plots_dir / "sandbox_latency_cdf.png")


def test_render_only_rebuilds_from_the_stored_results(tmp_path):
    results_dir = tmp_path / "results"
    shutil.copytree(ROOT / "bench" / "results", results_dir)
    output = tmp_path / "BENCHMARKS.md"
    done = run_bench_all("--render-only", "--results-dir", str(results_dir), "--plots-dir", str(tmp_path / "plots"),
                         "--output", str(output), timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    text = output.read_text()
    for result in report.load_results(results_dir):
        assert result["command"] in text
        for table in result["tables"]:
            for row in table["rows"]:
                assert "| " + " | ".join(report.format_cell(c) for c in row) + " |" in text
        for series in result["series"]:
            assert_png(tmp_path / "plots" / f"{result['benchmark']}_{series}.png")
    # Every hand-written paragraph survives (markers aside).
    for name, prose in report.load_notes().items():
        for paragraph in prose.split("\n\n"):
            if paragraph.strip() and not report.MARKER.fullmatch(paragraph.strip()):
                assert paragraph.strip() in text, f"lost from bench/notes/{name}.md: {paragraph[:60]!r}"


def test_only_rejects_unknown_benchmarks():
    with pytest.raises(SystemExit, match="--only: unknown benchmark.*engine"):
        bench_all.main(["--only", "engine,nope"])


def test_first_batch_script_runs_on_cpu_and_reports_where_the_first_batch_went():
    # bench/first_batch.py otherwise runs only in the GPU check; on CPU it must still run end to end.
    done = subprocess.run(
        [sys.executable, "-m", "bench.first_batch", "--device", "cpu", "--dtypes", "fp32", "--warmups", "short",
         "--batches", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = [json.loads(line[len("RESULT "):]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert [(r["dtype"], r["warmup"]) for r in results] == [("fp32", "short")], done.stdout[-2000:]
    for r in results:
        assert len(r["tokens_per_s"]) == 1 and r["tokens_per_s"][0] > 0
        assert r["first_prefill_rows"] and sum(r["first_prefill_rows"]) == 64
        assert r["first_decode_steps"] > 0 and len(r["first_decode_slowest"]) == min(8, r["first_decode_steps"])
    assert results[0]["warmup_s"] > 0
    bad = subprocess.run([sys.executable, "-m", "bench.first_batch", "--warmups", "cold"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--warmups: unknown warm-up 'cold'" in bad.stderr


def test_serving_cpu_counts_each_process_by_its_label():
    import os
    import time

    from bench.serving_cpu import cpu_seconds, process_label, used_between

    before = cpu_seconds()
    assert before[os.getpid()][0] == "benchmark client"
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:  # burn CPU in this process only
        pass
    used = used_between(before, cpu_seconds())
    assert used["benchmark client"] >= 0.15
    # A process that appeared meanwhile counts whole; one that is gone counts nothing; one whose
    # title changed (a Ray worker names its current method) is matched by its pid.
    before = {1: ("a", 2.0), 2: ("b", 1.0), 4: ("old title", 7.0)}
    after = {1: ("a", 2.5), 3: ("b", 0.25), 4: ("new title", 7.25)}
    assert used_between(before, after) == {"a": 0.5, "b": 0.25, "new title": 0.25}

    class Worker:  # what psutil shows of a Ray worker while it runs a method
        pid = 12345

        def name(self):
            return "ray::ServeController.listen_for_change"

    assert process_label(Worker(), me=os.getpid()) == "ServeController"


def test_serving_names_the_engine_options_that_changed_the_model():
    # bench.serving runs its in-process engine on the model as served and says what that changed.
    from torch import nn

    from bench.serving import served_model_options
    from r1.config import EngineConfig
    from r1.engine.optimize import apply_engine_options

    def small():  # a LayerNorm keeps a parameter once int8 has made the Linear weights buffers, as embeddings do
        return nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4))

    assert served_model_options(apply_engine_options(small(), EngineConfig(prepack=False))) == []
    assert served_model_options(apply_engine_options(small(), EngineConfig())) == ["prepack"]  # auto, on x86-64
    assert served_model_options(apply_engine_options(small(), EngineConfig(quantization="int8"))) == ["int8"]
