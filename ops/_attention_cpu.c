/* Dense attention forward for short sequences, fp32, CPU: softmax(q k^T * scale + mask) v, one fused pass
 * per (batch, head).
 *
 * Built on first use by ops/_native.py and called through ctypes from ops/_attention.py (the route of
 * the zoo's window, routed and single-head attention in CPU inference). Per task the keys are packed
 * transposed and pre-scaled and the values packed row-major, both in L1/L2; then per block of query rows
 * one register-blocked product gives the logits, the mask is added, the softmax numerators and sums
 * are taken in place, and a second product with the values is written out divided by the sums, while
 * the block is still in cache. torch's CPU flash kernel ran 49-token windows at ~30 GFLOP/s here.
 * Strides are in elements, (b, h, row, column) for q, k, v, out and the mask (0 for a broadcast dim).
 */
#include <math.h>
#include <stdlib.h>
#include <omp.h>

#include "_vec.h"

#define RB 32   /* query rows per block */

int mz_attention_forward(const float *q, const long *qs, const float *k, const long *ks, const float *v,
                         const long *vs, const float *mask, const long *ms, float *out, const long *os, int B,
                         int H, int T, int L, int D, int Dv, float scale, int n_threads) {
    const int Lp = round_up(L), Dvp = round_up(Dv);
    int failed = 0;
#pragma omp parallel num_threads(n_threads)
    {
        float *kt = zalloc((size_t)D * Lp * sizeof(float)), *vp = zalloc((size_t)L * Dvp * sizeof(float));
        float *qa = zalloc((size_t)RB * D * sizeof(float)), *s = zalloc((size_t)RB * Lp * sizeof(float));
        float *o = zalloc((size_t)RB * Dvp * sizeof(float));
        if (all_allocated(kt && vp && qa && s && o, &failed)) {
#pragma omp for schedule(static)
            for (long bh = 0; bh < (long)B * H; bh++) {   /* (kt's and vp's row tails stay 0 from zalloc) */
                const int b = bh / H, h = bh % H;
                const float *kb = k + b * ks[0] + h * ks[1], *vb = v + b * vs[0] + h * vs[1];
                const float *qb = q + b * qs[0] + h * qs[1];
                pack_transposed(kt, Lp, kb, ks[2], ks[3], L, D, scale);
                pack_rows(vp, Dvp, vb, vs[2], vs[3], L, Dv);
                for (int t0 = 0; t0 < T; t0 += RB) {
                    const int rb = T - t0 < RB ? T - t0 : RB;
                    pack_rows(qa, D, qb + t0 * qs[2], qs[2], qs[3], rb, D);
                    gemm(rb, Lp, D, qa, D, kt, Lp, s, Lp);
                    float sum[RB];
                    for (int i = 0; i < rb; i++) {
                        float *row = s + (long)i * Lp;
                        if (mask) {
                            const float *mr = mask + b * ms[0] + h * ms[1] + (t0 + i) * ms[2];
                            for (int l = 0; l < L; l++) row[l] += mr[l * ms[3]];
                        }
                        sum[i] = exp_row(row, L, max_row(row, L, vsplat(-INFINITY)), (vf){0});
                    }
                    gemm(rb, Dvp, L, s, Lp, vp, Dvp, o, Dvp);
                    for (int i = 0; i < rb; i++) {
                        float *dst = out + b * os[0] + h * os[1] + (t0 + i) * os[2];
                        const float r = 1.0f / sum[i];
                        for (int e = 0; e < Dv; e++) dst[e * os[3]] = o[i * Dvp + e] * r;
                    }
                }
            }
        }
        free(kt);
        free(vp);
        free(qa);
        free(s);
        free(o);
    }
    return failed;
}
