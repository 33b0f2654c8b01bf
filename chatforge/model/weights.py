"""Saved weights and model configs read with every failure a ChatforgeError naming the file: safetensors files
checked by their framing before the library reads them, a recorded GPT config checked field by field, and one
comparison of tensor shapes. Checkpoints (``chatforge.model.checkpoint``), Hugging Face GPT-2 folders
(``chatforge.model.hf``), embedders and reward models all load through here.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

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
