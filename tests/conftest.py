"""Shared test fixtures: no network, offline W&B and Hugging Face, the real shared data, the kinoe command.

Also ``slurm_cluster``: a real SLURM cluster on this machine (tests/slurm_cluster.py)."""

from __future__ import annotations

import contextlib
import io
import ipaddress
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_cluster import LocalSlurmCluster, slurm_available

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

# Set before anything imports wandb or huggingface_hub, and inherited by subprocesses.
os.environ.update({"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})

_real_connect = socket.socket.connect


def _loopback_only(sock: socket.socket, address, *args, **kwargs):
    """Tests reach only servers they start on this machine."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        host = address[0]
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise OSError(f"tests may not use the network (tried {host})")
    return _real_connect(sock, address, *args, **kwargs)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", _loopback_only)


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (licensed real data, never copied into the project); skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (see ../shared/data/SOURCES.md)")
    return SHARED_DATA


@pytest.fixture
def kinoe(tmp_path):
    """Run ``kinoe *args``; returns a CompletedProcess (exit code, stdout, stderr).

    By default through the console script's entry point in this process, with the environment
    and working directory the command would have: the same parsing, errors and output, without
    an interpreter start and its seconds of imports per call (a traceback surfaces as the
    test's own exception). ``process=True`` runs the installed console script itself.
    """
    script = Path(sys.executable).parent / "kinoe"
    if not script.exists():
        pytest.fail(f"{script} missing: install kinoe with 'pip install -e .' (make test does)")

    def run(
        *args: str,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        process: bool = False,
    ):
        args = tuple(str(arg) for arg in args)  # paths welcome, as on a command line
        settings = {"KINOE_RUN_ROOT": str(tmp_path / "runs"), **(env or {})}
        if process:
            return subprocess.run(
                [str(script), *args],
                capture_output=True,
                text=True,
                cwd=cwd or REPO,
                env={**os.environ, **settings},
                timeout=300,
            )
        from launch.cli import main

        stdout, stderr = io.StringIO(), io.StringIO()
        with (
            pytest.MonkeyPatch.context() as patch,
            contextlib.redirect_stdout(stdout),
            contextlib.redirect_stderr(stderr),
        ):
            for name, value in settings.items():
                patch.setenv(name, value)
            patch.chdir(cwd or REPO)
            try:
                code = main(list(args))
            except SystemExit as exit:  # argparse (--help, --version, usage errors), sys.exit
                code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
                if isinstance(exit.code, str):
                    print(exit.code, file=sys.stderr)  # as the interpreter would at exit
        return subprocess.CompletedProcess(
            ["kinoe", *args], code, stdout.getvalue(), stderr.getvalue()
        )

    return run


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """The ``error:`` lines of a command's stderr (one, for a refusal)."""
    return [line for line in result.stderr.splitlines() if "error:" in line]


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """One real SLURM cluster (munged, slurmctld, slurmd on this machine) for the whole session.

    Skips with the reason when SLURM is not installed or the tests do not run as root. Jobs run as
    root, so they can write into any test's tmp_path. See tests/slurm_cluster.py.
    """
    reason = slurm_available()
    if reason:
        pytest.skip(reason)
    with LocalSlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def pretrain_shards(tmp_path_factory) -> dict:
    """Real token shards (wikipedia, web, instructions) and their tokenizer; see tests/pretrain_corpus.py."""
    from pretrain_corpus import build_pretrain_shards

    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (see ../shared/data/SOURCES.md)")
    return build_pretrain_shards(SHARED_DATA, tmp_path_factory.mktemp("pretrain_shards"))


@pytest.fixture(scope="session")
def kinoe_model_dir(pretrain_shards, tmp_path_factory) -> Path:
    """A tiny Mistral trained by `kinoe pretrain` on the real shards and converted by `kinoe convert`.

    Shared by the eval and finetune tests: a Hugging Face directory with the project's chat
    template, fp32 weights and room for 1,024 positions.
    """
    from test_pretrain_train import launch, run_dir, write_config

    from common.run import run_stage
    from convert.cli import STEPS as CONVERT_STEPS
    from convert.config import ConvertConfig
    from tokenizer.chat import CHAT_TEMPLATE
    from tokenizer.hf_export import export_hf_tokenizer

    root = tmp_path_factory.mktemp("kinoe_model")
    config = write_config(
        root,
        pretrain_shards,
        "tiny",
        # Room for the 4-shot prompts, which the tiny preset's 256 positions would truncate.
        model={"preset": "tiny", "overrides": {"max_seq_len": 1024}},
        train={"steps": 30},
        checkpoint={"interval": 30},
    )
    result = launch(config, 1)
    assert result.returncode == 0, result.stdout[-3000:]
    tokenizer = export_hf_tokenizer(
        pretrain_shards["tokenizer"], root / "hf_tokenizer", CHAT_TEMPLATE
    )
    convert = ConvertConfig.model_validate(
        {
            "run": {"root": str(root / "runs"), "name": "tiny"},
            "checkpoint": str(run_dir(config)),
            "tokenizer": str(tokenizer),
            "dtype": "fp32",
            "verify": {"text": str(SHARED_DATA / "corpus" / "wikipedia_ja_leads.jsonl.gz")},
        }
    )
    return run_stage(CONVERT_STEPS["to-hf"], convert).run_dir
