"""The task registry: name -> ``Task``. A new dataset is one module here and one line below."""

from __future__ import annotations

from eval.tasks import (
    jamp,
    janli,
    jcommonsenseqa,
    jemhopqa,
    jmmlu,
    jnli,
    jsem,
    jsick,
    jsquad,
    jsts,
    mawps,
    niilc,
)
from eval.tasks.base import Task

REGISTRY: dict[str, Task] = {
    task.name: task
    for task in (
        jcommonsenseqa.TASK,
        jnli.TASK,
        jsquad.TASK,
        jsts.TASK,
        jmmlu.TASK,
        jemhopqa.TASK,
        niilc.TASK,
        jsick.TASK,
        janli.TASK,
        jamp.TASK,
        jsem.TASK,
        mawps.TASK,
    )
}
