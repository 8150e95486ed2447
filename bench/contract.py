"""The result contract every bench module writes with `--json PATH` (and returns from `main`).

    {"benchmark": "<name>", "title": "...", "command": "python -m bench.<name> <args as run>",
     "baseline": "<one sentence: what the baseline is>",
     "tables": [{"title": "...", "columns": [...], "rows": [[...], ...]}],
     "series": {"throughput_vs_concurrency": {"<method>": [[x, y], ...]},
                "latency_cdf": {"<method>": [latency_s, ...]}},
     "notes": ["one-line findings"],
     "machine": {...}, "raw": ...}

`bench.report` renders BENCHMARKS.md from these dicts alone, so a result has to carry everything
its section shows: the command that reproduces it, the tables as displayed, the data for the plots
and the machine it ran on. `raw` keeps the module's full measurements (individual runs and the
like) for anyone who wants more than the tables.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REQUIRED = {"benchmark": str, "title": str, "command": str, "baseline": str, "tables": list}


def command_line(name: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces a run: `python -m bench.<name>` plus its arguments, minus `--json PATH`."""
    args = list(sys.argv[1:] if argv is None else argv)
    kept: list[str] = []
    skip = False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if arg == "--json":
            # `--json PATH`: drop the path too (bench.training also accepts a bare `--json`).
            skip = i + 1 < len(args) and not args[i + 1].startswith("--")
            continue
        if arg.startswith("--json="):
            continue
        kept.append(arg)
    return " ".join(["python", "-m", f"bench.{name}", *(shlex.quote(a) for a in kept)])


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu() -> str | None:
    """The GPU name when torch is already loaded by the benchmark (never imports torch just for this)."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - a broken CUDA setup must not lose the measurements
        return None
    return None


def machine_info() -> dict[str, Any]:
    """Where and when a result was measured; the load average says whether the machine was quiet."""
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "gpu": _gpu(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "ray": _version("ray"),
        "load_avg_1m": load,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def validate(result: Any) -> list[str]:
    """Problems that stop `bench.report` from rendering a result; an empty list means it is valid."""
    if not isinstance(result, dict):
        return [f"a result must be a JSON object, got {type(result).__name__}"]
    problems = [f"missing or non-{kind.__name__} field {key!r}" for key, kind in REQUIRED.items()
                if not isinstance(result.get(key), kind)]
    for i, table in enumerate(result.get("tables") or []):
        if not isinstance(table, dict) or not isinstance(table.get("columns"), list) or not isinstance(table.get("rows"), list):
            problems.append(f"tables[{i}] needs 'columns' and 'rows' lists")
            continue
        width = len(table["columns"])
        for j, row in enumerate(table["rows"]):
            if not isinstance(row, list) or len(row) != width:
                problems.append(f"tables[{i}].rows[{j}] must be a list of {width} cells (one per column)")
    series = result.get("series", {})
    if not isinstance(series, dict) or not all(isinstance(v, dict) for v in series.values()):
        problems.append("'series' must map a series name to {method: values}")
    if not isinstance(result.get("notes", []), list):
        problems.append("'notes' must be a list of strings")
    return problems


def finish(result: dict[str, Any], json_path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """Complete a result (defaults, machine), check it, and write it to `json_path` when given."""
    result.setdefault("series", {})
    result.setdefault("notes", [])
    result.setdefault("machine", machine_info())
    problems = validate(result)
    if problems:
        raise ValueError(f"bench.{result.get('benchmark')} built an invalid result: {'; '.join(problems)}")
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return result


def ratio(value: float) -> str:
    """A ratio as the tables show it: two decimals below 10, one above, then `×`."""
    return f"{value:.2f}×" if abs(value) < 10 else f"{value:.1f}×"


def target_note(label: str, value: float, target: float, *, at_least: bool = True, unit: str = "×") -> str:
    """One checked target, e.g. 'engine / loop (tiny): 5.70× (target ≥ 5×): met'."""
    met = value >= target if at_least else value <= target
    shown = ratio(value) if unit == "×" else f"{value:.1f} {unit}"
    sign = "≥" if at_least else "≤"
    return f"{label}: {shown} (target {sign} {target:g}{'×' if unit == '×' else ' ' + unit}): {'met' if met else 'not met'}"
