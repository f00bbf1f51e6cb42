"""Attention backends: FlexAttention and flash-attn give SDPA's logits and gradients; config and install errors."""

from __future__ import annotations

import importlib.util
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from common.errors import KinoeError
from models.mistral.args import MistralArgs, tiny
from models.mistral.model import Mistral
from models.mistral.state_dict import hf_config, to_hf

BATCH, SEQ_LEN, WINDOW = 2, 48, 12  # 48: not a multiple of FlexAttention's 128-token blocks
# (with documents, sliding window): every combination the trainer can ask for.
CASES = {
    "causal": (False, None),
    "window": (False, WINDOW),
    "documents": (True, None),
    "documents_and_window": (True, WINDOW),
}
HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA"))]


@pytest.fixture
def fresh_compiler():
    """Forget compiled FlexAttention graphs, so each case compiles its own kernel.

    Every case and device is a new graph of the one compiled ``flex_attention``; past
    torch._dynamo's recompile limit (8) later cases would quietly run uncompiled.
    """
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _models(backend: str, case: str, device: str, dtype=torch.float32) -> tuple[Mistral, Mistral]:
    """An SDPA model and a ``backend`` model holding the same weights."""
    _, sliding_window = CASES[case]
    changes = {"sliding_window": sliding_window}
    args = tiny().model_dump()
    torch.manual_seed(0)
    reference = Mistral(MistralArgs.model_validate({**args, **changes}))
    other = Mistral(MistralArgs.model_validate({**args, **changes, "attention": backend}))
    other.load_state_dict(reference.state_dict())
    return reference.to(device, dtype), other.to(device, dtype)


def _batch(case: str, device: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Tokens, document ids (running EOS counts, a one-token document included) and targets."""
    with_documents, _ = CASES[case]
    generator = torch.Generator().manual_seed(1)
    tokens_BT = torch.randint(0, 2048, (BATCH, SEQ_LEN), generator=generator)
    targets_BT = torch.randint(0, 2048, (BATCH, SEQ_LEN), generator=generator)
    document_ids_BT = None
    if with_documents:
        lengths = [[7, 20, 21], [30, 1, 17]]
        document_ids_BT = torch.stack(
            [torch.repeat_interleave(torch.arange(3), torch.tensor(row)) for row in lengths]
        ).to(device, torch.int32)
    return tokens_BT.to(device), document_ids_BT, targets_BT.to(device)


def _logits_and_gradients(
    model: Mistral, tokens_BT, document_ids_BT, targets_BT
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    logits_BTV = model(tokens_BT, document_ids_BT)
    F.cross_entropy(logits_BTV.flatten(0, 1).float(), targets_BT.flatten()).backward()
    gradients = {name: p.grad for name, p in model.named_parameters()}
    return logits_BTV.detach(), gradients


def _max_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    return max((first[name] - second[name]).abs().max().item() for name in first)


# On CPU, FlexAttention's mask and kernel compile to C++: about 27 s for the first case and
# 7 s for each further one cold, 6 s in all once inductor's on-disk cache holds them.
@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.usefixtures("fresh_compiler")
def test_flex_logits_match_sdpa(case, device):
    reference, flex = _models("flex", case, device)
    tokens_BT, document_ids_BT, _ = _batch(case, device)
    with torch.no_grad():
        reference_BTV = reference(tokens_BT, document_ids_BT)
        flex_BTV = flex(tokens_BT, document_ids_BT)
    assert (flex_BTV - reference_BTV).abs().max().item() < 1e-5


@pytest.mark.skipif(
    not HAS_CUDA, reason="FlexAttention has no backward on CPU in torch 2.13; needs CUDA"
)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.usefixtures("fresh_compiler")
def test_flex_gradients_match_sdpa(case):
    reference, flex = _models("flex", case, "cuda")
    batch = _batch(case, "cuda")
    reference_BTV, reference_gradients = _logits_and_gradients(reference, *batch)
    flex_BTV, flex_gradients = _logits_and_gradients(flex, *batch)
    assert (flex_BTV - reference_BTV).abs().max().item() < 1e-5
    assert _max_difference(flex_gradients, reference_gradients) < 1e-5


def _reference_flash_attn_varlen_func(
    q_NHK, k_NGK, v_NGK, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    causal, window_size,
):  # fmt: skip
    """flash-attn's documented semantics, in plain torch: each cu_seqlens run is a sequence.

    Query i of a sequence sees keys in [i - window_size[0], i + window_size[1]] (-1: no
    limit on that side), and with causal=True only those <= i.
    """
    assert causal and torch.equal(cu_seqlens_q, cu_seqlens_k) and cu_seqlens_q.dtype == torch.int32
    lengths = cu_seqlens_q.diff().tolist()
    assert max_seqlen_q == max_seqlen_k == max(lengths)
    left, right = window_size
    assert right in (-1, 0)  # beyond the query, so causal=True decides
    outputs = []
    for start, length in zip(cu_seqlens_q[:-1].tolist(), lengths, strict=True):
        q_HSK, k_GSK, v_GSK = (
            x[start : start + length].transpose(0, 1) for x in (q_NHK, k_NGK, v_NGK)
        )
        groups = q_HSK.shape[0] // k_GSK.shape[0]
        k_HSK, v_HSK = k_GSK.repeat_interleave(groups, 0), v_GSK.repeat_interleave(groups, 0)
        query_S1 = torch.arange(length)[:, None]
        key_1S = torch.arange(length)[None, :]
        allowed_SS = key_1S <= query_S1
        if left >= 0:
            allowed_SS &= key_1S >= query_S1 - left
        scores_HSS = q_HSK @ k_HSK.transpose(1, 2) / math.sqrt(q_HSK.shape[-1])
        scores_HSS = scores_HSS.masked_fill(~allowed_SS, float("-inf"))
        outputs.append((scores_HSS.softmax(-1) @ v_HSK).transpose(0, 1))
    return torch.cat(outputs)


@pytest.mark.parametrize("case", CASES)
def test_flash_documents_and_window_reach_flash_attn_as_sdpa_means_them(case, monkeypatch):
    """Our cu_seqlens and window_size, fed to flash-attn's semantics, give SDPA's results."""
    fake = types.ModuleType("flash_attn")
    fake.flash_attn_varlen_func = _reference_flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    reference, flash = _models("flash", case, "cpu")
    batch = _batch(case, "cpu")
    reference_BTV, reference_gradients = _logits_and_gradients(reference, *batch)
    flash_BTV, flash_gradients = _logits_and_gradients(flash, *batch)
    assert (flash_BTV - reference_BTV).abs().max().item() < 1e-5
    assert _max_difference(flash_gradients, reference_gradients) < 1e-5


@pytest.mark.skipif(not HAS_CUDA, reason="flash-attn runs on CUDA only")
@pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is None,
    reason="flash-attn is not installed (pip install 'kinoe[gpu]' on a GPU node)",
)
@pytest.mark.parametrize("case", CASES)
def test_flash_matches_sdpa_in_bfloat16(case):
    """flash-attn runs bf16 only: it may differ from float32 SDPA by about what bf16 SDPA does."""
    reference, flash = _models("flash", case, "cuda")
    bf16_reference, _ = _models("sdpa", case, "cuda", dtype=torch.bfloat16)
    flash = flash.to(torch.bfloat16)
    batch = _batch(case, "cuda")
    exact_BTV, exact_gradients = _logits_and_gradients(reference, *batch)
    bf16_BTV, bf16_gradients = _logits_and_gradients(bf16_reference, *batch)
    flash_BTV, flash_gradients = _logits_and_gradients(flash, *batch)

    def error(logits_BTV, gradients) -> tuple[float, float]:
        logits = (logits_BTV.float() - exact_BTV).abs().max().item()
        as_float = {name: g.float() for name, g in gradients.items()}
        return logits, _max_difference(as_float, exact_gradients)

    (flash_logits, flash_grads), (bf16_logits, bf16_grads) = (
        error(flash_BTV, flash_gradients),
        error(bf16_BTV, bf16_gradients),
    )
    assert flash_logits <= 2 * bf16_logits + 1e-3
    assert flash_grads <= 2 * bf16_grads + 1e-4


def test_flash_without_flash_attn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import flash_attn now fails
    model = Mistral(MistralArgs.model_validate({**tiny().model_dump(), "attention": "flash"}))
    with pytest.raises(KinoeError, match=r"flash-attn.*pip install 'kinoe\[gpu\]'"):
        model(torch.zeros(1, 8, dtype=torch.long))


def test_backend_changes_no_weights_or_conversion():
    sdpa = Mistral(tiny())
    flex = Mistral(MistralArgs.model_validate({**tiny().model_dump(), "attention": "flex"}))
    assert {k: v.shape for k, v in sdpa.state_dict().items()} == {
        k: v.shape for k, v in flex.state_dict().items()
    }
    assert to_hf(flex.state_dict()).keys() == to_hf(sdpa.state_dict()).keys()
    assert hf_config(flex.args).to_dict() == hf_config(sdpa.args).to_dict()


def test_unknown_backend_is_rejected():
    with pytest.raises(ValidationError) as err:
        MistralArgs.model_validate({**tiny().model_dump(), "attention": "xformers"})
    text = str(err.value)
    assert "attention" in text
    assert "'sdpa', 'flex' or 'flash'" in text
