"""``kinoe doctor``: check that this machine and environment can run kinoe, before a job fails on it.

It prints what it finds (Python, torch, CUDA, NCCL, GPUs, DeepSpeed and its ops, the other
stage packages, W&B login state, free disk at the run root) and then one line per problem.
Exit code 0 means no problems, 1 means at least one. The W&B key is never printed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import logging
import netrc
import os
import platform
import shutil
import sys
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from packaging.requirements import Requirement
from pydantic import Field

from common.command import add_config_arguments
from common.config import Config, load_config
from common.manifest import git_state
from common.run_config import default_run_root

SUPPORTED_PYTHON = (3, 11)


class DoctorConfig(Config):
    """What this machine is expected to provide; the defaults suit a CPU workstation."""

    run_root: Path = Field(default_factory=default_run_root, description="Where runs are written")
    min_free_disk_gb: float = Field(10.0, ge=0, description="Free space required at run_root, GiB")
    expect_gpus: int = Field(0, ge=0, description="Fail with fewer visible GPUs than this")
    require_bf16: bool = Field(False, description="Fail if a visible GPU cannot compute in bf16")
    deepspeed_ops: list[str] = Field(
        default_factory=list,
        description="DeepSpeed ops that must be buildable here, e.g. fused_adam",
    )
    require_wandb_login: bool = Field(False, description="Fail when no W&B API key is configured")


@dataclass
class Report:
    """What doctor found: (item, value) lines to print, and problems, one line each."""

    facts: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def fact(self, item: str, value: str) -> None:
        self.facts.append((item, value))

    def problem(self, line: str) -> None:
        self.problems.append(line)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def main(args: argparse.Namespace) -> int:
    config = load_config(DoctorConfig, args.config, args.overrides)
    report = diagnose(config)
    width = max(len(item) for item, _ in report.facts)
    for item, value in report.facts:
        print(f"{item:<{width}}  {value}")
    if report.problems:
        print(f"\n{len(report.problems)} problem(s):")
        for line in report.problems:
            print(f"  - {line}")
        return 1
    print("\nno problems found")
    return 0


def diagnose(config: DoctorConfig) -> Report:
    """Run every check and collect the report."""
    report = Report()
    _check_python(report)
    _check_kinoe(report)
    _check_packages(report)
    _check_torch(report, config)
    _check_deepspeed(report, config)
    _check_wandb(report, config)
    _check_disk(report, config)
    return report


def _check_python(report: Report) -> None:
    environment = os.environ.get("CONDA_PREFIX") or sys.prefix
    report.fact(
        "python", f"{platform.python_version()} ({sys.executable}; environment {environment})"
    )
    if sys.version_info[:2] != SUPPORTED_PYTHON:
        wanted = ".".join(map(str, SUPPORTED_PYTHON))
        report.problem(
            f"python: {platform.python_version()} runs kinoe, but the shared environment pins {wanted}; "
            "activate the kinoe environment (docs/environment.md)"
        )


def _check_kinoe(report: Report) -> None:
    git = git_state()
    where = Path(__file__).resolve().parent.parent
    dirty = {True: ", uncommitted changes", False: "", None: ""}[git["dirty"]]
    report.fact(
        "kinoe",
        f"{_installed('kinoe') or 'not installed'} at {where} (commit {git['commit'][:12]}{dirty})",
    )


def _check_packages(report: Report) -> None:
    """Compare every pinned requirement of kinoe with what is installed."""
    try:
        requirements = importlib.metadata.requires("kinoe") or []
    except importlib.metadata.PackageNotFoundError:
        report.problem(
            "kinoe: not installed in this environment; run 'pip install -e .' in the checkout"
        )
        return
    checked = 0
    for text in requirements:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # optional extras (gpu, dev) are not required
        checked += 1
        installed = _installed(requirement.name)
        if installed is None:
            report.problem(
                f"{requirement.name}: not installed, kinoe needs {requirement}; "
                "rebuild or update the environment from environment.yml"
            )
        elif not requirement.specifier.contains(installed, prereleases=True):
            report.problem(
                f"{requirement.name}: {installed} installed, kinoe pins {requirement.specifier}; "
                "update the environment from environment.yml (docs/environment.md)"
            )
    for name in ("transformers", "datatrove", "sentencepiece", "datasets"):
        report.fact(name, _installed(name) or "not installed")
    report.fact("pins", f"{checked} pinned requirements of kinoe checked against what is installed")


def _check_torch(report: Report, config: DoctorConfig) -> None:
    try:
        import torch
    except Exception as error:  # a broken CUDA install raises more than ImportError
        report.fact("torch", f"cannot import ({type(error).__name__}: {error})")
        report.problem(
            f"torch: import failed ({error}); reinstall torch==2.13.0 in the environment"
        )
        return
    cuda_build = torch.version.cuda or "none (CPU build)"
    available = torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    nccl = "not available"
    if available and torch.distributed.is_nccl_available():
        nccl = ".".join(str(part) for part in torch.cuda.nccl.version())
    report.fact("torch", f"{torch.__version__}, CUDA {cuda_build}, NCCL {nccl}")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
    report.fact("GPUs", f"{count}{shown}")
    for index in range(count):
        properties = torch.cuda.get_device_properties(index)
        memory = properties.total_memory / 2**30
        report.fact(
            f"  cuda:{index}",
            f"{properties.name}, {memory:.0f} GiB, compute {properties.major}.{properties.minor}",
        )
    if count < config.expect_gpus:
        reason = (
            "torch is a CPU build"
            if torch.version.cuda is None
            else (
                "CUDA_VISIBLE_DEVICES hides them"
                if visible == ""
                else "check the job's --gpus request and the driver"
            )
        )
        report.problem(f"GPUs: {count} visible, expected {config.expect_gpus}; {reason}")
    if count and nccl == "not available":
        report.problem(
            "NCCL: torch sees GPUs but has no NCCL; install the CUDA build of torch==2.13.0"
        )
    if count and config.require_bf16 and not torch.cuda.is_bf16_supported():
        report.problem(
            "bf16: the visible GPU cannot compute in bf16; train with fp16 or use Ampere or newer"
        )


def _check_deepspeed(report: Report, config: DoctorConfig) -> None:
    # DeepSpeed prints its accelerator choice and op warnings on import; keep doctor's output readable.
    quiet = io.StringIO()
    previous_level = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with redirect_stdout(quiet):
            import deepspeed
            from deepspeed.accelerator import get_accelerator
            from deepspeed.ops.op_builder.all_ops import ALL_OPS

            accelerator = get_accelerator().device_name()
            buildable, not_buildable = [], []
            for name, builder in sorted(ALL_OPS.items()):
                if name == "deepspeed_not_implemented":
                    continue
                try:
                    compatible = builder.is_compatible(verbose=False)
                except Exception:  # an op builder that crashes cannot build either
                    compatible = False
                (buildable if compatible else not_buildable).append(name)
    except Exception as error:
        report.fact("deepspeed", f"cannot import ({type(error).__name__}: {error})")
        report.problem(
            f"deepspeed: import failed ({error}); reinstall deepspeed==0.19.8 in the environment"
        )
        return
    finally:
        logging.disable(previous_level)
    report.fact("deepspeed", f"{deepspeed.__version__}, accelerator {accelerator}")
    report.fact("  ops buildable", ", ".join(buildable) or "none")
    report.fact("  ops not buildable", ", ".join(not_buildable) or "none")
    for name in config.deepspeed_ops:
        if name not in ALL_OPS:
            report.problem(
                f"deepspeed op {name}: unknown for accelerator {accelerator}; known: {', '.join(sorted(ALL_OPS))}"
            )
        elif name not in buildable:
            report.problem(
                f"deepspeed op {name}: cannot be built here; see 'ds_report' for the missing compiler or CUDA headers"
            )


def _check_wandb(report: Report, config: DoctorConfig) -> None:
    version = _installed("wandb") or "not installed"
    mode = os.environ.get("WANDB_MODE", "online")
    if os.environ.get("WANDB_API_KEY", "").strip():
        state = "logged in (key from WANDB_API_KEY)"
    elif _netrc_has_wandb_key():
        state = "logged in (key in ~/.netrc)"
    else:
        state = "not logged in"
    report.fact("wandb", f"{version}, {state}, mode {mode}")
    if (
        config.require_wandb_login
        and state == "not logged in"
        and mode not in ("offline", "disabled")
    ):
        report.problem(
            "wandb: no API key; run 'wandb login' once, or export WANDB_API_KEY in the job, or set WANDB_MODE=offline"
        )


def _netrc_has_wandb_key() -> bool:
    host = (
        urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
        or "api.wandb.ai"
    )
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def _check_disk(report: Report, config: DoctorConfig) -> None:
    root = Path(config.run_root).resolve()
    existing = root
    while not existing.exists():
        existing = existing.parent
    free_gib = shutil.disk_usage(existing).free / 2**30
    note = "" if existing == root else f" (not created yet; measured at {existing})"
    report.fact("run root", f"{root}: {free_gib:,.1f} GiB free{note}")
    if not os.access(existing, os.W_OK):
        report.problem(
            f"run root: {existing} is not writable; set run_root to a directory you can write"
        )
    if free_gib < config.min_free_disk_gb:
        report.problem(
            f"run root: {free_gib:,.1f} GiB free at {existing}, need {config.min_free_disk_gb:,.1f}; "
            "free space or point run_root (or KINOE_RUN_ROOT) elsewhere"
        )


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
