// Pooling over channels-last maps, forward only (the evaluation networks): max and average windows
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
