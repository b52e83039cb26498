// chatsmith's int4 matmul for the decode step: 4-bit weights in blocks of 32 with an fp16 scale and
// offset each (w = q * d + m, q in 0..15: llama.cpp Q4_1's grid and bytes), activations quantized to int8
// per block of 32 on the fly, products summed in int32 with AVX512-VNNI (vpdpbusd: 64 u8 x s8
// products per instruction), then scaled in fp32. The weight-times-offset term uses the sum of
// each block's rounded activations.
//
// Layout, chosen so that one 32-byte load holds two blocks and one broadcast gives their scales:
// for each pair of blocks (2p, 2p+1), 32 bytes whose low nibbles are zmm bytes 0..31 and high
// nibbles zmm bytes 32..63 once unpacked; zmm byte b belongs to block 2p + (b / 4) % 2, element
// (b / 8) * 4 + b % 4. A vpdpbusd lane (4 bytes) then sums 4 products of one block, even lanes
// block 2p, odd lanes block 2p + 1, and [d0, d1] broadcast to every lane pair scales them.
// The activations are written in the same order when they are quantized (q4_order in int4.py
// builds the same permutation for the weights).
//
// Each row of x is computed on its own, always in the same order, so a batched result equals each
// row alone bit for bit.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>

namespace chatsmith_q4 {

// Whether the matmuls split their rows over torch's intra-op threads at a few activation rows
// (q4_set_parallel). Splitting gains nothing where the threads share one core's vector units (some
// VMs' vCPUs), and then its start-up cost per call shows; int4.py measures both once and chooses.
static std::atomic<bool> g_parallel{true};
void set_parallel(bool on) { g_parallel = on; }

// Prefill (many activation rows) is compute-bound and always splits.
template <typename F>
void for_rows(int64_t N, int64_t M, const F& body) {
  if ((g_parallel || M >= 8) && at::get_num_threads() > 1) {
    at::parallel_for(0, N, 32, body);
  } else {
    body(0, N);
  }
}

bool supported() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

// The element of its pair of blocks that zmm byte b holds (0..63, block-major: 32 * block + element).
inline int64_t source_index(int64_t b) {
  const int64_t block = (b / 4) % 2, element = (b / 8) * 4 + b % 4;
  return block * 32 + element;
}

#if defined(__x86_64__) && defined(__GNUC__)
// n fp16 values to fp32 (a cvtph per 16).
__attribute__((target("avx512f,avx512bw,avx512vl,f16c")))
inline void widen(const uint16_t* h, int64_t n, float* out) {
  for (int64_t b = 0; b < n; b += 16) {
    const __mmask16 k = n - b >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - b)) - 1);
    _mm512_mask_storeu_ps(out + b, k, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, h + b)));
  }
}

// A tile of NR weight rows against R activation rows (xq, sx, xsum advance by K, K/32, K/32 per
// activation row; out by out_stride per activation row and by 1 per weight row). Each pair of
// blocks of a weight row is unpacked once and used R times; the NR x R sums are independent
// chains, which hides the latency of the multiply-adds. Every (weight row, activation row) sum runs
// in the same order whatever NR, R and the batch: pairs in order, then one reduction.
template <int NR, int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,f16c")))
void tile(const uint8_t* w, int64_t wstride, const uint16_t* d, const uint16_t* m, int64_t K, const int8_t* xq,
          const float* sx, const float* xsum, float* out, int64_t out_stride, float* dbuf) {
  const int64_t pairs = K / 64, blocks = K / 32;
  const __m512i low = _mm512_set1_epi8(0x0F);
  // 16-bit lanes 0..15 (the low 32 bytes) shift by 0, lanes 16..31 by 4: low nibbles, then high ones.
  const __m512i shifts = _mm512_set_epi16(4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4,
                                          0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  widen(d, NR * blocks, dbuf);   // this tile's scales in fp32
  __m512 acc[NR][R];
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    for (int i = 0; i < NR; ++i) {
      // The next tiles' bytes, two tiles ahead: decode streams every weight once, from memory.
      _mm_prefetch(reinterpret_cast<const char*>(w + (2 * NR + i) * wstride + 32 * p), _MM_HINT_T0);
      const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i * wstride + 32 * p)));
      const __m512i wq = _mm512_and_si512(_mm512_srlv_epi16(v, shifts), low);
      double dd;
      std::memcpy(&dd, dbuf + i * blocks + 2 * p, 8);
      const __m512 dv = _mm512_castpd_ps(_mm512_set1_pd(dd));   // [d0, d1, d0, d1, ...]
      for (int r = 0; r < R; ++r) {
        const __m512i xv = _mm512_loadu_si512(xq + r * K + 64 * p);
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq, xv);
        double ss;
        std::memcpy(&ss, sx + r * blocks + 2 * p, 8);
        const __m512 ds = _mm512_mul_ps(dv, _mm512_castpd_ps(_mm512_set1_pd(ss)));
        acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), ds, acc[i][r]);
      }
    }
  }
  // The offsets: sum over blocks of m * (exact sum of the block's activations).
  for (int i = 0; i < NR; ++i) {
    for (int r = 0; r < R; ++r) {
      __m512 off = _mm512_setzero_ps();
      for (int64_t b = 0; b < blocks; b += 16) {
        const __mmask16 k = blocks - b >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (blocks - b)) - 1);
        const __m512 mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, m + i * blocks + b));
        off = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(k, xsum + r * blocks + b), off);
      }
      out[r * out_stride + i] = _mm512_reduce_add_ps(acc[i][r]) + _mm512_reduce_add_ps(off);
    }
  }
}

// The int8 twin (llama.cpp's Q8_0: int8 weights in blocks of 32 with an fp16 scale, no offset), in
// the same permuted order, so it takes the same quantized activations. vpdpbusd multiplies u8 by
// s8: |w| times x with w's sign moved onto x.
template <int NR, int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,f16c")))
void tile8(const int8_t* w, int64_t wstride, const uint16_t* d, int64_t K, const int8_t* xq, const float* sx,
           float* out, int64_t out_stride, float* dbuf) {
  const int64_t pairs = K / 64, blocks = K / 32;
  widen(d, NR * blocks, dbuf);
  __m512 acc[NR][R];
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    for (int i = 0; i < NR; ++i) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (2 * NR + i) * wstride + 64 * p), _MM_HINT_T0);
      const __m512i wv = _mm512_loadu_si512(w + i * wstride + 64 * p);
      const __m512i wa = _mm512_abs_epi8(wv);
      const __mmask64 neg = _mm512_movepi8_mask(wv);
      double dd;
      std::memcpy(&dd, dbuf + i * blocks + 2 * p, 8);
      const __m512 dv = _mm512_castpd_ps(_mm512_set1_pd(dd));
      for (int r = 0; r < R; ++r) {
        const __m512i xv = _mm512_loadu_si512(xq + r * K + 64 * p);
        const __m512i xs = _mm512_mask_sub_epi8(xv, neg, _mm512_setzero_si512(), xv);
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wa, xs);
        double ss;
        std::memcpy(&ss, sx + r * blocks + 2 * p, 8);
        const __m512 ds = _mm512_mul_ps(dv, _mm512_castpd_ps(_mm512_set1_pd(ss)));
        acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), ds, acc[i][r]);
      }
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int r = 0; r < R; ++r) out[r * out_stride + i] = _mm512_reduce_add_ps(acc[i][r]);
}
#else
template <int NR, int R>
void tile(const uint8_t*, int64_t, const uint16_t*, const uint16_t*, int64_t, const int8_t*, const float*,
          const float*, float*, int64_t, float*) {}
template <int NR, int R>
void tile8(const int8_t*, int64_t, const uint16_t*, int64_t, const int8_t*, const float*, float*, int64_t, float*) {}
#endif

// x [M, K] fp32 -> int8 codes in the kernel's order, a scale per block of 32 and the blocks' sums.
// With `norm` (the RMSNorm weight [K]), each row is first normalised: x * w / sqrt(mean(x^2) + eps).
void quantize_rows(const at::Tensor& x, const float* norm, double eps, std::vector<int8_t>& xq, std::vector<float>& sx,
                   std::vector<float>& xsum) {
  const int64_t M = x.size(0), K = x.size(1), blocks = K / 32;
  xq.resize(M * K);
  sx.resize(M * blocks);
  xsum.resize(M * blocks);
  static thread_local std::vector<float> tmp;
  tmp.resize(K);
  const float* xp = x.data_ptr<float>();
  for (int64_t r = 0; r < M; ++r) {
    const float* row = xp + r * K;
    if (norm != nullptr) {
      double ss = 0.0;
      for (int64_t j = 0; j < K; ++j) ss += (double)row[j] * row[j];
      const float inv = (float)(1.0 / std::sqrt(ss / K + eps));
      for (int64_t j = 0; j < K; ++j) tmp[j] = row[j] * inv * norm[j];
      row = tmp.data();
    }
    for (int64_t blk = 0; blk < blocks; ++blk) {
      float amax = 0.f;
      for (int64_t j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(row[blk * 32 + j]));
      sx[r * blocks + blk] = amax / 127.f;
    }
    int8_t* out = xq.data() + r * K;
    static thread_local std::vector<int32_t> qsum;
    qsum.assign(blocks, 0);
    for (int64_t p = 0; p < K / 64; ++p) {
      for (int64_t b = 0; b < 64; ++b) {
        const int64_t src = p * 64 + source_index(b);
        const float scale = sx[r * blocks + src / 32];
        const int8_t q = scale > 0.f ? (int8_t)std::nearbyint(row[src] / scale) : (int8_t)0;
        out[p * 64 + b] = q;
        qsum[src / 32] += q;
      }
    }
    // The offsets multiply the sum of the *rounded* activations (llama.cpp's Q8_1 `s`): then the
    // rounding errors meet the weights themselves, w = q d + m, which are centred, instead of
    // q d alone (all positive), and mostly cancel (perplexity +0.2% instead of +1% here).
    for (int64_t blk = 0; blk < blocks; ++blk) xsum[r * blocks + blk] = sx[r * blocks + blk] * (float)qsum[blk];
  }
}

// y [M, N] = x [M, K] W^T (+ bias) for W given as packed codes w [N, K/2], fp16 scales d and offsets m
// [N, K/32]; with `norm` (RMSNorm weight [K]) and eps, x is RMS-normalised first.
at::Tensor linear(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& d, const at::Tensor& m,
                  const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& norm, double eps) {
  auto x = x_in.contiguous().to(at::kFloat);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), blocks = K / 32;
  TORCH_CHECK(K % 64 == 0 && w.size(1) * 2 == K && d.size(1) == blocks, "q4 linear: shapes do not match");
  TORCH_CHECK(d.scalar_type() == at::kHalf && m.scalar_type() == at::kHalf, "q4 linear: fp16 scales and offsets");
  at::Tensor nw;
  if (norm) nw = norm->contiguous().to(at::kFloat);
  static thread_local std::vector<int8_t> xq;
  static thread_local std::vector<float> sx, xsum;
  quantize_rows(x, norm ? nw.data_ptr<float>() : nullptr, eps, xq, sx, xsum);
  auto y = at::empty({M, N}, at::kFloat);
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  const uint16_t* mp = reinterpret_cast<const uint16_t*>(m.data_ptr<at::Half>());
  // Plain pointers for the workers: the buffers are this thread's (thread_local), not theirs.
  const int8_t* xqp = xq.data();
  const float *sxp = sx.data(), *xsp = xsum.data();
  for_rows(N, M, [&](int64_t n0, int64_t n1) {
    static thread_local std::vector<float> dbuf;
    dbuf.resize(4 * blocks);
    auto run = [&](auto nr, int64_t n) {
      constexpr int NR = decltype(nr)::value;
      const uint8_t* wn = wp + n * (K / 2);
      const uint16_t *dn = dp + n * blocks, *mn = mp + n * blocks;
      int64_t r = 0;
      for (; r + 4 <= M; r += 4)
        tile<NR, 4>(wn, K / 2, dn, mn, K, xqp + r * K, sxp + r * blocks, xsp + r * blocks,
                    yp + r * N + n, N, dbuf.data());
      for (; r < M; ++r)
        tile<NR, 1>(wn, K / 2, dn, mn, K, xqp + r * K, sxp + r * blocks, xsp + r * blocks,
                    yp + r * N + n, N, dbuf.data());
    };
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) run(std::integral_constant<int, 4>{}, n);
    for (; n < n1; ++n) run(std::integral_constant<int, 1>{}, n);
  });
  if (bias) y.add_(*bias);
  return y;
}

// y [M, N] = x [M, K] W^T (+ bias) for W as int8 codes w [N, K] in the kernel's order and fp16
// scales d [N, K/32] (Q8_0); with `norm` and eps, x is RMS-normalised first.
at::Tensor linear8(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& d,
                   const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& norm, double eps) {
  auto x = x_in.contiguous().to(at::kFloat);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), blocks = K / 32;
  TORCH_CHECK(K % 64 == 0 && w.size(1) == K && d.size(1) == blocks && d.scalar_type() == at::kHalf,
              "q8 linear: shapes do not match");
  at::Tensor nw;
  if (norm) nw = norm->contiguous().to(at::kFloat);
  static thread_local std::vector<int8_t> xq;
  static thread_local std::vector<float> sx, xsum;
  quantize_rows(x, norm ? nw.data_ptr<float>() : nullptr, eps, xq, sx, xsum);
  auto y = at::empty({M, N}, at::kFloat);
  float* yp = y.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  const int8_t* xqp = xq.data();
  const float* sxp = sx.data();
  for_rows(N, M, [&](int64_t n0, int64_t n1) {
    static thread_local std::vector<float> dbuf;
    dbuf.resize(4 * blocks);
    auto run = [&](auto nr, int64_t n) {
      constexpr int NR = decltype(nr)::value;
      int64_t r = 0;
      for (; r + 4 <= M; r += 4)
        tile8<NR, 4>(wp + n * K, K, dp + n * blocks, K, xqp + r * K, sxp + r * blocks, yp + r * N + n, N, dbuf.data());
      for (; r < M; ++r)
        tile8<NR, 1>(wp + n * K, K, dp + n * blocks, K, xqp + r * K, sxp + r * blocks, yp + r * N + n, N, dbuf.data());
    };
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) run(std::integral_constant<int, 4>{}, n);
    for (; n < n1; ++n) run(std::integral_constant<int, 1>{}, n);
  });
  if (bias) y.add_(*bias);
  return y;
}

}  // namespace chatsmith_q4
