"""What the benchmarks read from a finished run: its stages by kind, the layer loop's time, the machine.

report.json keys its ``stages`` by stage id, and the ids are whatever the recipe names
(``baseline``/``quantized`` are two ``evaluate`` stages in the shipped recipes). So a
benchmark never guesses a stage's kind from its id: it reads the run's resolved recipe
(``recipe.yaml``, or the composed dict), where an entry's ``stage:`` names its kind
(absent: the id; an entry set to null was removed; ``after:`` moves one), read by the
validation's own ``stage_entries``. Which stages ran inside the layer
loop is what the report's per-layer entries time (``layers[].stages``); the loop's own
time (input capture, forward passes) is under
``gptqflow.framework.layerloop.LOOP_KEY`` (``layer-loop``).

Nothing here loads the stage plugins (the registry imports every stage): a benchmark's
own process only reads the files its runs wrote, so a tree edited while it runs cannot
break it after an hour of measuring.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from gptqflow.framework.layerloop import LOOP_KEY
from gptqflow.framework.schema import stage_entries

__all__ = [
    "LOOP_KEY",
    "code_state",
    "cpu_model",
    "ids_of_kind",
    "layer_stage_ids",
    "loop_seconds",
    "read_run",
    "stage_kinds",
    "visible_cores",
]


def stage_kinds(stages: Mapping[str, Any]) -> dict[str, str]:
    """Stage id -> stage kind, in pipeline order, from a resolved recipe's ``stages`` mapping.

    ``stage:`` defaults to the id; an entry set to null was removed and is left out.
    """
    entries, problems = stage_entries(stages)
    if problems:
        raise ValueError("; ".join(f"{p.path}: {p.message}" for p in problems))
    return {sid: str(entry["stage"]) for sid, entry in entries}


def layer_stage_ids(report: Mapping[str, Any]) -> list[str]:
    """The ids of the stages that ran in the layer loop, in order (from ``layers[].stages``)."""
    ids: list[str] = []
    for layer in report.get("layers") or []:
        ids += [sid for sid in layer.get("stages", {}) if sid not in ids]
    return ids


def ids_of_kind(kinds: Mapping[str, str], *names: str) -> list[str]:
    """The ids of the stages of any of the kinds ``names`` (e.g. every ``evaluate``)."""
    return [sid for sid, kind in kinds.items() if kind in names]


def loop_seconds(report: Mapping[str, Any]) -> float:
    """Wall seconds of the layer loop: its own time plus every layer stage's (rank 0)."""
    st = report["stages"]
    ids = [LOOP_KEY, *layer_stage_ids(report)]
    return sum(float(st[k]["seconds"]) for k in ids if k in st)


def read_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """A run directory's report.json and the stage kinds of its recipe.yaml."""
    report = json.loads((run_dir / "report.json").read_text())
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    return report, stage_kinds(recipe["stages"])


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's words elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def visible_cores() -> int:
    """Cores this process may run on (its affinity mask), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def code_state() -> str:
    """The commit plus a hash of the uncommitted diff of tracked files.

    Why: the project is edited while benchmarks run; each run records the code it
    imported so a table mixing two code states is flagged instead of trusted.
    """
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        diff = subprocess.run(
            ["git", "-C", str(root), "diff", "HEAD", "--", "src", "recipes"],
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head if not diff else f"{head}+dirty:{hashlib.sha1(diff).hexdigest()[:8]}"
