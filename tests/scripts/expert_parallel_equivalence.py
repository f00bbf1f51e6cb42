"""Run under torchrun (gloo): expert parallelism of each size in argv gives the loss and gradients
of the same model without it, on every rank's own batch (tests/test_training_expert_parallel.py).

The reference is plain data parallelism: each rank's loss on its batch, every gradient averaged
over the world. Under expert parallelism an expert's gradient arrives on the rank holding it,
summed over the tokens of its exchange group; summed over the ranks that hold the same experts
and divided by the world size it is the reference's average. Prints one line per size and case.
"""

from __future__ import annotations

import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common.errors import KinoeError
from models.mixtral import Mixtral, MixtralArgs
from models.mixtral.args import mixtral_tiny
from training.expert_parallel import expert_groups, expert_parameters, shard_experts
from training.losses import next_token_losses

CASES = {
    # 8 experts so that 4 ranks hold 2 each; top-2.
    "no_capacity": {"num_experts": 8, "top_k": 2, "num_layers": 2},
    # A tight capacity: assignments are dropped, per rank, as without expert parallelism.
    "capacity_1.0": {"num_experts": 8, "top_k": 2, "num_layers": 2, "capacity_factor": 1.0},
}


def loss_and_grads(
    model: Mixtral, tokens_BT: torch.Tensor
) -> tuple[float, dict[str, torch.Tensor]]:
    """This rank's loss (LM + router losses) and its gradients, before any reduction."""
    model.zero_grad()
    logits_BTV = model(tokens_BT[:, :-1])
    loss = next_token_losses(logits_BTV, tokens_BT[:, 1:]).mean() + model.auxiliary_loss()
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


deepspeed.init_distributed(dist_backend="gloo")
rank, world = dist.get_rank(), dist.get_world_size()
try:
    expert_groups(3)
except KinoeError as error:
    print(f"rank {rank} refused: {error}", flush=True)
sizes = [int(size) for size in sys.argv[1:]]
groups = {size: expert_groups(size) for size in sizes}  # every rank creates them in one order
generator = torch.Generator().manual_seed(100 + rank)
for case, changes in CASES.items():
    args = MixtralArgs.model_validate({**mixtral_tiny().model_dump(), **changes})
    tokens_BT = torch.randint(args.vocab_size, (2, 17), generator=generator)
    torch.manual_seed(0)
    reference = Mixtral(args)
    reference_loss, reference_grads = loss_and_grads(reference, tokens_BT)
    for grad in reference_grads.values():
        dist.all_reduce(grad)
        grad /= world
    for size in sizes:
        torch.manual_seed(0)
        model = Mixtral(args)
        shard_experts(model, groups[size])
        loss, grads = loss_and_grads(model, tokens_BT)
        experts = {id(p) for p in expert_parameters(model)}
        for name, parameter in model.named_parameters():
            grad = grads[name]
            group = groups[size].replicas if id(parameter) in experts else None
            dist.all_reduce(grad, group=group)
            grad /= world
        G = args.num_experts // size
        own = slice(groups[size].rank * G, (groups[size].rank + 1) * G)
        worst = 0.0
        for name, parameter in model.named_parameters():
            expected = reference_grads[name]
            if id(parameter) in experts:
                expected = expected[own]
            assert grads[name].shape == expected.shape, (name, grads[name].shape, expected.shape)
            worst = max(worst, (grads[name] - expected).abs().max().item())
        dropped = sum(moe.dropped_tokens for moe in model.moe_modules())
        print(
            f"rank {rank} ep {size} case {case} loss {loss:.6f} reference {reference_loss:.6f} "
            f"max_grad_diff {worst:.3e} dropped {dropped}",
            flush=True,
        )
dist.destroy_process_group()
