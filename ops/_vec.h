/* Vector helpers shared by the zoo's C kernels (included by each kernel; ops/_native.py hashes it
 * with the kernel's source, so an edit rebuilds them). GCC vector extensions: AVX-512 / AVX2 / NEON as
 * -march gives; AVX-512 instructions where -march has them, else plain vector-extension code. */
#ifndef MZ_VEC_H
#define MZ_VEC_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define VL 16
typedef float vf __attribute__((vector_size(VL * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(VL * sizeof(int32_t))));

static inline int round_up(int n) { return (n + VL - 1) / VL * VL; }

static inline vf vsplat(float x) { return x - (vf){0}; }

static inline vf vload(const float *p) {   /* unaligned */
    vf x;
    memcpy(&x, p, sizeof x);
    return x;
}

static inline void vstore(float *p, vf x) { memcpy(p, &x, sizeof x); }

/* Lane masks, selects, reductions, exp: AVX-512 instructions where -march has them, else plain
 * vector-extension code (any target). ``lmask`` supports & and ~. */
#ifdef __AVX512F__
#include <immintrin.h>
typedef __mmask16 lmask;
static inline lmask lanes_below(int n) { return n >= VL ? 0xFFFF : n <= 0 ? 0 : (lmask)((1u << n) - 1); }
static inline vf vmax(vf a, vf b) { return (vf)_mm512_max_ps((__m512)a, (__m512)b); }
static inline vf vsel(lmask m, vf a, vf b) { return (vf)_mm512_mask_blend_ps(m, (__m512)b, (__m512)a); }
static inline float hsum(vf v) { return _mm512_reduce_add_ps((__m512)v); }
static inline float hmax(vf v) { return _mm512_reduce_max_ps((__m512)v); }
static inline vf vround(vf x) {
    return (vf)_mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static inline vf vscale2(vf p, vf n) { return (vf)_mm512_scalef_ps((__m512)p, (__m512)n); }   /* p 2^n */
#else
typedef vi lmask;
static const vi LANE = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
static inline lmask lanes_below(int n) { return LANE < n; }
static inline vf vsel(lmask m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
static inline vf vmax(vf a, vf b) { return vsel(a < b, b, a); }
#define SWAP(v, a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p) \
    __builtin_shufflevector(v, v, a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p)
#define HREDUCE(v, OP)                                                              \
    v = OP(v, SWAP(v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));      \
    v = OP(v, SWAP(v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));      \
    v = OP(v, SWAP(v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));      \
    v = OP(v, SWAP(v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
static inline vf vadd(vf a, vf b) { return a + b; }
static inline float hsum(vf v) { HREDUCE(v, vadd) return v[0]; }
static inline float hmax(vf v) { HREDUCE(v, vmax) return v[0]; }
static inline vf vround(vf x) { return (x + 12582912.0f) - 12582912.0f; }   /* |x| < 2^22 */
static inline vf vscale2(vf p, vf n) { return (vf)((vi)p + (__builtin_convertvector(n, vi) << 23)); }
#endif

static inline lmask lanes_in(int lo, int hi) { return lanes_below(hi) & ~lanes_below(lo); }

/* The first n (< VL) floats at p, the other lanes 0, reading nothing past p + n; and the store of the first n
 * lanes (a vector's worth of a row's tail). */
static inline vf vload_n(const float *p, int n) {
#ifdef __AVX512F__
    return (vf)_mm512_maskz_loadu_ps(lanes_below(n), p);
#else
    vf x = {0};
    memcpy(&x, p, (size_t)n * sizeof(float));
    return x;
#endif
}

static inline void vstore_n(float *p, vf x, int n) {
#ifdef __AVX512F__
    _mm512_mask_storeu_ps(p, lanes_below(n), (__m512)x);
#else
    memcpy(p, &x, (size_t)n * sizeof(float));
#endif
}

static inline vf vsum(vf a, vf b) { return a + b; }

/* Four reductions in one shuffle network (the cost of about one hsum / hmax): lanes 0, 4, 8 and 12
 * of the result hold OP over all lanes of a, b, c and d. */
#define SHUF2(x, y, ...) __builtin_shufflevector(x, y, __VA_ARGS__)
#define REDUCE4(a, b, c, d, OP) ({                                                                  \
    const vf ab = OP(SHUF2(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),           \
                     SHUF2(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31));     \
    const vf cd = OP(SHUF2(c, d, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),           \
                     SHUF2(c, d, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31));     \
    vf r_ = OP(SHUF2(ab, cd, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27),             \
               SHUF2(ab, cd, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31));           \
    r_ = OP(r_, SHUF2(r_, r_, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));               \
    OP(r_, SHUF2(r_, r_, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));                    \
})

/* exp for x <= 0 (arguments are logits minus their row maximum): 2^n p(r), r in [-ln2/2, ln2/2],
 * degree-7 Taylor polynomial (relative error < 1e-8 before rounding). Below -86 the result is
 * ~1e-38 of the row maximum's weight, i.e. zero for the sums it enters. */
static inline vf vexp(vf x) {
    x = vmax(x, vsplat(-86.0f));
    const vf n = vround(x * 1.44269504088896341f);
    const vf r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
    vf p = vsplat(1.0f / 5040);
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return vscale2(p, n);
}

/* ---- per-thread buffers ---- */

/* 64-byte aligned, zeroed; NULL if out of memory */
static inline void *zalloc(size_t bytes) {
    bytes = (bytes + 63) / 64 * 64;
    void *p = aligned_alloc(64, bytes ? bytes : 64);
    if (p)
        memset(p, 0, bytes);
    return p;
}

/* Inside a parallel region, every thread: whether all threads got their buffers (ok: this one did); a barrier */
static inline int all_allocated(int ok, int *failed) {
    if (!ok) {
#pragma omp atomic write
        *failed = 1;
    }
#pragma omp barrier
    int f;
#pragma omp atomic read
    f = *failed;
    return !f;
}

/* ---- packing strided operands for the small products below ---- */

/* dst[c * ld + r] = src[r * rs + c * cs] * scale (r < rows, c < cols): a strided matrix, transposed */
static inline void pack_transposed(float *restrict dst, long ld, const float *restrict src, long rs, long cs,
                                   int rows, int cols, float scale) {
    for (int c = 0; c < cols; c++)
        for (int r = 0; r < rows; r++) dst[c * ld + r] = src[r * rs + c * cs] * scale;
}

/* dst[r * ld + c] = src[r * rs + c * cs] (r < rows, c < cols): a strided matrix, row-major */
static inline void pack_rows(float *restrict dst, long ld, const float *restrict src, long rs, long cs, int rows,
                             int cols) {
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) dst[r * ld + c] = src[r * rs + c * cs];
}

/* ---- small products and softmax rows (the attention kernels') ---- */

/* C (MR x NV*VL) = A (MR x K, row stride lda) @ B (K x NV*VL, row stride ldb); B and C 64-byte
 * aligned. One function per tile shape so the accumulators live in registers. */
#define TILE(MR, NV)                                                                              \
    static void tile_##MR##x##NV(int K, const float *restrict A, long lda, const float *restrict B, \
                                 long ldb, float *restrict C, long ldc) {                         \
        vf acc[MR][NV];                                                                           \
        for (int i = 0; i < MR; i++)                                                              \
            for (int j = 0; j < NV; j++) acc[i][j] = (vf){0};                                     \
        for (int k = 0; k < K; k++) {                                                             \
            vf b[NV];                                                                             \
            for (int j = 0; j < NV; j++) b[j] = *(const vf *)(B + k * ldb + j * VL);              \
            for (int i = 0; i < MR; i++) {                                                        \
                vf a = vsplat(A[i * lda + k]);                                                    \
                for (int j = 0; j < NV; j++) acc[i][j] += a * b[j];                               \
            }                                                                                     \
        }                                                                                         \
        for (int i = 0; i < MR; i++)                                                              \
            for (int j = 0; j < NV; j++) *(vf *)(C + i * ldc + j * VL) = acc[i][j];               \
    }
TILE(4, 4) TILE(4, 3) TILE(8, 2) TILE(8, 1) TILE(1, 4) TILE(1, 3) TILE(1, 2) TILE(1, 1)

/* C (M x N) = A (M x K) @ B (K x N), N a multiple of VL. */
static void gemm(int M, int N, int K, const float *A, long lda, const float *B, long ldb, float *C, long ldc) {
    for (int j = 0; j < N; j += 4 * VL) {
        int nv = (N - j) / VL < 4 ? (N - j) / VL : 4, i = 0;
        const float *b = B + j;
        float *c = C + j;
        switch (nv) {
        case 4:
            for (; i + 4 <= M; i += 4) tile_4x4(K, A + i * lda, lda, b, ldb, c + i * ldc, ldc);
            for (; i < M; i++) tile_1x4(K, A + i * lda, lda, b, ldb, c + i * ldc, ldc);
            break;
        case 3:
            for (; i + 4 <= M; i += 4) tile_4x3(K, A + i * lda, lda, b, ldb, c + i * ldc, ldc);
            for (; i < M; i++) tile_1x3(K, A + i * lda, lda, b, ldb, c + i * ldc, ldc);
            break;
        case 2:
            for (; i + 8 <= M; i += 8) tile_8x2(K, A + i * lda, lda, b, ldb, c + i * ldc, ldc);
            for (; i < M; i++) tile_1x2(K, A + i * lda, lda, b, ldb, c + i * ldc, ldc);
            break;
        default:
            for (; i + 8 <= M; i += 8) tile_8x1(K, A + i * lda, lda, b, ldb, c + i * ldc, ldc);
            for (; i < M; i++) tile_1x1(K, A + i * lda, lda, b, ldb, c + i * ldc, ldc);
        }
    }
}

/* Softmax numerator of one row in place: s[0, n) = exp(s[0, n) - m), zero up to the next vector
 * boundary (s aligned, room for it); returns the sum, plus hsum(extra). */
static float exp_row(float *s, int n, float m, vf extra) {
    vf acc = extra;
    for (int i = 0; i < n; i += VL) {
        vf e = vsel(lanes_below(n - i), vexp(*(vf *)(s + i) - m), (vf){0});
        *(vf *)(s + i) = e;
        acc += e;
    }
    return hsum(acc);
}

/* max(s[0, n), lanes of init) */
static float max_row(const float *s, int n, vf init) {
    vf mv = init;
    for (int i = 0; i < n; i += VL) mv = vmax(mv, vsel(lanes_below(n - i), *(const vf *)(s + i), mv));
    return hmax(mv);
}

#endif
