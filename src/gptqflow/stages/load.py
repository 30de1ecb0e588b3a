"""``load``: a transformers causal LM from a local directory, kept on the CPU.

Consumes: nothing. Produces: ``state.model``, ``state.tokenizer``, ``state.layers``.
Collectives: none (every rank loads its own copy).
Each decoder layer is moved to the execution device only while it is processed,
so a model larger than device memory can be quantized.

```yaml
- stage: load
  path: ${model.path}
  dtype: ${model.dtype}
  trust_remote_code: ${model.trust_remote_code}   # never run the dir's code unless true
  allow_pickle: ${model.allow_pickle}             # refuse *.bin / *.pt weights unless true
```
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from gptqflow.framework.distributed import DistContext
from gptqflow.framework.errors import GptqflowError
from gptqflow.framework.registry import Stage, StageConfig, register_stage
from gptqflow.framework.state import PipelineState
from gptqflow.modeling.modeldir import check_model_dir
from gptqflow.modeling.structure import decoder_layers

log = logging.getLogger("gptqflow")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LoadStage(Stage):
    config: LoadConfig

    def run(self, state: PipelineState, ctx: DistContext) -> None:
        from transformers import AutoModelForCausalLM

        from gptqflow.modeling.text import load_tokenizer

        path = Path(self.config.path)
        # Clear errors for a missing dir / config.json, an unsupported architecture,
        # truncated safetensors, and pickle weights the user did not allow.
        weights = check_model_dir(
            path,
            allow_pickle=self.config.allow_pickle,
            trust_remote_code=self.config.trust_remote_code,
        )
        dtype = "auto" if self.config.dtype == "auto" else DTYPES[self.config.dtype]
        try:
            loaded: Any = AutoModelForCausalLM.from_pretrained(
                path,
                dtype=dtype,
                local_files_only=True,
                trust_remote_code=self.config.trust_remote_code,
                # Never fall back to pickle files when safetensors exist.
                use_safetensors=weights.safetensors,
                low_cpu_mem_usage=True,
                output_loading_info=True,
            )
        except Exception as exc:  # safetensors, torch and transformers raise many types
            raise GptqflowError(
                f"model.path={str(path)!r}: cannot load the model "
                f"({type(exc).__name__}: {exc}); check that the directory is complete"
            ) from exc
        model, info = loaded  # (model, loading info) with output_loading_info=True
        _check_loading_info(path, info)
        model.eval()
        model.requires_grad_(False)
        state.model = model
        state.model_dir = path
        state.tokenizer = load_tokenizer(path)
        _, state.layers = decoder_layers(model)


def _check_loading_info(path: Path, info: dict[str, Any]) -> None:
    """Refuse weights that do not cover the architecture.

    transformers fills tensors missing from the files with fresh random values and
    only logs it; quantizing that model would ship a checkpoint that loads and
    produces noise. Extra tensors are harmless (they are not loaded) and only logged.
    """
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise GptqflowError(
            f"model.path={str(path)!r}: the weight files lack {len(missing)} tensor(s) that "
            f"config.json's architecture needs (e.g. {missing[:3]}); transformers would fill "
            "them with random values. The directory is incomplete or its weights belong to "
            "another config: copy or download it again"
        )
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        log.warning(
            "%s: %d tensor(s) in the weight files are not used by the architecture (e.g. %s)",
            path,
            len(unexpected),
            unexpected[:3],
        )


@register_stage("load", LoadStage)
class LoadConfig(StageConfig):
    """Load a local transformers causal LM (never from a hub)."""

    stage: Literal["load"] = "load"
    path: str = Field(description="Local model directory (config.json + safetensors + tokenizer).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype while quantizing; auto = the checkpoint's."
    )
    trust_remote_code: bool = Field(False, description="Run Python code shipped in the model dir.")
    allow_pickle: bool = Field(
        False,
        description="Load pickle weights (*.bin, *.pt) when there are no safetensors; "
        "unpickling can run code.",
    )
