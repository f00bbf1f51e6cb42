"""The Mixtral model package: grouped vs loop experts, routing, capacity, router losses, Hugging Face parity, counts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from pydantic import ValidationError
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from models.experts import ExpertModel
from models.mistral import Mistral
from models.mistral.args import mistral_1b, tiny
from models.mixtral import PRESETS, Mixtral, MixtralArgs
from models.mixtral.args import mixtral_1b_active, mixtral_8x7b, mixtral_tiny
from models.mixtral.moe import MoE
from models.mixtral.state_dict import from_hf, hf_config, to_hf


def _args(**changes) -> MixtralArgs:
    return MixtralArgs.model_validate({**mixtral_tiny().model_dump(), **changes})


def _model(args: MixtralArgs, seed: int = 0) -> Mixtral:
    torch.manual_seed(seed)
    return Mixtral(args).eval()


def _moe(seed: int = 0, **changes) -> MoE:
    """A tiny model's MoE layer, its weights initialised as in the model."""
    return _model(_args(num_layers=1, **changes), seed).layers[0].feed_forward


def _skewed_input(moe: MoE, preference: list[float], tokens: int, noise: float = 0.1):
    """Tokens (T, D) that all share one direction, and the router pointed along it.

    Expert e's logit is about ``3 * preference[e]``, so the router's choice is the same for
    every token; ``noise`` is the router's token-dependent part.
    """
    generator = torch.Generator().manual_seed(5)
    D = moe.router.in_features
    direction_D = F.normalize(torch.randn(D, generator=generator), dim=0)
    x_TD = torch.randn(tokens, D, generator=generator) + 3 * direction_D
    with torch.no_grad():
        moe.router.weight.copy_(
            torch.tensor(preference)[:, None] * direction_D
            + noise * torch.randn(moe.router.weight.shape, generator=generator)
        )
    return x_TD


def _loop_copy(moe: MoE) -> MoE:
    """The same layer, weights shared by value, computing its experts with the loop."""
    args = _args(num_layers=1, moe_implementation="loop", capacity_factor=moe.capacity_factor)
    loop = MoE(args)
    loop.load_state_dict(moe.state_dict())
    return loop


def _forward_backward(moe: MoE, x_TD: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Output and the gradients of a loss using output, aux and z losses, for x and every weight."""
    x_TD = x_TD.clone().requires_grad_()
    out_TD = moe(x_TD[None])[0]
    target_TD = torch.randn(out_TD.shape, generator=torch.Generator().manual_seed(9))
    loss = (out_TD * target_TD).sum() + moe.aux_loss + moe.z_loss
    loss.backward()
    grads = {name: p.grad for name, p in moe.named_parameters()}
    return out_TD.detach(), {"x": x_TD.grad, **grads}


# --- grouped vs loop -------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [2, 3])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_grouped_matches_loop_in_forward_and_every_gradient(capacity_factor, top_k):
    # top_k 3: a token's gradient sums three copies (the dispatch's backward, _sorted_copies).
    grouped = _moe(capacity_factor=capacity_factor, top_k=top_k)
    loop = MoE(_args(num_layers=1, moe_implementation="loop", capacity_factor=capacity_factor,
                     top_k=top_k))  # fmt: skip
    loop.load_state_dict(grouped.state_dict())
    x_TD = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    out_grouped, grads_grouped = _forward_backward(grouped, x_TD)
    out_loop, grads_loop = _forward_backward(loop, x_TD)

    assert (out_grouped - out_loop).abs().max().item() < 1e-6
    assert grads_grouped.keys() == grads_loop.keys() == {
        "x", "router.weight", "w_gate_up_E2FD", "w_down_EDF",
    }  # fmt: skip
    for name, grad in grads_grouped.items():
        assert (grad - grads_loop[name]).abs().max().item() < 1e-5, name
    assert torch.equal(grouped.tokens_per_expert_E, loop.tokens_per_expert_E)
    assert grouped.dropped_tokens == loop.dropped_tokens
    assert (grouped.dropped_tokens > 0) == (capacity_factor is not None)


@pytest.mark.parametrize("implementation", ["grouped", "loop"])
def test_expert_without_tokens_gets_zero_gradients_and_no_nan(implementation):
    moe = _moe(moe_implementation=implementation)
    x_TD = _skewed_input(moe, preference=[1.0, 0.5, 0.0, -2.0], tokens=32, noise=0.05)
    out_TD, grads = _forward_backward(moe, x_TD)
    assert moe.tokens_per_expert_E[3].item() == 0
    assert moe.tokens_per_expert_E.sum().item() == 32 * 2
    assert torch.isfinite(out_TD).all()
    for name, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all(), name
    assert torch.count_nonzero(grads["w_gate_up_E2FD"][3]) == 0
    assert torch.count_nonzero(grads["w_down_EDF"][3]) == 0
    assert torch.count_nonzero(grads["w_down_EDF"][:3]) > 0


def test_grouped_matches_loop_with_an_empty_expert():
    grouped = _moe()
    x_TD = _skewed_input(grouped, preference=[1.0, 0.5, 0.0, -2.0], tokens=32, noise=0.05)
    loop = _loop_copy(grouped)
    out_grouped, grads_grouped = _forward_backward(grouped, x_TD)
    out_loop, grads_loop = _forward_backward(loop, x_TD)
    assert grouped.tokens_per_expert_E[3].item() == 0
    assert (out_grouped - out_loop).abs().max().item() < 1e-6
    for name, grad in grads_grouped.items():
        assert (grad - grads_loop[name]).abs().max().item() < 1e-5, name


# --- routing -----------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["grouped", "loop"])
def test_top_k_weights_are_renormalised(implementation):
    # With every expert the same MLP, the output is that MLP's times the sum of the weights.
    moe = _moe(moe_implementation=implementation)
    with torch.no_grad():
        moe.w_gate_up_E2FD.copy_(moe.w_gate_up_E2FD[:1].expand_as(moe.w_gate_up_E2FD))
        moe.w_down_EDF.copy_(moe.w_down_EDF[:1].expand_as(moe.w_down_EDF))
    x_TD = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out_TD = moe(x_TD[None])[0]
        gate_TF, up_TF = F.linear(x_TD, moe.w_gate_up_E2FD[0]).chunk(2, dim=-1)
        mlp_TD = F.linear(F.silu(gate_TF) * up_TF, moe.w_down_EDF[0])
        top2_T = F.linear(x_TD, moe.router.weight).softmax(-1).topk(2).values.sum(-1)
    assert top2_T.max().item() < 0.7  # the freshly initialised router is nearly uniform
    assert (out_TD - mlp_TD).abs().max().item() < 1e-6


@pytest.mark.parametrize("implementation", ["grouped", "loop"])
def test_capacity_drops_later_tokens_and_counts_them(implementation):
    # Every token picks experts 0 and 1; capacity ceil(1.0 * 16 * 2 / 4) = 8 keeps tokens 0-7.
    moe = _moe(moe_implementation=implementation, capacity_factor=1.0)
    x_TD = _skewed_input(moe, preference=[1.0, 0.6, -0.5, -1.0], tokens=16, noise=0.0)
    unlimited = _moe(moe_implementation=implementation)
    unlimited.load_state_dict(moe.state_dict())
    with torch.no_grad():
        out_TD = moe(x_TD[None])[0]
        full_TD = unlimited(x_TD[None])[0]
    assert moe.tokens_per_expert_E.tolist() == [16, 16, 0, 0]
    assert moe.dropped_tokens == 16
    assert torch.equal(out_TD[:8], full_TD[:8])
    assert torch.equal(out_TD[8:], torch.zeros_like(out_TD[8:]))
    assert unlimited.dropped_tokens == 0


def test_capacity_keeps_a_token_by_earlier_tokens_only():
    # Token t keeps an assignment when fewer than capacity earlier assignments went there.
    moe = _moe(capacity_factor=0.5)
    x_TD = torch.randn(40, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        moe.router.weight.mul_(30)
        out_TD = moe(x_TD[None])[0]
        logits_TE = F.linear(x_TD, moe.router.weight)
        weights_TK, experts_TK = logits_TE.softmax(-1).topk(2)
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        capacity = math.ceil(0.5 * 40 * 2 / 4)
        taken = [0] * 4
        expected_TD = torch.zeros_like(x_TD)
        for t in range(40):
            for k in range(2):
                expert = experts_TK[t, k].item()
                taken[expert] += 1
                if taken[expert] <= capacity:
                    gate_F, up_F = F.linear(x_TD[t], moe.w_gate_up_E2FD[expert]).chunk(2)
                    y_D = F.linear(F.silu(gate_F) * up_F, moe.w_down_EDF[expert])
                    expected_TD[t] += weights_TK[t, k] * y_D
    assert moe.dropped_tokens == sum(max(0, n - capacity) for n in taken) > 0
    assert (out_TD - expected_TD).abs().max().item() < 1e-6


# --- router losses and statistics ----------------------------------------------------------


def test_router_losses_by_hand_and_against_hugging_face():
    moe = _moe()
    x_TD = torch.randn(24, 64, generator=torch.Generator().manual_seed(6))
    moe(x_TD[None])
    logits_TE = F.linear(x_TD, moe.router.weight)
    probs_TE = logits_TE.softmax(-1)
    chosen_TE = F.one_hot(probs_TE.topk(2).indices, 4).sum(1).float()
    aux = 4 * (chosen_TE.mean(0) / 2 * probs_TE.mean(0)).sum()
    assert moe.aux_loss.item() == pytest.approx(aux.item(), rel=1e-6)
    assert moe.z_loss.item() == pytest.approx(
        logits_TE.logsumexp(-1).pow(2).mean().item(), rel=1e-6
    )
    # Hugging Face counts each of a token's top_k choices as a whole token: top_k times ours.
    theirs = load_balancing_loss_func((logits_TE,), num_experts=4, top_k=2)
    assert theirs.item() == pytest.approx(2 * moe.aux_loss.item(), rel=1e-6)
    assert hf_config(mixtral_tiny()).router_aux_loss_coef == pytest.approx(0.01 / 2)


def test_auxiliary_loss_and_router_stats():
    model = _model(_args(router_aux_loss_coef=0.5, router_z_loss_coef=0.25, capacity_factor=1.0))
    with pytest.raises(RuntimeError, match="only after a forward"):
        model.auxiliary_loss()
    tokens_BT = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(7))
    model(tokens_BT)
    moes = model.moe_modules()
    assert isinstance(model, ExpertModel) and not isinstance(Mistral(tiny()), ExpertModel)
    assert len(moes) == 2 and all(isinstance(moe, MoE) for moe in moes)
    aux = sum(moe.aux_loss for moe in moes) / 2
    z = sum(moe.z_loss for moe in moes) / 2
    loss = model.auxiliary_loss()
    assert loss.item() == pytest.approx(0.5 * aux.item() + 0.25 * z.item(), rel=1e-6)
    loss.backward()
    assert all(moe.router.weight.grad.abs().sum() > 0 for moe in moes)

    stats = model.router_stats()
    assert stats.load_LE.shape == (2, 4)
    assert not stats.load_LE.requires_grad
    assert torch.allclose(stats.load_LE.sum(-1), torch.ones(2))
    assert torch.equal(stats.load_LE[1], moes[1].tokens_per_expert_E / 128)
    assert stats.aux_loss == pytest.approx(aux.item(), rel=1e-6)
    assert stats.z_loss == pytest.approx(z.item(), rel=1e-6)
    assert stats.dropped_tokens == moes[0].dropped_tokens + moes[1].dropped_tokens
    assert isinstance(stats.dropped_tokens, int)


def _coefficient_of_variation(load_L_E: torch.Tensor) -> float:
    return (load_L_E.std(dim=-1, unbiased=False) / load_L_E.mean(dim=-1)).mean().item()


def _train_skewed_routers(aux_coef: float, steps: int = 30) -> tuple[float, float]:
    """Expert-load CV before and after Adam on LM + aux loss, from routers that favour 0 and 1.

    Only the routers train: they are what the aux loss shapes, and training the rest on
    random tokens adds noise that hides the effect at this size.
    """
    model = _model(_args(router_aux_loss_coef=aux_coef)).train()
    generator = torch.Generator().manual_seed(8)
    direction_D = F.normalize(torch.randn(64, generator=generator), dim=0)
    preference_E1 = torch.tensor([[3.0], [2.0], [0.0], [-1.0]])
    with torch.no_grad():
        model.tok_embeddings.weight.add_(0.1 * direction_D)  # a direction every token shares
        for moe in model.moe_modules():
            moe.router.weight.normal_(0, 0.15, generator=generator)
            moe.router.weight.add_(0.25 * preference_E1 * direction_D)
    optimizer = torch.optim.Adam([moe.router.weight for moe in model.moe_modules()], lr=1e-2)
    for step in range(steps + 1):
        tokens_BT = torch.randint(0, 2048, (4, 32), generator=generator)
        logits_BTV = model(tokens_BT)
        if step == 0:
            before = _coefficient_of_variation(model.router_stats().load_LE)
        if step == steps:
            return before, _coefficient_of_variation(model.router_stats().load_LE)
        lm_loss = F.cross_entropy(logits_BTV[:, :-1].flatten(0, 1), tokens_BT[:, 1:].flatten())
        optimizer.zero_grad()
        (lm_loss + model.auxiliary_loss()).backward()
        optimizer.step()
    raise AssertionError("unreachable")


def test_aux_loss_balances_a_skewed_router():
    before, without_aux = _train_skewed_routers(aux_coef=0.0)
    same_before, with_aux = _train_skewed_routers(aux_coef=0.1)
    assert before == same_before > 0.6
    assert without_aux > 0.6
    assert with_aux < 0.3
    assert with_aux < 0.5 * without_aux


# --- Hugging Face parity and conversion ----------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("sliding_window", [None, 8])
def test_logits_match_hugging_face(attn_implementation, sliding_window):
    args = _args(sliding_window=sliding_window)
    ours = _model(args)
    theirs = transformers.MixtralForCausalLM._from_config(
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


def test_tied_embeddings_match_hugging_face():
    args = _args(tie_embeddings=True)
    ours = _model(args)
    theirs = transformers.MixtralForCausalLM._from_config(hf_config(args)).eval()
    hf_state_dict = to_hf(ours.state_dict())
    theirs.load_state_dict(hf_state_dict, strict=True)
    tokens_BT = torch.randint(0, 2048, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(tokens_BT) - theirs(tokens_BT).logits).abs().max().item() < 1e-4


def test_state_dict_round_trip_and_errors():
    state_dict = _model(mixtral_tiny()).state_dict()
    hf_state_dict = to_hf(state_dict)
    expected_hf = transformers.MixtralForCausalLM._from_config(hf_config(mixtral_tiny()))
    assert hf_state_dict.keys() == expected_hf.state_dict().keys()
    assert hf_state_dict["model.layers.1.mlp.experts.gate_up_proj"].shape == (4, 256, 64)
    back = from_hf(hf_state_dict)
    assert back.keys() == state_dict.keys()
    assert all(back[key] is state_dict[key] for key in state_dict)

    broken = dict(hf_state_dict)
    del broken["model.layers.0.mlp.experts.down_proj"]
    broken["model.layers.0.block_sparse_moe.experts.0.w1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"Hugging Face Mixtral state dict: missing") as err:
        from_hf(broken)
    assert "model.layers.0.mlp.experts.down_proj" in str(err.value)
    assert "unexpected model.layers.0.block_sparse_moe.experts.0.w1.weight" in str(err.value)


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


# --- counts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_parameter_counts_match_module(tie_embeddings):
    args = _args(tie_embeddings=tie_embeddings)
    model = Mixtral(args)
    assert args.num_parameters() == sum(p.numel() for p in model.parameters())
    embedding = args.vocab_size * args.hidden_size
    assert args.num_non_embedding_parameters() == args.num_parameters() - embedding
    idle_experts = args.num_layers * (4 - 2) * 3 * 64 * 128
    assert args.num_active_parameters() == args.num_parameters() - idle_experts
    two_experts = args.num_layers * 2 * 3 * 64 * 128  # gate, up and down, in each layer
    not_experts = sum(
        p.numel() for name, p in model.named_parameters() if ".feed_forward.w_" not in name
    )
    assert args.num_active_parameters() == not_experts + two_experts


def test_8x7b_counts_match_published_mixtral_and_the_module():
    # Mistral AI's Mixtral 8x7B: 46.7B parameters, 12.9B active, with its 32,000 vocabulary.
    original = MixtralArgs.model_validate({**mixtral_8x7b().model_dump(), "vocab_size": 32000})
    assert original.num_parameters() == 46_702_792_704
    assert original.num_active_parameters() == 12_879_925_248
    with torch.device("meta"):
        model = Mixtral(mixtral_8x7b())
    assert mixtral_8x7b().num_parameters() == sum(p.numel() for p in model.parameters())


def test_flops_per_token_count_active_parameters():
    args = mixtral_1b_active()
    layers, d, seq_len = 16, 2048, 4096
    matmul = args.num_active_parameters(include_embeddings=False)
    assert args.flops_per_token(seq_len) == 6 * matmul + 12 * layers * 16 * 128 * seq_len
    # Top-2 of experts half mistral_1b's width: the same FLOPs, plus each layer's router.
    routers = layers * d * 8
    assert args.flops_per_token(seq_len) == mistral_1b().flops_per_token(seq_len) + 6 * routers
    assert 1.0e9 < matmul < 1.1e9
    assert 3.1e9 < args.num_non_embedding_parameters() < 3.2e9


# --- config -------------------------------------------------------------------------------


def test_presets():
    assert set(PRESETS) == {"mixtral_tiny", "mixtral_1b_active", "mixtral_8x7b"}
    big = PRESETS["mixtral_8x7b"]()
    assert (big.rope_theta, big.max_seq_len, big.sliding_window) == (1e6, 32768, None)


def test_config_errors():
    with pytest.raises(ValidationError, match=r"top_k \(5\) must be at most num_experts \(4\)"):
        _args(top_k=5)
    with pytest.raises(ValidationError) as err:
        _args(num_experts=1, router_aux_loss_coef=-1.0, capacity_factor=0.0)
    text = str(err.value)
    assert "num_experts" in text and "router_aux_loss_coef" in text and "capacity_factor" in text
    with pytest.raises(ValidationError, match="divisible by 8"):
        _args(intermediate_size=100)
    _args(intermediate_size=100, moe_implementation="loop")


def test_loop_runs_sizes_the_grouped_gemm_cannot():
    moe = _moe(intermediate_size=36, moe_implementation="loop")
    out_BTD = moe(torch.randn(1, 8, 64))
    assert out_BTD.shape == (1, 8, 64) and torch.isfinite(out_BTD).all()
