#!/usr/bin/env bash
# Make a bare GPU machine with no internet able to run kinoe's GPU stages and benchmarks.
#
#   bash launch/gpu_wheels.sh build DIR            # here, with internet: every missing wheel into DIR
#   eval "$(bash launch/gpu_wheels.sh install DIR)" # there: installs them, exports PYTHONPATH
#
# shellcheck disable=SC2034  # the three lists are read by tests/test_environment.py
# Every pyproject.toml dependency is in exactly one of these lists (tests/test_environment.py
# checks), so a new dependency needs a decision here:
# - the lent GPU images already ship it (torch above all is never brought: the image's build
#   matches its driver; the others are close enough to the pins for the GPU stages);
IMAGE_HAS="torch transformers tokenizers safetensors sentencepiece numpy pyarrow xxhash tqdm matplotlib scipy peft protobuf pyyaml"
# - not needed there: data preparation (its quality classifier too) and tokenizer encoding run on CPU machines (bring their
#   outputs), and neither W&B nor the MT-Bench judge (httpx, imported only to judge) works without internet;
LEFT_OUT="datatrove datasets orjson fasttext-wheel wandb httpx"
# - brought, at pyproject's version, with the dependencies the image lacks (build below).
BROUGHT="deepspeed pydantic torchao"
#
# Settings (environment): PYTHON_VERSION (default 3.12, the image's) for `build`; PYTHON (default
# python3) for both; SITE (default DIR/site) is where `install` puts the packages.
set -euo pipefail

usage() {
    echo "usage: bash launch/gpu_wheels.sh build DIR | install DIR" >&2
    exit 2
}
[[ $# -eq 2 ]] || usage
action=$1
dir=$2
python=${PYTHON:-python3}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# The version pyproject.toml pins for a package (the one source of versions).
pin() {
    local version
    # Anywhere on a line: the pin may sit in an extra's one-line list (bench = ["liger-kernel==…"]).
    version=$(sed -n "s/.*\"$1==\([^\"]*\)\".*/\1/p" "$repo/pyproject.toml" | head -1)
    [[ -n $version ]] || { echo "gpu_wheels.sh: $1 is not pinned in pyproject.toml" >&2; exit 1; }
    echo "$version"
}

# A Requires-Dist of a downloaded wheel, as a pip requirement ("pydantic-core==2.41.5").
requirement_of() {
    local wheel=$1 name=$2
    unzip -p "$wheel" '*.dist-info/METADATA' |
        sed -n "s/^Requires-Dist: \($name[ ]*[=<>!~][^;]*\)\(;.*\)\{0,1\}$/\1/Ip" | head -1 | tr -d ' '
}

build() {
    mkdir -p "$dir"
    local pydantic deepspeed
    pydantic=$(pin pydantic)
    deepspeed=$(pin deepspeed)
    # Binary wheels for the image's interpreter; --no-deps so that nothing the image has
    # (torch above all) is fetched: each missing dependency is named here instead.
    local fetch=("$python" -m pip download --quiet --no-deps --only-binary=:all:
        --python-version "${PYTHON_VERSION:-3.12}" --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform any -d "$dir")
    "${fetch[@]}" "pydantic==$pydantic"
    local wheel
    wheel=$(ls "$dir"/pydantic-"$pydantic"-*.whl)
    # pydantic pins its core exactly; its other needs are taken at the versions it asks for.
    "${fetch[@]}" "$(requirement_of "$wheel" pydantic-core)" \
        "$(requirement_of "$wheel" annotated-types)" \
        "$(requirement_of "$wheel" typing-inspection)" \
        "typing-extensions>=4.16" hjson
    # DeepSpeed is published as a source distribution only. Without its ops (DS_BUILD_OPS=0)
    # it builds into a pure-Python wheel; ops it needs compile on first use on the GPU machine.
    DS_BUILD_OPS=0 "$python" -m pip wheel --quiet --no-deps --no-build-isolation \
        -w "$dir" "deepspeed==$deepspeed"
    # engine.fp8's float8 training (its kernels are built for CUDA in the abi3 wheel), and the
    # Liger kernels of the Hugging Face baseline in benchmarks/pretrain_throughput.py (triton,
    # which it needs, comes with the image's torch).
    # Pins are read first: a failed `pin` inside an argument list would not stop the script.
    local torchao liger
    torchao=$(pin torchao)
    liger=$(pin liger-kernel)
    "${fetch[@]}" "torchao==$torchao" "liger-kernel==$liger"
    ls -1 "$dir"/*.whl
    du -sh "$dir" >&2
}

install() {
    local site=${SITE:-$dir/site}
    # The image's Python is itself a virtual environment, so neither --user nor a venv with
    # --system-site-packages layers over it; a target folder on PYTHONPATH does, and keeps the
    # image's CUDA torch. --no-deps: the folder holds exactly what is missing.
    "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$site" "$dir"/*.whl >&2
    site=$(cd "$site" && pwd)
    PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" "$python" -c \
        "import deepspeed, pydantic, torch, torchao; print('gpu_wheels.sh: deepspeed', deepspeed.__version__, 'pydantic', pydantic.__version__, 'torchao', torchao.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())" >&2
    echo "export PYTHONPATH=$site:$repo\${PYTHONPATH:+:\$PYTHONPATH}"
    # No ops are prebuilt (DS_BUILD_OPS=0): keep DeepSpeed's JIT builds off the shared home.
    echo "export TORCH_EXTENSIONS_DIR=$site/torch_extensions"
}

case $action in
    build) build ;;
    install) install ;;
    *) usage ;;
esac
