"""What share of each architecture's decoder weights gptqflow quantizes, and whether it reloads.

For every architecture of the test suite (``tests/helpers.py`` ``TINY_CONFIGS``: the same
tiny seeded models the tests build from transformers configs, 2 layers, hidden 64, MoE
models 8 experts top-2), in a scratch directory outside the repository:

1. quantize it (``gptq_w4a16``, group size 32, 8 samples of 64 tokens) on one rank and
   read ``coverage`` from report.json: decoder parameters quantized, the fraction of all
   decoder parameters, by target kind, and what was left out (with the reason);
2. reload the checkpoint with transformers (``gptqflow eval``) and compare its
   perplexity with the one the run reported;
3. with ``--ranks 1,2``: run again on 2 ranks and compare the checkpoints byte for byte.

``linear only`` is the share that a Linear-only discovery would have quantized (the
``linear`` kind alone): the difference is what the expert and Conv1D kinds add.

    python bench/coverage.py                       # every architecture, 1 rank
    python bench/coverage.py --ranks 1,2           # and byte-identity at 2 ranks
    python bench/coverage.py --archs qwen3_moe mixtral
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from runinfo import cpu_model, visible_cores

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the test suite's tiny-model builders

from helpers import FALLBACK_TEXT, TINY_CONFIGS, make_tiny_model, train_tiny_tokenizer  # noqa: E402

SETTINGS = [
    "dataset.num_samples=8",
    "dataset.seq_len=64",
    "dataset.eval_tokens=512",
    "scheme.group_size=32",
    "runtime.progress=false",
    "runtime.num_threads=1",
]


def _run(model: Path, out: Path, ranks: int) -> dict[str, Any]:
    cmd = ["gptqflow", "run", "--config-name", "gptq_w4a16", f"model.path={model}"]
    cmd += [f"output_dir={out}", f"runtime.nproc_per_node={ranks}", *SETTINGS]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return report


def _reloaded_perplexity(checkpoint: Path, eval_file: str) -> float:
    cmd = ["gptqflow", "eval", str(checkpoint), "--data", eval_file]
    cmd += ["--max-tokens", "512", "--seq-len", "64"]
    got = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(got.strip().rsplit(" ", 1)[-1])


def _eval_file(out: Path) -> str:
    for line in (out / "recipe.yaml").read_text().splitlines():
        if line.strip().startswith("eval_file:"):
            return line.split(":", 1)[1].strip()
    raise SystemExit(f"{out}/recipe.yaml names no eval_file")


def measure(arch: str, scratch: Path, tokenizer: Path, ranks: list[int]) -> dict[str, Any]:
    model = make_tiny_model(scratch / arch / "model", arch, tokenizer)
    outs = {}
    for n in ranks:
        out = scratch / arch / f"out{n}"
        outs[n] = (out, _run(model, out, n))
    out, report = outs[ranks[0]]
    cov = report["coverage"]
    reloaded = _reloaded_perplexity(out / "checkpoint", _eval_file(out))
    same = None
    if len(ranks) > 1:
        files = [sorted((o / "checkpoint").glob("*.safetensors")) for o, _ in outs.values()]
        same = all(
            [f.read_bytes() for f in files[0]] == [f.read_bytes() for f in other]
            for other in files[1:]
        )
    return {
        "arch": arch,
        "decoder_params": cov["decoder_params"],
        "fraction": cov["quantized_fraction"],
        "linear_only": cov["quantized_params_by_kind"].get("linear", 0) / cov["decoder_params"],
        "kinds": cov["quantized_params_by_kind"],
        "left_out": sorted({e["reason"] for e in cov["not_quantized"]}),
        "left_out_params": sum(e["params"] for e in cov["not_quantized"]),
        "perplexity": report["perplexity"]["quantized"],
        "reloaded": reloaded,
        "same_bytes": same,
        "expert_tokens": [layer.get("expert_tokens") for layer in report["layers"]],
        "fallbacks": len(report["fallbacks"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="*", default=list(TINY_CONFIGS))
    ap.add_argument("--ranks", default="1", help="comma-separated world sizes, e.g. 1,2")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    scratch = Path(tempfile.mkdtemp(prefix="gptqflow-coverage-"))
    try:
        tokenizer = train_tiny_tokenizer(scratch / "tokenizer", FALLBACK_TEXT)
        rows, failed = [], []
        for arch in args.archs:
            try:
                rows.append(measure(arch, scratch, tokenizer, ranks))
            except subprocess.CalledProcessError as exc:  # one architecture, not the table
                tail = (exc.stderr or "").strip().splitlines()[-1:]
                failed.append(f"{arch}: {' '.join(exc.cmd[:2])} failed: {tail}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"machine: {cpu_model()}, {visible_cores()} cores visible; ranks {ranks}")
    same_head = " 1 = 2 ranks |" if len(ranks) > 1 else ""
    print(
        "| architecture | decoder params | quantized | linear only | kinds | left out "
        f"| reload ppl = report |{same_head}"
    )
    print("|---|---:|---:|---:|---|---|---|" + ("---|" if same_head else ""))
    for r in rows:
        kinds = ", ".join(f"{k} {v:,}" for k, v in r["kinds"].items())
        left = f"{r['left_out_params']:,} ({'; '.join(r['left_out'])})" if r["left_out"] else "-"
        reload = (
            "yes"
            if abs(r["reloaded"] - r["perplexity"]) <= 1e-4 * r["perplexity"]
            else (f"NO ({r['reloaded']:.4f} vs {r['perplexity']:.4f})")
        )
        same = "" if r["same_bytes"] is None else f" {'yes' if r['same_bytes'] else 'NO'} |"
        print(
            f"| {r['arch']} | {r['decoder_params']:,} | {r['fraction']:.1%} | "
            f"{r['linear_only']:.1%} | {kinds} | {left} | {reload} |{same}"
        )
    for line in failed:
        print(f"FAILED {line}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
