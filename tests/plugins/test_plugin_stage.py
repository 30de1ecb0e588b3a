"""A stage from another installed package: found through the entry point, run, linted, resumed.

``gptqflow-normscale`` (next to this file, also the walkthrough of docs/plugins.md) is
installed with pip into a folder of its own, which only the spawned ``gptqflow``
processes see on their ``PYTHONPATH``: the test process's registry keeps the built-in
stages only. The plugin's ``norm-scale`` stage changes weights outside the quantized
modules (every norm of a layer), which is exactly what a resume point must keep.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gptqflow.framework.compose import recipes_dir

PLUGIN = Path(__file__).parent / "gptqflow-normscale"
WEIGHTS = "checkpoint/model.safetensors"
SMALL = [
    "dataset.num_samples=4",
    "dataset.seq_len=32",
    "dataset.eval_tokens=256",
    "runtime.progress=false",
    "runtime.num_threads=1",
]
DERIVED = """\
# The default GPTQ recipe with the plugin's stage before the layer's quantization.
defaults:
  - gptq_w4a16
  - _self_

stages:
  norm-scale: {factor: 1.25, after: baseline}
"""
MISPLACED = """\
# norm-scale before partition: no calibration samples yet, so no layer inputs.
defaults:
  - gptq_w4a16
  - _self_

stages:
  norm-scale: {after: load}
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plugin installed by pip (metadata, entry point and all) into its own folder."""
    out = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("source") / PLUGIN.name
    shutil.copytree(PLUGIN, source)  # pip builds in the source tree: never in the checkout
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(out),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert list(out.glob("gptqflow_normscale-*.dist-info"))
    return out


@pytest.fixture(scope="module")
def recipes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in recipes plus two that use the plugin."""
    out = tmp_path_factory.mktemp("recipes") / "recipes"
    shutil.copytree(recipes_dir(), out)
    (out / "normscale.yaml").write_text(DERIVED)
    (out / "misplaced.yaml").write_text(MISPLACED)
    return out


def gptqflow(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "gptqflow", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_test_process_sees_only_built_in_stages() -> None:
    from gptqflow.framework.registry import registered

    assert "norm-scale" not in registered()


@pytest.mark.slow  # three CLI processes; the plugin runs at 1 and 2 ranks by default
def test_stages_schema_and_lint_find_the_plugin(site: Path, recipes: Path, tmp_path: Path) -> None:
    listed = gptqflow(site, "stages", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "norm-scale" in listed.stdout and "factor" in listed.stdout
    schema = gptqflow(site, "schema", cwd=tmp_path)
    assert schema.returncode == 0, schema.stderr
    assert '"norm-scale"' in schema.stdout
    clean = gptqflow(site, "lint", str(recipes / "normscale.yaml"), cwd=tmp_path)
    assert clean.returncode == 0, clean.stdout + clean.stderr


def test_plugin_stage_passes_the_conformance_suite(site: Path, tmp_path: Path) -> None:
    got = _python(
        site,
        "import runpy; runpy.run_module('gptqflow.testing', run_name='__main__')",
        cwd=tmp_path,
    )
    assert got.returncode == 0 and "ok: 10 stage(s) conform" in got.stdout, got.stdout + got.stderr


def test_misplaced_plugin_stage_is_a_lint_error_at_its_line(
    site: Path, recipes: Path, tmp_path: Path
) -> None:
    path = recipes / "misplaced.yaml"
    got = gptqflow(site, "lint", str(path), cwd=tmp_path)
    assert got.returncode == 1, got.stdout + got.stderr
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if "norm-scale:" in t)
    pattern = rf"{re.escape(str(path))}:{line}:\d+: stages\.norm-scale: 'norm-scale' requires 'layer\.inputs'"
    assert re.search(pattern, got.stdout + got.stderr), got.stdout + got.stderr
    assert "provided by: partition" in got.stdout + got.stderr


def _run(site: Path, recipes: Path, model: Path, out: Path, *extra: str) -> dict[str, object]:
    got = gptqflow(
        site,
        "run",
        "--config-dir",
        str(recipes),
        "--config-name",
        "normscale",
        f"model.path={model}",
        f"output_dir={out}",
        *SMALL,
        *extra,
        cwd=out.parent,
    )
    assert got.returncode == 0, got.stderr[-3000:]
    return dict(json.loads((out / "report.json").read_text()))


def test_plugin_stage_runs_at_one_and_two_ranks(
    site: Path, recipes: Path, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    one = _run(site, recipes, tiny_llama_dir, tmp_path / "one")
    two = _run(site, recipes, tiny_llama_dir, tmp_path / "two", "runtime.nproc_per_node=2")
    assert "norm-scale" in one["stages"] and two["world_size"] == 2  # type: ignore[operator]
    assert all(layer["input_rms"] > 0 for layer in one["layers"])  # type: ignore[attr-defined]
    weights = (tmp_path / "one" / WEIGHTS).read_bytes()
    assert weights == (tmp_path / "two" / WEIGHTS).read_bytes()
    # The stage did change the model: without it the checkpoint differs. The plain recipe
    # needs no plugin, so it runs in this process (no interpreter to start).
    import gptqflow as api

    api.run(
        "gptq_w4a16", [f"model.path={tiny_llama_dir}", f"output_dir={tmp_path / 'plain'}", *SMALL]
    )
    assert weights != (tmp_path / "plain" / WEIGHTS).read_bytes()


# Runs in a spawned interpreter: SIGKILL itself right after the resume point of layer 1.
_KILL_AFTER_LAYER_1 = """
import os, signal, sys
from gptqflow.framework.resume import ResumePoints
original = ResumePoints.after_layer
def after_layer(self, state, layer, stages, n_layers):
    original(self, state, layer, stages, n_layers)
    if layer.index == 0:
        os.kill(os.getpid(), signal.SIGKILL)
ResumePoints.after_layer = after_layer
from gptqflow.cli import main
sys.exit(main(sys.argv[1:]))
"""
# A resume whose plugin forgets its layers: the test must notice the difference.
_FORGETFUL_RESUME = """
import sys
from gptqflow_normscale import NormScaleStage
NormScaleStage.restore_layer = lambda self, layer, saved, ctx: None
from gptqflow.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _python(site: Path, code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_plugin_changes_survive_a_kill_and_resume(
    site: Path, recipes: Path, tiny_llama3_dir: Path, tmp_path: Path
) -> None:
    args = [
        "run",
        "--config-dir",
        str(recipes),
        "--config-name",
        "normscale",
        f"model.path={tiny_llama3_dir}",
        *SMALL,
        "runtime.checkpoint_every=1",
    ]
    reference = tmp_path / "reference"
    _run(site, recipes, tiny_llama3_dir, reference, "runtime.checkpoint_every=1")
    killed = tmp_path / "killed"
    got = _python(site, _KILL_AFTER_LAYER_1, *args, f"output_dir={killed}", cwd=tmp_path)
    assert got.returncode == -signal.SIGKILL, got.stderr[-3000:]
    manifest = json.loads((killed / "resume" / "manifest.json").read_text())
    assert manifest["layers_done"] == 1 and not (killed / "checkpoint").exists()
    forgetful = tmp_path / "forgetful"
    shutil.copytree(killed, forgetful)

    resumed = gptqflow(site, *args, f"output_dir={killed}", "runtime.resume=true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (killed / WEIGHTS).read_bytes() == (reference / WEIGHTS).read_bytes()

    got = _python(
        site,
        _FORGETFUL_RESUME,
        *args,
        f"output_dir={forgetful}",
        "runtime.resume=true",
        cwd=tmp_path,
    )
    assert got.returncode == 0, got.stderr[-3000:]
    assert (forgetful / WEIGHTS).read_bytes() != (reference / WEIGHTS).read_bytes()
