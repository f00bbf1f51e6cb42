"""Loading checkpoint and tensor files without running code they might carry.

A pickle can name any Python callable, and ``torch.load(weights_only=False)`` calls it: a
planted checkpoint file would run code on resume. Every load of a checkpoint or tensor file in
kinoe therefore unpickles only tensors, plain containers and the few DeepSpeed classes its
checkpoints hold. DeepSpeed's own loads (which ask for ``weights_only=False``) are forced the
same way by ``weights_only_loads()``, through torch's documented switch
``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, which torch reads at every call: no monkey-patching, and
the same rule for whatever path DeepSpeed takes (plain, universal or expert checkpoints).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from common.errors import KinoeError

FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
# torch refuses to run when both switches are set; a user's opt-out must not win here.
UNFORCE = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
# torch words the refusal differently for a blocked module and a global not allowed.
_GLOBAL = re.compile(r"GLOBAL (\S+)")
_REFUSAL = "Weights only load failed"


def allowed_globals() -> list[Any]:
    """DeepSpeed's classes its checkpoints pickle, allowed under ``weights_only``."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside, DeepSpeed's included, unpickles tensors and allowed types only."""
    saved = {name: os.environ.pop(name, None) for name in (FORCE, UNFORCE)}
    os.environ[FORCE] = "1"
    try:
        # Only what is not allowed yet: leaving a nested context removes the globals it added,
        # which would strip the outer context's (DeepSpeed's engine loads inside our resume).
        present = torch.serialization.get_safe_globals()
        missing = [kind for kind in allowed_globals() if kind not in present]
        with torch.serialization.safe_globals(missing):
            yield
    finally:
        os.environ.pop(FORCE, None)
        for name, value in saved.items():
            if value is not None:
                os.environ[name] = value


def refused(path: Path | str, error: BaseException) -> KinoeError | None:
    """The one-line refusal for a file that pickles something other than data, else None."""
    if not isinstance(error, pickle.UnpicklingError) or _REFUSAL not in str(error):
        return None
    name = _GLOBAL.search(str(error))
    what = name.group(1).rstrip(".") if name else "something other than tensors"
    return KinoeError(
        f"{path} pickles {what}, which kinoe never unpickles (code could run): "
        "the file was planted or not written by kinoe/DeepSpeed; delete it and restore the "
        "checkpoint from a copy you trust"
    )


def load(path: Path, what_to_do: str, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load`` of one file under ``weights_only``; refusals and damage are one line."""
    try:
        with weights_only_loads():
            return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as error:
        raise refused(path, error) or unreadable(path, error, what_to_do) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise unreadable(path, error, what_to_do) from None


def unreadable(path: Path, error: BaseException, what_to_do: str) -> KinoeError:
    """A file torch cannot read, in one line: the first sentence of torch's reason and the fix."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    first = first.split(". ")[0]  # torch's zip errors go on for several sentences
    return KinoeError(
        f"{path}: unreadable ({first[:200]}); the file is truncated or corrupt: {what_to_do}"
    )
