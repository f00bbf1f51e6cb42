"""Building a model: the whole-model build (ZeRO 1/2) against the build into ZeRO-3 partitions.

Each row is one process that builds one model as ``kinoe pretrain`` does
(``training.partitioned.build_initialised``) and stops there: time to a model on the device
with its initial weights, the host's peak RSS growth and the GPU's peak allocated memory. The
whole build draws the model on the host in fp32 and casts it to bf16 on the GPU (what
DeepSpeed does with it next); the partitioned build runs under ``deepspeed.zero.Init`` with
bf16, one rank per GPU. On one GPU the partition is the whole model, so the GPU figure is the
same; the host figure is what partitioning removes from every rank of a node.

    python benchmarks/construction_memory.py                        # mistral_7b, Mixtral 8x7B cut to 6 layers
    python benchmarks/construction_memory.py --cases tiny           # CPU: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# name -> (family, preset, overrides)
MODELS = {
    "mistral_7b": ("mistral", "mistral_7b", {}),
    # 8.8B total parameters: Mixtral 8x7B's layer shapes, 6 of its 32 layers.
    "mixtral_8x7b_6_layers": ("mixtral", "mixtral_8x7b", {"num_layers": 6}),
    "tiny": ("mistral", "tiny", {}),
}
CASES = {"gpu": ["mistral_7b", "mixtral_8x7b_6_layers"], "tiny": ["tiny"]}


def _config(name: str, zero_stage: int, precision: str):
    from pretrain.config import PretrainConfig

    family, preset, overrides = MODELS[name]
    return PretrainConfig.model_validate(
        {
            "model": {"family": family, "preset": preset, "overrides": overrides},
            "data": {
                "tokenizer": "unused.model",
                "sources": {"none": "unused"},
                "phases": [{"name": "all", "start": 0.0, "mixture": {"none": 1.0}}],
                "seq_len": 128,
            },
            "train": {"steps": 1, "global_batch_size": 1, "micro_batch_size": 1},
            "engine": {"zero_stage": zero_stage, "precision": precision},
        }
    )


def measure(name: str, build: str) -> dict:
    """Build ``name`` the ``build`` way in this process; its figures."""
    import torch

    from training.engine import deepspeed_config
    from training.partitioned import build_initialised
    from training.world import init_distributed

    world = init_distributed()
    cuda = world.device.type == "cuda"
    precision = "bf16" if cuda else "fp32"
    config = _config(name, 3 if build == "partitioned" else 2, precision)
    args = config.model.build_args()
    model_type = config.model.model_family.model_type
    ds_config = deepspeed_config(config, world)
    host_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    if build == "partitioned":
        model = build_initialised(model_type, args, config.train.seed, ds_config, world)
    else:
        model = build_initialised(model_type, args, config.train.seed)
        if cuda:
            model = model.to(world.device, torch.bfloat16)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    del model
    return {
        "model": name,
        "build": build,
        "parameters": args.num_parameters(),
        "seconds": seconds,
        "host_growth": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - host_before,
        "gpu_peak": torch.cuda.max_memory_allocated() if cuda else 0,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }


def gib(value: float) -> str:
    return f"{value / 2**30:.1f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="gpu", help=f"one of {', '.join(CASES)}")
    parser.add_argument("--measure", nargs=2, metavar=("MODEL", "BUILD"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.measure:
        print("RESULT " + json.dumps(measure(*options.measure)), flush=True)
        return
    rows, failed = [], []
    for name in CASES[options.cases]:
        for build in ("whole", "partitioned"):
            command = [sys.executable, __file__, "--measure", name, build]
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            result = subprocess.run(command, capture_output=True, text=True, env=env)
            found = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
            if result.returncode != 0 or not found:
                failed.append(f"{name} {build}: exit {result.returncode}: {result.stderr[-800:]}")
                continue
            rows.append(json.loads(found[-1][len("RESULT ") :]))
    print("| model | parameters | build | seconds | host peak growth | GPU peak allocated |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['model']} | {row['parameters'] / 1e9:.2f}B | {row['build']} | "
            f"{row['seconds']:.1f} | {gib(row['host_growth'])} | {gib(row['gpu_peak'])} |"
        )
    if rows:
        print(f"device: {rows[0]['device']}")
    for line in failed:
        print("FAILED", line, file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
