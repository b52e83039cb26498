"""Model runners for the engine: prefill a chunk of one sequence, decode one token for many.

A runner owns the KV cache, laid out in slots (one per running sequence, `max_batch_size` of them).
Two kinds:

- `LlamaRunner`: a lean decode path for Llama-family models (llama, mistral without sliding
  window, qwen2) that calls the model's own norms, rotary embedding and projections, with a
  pre-allocated per-slot KV cache and per-row positions, so sequences of different lengths decode
  in one batch. `precision="module"` calls the module's linear layers themselves (fp32, exact, and
  a PEFT LoRA wrapper applies itself), `precision="int8"` uses int8 copies of the weights (infer/
  int8.py) and `"int4"` group-wise 4-bit ones (infer/int4.py; `int4-g64`, `int4-sym-g128`, ...
  choose the group size and the symmetric grid). In int8 and int4 the decode step and the prefill
  run in C++ (chatsmith/infer/native) when it can be built: the same ATen calls as
  `_layers_quantized`, so the same logits bit for bit, without the interpreter's cost per
  operation; prefill there takes chunks of several sequences in one pass.
- `ModuleRunner`: any Hugging Face causal LM, one `DynamicCache` per sequence and one forward per
  sequence per step. Slow, but it works for every architecture.

Batch invariance: a row's output never depends on the other rows in the batch. Attention runs per
row over that row's own length, and the int8 matmul quantizes each row on its own (see
`Int8Linear`), so integer accumulation makes it exact; the int4 kernel sums each row on its own. In `module` precision the fp32 matmul of a
batch may differ from one row alone in the last bits (BLAS picks other kernels), which can flip a
greedy choice between two near-equal tokens.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F

from chatsmith.errors import ChatsmithError
from chatsmith.infer.int4 import (
    BlockInt8Linear,
    Int4Linear,
    dequantize_int4,
    int4_available,
    own_kernel,
    quantize_int4,
)
from chatsmith.infer.int8 import REDUCE_RANGE, SMOOTH_ALPHA, Int8Linear, effective_linear
from chatsmith.infer.lora import LoraAdapter, add_lora_deltas
from chatsmith.infer.precision import PRECISIONS, QUANTIZED, int4_spec

LLAMA_FAMILY = ("llama", "mistral", "qwen2")


def base_model(model: Any) -> Any:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def on_q4_1_grid(model: Any) -> bool:
    """Whether the Llama-family `model`'s linear weights already sit on int4's asymmetric grid with
    groups of 32 (a 4-bit GGUF, Q4_1, de-quantized on loading, like the embedded SmolLM2), so that
    int4 loses nothing on them. Checks the first layer's q_proj and the last layer's down_proj,
    exactly: a model trained or saved in fp16/fp32 is not on it."""
    layers = getattr(getattr(base_model(model), "model", None), "layers", None)
    if not layers:
        return False
    for w in (layers[0].self_attn.q_proj.weight, layers[-1].mlp.down_proj.weight):
        if w.device.type != "cpu" or w.shape[1] % 32:
            return False
        codes, scale, offset = quantize_int4(w, 32, symmetric=False, stored=torch.float16)
        if not torch.equal(dequantize_int4(codes, scale, offset), w.detach().float()):
            return False
    return True


def supports_fast_path(model: Any) -> bool:
    """Whether `LlamaRunner` can run this model."""
    base = base_model(model)
    cfg = getattr(base, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in LLAMA_FAMILY:
        return False
    if getattr(cfg, "use_sliding_window", False) or (
            cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None)):
        return False
    inner = getattr(base, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(inner, "rotary_emb") or not hasattr(base, "lm_head"):
        return False
    attn = layers[0].self_attn
    return not hasattr(attn, "q_norm") and all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))


class LlamaRunner:
    """Lean batched decode for Llama-family models; see the module docstring."""

    keeps_released_cache = True   # a released slot's keys and values stay until it is written again (prefix cache)

    def __init__(self, model: Any, *, max_batch_size: int, slot_tokens: int, precision: str = "module",
                 adapters: dict[str, LoraAdapter] | None = None, calibration_ids: list[int] | None = None,
                 native: bool = True) -> None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.model = model
        self.base = base_model(model)
        self.inner = self.base.model
        self.cfg = self.base.config
        self.precision = precision
        self.apply_rope = apply_rotary_pos_emb
        self.n_heads = self.cfg.num_attention_heads
        self.n_kv = getattr(self.cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(self.cfg, "head_dim", None) or self.cfg.hidden_size // self.n_heads
        self.n_layers = len(self.inner.layers)
        self.max_batch_size, self.slot_tokens = max_batch_size, slot_tokens
        self.adapters = adapters or {}
        if not calibration_ids:  # no tokenizer: seeded random ids still show the systematic outlier channels
            g = torch.Generator().manual_seed(0)
            calibration_ids = torch.randint(0, self.cfg.vocab_size, (256,), generator=g).tolist()
        self.calibration_ids = calibration_ids[: min(len(calibration_ids), slot_tokens, 512)]
        weight = self.inner.embed_tokens.weight
        self.device = weight.device
        if precision != "module" and self.device.type != "cpu":
            raise ChatsmithError(f"precision '{precision}' uses CPU kernels (fbgemm int8, PyTorch's int4 CPU kernel); "
                                 "on a GPU use precision 'module'")
        # The KV cache holds what the layers produce: the model's dtype, or fp32 around the quantized matmuls.
        self.dtype = weight.dtype if precision == "module" else torch.float32
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.allocated = 0
        self.use_native = native and precision != "module"
        self.sync_weights()

    @staticmethod
    def bytes_per_token(model: Any) -> int:
        """KV-cache bytes one token takes in this runner (fp32 keys and values, all layers)."""
        cfg = base_model(model).config
        n_heads = cfg.num_attention_heads
        n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        return 2 * cfg.num_hidden_layers * n_kv * head_dim * 4

    def sync_weights(self) -> None:
        """(Re)build the int8/int4 copies from the module's current weights; a no-op in module precision."""
        self.layers: list[dict[str, Any]] = []
        if self.precision == "module":
            for layer in self.inner.layers:
                a, m = layer.self_attn, layer.mlp
                self.layers.append({
                    "qkv": lambda x, a=a: [a.q_proj(x), a.k_proj(x), a.v_proj(x)],
                    "o": a.o_proj,
                    "gate_up": lambda x, m=m: [m.gate_proj(x), m.up_proj(x)],
                    "down": m.down_proj,
                })
            self.lm_head = self.base.lm_head
            self.native = None
            return
        if self.precision not in QUANTIZED:
            raise ChatsmithError(f"unknown precision '{self.precision}'; use one of {', '.join(PRECISIONS)}")
        int4 = int4_spec(self.precision)
        if int4 and not int4_available():
            raise ChatsmithError(f"precision '{self.precision}' needs PyTorch's int4 CPU kernel (torch 2.6 or later); "
                                 "use precision 'int8'")
        act = getattr(self.cfg, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ChatsmithError(f"precision '{self.precision}' supports SiLU MLPs; this model uses '{act}'. "
                                 "Use precision 'module'")
        norm = self.inner.layers[0].input_layernorm
        self.eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        hidden = self.cfg.hidden_size
        q_scale = self.head_dim ** -0.5
        self.q_scale = q_scale

        # int4 keeps the LM head in int8, as llama.cpp's 4-bit files do (the embedded model's GGUF
        # stores it in Q8_0): one matrix of 49K x 576 that sets every token's probability. On
        # chatsmith's kernel it is Q8_0 itself (blocks of 32), else per-row int8 with calibration.
        act_max = self._activation_maxima(head_only=bool(int4))

        def fused(modules: list[Any], norm_weight: torch.Tensor | None = None, first_scale: float = 1.0,
                  four_bit: bool = bool(int4)) -> Int8Linear | Int4Linear:
            ws, bs = zip(*(effective_linear(m) for m in modules))
            ws, bs = list(ws), list(bs)
            ws[0] = ws[0] * first_scale  # the attention's 1/sqrt(head_dim), folded into the q rows
            if bs[0] is not None:
                bs[0] = bs[0] * first_scale
            w = torch.cat(ws)
            bias = None
            if any(b is not None for b in bs):
                bias = torch.cat([b if b is not None else torch.zeros(x.shape[0]) for x, b in zip(ws, bs)])
            if four_bit:
                return Int4Linear(w, bias, norm_weight, group_size=int4[0], symmetric=int4[1])
            in_scale = torch.ones(w.shape[1])
            if norm_weight is not None:
                w = w * math.sqrt(hidden)  # the RMSNorm's sqrt(hidden); its weight goes to in_scale
                in_scale = norm_weight.detach().float().clone()
            # SmoothQuant (Xiao et al. 2023, Eq. 4): divide each input channel by
            # s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha) and multiply W's column by it. Outlier channels
            # then no longer set every row's int8 grid for the activations; the weights absorb them.
            a = act_max.get(id(modules[0]))
            if a is not None:
                smooth = (a.clamp_min(1e-5) ** SMOOTH_ALPHA /
                          w.abs().amax(0).clamp_min(1e-5) ** (1 - SMOOTH_ALPHA)).clamp(1e-2, 1e2)
                w = w * smooth[None, :]
                in_scale = in_scale / smooth
            return Int8Linear(w, bias, in_scale)

        with torch.no_grad():
            for layer in self.inner.layers:
                a, m = layer.self_attn, layer.mlp
                self.layers.append({
                    "qkv": fused([a.q_proj, a.k_proj, a.v_proj], layer.input_layernorm.weight, q_scale),
                    "o": fused([a.o_proj]),
                    "gate_up": fused([m.gate_proj, m.up_proj], layer.post_attention_layernorm.weight),
                    "down": fused([m.down_proj]),
                })
            own = own_kernel() if int4 else None
            if own is not None and self.cfg.hidden_size % 64 == 0:
                self.lm_head = BlockInt8Linear(*effective_linear(self.base.lm_head), self.inner.norm.weight, own)
            else:
                self.lm_head = fused([self.base.lm_head], self.inner.norm.weight, four_bit=False)
            # for LoRA deltas, which need the normalised input itself
            self.norm_w = [(layer.input_layernorm.weight.detach().float().clone(),
                            layer.post_attention_layernorm.weight.detach().float().clone())
                           for layer in self.inner.layers]
        a, m = self.inner.layers[0].self_attn, self.inner.layers[0].mlp
        self.sizes = {"qkv": [self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim],
                      "o": [a.o_proj.out_features if hasattr(a.o_proj, "out_features") else self.cfg.hidden_size],
                      "gate_up": [self.cfg.intermediate_size, self.cfg.intermediate_size],
                      "down": [self.cfg.hidden_size]}
        self.native = self._build_native() if self.use_native else None

    def _build_native(self) -> Any:
        """The C++ decode and prefill steps (chatsmith/infer/native) holding these int8/int4 layers, or
        None if they cannot be built."""
        from chatsmith.infer import native

        module = native.load()
        if module is None:
            return None
        dec = module.Decoder(self.n_heads, self.n_kv, self.head_dim, self.eps, REDUCE_RANGE)
        entries = [(i, kind, L[name]) for i, L in enumerate(self.layers)
                   for kind, name in enumerate(("qkv", "o", "gate_up", "down"))] + [(-1, 0, self.lm_head)]
        for i, kind, lin in entries:
            if isinstance(lin, BlockInt8Linear):
                dec.add_linear_q8(i, kind, lin.packed, lin.scales, lin.in_scale, lin.bias, lin.in_features,
                                  lin.out_features)
            elif isinstance(lin, Int4Linear) and lin.own is not None:
                dec.add_linear_q4(i, kind, lin.packed, lin.scales_and_zeros, lin.offsets, lin.in_scale, lin.bias,
                                  lin.in_features, lin.out_features)
            elif isinstance(lin, Int4Linear):
                dec.add_linear4(i, kind, lin.packed, lin.scales_and_zeros, lin.group_size, lin.in_scale, lin.bias,
                                lin.in_features, lin.out_features)
            else:
                dec.add_linear(i, kind, lin.packed, lin.in_scale, lin.bias, lin.in_features, lin.out_features)
        dec.set_gate_up_sizes(self.sizes["gate_up"])
        return dec

    def _activation_maxima(self, head_only: bool = False) -> dict[int, torch.Tensor]:
        """max |input| per channel of every linear layer (or the LM head only), over a short calibration
        text (module id -> [in])."""
        targets = [self.base.lm_head]
        for layer in [] if head_only else self.inner.layers:
            targets += [layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.down_proj]
        maxima: dict[int, torch.Tensor] = {}

        def hook(module: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach().float().abs().reshape(-1, args[0].shape[-1]).amax(0).cpu()
            key = id(module)
            maxima[key] = torch.maximum(maxima[key], x) if key in maxima else x

        handles = [m.register_forward_pre_hook(hook) for m in targets]
        try:
            ids = torch.tensor([self.calibration_ids], dtype=torch.long, device=self.device)
            self.model(input_ids=ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return maxima

    # ---- KV cache -------------------------------------------------------------------------------

    def _ensure_capacity(self, tokens: int) -> None:
        if self.allocated:
            return
        # The whole budget at once, but with torch.empty: the OS commits a page only when it is first
        # written, so memory grows with the tokens actually cached. One fixed layout (strides) also
        # keeps the attention kernels, and so the results, the same whatever else is running.
        shape = (self.max_batch_size, self.n_kv, self.slot_tokens, self.head_dim)
        self.k = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        self.v = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        self.allocated = self.slot_tokens

    def release(self, slot: int) -> None:
        """Give a slot back (nothing to free: the next prefill overwrites it)."""
        pass  # the slot's rows are overwritten by the next sequence's prefill

    def copy_prefix(self, src: int, dst: int, n: int) -> bool:
        """Copy the first n cached positions of slot src into slot dst (prefix sharing)."""
        for k, v in zip(self.k, self.v):
            k[dst, :, :n] = k[src, :, :n]
            v[dst, :, :n] = v[src, :, :n]
        return True

    # ---- forward ----------------------------------------------------------------------------------

    def _proj(self, layer_idx: int, name: str, x: torch.Tensor, adapters: list[str | None]) -> list[torch.Tensor]:
        fn = self.layers[layer_idx][name]
        out = fn(x)
        out = list(out) if isinstance(out, (list, tuple)) else [out]
        if self.adapters and any(adapters):
            add_lora_deltas(out, x, layer_idx, name, self.adapters, adapters)
        return out

    def _run_layers(self, h: torch.Tensor, positions: torch.Tensor, attend: Any,
                    adapters: list[str | None]) -> torch.Tensor:
        if self.precision != "module":
            return self._layers_quantized(h, positions, attend, adapters)
        return self._layers(h, positions, attend, adapters)

    def _layers(self, h: torch.Tensor, positions: torch.Tensor, attend: Any, adapters: list[str | None]) -> torch.Tensor:
        """h [B, T, hidden] at positions [B, T] through every layer; `attend(i, q, k, v)` does attention."""
        cos, sin = self.inner.rotary_emb(h, positions)
        B, T = h.shape[:2]
        for i, layer in enumerate(self.inner.layers):
            x = layer.input_layernorm(h)
            q, k, v = self._proj(i, "qkv", x, adapters)
            q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
            k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
            v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = self.apply_rope(q, k, cos, sin)
            o = attend(i, q, k, v)  # [B, T, heads * head_dim]
            h = h + self._proj(i, "o", o, adapters)[0]
            x = layer.post_attention_layernorm(h)
            g, u = self._proj(i, "gate_up", x, adapters)
            h = h + self._proj(i, "down", layer.mlp.act_fn(g) * u, adapters)[0]
        return self.inner.norm(h)

    def _add_adapters(self, i: int, name: str, x: torch.Tensor, out: torch.Tensor,
                      adapters: list[str | None]) -> torch.Tensor:
        """Add each row's LoRA delta into the fused projection output [B, T, out] (q rows carry the
        attention scale in int8 mode)."""
        if self.adapters and any(adapters):
            add_lora_deltas([out], x, i, name, self.adapters, adapters, q_scale=self.q_scale, sizes=self.sizes[name])
        return out

    def _rope_int8(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables [B, T, 1, head_dim] for `qk * cos + qk.roll(half, -1) * sin`: rotate_half(x) * sin
        == roll(x, half) * sin_signed (HF's non-interleaved convention)."""
        cos, sin = self.inner.rotary_emb(h, positions)  # [B, T, head_dim]
        half = self.head_dim // 2
        return cos.unsqueeze(2), torch.cat([-sin[..., :half], sin[..., half:]], dim=-1).unsqueeze(2)

    def _layers_quantized(self, h: torch.Tensor, positions: torch.Tensor, attend: Any,
                     adapters: list[str | None]) -> torch.Tensor:
        """`_layers` with fused int8/int4 projections, the RMSNorms applied by them (`after_rms_norm`) and
        RoPE on q and k together.

        Returns the last hidden state un-normalised: the final norm is folded into the LM head.
        """
        cos, sin = self._rope_int8(h, positions)
        half = self.head_dim // 2
        B, T = h.shape[:2]
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        lora = bool(self.adapters) and any(adapters)
        H = h.shape[-1]
        for i, L in enumerate(self.layers):
            qkv = L["qkv"].after_rms_norm(h, self.eps)
            if lora:
                qkv = self._add_adapters(i, "qkv", F.rms_norm(h, (H,), self.norm_w[i][0], self.eps), qkv, adapters)
            qkv = qkv.view(B, T, nh + 2 * nkv, hd)
            qk = qkv[:, :, : nh + nkv]
            qk = qk * cos + qk.roll(half, -1) * sin
            q = qk[:, :, :nh].transpose(1, 2)
            k = qk[:, :, nh:].transpose(1, 2)
            v = qkv[:, :, nh + nkv:].transpose(1, 2)
            o = attend(i, q, k, v)
            h = h + (self._add_adapters(i, "o", o, L["o"](o), adapters) if lora else L["o"](o))
            gu = L["gate_up"].after_rms_norm(h, self.eps)
            if lora:
                gu = self._add_adapters(i, "gate_up", F.rms_norm(h, (H,), self.norm_w[i][1], self.eps), gu, adapters)
            g, u = gu.split(self.sizes["gate_up"], -1)
            m = F.silu(g) * u
            h = h + (self._add_adapters(i, "down", m, L["down"](m), adapters) if lora else L["down"](m))
        return h

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.precision != "module":
            return self.lm_head.after_rms_norm(h, self.eps)  # the final norm is folded into the head
        return self.lm_head(h).float().cpu()  # sampling runs on the CPU

    def prefill(self, slot: int, ids: list[int], start: int, adapter: str | None) -> torch.Tensor:
        """Run ids (a chunk of one sequence starting at position `start`); logits of its last position [V]."""
        return self._logits(self._prefill_hidden(slot, ids, start, adapter)[:, -1])[0]

    def prefill_scored(self, slot: int, ids: list[int], start: int, adapter: str | None,
                       rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`prefill`, and also the logits of the chunk's first `rows` positions [rows, V] (each one
        predicts the token after it: prompt log-probs come from the forward pass that fills the cache)."""
        h = self._prefill_hidden(slot, ids, start, adapter)
        # The last position's logits exactly as `prefill` computes them (a matmul over more rows may
        # round differently), so scoring a prompt never changes what is generated after it.
        return self._logits(h[:, -1])[0], self._logits(h[0, :rows])

    def prefill_batch(self, chunks: list[tuple[int, list[int], int]]) -> list[torch.Tensor] | None:
        """Chunks (slot, ids, start) of several sequences in one pass through the native step (no
        adapters): the logits [V] of each chunk's last position, bit for bit what `prefill` gives each
        chunk alone. None when there is no native step (then call `prefill` per chunk)."""
        if self.native is None:
            return None
        h = self._native_prefill(chunks)
        last = torch.tensor(list(itertools.accumulate(len(ids) for _, ids, _ in chunks))) - 1
        return list(self._logits(h[0, last]))

    def _native_prefill(self, chunks: list[tuple[int, list[int], int]]) -> torch.Tensor:
        """The native prefill of `prefill_batch`: final hidden states [1, sum of chunk lengths, hidden]."""
        self._ensure_capacity(max(start + len(ids) for _, ids, start in chunks))
        dev = self.device
        tokens = torch.tensor([[t for _, ids, _ in chunks for t in ids]], dtype=torch.long, device=dev)
        h = self.inner.embed_tokens(tokens).to(self.dtype)
        positions = torch.cat([torch.arange(start, start + len(ids), device=dev) for _, ids, start in chunks])
        cos, sin = self._rope_int8(h, positions.unsqueeze(0))
        return self.native.prefill(h, cos, sin, [c[0] for c in chunks], [c[2] for c in chunks],
                                   [len(c[1]) for c in chunks], self.k, self.v)

    def _prefill_hidden(self, slot: int, ids: list[int], start: int, adapter: str | None) -> torch.Tensor:
        """Run a chunk of one sequence into the slot's cache; the final hidden states [1, T, hidden]."""
        if self.native is not None and not (self.adapters and adapter):
            return self._native_prefill([(slot, ids, start)])
        T = len(ids)
        self._ensure_capacity(start + T)
        dev = self.device
        tokens = torch.tensor([ids], dtype=torch.long, device=dev)
        h = self.inner.embed_tokens(tokens).to(self.dtype)
        positions = torch.arange(start, start + T, device=dev).unsqueeze(0)
        end = start + T
        scale = 1.0 if self.precision != "module" else None  # int8/int4: 1/sqrt(head_dim) is folded into q
        # Query i (at position start+i) sees keys 0..start+i.
        mask = torch.arange(end, device=dev).unsqueeze(0) <= (torch.arange(T, device=dev) + start).unsqueeze(1)

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.k[i][slot, :, start:end] = k[0]
            self.v[i][slot, :, start:end] = v[0]
            o = F.scaled_dot_product_attention(q, self.k[i][slot: slot + 1, :, :end], self.v[i][slot: slot + 1, :, :end],
                                               attn_mask=mask, enable_gqa=self.n_kv != self.n_heads, scale=scale)
            return o.transpose(1, 2).reshape(1, T, -1)

        return self._run_layers(h, positions, attend, [adapter])

    def decode(self, slots: list[int], tokens: list[int], positions: list[int],
               adapters: list[str | None]) -> torch.Tensor:
        """One new token for each row; logits [B, V]."""
        B = len(slots)
        self._ensure_capacity(max(positions) + 1)
        dev = self.device
        h = self.inner.embed_tokens(torch.tensor(tokens, dtype=torch.long, device=dev).unsqueeze(1)).to(self.dtype)
        pos = torch.tensor(positions, dtype=torch.long, device=dev).unsqueeze(1)
        if self.native is not None and not (self.adapters and any(adapters)):
            cos, sin = self._rope_int8(h, pos)
            return self.native.decode(h, cos, sin, list(slots), list(positions), self.k, self.v)
        slot_t = torch.tensor(slots, dtype=torch.long, device=dev)
        groups = self.n_heads // self.n_kv
        scaled = self.precision == "module"  # int8/int4: 1/sqrt(head_dim) is folded into q
        scale = self.head_dim ** -0.5

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if B == 1:
                self.k[i][slots[0], :, positions[0]] = k[0, :, 0]
                self.v[i][slots[0], :, positions[0]] = v[0, :, 0]
            else:
                self.k[i][slot_t, :, pos[:, 0]] = k[:, :, 0]
                self.v[i][slot_t, :, pos[:, 0]] = v[:, :, 0]
            # Per row over that row's own length: no padding, and nothing depends on the other rows.
            # Written out (scores, softmax, weighted sum) with the query heads grouped by their KV
            # head: for one query token this is faster than SDPA's flash kernel on a CPU.
            outs = []
            for r, (s, p) in enumerate(zip(slots, positions)):
                qr = q[r].reshape(self.n_kv, groups, self.head_dim)             # [kv, g, hd]
                scores = torch.matmul(qr, self.k[i][s, :, : p + 1].transpose(1, 2))  # [kv, g, L]
                if scaled:
                    scores = scores * scale
                outs.append(torch.matmul(scores.softmax(-1), self.v[i][s, :, : p + 1]))     # [kv, g, hd]
            o = outs[0] if B == 1 else torch.stack(outs)
            return o.reshape(B, 1, -1)

        h = self._run_layers(h, pos, attend, adapters)
        return self._logits(h[:, -1])


class ModuleRunner:
    """Any causal LM: one DynamicCache and one forward per sequence (see the module docstring)."""

    def __init__(self, model: Any, *, max_batch_size: int, slot_tokens: int) -> None:
        import inspect

        self.model = model
        self.max_batch_size, self.slot_tokens = max_batch_size, slot_tokens
        self.caches: dict[int, Any] = {}
        base = base_model(model)
        try:
            self.device = model.get_input_embeddings().weight.device
        except (AttributeError, NotImplementedError):
            self.device = next(model.parameters()).device
        try:
            self.logits_to_keep = "logits_to_keep" in inspect.signature(base.forward).parameters
        except (TypeError, ValueError):
            self.logits_to_keep = False
        self.adapters: dict[str, Any] = {}
        # A recurrent model (RWKV) carries a fixed-size state between calls instead of a KV cache.
        self.recurrent = getattr(base.config, "model_type", None) == "rwkv"

    @staticmethod
    def bytes_per_token(model: Any) -> int:
        """KV-cache bytes one token takes (fp32 keys and values, all layers)."""
        cfg = base_model(model).config
        n_heads = getattr(cfg, "num_attention_heads", 1)
        n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
        hidden = getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0)
        head_dim = getattr(cfg, "head_dim", None) or max(hidden // max(n_heads, 1), 1)
        layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 1)
        return 2 * layers * n_kv * head_dim * 4

    def sync_weights(self) -> None:
        """Nothing to refresh: the module's own weights are read live."""
        pass

    def release(self, slot: int) -> None:
        """Drop the slot's cache."""
        self.caches.pop(slot, None)

    def copy_prefix(self, src: int, dst: int, n: int) -> bool:
        """False: a DynamicCache cannot be cut to a prefix in general, so the prompt is prefilled again."""
        return False  # a DynamicCache cannot be cut to a prefix in general: prefill again

    def _forward(self, slot: int, ids: list[int], all_logits: bool = False) -> torch.Tensor:
        """Logits [V] of the last position of ids (of every position [T, V] with `all_logits`)."""
        from transformers import DynamicCache

        extra = {"logits_to_keep": 1} if self.logits_to_keep and not all_logits else {}
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        if self.recurrent:   # RWKV: the slot holds the recurrent state the last call returned
            out = self.model(input_ids=input_ids, state=self.caches.get(slot), use_cache=True, **extra)
            self.caches[slot] = out.state
        else:
            cache = self.caches.get(slot)
            if cache is None:
                cache = self.caches[slot] = DynamicCache(config=base_model(self.model).config)
            out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True, **extra)
        return out.logits[0].float().cpu() if all_logits else out.logits[0, -1].float().cpu()  # sampling runs on the CPU

    def prefill(self, slot: int, ids: list[int], start: int, adapter: str | None) -> torch.Tensor:
        """Run a chunk of one sequence; logits of its last position [V]."""
        if start == 0:
            self.caches.pop(slot, None)
        return self._forward(slot, ids)

    def prefill_scored(self, slot: int, ids: list[int], start: int, adapter: str | None,
                       rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`prefill`, and also the logits of the chunk's first `rows` positions [rows, V]."""
        if start == 0:
            self.caches.pop(slot, None)
        logits = self._forward(slot, ids, all_logits=True)
        return logits[-1], logits[:rows]

    def decode(self, slots: list[int], tokens: list[int], positions: list[int],
               adapters: list[str | None]) -> torch.Tensor:
        """One new token for each row (one forward per row); logits [B, V]."""
        return torch.stack([self._forward(s, [t]) for s, t in zip(slots, tokens)])
