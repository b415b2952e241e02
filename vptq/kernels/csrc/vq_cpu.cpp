// Gather-FMA GEMV for vector-quantized weights on the CPU (`kernel=cpu`; vptq/kernels/cpu.py builds,
// loads and calls it). A plain C ABI without torch headers, so that it compiles in seconds; the caller
// passes raw pointers through ctypes.
//
// One call is one PASS: one codebook and one index stream over a range of input columns. A weight is the
// sum of its passes (main codebook, residual codebook, outlier columns; or AQLM's M <= 2 codebooks), each
// accumulated into the same float32 output buffer. Two layouts:
//
//   OUT (VPTQ, `VQWeight`: vectors along the OUTPUT dimension within one input column):
//     y[t, r*v + i] += sum_c x[t, c] * cb[g(c)][idx[r, c]][i]            i < v, g(c) = c / group_size
//   IN  (AQLM-style: vectors along the INPUT dimension, x given as (T, ncols, v), v <= VP):
//     y[t, r]       += sum_c dot(x[t, c, 0:v], cb[0][idx[r, c]][0:v])   (+ cb2[idx2[r, c]] summed into
//                      the codeword first where a second stream is given: AQLM's codebooks, two per pass)
//
// Buffers (cpu.py):
//   idx  the weight's own indices, read in place (`idx_mode` 1 / 2): (G, nvec, group_size, S) uint16 /
//        uint8 codeword numbers, row r's index of column c of group g at
//        idx[((g * nvec + r) * group_size + c) * S] (S = `idx_cstride`: 1 for VPTQ's indices; M for AQLM's
//        codes (out, ncols, M), one group, idx2 = idx + 1 the second codebook's): a tile's R rows are R
//        streams, one index per column each; no copy of the indices is kept. `idx_mode` 3 (IN, AQLM's
//        2x8): (nvec, ncols) uint16 words, each the two uint8 codes of a vector (low byte: cb's, high
//        byte: cb2's), one load for both.
//        Or a tiled copy (`idx_mode` 0; 4: uint8 codeword numbers): (ntiles, ncols, R) uint16, the R rows
//        of one tile adjacent for each column (rows past nvec: 0), codeword numbers or byte offsets into
//        the group's codebook (`idx_bytes`, where every offset fits 16 bits: no shift per vector)
//   cb   (G, k, VP)         float16  codewords zero-padded from v to VP lanes (VP in {4, 8, 16, 32}); or
//                           float32  (`cb_f32`, small codebooks: one load+FMA per vector, no conversion)
// One program computes RS rows x TT tokens of one tile over all columns with the accumulators in
// registers (RS*TT*NV <= 8; VP = 4: two rows per 8-lane register, `tile_pair`), then adds
// them to y; rows at or past nvec (the last tile's padding) are not stored, nor lanes at or past v (OUT).
// Measured on Zen3 (docs/LOG.md): float16 codebooks beat float32
// ones from k = 4096 up (half the cache footprint); float32 + byte offsets make the 256-entry residual
// pass 12-18% faster (a few % of a layer); one codebook per pass beats main + residual fused in one loop
// (fewer instructions per long-latency gather when a 65536-entry codebook misses L2).
//
// The AVX2/FMA/F16C code is compiled for that target only (function attributes, no -march), and chosen
// at run time by __builtin_cpu_supports; every other CPU runs the portable scalar loop. Threads: OpenMP
// over tiles, handed out one at a time (a thread the OS deschedules then holds back one tile, not half
// of the work), in a torch process the libgomp torch loaded, `nthreads` given by the caller.
#include <stdint.h>
#include <string.h>

#include <type_traits>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define VQ_X86 1
#endif

extern "C" {

struct VQPass {
  int32_t in_mode;       // 0: OUT layout, 1: IN layout
  int32_t T;             // tokens
  const float* x;        // OUT: column c of token t at x[t*ldx + c]; IN: x[t*ldx + c*v .. + v)
  int64_t ldx;
  const void* idx;       // idx_mode 0: (ntiles, ncols, R) uint16; 1 / 2: (G, nvec, group_size, S) uint16 / uint8
  int32_t ntiles, ncols, R;
  int32_t VP, v;         // lanes per codeword (padded), lanes stored per row (OUT) / x's per column (IN)
  const void* cb;        // (G, k, VP) float16 bits (or float32: cb_f32)
  int64_t cb_gstride;    // k * VP
  int32_t group_size;    // columns per group: the codebook advances every group_size columns
  float* y;              // OUT: y[t*ldy + r*v + i]; IN: y[t*ldy + r]
  int64_t ldy;
  int32_t nvec;          // valid rows (vector rows for OUT, output rows for IN)
  int32_t nthreads;
  int32_t cb_f32;        // 1: cb holds float32 codewords (small codebooks), 0: float16 bits
  int32_t idx_bytes;     // 1: idx holds byte offsets into the group's codebook, 0: codeword numbers
  int32_t idx_mode;      // 0: tiled uint16 copy; 1 / 2: the weight's own (G, nvec, group_size, S) uint16 / uint8;
                         // 3 (IN): the weight's own uint16 words of two uint8 codes, into cb and cb2;
                         // 4: a tiled uint8 copy of codeword numbers
  int32_t half_rows;     // idx_mode 1-3: one-token programs of half the rows (cpu.py decides)
  const void* idx2;      // IN only, or null: a second index stream laid out as idx (same mode), and
  const void* cb2;       // its codebook (k2, VP), same lanes and dtype: w = cb[idx] + cb2[idx2] (AQLM's M = 2)
  int32_t idx_cstride;   // idx_mode 1-3: S, index elements from one column to the next in a row (>= 1)
};

int vq_cpu_isa(void);
int vq_cpu_pass(const VQPass* p, int force_scalar);
}

// ------------------------------------------------------------------------------------------ scalar
static float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);  // normal: rebias 15 -> 127
  } else if (man == 0) {
    bits = sign;  // +-0
  } else {  // subnormal: normalise
    int e = -1;
    do { man <<= 1; ++e; } while (!(man & 0x400));
    bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3FF) << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

// index of row r of `tile`, column c (r < R, tile * R + r < nvec) in stream idx (a.idx or a.idx2)
static int64_t index_at(const VQPass& a, const void* idx, int tile, int r, int c) {
  if (a.idx_mode == 0) return ((const uint16_t*)idx)[((int64_t)tile * a.ncols + c) * a.R + r];
  if (a.idx_mode == 4) return ((const uint8_t*)idx)[((int64_t)tile * a.ncols + c) * a.R + r];
  const int64_t g = c / a.group_size, e = ((g * a.nvec + (int64_t)tile * a.R + r) * a.group_size + c % a.group_size) *
                                          a.idx_cstride;
  return a.idx_mode == 2 ? ((const uint8_t*)idx)[e] : ((const uint16_t*)idx)[e];
}

static void tile_scalar(const VQPass& a, int tile) {
  const int R = a.R, VP = a.VP;
  const int es = a.cb_f32 ? 4 : 2;  // bytes per codeword lane
  float acc[32], w[32];
  for (int r = 0; r < R; ++r) {
    const int row = tile * R + r;
    if (row >= a.nvec) break;
    for (int t = 0; t < a.T; ++t) {
      for (int i = 0; i < VP; ++i) acc[i] = 0.f;
      const char* cb = (const char*)a.cb;
      int gend = a.group_size;
      for (int c = 0; c < a.ncols; ++c) {
        if (c == gend) {
          cb += a.cb_gstride * es;
          gend += a.group_size;
        }
        int64_t ix = index_at(a, a.idx, tile, r, c), ix2 = a.idx2 ? index_at(a, a.idx2, tile, r, c) : 0;
        if (a.idx_mode == 3) {  // two uint8 codes in one uint16 word
          ix2 = ix >> 8;
          ix &= 0xFF;
        }
        const char* wp = cb + (a.idx_bytes ? ix : ix * VP * es);
        const char* wp2 = (const char*)a.cb2 + (a.idx_bytes ? ix2 : ix2 * VP * es);
        const int two = a.idx2 || a.idx_mode == 3;
        for (int i = 0; i < VP; ++i) {
          for (int s = 0; s <= two; ++s) {
            const char* p = s ? wp2 : wp;
            float f;
            if (a.cb_f32) {
              memcpy(&f, p + 4 * i, 4);
            } else {
              uint16_t h;
              memcpy(&h, p + 2 * i, 2);
              f = half_to_float(h);
            }
            w[i] = s ? w[i] + f : f;
          }
        }
        if (!a.in_mode) {
          const float xs = a.x[t * a.ldx + c];
          for (int i = 0; i < VP; ++i) acc[i] += xs * w[i];
        } else {
          const float* xv = a.x + t * a.ldx + (int64_t)c * a.v;
          for (int i = 0; i < a.v; ++i) acc[i] += xv[i] * w[i];
        }
      }
      if (!a.in_mode) {
        float* yp = a.y + t * a.ldy + (int64_t)row * a.v;
        for (int i = 0; i < a.v; ++i) yp[i] += acc[i];
      } else {
        float s = 0.f;
        for (int i = 0; i < VP; ++i) s += acc[i];
        a.y[t * a.ldy + row] += s;
      }
    }
  }
}

#ifdef VQ_X86
// ------------------------------------------------------------------------------------------ AVX2
#define VQ_AVX2 __attribute__((target("avx2,fma,f16c")))
#define VQ_UNROLL _Pragma("GCC unroll 16")

// L float lanes per register: 8 (ymm) or 4 (xmm, for VP == 4)
template <int L> struct Vec;
template <> struct Vec<8> {
  typedef __m256 T;
  typedef __m256i M;
  static VQ_AVX2 inline T zero() { return _mm256_setzero_ps(); }
  static VQ_AVX2 inline T load(const float* p) { return _mm256_loadu_ps(p); }
  static VQ_AVX2 inline T loadh(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
  static VQ_AVX2 inline T bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static VQ_AVX2 inline T add(T a, T b) { return _mm256_add_ps(a, b); }
  static VQ_AVX2 inline T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static VQ_AVX2 inline M first(int n) {  // lanes i < n
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static VQ_AVX2 inline T mload(const float* p, M m) { return _mm256_maskload_ps(p, m); }
  static VQ_AVX2 inline void mstore(float* p, M m, T a) { _mm256_maskstore_ps(p, m, a); }
  static VQ_AVX2 inline float hsum(T a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
};
template <> struct Vec<4> {
  typedef __m128 T;
  typedef __m128i M;
  static VQ_AVX2 inline T zero() { return _mm_setzero_ps(); }
  static VQ_AVX2 inline T load(const float* p) { return _mm_loadu_ps(p); }
  static VQ_AVX2 inline T loadh(const uint16_t* p) { return _mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)p)); }
  static VQ_AVX2 inline T bcast(const float* p) { return _mm_broadcast_ss(p); }
  static VQ_AVX2 inline T add(T a, T b) { return _mm_add_ps(a, b); }
  static VQ_AVX2 inline T fma(T a, T b, T c) { return _mm_fmadd_ps(a, b, c); }
  static VQ_AVX2 inline M first(int n) { return _mm_cmpgt_epi32(_mm_set1_epi32(n), _mm_setr_epi32(0, 1, 2, 3)); }
  static VQ_AVX2 inline T mload(const float* p, M m) { return _mm_maskload_ps(p, m); }
  static VQ_AVX2 inline void mstore(float* p, M m, T a) { _mm_maskstore_ps(p, m, a); }
  static VQ_AVX2 inline float hsum(T s) {
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
};

// One index stream walked column by column for RS rows of a tile, with the codebook it indexes (the group's:
// it advances every group_size columns). IA 0: a tiled uint16 copy (ntiles, ncols, R), the tile's rows
// adjacent per column (5: uint8); 1 / 2: the weight's own (G, nvec, gs, S) uint16 / uint8 indices, each row
// its own stream (rows past nvec read row nvec - 1: not stored). OFF: the indices are byte offsets into the codebook.
template <int IA, int RS, int VP, int ES, bool OFF>
struct Stream {
  static constexpr bool TILED = IA == 0 || IA == 5;  // 5: a tiled uint8 copy
  typedef typename std::conditional<IA == 2 || IA == 5, uint8_t, uint16_t>::type IT;
  const IT* ip;
  const char* cb;
  int64_t roff[RS];
  int64_t gstride, gjump;  // bytes from one group's codebook to the next; row r's end in group g -> its start in g+1
  int gend, gs, cstep;
  VQ_AVX2 inline Stream(const VQPass& a, const void* idx, const void* codebook, int tile, int r0)
      : ip((const IT*)idx + (TILED ? (int64_t)tile * a.ncols * a.R + r0 : 0)),
        cb((const char*)codebook),
        gstride(a.cb_gstride * ES),
        gjump(TILED ? 0 : (int64_t)(a.nvec - 1) * a.group_size * a.idx_cstride),
        gend(a.group_size),
        gs(a.group_size),
        cstep(TILED ? a.R : a.idx_cstride) {
    VQ_UNROLL for (int r = 0; r < RS; ++r) {
      const int row = tile * a.R + r0 + r;
      roff[r] = TILED ? r : (int64_t)(row < a.nvec ? row : a.nvec - 1) * a.group_size * a.idx_cstride;
    }
  }
  // at column c (every column, in order): where c starts a group, that group's codebook and indices
  VQ_AVX2 inline void at(int c) {
    if (c == gend) {
      cb += gstride;
      gend += gs;
      ip += gjump;
    }
  }
  VQ_AVX2 inline void next() { ip += cstep; }
  // row r's codeword at the current column
  VQ_AVX2 inline const char* word(int r) const {
    return cb + (OFF ? (size_t)ip[roff[r]] : (size_t)ip[roff[r]] * (VP * ES));
  }
  // row r's index at the current column
  VQ_AVX2 inline size_t index(int r) const { return ip[roff[r]]; }
};

// rows r0 .. r0+RS of `tile` x tokens t0 .. t0+TT; NV registers of L lanes per codeword (VP = L*NV).
// Every loop over RS/TT/NV is unrolled, so `acc` lives in registers (an indexed access would make GCC
// keep it in memory and store it on every column: measured 2x slower).
template <int L, int NV, int RS, int TT, int IN, bool F32, bool OFF, int IM, int DUO>
VQ_AVX2 static void tile_avx2(const VQPass& a, int tile, int r0, int t0) {
  typedef Vec<L> V;
  typedef typename V::T reg;
  constexpr int VP = L * NV;
  const int R = a.R, ncols = a.ncols;
  const int64_t ldx = a.ldx;
  reg acc[RS][TT][NV];
  VQ_UNROLL for (int r = 0; r < RS; ++r)
    VQ_UNROLL for (int t = 0; t < TT; ++t)
      VQ_UNROLL for (int j = 0; j < NV; ++j) acc[r][t][j] = V::zero();
  constexpr int ES = F32 ? 4 : 2;  // bytes per codeword lane
  // DUO: a second codebook summed into each codeword (IN: one group), its stream laid out as the first
  Stream<IM, RS, VP, ES, OFF> s(a, a.idx, a.cb, tile, r0);
  Stream<IM, RS, VP, ES, OFF> s2(a, DUO == 1 ? a.idx2 : a.idx, DUO == 1 ? a.cb2 : a.cb, tile, r0);  // DUO 1 only
  const float* xp = a.x + (int64_t)t0 * ldx;
  typename V::M mask[NV];  // lanes < v: OUT, of y; IN == 2, of x
  VQ_UNROLL for (int j = 0; j < NV; ++j) mask[j] = V::first(a.v - j * L);
  for (int c = 0; c < ncols; ++c) {
    s.at(c);
    reg xv[TT][IN ? NV : 1];
    VQ_UNROLL for (int t = 0; t < TT; ++t) {
      if (IN == 1) {  // v == VP
        VQ_UNROLL for (int j = 0; j < NV; ++j) xv[t][j] = V::load(xp + t * ldx + (int64_t)c * VP + j * L);
      } else if (IN == 2) {  // v < VP floats per column: the lanes past v load as 0
        VQ_UNROLL for (int j = 0; j < NV; ++j) xv[t][j] = V::mload(xp + t * ldx + (int64_t)c * a.v + j * L, mask[j]);
      } else {
        xv[t][0] = V::bcast(xp + t * ldx + c);
      }
    }
    VQ_UNROLL for (int r = 0; r < RS; ++r) {
      const char* wp = s.word(r);
      const char* wp2 = DUO == 1 ? s2.word(r) : nullptr;
      if (DUO == 2) {  // one uint16 word, two uint8 codes
        const size_t i = s.index(r);
        wp = s.cb + (i & 0xFF) * (VP * ES);
        wp2 = (const char*)a.cb2 + (i >> 8) * (VP * ES);
      }
      VQ_UNROLL for (int j = 0; j < NV; ++j) {
        reg w = F32 ? V::load((const float*)wp + j * L) : V::loadh((const uint16_t*)wp + j * L);
        if (DUO) w = V::add(w, F32 ? V::load((const float*)wp2 + j * L) : V::loadh((const uint16_t*)wp2 + j * L));
        VQ_UNROLL for (int t = 0; t < TT; ++t) acc[r][t][j] = V::fma(w, xv[t][IN ? j : 0], acc[r][t][j]);
      }
    }
    s.next();
    if (DUO == 1) s2.next();  // only where it is read: GCC did not always drop an unused stream's advance
                              // (v4 4096 x 11008 batch 1 15 % slower, tiled 1x16 3-12 %; docs/LOG.md)
  }
  VQ_UNROLL for (int r = 0; r < RS; ++r) {
    const int row = tile * R + r0 + r;
    if (row < a.nvec) {
      VQ_UNROLL for (int t = 0; t < TT; ++t) {
        if (!IN) {
          float* yp = a.y + (int64_t)(t0 + t) * a.ldy + (int64_t)row * a.v;
          VQ_UNROLL for (int j = 0; j < NV; ++j)
            V::mstore(yp + j * L, mask[j], V::add(V::mload(yp + j * L, mask[j]), acc[r][t][j]));
        } else {
          reg s = acc[r][t][0];
          VQ_UNROLL for (int j = 1; j < NV; ++j) s = V::add(s, acc[r][t][j]);
          a.y[(int64_t)(t0 + t) * a.ldy + row] += V::hsum(s);
        }
      }
    }
  }
}

// Two 4-lane codewords (rows r and r+1) in one 8-lane register, float32 or float16 bits
template <bool F32>
VQ_AVX2 static inline __m256 pair4(const char* w0, const char* w1) {
  if (F32) {
    const __m256 lo = _mm256_castps128_ps256(_mm_loadu_ps((const float*)w0));
    return _mm256_insertf128_ps(lo, _mm_loadu_ps((const float*)w1), 1);
  }
  const __m128d lo = _mm_castsi128_pd(_mm_loadl_epi64((const __m128i*)w0));
  return _mm256_cvtph_ps(_mm_castpd_si128(_mm_loadh_pd(lo, (const double*)w1)));
}

// VP == 4: two rows per 8-lane register (row 2p in lanes 0-3, row 2p+1 in lanes 4-7), so one float16
// conversion and one FMA serve two vectors (the 4-lane loop spent one of each per vector; measured,
// docs/LOG.md, 2026-12-07 21:50 UTC session), with the same products in the same order per lane.
//   OUT (IN == 0, v <= 4): x[t, c] broadcast to all 8 lanes; each half added to its row's v outputs.
//   IN (g <= 4): a column's x (g floats, masked where g < 4: IN == 2) in both halves; each half summed as
//     Vec<4>::hsum sums the 4-lane loop's register, so the same result bit for bit; DUO as in tile_avx2.
template <int RS, int TT, int IN, bool F32, bool OFF, int IM, int DUO>
VQ_AVX2 static void tile_pair(const VQPass& a, int tile, int r0, int t0) {
  static_assert(RS % 2 == 0, "rows come in pairs");
  constexpr int NP = RS / 2, VP = 4, ES = F32 ? 4 : 2;
  const int R = a.R, ncols = a.ncols;
  const int64_t ldx = a.ldx;
  __m256 acc[NP][TT];
  VQ_UNROLL for (int p = 0; p < NP; ++p)
    VQ_UNROLL for (int t = 0; t < TT; ++t) acc[p][t] = _mm256_setzero_ps();
  Stream<IM, RS, VP, ES, OFF> s(a, a.idx, a.cb, tile, r0);
  Stream<IM, RS, VP, ES, OFF> s2(a, DUO == 1 ? a.idx2 : a.idx, DUO == 1 ? a.cb2 : a.cb, tile, r0);  // DUO 1 only
  const __m128i mask = Vec<4>::first(a.v);  // OUT: y's lanes; IN == 2: x's
  const float* xp = a.x + (int64_t)t0 * ldx;
  for (int c = 0; c < ncols; ++c) {
    s.at(c);
    __m256 xv[TT];
    VQ_UNROLL for (int t = 0; t < TT; ++t) {
      if (IN == 0) {
        xv[t] = _mm256_broadcast_ss(xp + t * ldx + c);
      } else {
        const __m128 h = IN == 1 ? _mm_loadu_ps(xp + t * ldx + (int64_t)c * VP)
                                 : _mm_maskload_ps(xp + t * ldx + (int64_t)c * a.v, mask);
        xv[t] = _mm256_insertf128_ps(_mm256_castps128_ps256(h), h, 1);
      }
    }
    VQ_UNROLL for (int p = 0; p < NP; ++p) {
      const char *w0 = s.word(2 * p), *w1 = s.word(2 * p + 1), *v0 = nullptr, *v1 = nullptr;
      if (DUO == 1) {
        v0 = s2.word(2 * p);
        v1 = s2.word(2 * p + 1);
      } else if (DUO == 2) {  // one uint16 word, two uint8 codes
        const size_t i0 = s.index(2 * p), i1 = s.index(2 * p + 1);
        w0 = s.cb + (i0 & 0xFF) * (VP * ES);
        w1 = s.cb + (i1 & 0xFF) * (VP * ES);
        v0 = (const char*)a.cb2 + (i0 >> 8) * (VP * ES);
        v1 = (const char*)a.cb2 + (i1 >> 8) * (VP * ES);
      }
      __m256 w = pair4<F32>(w0, w1);
      if (DUO) w = _mm256_add_ps(w, pair4<F32>(v0, v1));
      VQ_UNROLL for (int t = 0; t < TT; ++t) acc[p][t] = _mm256_fmadd_ps(w, xv[t], acc[p][t]);
    }
    s.next();
    if (DUO == 1) s2.next();
  }
  VQ_UNROLL for (int p = 0; p < NP; ++p) {
    VQ_UNROLL for (int h = 0; h < 2; ++h) {
      const int row = tile * R + r0 + 2 * p + h;
      if (row >= a.nvec) continue;
      VQ_UNROLL for (int t = 0; t < TT; ++t) {
        const __m128 half = h ? _mm256_extractf128_ps(acc[p][t], 1) : _mm256_castps256_ps128(acc[p][t]);
        if (IN == 0) {
          float* yp = a.y + (int64_t)(t0 + t) * a.ldy + (int64_t)row * a.v;
          _mm_maskstore_ps(yp, mask, _mm_add_ps(_mm_maskload_ps(yp, mask), half));
        } else {
          a.y[(int64_t)(t0 + t) * a.ldy + row] += Vec<4>::hsum(half);
        }
      }
    }
  }
}

// RS rows per program from the token chunk and the codeword width: RS*TT*NV <= 8 accumulators. One token
// reading the weight's own indices with `half_rows` (IM 3 / 4: IM 1 / 2 so marked; cpu.py sets it for a
// codebook that nearly fills the L2): RS/2 rows, half as many index streams competing with the codebook
// for the L2 (measured, docs/LOG.md, 2026-12-07 21:50 UTC session)
template <int L, int NV, int TT, int IN, bool F32, bool OFF, int IM, int DUO>
VQ_AVX2 static void tile_rows(const VQPass& a, int tile, int t0) {
  constexpr int RS0 = 8 / (TT * NV);
  constexpr int RS1 = RS0 < 1 ? 1 : RS0;
  constexpr int RS = RS1 > 1 && (IM == 3 || IM == 4) && TT == 1 ? RS1 / 2 : RS1;
  constexpr int IMI = IM == 3 || IM == 4 ? IM - 2 : IM;  // the index layout
  if constexpr (L == 4 && NV == 1) {  // two rows per register: 16 rows' worth of accumulators; IN keeps 8
    // rows at one token even where half rows are asked (AQLM g <= 4 in place: 8-13 % faster than 4, docs/LOG.md)
    constexpr int RP0 = 16 / TT > 8 ? 8 : 16 / TT;
    constexpr int RP = (IM == 3 || IM == 4) && TT == 1 && !IN ? RP0 / 2 : RP0;
    for (int r0 = 0; r0 < a.R; r0 += RP) tile_pair<RP, TT, IN, F32, OFF, IMI, DUO>(a, tile, r0, t0);
    return;
  }
  for (int r0 = 0; r0 < a.R; r0 += RS) tile_avx2<L, NV, RS, TT, IN, F32, OFF, IMI, DUO>(a, tile, r0, t0);
}

// tokens in chunks of 4, then 2, then 1
template <int L, int NV, int IN, bool F32, bool OFF, int IM, int DUO = 0>
VQ_AVX2 static void tile_tokens(const VQPass& a, int tile) {
  int t0 = 0;
  for (; t0 + 4 <= a.T; t0 += 4) tile_rows<L, NV, 4, IN, F32, OFF, IM, DUO>(a, tile, t0);
  if (a.T - t0 >= 2) {
    tile_rows<L, NV, 2, IN, F32, OFF, IM, DUO>(a, tile, t0);
    t0 += 2;
  }
  if (a.T - t0 >= 1) tile_rows<L, NV, 1, IN, F32, OFF, IM, DUO>(a, tile, t0);
}

typedef void (*tile_fn)(const VQPass&, int);

// IN (AQLM-style) passes: one stream or two (`idx2`), tiled (codeword numbers or byte offsets) or the
// weight's own uint16 / uint8 codes (IM 1 / 2; 3 / 4: half rows)
template <int L, int NV, int X, bool F32, int IM>
static tile_fn pick_in_x(const VQPass& a) {
  if (a.idx2) return a.idx_bytes ? &tile_tokens<L, NV, X, F32, true, IM, 1> : &tile_tokens<L, NV, X, F32, false, IM, 1>;
  return a.idx_bytes ? &tile_tokens<L, NV, X, F32, true, IM> : &tile_tokens<L, NV, X, F32, false, IM>;
}

// X 1: x holds VP = v floats per column; 2: v < VP (masked loads)
template <int L, int NV, bool F32, int IM>
static tile_fn pick_in(const VQPass& a) {
  return a.v == a.VP ? pick_in_x<L, NV, 1, F32, IM>(a) : pick_in_x<L, NV, 2, F32, IM>(a);
}

// tiled copies: IN or OUT, codeword numbers or byte offsets; the weight's own indices: codeword numbers
template <int L, int NV, bool F32>
static tile_fn pick_mode(const VQPass& a) {
  const bool big = a.half_rows != 0;
  switch (a.idx_mode) {
    case 0:
      if (a.in_mode) return pick_in<L, NV, F32, 0>(a);
      return a.idx_bytes ? &tile_tokens<L, NV, false, F32, true, 0> : &tile_tokens<L, NV, false, F32, false, 0>;
    case 1:
      if (a.in_mode) return big ? pick_in<L, NV, F32, 3>(a) : pick_in<L, NV, F32, 1>(a);
      return big ? &tile_tokens<L, NV, false, F32, false, 3> : &tile_tokens<L, NV, false, F32, false, 1>;
    case 2:
      if (a.in_mode) return big ? pick_in<L, NV, F32, 4>(a) : pick_in<L, NV, F32, 2>(a);
      return big ? &tile_tokens<L, NV, false, F32, false, 4> : &tile_tokens<L, NV, false, F32, false, 2>;
    case 4:  // a tiled uint8 copy, codeword numbers
      if (a.idx_bytes) return nullptr;
      if (a.in_mode) return pick_in<L, NV, F32, 5>(a);
      return &tile_tokens<L, NV, false, F32, false, 5>;
    case 3:  // IN: uint16 words of two uint8 codes
      if (a.v != a.VP) return big ? &tile_tokens<L, NV, 2, F32, false, 3, 2> : &tile_tokens<L, NV, 2, F32, false, 1, 2>;
      return big ? &tile_tokens<L, NV, 1, F32, false, 3, 2> : &tile_tokens<L, NV, 1, F32, false, 1, 2>;
    default: return nullptr;
  }
}

template <int L, int NV>
static tile_fn pick_cb(const VQPass& a) {
  return a.cb_f32 ? pick_mode<L, NV, true>(a) : pick_mode<L, NV, false>(a);
}

static tile_fn pick_avx2(const VQPass& a) {
  if (a.R % 8 != 0) return nullptr;  // RS divides 8
  switch (a.VP) {
    case 4: return pick_cb<4, 1>(a);
    case 8: return pick_cb<8, 1>(a);
    case 16: return pick_cb<8, 2>(a);
    case 32: return pick_cb<8, 4>(a);
    default: return nullptr;
  }
}
#endif  // VQ_X86

// ------------------------------------------------------------------------------------------ entry
// 2: AVX2 + FMA + F16C available, 0: the scalar loop only
int vq_cpu_isa(void) {
#ifdef VQ_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return 2;
#endif
  return 0;
}

// y += this pass's product. Returns the path taken (2 AVX2, 0 scalar), or -1 for bad arguments.
int vq_cpu_pass(const VQPass* ap, int force_scalar) {
  const VQPass& a = *ap;
  if (a.T < 1 || a.R < 1 || a.VP < 1 || a.VP > 32 || a.v < 1 || a.v > a.VP || a.group_size < 1 || a.ntiles < 0 ||
      a.ncols < 0 || a.idx_mode < 0 || a.idx_mode > 4 || (a.idx2 && (!a.in_mode || !a.cb2)) ||
      (a.idx_mode == 4 && a.idx_bytes) ||
      (a.idx_mode == 3 && (!a.in_mode || a.idx2 || !a.cb2)) ||
      (a.idx_mode != 0 && a.idx_mode != 4 &&
       (a.idx_bytes || a.nvec < 1 || a.idx_cstride < 1 || a.ncols % a.group_size != 0 ||
        (a.in_mode && a.group_size != a.ncols))))
    return -1;
  void (*fn)(const VQPass&, int) = tile_scalar;
  int isa = 0;
#ifdef VQ_X86
  if (!force_scalar && vq_cpu_isa() == 2) {
    tile_fn f = pick_avx2(a);
    if (f) {
      fn = f;
      isa = 2;
    }
  }
#endif
  const int n = a.ntiles, nt = a.nthreads < 1 ? 1 : a.nthreads;
  if (nt == 1 || n < 2) {
    for (int i = 0; i < n; ++i) fn(a, i);
  } else {
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int i = 0; i < n; ++i) fn(a, i);
  }
  return isa;
}
