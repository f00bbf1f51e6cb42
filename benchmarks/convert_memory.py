"""Peak memory of `kinoe convert to-hf` for a preset (default mistral_1b), against DeepSpeed's own tool.

Prints a table. Usage: python benchmarks/convert_memory.py [--preset mistral_1b] [--workdir DIR]
  [--verify] [--keep]

Two sources of the same random-init model, each built once by a child process:
- a kinoe weights directory (what `kinoe convert from-hf` writes), fp32;
- a DeepSpeed ZeRO-2 checkpoint written by DeepSpeed itself (one rank, gloo on CPU), laid out
  as a pretrain run (config.yaml, checkpoints/latest, step_00000000/ with trainer_state.json).
  Its engine has a plain SGD optimizer: AdamW's two moments would need 10 GB more than a
  24 GB workstation has while the engine is built, and the conversion never reads them (the
  fp32 master weights are the same tensors either way).

Each measurement is a fresh process: kinoe's to-hf (bf16 and fp32, verification off unless
--verify), and DeepSpeed's `convert_zero_checkpoint_to_state_dict` to bf16 safetensors as the
baseline. Peak RSS is the kernel's (wait4's ru_maxrss); it counts pages of memory-mapped
source files that were read, which the kernel can drop at any time. Peak anonymous memory
(RssAnon, sampled every 20 ms) is what the process itself allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

GB = 1e9


def build_weights(preset: str, out: Path) -> None:
    import torch

    from convert.initial import write_weights_directory
    from convert.sources import module_source
    from models import FAMILIES

    family = "mixtral" if preset.startswith("mixtral") else "mistral"
    torch.manual_seed(0)
    model = FAMILIES[family].model_type(FAMILIES[family].presets[preset]())
    out.mkdir(parents=True, exist_ok=True)
    write_weights_directory(module_source(family, model, {"kind": "random"}), out, 2_000_000_000)


def build_deepspeed(preset: str, out: Path) -> None:
    import dataclasses

    import deepspeed
    import torch
    import yaml

    from models import FAMILIES
    from training.checkpoint import LATEST, STATE_FILE, TrainerState, tag_for

    family = "mixtral" if preset.startswith("mixtral") else "mistral"
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0", "WORLD_SIZE": "1"}
    )
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = FAMILIES[family].model_type(FAMILIES[family].presets[preset]())
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        config={
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 2},
            "zero_allow_untested_optimizer": True,
        },
    )
    checkpoints = out / "checkpoints"
    engine.save_checkpoint(str(checkpoints), tag=tag_for(0), save_latest=False)
    state = TrainerState(step=0, world_size=1, zero_stage=2)
    (checkpoints / tag_for(0) / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state)))
    (checkpoints / LATEST).write_text(tag_for(0) + "\n")
    config = {"model": {"family": family, "preset": preset}, "data": {}, "train": {}}
    (out / "config.yaml").write_text(yaml.safe_dump(config))


def measure_kinoe(source: Path, tokenizer: Path, out: Path, dtype: str, verify: bool) -> dict:
    from common.run import run_stage
    from convert.cli import STEPS
    from convert.config import ConvertConfig

    config = ConvertConfig.model_validate(
        {
            "run": {"root": str(out), "name": "bench"},
            "checkpoint": str(source),
            "tokenizer": str(tokenizer),
            "dtype": dtype,
            "verify": {"enabled": verify, "documents": 2, "max_tokens": 64, "greedy_tokens": 4},
        }
    )
    result = run_stage(STEPS["to-hf"], config, force=True)
    return {"output_gb": result.manifest.summary["weights"]["total_size"] / GB}


def measure_deepspeed(source: Path, out: Path) -> dict:
    import torch
    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_state_dict

    convert_zero_checkpoint_to_state_dict(
        str(source / "checkpoints"),
        str(out),
        dtype=torch.bfloat16,
        max_shard_size="2GB",
        safe_serialization=True,
        tag="step_00000000",
    )
    size = sum(path.stat().st_size for path in out.glob("*.safetensors"))
    return {"output_gb": size / GB}


def run_child(args: list[str]) -> dict:
    """Run this script with ``args`` in a child; its result, seconds and peak memory."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(Path(__file__).parents[1])}
    started = time.monotonic()
    child = subprocess.Popen(
        [sys.executable, __file__, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    peak_anon = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_anon
        status = Path(f"/proc/{child.pid}/status")
        while not done.is_set():
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        peak_anon = max(peak_anon, int(line.split()[1]) * 1024)
            except OSError:
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    done.set()
    sampler.join()
    if status != 0:
        raise SystemExit(f"{' '.join(args)} failed ({status})")
    result = json.loads(output.decode().strip().splitlines()[-1])
    result.update(
        seconds=time.monotonic() - started,
        peak_rss_gb=usage.ru_maxrss * 1024 / GB,
        peak_anon_gb=peak_anon / GB,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mistral_1b")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kinoe_convert_memory"))
    parser.add_argument("--tokenizer", type=Path, help="HF tokenizer dir (default: a tiny export)")
    parser.add_argument("--verify", action="store_true", help="also measure with verification")
    parser.add_argument("--keep", action="store_true", help="keep the sources for another run")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="bf16", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role:  # a child: do one thing, print one JSON line
        result: dict = {}
        if args.role == "build-weights":
            build_weights(args.preset, args.path[0])
        elif args.role == "build-deepspeed":
            build_deepspeed(args.preset, args.path[0])
        elif args.role in ("kinoe", "kinoe-verify"):
            source, tokenizer, out = args.path
            result = measure_kinoe(source, tokenizer, out, args.dtype, args.role == "kinoe-verify")
        elif args.role == "deepspeed":
            result = measure_deepspeed(*args.path)
        print(json.dumps(result))
        return

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = args.tokenizer or _tiny_tokenizer(work)
    weights, deepspeed_run = work / "weights", work / "deepspeed_run"
    builds = {}
    if not (weights / "model.json").is_file():
        builds["weights dir"] = run_child(
            ["--role", "build-weights", "--preset", args.preset, "--path", str(weights)]
        )
    if not (deepspeed_run / "checkpoints" / "latest").is_file():
        builds["DeepSpeed ZeRO-2"] = run_child(
            ["--role", "build-deepspeed", "--preset", args.preset, "--path", str(deepspeed_run)]
        )
    source_gb = sum(p.stat().st_size for p in (weights / "weights").glob("*.safetensors")) / GB
    rows = []
    cases = [
        ("kinoe to-hf", "weights dir", weights, "bf16", "kinoe"),
        ("kinoe to-hf", "weights dir", weights, "fp32", "kinoe"),
        ("kinoe to-hf", "DeepSpeed ZeRO-2", deepspeed_run, "bf16", "kinoe"),
        ("kinoe to-hf", "DeepSpeed ZeRO-2", deepspeed_run, "fp32", "kinoe"),
    ]
    if args.verify:
        cases.append(("kinoe to-hf + verify", "weights dir", weights, "bf16", "kinoe-verify"))
    for tool, source_name, source, dtype, role in cases:
        out = work / f"out_{role}_{dtype}_{source.name}"
        shutil.rmtree(out, ignore_errors=True)
        result = run_child(
            ["--role", role, "--dtype", dtype, "--path", str(source), str(tokenizer), str(out)]
        )
        rows.append((tool, source_name, dtype, result))
        shutil.rmtree(out, ignore_errors=True)
    out = work / "out_deepspeed"
    shutil.rmtree(out, ignore_errors=True)
    rows.append(
        (
            "DeepSpeed convert_zero_checkpoint_to_state_dict",
            "DeepSpeed ZeRO-2",
            "bf16",
            run_child(["--role", "deepspeed", "--path", str(deepspeed_run), str(out)]),
        )
    )
    shutil.rmtree(out, ignore_errors=True)

    import torch

    print(
        f"host: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}"
    )
    print(f"model: {args.preset}, {source_gb:.2f} GB of fp32 weights")
    for name, build in builds.items():
        print(f"built {name} in {build['seconds']:.0f} s (peak RSS {build['peak_rss_gb']:.1f} GB)")
    print("| tool | source | output | seconds | output GB | peak RSS GB | peak anonymous GB |")
    print("|---|---|---|---:|---:|---:|---:|")
    for tool, source_name, dtype, result in rows:
        print(
            f"| {tool} | {source_name} | {dtype} | {result['seconds']:.1f} | {result['output_gb']:.2f} "
            f"| {result['peak_rss_gb']:.2f} | {result['peak_anon_gb']:.2f} |"
        )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def _tiny_tokenizer(work: Path) -> Path:
    """A Hugging Face tokenizer directory for the output (the weights do not depend on it)."""
    out = work / "tokenizer"
    if (out / "tokenizer.json").is_file():
        return out
    from tokenizer.chat import CHAT_TEMPLATE
    from tokenizer.config import TrainerConfig
    from tokenizer.hf_export import export_hf_tokenizer
    from tokenizer.train import train

    quickstart = Path(__file__).parents[1] / "data_prep" / "quickstart"
    texts = [
        json.loads(line)["text"]
        for name in ("web.jsonl", "wikipedia.jsonl")
        for line in (quickstart / name).read_text(encoding="utf-8").splitlines()
    ]
    sample = work / "sample.txt"
    sample.write_text("\n".join(texts), encoding="utf-8")
    train(
        TrainerConfig(vocab_size=2048, character_coverage=0.99, num_threads=2),
        sample,
        work / "tiny",
    )
    return export_hf_tokenizer(work / "tiny.model", out, CHAT_TEMPLATE)


if __name__ == "__main__":
    main()
