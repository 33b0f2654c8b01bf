"""Training checkpoints: written whole or not at all, found again by ``latest_checkpoint``, loaded by ``load_model``.

A run directory holds ``checkpoints/step_00000100/`` folders and a ``checkpoints/latest`` file naming the
newest one. Each checkpoint folder has:

* ``model.safetensors`` — the weights (of the unwrapped module: no ``_orig_mod.``/``module.`` prefixes);
* ``trainer.pt`` — everything else needed to continue exactly: optimizer state, the step (which is also the
  data position, since batches are a pure function of the step), tokens seen, time spent, the planned
  schedule length, every rank's RNG states (torch, CUDA, numpy, python) and the task's own state;
* ``config.json`` — ``format``, ``step``, the model config (``model``, enough to rebuild a GPT), the train
  config (``train``), the tokenizer it was trained with (``tokenizer``) and whatever the stage added;
* ``tokenizer.json`` — a copy of that tokenizer, so the checkpoint is self-contained.

``config.json`` also records the size and SHA-256 of the weights and trainer state (``files``). Loading checks
the safetensors header against the file's size and the recorded size and hash, so a truncated or damaged
checkpoint is reported as damaged, naming the previous good checkpoint of the run when there is one.

A checkpoint is built in a hidden staging folder and renamed into place; ``latest`` is switched after
that, and older checkpoints are pruned only then, so a crash at any moment leaves a complete checkpoint.
``load_model`` also reads Hugging Face GPT-2 folders (``config.json`` + ``model.safetensors``).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from chatforge import io
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT
from chatforge.model.hf import load_hf_gpt2
from chatforge.model.weights import read_safetensors, recorded_gpt_config, safetensors_problem, shape_difference
from chatforge.tokenizer import TOKENIZER_FILE

FORMAT = "chatforge-checkpoint-1"
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
WEIGHTS_FILE = "model.safetensors"
TRAINER_FILE = "trainer.pt"
CONFIG_FILE = "config.json"
_REQUIRED = (WEIGHTS_FILE, TRAINER_FILE, CONFIG_FILE)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def _is_complete(path: Path) -> bool:
    return path.is_dir() and all((path / name).is_file() for name in _REQUIRED)


def _checkpoints_dir(path: Path) -> Path:
    return path if path.name == CHECKPOINTS_DIR else path / CHECKPOINTS_DIR


def latest_checkpoint(path: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory (or of its ``checkpoints/`` folder), else None.

    Follows ``latest``; when that is missing or names an incomplete folder, the highest complete step wins.
    """
    root = _checkpoints_dir(Path(path))
    if not root.is_dir():
        return None
    pointer = root / LATEST_FILE
    if pointer.is_file():
        name = pointer.read_bytes().decode("utf-8", errors="replace").strip()
        candidate = root / name
        if name.startswith("step_") and "/" not in name and _is_complete(candidate):
            return candidate  # a damaged pointer falls back to the highest complete step below
    steps = sorted(p for p in root.glob("step_*") if _is_complete(p))
    return steps[-1] if steps else None


def rng_state() -> dict:
    """This process's random states in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    trainer_state: dict,
    config: dict,
    tokenizer: str | Path | None = None,
    keep: int = 2,
    weights: dict[str, torch.Tensor] | Path | None = None,
    folders: dict[str, Path] | None = None,
) -> Path:
    """Write checkpoint ``step`` of ``model`` into ``run_dir/checkpoints`` and point ``latest`` at it.

    ``trainer_state`` goes to ``trainer.pt`` (optimizer state, RNG, counters: plain tensors and Python values),
    ``config`` to ``config.json`` (JSON values; put the model config under ``"model"``). ``tokenizer`` (a
    ``tokenizer.json`` or its folder) is copied in. Only the ``keep`` newest checkpoints stay (0 = all).
    ``weights`` replaces ``model``'s state dict: a state dict, or a safetensors file already written (a sharded
    model's, exported from its shards), moved in; ``folders`` ({name: folder}) are moved into the checkpoint under
    ``name`` (e.g. the sharded weights and optimizer state written by every rank).
    Returns the checkpoint folder.
    """
    root = _checkpoints_dir(Path(run_dir))
    target = root / step_name(step)
    with io.atomic_directory(target) as staging:
        for name, folder in (folders or {}).items():
            shutil.move(folder, staging / name)
        if isinstance(weights, Path):
            shutil.move(weights, staging / WEIGHTS_FILE)
        else:
            state = {k: v.detach().cpu().contiguous() for k, v in (weights or unwrap(model).state_dict()).items()}
            save_file(state, str(staging / WEIGHTS_FILE), metadata={"format": "pt", "step": str(step)})
        torch.save(trainer_state, staging / TRAINER_FILE)
        recorded = None
        if tokenizer:
            source = Path(tokenizer)
            source = source / TOKENIZER_FILE if source.is_dir() else source
            if not source.is_file():
                raise ChatforgeError(f"tokenizer not found: {source}")
            shutil.copyfile(source, staging / TOKENIZER_FILE)
            recorded = str(source.resolve())
        files = {name: io.file_record(staging / name) for name in (WEIGHTS_FILE, TRAINER_FILE)}
        body = {"format": FORMAT, "step": step, **config, "tokenizer": recorded, "files": files}
        (staging / CONFIG_FILE).write_text(json.dumps(body, indent=2, default=str) + "\n", encoding="utf-8")
    io.write_text(root / LATEST_FILE, target.name + "\n")
    if keep > 0:
        for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
    return target


def read_config(checkpoint: str | Path) -> dict:
    return io.read_json(Path(checkpoint) / CONFIG_FILE, "checkpoint config")


def _damage(folder: Path, info: dict | None = None) -> str | None:
    """What is wrong with a checkpoint's weights and trainer state, by their framing and their recorded hashes."""
    recorded = (info or {}).get("files") if isinstance(info, dict) else None
    recorded = recorded if isinstance(recorded, dict) else {}
    weights = folder / WEIGHTS_FILE
    problem = safetensors_problem(weights)
    if problem:
        return f"{weights}: {problem}"
    for name, expected in recorded.items():
        path = folder / name
        if not isinstance(expected, dict) or not path.is_file():
            continue
        problem = io.record_mismatch(path, expected)
        if problem:
            return problem
    return None


def _previous_good(folder: Path) -> Path | None:
    """The newest checkpoint of the same run before ``folder`` that is complete and undamaged."""
    for candidate in sorted(folder.parent.glob("step_*"), reverse=True):
        if candidate.name < folder.name and _is_complete(candidate):
            try:
                if _damage(candidate, read_config(candidate)) is None:
                    return candidate
            except ChatforgeError:
                continue
    return None


def verify_checkpoint(folder: str | Path, info: dict | None = None) -> None:
    """ChatforgeError saying the checkpoint is damaged (and where the previous good one is) unless its weights'
    framing is sound and its files match the sizes and hashes recorded at save time."""
    folder = Path(folder)
    stamp = _stamp(folder)
    if stamp in _VERIFIED:  # resuming checks the same checkpoint several times: hash its files once
        return
    problem = _damage(folder, info if info is not None else read_config(folder))
    if problem:
        previous = _previous_good(folder)
        hint = f"; the previous good checkpoint is {previous}" if previous else "; no earlier good checkpoint exists"
        raise ChatforgeError(f"checkpoint {folder} is damaged: {problem}{hint}")
    _VERIFIED.add(stamp)


_VERIFIED: set[tuple] = set()


def _stamp(folder: Path) -> tuple:
    """A checkpoint's files as they are now (path, size, modification time): a rewritten file changes it."""
    files = []
    for name in (CONFIG_FILE, WEIGHTS_FILE, TRAINER_FILE):
        try:
            stat = (folder / name).stat()
            files.append((name, stat.st_size, stat.st_mtime_ns))
        except OSError:
            files.append((name, None, None))
    return (str(folder.resolve()), *files)


def trained_for_fim(ckpt: str | Path) -> bool:
    """Whether the checkpoint's config records fill-in-the-middle training (a HF folder's never does)."""
    return bool(read_config(resolve_checkpoint(ckpt)).get("fim"))


def load_trainer_state(checkpoint: str | Path) -> dict:
    verify_checkpoint(checkpoint)
    path = Path(checkpoint) / TRAINER_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors have no common base class
        raise ChatforgeError(f"cannot read trainer state {path}: {exc}") from None


def _describe(config: dict | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted((config or {}).items()))


def check_compatible(checkpoint: str | Path, model: nn.Module, model_config: dict | None = None) -> None:
    """Raise a ChatforgeError naming the difference when ``checkpoint`` cannot be loaded into ``model``."""
    checkpoint = Path(checkpoint)
    verify_checkpoint(checkpoint)
    saved = read_config(checkpoint).get("model")
    if saved is not None and model_config is not None:
        # dropout changes nothing a checkpoint holds, so resuming with another rate is allowed
        keys = sorted(set(saved) | set(model_config))
        diff = [k for k in keys if k != "dropout" and saved.get(k) != model_config.get(k)]
        if diff:
            raise ChatforgeError(
                f"checkpoint {checkpoint} is incompatible with this model: it has "
                f"{_describe({k: saved.get(k) for k in diff})} "
                f"but this run has {_describe({k: model_config.get(k) for k in diff})}; "
                "train with the checkpoint's model settings or write to another out_dir"
            )
    mismatch = _shape_mismatch(checkpoint / WEIGHTS_FILE, unwrap(model))
    if mismatch:
        raise ChatforgeError(
            f"checkpoint {checkpoint} does not fit this model ({mismatch}); "
            "train with the checkpoint's model settings or write to another out_dir"
        )


def _shape_mismatch(weights: Path, model: nn.Module, prefix: str = "") -> str | None:
    """How the tensors under ``prefix`` in a safetensors file differ from ``model``'s (None when they match),
    read from the file's header alone."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        with safe_open(str(weights), framework="pt") as f:
            found = {k[len(prefix) :]: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith(prefix)}
    except (SafetensorError, OSError) as exc:
        raise ChatforgeError(f"{weights} is damaged: {exc}") from None
    return shape_difference(found, expected)


def load_weights_file(checkpoint: str | Path, model: nn.Module, device: str | torch.device = "cpu") -> dict:
    """A checkpoint's weights (a state dict), checked to fit ``model``."""
    check_compatible(checkpoint, model)
    return read_safetensors(Path(checkpoint) / WEIGHTS_FILE, device)


def load_weights(checkpoint: str | Path, model: nn.Module, device: str | torch.device = "cpu") -> None:
    """Load a checkpoint's weights into ``model`` after checking they fit."""
    unwrap(model).load_state_dict(load_weights_file(checkpoint, model, device))


def _is_hf_dir(path: Path) -> bool:
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        return False
    try:
        return "model_type" in json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, TypeError):
        return False


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint or Hugging Face folder as given, or a run directory's latest checkpoint."""
    path = Path(path)
    if not path.exists():
        raise ChatforgeError(f"checkpoint not found: {path}")
    if _is_complete(path) or _is_hf_dir(path):
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise ChatforgeError(
            f"no checkpoint in {path}: expected a checkpoint folder, a run directory with "
            f"{CHECKPOINTS_DIR}/, or a Hugging Face GPT-2 folder (config.json + model.safetensors)"
        )
    return found


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """A GPT (in eval mode, on ``device``) and its info from a checkpoint, a run directory or a HF GPT-2 folder.

    ``info`` is the checkpoint's ``config.json`` plus ``path`` (the folder actually read). A checkpoint of a
    wrapped model (say a GPT with a value head) whose config sets ``model_prefix`` (e.g. ``"gpt."``) yields
    the GPT under that prefix; other weights are left out.
    """
    folder = resolve_checkpoint(path)
    if _is_hf_dir(folder):
        model = load_hf_gpt2(folder, device=device)
        info = {"format": "huggingface", "model": model.config.to_dict(), "step": None}
    else:
        info = read_config(folder)
        verify_checkpoint(folder, info)
        if info.get("format") != FORMAT:
            raise ChatforgeError(
                f"{folder} holds checkpoint format {info.get('format')!r}; this chatforge reads {FORMAT}"
            )
        if not isinstance(info.get("model"), dict):
            raise ChatforgeError(f"{folder / CONFIG_FILE} records no GPT model config, so it cannot be loaded as a GPT")
        config = recorded_gpt_config(folder / CONFIG_FILE, info["model"])
        prefix = info.get("model_prefix", "")
        if not isinstance(prefix, str):
            raise ChatforgeError(f"{folder / CONFIG_FILE}: 'model_prefix' must be a string; got {prefix!r}")
        with torch.device("meta"):  # shapes only: a damaged config naming a huge model allocates nothing
            skeleton = GPT(config)
        mismatch = _shape_mismatch(folder / WEIGHTS_FILE, skeleton, prefix)
        if mismatch:
            raise ChatforgeError(f"{folder / WEIGHTS_FILE} does not fit its recorded model config ({mismatch})")
        state = read_safetensors(folder / WEIGHTS_FILE, device)
        model = GPT(config).to(device)
        model.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    return model.eval(), {**info, "path": str(folder)}


def tokenizer_path(path: str | Path) -> Path:
    """The ``tokenizer.json`` a checkpoint (or run directory, or HF folder) was trained with."""
    folder = resolve_checkpoint(path)
    if (folder / TOKENIZER_FILE).is_file():
        return folder / TOKENIZER_FILE
    recorded = None if _is_hf_dir(folder) else read_config(folder).get("tokenizer")
    if recorded and Path(recorded).is_file():
        return Path(recorded)
    where = f" (recorded: {recorded}, which no longer exists)" if recorded else ""
    raise ChatforgeError(f"no tokenizer found for {folder}{where}; pass the tokenizer explicitly")


def model_config_of(model: nn.Module) -> dict | None:
    """The JSON config of a GPT (or of anything with ``.config.to_dict()``), else None."""
    config = getattr(unwrap(model), "config", None)
    return config.to_dict() if hasattr(config, "to_dict") else None
