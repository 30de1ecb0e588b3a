"""Builders for the tiny test model and tokenizer, shared by fixtures and tests.

Kept out of ``conftest.py`` so tests can build variants (more layers, other widths)
with ``from helpers import make_tiny_llama``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

# Used when the shared WikiText files are absent, so the tokenizer fixture still works.
FALLBACK_TEXT = (
    " = Valkyria Chronicles III = \n\n"
    " Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ playing video game "
    "developed by Sega and Media.Vision for the PlayStation Portable . Released in January "
    "2011 in Japan , it is the third game in the Valkyria series . The game began development "
    "in 2010 , carrying over a large portion of the work done on Valkyria Chronicles II . "
    "The tower is 324 metres ( 1 @,@ 063 ft ) tall , about the same height as an 81 @-@ "
    "storey building , and the tallest structure in Paris . \n"
) * 40

TINY_VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|endoftext|>"]

# Group size 128 must divide every Linear's input width: hidden 128, intermediate 256.
TINY_LLAMA_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}


def train_tiny_tokenizer(out_dir: Path, text: str, vocab_size: int = TINY_VOCAB_SIZE) -> Path:
    """Train a byte-level BPE tokenizer on ``text`` and save it as a transformers tokenizer.

    Byte-level, like SmolLM2/GPT-2, so any text round-trips without unknown tokens.
    No post-processor: like SmolLM2, encoding adds no BOS.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(out_dir))
    return out_dir


def make_tiny_llama(
    out_dir: Path,
    tokenizer_dir: Path | None = None,
    *,
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Save a seeded, randomly initialised float32 LlamaForCausalLM (safetensors) to ``out_dir``.

    With ``tokenizer_dir`` its files are copied next to the model and the vocabulary
    size is taken from it, so ``out_dir`` is a complete model directory. Any
    ``LlamaConfig`` field can be overridden (e.g. ``num_hidden_layers=3``). The global
    RNG state is left untouched.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    fields: dict[str, Any] = {**TINY_LLAMA_CONFIG, "vocab_size": TINY_VOCAB_SIZE}
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        fields.update(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        _copy_files(tokenizer_dir, out_dir)
    fields.update(config_overrides)
    config = LlamaConfig(**fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).float().eval()
    model.save_pretrained(str(out_dir))
    return out_dir


def _copy_files(src: Path, dst: Path) -> None:
    """Copy the plain files of ``src`` into ``dst`` (tokenizer files are flat)."""
    for f in Path(src).iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)


# ---------------------------------------------------------------------- spawned ranks
def free_port() -> int:
    """A free TCP port on loopback, for the rendezvous of ranks a test spawns."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def set_rank_env(rank: int, world_size: int, port: int) -> None:
    """Give a process spawned by a test the environment torchrun gives a rank (loopback)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )


def _execute_as_rank(
    rank: int, world_size: int, port: int, resolved: dict[str, Any], setup: Any
) -> None:
    set_rank_env(rank, world_size, port)
    torch.set_num_threads(1)
    if setup is not None:
        setup()  # e.g. a patch the rank's stages must see (a picklable module-level function)
    from gptqflow.framework.api import execute

    execute(resolved)


def run_at_world_size(
    world_size: int,
    overrides: list[str],
    *,
    recipe: str = "gptq_w4a16",
    setup: Any = None,
    in_process_single: bool = False,
) -> dict[str, Any]:
    """Compose ``recipe`` with ``overrides`` and run it on ``world_size`` spawned gloo ranks.

    The overrides name the output directory (``output_dir=...``); its report.json is
    returned. ``setup`` runs in every rank before the recipe. ``in_process_single``:
    world size 1 runs in this process (no spawn), for tests that pay for every start.
    """
    from gptqflow.framework.compose import compose_recipe

    resolved = compose_recipe(
        recipe, [*overrides, "runtime.num_threads=1", f"runtime.nproc_per_node={world_size}"]
    )
    if world_size == 1 and in_process_single and setup is None:
        from gptqflow.framework.api import execute

        return dict(execute(resolved))
    mp.start_processes(
        _execute_as_rank,
        args=(world_size, free_port(), resolved, setup),
        nprocs=world_size,
        join=True,
        start_method="spawn",
    )
    return dict(json.loads((Path(resolved["output_dir"]) / "report.json").read_text()))


def run_until(procs: list[Any], deadline_s: float) -> tuple[list[int | None], float]:
    """Start spawned rank processes and wait ``deadline_s`` for all of them in total.

    Returns their exit codes (``None`` for one still running, which is then killed)
    and the seconds it took: what a test of a failing or hanging rank asserts on.
    """
    start = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=max(1.0, deadline_s - (time.monotonic() - start)))
    elapsed = time.monotonic() - start
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    return codes, elapsed


# A chat template in the style of SmolLM2's (ChatML), for the tiny tokenizer.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def render_chat_by_hand(messages: list[dict[str, str]]) -> str:
    """What :data:`CHAT_TEMPLATE` renders, written out in Python."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def chat_rows(text: str, n: int) -> list[dict[str, Any]]:
    """``n`` conversations cut from the paragraphs of ``text``, of varied lengths.

    The user asks about a paragraph's first sentence and the assistant answers with
    (part of) the rest: a question/answer set built from WikiText, no download.
    """
    paragraphs = [
        p.strip()
        for p in text.lstrip("\ufeff").split("\n")
        if len(p.strip()) > 200 and not p.strip().startswith("=")
    ]
    rows: list[dict[str, Any]] = []
    for i, p in enumerate(paragraphs[:n]):
        first, _, rest = p.partition(" . ")
        answer = rest[: 60 + 53 * (i % 9)] or first
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"What follows from: {first} ?"},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    assert len(rows) == n, f"the text has only {len(rows)} long paragraphs"
    return rows


def with_chat_template(model_dir: Path, out_dir: Path) -> Path:
    """A copy of ``model_dir`` whose tokenizer has :data:`CHAT_TEMPLATE`."""
    import json

    shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
    config = out_dir / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data["chat_template"] = CHAT_TEMPLATE
    config.write_text(json.dumps(data, indent=2))
    return out_dir


# ---------------------------------------------------------------------- other architectures
# Tiny configs per transformers model_type (2 layers; widths divisible by group size 32).
# MoE models get 8 experts, top-2, so some experts see few tokens on a short calibration.
_DENSE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
_MOE = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64}
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": _DENSE,
    "mistral": _DENSE,
    "qwen2": _DENSE,
    "qwen3": {**_DENSE, "head_dim": 16},
    "phi3": {**_DENSE, "num_key_value_heads": 4},
    "gemma3_text": {**_DENSE, "head_dim": 16, "sliding_window": 32},
    "gpt_neox": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
    },
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512},
    "qwen3_moe": {**_DENSE, **_MOE, "head_dim": 16},
    "mixtral": {**_DENSE, "num_local_experts": 8, "num_experts_per_tok": 2},
    "olmoe": {**_DENSE, "num_experts": 8, "num_experts_per_tok": 2},
    "qwen2_moe": {**_DENSE, **_MOE, "shared_expert_intermediate_size": 64},
    "deepseek_v3": {
        **_DENSE,
        "num_key_value_heads": 4,  # MLA: as many key/value heads as query heads
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "first_k_dense_replace": 1,
        "n_shared_experts": 1,
        "q_lora_rank": 32,
        "kv_lora_rank": 32,
        "qk_rope_head_dim": 16,
        "qk_nope_head_dim": 16,
        "v_head_dim": 16,
        "n_group": 1,
        "topk_group": 1,
    },
}


def make_tiny_model(
    out_dir: Path, model_type: str, tokenizer_dir: Path, *, seed: int = 0, **overrides: Any
) -> Path:
    """A seeded float32 causal LM of ``model_type`` (``TINY_CONFIGS``) plus tokenizer, saved
    with ``save_pretrained`` (so in the architecture's own checkpoint layout)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    fields: dict[str, Any] = {
        **TINY_CONFIGS[model_type],
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **overrides,
    }
    config = AutoConfig.for_model(model_type, **fields)
    out_dir.mkdir(parents=True, exist_ok=True)
    _copy_files(tokenizer_dir, out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).float().eval()
        for p in model.parameters():  # routers start at zero in some classes
            if p.dim() >= 2 and float(p.detach().abs().max()) == 0.0:
                torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(str(out_dir))
    return out_dir
