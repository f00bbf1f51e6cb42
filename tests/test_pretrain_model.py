"""The Mistral model package: parameter and FLOP counts, Hugging Face parity, packed documents, config checks."""

from __future__ import annotations

import pytest
import torch
import transformers
from pydantic import ValidationError

from models.masks import attention_mask, positions_from_documents
from models.mistral.args import MistralArgs, mistral_1b, tiny
from models.mistral.model import Mistral
from models.mistral.state_dict import from_hf, hf_config, to_hf


def _args(**changes) -> MistralArgs:
    return MistralArgs.model_validate({**tiny().model_dump(), **changes})


def _model(args: MistralArgs, seed: int = 0) -> Mistral:
    torch.manual_seed(seed)
    return Mistral(args).eval()


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_tiny_parameter_count_matches_module(tie_embeddings):
    args = _args(tie_embeddings=tie_embeddings)
    model = Mistral(args)
    assert args.num_parameters() == sum(p.numel() for p in model.parameters())
    embedding = args.vocab_size * args.hidden_size
    assert args.num_non_embedding_parameters() == args.num_parameters() - embedding


def test_1b_parameter_count_on_meta_device_and_flops_by_hand():
    args = mistral_1b()
    with torch.device("meta"):
        model = Mistral(args)
    assert args.num_parameters() == sum(p.numel() for p in model.parameters())

    d, layers, vocab = 2048, 16, 65024
    per_layer = d * d * 2 + d * 1024 * 2 + 3 * d * 7168 + 2 * d  # q, o; k, v; MLP; norms
    non_embedding = layers * per_layer + d + vocab * d  # final norm, untied output
    assert args.num_non_embedding_parameters() == non_embedding == 1_039_206_400
    assert 0.9e9 < args.num_non_embedding_parameters() < 1.2e9
    assert args.num_parameters() == non_embedding + vocab * d

    attention = 12 * layers * 16 * 128 * 4096
    assert args.flops_per_token(4096) == 6 * non_embedding + attention == 7_845_851_136


def test_tied_flops_still_count_the_output_matmul():
    untied, tied = tiny(), _args(tie_embeddings=True)
    assert tied.flops_per_token(64) == untied.flops_per_token(64)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize(
    ("sliding_window", "tie_embeddings"), [(None, False), (8, False), (8, True)]
)
def test_logits_match_hugging_face(attn_implementation, sliding_window, tie_embeddings):
    args = _args(sliding_window=sliding_window, tie_embeddings=tie_embeddings)
    ours = _model(args)
    theirs = transformers.MistralForCausalLM._from_config(
        hf_config(args), attn_implementation=attn_implementation
    ).eval()
    theirs.load_state_dict(to_hf(ours.state_dict()), strict=True)
    tokens_BT = torch.randint(
        0, args.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        ours_BTV = ours(tokens_BT)
        theirs_BTV = theirs(tokens_BT).logits
    assert (ours_BTV - theirs_BTV).abs().max().item() < 1e-4


def test_sliding_window_is_the_last_window_keys_including_the_query():
    allowed_TT = attention_mask(None, seq_len=6, sliding_window=3)[0, 0]
    expected_TT = torch.tensor(
        [[i - 3 < j <= i for j in range(6)] for i in range(6)], dtype=torch.bool
    )
    assert torch.equal(allowed_TT, expected_TT)
    assert attention_mask(None, seq_len=6, sliding_window=None) is None

    # An off-by-one window would change the logits past the window, so parity above is sharp.
    tokens_BT = torch.randint(0, 2048, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        window_8 = _model(_args(sliding_window=8))(tokens_BT)
        window_9 = _model(_args(sliding_window=9))(tokens_BT)
    assert torch.equal(window_8[:, :8], window_9[:, :8])
    assert (window_8[:, 9:] - window_9[:, 9:]).abs().max().item() > 1e-3


def test_state_dict_round_trip_and_errors():
    state_dict = _model(tiny()).state_dict()
    hf_state_dict = to_hf(state_dict)
    assert "model.layers.1.self_attn.k_proj.weight" in hf_state_dict
    assert "lm_head.weight" in hf_state_dict
    back = from_hf(hf_state_dict)
    assert back.keys() == state_dict.keys()
    assert all(back[key] is state_dict[key] for key in state_dict)

    broken = dict(hf_state_dict)
    del broken["model.layers.0.mlp.up_proj.weight"]
    broken["model.layers.0.mlp.bias"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing model\.layers\.0\.mlp\.up_proj\.weight") as err:
        from_hf(broken)
    assert "unexpected model.layers.0.mlp.bias" in str(err.value)


def test_positions_restart_at_each_document():
    document_ids_BT = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    expected_BT = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert torch.equal(positions_from_documents(document_ids_BT), expected_BT)


@pytest.mark.parametrize("sliding_window", [None, 8])
def test_packed_documents_match_running_each_alone(sliding_window):
    model = _model(_args(sliding_window=sliding_window))
    generator = torch.Generator().manual_seed(3)
    first_T = torch.randint(0, 2048, (11,), generator=generator)
    second_T = torch.randint(0, 2048, (21,), generator=generator)
    packed_BT = torch.cat([first_T, second_T])[None]
    document_ids_BT = torch.tensor([[0] * 11 + [1] * 21])
    with torch.no_grad():
        packed_BTV = model(packed_BT, document_ids_BT)
        first_BTV = model(first_T[None])
        second_BTV = model(second_T[None])
    assert (packed_BTV[:, :11] - first_BTV).abs().max().item() < 1e-5
    assert (packed_BTV[:, 11:] - second_BTV).abs().max().item() < 1e-5


def _shape(**changes) -> dict:
    shape = dict(
        vocab_size=16, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
        intermediate_size=32, max_seq_len=8,
    )  # fmt: skip
    return {**shape, **changes}


def test_heads_must_divide_hidden_size():
    with pytest.raises(ValidationError) as err:
        MistralArgs.model_validate(_shape(num_heads=5, num_kv_heads=1))
    assert "num_heads (5) must divide hidden_size (64)" in str(err.value)
    assert (
        MistralArgs.model_validate(_shape(num_heads=5, num_kv_heads=1, head_dim=16)).head_dim == 16
    )


def test_kv_heads_must_divide_heads():
    with pytest.raises(ValidationError) as err:
        MistralArgs.model_validate(_shape(num_kv_heads=3))
    assert "num_kv_heads (3) must divide num_heads (4)" in str(err.value)


def test_sizes_must_be_positive():
    with pytest.raises(ValidationError) as err:
        MistralArgs.model_validate(_shape(intermediate_size=0, sliding_window=0))
    text = str(err.value)
    assert "intermediate_size" in text
    assert "sliding_window" in text
