"""The shared environment and project layout stay consistent: one set of pins, every stage package present."""

from __future__ import annotations

import importlib
import re
import subprocess
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

from conftest import REPO

STAGE_PACKAGES = (
    "common",
    "data_prep",
    "tokenizer",
    "models",
    "training",
    "pretrain",
    "convert",
    "finetune",
    "eval",
    "launch",
)


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def environment() -> dict:
    return yaml.safe_load((REPO / "environment.yml").read_text())


def test_environment_pins_equal_pyproject_pins():
    project = pyproject()["project"]
    wanted = {Requirement(r).name: str(Requirement(r).specifier) for r in project["dependencies"]}
    wanted |= {
        Requirement(r).name: str(Requirement(r).specifier)
        for r in project["optional-dependencies"]["dev"]
    }
    pip_section = next(d["pip"] for d in environment()["dependencies"] if isinstance(d, dict))
    pinned = {Requirement(r).name: str(Requirement(r).specifier) for r in pip_section}
    assert pinned == wanted
    assert all(spec.startswith("==") for spec in pinned.values()), (
        "the shared environment pins exact versions"
    )


def test_gpu_wheels_decides_every_dependency():
    # launch/gpu_wheels.sh makes a bare GPU machine usable: each pin is shipped by the image,
    # left out on purpose, or brought; a new dependency must be placed in one list.
    script = (REPO / "launch" / "gpu_wheels.sh").read_text()
    lists = {
        name: set(re.search(rf'^{name}="([^"]*)"', script, re.MULTILINE).group(1).split())
        for name in ("IMAGE_HAS", "LEFT_OUT", "BROUGHT")
    }
    pinned = {Requirement(r).name for r in pyproject()["project"]["dependencies"]}
    placed = [name for names in lists.values() for name in names]
    assert sorted(placed) == sorted(pinned)


def test_gpu_wheels_pins_every_brought_package_at_pyprojects_version():
    # `pin` reads versions from pyproject.toml; a pin it cannot find once fetched "liger-kernel=="
    # (any version) without stopping the build.
    script = REPO / "launch" / "gpu_wheels.sh"
    pin = re.search(r"^pin\(\) \{.*?^\}", script.read_text(), re.MULTILINE | re.DOTALL).group(0)
    project = pyproject()["project"]
    requirements = [Requirement(r) for r in project["dependencies"]] + [
        Requirement(r) for extra in project["optional-dependencies"].values() for r in extra
    ]
    versions = {r.name: str(r.specifier).removeprefix("==") for r in requirements}
    for name in ("deepspeed", "pydantic", "torchao", "liger-kernel"):
        found = subprocess.run(
            ["bash", "-c", f'{pin}\nrepo={REPO}\npin "$1"', "pin", name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert found == versions[name], name
    missing = subprocess.run(
        ["bash", "-c", f'{pin}\nrepo={REPO}\npin "$1"', "pin", "no-such-package"],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 1 and "not pinned" in missing.stderr


def test_python_version_agrees():
    conda = [d for d in environment()["dependencies"] if isinstance(d, str)]
    assert "python=3.11" in conda
    assert pyproject()["project"]["requires-python"] == ">=3.11,<3.12"


def test_gpu_extra_is_documented_in_environment_file():
    (flash,) = pyproject()["project"]["optional-dependencies"]["gpu"]
    assert flash in (REPO / "environment.yml").read_text()


def test_every_stage_package_imports():
    for name in STAGE_PACKAGES:
        module = importlib.import_module(name)
        assert Path(module.__file__).parent == REPO / name, f"{name} resolves outside the checkout"


def test_readme_opens_with_the_two_commands_and_ci_runs_the_tests():
    opening = (REPO / "README.md").read_text().split("\n## ")[0]
    assert "make quickstart" in opening and "make test" in opening
    assert "make test" in (REPO / ".ci" / "run").read_text()
