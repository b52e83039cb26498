"""What a stage needs to know about running on several processes (`accelerate launch`): which
process this is, sums and gathers of a few numbers across processes, and the model inside a
data-parallel wrapper. With one process every function is the trivial one.

Convention: every process trains on its own micro-batches; only the main process writes files
(config, metrics, plots, checkpoints' shared parts, final/) and prints progress.
"""

from __future__ import annotations

import os
from typing import Any


def world_size() -> int:
    """Number of training processes (WORLD_SIZE, set by `accelerate launch`/torchrun; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's index among `world_size()` (0 on the main process)."""
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Whether this is the main process (the one that writes files and prints)."""
    return rank() == 0


def _initialised() -> bool:
    import torch.distributed as td

    return world_size() > 1 and td.is_available() and td.is_initialized()


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum of `values` over all processes (float64 on the CPU: exact for counts)."""
    if not _initialised():
        return list(values)
    import torch
    import torch.distributed as td

    t = torch.tensor(values, dtype=torch.float64, device=_device())
    td.all_reduce(t)
    return t.cpu().tolist()


def all_gather(values: list[float]) -> list[float]:
    """Every process's `values`, concatenated in process order (lengths may differ)."""
    if not _initialised():
        return list(values)
    import torch.distributed as td

    out: list[Any] = [None] * world_size()
    td.all_gather_object(out, list(values))
    return [v for part in out for v in part]


def barrier() -> None:
    """Wait until every process gets here."""
    if _initialised():
        import torch.distributed as td

        td.barrier()


def _device() -> Any:
    import torch
    import torch.distributed as td

    return torch.device("cuda", torch.cuda.current_device()) if td.get_backend() == "nccl" else torch.device("cpu")


def unwrap(model: Any) -> Any:
    """The model inside a data-parallel wrapper (DDP keeps it in `.module`), or the model itself."""
    return getattr(model, "module", model)
