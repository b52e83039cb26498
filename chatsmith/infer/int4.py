"""int4 weights for the engine's fast path: group-wise 4-bit matrices on PyTorch's int4 CPU kernel.

Weight-only: each group of `group_size` consecutive input weights of an output row is stored as
4-bit codes q in [0, 15] with one scale and one offset, w = q * scale + offset. Under half the
bytes of int8, so a decode step that reads every weight once reads about half as much.

- asymmetric (the default): scale = (max - min) / 15, offset = min, the grid of llama.cpp's Q4_1
  and GPTQ/AWQ's asymmetric int4. A model that was itself de-quantized from Q4_1 with the same
  group size (the embedded SmolLM2) gets its own codes back.
- symmetric: offset = -8 scale and the weight of largest magnitude at code 0, like llama.cpp's Q4_0.

Two kernels (see `Int4Linear`): chatsmith's own in native/q4.cpp (fp16 scales and offsets, Q4_1's
20 bytes per 32 weights) and PyTorch's `_weight_int4pack_mm_for_cpu` (bf16 scales and zeros).

The RMSNorm in front of a layer is applied to the activations, not folded into W: folding would
move the weights off a grid they may already sit on (above), and weight-only quantization has no
activation grid that the norm's outlier channels could spoil (the reason int8 folds it).

Batch invariance: the kernel computes each row of x on its own, with the same order of sums
whatever the batch (tests/test_engine.py checks it), so batched decode equals decode alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from chatsmith.errors import ChatsmithError

GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 32


def quantize_int4(weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE, symmetric: bool = False,
                  stored: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes int32 [out, in] in 0..15, scales [out, in/g], offsets [out, in/g]) with
    w ~ codes * scale + offset per group of `group_size` inputs. The scales and offsets are rounded
    to `stored`, the dtype the kernel keeps them in, before the codes are chosen against them."""
    w = weight.detach().float()
    n, k = w.shape
    if k % group_size:
        raise ChatsmithError(f"int4 groups of {group_size} need every layer's input size to be a multiple of it; "
                             f"this model has a layer with {k} inputs. Use a smaller group (int4, int4-g64)")
    g = w.reshape(n, k // group_size, group_size)
    if symmetric:
        # Q4_0's choice: the weight of largest magnitude gets code 0 (-8 scale) exactly, so the sign
        # of the scale follows it and the other end of the range has 7 steps.
        big = g.gather(-1, g.abs().argmax(-1, keepdim=True))[..., 0]
        scale = (big / -8).to(stored).float()
        scale = torch.where(scale.abs() < 1e-12, torch.full_like(scale, 1e-12), scale)
        offset = -8 * scale
    else:
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-12).to(stored).float()
        offset = lo.to(stored).float()
    codes = torch.round((g - offset[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.int32)
    return codes.reshape(n, k), scale, offset


def dequantize_int4(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The fp32 weight [out, in] the codes stand for."""
    n, k = codes.shape
    groups = scale.shape[1]
    g = codes.reshape(n, groups, k // groups).float() * scale[..., None] + offset[..., None]
    return g.reshape(n, k)


def row_group_order(t: torch.Tensor) -> torch.Tensor:
    """t [out, lines, L] in the order of chatsmith's kernel (see chatsmith/infer/native/q4.cpp), as
    [out, lines * L]: the output rows in groups of 16 (the last holds out % 16, if any), each group
    line-major, then row, then the L values of that row's line. One zmm lane per row."""
    n, lines, width = t.shape
    full = n // 16 * 16
    parts = [t[:full].reshape(n // 16, 16, lines, width).transpose(1, 2).reshape(-1)]
    if full < n:
        parts.append(t[full:].transpose(0, 1).reshape(-1))
    return torch.cat(parts).reshape(n, lines * width).contiguous()


def pack_q4(codes: torch.Tensor) -> torch.Tensor:
    """Codes [out, in] (0..15) as the kernel's bytes [out, in/2]: per block of 32 and quad j = 0..3,
    one 4-byte line per row whose byte t holds element 8j + t (low nibble) and 8j + 4 + t (high)."""
    n, k = codes.shape
    c = codes.to(torch.uint8).reshape(n, k // 32, 4, 2, 4)     # [row, block, quad, half, t]
    return row_group_order((c[:, :, :, 0] | (c[:, :, :, 1] << 4)).reshape(n, k // 8, 4))


def pack_scales(s: torch.Tensor) -> torch.Tensor:
    """Per-block scales or offsets [out, in/32] as fp16 in the kernel's order (per group of 16 rows,
    block-major)."""
    return row_group_order(s.half()[..., None])


def own_kernel() -> Any:
    """chatsmith's native module when its int4 kernel runs on this CPU (AVX512-VNNI), else None."""
    from chatsmith.infer import native

    module = native.load()
    if module is None or not module.q4_supported():
        return None
    if not _tuned:
        _tuned.append(_choose_threading(module))
    return module


_tuned: list[bool] = []


def _choose_threading(module: Any) -> bool:
    """Split the kernel's rows over torch's threads at a few activation rows (decode) only where that
    is faster here, measured once per process on a 4096 x 1024 matrix at one row. Prefill (8 rows or
    more) always splits. Where the threads share
    one core's vector units (some VMs' vCPUs) splitting only adds its start-up cost per call; on
    separate cores it reads memory faster. Either way the numbers are the same bits."""
    import time

    if torch.get_num_threads() < 2:
        return False
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (4096, 1024), generator=g, dtype=torch.int32)
    w, d, m = pack_q4(codes), pack_scales(torch.full((4096, 32), 0.01)), pack_scales(torch.zeros(4096, 32))
    x = torch.randn(1, 1024, generator=g)
    best = {}
    for parallel in (True, False, True, False):
        module.q4_set_parallel(parallel)
        module.q4_linear(x, w, d, m, None)
        t0 = time.perf_counter()
        for _ in range(20):
            module.q4_linear(x, w, d, m, None)
        best[parallel] = min(best.get(parallel, 1e9), time.perf_counter() - t0)
    parallel = best[True] < best[False]
    module.q4_set_parallel(parallel)
    import logging

    logging.getLogger(__name__).info("int4 kernel: %s (%.0f us vs %.0f us per call)", "rows split over threads"
                                     if parallel else "one thread", best[True] / 20 * 1e6, best[False] / 20 * 1e6)
    return parallel


class Int4Linear:
    """y = norm(x) W^T + b with W in 4-bit groups (see the module docstring).

    `norm_weight` is the RMSNorm weight in front of the layer (applied by `after_rms_norm`), so an
    `Int4Linear` stands where an `Int8Linear` does in `LlamaRunner`.

    Two kernels: chatsmith's own (native/q4.cpp: int8 activations per half-block of 16, VNNI dot
    products, fp32 scales; about twice the speed of PyTorch's at one row) where the CPU has
    AVX512-VNNI and the groups are 32 wide, else PyTorch's (bf16 activations and scales).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, norm_weight: torch.Tensor | None = None,
                 group_size: int = DEFAULT_GROUP_SIZE, symmetric: bool = False, kernel: str = "auto") -> None:
        own = own_kernel() if kernel in ("auto", "chatsmith") else None
        if kernel == "chatsmith" and own is None:
            raise ChatsmithError("chatsmith's int4 kernel needs the native build and an AVX512-VNNI CPU")
        self.own = own if own is not None and group_size == 32 and weight.shape[1] % 64 == 0 else None
        # The scales and offsets are rounded to what the kernel stores: fp16 for ours, bf16 for PyTorch's.
        codes, scale, offset = quantize_int4(weight, group_size, symmetric,
                                             torch.float16 if self.own is not None else torch.bfloat16)
        self.group_size = group_size
        self.out_features, self.in_features = codes.shape
        if self.own is not None:   # w = q d + m: Q4_1's form and bytes (16 + 2 + 2 per 32 weights)
            self.packed = pack_q4(codes)
            self.scales_and_zeros = pack_scales(scale)
            self.offsets = pack_scales(offset)
        else:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            # PyTorch's layout [in/g, out, 2] of (scale, zero) with w = (q - 8) scale + zero
            zero = offset + 8 * scale
            self.scales_and_zeros = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        self.bias = bias.float() if bias is not None else None
        self.in_scale = norm_weight.detach().float().clone() if norm_weight is not None else None

    def nbytes(self) -> int:
        """Bytes the weight takes (codes, scales and zeros)."""
        extra = self.offsets.numel() * 2 if self.own is not None else 0
        return self.packed.numel() + self.scales_and_zeros.numel() * self.scales_and_zeros.element_size() + extra

    def _mm(self, x2: torch.Tensor) -> torch.Tensor:
        if self.own is not None:
            return self.own.q4_linear(x2, self.packed, self.scales_and_zeros, self.offsets, self.bias)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), self.packed, self.group_size,
                                                       self.scales_and_zeros).float()
        return y + self.bias if self.bias is not None else y

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return self._mm(x.reshape(-1, shape[-1])).reshape(*shape[:-1], self.out_features)

    def after_rms_norm(self, x: torch.Tensor, eps: float) -> torch.Tensor:
        """linear(rms_norm(x) * norm_weight); chatsmith's kernel normalises each row itself."""
        shape = x.shape
        if self.own is not None:
            y = self.own.q4_linear(x.reshape(-1, shape[-1]), self.packed, self.scales_and_zeros, self.offsets,
                                   self.bias, self.in_scale, eps)
            return y.reshape(*shape[:-1], self.out_features)
        x2 = F.rms_norm(x.reshape(-1, shape[-1]), (shape[-1],), self.in_scale, eps)
        return self._mm(x2).reshape(*shape[:-1], self.out_features)


def int4_available() -> bool:
    """Whether this PyTorch has the int4 CPU kernel (2.6 and later)."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")



class BlockInt8Linear:
    """y = norm(x) W^T + b with W in int8 blocks of 32, an fp16 scale each (llama.cpp's Q8_0), on
    chatsmith's kernel (native/q4.cpp), activations rounded per half-block of 16 as for int4. The int4
    precision's LM head: the embedded GGUF stores its head in Q8_0, and this keeps those very bytes."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, norm_weight: torch.Tensor | None,
                 own: Any) -> None:
        w = weight.detach().float()
        n, k = w.shape
        g = w.reshape(n, k // 32, 32)
        scale = (g.abs().amax(-1) / 127).to(torch.float16).float()
        codes = torch.where(scale[..., None] > 0, torch.round(g / scale[..., None].clamp_min(1e-30)), torch.zeros_like(g))
        # codes + 128 (1..255): the kernel's vpdpbusd multiplies unsigned weight bytes by signed activations
        codes = (codes.clamp_(-127, 127) + 128).to(torch.uint8)
        self.own = own
        self.packed = row_group_order(codes.reshape(n, k // 4, 4))
        self.scales = pack_scales(scale)
        self.out_features, self.in_features = n, k
        self.bias = bias.float() if bias is not None else None
        self.in_scale = norm_weight.detach().float().clone() if norm_weight is not None else None

    def nbytes(self) -> int:
        """Bytes the weight takes (codes and scales)."""
        return self.packed.numel() + self.scales.numel() * 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.own.q8_linear(x.reshape(-1, shape[-1]), self.packed, self.scales, self.bias)
        return y.reshape(*shape[:-1], self.out_features)

    def after_rms_norm(self, x: torch.Tensor, eps: float) -> torch.Tensor:
        """linear(rms_norm(x) * norm_weight), the norm applied by the kernel."""
        shape = x.shape
        y = self.own.q8_linear(x.reshape(-1, shape[-1]), self.packed, self.scales, self.bias, self.in_scale, eps)
        return y.reshape(*shape[:-1], self.out_features)
