// Pooling over channels-last maps, forward and backward: max and average windows
// in floor mode, padding −∞ for max and zeros for the average, the average divided by the whole
// window (count_include_pad) or by its positions inside the map. Mirrors ops/pool.rs
// `Pool2dParams::cpu_forward`, which accumulates the average in f64: so does this kernel, in the
// same (y, x) order, so the two agree to the last bit but for the final rounding of the division.
#include "common.cuh"
#include <math_constants.h>

// pool2d_forward: out (batch, oh, ow, c) from inp (batch, h, w, c), windows starting at (oy·stride −
// pt, ox·stride − pl); mode 0 max, 1 average over the
// whole window, 2 average over its positions inside the map. Launch: 1-D grid-stride over
// batch·oh·ow·c (one output element per thread; adjacent threads read adjacent channels).
extern "C" __global__ void pool2d_fwd(float* out, const float* inp, int batch, int h, int w, int c, int oh, int ow,
                                      int kh, int kw, int stride, int pt, int pl, int mode) {
    GRID_STRIDE(i, (long long)batch * oh * ow * c) {
        const unsigned ui = (unsigned)i;
        const unsigned pix = ui / (unsigned)c, ch = ui - pix * (unsigned)c;
        const unsigned t = pix / (unsigned)ow, ox = pix - t * (unsigned)ow;
        const unsigned b = t / (unsigned)oh, oy = t - b * (unsigned)oh;
        const int ys = (int)oy * stride - pt, xs = (int)ox * stride - pl;
        const int y0 = max(ys, 0), y1 = min(ys + kh, h), x0 = max(xs, 0), x1 = min(xs + kw, w);
        const float* base = inp + (size_t)b * h * w * c + ch;
        if (mode == 0) {
            float m = -CUDART_INF_F;
            for (int y = y0; y < y1; y++)
                for (int x = x0; x < x1; x++) {
                    const float v = base[((size_t)y * w + x) * c];
                    if (v > m || v != v) m = v;  // a NaN wins, as in PyTorch
                }
            out[i] = m;
        } else {
            double s = 0.0;
            for (int y = y0; y < y1; y++)
                for (int x = x0; x < x1; x++) s += (double)base[((size_t)y * w + x) * c];
            const int n = mode == 1 ? kh * kw : (y1 - y0) * (x1 - x0);
            out[i] = (float)(s / (double)n);
        }
    }
}

// pool2d_backward: dinp (batch, h, w, c) += the gradient of pool2d_fwd for dout (batch, oh, ow, c),
// gathered per input element over the windows that hold it (so no two threads write one value, and
// the sum is in the CPU reference's (oy, ox) order, in f64): a max window passes its dout to the
// position of its maximum (rows then columns, the first largest; a later NaN replaces it, as
// PyTorch's CPU kernel scans), recomputed from inp; an average window passes dout / its count.
// Launch: 1-D grid-stride over batch·h·w·c.
extern "C" __global__ void pool2d_bwd(float* dinp, const float* dout, const float* inp, int batch, int h, int w, int c,
                                      int oh, int ow, int kh, int kw, int stride, int pt, int pl, int mode) {
    GRID_STRIDE(i, (long long)batch * h * w * c) {
        const unsigned ui = (unsigned)i;
        const unsigned pix = ui / (unsigned)c, ch = ui - pix * (unsigned)c;
        const unsigned t = pix / (unsigned)w, x = pix - t * (unsigned)w;
        const unsigned b = t / (unsigned)h, y = t - b * (unsigned)h;
        // Windows oy with oy·stride − pt ≤ y < oy·stride − pt + kh (likewise for x).
        const int oy_hi = min(((int)y + pt) / stride, oh - 1);
        const int oy_lo = max((int)y + pt + 1 - kh, 0);
        const int ox_hi = min(((int)x + pl) / stride, ow - 1);
        const int ox_lo = max((int)x + pl + 1 - kw, 0);
        const float* base = inp + (size_t)b * h * w * c + ch;
        double acc = 0.0;
        for (int oy = (oy_lo + stride - 1) / stride; oy <= oy_hi; oy++) {
            for (int ox = (ox_lo + stride - 1) / stride; ox <= ox_hi; ox++) {
                const double g = (double)dout[(((size_t)b * oh + oy) * ow + ox) * c + ch];
                const int ys = oy * stride - pt, xs = ox * stride - pl;
                const int y0 = max(ys, 0), y1 = min(ys + kh, h), x0 = max(xs, 0), x1 = min(xs + kw, w);
                if (mode == 0) {
                    float m = -CUDART_INF_F;
                    int my = -1, mx = -1;
                    for (int yy = y0; yy < y1; yy++)
                        for (int xx = x0; xx < x1; xx++) {
                            const float v = base[((size_t)yy * w + xx) * c];
                            if (v > m || v != v || my < 0) {
                                m = v;
                                my = yy;
                                mx = xx;
                            }
                        }
                    if (my == (int)y && mx == (int)x) acc += g;
                } else {
                    const int n = mode == 1 ? kh * kw : (y1 - y0) * (x1 - x0);
                    acc += g / (double)n;
                }
            }
        }
        dinp[i] = (float)((double)dinp[i] + acc);
    }
}
