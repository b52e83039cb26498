"""Load models and tokenizers from any model argument (see registry.py).

GGUF files (the embedded model included) are converted once to a cached safetensors directory:
a GGUF load de-quantises every tensor (slow) and a GGUF-loaded model refuses `save_pretrained`,
so we rebuild the model from its config, copy the weights in, and save a normal HF directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatsmith.errors import ChatsmithError, ModelNotFoundError
from chatsmith.models.registry import (
    ALIASES,
    ResolvedModel,
    cache_dir,
    embedded_gguf_path,
    gguf_cache_key,
    resolve_model,
)

log = logging.getLogger(__name__)

TINY_VERSION = "v2"
CONVERTER_VERSION = "v2"   # bump when convert_gguf changes, so stale caches are rebuilt


def _atomic_build(target: Path, build: Any) -> Path:
    """Build a directory under a temporary name and rename it into place (safe against crashes
    and against two processes converting at once: the loser discards its copy)."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _eot_generation_config(model: Any, tokenizer: Any) -> None:
    """Make generation stop at the chat template's end-of-turn token as well as at EOS."""
    from chatsmith.data.template import stop_token_ids

    ids = sorted(stop_token_ids(tokenizer))
    gc = model.generation_config
    gc.eos_token_id = ids[0] if len(ids) == 1 else ids
    if gc.pad_token_id is None:
        gc.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids[0]


def convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> safetensors HF directory (weights de-quantised to fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    config.name_or_path = ""
    # The weights are de-quantised now; a leftover gguf quantization_config would make
    # transformers treat the model as quantized and refuse to save it.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), assign=True)
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    _eot_generation_config(fresh, tok)
    fresh.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def embedded_cache_target(gguf: Path) -> Path:
    """Where the embedded model's safetensors conversion of `gguf` lives (whether built yet or not)."""
    return cache_dir() / "models" / f"smollm2-135m-{gguf_cache_key(gguf)}-{CONVERTER_VERSION}"


def embedded_dir() -> Path:
    """The embedded model as a safetensors directory (converted from its GGUF once, then cached)."""
    gguf = embedded_gguf_path()
    target = embedded_cache_target(gguf)
    if not (target / "config.json").is_file():
        log.warning("converting the embedded model to safetensors once (cached in %s)", target)
    return _atomic_build(target, lambda tmp: convert_gguf(gguf, tmp))


def tiny_random_dir() -> Path:
    """A seeded 2-layer Llama with the embedded model's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target = cache_dir() / "models" / f"tiny-random-llama-{TINY_VERSION}"

    def build(tmp: Path) -> None:
        _quiet_transformers()
        tok = AutoTokenizer.from_pretrained(str(embedded_dir()))
        config = LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        _eot_generation_config(model, tok)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return _atomic_build(target, build)


def local_path(resolved: ResolvedModel) -> str:
    """A directory (or hub id) that `from_pretrained` can load."""
    if resolved.kind == "alias":
        return str(embedded_dir() if resolved.path == "smollm2-135m" else tiny_random_dir())
    if resolved.kind == "gguf":
        gguf = Path(resolved.path)
        target = cache_dir() / "models" / f"{gguf_cache_key(gguf)}-{CONVERTER_VERSION}"
        return str(_atomic_build(target, lambda tmp: convert_gguf(gguf, tmp)))
    if resolved.kind == "adapter" and (resolved.path in ALIASES or resolved.path.endswith(".gguf")):
        # An adapter trained on an alias or a GGUF names that as its base (run/adapter/ does).
        return local_path(resolve_model(resolved.path))
    return resolved.path


def _hub_error(spec: str, err: Exception) -> ModelNotFoundError:
    reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return ModelNotFoundError(
        f"could not load '{spec}' from the Hugging Face hub ({reason}). If this machine is offline, "
        f"download it where there is a network (`hf download {spec} --local-dir DIR`), copy DIR here "
        "and pass the directory as the model")


def load_tokenizer(spec: str | ResolvedModel, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model argument (an adapter's own when it has one); EOS doubles as pad when there is
    none."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    resolved = spec if isinstance(spec, ResolvedModel) else resolve_model(spec)
    path = local_path(resolved)
    # An adapter directory may carry its own tokenizer (e.g. with added template tokens).
    src = resolved.adapter if resolved.adapter and Path(resolved.adapter, "tokenizer_config.json").is_file() else path
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if resolved.kind == "hub":
            raise _hub_error(resolved.spec, e) from None
        raise ModelNotFoundError(f"could not load a tokenizer from {src}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    _family_template(tok, path, resolved.spec)
    return tok


def _family_template(tokenizer: Any, path: str, spec: str) -> None:
    """A local checkpoint without a chat template gets its family's fallback (models/families.py)."""
    import json

    from chatsmith.models.families import apply_fallback_template

    config = Path(path) / "config.json"
    if getattr(tokenizer, "chat_template", None) or not config.is_file():
        return
    try:
        kind = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError):
        return
    apply_fallback_template(tokenizer, kind, where=spec)


def _is_encoder_decoder(path: str) -> bool:
    """Whether the checkpoint at `path` is an encoder-decoder (T5, mT5), read from its config.json."""
    import json

    config = Path(path) / "config.json"
    try:
        return bool(config.is_file() and json.loads(config.read_text()).get("is_encoder_decoder"))
    except (OSError, ValueError):
        return False


def default_dtype(device: str | None = None) -> Any:
    """bf16 on a GPU that supports it, else fp32."""
    import torch

    if device and device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_model(
    spec: str | ResolvedModel,
    *,
    dtype: Any = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    quantization: str | None = None,
    merge_adapter: bool = True,
    allow_pickle: bool = False,
    max_memory: str | dict[int | str, int] | None = None,
) -> tuple[Any, Any]:
    """Load (model, tokenizer). Weights come only from safetensors/GGUF unless allow_pickle is set,
    and no remote code runs unless trust_remote_code is set.

    quantization: None, "4bit" (NF4, the QLoRA recipe) or "8bit" (LLM.int8()); both need bitsandbytes
    and a CUDA GPU. max_memory: a weight budget ("2GiB", "500MB", "0=20GiB,cpu=30GiB" or parsed by
    `parse_max_memory`); what does not fit is offloaded to disk by accelerate (see `plan_offload`).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    _quiet_transformers()
    resolved = spec if isinstance(spec, ResolvedModel) else resolve_model(spec)
    path = local_path(resolved)
    # T5/mT5: `chatsmith sft` trains them (models/seq2seq.py), the engine runs them (infer/seq2seq.py).
    auto = AutoModelForSeq2SeqLM if _is_encoder_decoder(path) else AutoModelForCausalLM
    tokenizer = load_tokenizer(resolved, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {
        "dtype": dtype or default_dtype(device),
        "trust_remote_code": trust_remote_code,
        "use_safetensors": None if allow_pickle else True,
    }
    if quantization is not None and max_memory is not None:
        raise ChatsmithError(f"--max-memory and --load-in-{quantization} do not combine: bitsandbytes-quantized "
                             "layers cannot be offloaded to disk. Choose one")
    if quantization == "4bit":
        kwargs["quantization_config"] = qlora_config(kwargs["dtype"])
        kwargs["device_map"] = {"": device or "cuda:0"}
    elif quantization == "8bit":
        kwargs["quantization_config"] = bitsandbytes_config("8bit", kwargs["dtype"])
        kwargs["device_map"] = {"": device or "cuda:0"}
    elif quantization is not None:
        raise ChatsmithError(f"unknown quantization '{quantization}'; use 4bit or 8bit")
    plan = None
    if max_memory is not None:
        plan = plan_offload(resolved, max_memory, dtype=kwargs["dtype"], device=device,
                            trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        kwargs["device_map"] = plan.device_map
        kwargs["offload_folder"] = plan.offload_folder = tempfile.mkdtemp(prefix="offload-", dir=offload_root())
        # The folder holds only re-saved weights (none from safetensors, read in place). It lives as long as the
        # plan, which the model keeps: removed with the model, or at once when loading fails.
        weakref.finalize(plan, shutil.rmtree, plan.offload_folder, True)
    try:
        model = auto.from_pretrained(path, **kwargs)
    except OSError as e:
        if resolved.kind == "hub":
            raise _hub_error(resolved.spec, e) from None
        if "safetensors" in str(e) and not allow_pickle:
            raise ModelNotFoundError(
                f"{path} has no safetensors weights. chatsmith loads only safetensors/GGUF because pickled "
                ".bin files can run code when loaded. If you trust this model, convert it once and pass the "
                "new directory: python -c \"from transformers import AutoModelForCausalLM as M, AutoTokenizer "
                f"as T; M.from_pretrained('{path}', use_safetensors=False).save_pretrained('{path}-safe'); "
                f"T.from_pretrained('{path}').save_pretrained('{path}-safe')\"") from None
        raise ModelNotFoundError(f"could not load a model from {path}: {e}") from None
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ChatsmithError(f"{resolved.spec} needs its own model code; pass --trust-remote-code "
                                 "if you trust its authors") from None
        raise
    if resolved.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, resolved.adapter)
        # LoRA/DoRA merge into the weights; prompt/prefix tuning and LLaMA-Adapter stay wrapped.
        if merge_adapter and quantization is None and model.peft_config[model.active_adapter].peft_type.value in ("LORA",):
            model = model.merge_and_unload()
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    new_rows = Path(path) / "chatsmith_vocab.json"
    if resolved.kind != "hub" and new_rows.is_file():
        # `chatsmith vocab extend` added these rows; adapter methods train them (models/adapters.py).
        import json

        model.chatsmith_new_token_ids = json.loads(new_rows.read_text()).get("new_token_ids") or None
    if plan is not None:
        model.chatsmith_offload = plan
        log.warning("%s", plan.summary())
    elif device and quantization is None:
        model.to(device)
    model.eval()
    torch.set_grad_enabled(True)
    return model, tokenizer


def qlora_config(compute_dtype: Any) -> Any:
    """4-bit NF4 with double quantisation (the QLoRA paper's recipe)."""
    import torch

    if not torch.cuda.is_available():
        raise ChatsmithError(
            "QLoRA needs a CUDA GPU: bitsandbytes' 4-bit kernels do not run on this device. "
            "Use --method lora here (same adapters, full-precision base), or run on a GPU machine")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ChatsmithError("QLoRA needs bitsandbytes: pip install 'chatsmith[qlora]'") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def bitsandbytes_config(bits: str, compute_dtype: Any) -> Any:
    """`--load-in-8bit` (LLM.int8()) or `--load-in-4bit` (NF4 with double quantisation) for chat and serve."""
    import torch

    flag = f"--load-in-{bits}"
    if not torch.cuda.is_available():
        raise ChatsmithError(
            f"{flag} needs a CUDA GPU: bitsandbytes' {bits[0]}-bit kernels do not run on this machine's CPU. Here, "
            "--max-memory SIZE offloads what does not fit to disk, and --precision int8 (the default for "
            "Llama-family models on a CPU) already quantizes the weights")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ChatsmithError(f"{flag} needs bitsandbytes: pip install 'chatsmith[qlora]'") from None
    if bits == "4bit":
        return qlora_config(compute_dtype)
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True)


# ---- --max-memory: accelerate's device map with disk offload ------------------------------------------------

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_EXAMPLE = "e.g. 2GiB, 500MB, or per device 0=20GiB,cpu=30GiB"


def parse_size(text: str, flag: str = "--max-memory") -> int:
    """Bytes of a size such as "2GiB", "500MB" or "1.5GB" (KB/MB/GB are powers of 10, KiB/MiB/GiB of 2)."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]i?b|b)\s*", text, re.IGNORECASE)
    if not m:
        raise ChatsmithError(f"{flag}: '{text}' is not a size with a unit ({_EXAMPLE})")
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size <= 0:
        raise ChatsmithError(f"{flag}: '{text}' must be more than 0 bytes ({_EXAMPLE})")
    return size


def parse_max_memory(text: str, flag: str = "--max-memory") -> dict[int | str, int]:
    """'2GiB' -> {"": 2147483648} ("": the device the model runs on); '0=20GiB,cpu=30GiB' ->
    {0: 21474836480, "cpu": 32212254720} (GPU indices as ints, "cpu" for RAM), as accelerate's max_memory."""
    if "=" not in text:
        return {"": parse_size(text, flag)}
    budget: dict[int | str, int] = {}
    for item in text.split(","):
        name, sep, size = (p.strip() for p in item.partition("="))
        if not sep or not name:
            raise ChatsmithError(f"{flag}: '{item}' is not DEVICE=SIZE ({_EXAMPLE})")
        if name.isdigit():
            key: int | str = int(name)
        elif name.lower() == "cpu":
            key = "cpu"
        else:
            raise ChatsmithError(f"{flag}: unknown device '{name}' in '{text}'; use GPU indices (0, 1, ...) and cpu")
        if key in budget:
            raise ChatsmithError(f"{flag}: device '{name}' is given twice in '{text}'")
        budget[key] = parse_size(size, flag)
    return budget


def format_size(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _device_budgets(budget: dict[int | str, int], device: str | None) -> dict[int | str, int]:
    """accelerate's max_memory: a bare size ("") is each GPU's budget when the model runs on CUDA, else
    the CPU's; devices not named keep what accelerate finds free (RAM for the CPU)."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for key in budget:
        if isinstance(key, int) and key >= gpus:
            raise ChatsmithError(f"--max-memory names GPU {key}, but this machine has {gpus} CUDA GPU(s)")
    memory = dict(budget)
    if "" in memory:
        size = memory.pop("")
        if device and device.startswith("cuda") and gpus:
            memory.update(dict.fromkeys(range(gpus), size))
        else:
            return {"cpu": size}
    if "cpu" not in memory:
        from accelerate.utils import get_max_memory

        memory["cpu"] = get_max_memory()["cpu"]
    return memory


def _placement(device_map: dict[str, int | str], name: str) -> int | str:
    """Where `name` (a module or parameter) goes under a device map keyed by module prefixes."""
    best = max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len)
    return device_map[best]


@dataclass
class OffloadPlan:
    """Where each part of a model goes under a --max-memory budget (accelerate's infer_auto_device_map)."""

    budget_text: str                         # the --max-memory value, as given
    max_memory: dict[int | str, int]         # bytes per device, as accelerate takes it
    device_map: dict[str, int | str]         # module prefix -> GPU index, "cpu" or "disk"
    model_bytes: int                         # all weights, in the loading dtype
    resident_bytes: int                      # the least that must stay in memory: input embeddings + one layer
    bytes_on: dict[str, int] = field(default_factory=dict)   # "cpu"/"disk"/"cuda:N" -> bytes placed there
    offload_folder: str = ""

    @property
    def offloaded(self) -> bool:
        """Whether any part runs from another place than the main device (accelerate hooks move it in)."""
        return len(set(self.device_map.values())) > 1 or "disk" in self.device_map.values()

    def summary(self) -> str:
        """One line: the budget and where the weights went."""
        where = ", ".join(f"{format_size(b)} on {d}" for d, b in self.bytes_on.items())
        return (f"--max-memory {self.budget_text}: the model's {format_size(self.model_bytes)} of weights go "
                f"{where}" + (" (disk parts are read back at each forward)" if "disk" in self.bytes_on else ""))


def plan_offload(spec: str | ResolvedModel, max_memory: str | dict[int | str, int], *, dtype: Any = None,
                 device: str | None = None, trust_remote_code: bool = False,
                 allow_pickle: bool = False) -> OffloadPlan:
    """The device map for loading `spec` within `max_memory`, computed on the meta device (no weights read).

    accelerate's infer_auto_device_map fills GPUs, then the CPU, then disk; chatsmith's engine feeds the
    input embeddings directly, so they must stay in memory, with room for one layer brought back from disk.
    Raises ChatsmithError when the budget is below that, or when the disk cannot hold the weights that
    must be re-saved there (non-safetensors checkpoints; safetensors are read in place).
    """
    import torch
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    _quiet_transformers()
    resolved = spec if isinstance(spec, ResolvedModel) else resolve_model(spec)
    if resolved.adapter:
        raise ChatsmithError(f"--max-memory loads full models; {resolved.spec} is an adapter. Merge it first "
                             "(chatsmith export ... --to hf) and pass the merged directory")
    budget_text = max_memory if isinstance(max_memory, str) else ",".join(f"{k}={v}B" for k, v in max_memory.items())
    budget = parse_max_memory(max_memory) if isinstance(max_memory, str) else dict(max_memory)
    memory = _device_budgets(budget, device)
    dtype = dtype or default_dtype(device)
    path = local_path(resolved)
    auto = AutoModelForSeq2SeqLM if _is_encoder_decoder(path) else AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if resolved.kind == "hub":
            raise _hub_error(resolved.spec, e) from None
        raise ModelNotFoundError(f"could not read a model config from {path}: {e}") from None
    with torch.device("meta"):
        meta = auto.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    no_split = list(getattr(meta, "_no_split_modules", None) or [])
    device_map = dict(infer_auto_device_map(meta, max_memory=memory, no_split_module_classes=no_split))
    sizes = compute_module_sizes(meta)
    modules = dict(meta.named_modules())
    embed = next(n for n, m in modules.items() if m is meta.get_input_embeddings())
    layers = [sizes[n] for n, m in modules.items() if type(m).__name__ in no_split] or [0]
    resident = sizes[embed] + max(layers)
    if _placement(device_map, embed) == "disk":
        main = next(iter(memory))
        raise ChatsmithError(
            f"--max-memory {budget_text} is too small even with disk offload: {resolved.spec} has "
            f"{format_size(sizes[''])} of weights ({str(dtype).removeprefix('torch.')}), and what must stay in "
            f"memory is its input embeddings ({format_size(sizes[embed])}) plus room to bring back its largest "
            f"layer from disk ({format_size(max(layers))}). The smallest budget that works is "
            f"{format_size(resident)}: --max-memory {-(-resident // 2**20)}MiB"
            + ("" if main == "cpu" else f" (for GPU {main}, or give the CPU that much: cpu=SIZE)"))
    bytes_on: dict[str, int] = {}
    for name, where in device_map.items():
        key = f"cuda:{where}" if isinstance(where, int) else str(where)
        bytes_on[key] = bytes_on.get(key, 0) + sizes[name]
    root = offload_root()
    local = Path(path)
    in_place = (not local.exists() and not allow_pickle) or any(local.glob("*.safetensors"))
    check_offload_room(0 if in_place else bytes_on.get("disk", 0), root, shutil.disk_usage(root).free)
    return OffloadPlan(budget_text=budget_text, max_memory=memory, device_map=device_map, model_bytes=sizes[""],
                       resident_bytes=resident, bytes_on=bytes_on)


def offload_root() -> Path:
    """Where disk offload folders are made (one per loaded model, removed with it): the cache's offload/."""
    root = cache_dir() / "offload"
    root.mkdir(parents=True, exist_ok=True)
    return root


def check_offload_room(needed: int, folder: Path, free: int) -> None:
    """Raise ChatsmithError when `needed` bytes of re-saved weights will not fit in `free` bytes at `folder`."""
    if needed > free:
        raise ChatsmithError(
            f"--max-memory: {format_size(needed)} of weights must be written to {folder} for disk offload, but its "
            f"disk has {format_size(free)} free. Free some space, point CHATSMITH_CACHE at a larger disk, or "
            "convert the model to safetensors (read in place, nothing written)")


def check_load_options(precision: str, max_memory: str | None, quantization: str | None) -> str:
    """Fail at once (before a slow load) on a bad --max-memory, a --load-in-Nbit this machine cannot run, or
    --precision int8 with either; returns the flag in use ("" for none)."""
    if max_memory is not None and quantization is not None:
        raise ChatsmithError(f"--max-memory and --load-in-{quantization} do not combine: bitsandbytes-quantized "
                             "layers cannot be offloaded to disk. Choose one")
    if max_memory is not None:
        parse_max_memory(max_memory)
    if quantization is not None:
        if quantization not in ("8bit", "4bit"):
            raise ChatsmithError(f"unknown quantization '{quantization}'; use 4bit or 8bit")
        bitsandbytes_config(quantization, None)
    flag = "--max-memory" if max_memory is not None else f"--load-in-{quantization}" if quantization else ""
    if flag:
        offload_precision(precision, flag)
    return flag


def offload_precision(precision: str, flag: str) -> str:
    """The engine precision for a model loaded with `flag` (--max-memory or --load-in-Nbit): "module".

    "int8" (or any quantized engine precision) copies every weight into matrices held in memory, which
    would undo the offload (and quantize bitsandbytes weights twice), so it is refused; "auto" resolves
    to "module" with a log line.
    """
    if precision not in ("auto", "module"):   # int8 and any other quantized engine precision
        raise ChatsmithError(f"--precision {precision} does not combine with {flag}: it copies every weight into "
                             "quantized matrices held in memory. Use --precision module (or auto)")
    if precision == "auto":
        log.info("%s: precision 'module' (the engine decodes with the loaded weights; int8 would copy them all "
                 "into memory)", flag)
    return "module"


def offload_fast_path(model: Any) -> bool:
    """Whether the engine's Llama fast path may run a model loaded with --max-memory or --load-in-Nbit: only
    when all of it sits on one device. Otherwise the model's own forward (ModuleRunner) runs through
    accelerate's hooks, their documented use. (The fast path's module precision happens to work too, as
    accelerate hooks every leaf module, and decodes no faster: 3.5 tokens/s both, embedded model at 200MB;
    it is not relied on since it reads the model's internals.)"""
    plan = getattr(model, "chatsmith_offload", None)
    return plan is not None and not plan.offloaded
