"""Run under torchrun: ZeRO-3 steps of a tiny Mixtral where rank 1's batches send no token to
expert 3 of layer 0 while rank 0's do (tests/test_pretrain_mixtral_train.py checks the output)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pretrain.config import PretrainConfig
from training.engine import build_engine, deepspeed_config
from training.world import init_distributed

STARVED, MARKER = 3, 7  # expert 3 takes only token 7, which only rank 0 feeds

world = init_distributed()
config = PretrainConfig.model_validate(
    {
        "model": {"family": "mixtral", "preset": "mixtral_tiny"},
        "data": {
            "tokenizer": "unused.model",
            "sources": {"none": "unused"},
            "phases": [{"name": "all", "start": 0.0, "mixture": {"none": 1.0}}],
            "seq_len": 32,
        },
        "train": {"steps": 3, "global_batch_size": 4, "micro_batch_size": 2},
        "engine": {"zero_stage": 3},
    }
)
args = config.model.build_args()
torch.manual_seed(0)
model = config.model.model_family.model_type(args)
with torch.no_grad():
    # Layer 0's router input is the normalised embedding (its attention output is zeroed):
    # every token points along v except the marker, along u; expert 3's router row is u - v.
    u = torch.zeros(args.hidden_size)
    v = torch.zeros(args.hidden_size)
    u[0], v[1] = 1.0, 1.0
    embedding = model.tok_embeddings.weight
    embedding.copy_(v + 0.01 * torch.randn_like(embedding))
    embedding[:, 0] = 0.0
    embedding[MARKER] = u
    model.layers[0].attention.o_proj.weight.zero_()
    router = model.layers[0].feed_forward.router.weight
    router.zero_()
    router[STARVED] = 10.0 * (u - v)
engine = build_engine(model, config, deepspeed_config(config, world))

generator = torch.Generator().manual_seed(world.rank)
for step in range(3):
    tokens = torch.randint(MARKER + 1, args.vocab_size, (2, 33), generator=generator)
    if world.rank == 0:
        tokens[:, 5] = MARKER
    logits = engine(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) + model.auxiliary_loss()
    load = model.router_stats().load_LE[0, STARVED].item()
    engine.backward(loss)
    engine.step()
    print(f"rank {world.rank} step {step} load {load:.4f} loss {loss.item():.4f}", flush=True)
print(f"rank {world.rank} done", flush=True)
torch.distributed.destroy_process_group()
# Everything this script reports is printed. Leave without the interpreter's teardown: once in
# a full suite's run, a native thread still joinable at exit aborted a finished rank ("terminate
# called without an active exception", exit -6) after both had printed "done".
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
