"""Sharded safetensors files, written one tensor at a time and read lazily.

Layout, as Hugging Face writes it: ``<prefix>.safetensors`` when everything fits in one file,
else ``<prefix>-00001-of-0000N.safetensors`` plus ``<prefix>.safetensors.index.json``
(``metadata.total_size`` and ``weight_map``: tensor name -> file).

The writer plans every file from the tensors' shapes, writes each file's header, then each
tensor's bytes as soon as the tensor is read and converted; the tensor is dropped before the
next is read. ``safetensors.torch.save_file`` would first gather a whole file's tensors and
then copy them into one byte buffer, about twice a shard; streaming keeps conversion memory
at one tensor. The format is small (a little-endian u64 header length, a JSON header of
dtype, shape and byte offsets, the raw bytes) and every file written is read back by
``safetensors.safe_open`` in the tests and in verification.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from common.errors import KinoeError
from common.progress import Progress
from convert.sources import TensorRef

DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {name: dtype for dtype, name in DTYPES.items()}
_MB = 1_000_000


def index_name(prefix: str) -> str:
    return f"{prefix}.safetensors.index.json"


def stored_dtype(ref: TensorRef, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype ``ref`` is written in: ``dtype`` for floating tensors when given, else its own."""
    return dtype if dtype is not None and ref.dtype.is_floating_point else ref.dtype


def _nbytes(ref: TensorRef, dtype: torch.dtype) -> int:
    return ref.numel * dtype.itemsize


def plan_files(
    tensors: dict[str, TensorRef], dtype: torch.dtype | None, max_bytes: int
) -> list[list[str]]:
    """Tensor names per file, in order, each file at most ``max_bytes`` unless one tensor is larger."""
    files: list[list[str]] = [[]]
    size = 0
    for name, ref in tensors.items():
        nbytes = _nbytes(ref, stored_dtype(ref, dtype))
        if files[-1] and size + nbytes > max_bytes:
            files.append([])
            size = 0
        files[-1].append(name)
        size += nbytes
    return files


def write_sharded(
    tensors: dict[str, TensorRef],
    directory: Path,
    prefix: str,
    dtype: torch.dtype | None,
    max_bytes: int,
    progress_label: str,
) -> dict:
    """Write ``tensors`` (no two names sharing one) as sharded safetensors; return what was written.

    Floating tensors are converted to ``dtype`` (None: kept as stored). Returns ``files``
    (names), ``total_size`` (bytes of tensor data) and ``tensors`` (count).
    """
    directory.mkdir(parents=True, exist_ok=True)
    for stale in [*directory.glob(f"{prefix}*.safetensors"), directory / index_name(prefix)]:
        stale.unlink(missing_ok=True)  # a previous attempt's files, possibly sharded otherwise
    plan = plan_files(tensors, dtype, max_bytes)
    names = (
        [f"{prefix}.safetensors"]
        if len(plan) == 1
        else [f"{prefix}-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    )
    total = sum(_nbytes(ref, stored_dtype(ref, dtype)) for ref in tensors.values())
    with Progress(progress_label, total=max(1, -(-total // _MB)), unit="MB") as progress:
        written = 0

        def advance(nbytes: int) -> None:
            nonlocal written
            written += nbytes
            progress.update(-(-written // _MB) - progress.done)

        for file_name, members in zip(names, plan, strict=True):
            # Largest elements first, as safetensors orders them, so that every tensor starts
            # at a multiple of its element size.
            members = sorted(members, key=lambda n: -stored_dtype(tensors[n], dtype).itemsize)
            _write_file(
                directory / file_name, {name: tensors[name] for name in members}, dtype, advance
            )
    weight_map = {
        name: file_name for file_name, members in zip(names, plan, strict=True) for name in members
    }
    if len(plan) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / index_name(prefix)).write_text(json.dumps(index, indent=2) + "\n")
    return {"files": names, "total_size": total, "tensors": len(tensors)}


def _write_file(
    path: Path,
    tensors: dict[str, TensorRef],
    dtype: torch.dtype | None,
    on_bytes: Callable[[int], None],
) -> None:
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, ref in tensors.items():
        out = stored_dtype(ref, dtype)
        if out not in DTYPES:
            raise KinoeError(f"{name}: dtype {out} has no safetensors name")
        nbytes = _nbytes(ref, out)
        header[name] = {
            "dtype": DTYPES[out],
            "shape": list(ref.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as safetensors pads it
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name, ref in tensors.items():
            tensor = ref.read()
            if tuple(tensor.shape) != ref.shape:
                raise KinoeError(
                    f"{name}: read a tensor of shape {tuple(tensor.shape)}, expected {ref.shape}"
                )
            tensor = tensor.to(stored_dtype(ref, dtype)).contiguous().reshape(-1)
            handle.write(tensor.view(torch.uint8).numpy().data)
            nbytes = tensor.numel() * tensor.element_size()
            del tensor
            on_bytes(nbytes)
    temporary.replace(path)


def read_sharded(directory: Path, prefix: str) -> dict[str, TensorRef]:
    """The tensors of ``<prefix>.safetensors`` or of its index's files, unread, in file order."""
    directory = Path(directory)
    index_path = directory / index_name(prefix)
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as error:
            raise KinoeError(f"{index_path}: not a safetensors index ({error})") from None
        files = list(dict.fromkeys(weight_map.values()))
    elif (directory / f"{prefix}.safetensors").is_file():
        weight_map, files = None, [f"{prefix}.safetensors"]
    else:
        raise KinoeError(f"{directory} holds no {prefix}.safetensors nor {index_name(prefix)}")
    tensors: dict[str, TensorRef] = {}
    for file_name in files:
        path = directory / file_name
        if not path.is_file():
            raise KinoeError(f"{index_path} names {file_name}, which is missing from {directory}")
        try:
            handle = safe_open(str(path), framework="pt")
            names = list(handle.keys())
            for name in names:
                if weight_map is not None and weight_map.get(name) != file_name:
                    continue
                view = handle.get_slice(name)
                dtype_name = view.get_dtype()
                if dtype_name not in TORCH_DTYPES:
                    raise KinoeError(f"{path}: tensor {name} has unsupported dtype {dtype_name}")
                tensors[name] = TensorRef(
                    tuple(view.get_shape()),
                    TORCH_DTYPES[dtype_name],
                    lambda handle=handle, name=name: handle.get_tensor(name),
                )
        except (SafetensorError, OSError) as error:
            raise KinoeError(
                f"{path}: not a readable safetensors file ({str(error).splitlines()[0]}); "
                "the file is truncated or corrupt: copy or convert it again"
            ) from None
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise KinoeError(
                f"{index_path} maps {len(missing)} tensors to files that lack them, first {missing[0]}"
            )
    return tensors
