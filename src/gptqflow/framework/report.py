"""``gptqflow report``: one table (Markdown + CSV) and PNG plots from run directories.

A run directory is one that holds ``report.json`` (written by the runner, also when
the run failed) or ``recipe.yaml`` (written before any heavy work, so a run killed
midway, or one still running, leaves it behind) or Hydra's ``.hydra/config.yaml``
(a sweep job that died before writing anything else). ``DIR`` is either one run
directory or any directory above run directories (a Hydra multirun sweep); runs are
found recursively, and every run found is a row: a run without ``report.json`` is a
failed row saying so, never silently dropped.

Rows come in the natural order of their paths (``2`` before ``10``), so the same
directory always gives the same table. Plots use matplotlib's Agg canvas directly
(no pyplot, no display, no global backend switch).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gptqflow.errors import GptqflowError
from gptqflow.fileio import write_atomic

NO_REPORT = "no report.json: killed or still running"

# The fixed columns, in order: (key, Markdown/CSV header).
BASE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("run", "run"),
    ("status", "status"),
    ("scheme", "scheme"),
    ("bits", "bits"),
    ("group_size", "group size"),
    ("actorder", "actorder"),
    ("num_samples", "num_samples"),
    ("seq_len", "seq_len"),
    ("world_size", "world size"),
    ("ppl_baseline", "ppl baseline"),
    ("ppl_quantized", "ppl quantized"),
)
TAIL_COLUMNS: tuple[tuple[str, str], ...] = (
    ("total_s", "total s"),
    ("peak_rss_gib", "peak RSS GiB"),
    ("error", "error"),
)


@dataclass
class RunRow:
    """One run's line of the table; ``None`` means unknown (a blank cell)."""

    run: str
    status: str
    error: str | None = None
    scheme: str | None = None
    bits: int | None = None
    group_size: int | None = None
    actorder: str | None = None
    num_samples: int | None = None
    seq_len: int | None = None
    world_size: int | None = None
    ppl_baseline: float | None = None
    ppl_quantized: float | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    total_s: float | None = None
    peak_rss_gib: float | None = None

    def value(self, key: str) -> Any:
        if key.startswith("stage:"):
            return self.stage_seconds.get(key[len("stage:") :])
        return getattr(self, key)


@dataclass
class SweepReport:
    """Every run found under a directory, and the stage ids seen (in execution order)."""

    root: Path
    rows: list[RunRow]
    stages: list[str]

    def columns(self) -> list[tuple[str, str]]:
        stage_cols = [(f"stage:{s}", f"{s} s") for s in self.stages]
        return [*BASE_COLUMNS, *stage_cols, *TAIL_COLUMNS]

    @property
    def failed(self) -> list[RunRow]:
        return [r for r in self.rows if r.status != "ok"]


@dataclass(frozen=True)
class Written:
    """The files one ``gptqflow report`` wrote."""

    markdown: Path
    csv: Path
    plots: list[Path]


# ---------------------------------------------------------------------- finding runs
def is_run_dir(path: Path) -> bool:
    """A directory some run used: its report, its resolved recipe, or Hydra's job config."""
    return (
        (path / "report.json").is_file()
        or (path / "recipe.yaml").is_file()
        or (path / ".hydra" / "config.yaml").is_file()
    )


def _natural_key(rel: str) -> list[tuple[int, int | str]]:
    """Sort key that orders ``2`` before ``10`` inside every path component."""
    return [(0, int(tok)) if tok.isdigit() else (1, tok) for tok in re.split(r"(\d+)", rel) if tok]


def find_runs(root: Path) -> list[Path]:
    """Run directories at or under ``root``, in natural path order.

    A run directory's own sub-directories (``checkpoint/``, ``.hydra/``) are not
    searched: a run never contains another run. Hidden directories are skipped.
    """
    if not root.is_dir():
        raise GptqflowError(f"{root}: not a directory; give a run directory or a sweep directory")
    if is_run_dir(root):
        return [root]
    found: list[Path] = []
    for dirpath, dirnames, _files in os.walk(root):
        here = Path(dirpath)
        if here != root and is_run_dir(here):
            found.append(here)
            dirnames.clear()
            continue
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return sorted(found, key=lambda p: _natural_key(p.relative_to(root).as_posix()))


# ---------------------------------------------------------------------- reading runs
def _get(data: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(data, dict) or k not in data:
            return None
        data = data[k]
    return data


def _plain(value: Any) -> Any:
    """A recipe value, or None when it is an unresolved interpolation (``${...}``)."""
    return None if isinstance(value, str) and "${" in value else value


def _from_recipe(row: RunRow, recipe: dict[str, Any]) -> None:
    """Fill the settings of a run that has no report from its (resolved) recipe."""
    row.scheme = _plain(_get(recipe, "scheme", "name"))
    row.bits = _plain(_get(recipe, "scheme", "bits"))
    row.group_size = _plain(_get(recipe, "scheme", "group_size"))
    row.actorder = _plain(_get(recipe, "scheme", "actorder"))
    row.num_samples = _plain(_get(recipe, "dataset", "num_samples"))
    row.seq_len = _plain(_get(recipe, "dataset", "seq_len"))
    row.world_size = _plain(_get(recipe, "runtime", "nproc_per_node"))


def _from_report(row: RunRow, report: dict[str, Any]) -> None:
    row.status = str(report.get("status") or "unknown")
    row.error = report.get("error")
    for key in ("scheme", "bits", "group_size", "actorder", "num_samples", "seq_len"):
        setattr(row, key, report.get(key))
    row.world_size = report.get("world_size")
    row.ppl_baseline = _get(report, "perplexity", "baseline")
    row.ppl_quantized = _get(report, "perplexity", "quantized")
    stages = report.get("stages") or {}
    row.stage_seconds = {
        str(k): float(v["seconds"])
        for k, v in stages.items()
        if isinstance(v, dict) and "seconds" in v
    }
    row.total_s = report.get("seconds")
    ranks = [r for r in report.get("ranks") or [] if isinstance(r, dict)]
    peaks = [float(r["peak_rss_bytes"]) for r in ranks if isinstance(r.get("peak_rss_bytes"), int)]
    row.peak_rss_gib = max(peaks) / 2**30 if peaks else None


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def read_run(run_dir: Path, root: Path) -> RunRow:
    """One run's row: from its ``report.json``, or a failed row from its recipe."""
    rel = run_dir.relative_to(root).as_posix()
    row = RunRow(run=rel if rel != "." else run_dir.name, status="failed")
    report_file = run_dir / "report.json"
    if report_file.is_file():
        try:
            report = json.loads(report_file.read_text())
        except (OSError, ValueError) as exc:
            row.error = f"report.json unreadable: {exc}"
        else:
            if isinstance(report, dict):
                _from_report(row, report)
                return row
            row.error = "report.json unreadable: not a JSON object"
    else:
        row.error = NO_REPORT
    recipe = run_dir / "recipe.yaml"
    _from_recipe(
        row, _load_yaml(recipe if recipe.is_file() else run_dir / ".hydra" / "config.yaml")
    )
    return row


def collect(root: Path) -> SweepReport:
    """Every run under ``root`` as a row; a clear error when there is none."""
    runs = find_runs(root)
    if not runs:
        raise GptqflowError(
            f"{root}: no runs found (a run directory holds report.json or recipe.yaml; "
            "give the output_dir of a run or of a `gptqflow run -m` sweep)"
        )
    rows = [read_run(r, root) for r in runs]
    stages: list[str] = []
    for row in rows:
        stages.extend(s for s in row.stage_seconds if s not in stages)
    return SweepReport(root=root, rows=rows, stages=stages)


# ---------------------------------------------------------------------- tables
def _cell(value: Any, key: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        if key.startswith("ppl_"):
            return f"{value:.4f}"
        if key == "peak_rss_gib":
            return f"{value:.3f}"
        return f"{value:.2f}"
    return str(value)


def to_csv(report: SweepReport) -> str:
    """The table as CSV (full error text; numbers as in the Markdown)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    cols = report.columns()
    writer.writerow([h for _, h in cols])
    for row in report.rows:
        writer.writerow([_cell(row.value(k), k) for k, _ in cols])
    return buf.getvalue()


def _md_escape(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def to_markdown(report: SweepReport, plots: Sequence[Path] = ()) -> str:
    """The table as Markdown, with a one-line count and links to the plots."""
    cols = report.columns()
    n, bad = len(report.rows), len(report.failed)
    lines = [
        f"# gptqflow report: {report.root}",
        "",
        f"{n} run(s), {n - bad} ok, {bad} failed. Seconds are wall time per stage on rank 0; "
        "peak RSS is the largest rank's.",
        "",
        "| " + " | ".join(h for _, h in cols) + " |",
        "|" + "|".join(" ---: " if _numeric(k) else " --- " for k, _ in cols) + "|",
    ]
    for row in report.rows:
        lines.append("| " + " | ".join(_md_escape(_cell(row.value(k), k)) for k, _ in cols) + " |")
    if plots:
        lines.append("")
        lines.extend(f"![{p.stem}]({p.name})" for p in plots)
    return "\n".join(lines) + "\n"


def _numeric(key: str) -> bool:
    return key.startswith(("stage:", "ppl_")) or key in (
        "bits",
        "group_size",
        "num_samples",
        "seq_len",
        "world_size",
        "total_s",
        "peak_rss_gib",
    )


# ---------------------------------------------------------------------- plots
# Settings that may distinguish the runs of a sweep besides the plotted axis.
_SERIES_KEYS = ("scheme", "bits", "group_size", "actorder", "num_samples", "seq_len", "world_size")


def _label_group_size(g: Any) -> str:
    return "channel" if g == -1 else f"g{g}"


def _varying(rows: Sequence[RunRow], keys: Iterable[str]) -> list[str]:
    return [k for k in keys if len({getattr(r, k) for r in rows}) > 1]


def plot_perplexity(report: SweepReport, path: Path) -> bool:
    """Quantized perplexity against bits (or group size when bits do not vary).

    One line per combination of the other settings that vary across the sweep
    (e.g. num_samples), the float baseline as a dashed line. Returns False (and
    writes nothing) when no run has a quantized perplexity.
    """
    rows = [r for r in report.rows if r.status == "ok" and r.ppl_quantized is not None]
    if not rows:
        return False
    if len({r.bits for r in rows}) > 1 or len({r.group_size for r in rows}) == 1:
        x_key, x_label = "bits", "weight bits"
    else:
        x_key, x_label = "group_size", "group size (-1 = per channel)"
    series_keys = [k for k in _varying(rows, _SERIES_KEYS) if k not in (x_key, "scheme")]
    series: dict[tuple[Any, ...], list[RunRow]] = {}
    for r in rows:
        series.setdefault(tuple(getattr(r, k) for k in series_keys), []).append(r)

    fig, ax = _figure(6.4, 4.2)
    xs_all = sorted({getattr(r, x_key) for r in rows}, key=lambda v: (v is None, v))
    pos = {v: i for i, v in enumerate(xs_all)}
    for key in sorted(series, key=lambda k: tuple(str(v) for v in k)):
        pts = sorted(series[key], key=lambda r: pos[getattr(r, x_key)])
        label = ", ".join(
            _label_group_size(v) if k == "group_size" else f"{k}={v}"
            for k, v in zip(series_keys, key)
        )
        ax.plot(
            [pos[getattr(r, x_key)] for r in pts],
            [r.ppl_quantized for r in pts],
            marker="o",
            label=label or "quantized",
        )
    baselines = sorted({r.ppl_baseline for r in rows if r.ppl_baseline is not None})
    for i, b in enumerate(baselines):
        ax.axhline(b, linestyle="--", color="gray", label="float baseline" if i == 0 else None)
    ax.set_xticks(range(len(xs_all)))
    ax.set_xticklabels([_label_group_size(v) if x_key == "group_size" else str(v) for v in xs_all])
    ax.set_xlabel(x_label)
    ax.set_ylabel("perplexity (lower is better)")
    values = [r.ppl_quantized for r in rows if r.ppl_quantized] + baselines
    if values and max(values) / max(min(values), 1e-9) > 10:
        ax.set_yscale("log")
    ax.set_title("Perplexity after quantization")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)
    return True


def plot_stage_times(report: SweepReport, path: Path) -> bool:
    """One horizontal bar per run, stacked by stage (wall seconds on rank 0)."""
    rows = [r for r in report.rows if r.stage_seconds]
    if not rows:
        return False
    fig, ax = _figure(7.5, 1.2 + 0.45 * len(rows))
    shown = ["scheme", *(k for k in _varying(rows, _SERIES_KEYS) if k not in ("scheme", "bits"))]
    labels = [_run_label(r, shown) for r in rows]
    left = [0.0] * len(rows)
    cmap = _colors(len(report.stages))
    for color, stage in zip(cmap, report.stages):
        widths = [r.stage_seconds.get(stage, 0.0) for r in rows]
        ax.barh(range(len(rows)), widths, left=left, label=stage, color=color)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize="small")
    ax.invert_yaxis()  # first run on top, like the table
    ax.set_xlabel("wall seconds")
    ax.set_title("Time per stage")
    ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    _save(fig, path)
    return True


def _run_label(row: RunRow, keys: Sequence[str]) -> str:
    """``3: w3a16 num_samples=128``: the run and the settings that tell it apart."""
    parts = [
        str(row.scheme or "?") if k == "scheme" else f"{k}={getattr(row, k)}"
        for k in keys
        if k == "scheme" or getattr(row, k) is not None
    ]
    failed = " (failed)" if row.status != "ok" else ""
    return f"{row.run}: {' '.join(parts)}{failed}"


def _figure(width: float, height: float) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab20" if n > 10 else "tab10"]
    return [cmap(i % cmap.N) for i in range(n)]


def _save(fig: Any, path: Path) -> None:
    write_atomic(
        path,
        lambda f: fig.savefig(f, format="png", bbox_inches="tight", metadata={"Software": None}),
    )


# ---------------------------------------------------------------------- entry point
def write_report(root: Path, output: Path | None = None, *, plots: bool = True) -> Written:
    """Collect the runs under ``root``; write ``output`` (Markdown), its CSV and PNG plots.

    ``output`` defaults to ``root/report.md``; the CSV and plots share its stem
    (``report.csv``, ``report-perplexity.png``, ``report-stages.png``).
    """
    report = collect(root)
    md = output if output is not None else root / "report.md"
    if md.suffix != ".md":
        raise GptqflowError(f"--output {md}: give a Markdown file name ending in .md")
    if not md.parent.is_dir():
        raise GptqflowError(f"--output {md}: directory {md.parent} does not exist")
    written: list[Path] = []
    if plots:
        ppl, times = (md.with_name(f"{md.stem}-{k}.png") for k in ("perplexity", "stages"))
        if plot_perplexity(report, ppl):
            written.append(ppl)
        if plot_stage_times(report, times):
            written.append(times)
    csv_path = md.with_suffix(".csv")
    write_atomic(csv_path, to_csv(report))
    write_atomic(md, to_markdown(report, written))
    return Written(markdown=md, csv=csv_path, plots=written)
