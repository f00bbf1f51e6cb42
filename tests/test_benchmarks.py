"""The GPU benchmark scripts, checked on CPU so that they do not rot between GPU sessions.

The figures themselves come from GPU runs (docs/benchmarks.md); here: every row the scripts
plan makes a config kinoe accepts, and pretrain_throughput.py runs a tiny model end to end and
exits non-zero when a variant fails."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import fp8_training  # noqa: E402
import scaling  # noqa: E402
from step_time import PRETRAIN_SOURCES, row_config  # noqa: E402

from pretrain.config import PretrainConfig  # noqa: E402

TINY = {"num_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4,
        "num_kv_heads": 2, "vocab_size": 512}  # fmt: skip


def _paths(tmp_path: Path) -> dict:
    return {
        "tokenizer": tmp_path / "tokenizer.model",
        "held_out": tmp_path / "held_out.jsonl",
        "hf_tokenizer": tmp_path / "hf",
        "sources": {name: tmp_path / "shards" / name for name in PRETRAIN_SOURCES},
        "sft": tmp_path / "sft.jsonl",
    }


def _rows():
    """(label, Namespace) for every row scaling.py and fp8_training.py can plan."""
    args = scaling.build_parser().parse_args(["--data", "unused"])
    for case in ("dense", "7b", "moe", "big"):
        for spec in scaling.plan(case, [1, 2, 4, 8]):
            yield f"scaling {case} {spec}", scaling.row_args(args, spec)
    args = fp8_training.build_parser().parse_args(["--data", "unused"])
    for name in fp8_training.ROWS:
        yield f"fp8 {name}", fp8_training.row_args(args, name)


def test_every_planned_row_makes_a_config_kinoe_accepts(tmp_path):
    rows = list(_rows())
    assert len(rows) == 4 + 1 + 4 + 1 + 4  # dense x4, 7b, moe (EP 1/2/4/8), big, fp8 x4
    for label, args in rows:
        config = row_config("pretrain", args, _paths(tmp_path), tmp_path / "row", tmp_path / "m")
        config["train"]["steps"] = args.warmup_steps + args.timed_steps  # run_row's override
        validated = PretrainConfig.model_validate(config)
        assert validated.model.preset == args.preset, label
        assert validated.engine.expert_parallel == args.expert_parallel, label
        assert validated.train.global_batch_size == args.global_batch, label
        assert validated.engine.fp8 == getattr(args, "fp8", None), label


def _throughput(*extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "benchmarks" / "pretrain_throughput.py"),
               "--seq-len", "64", "--micro-batch", "1", "--accumulation", "2", "--steps", "1",
               "--warmup", "1", "--overrides", json.dumps(TINY), *extra]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)


def test_pretrain_throughput_prints_every_row_and_the_ratio():
    result = _throughput("--variants", "hf,kinoe-sdpa", "--profile")
    assert result.returncode == 0, result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table[1:]] == ["| hf", "| kinoe-sdpa"]
    assert table[1].endswith("| 1.00x |")  # the only baseline is the fastest one
    assert "micro-batch 1 x 2" in result.stdout and '"num_layers": 2' in result.stdout
    # The profile's summary ran (on CPU no kernel has device time to share out).
    assert result.stderr.count("GPU work per step: 0.0 ms") == 2
    assert result.stderr.count("not under an operator: 0.0 ms per step") == 2


def test_pretrain_throughput_exits_non_zero_when_a_variant_fails():
    # engine.fp8 refuses a machine without FP8 tensor cores: this CPU.
    result = _throughput("--variants", "kinoe-sdpa", "--fp8", "tensorwise")
    assert result.returncode != 0
    assert "failed variants: kinoe-sdpa" in result.stderr
    assert "engine.fp8 tensorwise needs a CUDA GPU" in result.stderr


def test_pretrain_throughput_refuses_fp8_for_hugging_face_rows_and_unknown_variants():
    result = _throughput("--variants", "hf,kinoe-sdpa", "--fp8", "tensorwise")
    assert result.returncode == 2
    assert "--fp8 applies to kinoe's rows only" in result.stderr
    result = _throughput("--variants", "hf,kinoe-fast")
    assert result.returncode == 2
    assert "unknown variants kinoe-fast; choose from hf, hf-compile" in result.stderr


def test_scaling_refuses_an_unknown_case():
    with pytest.raises(SystemExit, match="unknown case"):
        scaling.plan("nonsense", [1])


def test_profile_parts_name_each_operator_once():
    import pretrain_throughput

    part = pretrain_throughput.profile_part
    # Operator names as the H200 profiles of docs/benchmarks.md print them.
    assert part("aten::mm") == part("aten::_scaled_mm") == part("aten::_grouped_mm")
    assert part("aten::mm") == "matrix products"
    assert part("triton_tem_fused_flex_attention_backward_transpose_view_1") == "attention"
    assert part("triton_tem_fused__to_copy_clamp_exp2_flex_attention_2") == "attention"
    assert part("triton_poi_fused__scaled_mm__to_copy_add_clamp_clone_3").startswith("FP8")
    assert part("triton_red_fused_abs_max_mul_silu_silu_backward_view_4").startswith("FP8")
    assert part("aten::copy_").startswith("copies")
    assert part("aten::_fused_adamw_") == "optimizer"
    assert part("aten::div_") == part("aten::add_") == "in-place adds, divisions, norms"
    assert part("triton_poi_fused_cat_mul_silu_silu_backward_split_2") == "SwiGLU"
    assert part("triton_poi_fused_mul_silu_5") == "SwiGLU"
    assert part("triton_red_fused__unsafe_view_clone_expand_index_put_3").startswith("expert")
    assert part("aten::sort") == part("aten::index_copy") == "expert routing and dispatch"
    assert part("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "RMSNorm"
    assert part("aten::mul") == "other"


def test_grad_accumulation_precision_finds_the_bf16_sum_rounding(pretrain_shards, capsys):
    import grad_accumulation_precision

    corpus = REPO.parent / "shared" / "data" / "corpus"
    small = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
             "intermediate_size": 128}  # fmt: skip
    code = grad_accumulation_precision.main([
        "--tokenizer", str(pretrain_shards["tokenizer"]),
        "--documents", str(corpus / "wikipedia_ja_leads.jsonl.gz"),
        "--overrides", json.dumps(small), "--seq-len", "64", "--max-k", "4",
        "--train-steps", "3",
    ])  # fmt: skip
    assert code == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    cells = [[cell.strip() for cell in line.strip("| ").split("|")] for line in table[1:]]
    rows = {int(row[0]): [float(cell.rstrip("%")) for cell in row[1:]] for row in cells}
    assert sorted(rows) == [1, 2, 4]
    assert rows[1][0] == rows[1][1] == 0.0  # one gradient: nothing rounded yet
    # Summing rounds: in bf16 by about 2^-9 of each add, in fp32 by about 2^-24.
    assert rows[4][0] > 1e-4 > 1e-6 > rows[4][1] > 0.0
    assert rows[4][4] > 0.1  # other text: a different gradient
