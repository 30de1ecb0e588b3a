"""Resume points, in one process: a run stopped after layer 1 of 3 and resumed writes the same bytes.

The crash here is an exception raised right after the resume point of layer 1 is
written (fast, in-process); tests/distributed/test_resume_kill.py does the same with SIGKILL
on spawned ranks. What is checked: the resumed checkpoint is byte-identical to an
uninterrupted run's, the quantized perplexity is the same float (so the reinstalled
weights are the ones broadcast installed), a partial point is ignored, and a point of
another recipe, world size or a damaged one is refused with a message saying why.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from gptqflow.framework.compose import compose_recipe
from gptqflow.framework.distributed import DistContext
from gptqflow.framework.resume import (
    FORMAT,
    MANIFEST,
    RESUME_DIR,
    ResumeError,
    ResumePoints,
    checkpoint_interval,
    recipe_differences,
)
from gptqflow.framework.runner import Runner
from gptqflow.framework.schema import validate_recipe
from gptqflow.framework.state import GroupRun, LayerRun

SMALL = [
    "dataset.num_samples=4",
    "dataset.seq_len=32",
    "dataset.eval_tokens=256",
    "runtime.progress=false",
    "runtime.checkpoint_every=1",
]
WEIGHTS = "checkpoint/model.safetensors"


class _Crash(BaseException):
    """Stands for the process dying: nothing after it runs (no ``except Exception`` eats it)."""


def _resolved(model: Path, out: Path, *extra: str) -> dict[str, Any]:
    return compose_recipe(
        "gptq_w4a16", [f"model.path={model}", f"output_dir={out}", *SMALL, *extra]
    )


def run(model: Path, out: Path, *extra: str) -> dict[str, Any]:
    resolved = _resolved(model, out, *extra)
    return Runner(validate_recipe(resolved), resolved, DistContext()).run()


@contextmanager
def crash_after_point(layers_done: int) -> Iterator[None]:
    """Raise _Crash as soon as the resume point covering ``layers_done`` layers is on disk."""
    original = ResumePoints.after_layer

    def after_layer(
        self: ResumePoints, state: Any, layer: LayerRun, stages: Any, n_layers: int
    ) -> None:
        original(self, state, layer, stages, n_layers)
        if layer.index + 1 == layers_done:
            raise _Crash

    ResumePoints.after_layer = after_layer  # type: ignore[method-assign]
    try:
        yield
    finally:
        ResumePoints.after_layer = original  # type: ignore[method-assign]


def manifest(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / RESUME_DIR / MANIFEST).read_text()))


@pytest.fixture(scope="module")
def reference(
    tiny_llama3_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    """An uninterrupted run (resume points written, then deleted)."""
    out = tmp_path_factory.mktemp("reference")
    return out, run(tiny_llama3_dir, out)


@pytest.fixture(scope="module")
def crashed(tiny_llama3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run that died right after the resume point of layer 1 (of 3) was written."""
    out = tmp_path_factory.mktemp("crashed")
    with crash_after_point(1), pytest.raises(_Crash):
        run(tiny_llama3_dir, out)
    return out


@pytest.fixture
def interrupted(crashed: Path, tmp_path: Path) -> Path:
    """A private copy of the crashed run's output directory."""
    out = tmp_path / "run"
    shutil.copytree(crashed, out)
    return out


def test_crashed_run_left_a_point_after_layer_1(crashed: Path) -> None:
    m = manifest(crashed)
    assert m["format"] == FORMAT == 2
    assert m["layers_done"] == 1 and m["num_layers"] == 3 and m["world_size"] == 1
    assert [r["index"] for r in m["layer_reports"]] == [0]
    assert [e["file"] for e in m["layers"]] == ["layers-00000-00001.pt"]
    assert m["results"]["baseline"]["baseline"] is not None  # the baseline stage's result
    assert not {"quantized", "quant_args", "perplexity"} & set(m)
    assert not (crashed / "checkpoint").exists()
    assert json.loads((crashed / "report.json").read_text())["status"] == "failed"


def test_resume_is_byte_identical_to_an_uninterrupted_run(
    tiny_llama3_dir: Path, reference: tuple[Path, dict[str, Any]], interrupted: Path
) -> None:
    ref_dir, ref_report = reference
    report = run(tiny_llama3_dir, interrupted, "runtime.resume=true")
    assert (interrupted / WEIGHTS).read_bytes() == (ref_dir / WEIGHTS).read_bytes()
    # The reinstalled layers 0 are the broadcast weights: the evaluation sees the same model.
    assert report["perplexity"] == ref_report["perplexity"]
    assert [r["index"] for r in report["layers"]] == [0, 1, 2]
    assert report["resumed_after_layers"] == 1 and ref_report["resumed_after_layers"] is None
    assert "baseline" not in report["stages"], "the baseline comes from the resume point"
    assert "quantized" in report["stages"]
    assert not (interrupted / RESUME_DIR).exists(), "deleted after a successful run"
    assert not (ref_dir / RESUME_DIR).exists()


def test_crash_after_the_last_layer_resumes_without_redoing_any(
    tiny_llama3_dir: Path, reference: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """A crash in the final evaluation or the save: the last point holds every layer and
    no activations (nothing reads them); resuming runs no layer and writes the same bytes."""
    with crash_after_point(3), pytest.raises(_Crash):
        run(tiny_llama3_dir, tmp_path)
    m = manifest(tmp_path)
    assert m["layers_done"] == 3 and all(r["hidden"] is None for r in m["ranks"])
    report = run(tiny_llama3_dir, tmp_path, "runtime.resume=true")
    assert "solve" not in report["stages"] or report["stages"]["solve"]["seconds"] == 0.0
    assert [r["index"] for r in report["layers"]] == [0, 1, 2]
    assert (tmp_path / WEIGHTS).read_bytes() == (reference[0] / WEIGHTS).read_bytes()
    assert report["perplexity"] == reference[1]["perplexity"]


def test_partial_resume_point_is_ignored(
    tiny_llama3_dir: Path, reference: tuple[Path, dict[str, Any]], interrupted: Path
) -> None:
    """Files of the point after layer 2 whose manifest was never written: garbage, ignored."""
    d = interrupted / RESUME_DIR
    (d / "layers-00001-00002.pt").write_bytes(b"\x80truncated")
    (d / "hidden-00002-rank00000.pt").write_bytes(b"")
    (d / f".{MANIFEST}.tmp-4242").write_text('{"format": 2, "layers_done": 2')
    run(tiny_llama3_dir, interrupted, "runtime.resume=true")
    assert (interrupted / WEIGHTS).read_bytes() == (reference[0] / WEIGHTS).read_bytes()


@pytest.mark.slow
def test_point_without_manifest_starts_over(
    tiny_llama3_dir: Path, reference: tuple[Path, dict[str, Any]], interrupted: Path
) -> None:
    (interrupted / RESUME_DIR / MANIFEST).unlink()
    report = run(tiny_llama3_dir, interrupted, "runtime.resume=true")
    assert "baseline" in report["stages"], "nothing to resume from: the baseline is measured"
    assert (interrupted / WEIGHTS).read_bytes() == (reference[0] / WEIGHTS).read_bytes()


def test_other_recipe_is_refused_naming_the_differences(
    tiny_llama3_dir: Path, interrupted: Path
) -> None:
    with pytest.raises(ResumeError) as err:
        run(
            tiny_llama3_dir,
            interrupted,
            "runtime.resume=true",
            "scheme=w3a16",
            "stages.solve.dampening=0.05",
        )
    text = str(err.value)
    assert "scheme.bits: 4 in the resume point, 3 now" in text
    # A stage's setting is named by its key in the stages mapping, as it is overridden.
    assert "stages.solve.dampening: 0.01 in the resume point, 0.05 now" in text
    assert "stages[" not in text
    assert manifest(interrupted)["layers_done"] == 1, "a refused resume leaves the point alone"


def test_recipe_differences_name_stages_by_key_and_see_their_order() -> None:
    solve = {"id": "solve", "stage": "solve", "dampening": 0.01}
    save = {"id": "save", "stage": "save", "subdir": "checkpoint"}
    saved = {"scheme": {"bits": 4}, "stages": [solve, save]}
    assert recipe_differences(saved, saved) == []
    changed = {"scheme": {"bits": 4}, "stages": [{**solve, "dampening": 0.05}, save]}
    assert recipe_differences(saved, changed) == [
        "stages.solve.dampening: 0.01 in the resume point, 0.05 now"
    ]
    (line,) = recipe_differences(saved, {**saved, "stages": [save, solve]})
    assert line.startswith("stages (order): ['solve', 'save'] in the resume point")
    assert recipe_differences(saved, {**saved, "stages": [solve]}) == [
        'stages.save.stage: "save" in the resume point, (absent) now',
        'stages.save.subdir: "checkpoint" in the resume point, (absent) now',
    ]


@pytest.mark.slow
def test_settings_that_cannot_change_the_result_may_differ(
    tiny_llama3_dir: Path, reference: tuple[Path, dict[str, Any]], interrupted: Path
) -> None:
    run(
        tiny_llama3_dir,
        interrupted,
        "runtime.resume=true",
        "runtime.checkpoint_every=2",
        "runtime.timeout_s=30",
        "overwrite=true",
    )
    assert (interrupted / WEIGHTS).read_bytes() == (reference[0] / WEIGHTS).read_bytes()


def test_other_world_size_is_refused(tiny_llama3_dir: Path, interrupted: Path) -> None:
    recipe = validate_recipe(_resolved(tiny_llama3_dir, interrupted, "runtime.resume=true"))
    points = ResumePoints(interrupted, recipe, DistContext(rank=0, world_size=2))
    with pytest.raises(
        ResumeError, match=r"written by 1 rank\(s\) and this run has 2.*nproc_per_node=1"
    ):
        points.open()


def test_existing_point_needs_resume_or_overwrite(tiny_llama3_dir: Path, interrupted: Path) -> None:
    with pytest.raises(
        ResumeError, match=r"1 of 3 layers done.*runtime.resume=true.*overwrite=true"
    ):
        run(tiny_llama3_dir, interrupted)
    report = run(tiny_llama3_dir, interrupted, "overwrite=true")
    assert "baseline" in report["stages"], "overwrite=true starts over"
    assert not (interrupted / RESUME_DIR).exists()


def test_damaged_file_is_refused(tiny_llama3_dir: Path, interrupted: Path) -> None:
    m = manifest(interrupted)
    victim = interrupted / RESUME_DIR / m["ranks"][0]["hidden"]["file"]
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(ResumeError, match=r"damaged: hidden-00001-rank00000.pt has 100 bytes"):
        run(tiny_llama3_dir, interrupted, "runtime.resume=true")


@pytest.mark.slow
def test_no_points_by_default_for_small_models(tiny_llama3_dir: Path, tmp_path: Path) -> None:
    """Auto (null) writes none for 3 layers; the ordinary path never creates the directory."""
    seen: list[int] = []
    original = ResumePoints.after_layer

    def spy(self: ResumePoints, state: Any, layer: LayerRun, stages: Any, n_layers: int) -> None:
        original(self, state, layer, stages, n_layers)
        seen.append(int((self.dir / MANIFEST).exists()))

    ResumePoints.after_layer = spy  # type: ignore[method-assign]
    try:
        run(tiny_llama3_dir, tmp_path, "runtime.checkpoint_every=null")
    finally:
        ResumePoints.after_layer = original  # type: ignore[method-assign]
    assert seen == [0, 0, 0]


@pytest.mark.parametrize(
    ("setting", "layers", "expected"),
    [
        (None, 3, 0),
        (None, 4, 0),
        (None, 5, 1),
        (None, 30, 4),
        (None, 80, 10),
        (0, 80, 0),
        (3, 2, 3),
    ],
)
def test_checkpoint_interval(setting: int | None, layers: int, expected: int) -> None:
    assert checkpoint_interval(setting, layers) == expected


def test_solve_fallbacks_before_the_crash_are_reported(
    tiny_llama3_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Modules rounded to nearest (scheme.on_failure=rtn) in layer 0 stay in report.json."""
    from gptqflow.stages import solve

    original = solve.SolveStage.on_group

    def indefinite_mlp(self: Any, group: GroupRun, ctx: Any) -> None:
        if group.names[0].endswith("mlp.gate_proj"):
            assert group.reduced_hessian is not None
            group.reduced_hessian = group.reduced_hessian.clone()
            group.reduced_hessian[0, 0] = -1e9  # no dampening outweighs it: GPTQ fails, RTN is used
        original(self, group, ctx)

    monkeypatch.setattr(solve.SolveStage, "on_group", indefinite_mlp)
    with crash_after_point(1), pytest.raises(_Crash):
        run(tiny_llama3_dir, tmp_path, "scheme.on_failure=rtn", "dataset.eval_tokens=0")
    report = run(
        tiny_llama3_dir,
        tmp_path,
        "scheme.on_failure=rtn",
        "dataset.eval_tokens=0",
        "runtime.resume=true",
    )
    modules = [(f["layer"], f["module"]) for f in report["fallbacks"]]
    assert modules == [
        (i, f"model.layers.{i}.mlp.{m}") for i in (0, 1, 2) for m in ("gate_proj", "up_proj")
    ]
