"""``gptqflow run``'s own reading of its command line (in-process: no subprocess needed)."""

from __future__ import annotations

import pytest

from gptqflow.errors import UsageError
from gptqflow.framework.compose import RUN_RECIPE, did_you_mean
from gptqflow.framework.launcher import parse_run_args


def test_flags_overrides_and_the_default_recipe() -> None:
    args = parse_run_args(["scheme=w3a16", "--cfg", "job", "--verbose", "--resolve", "a=1"])
    assert args.name == RUN_RECIPE and args.config_dir is None and args.verbose
    assert args.overrides == ["scheme=w3a16", "a=1"]
    assert args.flags == ["--cfg", "job", "--resolve"]
    assert not args.multirun and not args.runs  # --cfg prints instead of running
    sweep = parse_run_args(["-m", "a=1,2"])
    assert sweep.multirun and sweep.runs and sweep.flags == ["--multirun"]
    # Hydra reads the overrides as one run of words: they go first, the flags after
    assert args.hydra_argv(["x=1"]) == ["x=1", "--config-name", RUN_RECIPE, *args.flags]


def test_flag_spellings() -> None:
    args = parse_run_args(["-cn=smollm2_w4a16.yaml", "--config-dir=d", "--info", "defaults", "k=v"])
    assert (args.name, args.config_dir) == ("smollm2_w4a16", "d")
    assert args.flags == ["--info", "defaults"] and args.overrides == ["k=v"]
    assert parse_run_args(["--info", "k=v"]).flags == ["--info"]  # an override is no info choice
    assert parse_run_args(["--config-name", "x"]).runs


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--config-name"], "--config-name needs a value"),
        (["--cfg="], "--cfg needs a value"),
        (["--verbos"], "--verbos: unknown option of gptqflow run"),
        (["-m", "--cfg", "job"], "--multirun and --cfg: pass one of them"),
    ],
)
def test_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        parse_run_args(argv)
    assert info.value.exit_code == 2


def test_did_you_mean_names_only_clear_winners() -> None:
    assert (
        did_you_mean("num_sample", ["num_samples", "seq_len"]) == " (did you mean 'num_samples'?)"
    )
    assert did_you_mean("w5a16", ["w2a16", "w3a16", "w4a16", "w8a16"]) == ""  # four equal guesses
    assert did_you_mean("zzz", ["w4a16"]) == ""
