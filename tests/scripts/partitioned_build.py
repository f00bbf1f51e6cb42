"""Run under torchrun: build a Mistral straight into ZeRO-3 partitions, check its weights against
the whole-model build, train two steps, print each rank's memory against the model's size; then
build it again from a kinoe weights directory (argv[1]) and check those weights
(tests/test_training_partitioned.py)."""

from __future__ import annotations

import logging
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed

from convert.initial import weights_source
from pretrain.config import PretrainConfig
from pretrain.data.loader import make_batch
from pretrain.objective import LanguageModelling
from pretrain.trainer import build_model
from training.engine import build_engine, deepspeed_config
from training.loop import micro_step
from training.losses import next_token_losses
from training.partitioned import build_initialised
from training.world import init_distributed

# About 60M parameters (240 MB in fp32) in many small modules: a rank that builds it whole
# grows by the whole size, one that builds its partitions by about half plus one module.
ARCHITECTURE = {
    "vocab_size": 4096,
    "hidden_size": 1024,
    "num_layers": 6,
    "num_heads": 8,
    "num_kv_heads": 4,
    "intermediate_size": 2816,
    "max_seq_len": 64,
}


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def gathered_equal(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> bool:
    """Whether every parameter, gathered whole, equals ``reference``'s tensor of that name."""
    equal = True
    for name, parameter in model.named_parameters():
        with deepspeed.zero.GatheredParameters([parameter]):
            equal &= torch.equal(parameter.data, reference[name])
    return equal


world = init_distributed()
config = PretrainConfig.model_validate(
    {
        "model": {"preset": "tiny", "overrides": ARCHITECTURE},
        "data": {
            "tokenizer": "unused.model",
            "sources": {"none": "unused"},
            "phases": [{"name": "all", "start": 0.0, "mixture": {"none": 1.0}}],
            "seq_len": 32,
        },
        "train": {"steps": 2, "global_batch_size": 4, "micro_batch_size": 2, "seed": 5},
        "engine": {"zero_stage": 3},
    }
)
args = config.model.build_args()
ds_config = deepspeed_config(config, world)
model_mb = args.num_parameters() * 4 / 2**20
# DeepSpeed's first zero.Init sets up its own buffers and state: not the model's memory.
with deepspeed.zero.Init(config_dict_or_path=ds_config):
    torch.nn.Linear(8, 8)
before = peak_mb()
model = build_model(config, args, world, logging.getLogger("partitioned"), ds_config)
build_growth = peak_mb() - before

# The same weights as a whole-model build with the same seed.
whole = build_initialised(type(model), args, config.train.seed)
print(
    f"rank {world.rank} weights equal {gathered_equal(model, dict(whole.state_dict()))}", flush=True
)
del whole

engine = build_engine(model, config, ds_config)
objective = LanguageModelling(["none"], next_token_losses)
generator = torch.Generator().manual_seed(world.rank)
for step in range(2):
    sums = torch.zeros(objective.num_sums, dtype=torch.float64)
    for _ in range(engine.gradient_accumulation_steps()):
        tokens = torch.randint(3, args.vocab_size, (2, 33), generator=generator).numpy()
        batch = make_batch(tokens, [0, 0], [0, 1], 2, document_masking=False)
        loss = micro_step(engine, objective, batch, sums)
    print(f"rank {world.rank} step {step} loss {loss.item():.4f}", flush=True)
print(
    f"rank {world.rank} model {model_mb:.0f} MB build growth {build_growth:.0f} MB "
    f"peak {peak_mb():.0f} MB",
    flush=True,
)

# Continual pretraining: model.init_from loads into the partitions, one tensor at a time.
from_weights = config.model_copy(
    update={"model": config.model.model_copy(update={"init_from": Path(sys.argv[1])})}
)
model = build_model(from_weights, args, world, logging.getLogger("partitioned"), ds_config)
tensors = weights_source(Path(sys.argv[1])).tensors
loaded = {name: tensors[name].read() for name, _ in model.named_parameters()}
print(f"rank {world.rank} init_from equal {gathered_equal(model, loaded)}", flush=True)
torch.distributed.destroy_process_group()
