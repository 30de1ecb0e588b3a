"""Peak host memory per rank against model depth: streamed weights vs the whole model.

Builds seeded random Llama models of one width (hidden 2048, MLP 5632, untied 49152
vocabulary, float32; SmolLM2's tokenizer) at each requested depth, in a scratch
directory outside the repository (never committed, removed at the end unless
``--keep``). Each is quantized (GPTQ W4A16 g128, a small calibration, no evaluation)
at each world size and weight mode, one run at a time, and the table gives every
rank's peak RSS (report.json), its ratio to the model's bytes on disk, and the sum
over ranks.

    python bench/memory.py                                   # 12 and 24 layers, 1 and 2 ranks, stream
    python bench/memory.py --layers 12 --modes stream eager  # against the whole model per rank

The 24-layer model is ~5.4 GiB on disk; ``eager`` holds about twice that per rank, so
leave it to machines with the memory for it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from runinfo import cpu_model, visible_cores

HIDDEN, MLP, VOCAB, HEADS, KV_HEADS = 2048, 5632, 49152, 16, 4


def build_model(layers: int, out: Path, tokenizer_dir: Path, seed: int) -> int:
    """A seeded random Llama saved as safetensors; returns its bytes on disk."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=VOCAB,
        tie_word_embeddings=False,
        max_position_embeddings=2048,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, max_shard_size="2GB")
    del model
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.name == "vocab.json":
            shutil.copy(f, out / f.name)
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


def quantize(
    model: Path, out: Path, world: int, mode: str, args: argparse.Namespace
) -> dict[str, Any]:
    """One `gptqflow run` in a fresh process; its report.json."""
    cmd = [
        sys.executable,
        "-m",
        "gptqflow",
        "run",
        "--config-name",
        "gptq_w4a16",
        f"model.path={model}",
        f"model.weights={mode}",
        f"output_dir={out}",
        f"runtime.nproc_per_node={world}",
        f"runtime.num_threads={args.threads}",
        f"dataset.num_samples={args.num_samples}",
        f"dataset.seq_len={args.seq_len}",
        "dataset.eval_tokens=0",
        "scheme.group_size=128",
        "runtime.progress=false",
        "overwrite=true",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    print(f"  $ gptqflow {' '.join(cmd[4:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"run failed:\n{proc.stderr[-4000:]}")
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    report["_wall"] = time.perf_counter() - start
    return report


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layers", type=int, nargs="+", default=[12, 24])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--modes", nargs="+", default=["stream"], choices=["stream", "eager"])
    ap.add_argument("--num-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--scratch", type=Path, default=None, help="where the models go (default: a temp dir)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = ap.parse_args()

    from gptqflow.modeling.prepare import default_smollm2_dir

    tokenizer_dir = default_smollm2_dir()
    if not (tokenizer_dir / "tokenizer.json").exists():
        sys.exit(
            f"needs SmolLM2's tokenizer in {tokenizer_dir}: run `gptqflow prepare-model` first"
        )
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="gptqflow-memory-"))
    rows: list[dict[str, Any]] = []
    try:
        for layers in args.layers:
            model = scratch / f"llama-{layers}l"
            print(f"building a random {layers}-layer Llama in {model}", flush=True)
            size = build_model(layers, model, tokenizer_dir, args.seed)
            for mode in args.modes:
                for world in args.ranks:
                    report = quantize(
                        model, scratch / f"run-{layers}-{mode}-{world}", world, mode, args
                    )
                    peaks = [r["peak_rss_bytes"] for r in report["ranks"]]
                    predicted = predict(model, world, args)
                    rows.append(
                        {
                            "layers": layers,
                            "model_bytes": size,
                            "mode": mode,
                            "ranks": world,
                            "peak_rss_bytes": peaks,
                            "sum_bytes": sum(peaks),
                            # gptqflow plan's prediction for this config (rank 0, the others)
                            "predicted_bytes": predicted,
                            "seconds": report["seconds"],
                            # each rank's peak RSS per stage id: which moment is the peak
                            "stage_peaks": [
                                {k: v["peak_rss_bytes"] for k, v in r["stages"].items()}
                                for r in report["ranks"]
                            ],
                        }
                    )
                    print(table(rows[-1:], args).splitlines()[-1], flush=True)
                    shutil.rmtree(scratch / f"run-{layers}-{mode}-{world}", ignore_errors=True)
            shutil.rmtree(model, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    print(table(rows, args))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def predict(model: Path, world: int, args: argparse.Namespace) -> list[int]:
    """``gptqflow plan``'s predicted peak per rank for this model and calibration."""
    from gptqflow.planning import plan_report

    memory = plan_report(
        model / "config.json", [world], num_samples=args.num_samples, seq_len=args.seq_len
    ).data["memory"][0]
    return [memory["rank0"]["peak_bytes"]] + [memory["other_rank"]["peak_bytes"]] * (world - 1)


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    gib = 2**30
    lines = [
        f"{cpu_model()}, {visible_cores()} cores; calibration {args.num_samples} x {args.seq_len} "
        f"tokens, GPTQ W4A16 g128, {args.threads} thread(s) per rank, no evaluation",
        "",
        "| layers | model GiB | weights | ranks | peak RSS per rank GiB | per rank / model | sum GiB "
        "| sum / model | predicted per rank GiB (`gptqflow plan`) | run s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        size = r["model_bytes"]
        peaks = r["peak_rss_bytes"]
        lines.append(
            f"| {r['layers']} | {size / gib:.2f} | {r['mode']} | {r['ranks']} | "
            f"{', '.join(f'{p / gib:.2f}' for p in peaks)} | "
            f"{', '.join(f'{p / size:.3f}' for p in peaks)} | {r['sum_bytes'] / gib:.2f} | "
            f"{r['sum_bytes'] / size:.3f} | "
            f"{', '.join(f'{p / gib:.2f}' for p in r.get('predicted_bytes', []))} | "
            f"{r['seconds']:.1f} |"
        )
    by = {(r["layers"], r["mode"], r["ranks"]): max(r["peak_rss_bytes"]) for r in rows}
    depths = sorted({r["layers"] for r in rows})
    if len(depths) > 1:
        lo, hi = depths[0], depths[-1]
        lines.append("")
        for mode in args.modes:
            for world in args.ranks:
                if (lo, mode, world) in by and (hi, mode, world) in by:
                    lines.append(
                        f"{mode}, {world} rank(s): largest rank's peak at {hi} layers / at {lo} "
                        f"layers = {by[(hi, mode, world)] / by[(lo, mode, world)]:.3f}"
                    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
