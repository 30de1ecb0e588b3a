"""``load``: a transformers causal LM from a local directory, kept on the CPU.

Reads the ``model`` group (``model.path``, ``model.dtype``, ``model.trust_remote_code``:
never run the dir's code unless true, ``model.allow_pickle``: refuse ``*.bin``/``*.pt``
weights unless true, ``model.weights``: ``stream`` or ``eager``).
Requires: nothing. Provides: ``model``, ``tokenizer``.
Collectives: none (every rank reads what it needs from the files).
With ``model.weights=stream`` (the default) the model is built on the meta device and
only the tensors outside the decoder layers are read here; each layer's tensors are
read from the files when the layer is processed and released afterwards
(:mod:`gptqflow.modeling.weights`), so a rank holds one layer, not the model. Each
decoder layer is on the execution device only while it is processed, so a model
larger than device memory can be quantized.

```yaml
stages:
  load: {}
```
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch

from gptqflow.errors import GptqflowError
from gptqflow.framework.distributed import DistContext
from gptqflow.framework.registry import register_stage
from gptqflow.framework.stage import Stage, StageConfig
from gptqflow.framework.state import PipelineState
from gptqflow.modeling.modeldir import check_model_dir
from gptqflow.modeling.weights import build_streamed

log = logging.getLogger("gptqflow")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LoadStage(Stage):
    config: LoadConfig

    def run(self, state: PipelineState, ctx: DistContext) -> None:
        from gptqflow.modeling.text import load_tokenizer

        cfg = self.recipe.model
        path = Path(cfg.path)
        # Clear errors for a missing dir / config.json, an unsupported architecture,
        # truncated safetensors, and pickle weights the user did not allow.
        weights = check_model_dir(
            path, allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code
        )
        dtype = None if cfg.dtype == "auto" else DTYPES[cfg.dtype]
        state.model_dir = path
        state.tokenizer = load_tokenizer(path)
        if cfg.weights == "stream":
            why = "the weights are pickle files" if not weights.safetensors else None
            if why is None:
                built = build_streamed(
                    path, weights.files, dtype, trust_remote_code=cfg.trust_remote_code
                )
                if not isinstance(built, str):
                    state.model, state.weights = built
                    state.weights_mode = {"mode": "stream"}
                    log.info("model built on the meta device; decoder layers are read per layer")
                    return
                why = built
            log.warning("model.weights=stream: loading the whole model instead, because %s", why)
            state.weights_mode = {"mode": "eager", "reason": why}
        state.model = _load_eager(path, weights.safetensors, dtype, cfg.trust_remote_code)


def _load_eager(path: Path, safetensors: bool, dtype: torch.dtype | None, remote: bool) -> Any:
    """The whole model read by transformers (every rank its own copy)."""
    from transformers import AutoModelForCausalLM

    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            path,
            dtype="auto" if dtype is None else dtype,
            local_files_only=True,
            trust_remote_code=remote,
            # Never fall back to pickle files when safetensors exist.
            use_safetensors=safetensors,
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
    return model


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
    """Load the ``model`` group's local transformers causal LM (never from a hub)."""

    stage: Literal["load"] = "load"
    PROVIDES = ("model", "tokenizer")
