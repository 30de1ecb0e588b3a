"""Chat calibration vs plain-text calibration on SmolLM2-135M-Instruct (GPTQ W4A16 g64).

Why: an instruct model is calibrated either on a plain text stream (the text route,
``dataset.calibration_file``) or on conversations rendered with its own chat template
(``dataset=local``, rows as samples of their own length). This compares the two on the
same source text: a chat set is built from the paragraphs of the shared WikiText-2
validation split (the user asks about a paragraph's first sentence, the assistant
answers with the rest of it), so both routes see the same words and differ in form
only. Reported: the perplexity of the float model and of both checkpoints on the
WikiText-2 test text (in domain) and on an out-of-domain text (Python standard-library
source: code and English docstrings), the calibration tokens of each route, and the
load -> save seconds.

Each quantization runs as ``gptqflow run`` in a child process with the project's own
``smollm2_w4a16`` recipe; perplexities come from ``gptqflow eval`` on the saved
checkpoints (and the float model), all on the first ``--eval-tokens`` tokens in
``--seq-len`` windows.

Run (a shared 2-core CPU: about 15-25 minutes with one thread):
    python bench/chat_calibration.py --threads 1 --json bench-chat.json
    python bench/chat_calibration.py --threads 1 --routes chat --chat-samples 74 --skip-float
    python bench/chat_calibration.py --threads 1 --num-samples 8 --eval-tokens 4096  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
MODEL = Path(os.environ.get("GPTQFLOW_CACHE", Path.home() / ".cache" / "gptqflow")) / "models"
MODEL_DIR = MODEL / "SmolLM2-135M-Instruct"
# Standard-library modules with long docstrings: the out-of-domain text (code + English).
OOD_MODULES = ("argparse.py", "difflib.py", "textwrap.py", "statistics.py", "fractions.py")


def chat_rows(text: str) -> list[dict[str, Any]]:
    """One conversation per WikiText paragraph of at least 300 characters (headings skipped)."""
    rows = []
    for para in text.lstrip("\ufeff").split("\n"):
        p = para.strip()
        if len(p) < 300 or p.startswith("="):
            continue
        first, _, rest = p.partition(" . ")
        if not rest:
            continue
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Tell me more about this: {first} ."},
                    {"role": "assistant", "content": rest},
                ]
            }
        )
    return rows


def ood_text(out: Path) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n\n".join((stdlib / m).read_text(encoding="utf-8") for m in OOD_MODULES)
    path = out / "ood-python-stdlib.txt"
    path.write_text(text, encoding="utf-8")
    return path


def run(cmd: list[str], env: dict[str, str]) -> tuple[str, float]:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}")
    return done.stdout + done.stderr, seconds


def perplexity(model: Path, data: Path, args: argparse.Namespace, env: dict[str, str]) -> float:
    out, _ = run(
        [
            "gptqflow",
            "eval",
            str(model),
            "--data",
            str(data),
            "--max-tokens",
            str(args.eval_tokens),
            "--seq-len",
            str(args.seq_len),
        ],
        env,
    )
    found = re.findall(r"perplexity[^0-9]*([0-9]+\.[0-9]+)", out)
    if not found:
        raise SystemExit(f"no perplexity in the output of gptqflow eval:\n{out[-2000:]}")
    return float(found[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=40960)
    ap.add_argument(
        "--chat-samples",
        type=int,
        default=None,
        help="rows of the chat route (default: --num-samples); e.g. as many as match the text "
        "route's tokens",
    )
    ap.add_argument("--routes", default="text,chat", help="comma-separated: text, chat")
    ap.add_argument("--skip-float", action="store_true", help="do not evaluate the float model")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    work = Path(tempfile.mkdtemp(prefix="gptqflow-chat-bench-"))
    rows = chat_rows((SHARED / "wikitext2-valid.txt").read_text(encoding="utf-8"))
    chat = work / "wikitext2-valid-chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ood = ood_text(work)
    common = [
        f"dataset.seq_len={args.seq_len}",
        "dataset.eval_tokens=0",  # perplexities below, the same way for every model
        f"runtime.num_threads={args.threads}",
        "runtime.progress=false",
        "~stages.baseline",
        "~stages.quantized",
    ]
    chat_samples = args.chat_samples or args.num_samples
    every = {
        "text": [f"dataset.num_samples={args.num_samples}"],
        "chat": ["dataset=local", f"dataset.path={chat}", f"dataset.num_samples={chat_samples}"],
    }
    routes = {name: every[name] for name in args.routes.split(",")}
    result: dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "threads": args.threads,
        "num_samples": args.num_samples,
        "chat_samples": chat_samples,
        "seq_len": args.seq_len,
        "eval_tokens": args.eval_tokens,
        "chat_rows": len(rows),
        "ood_text": f"Python {platform.python_version()} stdlib: {', '.join(OOD_MODULES)}",
        "runs": {},
    }
    wiki_test = SHARED / "wikitext2-test.txt"
    if not args.skip_float:
        result["float"] = {
            "wikitext2_test": perplexity(MODEL_DIR, wiki_test, args, env),
            "ood": perplexity(MODEL_DIR, ood, args, env),
        }
        print(json.dumps(result["float"]), flush=True)
    for name, extra in routes.items():
        out = work / name
        cmd = [
            "gptqflow",
            "run",
            "--config-name",
            "smollm2_w4a16",
            f"output_dir={out}",
            *common,
            *extra,
        ]
        _, seconds = run(cmd, env)
        report = json.loads((out / "report.json").read_text())
        entry = {
            "seconds": seconds,
            "tokens_calibrated": report["tokens_calibrated"],
            "calibration": {k: report["calibration"][k] for k in ("samples", "tokens", "column")},
            "wikitext2_test": perplexity(out / "checkpoint", wiki_test, args, env),
            "ood": perplexity(out / "checkpoint", ood, args, env),
        }
        result["runs"][name] = entry
        print(name, json.dumps(entry), flush=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
