#!/usr/bin/env bash
# GPU check (a few minutes on one GPU): SmolLM2-135M GPTQ W4A16 g64 on CUDA at 1 rank (and 2 nccl
# ranks when 2 GPUs are visible). Prints stage seconds (CUDA-synchronised), peak device and host
# memory per rank and the perplexities, then reloads the checkpoint with transformers and checks
# that its perplexity equals the one the run reported.
#
#   bash bench/gpu_check.sh [OUT_DIR]      # needs: gptqflow installed, gptqflow prepare-model done
set -euo pipefail
out="${1:-${TMPDIR:-/tmp}/gptqflow-gpu-check}"
rm -rf "$out" && mkdir -p "$out"
python - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device")
print(f"torch {torch.__version__}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
PY
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
worlds="1"
if [ "$gpus" -ge 2 ]; then worlds="1 2"; fi
for world in $worlds; do
  echo "== $world rank(s)"
  gptqflow run --config-name smollm2_w4a16 runtime.device=cuda runtime.nproc_per_node="$world" \
      runtime.progress=false dataset.eval_tokens=40960 output_dir="$out/w$world" > "$out/w$world.log" 2>&1 \
    || { tail -40 "$out/w$world.log"; exit 1; }
  python - "$out/w$world" <<'PY'
import json, math, sys
from pathlib import Path
run = Path(sys.argv[1])
r = json.loads((run / "report.json").read_text())
gib = 2**30
print("stages (s):", ", ".join(f"{k} {v['seconds']:.1f}" for k, v in r["stages"].items()))
for rank in r["ranks"]:
    dev = max((s.get("peak_device_bytes", 0) for s in rank["stages"].values()), default=0)
    print(f"rank {rank['rank']}: peak device {dev / gib:.2f} GiB, peak host RSS {rank['peak_rss_bytes'] / gib:.2f} GiB")
ppl = r["perplexity"]
print(f"perplexity: baseline {ppl['baseline']:.4f} -> quantized {ppl['quantized']:.4f}")
PY
done
echo "== reload $out/w1/checkpoint with transformers"
python - "$out/w1" <<'PY'
import json, sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
from gptqflow.modeling.perplexity import perplexity
from gptqflow.modeling.text import load_tokenizer, read_text
from gptqflow.stages.evaluate import leading_tokens
run = Path(sys.argv[1])
r = json.loads((run / "report.json").read_text())
recipe = __import__("yaml").safe_load((run / "recipe.yaml").read_text())
model = AutoModelForCausalLM.from_pretrained(run / "checkpoint", dtype=torch.float32).to("cuda")
tok = load_tokenizer(run / "checkpoint")
data = recipe["dataset"]
ids = leading_tokens(tok, read_text(data["eval_file"]), data["eval_tokens"])
got = perplexity(model, ids, data["seq_len"], data["eval_tokens"], "cuda")
want = r["perplexity"]["quantized"]
print(f"reloaded perplexity {got:.4f}, the run's {want:.4f}, difference {abs(got - want) / want:.2e}")
sys.exit(0 if abs(got - want) / want < 1e-3 else "reloaded perplexity differs from the run's")
PY
