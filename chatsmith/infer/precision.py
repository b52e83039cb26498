"""The engine's precision names (no torch import: the CLI lists them in --help).

- "module": the model's own weights and dtype (exact; the only choice on a GPU).
- "int8": per-channel int8 weights, activations quantized per row (infer/int8.py); the CPU default
  for a model whose weights are not on int4's grid.
- "int4", "int4-g64", "int4-g128": 4-bit weights in groups of 32 (default), 64 or 128 inputs with a
  scale and an offset each (llama.cpp Q4_1's grid at 32); "int4-sym[-gN]": symmetric, offset 0
  (Q4_0's grid). See infer/int4.py. The CPU default (auto) for a model whose weights already sit on
  int4's grid (a Q4_1 GGUF such as the embedded model), where chatsmith's kernel runs.
"""

from __future__ import annotations

QUANTIZED = ("int8", "int4", "int4-g64", "int4-g128", "int4-sym", "int4-sym-g64", "int4-sym-g128")
PRECISIONS = ("module", *QUANTIZED)
CHOICES = ("auto", *PRECISIONS)   # for --precision
HELP = ("auto: for Llama-family models on a CPU, int4 when the weights already sit on its grid (a Q4_1 GGUF "
        "such as the embedded model: nothing lost) and its AVX512-VNNI kernel runs, else int8; elsewhere the "
        "model's own (module); int4[-sym][-g64|-g128]: 4-bit weights in groups of 32/64/128 (half int8's bytes)")


def int4_spec(precision: str) -> tuple[int, bool] | None:
    """(group size, symmetric) of an int4 precision name ("int4", "int4-g64", "int4-sym-g128"), else None."""
    if precision not in QUANTIZED or not precision.startswith("int4"):
        return None
    parts = precision.split("-")[1:]
    group = next((int(p[1:]) for p in parts if p.startswith("g")), 32)
    return group, "sym" in parts
