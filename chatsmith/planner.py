"""`chatsmith plan`: how much memory a training run needs, whether it fits, and how fast it can go.

The model is read as a shape, never as weights: its config (a local directory, a run, an adapter's
base, a GGUF file's metadata, or a hub id when online) builds the model on PyTorch's meta device,
which gives exact parameter counts for every family transformers ships.

Activations are not guessed from a formula either. One forward pass on the meta device (shapes
only, no memory, no arithmetic) runs under `torch.autograd.graph.saved_tensors_hooks`, which sees
every tensor autograd keeps for the backward pass of *this* model's real code: LoRA inputs,
SwiGLU's three projections, the fp32 log-softmax of the trained positions. Two things differ from
the real run and are corrected:
- attention: on the meta device SDPA takes its math path and keeps the [H, L, L] probabilities;
  chatsmith trains with fused attention (per-segment causal SDPA; flash/memory-efficient kernels on
  GPUs), which keeps only the output and a log-sum-exp, so [.., L, L] tensors are replaced by
  [.., L] ones. Families that train with eager attention (models/families.py) keep them.
- gradient checkpointing keeps only each block's input plus one block's activations while that
  block is recomputed.

Peak memory = weights (+ a frozen reference copy where the stage needs one, + the adapter's own
matrices for LoRA/DoRA/QLoRA) + trainable weights' gradients + optimizer state + activations + the backward's transient (the gradient of the trained
logits, one block's activation gradients) + the rollout KV cache for PPO/GRPO. ZeRO/FSDP divide
what they shard by the GPU count. The estimate is checked against the measured peak of real
chatsmith runs on this CPU (tests/test_planner.py, benchmarks/plan_memory.py).

Throughput is a roofline estimate at a stated utilisation: training tokens/s = utilisation x peak
FLOP/s / FLOPs per token (6N for full fine-tuning, 4N when only adapters train: the weight
gradients of frozen matrices are skipped); decoding one stream is memory-bound: utilisation x
bandwidth / bytes of weights read per token.
"""

from __future__ import annotations

import json
import os
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from chatsmith.errors import ChatsmithError

GiB = 2**30
STAGES = ("sft", "dpo", "grpo", "ppo", "rm")
PLAN_METHODS = ("full", "freeze", "lora", "dora", "qlora")
STRATEGIES = ("ddp", "fsdp", "fsdp_offload", "zero2", "zero3")


@dataclass(frozen=True)
class Device:
    """An accelerator (or this machine's CPU): memory, dense bf16/fp16 tensor FLOP/s, bandwidth."""

    name: str
    memory_gb: float
    tflops: float          # dense 16-bit tensor-core peak (fp32 for a CPU), TFLOP/s
    bandwidth_gbs: float   # memory bandwidth, GB/s
    bf16: bool = True


# Vendor datasheet numbers (dense, without sparsity).
DEVICES: dict[str, Device] = {d.name: d for d in (
    Device("T4", 16, 65, 320, bf16=False),
    Device("RTX3090", 24, 71, 936),
    Device("RTX4090", 24, 165, 1008),
    Device("A10G", 24, 70, 600),
    Device("L4", 24, 121, 300),
    Device("A100-40GB", 40, 312, 1555),
    Device("A100-80GB", 80, 312, 2039),
    Device("H100-80GB", 80, 989, 3350),
    Device("H200", 141, 989, 4800),
)}
GPU_NAMES = tuple(DEVICES)


@dataclass
class Shape:
    """What the planner needs to know about a model, read from its config on the meta device."""

    model_type: str
    params: int                 # unique parameters (tied embeddings counted once)
    layers: int
    hidden: int
    vocab: int
    kv_bytes_per_token: int     # K and V of every layer for one token, at 2 bytes per value


@dataclass
class Estimate:
    """One plan: bytes per device by component, whether it fits, what to change, speed."""

    model: str
    stage: str
    method: str
    device: str
    gpus: int
    strategy: str
    seq_len: int
    batch: int
    gradient_checkpointing: bool
    components: dict[str, float]   # name -> bytes per device
    total: float                   # bytes per device
    capacity: float                # bytes per device
    fits: bool
    advice: list[str]
    train_tokens_per_s: float | None
    decode_tokens_per_s: float | None
    utilisation: float
    assumptions: list[str]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (bytes as integers)."""
        d = asdict(self)
        d["components"] = {k: int(v) for k, v in self.components.items()}
        d["total"], d["capacity"] = int(self.total), int(self.capacity)
        return d


# ---- reading a model's shape without its weights -------------------------------------------------


def read_config(spec: str, trust_remote_code: bool = False) -> Any:
    """The transformers config of a model argument, without loading weights."""
    from transformers import AutoConfig

    from chatsmith.models.loading import _hub_error, embedded_cache_target, tiny_random_dir
    from chatsmith.models.registry import embedded_gguf_path, resolve_model

    resolved = resolve_model(spec)
    if resolved.adapter:          # an adapter (or a run that saved one) has its base's shape
        return read_config(resolved.path, trust_remote_code)
    if resolved.kind == "alias":
        if resolved.path == "tiny-random-llama":
            return AutoConfig.from_pretrained(str(tiny_random_dir()))
        gguf = embedded_gguf_path()
        converted = embedded_cache_target(gguf)   # already converted: its config.json is quicker to read
        return AutoConfig.from_pretrained(str(converted)) if (converted / "config.json").is_file() else _gguf_config(gguf)
    if resolved.kind == "gguf":
        return _gguf_config(Path(resolved.path))
    try:
        return AutoConfig.from_pretrained(resolved.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if resolved.kind == "hub":
            raise _hub_error(resolved.spec, e) from None
        raise ChatsmithError(f"could not read a model config from {resolved.path}: {e}") from None


def _gguf_config(path: Path) -> Any:
    """A GGUF file's architecture metadata as a transformers config (no tensor is read)."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    meta = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    kind = meta.pop("model_type")
    meta = {k: v for k, v in meta.items() if not k.startswith("_")}
    return AutoConfig.for_model(kind, **meta)


def _meta_model(config: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from chatsmith.models.loading import _quiet_transformers

    _quiet_transformers()
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config, dtype=torch.float32)


def _linear_layers(model: Any) -> list[tuple[str, Any]]:
    """(name, module) of the matrices LoRA's `all-linear` adapts: every Linear/Conv1D but the output layer."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    out = model.get_output_embeddings()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and m is not out]


def _in_out(module: Any) -> tuple[int, int]:
    from torch import nn

    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    w = module.weight   # transformers' Conv1D keeps [in, out]
    return int(w.shape[0]), int(w.shape[1])


def _targeted(name: str, lora_targets: str) -> bool:
    """Whether LoRA adapts the Linear called `name` (`all-linear`, or a comma list of module names)."""
    return lora_targets == "all-linear" or name.rsplit(".", 1)[-1] in {t.strip() for t in lora_targets.split(",")}


def trainable_params(model: Any, method: str, *, lora_r: int = 16, lora_targets: str = "all-linear",
                     freeze_layers: int = 2) -> int:
    """Parameters that get gradients and optimizer state under `method`, counted as chatsmith trains them."""
    if method == "full":
        return sum(p.numel() for p in model.parameters())
    if method == "freeze":
        from chatsmith.models.families import final_norm, transformer_blocks

        blocks = list(transformer_blocks(model))[-freeze_layers:]
        norm = final_norm(model)
        return (sum(p.numel() for b in blocks for p in b.parameters())
                + (sum(p.numel() for p in norm.parameters()) if norm is not None else 0))
    if method in ("lora", "dora", "qlora"):
        total = 0
        for name, module in _linear_layers(model):
            if not _targeted(name, lora_targets):
                continue
            fan_in, fan_out = _in_out(module)
            total += lora_r * (fan_in + fan_out) + (fan_out if method == "dora" else 0)
        return total
    raise ChatsmithError(f"unknown method '{method}' for `chatsmith plan`; choose from {', '.join(PLAN_METHODS)}")


def model_shape(config: Any, model: Any = None) -> Shape:
    """Parameter counts and the sizes the estimate needs, from a config (built on the meta device)."""
    model = model if model is not None else _meta_model(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = int(getattr(text, "num_hidden_layers", 0) or getattr(text, "n_layer", 0) or getattr(text, "num_layers", 0))
    hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0) or getattr(text, "d_model", 0))
    heads = int(getattr(text, "num_attention_heads", 0) or getattr(text, "n_head", 0) or getattr(text, "num_heads", 1))
    kv_heads = int(getattr(text, "num_key_value_heads", 0) or heads)
    head_dim = int(getattr(text, "head_dim", 0) or hidden // max(1, heads))
    params = sum(p.numel() for p in model.parameters())
    return Shape(model_type=str(getattr(config, "model_type", "?")), params=params, layers=layers, hidden=hidden,
                 vocab=int(getattr(text, "vocab_size", 0)), kv_bytes_per_token=2 * layers * kv_heads * head_dim * 2)


# ---- activations, measured on the meta device ----------------------------------------------------


def activation_bytes(model: Any, tokens: int, *, method: str, trained_tokens: int | None = None,
                     bytes_per_value: int = 4, lora_r: int = 16, lora_targets: str = "all-linear",
                     segments: list[tuple[int, ...]] | None = None,
                     selected_logprobs: bool = False) -> tuple[float, float]:
    """(kept for backward, one block's share) in bytes for one packed row of `tokens` tokens whose
    last `trained_tokens` positions are trained, as autograd keeps them in this model's real code.

    Runs one forward on the meta device under saved-tensor hooks, with SDPA's fused kernel standing in
    for the math path the meta device would take (families with eager attention keep theirs).
    `segments`: the row's segment bounds as the stage's collator builds them (`micro_batch_segments`;
    default: one segment), so that answers continuing a shared prompt keep what their masked attention
    keeps. `selected_logprobs`: the loss reads the targets' log-probs through `token_logprobs` (dpo,
    grpo), which keeps the logits, not sft's fp32 log-softmax. `bytes_per_value` rescales fp32
    activations to the training precision (2 for bf16).
    """
    import torch
    import transformers.masking_utils as masking

    from chatsmith.models.attention import enable_segment_attention

    trained_tokens = tokens if trained_tokens is None else trained_tokens
    segmented = enable_segment_attention(model)
    frozen = method not in ("full", "freeze")
    params = {id(p) for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(not frozen)
    if frozen:   # adapters: the adapted matrices' inputs are kept for the adapter's own gradient
        for name, m in _linear_layers(model):
            m.weight.requires_grad_(_targeted(name, lora_targets))
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(t) in params or id(base) in params:
            return t
        n = base.numel() * base.element_size()
        if base.is_floating_point() and base.element_size() == 4:
            n = n * bytes_per_value // 4
        kept[id(base)] = n
        return t

    sdpa = torch.nn.functional.scaled_dot_product_attention

    def fused(q: Any, k: Any, v: Any, attn_mask: Any = None, dropout_p: float = 0.0, is_causal: bool = False,
              scale: Any = None, enable_gqa: bool = False) -> Any:
        # On the meta device SDPA would take its math path and keep [H, L, L] probabilities; chatsmith
        # trains with the fused kernel (causal per segment), which keeps q, k, v, the output and a
        # log-sum-exp. Its CPU op has a meta kernel, so it stands in for the GPU's flash kernel too. A
        # segment that continues a shared prompt passes a boolean mask: the real CPU SDPA still takes the
        # fused kernel and keeps the mask converted to a float [n, P + n] tensor, as here.
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                ~attn_mask, float("-inf"))
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal,
                                                                           attn_mask=attn_mask, scale=scale)[0]

    # transformers inspects position ids to find packed sequences, which needs real values.
    saved_finder = masking.find_packed_sequence_indices
    masking.find_packed_sequence_indices = lambda position_ids: None
    torch.nn.functional.scaled_dot_product_attention = fused
    try:
        ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
        keep = torch.arange(tokens - trained_tokens, tokens, device="meta")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            kwargs: dict[str, Any] = {"use_cache": False}
            if segmented:
                kwargs["segment_bounds"] = segments or [(0, tokens)]
            if getattr(model.config, "is_encoder_decoder", False):
                out = model(input_ids=ids, decoder_input_ids=ids[:, :trained_tokens], **kwargs)
                logits = out.logits[0]
            else:
                out = model(input_ids=ids, logits_to_keep=keep, **kwargs)
                logits = out.logits[0]
            if selected_logprobs:
                from chatsmith.train.losses import token_logprobs

                token_logprobs(logits, torch.zeros(logits.shape[0], dtype=torch.long, device="meta"))
            else:
                torch.log_softmax(logits.float(), dim=-1)
    finally:
        masking.find_packed_sequence_indices = saved_finder
        torch.nn.functional.scaled_dot_product_attention = sdpa
        for p in model.parameters():
            p.requires_grad_(True)
    total = float(sum(kept.values()))
    if frozen:   # the meta model has no adapter modules: add each adapter's [L, r] intermediate (B's input)
        total += tokens * bytes_per_value * sum(
            lora_r for name, _ in _linear_layers(model) if _targeted(name, lora_targets))
    from chatsmith.models.families import transformer_blocks

    try:
        n_blocks = len(transformer_blocks(model))
    except Exception:   # noqa: BLE001 - an unknown family: spread over the config's layer count
        n_blocks = max(1, int(getattr(model.config, "num_hidden_layers", 1) or 1))
    logits_bytes = trained_tokens * int(logits.shape[-1]) * 4 * 2
    return total, max(0.0, total - logits_bytes) / max(1, n_blocks)


# ---- the estimate ----------------------------------------------------------------------------------


def cpu_device() -> Device:
    """This machine's CPU: its RAM, and FLOP/s and bandwidth left unknown (no speed estimate)."""
    try:
        import psutil

        mem = psutil.virtual_memory().total / 1e9
    except ImportError:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return Device("CPU", round(mem, 1), 0.0, 0.0, bf16=False)


def resolve_device(gpu: str | None, memory_gb: float | None) -> Device:
    """The device to plan for: a GPU from the table, this CPU, or a custom memory size."""
    if gpu:
        key = {k.lower().replace("-", ""): k for k in DEVICES}.get(gpu.lower().replace("-", "").replace(" ", ""))
        if key is None:
            raise ChatsmithError(f"unknown GPU '{gpu}'; choose from {', '.join(GPU_NAMES)} (or pass --memory GB)")
        d = DEVICES[key]
        return Device(d.name, memory_gb or d.memory_gb, d.tflops, d.bandwidth_gbs, d.bf16)
    if memory_gb:
        return Device(f"{memory_gb:g} GB", memory_gb, 0.0, 0.0)
    return cpu_device()


# Meta-forward results per meta model, reused across devices (and freed with the model).
_PROBES: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], tuple[float, float]]] = weakref.WeakKeyDictionary()


def micro_batch_tokens(stage: str, *, seq_len: int, batch: int, group_size: int = 8,
                       max_new_tokens: int = 256) -> tuple[int, int]:
    """(tokens in one packed micro-batch row, trained positions) as chatsmith's collators build them.

    sft: `batch` examples of `seq_len` tokens, half of them answer. dpo/rm: `batch` pairs whose prompt
    (half of `seq_len`) is in the row once and both answers continue it. grpo/ppo: `seq_len` is the
    prompt; a GRPO group's `group_size` completions share one copy of it.
    """
    prompt, answer = seq_len // 2, seq_len - seq_len // 2
    if stage == "sft":
        return batch * seq_len, batch * answer
    if stage == "dpo":
        return batch * (prompt + 2 * answer), batch * 2 * answer
    if stage == "rm":
        return batch * (prompt + 2 * answer), 2 * batch
    if stage == "grpo":
        return batch * (seq_len + group_size * max_new_tokens), batch * group_size * max_new_tokens
    return batch * (seq_len + max_new_tokens), batch * max_new_tokens


def micro_batch_segments(stage: str, *, seq_len: int, batch: int, group_size: int = 8,
                         max_new_tokens: int = 256) -> list[tuple[int, ...]]:
    """The segment bounds of that row (models/attention.py): (start, end) for a sequence on its own,
    (start, end, prompt_start, prompt_end) for an answer that continues a prompt held once in the row
    (dpo/rm: both answers of a pair; grpo: the G completions of a prompt)."""
    prompt, answer = seq_len // 2, seq_len - seq_len // 2
    bounds: list[tuple[int, ...]] = []
    at = 0
    for _ in range(batch):
        if stage in ("dpo", "rm", "grpo"):
            n, size = (2, answer) if stage != "grpo" else (group_size, max_new_tokens)
            p = prompt if stage != "grpo" else seq_len
            bounds.append((at, at + p))
            bounds += [(at + p + i * size, at + p + (i + 1) * size, at, at + p) for i in range(n)]
            at += p + n * size
        else:
            size = seq_len if stage == "sft" else seq_len + max_new_tokens
            bounds.append((at, at + size))
            at += size
    return bounds


def estimate(spec: str, *, stage: str = "sft", method: str = "lora", seq_len: int = 1024, batch: int = 4,
             gpu: str | None = None, memory_gb: float | None = None, gpus: int = 1, strategy: str = "ddp",
             gradient_checkpointing: bool = False, lora_r: int = 16, lora_targets: str = "all-linear",
             freeze_layers: int = 2, group_size: int = 8, max_new_tokens: int = 256,
             generation_batch_size: int = 32, utilisation: float = 0.4, config: Any = None,
             model: Any = None) -> Estimate:
    """The memory plan of one run. `batch` counts examples per micro-batch (DPO: pairs, GRPO: prompts)."""
    if stage not in STAGES:
        raise ChatsmithError(f"unknown stage '{stage}'; choose from {', '.join(STAGES)}")
    if method not in PLAN_METHODS:
        raise ChatsmithError(f"unknown method '{method}'; choose from {', '.join(PLAN_METHODS)}")
    if strategy not in STRATEGIES:
        raise ChatsmithError(f"unknown strategy '{strategy}'; choose from {', '.join(STRATEGIES)}")
    if gpus < 1 or seq_len < 1 or batch < 1:
        raise ChatsmithError("--gpus, --seq-len and --batch must be at least 1")
    device = resolve_device(gpu, memory_gb)
    on_gpu = device.name != "CPU" and device.tflops > 0
    if method == "qlora" and not on_gpu:
        raise ChatsmithError("qlora needs a CUDA GPU (bitsandbytes 4-bit); plan it with --gpu NAME")
    config = config if config is not None else read_config(spec)
    model = model if model is not None else _meta_model(config)
    shape = model_shape(config, model)
    trainable = trainable_params(model, method, lora_r=lora_r, lora_targets=lora_targets, freeze_layers=freeze_layers)
    half = on_gpu   # chatsmith loads bf16 on a GPU that has it (fp16 on T4), fp32 on a CPU
    wb = 2 if half else 4
    assumptions = [f"weights in {'bf16' if half and device.bf16 else 'fp16' if half else 'fp32'}",
                   "AdamW: two moments per trainable parameter in its dtype",
                   "activations measured on the meta device for this model's code, fused attention"]
    adapter = method in ("lora", "dora", "qlora")
    if method == "qlora":
        linear = sum(m.weight.numel() for _, m in _linear_layers(model))
        weights = linear * 0.5 * (1 + 0.5 / 64 * 4 / 4) + (shape.params - linear) * 2   # NF4 + block scales
        assumptions.append("qlora: NF4 weights (0.5 byte + double-quantised scales), the rest bf16")
    else:
        weights = shape.params * wb
    tb = 4 if adapter else wb                      # peft keeps adapter weights in fp32
    grads = trainable * tb
    optimizer = trainable * tb * 2
    if half and not adapter:
        assumptions.append("full/freeze on GPU: bf16 weights, gradients and moments (no fp32 master copy)")

    tokens, trained = micro_batch_tokens(stage, seq_len=seq_len, batch=batch, group_size=group_size,
                                         max_new_tokens=max_new_tokens)
    segments = micro_batch_segments(stage, seq_len=seq_len, batch=batch, group_size=group_size,
                                    max_new_tokens=max_new_tokens)
    probes = _PROBES.setdefault(model, {})
    selected = stage in ("dpo", "grpo")   # their losses read log-probs through train/losses.py's token_logprobs
    key = (tokens, trained, method in ("full", "freeze"), 2 if half else 4, lora_r, lora_targets, tuple(segments),
           selected)
    if key not in probes:
        probes[key] = activation_bytes(model, tokens, method=method, trained_tokens=trained,
                                       bytes_per_value=2 if half else 4, lora_r=lora_r, lora_targets=lora_targets,
                                       segments=segments, selected_logprobs=selected)
    kept, per_block = probes[key]
    if gradient_checkpointing:
        inputs = shape.layers * tokens * shape.hidden * (2 if half else 4)
        logits_part = kept - per_block * max(1, shape.layers)
        kept = inputs + per_block + max(0.0, logits_part)
    # The backward's transient: the trained logits' gradient and one block's activation gradients.
    # sft's cross-entropy needs two fp32 [N, V] buffers (the log-softmax's gradient and the softmax
    # backward's); dpo/grpo's token_logprobs writes one, in the logits' dtype. (DPO's online reference
    # forward, which runs while the policy's activations are kept, needs as much: its [N, V] logits and
    # one block's no-grad temporaries.)
    transient = trained * shape.vocab * (wb if selected else 4 * 2) + per_block
    components: dict[str, float] = {"weights": weights}
    if adapter:   # the adapter's own matrices (fp32, as peft keeps them), beside the base weights
        components["adapter weights"] = trainable * tb
    if stage in ("dpo", "grpo", "ppo") and not adapter:
        components["reference model"] = shape.params * wb
        assumptions.append("full/freeze DPO/GRPO/PPO keep a frozen reference copy (LoRA disables the adapter)")
    components.update({"gradients": grads, "optimizer": optimizer, "activations": kept, "backward transient": transient})
    if stage in ("grpo", "ppo"):
        # The engine's slots hold --max-length tokens each; a GPU allocates all of them up front, a CPU
        # commits only the pages the running sequences touch.
        seqs = generation_batch_size if on_gpu else min(generation_batch_size,
                                                         batch * (group_size if stage == "grpo" else 1))
        per_token = shape.kv_bytes_per_token * (1 if half else 2)
        components["rollout KV cache"] = seqs * (seq_len + max_new_tokens) * per_token
    if stage == "ppo":
        components["value head"] = shape.hidden * 4 * 4

    # Sharding over GPUs.
    n = gpus
    if n > 1 and strategy in ("zero2",):
        components["gradients"] /= n
        components["optimizer"] /= n
    elif n > 1 and strategy in ("zero3", "fsdp", "fsdp_offload"):
        for k in ("weights", "adapter weights", "gradients", "optimizer", "reference model"):
            if k in components:
                components[k] /= n
        if strategy == "fsdp_offload":
            components["optimizer"] = 0.0
            assumptions.append("fsdp_offload: parameters and optimizer state live in CPU RAM between uses")
    total = sum(components.values())
    capacity = device.memory_gb * 1e9 * (0.92 if on_gpu else 0.85)   # CUDA context / the OS keep the rest
    fits = total <= capacity
    advice = _advice(total, capacity, components, stage=stage, method=method, on_gpu=on_gpu, gpus=gpus,
                     strategy=strategy, checkpointing=gradient_checkpointing, batch=batch)

    train_tps = decode_tps = None
    if device.tflops:
        flops_per_token = (6 if not adapter else 4) * shape.params
        train_tps = utilisation * device.tflops * 1e12 * gpus / flops_per_token
        decode_tps = utilisation * device.bandwidth_gbs * 1e9 / max(1.0, weights)
    return Estimate(model=spec, stage=stage, method=method, device=device.name, gpus=gpus, strategy=strategy,
                    seq_len=seq_len, batch=batch, gradient_checkpointing=gradient_checkpointing,
                    components=components, total=total, capacity=capacity, fits=fits, advice=advice,
                    train_tokens_per_s=train_tps, decode_tokens_per_s=decode_tps, utilisation=utilisation,
                    assumptions=assumptions)


def _advice(total: float, capacity: float, comp: dict[str, float], *, stage: str, method: str, on_gpu: bool,
            gpus: int, strategy: str, checkpointing: bool, batch: int) -> list[str]:
    """What to change, largest saving first, when the plan does not fit (and a note when it barely does)."""
    if total <= capacity:
        return [] if total < 0.8 * capacity else ["fits with under 20% to spare: long batches may still run out"]
    tips: list[tuple[float, str]] = []
    act = comp["activations"] + comp["backward transient"]
    if not checkpointing:
        tips.append((act * 0.7, "--gradient-checkpointing (keeps one block's activations instead of all)"))
    if batch > 1:
        tips.append((act * (1 - 1 / batch), "a smaller --batch-size with more --grad-accum (same effective batch)"))
    if method in ("full", "freeze"):
        tips.append((comp["gradients"] + comp["optimizer"] + comp.get("reference model", 0),
                     "--method lora (gradients and optimizer state for the adapter only; the reference is free)"))
    if on_gpu and method != "qlora":
        tips.append((comp["weights"] * 0.7, "--method qlora (4-bit base weights)"))
    if gpus > 1 and strategy in ("ddp", "zero2"):
        tips.append(((comp["weights"] + comp["gradients"] + comp["optimizer"]) * (1 - 1 / gpus),
                     "--accelerate-config recipes/accelerate/zero3.yaml or fsdp.yaml (shard weights too)"))
    elif gpus == 1 and on_gpu:
        tips.append(((comp["weights"] + comp["gradients"] + comp["optimizer"]) * 0.5,
                     "more GPUs with FSDP/ZeRO-3 (--num-processes N --accelerate-config recipes/accelerate/fsdp.yaml)"))
    tips.sort(key=lambda t: -t[0])
    need = total - capacity
    return [f"{text}: saves about {saving / GiB:.1f} GiB" + (" (enough alone)" if saving >= need else "")
            for saving, text in tips if saving > 0]


def fit_table(spec: str, **kwargs: Any) -> list[tuple[str, float, bool]]:
    """(device, GiB needed per device, fits) for every GPU in the table and this CPU."""
    config = kwargs.pop("config", None) or read_config(spec)
    model = kwargs.pop("model", None) or _meta_model(config)
    rows = []
    for name in (*GPU_NAMES, None):
        if name is None and kwargs.get("method") == "qlora":
            continue
        e = estimate(spec, gpu=name, config=config, model=model, **kwargs)
        rows.append((e.device, e.total / GiB, e.fits))
    return rows


def render(e: Estimate, table: list[tuple[str, float, bool]] | None = None) -> None:
    """Print the plan as terminal tables."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    shard = f", {e.gpus} GPUs with {e.strategy}" if e.gpus > 1 else ""
    t = Table(title=f"{e.stage} {e.method} of {e.model} on {e.device}{shard}: seq {e.seq_len}, batch {e.batch}"
                    f"{', checkpointing' if e.gradient_checkpointing else ''}")
    t.add_column("per device")
    t.add_column("GiB", justify="right")
    for k, v in e.components.items():
        t.add_row(k, f"{v / GiB:.2f}")
    t.add_row("[b]total[/b]", f"[b]{e.total / GiB:.2f}[/b]")
    t.add_row("available", f"{e.capacity / GiB:.2f}")
    console.print(t)
    console.print("[green]fits[/green]" if e.fits else "[red]does not fit[/red]")
    for a in e.advice:
        console.print(f"  - {a}")
    if e.train_tokens_per_s:
        console.print(f"speed at {e.utilisation:.0%} of peak: training ~{e.train_tokens_per_s:,.0f} tokens/s, "
                      f"one decode stream ~{e.decode_tokens_per_s:,.0f} tokens/s")
    if table:
        ft = Table(title="the same run on other devices")
        ft.add_column("device")
        ft.add_column("GiB needed", justify="right")
        ft.add_column("fits")
        for name, gib, ok in table:
            ft.add_row(name, f"{gib:.1f}", "yes" if ok else "no")
        console.print(ft)
    console.print("[dim]" + "; ".join(e.assumptions) + "[/dim]")


def to_json(e: Estimate) -> str:
    """The plan as JSON."""
    return json.dumps(e.as_dict(), indent=2)
