"""`--to hf`: a Hugging Face directory plain transformers loads: safetensors, the tokenizer with its
chat template, and a generation config whose EOS list covers the template's end-of-turn token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chatsmith.export.source import ExportSource

HF_DTYPES = ("f32", "f16", "bf16")


def write_hf(src: ExportSource, output: Path, dtype: str = "f32") -> Path:
    """Write the merged model to `output` (a directory) and return it."""
    import torch

    torch_dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    output.mkdir(parents=True, exist_ok=True)
    model = src.model.to(torch_dtype)
    model.config.name_or_path = ""
    gc = model.generation_config
    gc.eos_token_id = src.stop_ids[0] if len(src.stop_ids) == 1 else list(src.stop_ids)
    if gc.pad_token_id is None:
        gc.pad_token_id = src.tokenizer.pad_token_id
    model.config.eos_token_id = src.tokenizer.eos_token_id
    model.save_pretrained(output, safe_serialization=True)
    src.tokenizer.chat_template = src.template
    src.tokenizer.save_pretrained(output)
    if torch_dtype != torch.float32:
        src.model.to(torch.float32)
    return output


def hf_summary(output: Path, src: ExportSource) -> dict[str, Any]:
    """What a reader needs to check the directory: files and the stop ids."""
    return {"path": str(output), "files": sorted(p.name for p in output.iterdir()),
            "eos_token_id": src.stop_ids, "end_of_turn": src.end_of_turn}
