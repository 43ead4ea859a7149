/* GELU with the tanh approximation (timm's GELUTanh, F.gelu(approximate='tanh')), fp32, CPU: the forward
 * and the backward, one pass over memory each.
 *
 * Built on first use by ops/_native.py and called through ctypes from ops/gelu/__init__.py.
 * gelu(x) = 0.5 x (1 + tanh(u)), u = sqrt(2 / pi) (x + 0.044715 x^3), is x s(2u) with s the logistic
 * sigmoid: one exp of a non-positive argument per element (s(z) = 1 / (1 + e^-|z|) for z >= 0, e^-|z| times
 * that below 0: no overflow, no cancellation near 0), where torch's kernel evaluates a vector tanh.
 * Backward: dgelu/dx = s + x s (1 - s) dz/dx, dz/dx = 2 sqrt(2 / pi) (1 + 3 * 0.044715 x^2), with s (1 - s)
 * as e^-|z| s(|z|)^2 (no 1 - s cancellation: torch's tanh form loses up to 1e-6 of the gradient there).
 * bf16 tensors take the same arithmetic in fp32 registers (the _bf16 entry points).
 * Beyond |z| = 86 the sigmoid is 0 or 1 and the second term is dropped (it is below 1e-35 there, and
 * x^2 would overflow for huge x); NaN inputs stay NaN in both directions.
 */
#include <stddef.h>
#include <omp.h>

#include "../_vec.h"

#define C0 1.5957691216057308f   /* 2 sqrt(2 / pi) */
#define C1 0.044715f
#define TAIL 86.0f

/* x s(z) (forward) or the derivative's factor s + x s (1 - s) dz/dx (backward) for one vector */
static inline vf gelu_vec(vf x, int grad) {
    const vf x2 = x * x;
    const vf z = C0 * x * (1.0f + C1 * x2);
    const vf az = vmax(z, -z);
    const vf e = vexp(-az);
    const vf r = 1.0f / (1.0f + e);                  /* s(|z|) */
    const vi pos = (vi)(z >= 0.0f), far = (vi)(az >= TAIL);
    const vf s = (vf)(((vi)r & pos) | ((vi)(e * r) & ~pos & ~far));   /* 0 in the negative tail */
    if (!grad)
        return x * s;
    const vf t = x * (e * r * r) * (C0 * (1.0f + 3.0f * C1 * x2));   /* s (1 - s) = e r^2 for either sign */
    return s + (vf)((vi)t & ~far);
}

/* y[i] = gelu(x[i]) (g == NULL) or y[i] = g[i] gelu'(x[i]), i < n */
static void run(const float *x, const float *g, float *y, long n, int n_threads) {
    const long chunk = 1 << 14;   /* elements per task: 64 KB of x */
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (long c = 0; c < n; c += chunk) {
        const long end = c + chunk < n ? c + chunk : n;
        long i = c;
        for (; i + VL <= end; i += VL) {
            const vf v = gelu_vec(vload(x + i), g != NULL);
            vstore(y + i, g != NULL ? v * vload(g + i) : v);
        }
        if (i < end) {   /* the last partial vector, through a zero-padded copy */
            vf xv = {0}, gv = {0};
            memcpy(&xv, x + i, (end - i) * sizeof(float));
            if (g != NULL)
                memcpy(&gv, g + i, (end - i) * sizeof(float));
            const vf v = gelu_vec(xv, g != NULL);
            const vf out = g != NULL ? v * gv : v;
            memcpy(y + i, &out, (end - i) * sizeof(float));
        }
    }
}

/* bf16 tensors: widened to fp32 in registers, computed as above, rounded once to nearest even (as torch's bf16
 * kernel computes in fp32 and rounds) */
typedef uint16_t vh __attribute__((vector_size(VL * sizeof(uint16_t))));
typedef uint32_t vu __attribute__((vector_size(VL * sizeof(uint32_t))));

static inline vf widen(const uint16_t *p, long m) {
    vh h = {0};
    if (m == VL)
        memcpy(&h, p, sizeof h);   /* (a fixed size: one vector load) */
    else
        memcpy(&h, p, m * sizeof(uint16_t));
    return (vf)(__builtin_convertvector(h, vu) << 16);
}

static inline void narrow(uint16_t *p, vf v, long m) {
    const vu b = (vu)v;
    const vu r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16;
    const vi nan = (vi)(v != v);   /* NaN: keep it a (quiet) NaN instead of rounding it to infinity */
    const vh h = __builtin_convertvector((vu)(((vi)r & ~nan) | ((vi)((b >> 16) | 0x40) & nan)), vh);
    if (m == VL)
        memcpy(p, &h, sizeof h);
    else
        memcpy(p, &h, m * sizeof(uint16_t));
}

static void run_bf16(const uint16_t *x, const uint16_t *g, uint16_t *y, long n, int n_threads) {
    const long chunk = 1 << 14;
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (long c = 0; c < n; c += chunk) {
        const long end = c + chunk < n ? c + chunk : n;
        for (long i = c; i < end; i += VL) {
            const long m = end - i < VL ? end - i : VL;
            const vf v = gelu_vec(widen(x + i, m), g != NULL);
            narrow(y + i, g != NULL ? v * widen(g + i, m) : v, m);
        }
    }
}

void mz_gelu_tanh_forward_bf16(const uint16_t *x, uint16_t *y, long n, int n_threads) {
    run_bf16(x, NULL, y, n, n_threads);
}

void mz_gelu_tanh_backward_bf16(const uint16_t *g, const uint16_t *x, uint16_t *gx, long n, int n_threads) {
    run_bf16(x, g, gx, n, n_threads);
}

void mz_gelu_tanh_forward(const float *x, float *y, long n, int n_threads) { run(x, NULL, y, n, n_threads); }

void mz_gelu_tanh_backward(const float *g, const float *x, float *gx, long n, int n_threads) {
    run(x, g, gx, n, n_threads);
}
