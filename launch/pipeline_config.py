"""``PipelineConfig``: the steps of ``kinoe pipeline`` and where they run.

A pipeline is an ordered list of kinoe stage commands, each with its own config file and
overrides, exactly as one would type them (``tokenizer train -c configs/tokenizer/x.yaml``).
Everything a step computes comes from its own config; the pipeline says only the order, how
many processes a step gets on this machine, and what each SLURM job asks for. Errors a user
can make (an unknown command, a missing config file, a name used twice, an undefined
``${variable}``) are refused at load, naming the step, before anything runs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from common.config import Config
from common.errors import KinoeError
from common.run import StageConfig
from launch.jobs import SlurmJob

_STEP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_VARIABLE = re.compile(r"\$\{([^}]*)\}")
_VARIABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class PipelineStep(Config):
    """One step: ``kinoe <command> -c <config> <overrides>``."""

    name: str = Field(description="Unique name, for --from/--to, log files and job names")
    command: str = Field(
        description="kinoe command words: data, 'tokenizer train', pretrain, 'convert to-hf', "
        "'eval run', 'finetune sft', ..."
    )
    config: str = Field(description="The step's config file; may use ${variables}")
    overrides: list[str] = Field(
        default_factory=list, description="Dotted key=value overrides; may use ${variables}"
    )
    processes: int = Field(
        1,
        ge=1,
        description="Local mode: processes on this machine (>1: torchrun --standalone); "
        "on SLURM the job's nodes x gpus_per_node decide",
    )
    slurm: SlurmJob | None = Field(
        None, description="This step's job, over the pipeline's slurm section (keys set here win)"
    )

    @field_validator("name")
    @classmethod
    def _file_name(cls, value: str) -> str:
        if not _STEP_NAME.match(value):
            raise ValueError(
                f"step name {value!r} must be letters, digits, '.', '_' or '-' "
                "(it names log files and SLURM jobs)"
            )
        return value

    def words(self) -> list[str]:
        """The command as argv words: ``["tokenizer", "train"]``."""
        return self.command.split()

    def argv(self) -> list[str]:
        """Everything after ``kinoe``: command words, ``-c CONFIG`` and the overrides."""
        return [*self.words(), "-c", self.config, *self.overrides]


class PipelineConfig(StageConfig):
    """An ordered list of stage commands, run here one after the other or as dependent SLURM jobs."""

    mode: Literal["local", "slurm"] = Field(
        "local", description="local: run each step here; slurm: submit each step as a job"
    )
    variables: dict[str, str] = Field(
        default_factory=dict,
        description="Values for ${name} in the steps' config paths and overrides "
        "(set from the command line: variables.name=value)",
    )
    slurm: SlurmJob = Field(
        default_factory=SlurmJob, description="Every step's job unless the step says otherwise"
    )
    steps: list[PipelineStep] = Field(min_length=1)

    @field_validator("variables")
    @classmethod
    def _variable_names(cls, value: dict[str, str]) -> dict[str, str]:
        bad = sorted(name for name in value if not _VARIABLE_NAME.match(name))
        if bad:
            raise ValueError(f"variable names {bad} must be letters, digits and '_'")
        return value

    @model_validator(mode="after")
    def _check_steps(self) -> PipelineConfig:
        from launch.jobs import stage_of

        seen: dict[str, int] = {}
        for index, step in enumerate(self.steps):
            where = f"steps.{index} ({step.name})"
            if step.name in seen:
                raise ValueError(
                    f"{where}: the name {step.name!r} is already used by steps.{seen[step.name]}; "
                    "give each step its own name"
                )
            seen[step.name] = index
            try:
                stage_of(step.command)
            except KinoeError as error:
                raise ValueError(f"{where}: {error}") from None
            step.config = self._substitute(step.config, f"{where}.config")
            step.overrides = [self._substitute(o, f"{where}.overrides") for o in step.overrides]
            if not Path(step.config).is_file():
                raise ValueError(
                    f"{where}: config file {step.config} not found; fix the path "
                    "(relative paths are relative to the directory kinoe runs in)"
                )
            try:
                self.job_of(step)
            except ValidationError as error:
                problems = "; ".join(
                    ".".join(map(str, e["loc"]))
                    + ": " * bool(e["loc"])
                    + e["msg"].removeprefix("Value error, ")
                    for e in error.errors()
                )
                raise ValueError(
                    f"{where}: its job (slurm over the step's slurm): {problems}"
                ) from None
        return self

    def _substitute(self, text: str, where: str) -> str:
        def value(match: re.Match) -> str:
            name = match.group(1)
            if name not in self.variables:
                known = ", ".join(sorted(self.variables)) or "none"
                raise ValueError(
                    f"{where}: ${{{name}}} is not defined; add it to variables "
                    f"(or pass variables.{name}=<value>); defined: {known}"
                )
            return self.variables[name]

        return _VARIABLE.sub(value, text)

    def job_of(self, step: PipelineStep) -> SlurmJob:
        """The step's SLURM job: the pipeline's ``slurm`` with the keys the step sets on top
        (``env`` and ``sbatch_args`` merged key by key)."""
        fields = self.slurm.model_dump(include=self.slurm.model_fields_set)
        if step.slurm is not None:
            own = step.slurm.model_dump(include=step.slurm.model_fields_set)
            for key in ("env", "sbatch_args"):
                if key in own:
                    own[key] = {**fields.get(key, {}), **own[key]}
            fields.update(own)
        return SlurmJob.model_validate(fields)

    def index_of(self, name: str, flag: str) -> int:
        """The position of the step called ``name``, for ``--from``/``--to``."""
        for index, step in enumerate(self.steps):
            if step.name == name:
                return index
        raise KinoeError(
            f"{flag} {name!r} is not a step of this pipeline; its steps: "
            f"{', '.join(step.name for step in self.steps)}"
        )
