"""Perplexity protocol: full non-overlapping windows, mean NLL over predicted tokens."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from gptqflow.errors import GptqflowError
from gptqflow.modeling.perplexity import eval_windows, perplexity

SEQ = 32


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), local_files_only=True)


@pytest.fixture(scope="module")
def stream(tiny_model: Any) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, tiny_model.config.vocab_size, (1, 10 * SEQ), generator=gen)


def _manual_ppl(model: Any, windows: list[torch.Tensor]) -> float:
    """Straightforward reference: log-softmax, gather the next token, average, exp."""
    nlls = []
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(model(input_ids=w.unsqueeze(0)).logits[0].double(), dim=-1)
            nlls.append(-logp[:-1].gather(1, w[1:].unsqueeze(1)).squeeze(1))
    return math.exp(torch.cat(nlls).mean().item())


def test_tiny_model_perplexity_is_finite(tiny_model: Any, stream: torch.Tensor) -> None:
    ppl = perplexity(tiny_model, stream, seq_len=SEQ, max_tokens=0, device="cpu")
    assert math.isfinite(ppl) and ppl > 1.0


def test_matches_manual_two_windows(tiny_model: Any, stream: torch.Tensor) -> None:
    two = stream[:, : 2 * SEQ]
    expected = _manual_ppl(tiny_model, [two[0, :SEQ], two[0, SEQ:]])
    got = perplexity(tiny_model, two, seq_len=SEQ, max_tokens=None, device="cpu")
    assert got == pytest.approx(expected, rel=1e-6)


def test_max_tokens_and_partial_window(tiny_model: Any, stream: torch.Tensor) -> None:
    first_two = perplexity(tiny_model, stream[:, : 2 * SEQ], SEQ, 0, "cpu")
    assert perplexity(tiny_model, stream, SEQ, 2 * SEQ, "cpu") == first_two
    assert perplexity(tiny_model, stream, SEQ, 2 * SEQ + SEQ // 2, "cpu") == first_two
    assert perplexity(tiny_model, stream[0], SEQ, 0, "cpu") != first_two  # [n] accepted too


def test_eval_windows_shape() -> None:
    w = eval_windows(torch.arange(100).unsqueeze(0), seq_len=30, max_tokens=None)
    assert w.shape == (3, 30) and w[2, 0].item() == 60
    assert eval_windows(torch.arange(100), 30, 61).shape == (2, 30)


@pytest.mark.parametrize(("n", "seq_len", "max_tokens"), [(10, 32, 0), (100, 32, 20), (100, 1, 0)])
def test_too_few_tokens(n: int, seq_len: int, max_tokens: int) -> None:
    with pytest.raises(GptqflowError, match=f"only {min(n, max_tokens or n)} tokens"):
        eval_windows(torch.arange(n), seq_len, max_tokens)


def test_restores_training_flag_and_progress(tiny_model: Any, stream: torch.Tensor) -> None:
    tiny_model.train()
    try:
        ppl = perplexity(tiny_model, stream, SEQ, 2 * SEQ, "cpu", progress=True)
        assert tiny_model.training
    finally:
        tiny_model.eval()
    assert ppl == perplexity(tiny_model, stream, SEQ, 2 * SEQ, "cpu")  # eval mode used: no dropout
