"""The kinoe command: help, one-line config errors with exit code 2, and doctor on a CPU machine."""

from __future__ import annotations

import secrets

import pytest

from launch.cli import COMMANDS, build_parser
from launch.doctor import DoctorConfig, diagnose


def test_help_lists_every_command(kinoe):
    result = kinoe("--help", process=True)  # the installed console script itself
    assert result.returncode == 0
    for name in COMMANDS:
        assert name in result.stdout


def test_every_listed_command_has_help(capsys):
    # In this process rather than one `kinoe` each (test_help_lists_every_command runs the real
    # console script): the same parser, built as main() builds it, imports each command module.
    steps = {
        "tokenizer": ("train", "export", "report", "encode"),
        "convert": ("to-hf", "verify", "from-hf"),
        "eval": ("run", "mt-bench", "judge"),
        "finetune": ("jaster", "sft", "dpo"),
    }
    for name in COMMANDS:
        for step in steps.get(name, ("",)):
            argv = [*filter(None, (name, step)), "--help"]
            with pytest.raises(SystemExit) as exited:
                build_parser(name).parse_args(argv)
            assert exited.value.code == 0, argv
            assert "-c CONFIG" in capsys.readouterr().out, argv


def test_doctor_passes_on_this_cpu_machine(kinoe):
    result = kinoe("doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    for item in (
        "python",
        "torch",
        "GPUs",
        "deepspeed",
        "ops buildable",
        "datatrove",
        "transformers",
        "sentencepiece",
        "wandb",
        "run root",
    ):
        assert any(
            line.startswith(item) or line.strip().startswith(item)
            for line in result.stdout.splitlines()
        ), item
    assert "no problems found" in result.stdout


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (
            ["expect_gpu=1"],
            "unknown key 'expect_gpu' (from the command line); did you mean expect_gpus?",
        ),
        (
            ["expect_gpus=two"],
            "'expect_gpus' (from the command line): Input should be a valid integer",
        ),
        (
            ["min_free_disk_gb=-5"],
            "'min_free_disk_gb' (from the command line): Input should be greater than or equal to 0",
        ),
    ],
)
def test_config_errors_are_one_line_with_exit_code_2(kinoe, args, key):
    result = kinoe("doctor", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kinoe doctor: error: config error")
    assert key in lines[0]
    assert "Traceback" not in result.stderr


def test_unknown_key_in_config_file(kinoe, tmp_path):
    config = tmp_path / "node.yaml"
    config.write_text("expect_gpus: 8\nmin_free_disk: 100\n")
    result = kinoe("doctor", "-c", str(config))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"kinoe doctor: error: config error in {config}: unknown key 'min_free_disk'; did you mean min_free_disk_gb?"
    )


def test_doctor_reports_each_problem_in_one_line(kinoe):
    result = kinoe("doctor", "expect_gpus=1", "min_free_disk_gb=1e9", "deepspeed_ops=[async_io]")
    assert result.returncode == 1
    assert "3 problem(s):" in result.stdout
    assert "GPUs: 0 visible, expected 1; torch is a CPU build" in result.stdout
    assert "GiB free at" in result.stdout and "need 1,000,000,000.0" in result.stdout
    assert "deepspeed op async_io: cannot be built here" in result.stdout


def test_shipped_doctor_configs_load():
    from pathlib import Path

    from common.config import load_config

    configs = sorted((Path(__file__).parent.parent / "configs" / "doctor").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(DoctorConfig, path)


def test_wandb_login_state_is_shown_but_never_the_key(kinoe, tmp_path):
    key = secrets.token_hex(20)
    result = kinoe("doctor", env={"WANDB_API_KEY": key})
    assert "logged in (key from WANDB_API_KEY)" in result.stdout
    assert key not in result.stdout + result.stderr

    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {key}\n")
    netrc.chmod(0o600)
    result = kinoe("doctor", env={"WANDB_API_KEY": "", "NETRC": str(netrc)})
    assert "logged in (key in ~/.netrc)" in result.stdout
    assert key not in result.stdout + result.stderr


def test_wandb_login_can_be_required(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "absent"))
    monkeypatch.setenv("WANDB_MODE", "online")
    report = diagnose(DoctorConfig(require_wandb_login=True, run_root=tmp_path))
    assert any(p.startswith("wandb: no API key") for p in report.problems)
    monkeypatch.setenv("WANDB_MODE", "offline")
    report = diagnose(DoctorConfig(require_wandb_login=True, run_root=tmp_path))
    assert not any(p.startswith("wandb") for p in report.problems)


def test_console_error_lines_are_redacted_like_the_log(kinoe, tmp_path):
    key = "wk" + "0123456789abcdef" * 2
    missing = tmp_path / key / "node.yaml"  # a secret inside a path the error line names
    result = kinoe("doctor", "-c", str(missing), env={"WANDB_API_KEY": key})
    assert result.returncode == 2
    assert key not in result.stderr and "<redacted:WANDB_API_KEY>" in result.stderr
