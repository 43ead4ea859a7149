/* Neighborhood attention forward without extra keys (NAT / DiNAT inference), fp32, CPU: for every query the
 * logits of its kernel x kernel window (q . k * scale + relative-position bias), their softmax and the weighted
 * sum of the window's values, in one pass per query while its window is in cache.
 *
 * Built on first use by ops/_native.py and called through ctypes from ops/neighborhood/cpu.py. Why: the blocked
 * PyTorch path computes four times the products it keeps (a tile's queries against its whole key region) and
 * gathers tiles, slots and probabilities around them (gathers, scatters, fills and copies: 27% of NAT-T's
 * batch-8 forward; its batched products, most of them discarded, another 16%). Here a query's window costs
 * its k*k dot products and k*k value rows, nothing else.
 *
 * The window geometry comes from Python (ops/neighborhood/geometry.axis_windows, so both borders and any
 * dilation are the same as every other backend's): per map row / column the k key positions, whether each is
 * a window slot (``valid``) and its relative-position index into the (2k-1) x (2k-1) bias table. Strides are in
 * elements, (b, head, y, x) for q, k, v and out; the head dimension is contiguous (stride 1).
 */
#include <math.h>
#include <stdlib.h>
#include <omp.h>

#include "../_vec.h"

/* q . key for four keys at once (one shuffle network for the four sums), D = full vectors + a scalar tail */
static inline void dot4(const float *restrict qa, int D, const float *const *kp, float *dst) {
    vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    int d = 0;
    for (; d + VL <= D; d += VL) {
        const vf x = *(const vf *)(qa + d);
        a0 += x * vload(kp[0] + d);
        a1 += x * vload(kp[1] + d);
        a2 += x * vload(kp[2] + d);
        a3 += x * vload(kp[3] + d);
    }
    const vf r = REDUCE4(a0, a1, a2, a3, vsum);
    for (int i = 0; i < 4; i++) {
        float t = r[4 * i];
        for (int e = d; e < D; e++) t += qa[e] * kp[i][e];
        dst[i] = t;
    }
}

int mz_neighborhood_forward(const float *q, const long *qs, const float *k, const long *ks, const float *v,
                            const long *vs, const float *rpb, float *out, const long *os, int B, int NH, int H,
                            int W, int D, int Dv, int K, const int *rpos, const int *rrel, const int *rvalid,
                            const int *cpos, const int *crel, const int *cvalid, float scale, int n_threads) {
    const int K2 = K * K, K2p = round_up(K2 + 3), T = 2 * K - 1;
    int failed = 0;
#pragma omp parallel num_threads(n_threads)
    {
        float *qa = zalloc((size_t)round_up(D) * sizeof(float)), *s = zalloc((size_t)K2p * sizeof(float));
        const float **kp = zalloc((size_t)(K2 + 3) * sizeof(float *));
        const float **vp = zalloc((size_t)K2 * sizeof(float *));
        float *bias = zalloc((size_t)K2 * sizeof(float));
        if (all_allocated(qa && s && kp && vp && bias, &failed)) {
#pragma omp for schedule(static)
            for (long task = 0; task < (long)B * NH * H; task++) {
                const int y = task % H, h = task / H % NH, b = task / H / NH;
                const float *kb = k + b * ks[0] + h * ks[1], *vb = v + b * vs[0] + h * vs[1];
                const float *table = rpb ? rpb + (long)h * T * T : NULL;
                const int *rp = rpos + y * K, *rr = rrel + y * K, *rv = rvalid + y * K;
                for (int x = 0; x < W; x++) {
                    const int *cp = cpos + x * K, *cr = crel + x * K, *cv = cvalid + x * K;
                    const float *qp = q + b * qs[0] + h * qs[1] + y * qs[2] + x * qs[3];
                    for (int d = 0; d < D; d++) qa[d] = qp[d];
                    int n = 0;   /* the window's slots (in-map keys), row-major */
                    for (int i = 0; i < K; i++) {
                        if (!rv[i]) continue;
                        for (int j = 0; j < K; j++) {
                            if (!cv[j]) continue;
                            kp[n] = kb + rp[i] * ks[2] + cp[j] * ks[3];
                            vp[n] = vb + rp[i] * vs[2] + cp[j] * vs[3];
                            bias[n++] = table ? table[rr[i] * T + cr[j]] : 0.0f;
                        }
                    }
                    for (int i = n; i < n + 3; i++) kp[i] = kp[0];   /* (dot4's padding slots) */
                    for (int i = 0; i < n; i += 4) dot4(qa, D, kp + i, s + i);
                    for (int i = 0; i < n; i++) s[i] = s[i] * scale + bias[i];
                    const float sum = exp_row(s, n, max_row(s, n, vsplat(-INFINITY)), (vf){0});
                    const float r = 1.0f / sum;
                    float *dst = out + b * os[0] + h * os[1] + y * os[2] + x * os[3];
                    int e = 0;
                    for (; e + VL <= Dv; e += VL) {
                        vf acc = {0};
                        for (int i = 0; i < n; i++) acc += vsplat(s[i]) * vload(vp[i] + e);
                        vstore(dst + e, acc * r);
                    }
                    for (; e < Dv; e++) {
                        float acc = 0;
                        for (int i = 0; i < n; i++) acc += s[i] * vp[i][e];
                        dst[e] = acc * r;
                    }
                }
            }
        }
        free(qa);
        free(s);
        free(kp);
        free(vp);
        free(bias);
    }
    return failed;
}
