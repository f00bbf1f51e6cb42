# shellcheck shell=bash
# Sourced by the scripts in launch/slurm/: make the environment kinoe runs from the active one.
#
# Batch jobs start from a non-interactive shell that read no ~/.bashrc, so nothing is activated
# unless a script does it. The first of these that is set wins:
#
#   KINOE_CONDA_ENV   a conda environment, by name or prefix: the team's shared one
#                     (/shared/envs/kinoe, docs/environment.md). SlurmJob.conda_env sets it.
#   KINOE_CONDA_ROOT  where Miniconda is installed, when `conda` is not on PATH in the job
#                     (default: found from `conda` or $CONDA_EXE)
#   KINOE_VENV        a virtual environment instead (e.g. a personal layer over the shared env)
#
# Neither: the environment the job was submitted from, when it has kinoe on PATH (sbatch
# passes the submitting shell's PATH on), else the .venv of this checkout (`make test`).
# Exports KINOE_PYTHON, the interpreter kinoe runs on.
#
# Site settings every job needs (NCCL_SOCKET_IFNAME, proxies, module loads) belong in the
# environment's activation hook ($ENV/etc/conda/activate.d/, docs/environment.md) or in
# SlurmJob.env, not here.

_kinoe_env_error() {
    echo "kinoe env: error: $*" >&2
    return 1
}

_kinoe_activate() {
    local checkout
    checkout="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
    if [[ -n "${KINOE_CONDA_ENV:-}" ]]; then
        local root="${KINOE_CONDA_ROOT:-}"
        if [[ -z "$root" && -n "${CONDA_EXE:-}" ]]; then
            root="$(dirname "$(dirname "$CONDA_EXE")")"
        elif [[ -z "$root" ]] && command -v conda >/dev/null; then
            root="$(conda info --base 2>/dev/null)"
        fi
        if [[ -z "$root" || ! -f "$root/etc/profile.d/conda.sh" ]]; then
            _kinoe_env_error "KINOE_CONDA_ENV=$KINOE_CONDA_ENV but no conda found (tried" \
                "'${root:-KINOE_CONDA_ROOT, CONDA_EXE, conda on PATH}');" \
                "set KINOE_CONDA_ROOT to the Miniconda install, e.g. /shared/miniconda3"
            return 1
        fi
        # conda's activation scripts read unset variables; the callers run with set -u.
        set +u
        # shellcheck disable=SC1091
        source "$root/etc/profile.d/conda.sh" && conda activate "$KINOE_CONDA_ENV"
        local status=$?
        set -u
        ((status == 0)) || {
            _kinoe_env_error "'conda activate $KINOE_CONDA_ENV' failed; check KINOE_CONDA_ENV" \
                "(conda env list shows the names and prefixes)"
            return 1
        }
    elif [[ -n "${KINOE_VENV:-}" ]]; then
        [[ -f "$KINOE_VENV/bin/activate" ]] || {
            _kinoe_env_error "KINOE_VENV=$KINOE_VENV is not a virtual environment" \
                "(no bin/activate); point it at one or unset it"
            return 1
        }
        set +u
        # shellcheck disable=SC1091
        source "$KINOE_VENV/bin/activate"
        set -u
    elif ! command -v kinoe >/dev/null && [[ -f "$checkout/.venv/bin/activate" ]]; then
        set +u
        # shellcheck disable=SC1091
        source "$checkout/.venv/bin/activate"
        set -u
    fi
    command -v kinoe >/dev/null || {
        _kinoe_env_error "kinoe is not installed in the job's environment ($(command -v python ||" \
            "echo 'no python')); set KINOE_CONDA_ENV to the shared environment, or install" \
            "kinoe into this one ('pip install --no-deps -e $checkout')"
        return 1
    }
    # The interpreter kinoe is installed in (console scripts sit beside it), for the scripts'
    # own Python (torchrun, launch.jobs): a `python` found first on PATH may be another one.
    KINOE_PYTHON="$(dirname "$(command -v kinoe)")/python"
    [[ -x "$KINOE_PYTHON" ]] || KINOE_PYTHON="$(command -v python3)"
    export KINOE_PYTHON
    echo "kinoe env: $(command -v kinoe) ($KINOE_PYTHON, $("$KINOE_PYTHON" -c 'import sys; print(sys.prefix)'))"
}

_kinoe_activate
