/* Weight gradient of a depthwise (one filter per channel) stride-1 convolution, fp32, CPU.
 *
 * Built on first use by ops/_native.py and called through ctypes from ops/dwconv/__init__.py.
 * gw[c, i, j] = sum over n, ho, wo of g[n, c, ho, wo] * x[n, c, ho - ph + i dh, wo - pw + j dw]. The OpenMP
 * tasks are channels (or blocks of a vector's channels): no two threads write one filter.
 * NCHW (mz_dw_weight_grad): per channel and image, the input plane is copied into a zero-bordered buffer
 * and the gradient plane into one whose rows are whole vectors (zero tails), so every tap of a kernel row
 * is a vector product of a gradient row with a shifted input row, without bounds checks; up to 8 taps
 * accumulate in registers over the output rows.
 * NHWC (mz_dw_weight_grad_nhwc, channels-last maps): vectors run over a block of channels; per image,
 * output row and kernel row, the block's input row is copied into a zero-bordered buffer and up to 8 taps
 * accumulate in registers along the output row. oneDNN's depthwise weight
 * gradient, which this replaces, runs at a few GFLOP/s on CPU (7x7 filters at 14x14: 3.8 ms where the
 * forward takes 1.1).
 */
#include <stdlib.h>
#include <omp.h>

#include "../_vec.h"

#define TB 8   /* taps of a kernel row accumulated at once */

/* part[j] += sum over the Ho rows of g row (vector v) times the input row shifted by j * dw, j < NJ */
#define TAPS(NJ)                                                                                  \
    static void taps_##NJ(const float *gp, long gs, const float *xr, long xs, int Ho, int dw,     \
                          vf *part) {                                                            \
        vf a[NJ];                                                                                 \
        for (int j = 0; j < NJ; j++) a[j] = (vf){0};                                              \
        for (int ho = 0; ho < Ho; ho++) {                                                         \
            const vf gv = *(const vf *)(gp + ho * gs);                                            \
            for (int j = 0; j < NJ; j++) a[j] += gv * vload(xr + ho * xs + j * dw);               \
        }                                                                                         \
        for (int j = 0; j < NJ; j++) part[j] += a[j];                                             \
    }
TAPS(1) TAPS(2) TAPS(3) TAPS(4) TAPS(5) TAPS(6) TAPS(7) TAPS(8)

/* fn_<nj>(args), nj in 1..8: the variant whose accumulators fit its tap count */
#define BY_TAPS(fn, nj, ...)                                                                      \
    switch (nj) {                                                                                 \
    case 1: fn##_1(__VA_ARGS__); break;                                                           \
    case 2: fn##_2(__VA_ARGS__); break;                                                           \
    case 3: fn##_3(__VA_ARGS__); break;                                                           \
    case 4: fn##_4(__VA_ARGS__); break;                                                           \
    case 5: fn##_5(__VA_ARGS__); break;                                                           \
    case 6: fn##_6(__VA_ARGS__); break;                                                           \
    case 7: fn##_7(__VA_ARGS__); break;                                                           \
    default: fn##_8(__VA_ARGS__); break;                                                          \
    }

static void taps(int nj, const float *gp, long gs, const float *xr, long xs, int Ho, int dw, vf *part) {
    BY_TAPS(taps, nj, gp, gs, xr, xs, Ho, dw, part)
}

/* part[j] += sum over wo < Wo of g[wo] (vector stride gs) times row[wo + j * dw] (a zero-bordered row of
 * vectors), j < NJ; nc < VL: the channel block's last vector, read lane by lane (g's row ends there) */
#define ROW_TAPS(NJ)                                                                              \
    static void row_taps_##NJ(const float *g, long gs, int nc, const vf *row, int Wo, int dw,     \
                              vf *part) {                                                        \
        vf a[NJ];                                                                                 \
        for (int j = 0; j < NJ; j++) a[j] = (vf){0};                                              \
        for (int wo = 0; wo < Wo; wo++) {                                                         \
            vf gv = {0};                                                                          \
            if (nc == VL)                                                                         \
                gv = vload(g + wo * gs);                                                          \
            else                                                                                  \
                memcpy(&gv, g + wo * gs, nc * sizeof(float));                                     \
            for (int j = 0; j < NJ; j++) a[j] += gv * row[wo + j * dw];                           \
        }                                                                                         \
        for (int j = 0; j < NJ; j++) part[j] += a[j];                                             \
    }
ROW_TAPS(1) ROW_TAPS(2) ROW_TAPS(3) ROW_TAPS(4) ROW_TAPS(5) ROW_TAPS(6) ROW_TAPS(7) ROW_TAPS(8)

static void row_taps(int nj, const float *g, long gs, int nc, const vf *row, int Wo, int dw, vf *part) {
    BY_TAPS(row_taps, nj, g, gs, nc, row, Wo, dw, part)
}

/* x (N, C, H, W) and g (N, C, Ho, Wo) contiguous, Ho = H + 2 ph - (kh - 1) dh (stride 1), same for W;
 * writes gw (C, kh, kw). Returns 1 if a thread could not allocate its buffers, else 0. */
int mz_dw_weight_grad(const float *x, const float *g, float *gw, int N, int C, int H, int W, int kh, int kw,
                      int ph, int pw, int dh, int dw, int n_threads) {
    const int Ho = H + 2 * ph - (kh - 1) * dh, Wo = W + 2 * pw - (kw - 1) * dw;
    const int nv = (Wo + VL - 1) / VL;                   /* vectors per gradient row */
    const long gs = (long)nv * VL;                       /* gradient buffer row stride */
    const long xs = gs + (long)(kw - 1) * dw;            /* input buffer row stride: every shifted read inside */
    const long xrows = H + 2 * ph;
    int failed = 0;
#pragma omp parallel num_threads(n_threads)
    {
        float *xp = zalloc(xrows * xs * sizeof(float)), *gp = zalloc(Ho * gs * sizeof(float));
        vf *part = zalloc((size_t)kh * kw * sizeof(vf));
        if (all_allocated(xp && gp && part, &failed)) {
#pragma omp for schedule(static)
            for (int c = 0; c < C; c++) {
                memset(part, 0, (size_t)kh * kw * sizeof(vf));
                for (int n = 0; n < N; n++) {
                    const float *xc = x + ((long)n * C + c) * H * W, *gc = g + ((long)n * C + c) * Ho * Wo;
                    for (int r = 0; r < H; r++)   /* the borders stay zero from the allocation */
                        memcpy(xp + (r + ph) * xs + pw, xc + (long)r * W, W * sizeof(float));
                    for (int r = 0; r < Ho; r++)
                        memcpy(gp + r * gs, gc + (long)r * Wo, Wo * sizeof(float));
                    for (int i = 0; i < kh; i++)
                        for (int v = 0; v < nv; v++)
                            for (int j0 = 0; j0 < kw; j0 += TB)
                                taps(kw - j0 < TB ? kw - j0 : TB, gp + v * VL, gs,
                                     xp + (long)i * dh * xs + v * VL + (long)j0 * dw, xs, Ho, dw,
                                     part + i * kw + j0);
                }
                for (int t = 0; t < kh * kw; t++)
                    gw[(long)c * kh * kw + t] = hsum(part[t]);
            }
        }
        free(xp);
        free(gp);
        free(part);
    }
    return failed;
}

/* The same for channels-last maps: x (N, H, W, C) and g (N, Ho, Wo, C) contiguous; writes gw (C, kh, kw). */
int mz_dw_weight_grad_nhwc(const float *x, const float *g, float *gw, int N, int C, int H, int W, int kh, int kw,
                           int ph, int pw, int dh, int dw, int n_threads) {
    const int Ho = H + 2 * ph - (kh - 1) * dh, Wo = W + 2 * pw - (kw - 1) * dw;
    const int nb = (C + VL - 1) / VL;                    /* channel blocks */
    const int rw = W + 2 * pw;                           /* vectors in a bordered input row */
    int failed = 0;
#pragma omp parallel num_threads(n_threads)
    {
        vf *row = zalloc((size_t)rw * sizeof(vf)), *part = zalloc((size_t)kh * kw * sizeof(vf));
        if (all_allocated(row && part, &failed)) {
#pragma omp for schedule(static)
            for (int b = 0; b < nb; b++) {
                const int c0 = b * VL, nc = C - c0 < VL ? C - c0 : VL;
                memset(part, 0, (size_t)kh * kw * sizeof(vf));
                for (int n = 0; n < N; n++)
                    for (int ho = 0; ho < Ho; ho++)
                        for (int i = 0; i < kh; i++) {
                            const int hi = ho - ph + i * dh;
                            if (hi < 0 || hi >= H)
                                continue;
                            const float *xr = x + (((long)n * H + hi) * W) * C + c0;
                            for (int w = 0; w < W; w++)   /* the borders (and lanes past nc) stay zero */
                                memcpy(row + pw + w, xr + (long)w * C, nc * sizeof(float));
                            const float *gr = g + (((long)n * Ho + ho) * Wo) * C + c0;
                            for (int j0 = 0; j0 < kw; j0 += TB)
                                row_taps(kw - j0 < TB ? kw - j0 : TB, gr, C, nc, row + (long)j0 * dw, Wo, dw,
                                         part + i * kw + j0);
                        }
                for (int c = 0; c < nc; c++)
                    for (int t = 0; t < kh * kw; t++)
                        gw[(long)(c0 + c) * kh * kw + t] = part[t][c];
            }
        }
        free(row);
        free(part);
    }
    return failed;
}
