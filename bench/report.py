"""Render BENCHMARKS.md and its plots from bench results (bench/contract.py) and hand-written notes.

Rendering only: nothing here runs a benchmark. `bench.all` runs them and calls `render_files`.

- Results: one JSON per benchmark in `bench/results/<name>.json`. A benchmark that was not rerun
  keeps the section its stored result renders, so the file can always be rebuilt without rerunning
  anything (`python -m bench.all --render-only`).
- Notes: the prose of each section, written by people, in `bench/notes/<name>.md`; `intro.md` goes
  under the title. A note may place the generated parts with markers on their own line:
  `<!-- bench:command -->`, `<!-- bench:baseline -->`, `<!-- bench:run -->`, `<!-- bench:tables -->`,
  `<!-- bench:notes -->`, `<!-- bench:plots -->`, and `<!-- bench:results -->` for every part not
  placed elsewhere. Without markers the generated parts come first, then the prose. A note with no
  result behind it (e.g. the r1-tiny training figures, produced by `r1 eval`, not a bench module)
  is rendered as it is when it starts with its own heading.
- Plots: `bench/plots/<benchmark>_<series>.png` from each result's `series`: pairs `[x, y]` become
  a line plot (throughput vs concurrency), plain lists of seconds become a latency CDF.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.contract import validate

BENCH_DIR = Path(__file__).parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
NOTES_DIR = BENCH_DIR / "notes"
PLOTS_DIR = BENCH_DIR / "plots"
OUTPUT = ROOT / "BENCHMARKS.md"

# Section order; names not listed follow in alphabetical order.
ORDER = ["engine", "serving", "prefix_cache", "lora", "safety", "sandbox", "sessions", "cpu_speed", "training", "tiny_training"]
INTRO = "intro"
PARTS = ["command", "baseline", "run", "tables", "notes", "plots"]
MARKER = re.compile(r"^[ \t]*<!--\s*bench:(\w+)\s*-->[ \t]*$", re.MULTILINE)

SERIES_LABELS = {
    "throughput_vs_concurrency": ("throughput vs concurrency", "concurrent requests", "tokens/s"),
    "latency_cdf": ("latency CDF", "latency", "cumulative fraction"),
}


# --- loading ---------------------------------------------------------------------------------------

def load_results(results_dir: Path = RESULTS_DIR) -> list[dict[str, Any]]:
    """Every stored result, checked against the contract (a broken file is an error naming it)."""
    import json

    results = []
    for path in sorted(Path(results_dir).glob("*.json")):
        result = json.loads(path.read_text(encoding="utf-8"))
        problems = validate(result)
        if problems:
            raise ValueError(f"{path} is not a bench result: {'; '.join(problems)}; rerun its benchmark or fix the file")
        results.append(result)
    return results


def load_notes(notes_dir: Path = NOTES_DIR) -> dict[str, str]:
    """The hand-written prose per section name (file stem)."""
    return {path.stem: path.read_text(encoding="utf-8") for path in sorted(Path(notes_dir).glob("*.md"))}


# --- markdown pieces -------------------------------------------------------------------------------

def format_cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(table: dict[str, Any]) -> str:
    lines = []
    if table.get("title"):
        lines += [f"*{table['title']}*", ""]
    lines.append("| " + " | ".join(format_cell(c) for c in table["columns"]) + " |")
    lines.append("|" + "---|" * len(table["columns"]))
    lines += ["| " + " | ".join(format_cell(c) for c in row) + " |" for row in table["rows"]]
    return "\n".join(lines)


def machine_line(machine: dict[str, Any]) -> str:
    """'Intel Xeon, 2 cores, no GPU' from a result's machine record."""
    parts = [str(machine.get("cpu") or "unknown CPU")]
    if machine.get("cores"):
        parts.append(f"{machine['cores']} cores")
    parts.append(f"GPU {machine['gpu']}" if machine.get("gpu") else "no GPU")
    return ", ".join(parts)


def run_line(result: dict[str, Any]) -> str:
    machine = result.get("machine") or {}
    words = [f"Measured {machine.get('date', 'at an unrecorded date')} on {machine_line(machine)}"]
    versions = ", ".join(f"{k} {machine[k]}" for k in ("torch", "ray") if machine.get(k))
    if versions:
        words.append(versions)
    if machine.get("load_avg_1m") is not None:
        words.append(f"load average {machine['load_avg_1m']}")
    if result.get("elapsed_s") is not None:
        words.append(f"run time {result['elapsed_s']:.0f} s")
    line = "; ".join(words) + "."
    if result.get("source"):
        line += f" {str(result['source'])[0].upper()}{str(result['source'])[1:]}."
    return f"*{line}*"


def plot_links(result: dict[str, Any], plots: dict[str, Path], link_dir: Path) -> str:
    links = []
    for series, path in plots.items():
        title = SERIES_LABELS.get(series, (series.replace("_", " "),))[0]
        links.append(f"![{result['title']}: {title}]({Path(os.path.relpath(path, link_dir)).as_posix()})")
    return "\n\n".join(links)


def generated_parts(result: dict[str, Any], plots: dict[str, Path], link_dir: Path) -> dict[str, str]:
    return {
        "command": "    " + result["command"],
        "baseline": f"**Baseline, measured in the same run.** {result['baseline']}",
        "run": run_line(result),
        "tables": "\n\n".join(markdown_table(t) for t in result["tables"]),
        "notes": "\n".join(f"- {note}" for note in result.get("notes", [])),
        "plots": plot_links(result, plots, link_dir),
    }


def fill_template(notes: str, parts: dict[str, str], where: str) -> str:
    """Put the generated parts where the note's markers say (see the module docstring)."""
    text = notes.strip("\n")  # not strip(): a leading indented code block must keep its indent
    if not MARKER.search(text):
        text = "<!-- bench:results -->\n\n" + text
    placed = set(MARKER.findall(text))
    unknown = placed - set(PARTS) - {"results"}
    if unknown:
        shown = ", ".join(f"<!-- bench:{name} -->" for name in sorted(unknown))
        raise ValueError(f"{where}: unknown marker(s) {shown}; the parts are {', '.join(PARTS + ['results'])}")
    rest = "\n\n".join(parts[p] for p in PARTS if p not in placed and parts[p])

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        return rest if name == "results" else parts[name]

    text = MARKER.sub(replace, text)
    if "results" not in placed and rest:
        text += "\n\n" + rest
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def render_section(result: dict[str, Any] | None, notes: str | None, name: str,
                   plots: dict[str, Path], link_dir: Path) -> str:
    if result is None:
        text = re.sub(r"\n{3,}", "\n\n", MARKER.sub("", notes or "")).strip("\n")
        if text.startswith("#"):
            return text
        placeholder = f"*No results yet: run `python -m bench.all --only {name}`.*"
        return f"## {name}\n\n{placeholder}" + (f"\n\n{text}" if text else "")
    heading = f"## {result['title']} (`bench/{result['benchmark']}.py`)"
    body = fill_template(notes or "", generated_parts(result, plots, link_dir), f"bench/notes/{name}.md")
    return f"{heading}\n\n{body}"


def runs_table(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        m = r.get("machine") or {}
        rows.append([f"[{r['title']}](#{anchor(r)})", m.get("date"), machine_line(m), m.get("torch"), m.get("ray"),
                     m.get("load_avg_1m"), "transcribed" if r.get("source") else
                     (f"{r['elapsed_s']:.0f} s" if r.get("elapsed_s") is not None else None)])
    return markdown_table({"columns": ["benchmark", "measured", "machine", "torch", "ray", "load avg (1 min)",
                                       "run time / source"], "rows": rows})


def anchor(result: dict[str, Any]) -> str:
    """GitHub's anchor for a section heading `## Title (`bench/name.py`)`."""
    heading = f"{result['title']} (bench/{result['benchmark']}.py)".lower()
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def section_names(results: dict[str, dict[str, Any]], notes: dict[str, str]) -> list[str]:
    names = (set(results) | set(notes)) - {INTRO}
    return [n for n in ORDER if n in names] + sorted(names - set(ORDER))


# --- plots -----------------------------------------------------------------------------------------

def plot_series(title_prefix: str, series: str, data: dict[str, Any], path: Path) -> bool:
    """Write one PNG for a series; False when the data has nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {method.replace("`", ""): values for method, values in data.items() if values}
    if not data:
        return False
    is_pairs = all(isinstance(v[0], (list, tuple)) for v in data.values())
    title, xlabel, ylabel = SERIES_LABELS.get(series, (series.replace("_", " "), "", ""))
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    try:
        if is_pairs:
            xs_all = sorted({float(x) for values in data.values() for x, _ in values})
            for method, values in data.items():
                points = sorted((float(x), float(y)) for x, y in values)
                ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=method)
            if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 8:
                ax.set_xscale("log", base=2)
            ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all])
            ax.set_ylim(bottom=0)
        else:
            top = max(float(v) for values in data.values() for v in values)
            scale, unit = (1000.0, "ms") if top < 2 else (1.0, "s")
            for method, values in data.items():
                ordered = sorted(float(v) * scale for v in values)
                fractions = [(i + 1) / len(ordered) for i in range(len(ordered))]
                ax.step([ordered[0], *ordered], [0.0, *fractions], where="post", label=f"{method} (n={len(ordered)})")
            xlabel = f"{xlabel or 'value'} ({unit})"
            ax.set_ylim(0, 1.02)
        ax.set_title(f"{title_prefix}: {title}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", metadata={"Software": None})
    finally:
        plt.close(fig)
    return True


def render_plots(result: dict[str, Any], plots_dir: Path) -> dict[str, Path]:
    written = {}
    for series, data in (result.get("series") or {}).items():
        path = Path(plots_dir) / f"{result['benchmark']}_{series}.png"
        if plot_series(result["title"], series, data, path):
            written[series] = path
    return written


# --- the document ----------------------------------------------------------------------------------

def render(results: Iterable[dict[str, Any]], notes: dict[str, str], plots_dir: Path = PLOTS_DIR,
           output: Path = OUTPUT, banner: str | None = None) -> str:
    """The markdown of BENCHMARKS.md; writes the plots (and removes stale ones) under `plots_dir`."""
    by_name = {r["benchmark"]: r for r in results}
    link_dir = Path(output).resolve().parent
    plots_dir = Path(plots_dir)
    written: dict[str, dict[str, Path]] = {name: render_plots(r, plots_dir) for name, r in by_name.items()}
    keep = {p.resolve() for plots in written.values() for p in plots.values()}
    for stale in plots_dir.glob("*.png") if plots_dir.is_dir() else []:
        if stale.resolve() not in keep:
            stale.unlink()

    lines = ["# r1-cluster benchmarks", "",
             "<!-- Generated by `python -m bench.all` from bench/results/*.json and bench/notes/*.md: "
             "edit those and rerun `python -m bench.all --render-only`, not this file. -->"]
    if banner:
        lines += ["", f"**{banner}**"]
    if notes.get(INTRO, "").strip():
        lines += ["", notes[INTRO].strip()]
    lines += ["", "Run every benchmark and rebuild this file with `python -m bench.all` (one: "
                  "`--only engine`; rebuild from the stored results without running anything: `--render-only`)."]
    ordered = [by_name[n] for n in section_names(by_name, notes) if n in by_name]
    if ordered:
        lines += ["", runs_table(ordered)]
    for name in section_names(by_name, notes):
        lines += ["", render_section(by_name.get(name), notes.get(name), name, written.get(name, {}), link_dir)]
    return "\n".join(lines).rstrip() + "\n"


def render_files(results_dir: Path = RESULTS_DIR, notes_dir: Path = NOTES_DIR, plots_dir: Path = PLOTS_DIR,
                 output: Path = OUTPUT, banner: str | None = None) -> Path:
    """Load the stored results and notes, write `output` and the plots; returns `output`."""
    text = render(load_results(results_dir), load_notes(notes_dir), plots_dir, output, banner)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(text, encoding="utf-8")
    return Path(output)
