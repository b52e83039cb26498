"""Sharded training (FSDP, DeepSpeed ZeRO) under the one loop: what differs from data parallel.

The strategy comes from `accelerate launch` (a config under recipes/accelerate/ sets
ACCELERATE_USE_FSDP or ACCELERATE_USE_DEEPSPEED for the launched processes); the loop asks this
module for its Accelerator and for what sharding changes:

- FSDP on a machine without a GPU: accelerate only turns FSDP on for GPU-like devices and otherwise
  runs plain gloo data parallel with the FSDP settings ignored. torch's FSDP2 (`fully_shard`)
  runs on CPU tensors over gloo, so `accelerator()` switches the state to FSDP there (the settings
  come from the same environment variables accelerate's own FSDP plugin reads).
- DeepSpeed on a machine without a GPU: accelerate starts DeepSpeed only when not told the run is a
  CPU one, so `accelerator()` says so and names gloo; DeepSpeed picks its CPU accelerator itself.
  The engine steps inside backward at an accumulation boundary (the loop marks the last micro-batch)
  and clips at --max-grad-norm (the recipe's gradient_clipping is replaced).
- Evaluation and generation on one process: a sharded layer gathers its weights from every process
  in each forward, so a forward that only the main process runs would wait forever.
  `full_weights(model)` gathers every FSDP layer once on every process (as FSDP1's
  `summon_full_params` does) and keeps them gathered until the block ends. Under ZeRO-3 the loop
  runs the held-out loss with as many forwards on every process, and refuses task suites
  (deepspeed's GatheredParameters still hung here when the main process generated alone).
- Saving: a sharded model's weights exist whole on no process. `skeleton(model)` keeps a weightless
  copy of the model taken before sharding; `consolidated(...)` gathers the full state dict onto the
  main process and loads it into that copy, so final/ is written by the same code as a
  single-process run and loads with `from_pretrained`.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from typing import Any

from chatsmith.errors import ChatsmithError


def strategy() -> str:
    """The launched strategy: "fsdp", "deepspeed" or "ddp" (data parallel, or one process)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    return "ddp"


def accelerator(max_grad_norm: float = 0.0, batch_size: int = 1, **kwargs: Any) -> Any:
    """An Accelerator for this process: gloo on a machine without a GPU, with FSDP or DeepSpeed
    switched on there when the launch asked for it (see the module docstring). Under DeepSpeed the
    engine clips gradients, at `max_grad_norm` (0: no clipping); `batch_size` is only its bookkeeping
    (the loop feeds the micro-batches)."""
    import torch
    from accelerate import Accelerator

    cpu = not torch.cuda.is_available()
    if strategy() == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ChatsmithError("the DeepSpeed recipes (zero2.yaml, zero3.yaml) need the deepspeed package: "
                                 "pip install 'chatsmith[deepspeed]'; or use recipes/accelerate/fsdp.yaml (the same "
                                 "sharding with torch alone)") from None
        # The engine steps and clips; its clipping is chatsmith's --max-grad-norm, not the config's.
        os.environ["ACCELERATE_GRADIENT_CLIPPING"] = str(float(max_grad_norm or 0.0))
        if cpu:
            # accelerate starts DeepSpeed only when not told the run is a CPU one; DeepSpeed's own CPU
            # accelerator then talks over gloo.
            from accelerate.utils import InitProcessGroupKwargs

            os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
            acc = Accelerator(cpu=False, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")], **kwargs)
        else:
            acc = Accelerator(cpu=cpu, **kwargs)
        acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size
        return acc
    acc = Accelerator(cpu=cpu, **kwargs)
    if strategy() == "fsdp" and cpu and acc.num_processes > 1:
        from accelerate import FullyShardedDataParallelPlugin
        from accelerate.utils import DistributedType

        plugin = FullyShardedDataParallelPlugin()   # reads the FSDP_* variables accelerate launch set
        if plugin.fsdp_version != 2:
            raise ChatsmithError("FSDP on CPUs needs fsdp_version: 2 in the accelerate config (torch's FSDP1 wants "
                                 "a GPU); see recipes/accelerate/fsdp.yaml")
        from accelerate.state import PartialState
        from torch.distributed.fsdp import CPUOffloadPolicy

        if isinstance(plugin.cpu_offload, CPUOffloadPolicy):   # fsdp_offload.yaml: pinned memory needs a GPU
            plugin.cpu_offload = CPUOffloadPolicy(pin_memory=False)

        acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin
        # as accelerate does on GPUs: every later AcceleratorState() copies the type from here
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return acc


def is_sharded(acc: Any) -> bool:
    """Whether no process holds the whole model (FSDP or DeepSpeed ZeRO-3)."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.FSDP:
        return True
    if acc.distributed_type == DistributedType.DEEPSPEED:
        return acc.state.deepspeed_plugin.zero_stage == 3
    return False


def skeleton(model: Any) -> Any:
    """A copy of `model` whose parameters are on the meta device (no memory): the shape to load the
    consolidated weights into at the end. Buffers are copied (they are small)."""
    import torch

    memo: dict[int, Any] = {}
    for p in model.parameters():
        if id(p) not in memo:
            memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


def consolidated(acc: Any, model: Any, shape: Any) -> Any | None:
    """The trained weights gathered from every process into `shape` (a `skeleton`), returned on the
    main process (None on the others). Every process must call it: the gather is collective."""
    state = acc.get_state_dict(model)   # full tensors, on the CPU of the main process
    if not acc.is_main_process:
        return None
    missing, unexpected = shape.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise ChatsmithError(f"consolidating the sharded model: unexpected weights {sorted(unexpected)[:5]}")
    if hasattr(shape, "tie_weights"):
        shape.tie_weights()   # assign=True replaced the tied tensors one by one
    still_meta = [n for n, p in shape.named_parameters() if p.is_meta]
    if still_meta:
        raise ChatsmithError(f"consolidating the sharded model: no weights gathered for {still_meta[:5]}")
    return shape


@contextlib.contextmanager
def full_weights(model: Any) -> Iterator[None]:
    """Within the block, every FSDP2 layer of `model` holds its whole weights on this process, so a
    forward needs no other process. Every process must enter it (the gather is collective). A no-op
    for a model that is not sharded with FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:   # pragma: no cover - torch without FSDP2
        yield
        return
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    # Each unit's own reshard-after-forward setting (accelerate keeps the last layers gathered), to
    # restore afterwards; set_reshard_after_forward has no getter.
    saved = []
    for m in units:
        state = m._get_fsdp_state()
        saved.append((state, state._auto_reshard_after_forward,
                      [g.post_forward_mesh_info for g in state._fsdp_param_groups]))
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()
        for state, auto, infos in saved:
            state._auto_reshard_after_forward = auto
            for g, info in zip(state._fsdp_param_groups, infos, strict=True):
                g.post_forward_mesh_info = info
