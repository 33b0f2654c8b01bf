"""Saved weights and model configs read with every failure a ChatforgeError naming the file: safetensors files
checked by their framing before the library reads them, a recorded GPT config checked field by field, and one
comparison of tensor shapes. Checkpoints (``chatforge.model.checkpoint``), Hugging Face GPT-2 folders
(``chatforge.model.hf``), embedders and reward models all load through here.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from chatforge import io
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPTConfig


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's framing (None when its header and size agree): the 8-byte header
    length, a JSON header of tensors whose data offsets must tile the rest of the file exactly."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            start = fh.read(8)
            if len(start) < 8:
                return f"{size} bytes, too short for a safetensors header"
            (header_len,) = struct.unpack("<Q", start)
            if header_len > size - 8:
                return f"header length {header_len} exceeds the file ({size} bytes): the file is truncated"
            header = json.loads(fh.read(header_len).decode("utf-8"))
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return "the header is not valid JSON"
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    try:
        ends = [int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"]
    except (TypeError, KeyError, IndexError, ValueError):
        return "a tensor entry of the header has no valid data_offsets"
    expected = 8 + header_len + max(ends, default=0)
    if expected != size:
        truncated = ": the file is truncated" if size < expected else ""
        return f"the header describes {expected} bytes but the file has {size}{truncated}"
    return None


def read_safetensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a truncated or malformed file is a ChatforgeError naming it."""
    path = Path(path)
    problem = safetensors_problem(path)
    if problem:
        raise ChatforgeError(f"{path} is damaged: {problem}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ChatforgeError(f"{path} is damaged: {exc}") from None


def shape_difference(found: dict[str, tuple], expected: dict[str, tuple]) -> str | None:
    """The first few names missing, unexpected or of another shape in ``found`` (None when it equals ``expected``)."""
    if found == expected:
        return None
    missing = sorted(set(expected) - set(found))[:3]
    extra = sorted(set(found) - set(expected))[:3]
    both = sorted(set(found) & set(expected))
    shapes = [f"{k}: {found[k]} vs {expected[k]}" for k in both if found[k] != expected[k]][:3]
    return f"missing {missing}, unexpected {extra}, shapes {shapes}"


def recorded_gpt_config(path: Path, values: dict) -> GPTConfig:
    """The GPTConfig recorded in a checkpoint's config.json, every field of its declared type and valid."""
    try:
        config = GPTConfig(**values)
    except TypeError as exc:
        raise ChatforgeError(f"{path}: bad model config: {exc}") from None
    for name, default in GPTConfig().to_dict().items():
        value = getattr(config, name)
        numeric = isinstance(default, float) and isinstance(value, int)
        if type(value) is not type(default) and not numeric:
            raise ChatforgeError(f"{path}: model.{name} must be {type(default).__name__}; got {value!r}")
    try:
        config.validate()
    except (TypeError, ValueError) as exc:
        raise ChatforgeError(f"{path}: bad model config: {exc}") from None
    except ChatforgeError as exc:
        raise ChatforgeError(f"{path}: {exc}") from None
    return config


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                       torch.bool: "BOOL"}
EXPORT_GROUP_BYTES = 256 * 2**20  # tensors read from the shards per load: the export's memory beyond one tensor


def export_sharded(shards: str | Path, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write the tensors of a ``torch.distributed.checkpoint`` folder (a sharded model's state dict, saved by every
    rank) into one safetensors file at ``path``, streaming: the header is computed from the shards' metadata,
    then the tensors are read whole from the shards a few at a time (up to ``EXPORT_GROUP_BYTES``, or one larger
    tensor) and appended. No process ever holds the whole model, let alone its optimizer state.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(shards))
    stored = reader.read_metadata().state_dict_metadata
    tensors = {name: (tuple(meta.size), meta.properties.dtype) for name, meta in sorted(stored.items())
               if isinstance(meta, TensorStorageMetadata)}
    header, offset = {}, 0
    for name, (shape, dtype) in tensors.items():
        if dtype not in _SAFETENSORS_DTYPES:
            raise ChatforgeError(f"{shards}: tensor {name} has dtype {dtype}, which safetensors cannot hold")
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    groups, group, group_bytes = [], [], 0
    for name, (shape, dtype) in tensors.items():
        size = math.prod(shape) * dtype.itemsize
        if group and group_bytes + size > EXPORT_GROUP_BYTES:
            groups.append(group)
            group, group_bytes = [], 0
        group.append(name)
        group_bytes += size
    groups.append(group)
    with io.atomic_path(Path(path)) as tmp, open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        for names in groups:
            part = {name: torch.empty(tensors[name][0], dtype=tensors[name][1]) for name in names}
            dcp.load(part, storage_reader=reader, no_dist=True)
            for name in names:
                out.write(part[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
