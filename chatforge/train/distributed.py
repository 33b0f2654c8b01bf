"""Data-parallel training with ``torchrun``: one command for 1 or N processes.

    chatforge pretrain ...                                   # one process
    torchrun --nproc_per_node=2 -m chatforge.cli pretrain ...  # two processes (same options)

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them the run is a single process and no
process group is created. The backend is NCCL on CUDA and gloo on the CPU. Every rank holds the whole model
and computes its contiguous share of each global batch; DDP averages the gradients, so N processes take the
same optimizer steps as one process with the whole batch (``--train.parallel=ddp``). With
``--train.parallel=fsdp`` (FSDP2) each rank keeps only its shard of every parameter, gradient and optimizer
state, for models whose training state does not fit on one device. Only rank 0 writes files (but for the shards
of an FSDP checkpoint, which every rank writes); what the ranks must agree on (which checkpoint to resume) rank 0
decides and broadcasts, so nodes need not share a filesystem to agree. Evaluation is split across the ranks too
(``eval_share``, ``sum_over_ranks``, ``map_shares``): each computes its share and the results are reduced.

A collective that waits longer than ``CHATFORGE_DIST_TIMEOUT_MIN`` minutes (default 30) fails instead of
hanging forever (a rank that crashed or is stuck in I/O). On CUDA, TF32 matmuls are enabled (fp32 tensors
multiplied on tensor cores, ~8x faster on Ampere and later, 10-bit mantissa inputs with fp32 accumulation: the
precision every large-scale recipe trains with).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from chatforge.device import device_type, resolve_device
from chatforge.errors import ChatforgeError


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place sum or max over ranks (a no-op for one process); returns ``tensor``."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return tensor

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def agree_on_path(self, path: Path | None, what: str) -> Path | None:
        """Rank 0's ``path`` on every rank, checked to be visible everywhere.

        A rank that cannot see it (another node without shared storage) makes every rank raise the same
        ``ChatforgeError`` naming the path and the ranks, instead of ranks going separate ways and hanging.
        """
        chosen = self.broadcast_object(None if path is None else str(path))
        if chosen is None:
            return None
        missing = [rank for rank, seen in enumerate(gather_over_ranks(Path(chosen).exists())) if not seen]
        if missing:
            raise ChatforgeError(
                f"{what} {chosen} (chosen by rank 0) is not visible on rank(s) {missing}: put the run directory "
                "on storage every node shares, or copy it to the same path on every node"
            )
        return Path(chosen)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value is None else int(value)
    except ValueError:
        raise ChatforgeError(f"environment variable {name}={value!r} is not an integer") from None


def enable_tf32() -> None:
    """TF32 for fp32 matmuls and convolutions on CUDA (no effect on the CPU)."""
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True


def timeout() -> datetime.timedelta:
    minutes = os.environ.get("CHATFORGE_DIST_TIMEOUT_MIN", "30")
    try:
        return datetime.timedelta(minutes=float(minutes))
    except ValueError:
        raise ChatforgeError(f"environment variable CHATFORGE_DIST_TIMEOUT_MIN={minutes!r} is not a number") from None


def init(device: str = "auto") -> Dist:
    """This process's place in the job; creates the process group once when launched by torchrun.

    On CUDA each rank takes GPU ``LOCAL_RANK``. On the CPU the cores are split between the ranks of a node,
    since N processes each running all-core kernels would fight over the same cores.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world_size)
    resolved = resolve_device(device)
    kind = device_type(resolved)
    if kind == "cuda":
        enable_tf32()
    if world_size <= 1:
        return Dist(0, 1, 0, resolved)
    if kind == "cuda":
        resolved = f"cuda:{local_rank}"
        torch.cuda.set_device(resolved)
    elif kind != "cpu":
        raise ChatforgeError(f"distributed training supports cpu and cuda devices, not {kind}")
    if not dist.is_initialized():
        if kind == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
        # device_id binds NCCL to this rank's GPU up front (eager connection setup, no guessing in barrier())
        dist.init_process_group(backend="nccl" if kind == "cuda" else "gloo", timeout=timeout(),
                                device_id=torch.device(resolved) if kind == "cuda" else None)
        atexit.register(_shutdown)
    if dist.get_world_size() != world_size:
        raise ChatforgeError(f"process group has {dist.get_world_size()} ranks but WORLD_SIZE={world_size}")
    return Dist(rank, world_size, local_rank, resolved)


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def finish() -> None:
    """End a job that succeeded: every rank waits for the others, then the process group is destroyed while the
    interpreter is whole. Left to interpreter shutdown, a rank whose peer had already gone sometimes aborted
    ("terminate called without an active exception") as gloo's threads were torn down with it; a failed job is
    left to the exit hook, which destroys the group without waiting for peers that may never come."""
    if dist.is_initialized():
        gc.collect()  # sharded models' cycles, holding the group and its pending work, go before the group does
        try:
            dist.barrier()
        except RuntimeError:  # a peer has already ended with its own error, which torchrun reports
            pass
        dist.destroy_process_group()


# ---- evaluation split across the ranks ---------------------------------------------------------------------------
# A task's evaluation runs on every rank: each computes its share of the held-out items and the sums are reduced,
# so the figure is the one a single process computes (the same items, summed, divided by the same counts).


def _place() -> tuple[int, int]:
    """(rank, world size) of the running job; (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def eval_share(count: int) -> list[tuple[int, bool]]:
    """This rank's share of ``count`` evaluation items (every world-size-th, from its rank) as (index, counted).

    Every rank gets the same number of entries: the short ones are padded with ``(0, False)``, an item to
    compute and leave out of the sums, because under FSDP every forward pass gathers parameters from all ranks
    and the ranks must run the same number of them.
    """
    rank, world = _place()
    mine = [(index, True) for index in range(rank, count, world)]
    return mine + [(0, False)] * (-(-count // world) - len(mine))


def sum_over_ranks(values: list[float], device: str | torch.device) -> list[float]:
    """Every rank's ``values`` summed element-wise (in float64; ``device`` is the rank's, as NCCL needs)."""
    total = torch.tensor(values, dtype=torch.float64, device=device)
    if _place()[1] > 1:
        dist.all_reduce(total)
    return total.tolist()


def gather_over_ranks(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order."""
    if _place()[1] == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def map_shared(fn: Callable[[int], Any], count: int) -> list:
    """``[fn(0), ..., fn(count - 1)]`` on every rank, each rank computing its share (``eval_share``, padding
    included) and the results gathered in order."""
    mine = {}
    for index, counted in eval_share(count):
        result = fn(index)
        if counted:
            mine[index] = result
    merged = {index: result for share in gather_over_ranks(mine) for index, result in share.items()}
    return [merged[index] for index in range(count)]


def map_shares(fn: Callable[[list, int], list], items: list) -> list:
    """``fn`` applied to ``items`` cut into one contiguous share per rank (``fn(share, index of its first item)``
    returns one result per item), every rank getting all results in order: batched work such as generation,
    where each rank runs its share as one batch."""
    rank, world = _place()
    first, last = (len(items) * r // world for r in (rank, rank + 1))
    mine = fn(items[first:last], first) if last > first else []
    return [result for share in gather_over_ranks(mine) for result in share]


# ---- FSDP2: parameters, gradients and optimizer state sharded across the ranks ----------------------------------

PARALLEL_MODES = ("ddp", "fsdp")


def shard_model(model: nn.Module, param_dtype: torch.dtype | None, checkpoint_activations: bool) -> None:
    """Shard ``model`` in place with FSDP2 (``fully_shard``): each transformer block (every member of an
    ``nn.ModuleList``) is its own unit, gathered just before its forward and freed after, then the root.

    ``param_dtype`` (e.g. bf16) is the dtype blocks compute in; gradients are reduced in fp32 either way.
    ``checkpoint_activations`` recomputes each block's activations in backward instead of keeping them.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    scalars = [name for name, parameter in model.named_parameters() if parameter.dim() == 0]
    if scalars:  # fully_shard cannot split a 0-d tensor across ranks
        raise ChatforgeError(f"train.parallel=fsdp cannot shard the scalar parameter(s) {', '.join(scalars)} of this "
                             "model; train it with train.parallel=ddp")
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for index, block in enumerate(module):
                if checkpoint_activations:  # the wrapper's state-dict hooks keep the checkpoint's names unchanged
                    block = checkpoint_wrapper(block)
                    module[index] = block
                fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def materialize(model: nn.Module, device: str, seed: int) -> None:
    """Give a model built on the meta device (no memory) real, initialised storage after sharding: each rank
    allocates only its shards, then every module's ``reset_parameters``/``reset_buffers`` fills them, innermost
    first so that the model's own initialisation (the root's, last) has the final word."""
    model.to_empty(device=device)
    torch.manual_seed(seed + (dist.get_rank() if dist.is_initialized() else 0))  # independent draws per shard
    with torch.no_grad():
        for module in reversed(list(model.modules())):
            for method in ("reset_parameters", "reset_buffers"):
                if callable(getattr(module, method, None)):
                    getattr(module, method)()


@contextlib.contextmanager
def fsdp_no_sync(model: nn.Module):
    """FSDP's counterpart of DDP's ``no_sync``: accumulate gradients locally, reduce-scatter on the last one."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded ``DTensor``'s whole value (gathered); any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
