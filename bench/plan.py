"""Predict the distributed solve of large models: our planner vs the column-count balancer.

For each transformers config (default: the shipped Llama-3-8B, Llama-3-70B and
Llama-3.1-405B shapes), prints per layer kind and world size the predicted solve
seconds per layer (slowest rank), the mean rank busy time, the imbalance, the
speedup over one rank, the collectives' time, and the Hessian / qparam bytes.
Nothing is loaded but the config (meta device), so 512 ranks plan in seconds.

    python bench/plan.py
    python bench/plan.py configs/llama3-8b.json --world-sizes 2,4,8 --json plan.json
    python bench/plan.py --cost my_cost.json           # constants from bench/fit_cost.py
    python bench/plan.py --factor-scale 0.2            # what if factorising were 5x cheaper
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from gptqflow.gptq.cost import CostModel
from gptqflow.planning import load_cost_model, parse_world_sizes, plan_report

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = [
    ROOT / "configs/llama3-8b.json",
    ROOT / "configs/llama3-70b.json",
    ROOT / "configs/llama3.1-405b.json",
]


def scaled_factor(cost: CostModel, scale: float) -> CostModel:
    """The same machine with the factorisation ``scale`` times as expensive (a what-if)."""
    return dataclasses.replace(
        cost,
        factor_overhead_s=cost.factor_overhead_s * scale,
        factor_s_per_col2=cost.factor_s_per_col2 * scale,
        factor_s_per_col3=cost.factor_s_per_col3 * scale,
        check_s_per_col2=cost.check_s_per_col2 * scale,
        fitted_on=f"{cost.fitted_on}; factorisation x{scale:g} (what-if)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", type=Path, default=DEFAULT_CONFIGS)
    parser.add_argument("--world-sizes", default="2,4,8,64,512")
    parser.add_argument("--cost", type=Path, default=None, help="cost model JSON")
    parser.add_argument("--factor-scale", type=float, default=1.0, help="what-if multiplier")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    opts = parser.parse_args()
    cost = load_cost_model(opts.cost)
    if opts.factor_scale != 1.0:
        cost = scaled_factor(cost, opts.factor_scale)
    sizes = parse_world_sizes(opts.world_sizes)
    reports = [plan_report(c, sizes, cost, group_size=opts.group_size) for c in opts.configs]
    print("\n".join(r.text for r in reports))
    if opts.json is not None:
        opts.json.write_text(json.dumps([r.data for r in reports], indent=2) + "\n")


if __name__ == "__main__":
    main()
