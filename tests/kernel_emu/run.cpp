// Runs the real kernels/*.cu on the CPU (through the emulation in emu.h) with the launch conventions
// of src/backend/cuda/*.rs, on seeded random inputs at small shapes, against naive f64 references
// written from the CPU backend's semantics (src/backend/cpu: NHWC activations, gradients
// accumulated). One line per case, "ok" or "FAILED" with the error; exit status 1 on any failure.
//
//   g++ -std=c++17 -O2 -pthread -fno-strict-aliasing -ffp-contract=off -Wno-unknown-pragmas
//       -Itests/kernel_emu tests/kernel_emu/run.cpp -o /tmp/kernel_emu && /tmp/kernel_emu [filter]
//
// Every case runs in its own process (a fault, a deadlock or an emulator check ends only that case);
// EMU_JOBS (default 2) cases run at once. Tolerances (tests/common): f32 paths max error
// ≤ 1e-4 · max(1, max |ref|); bf16 paths relative L2 ≤ 2e-2. Gradients are compared as the increment
// over their (random) initial contents, which also checks accumulate-vs-overwrite.
//
// Every case runs under the two schedules of emu.h (round-robin, warp-greedy). It also holds negative
// tests ("emu check: …") that pass only when the emulator reports the planted error.
//
// Environment: EMU_JOBS (parallel cases), EMU_SCHED=0|1 (one schedule), EMU_CASE_TIMEOUT (seconds,
// default 300), EMU_NOFORK=1 (run in this process, for gdb), EMU_FUZZ=N [EMU_FUZZ_SEED] (N random
// shapes per family instead of the fixed cases; not part of the test).
//
// The CudaBackend methods are transcribed below (class Cuda) from the Rust: same kernel names,
// grids, blocks, shared-memory sizes, argument lists, workspaces. Keep them in step with the Rust.
// The kernels and their __launch_bounds__ are listed in kernels/emu/registry.h.
#include "registry.h"

#include <poll.h>
#include <stdexcept>
#include <sys/wait.h>


using emu::Arg;
using std::string;
using std::vector;

// ---- kernel registry: launches by name, as the Rust does ------------------------------------------------
using Launcher = std::function<void(dim3, dim3, unsigned, const vector<Arg>&)>;
static std::map<string, Launcher>& registry() {
    static std::map<string, Launcher> r;
    return r;
}
// `bound`: the kernel's __launch_bounds__ in kernels/*.cu (0: none).
#define REG(k, bound) \
    registry()[#k] = [](dim3 gr, dim3 bl, unsigned sm, const vector<Arg>& a) { emu::launch_args(#k, &k, bound, gr, bl, sm, a); }
#define REG_AB(H)                          \
    REG(attention_fwd_bf16_d##H, AB_THREADS); \
    REG(attention_bwd_dq_bf16_d##H, AB_THREADS); \
    REG(attention_bwd_dkdv_bf16_d##H, AB_THREADS)

static void register_kernels() {
#define K(k, bound) REG(k, bound);
#define KAB(H) REG_AB(H);
    ROENTGEN_EMU_KERNELS(K, KAB)
#undef K
#undef KAB
}

// ---- device memory: every allocation ends at a PROT_NONE guard page -----------------------------------
static size_t page_size() { return (size_t)sysconf(_SC_PAGESIZE); }

struct Mapping {
    void* base;
    size_t len;
};
static vector<Mapping>& mappings() {
    static vector<Mapping> m;
    return m;
}

// `bytes` of memory ending exactly at a guard page (so reads or writes past the end fault), filled
// with `fill`.
static void* dev_alloc(size_t bytes, int fill) {
    const size_t pg = page_size();
    const size_t body = (bytes + pg - 1) / pg * pg;
    void* m = mmap(nullptr, body + pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
        perror("mmap");
        _exit(5);
    }
    mprotect(static_cast<char*>(m) + body, pg, PROT_NONE);
    mappings().push_back({m, body + pg});
    char* p = static_cast<char*>(m) + body - bytes;
    memset(p, fill, bytes);
    return p;
}
static void dev_free(void* p) {
    for (size_t i = 0; i < mappings().size(); i++) {
        char* b = static_cast<char*>(mappings()[i].base);
        if (static_cast<char*>(p) >= b && static_cast<char*>(p) < b + mappings()[i].len) {
            munmap(b, mappings()[i].len);  // later accesses fault (use after free)
            mappings().erase(mappings().begin() + i);
            return;
        }
    }
}

// A "tensor": n floats of device memory (host-visible here).
struct T {
    float* p = nullptr;
    size_t n = 0;
    T() {}
    explicit T(size_t n_, int fill = 0xFF) : p(static_cast<float*>(dev_alloc(std::max<size_t>(n_, 1) * 4, fill))), n(n_) {}
    T(const vector<float>& v) : T(v.size()) { memcpy(p, v.data(), v.size() * 4); }
    // Placed `skew` floats before the end of its allocation (NaN-filled slack): its address is then
    // 4·skew bytes off the usual alignment, as a tensor at an odd offset of a pool.
    T(const vector<float>& v, size_t skew)
        : p(static_cast<float*>(dev_alloc((v.size() + skew) * 4, 0xFF))), n(v.size()) {
        memcpy(p, v.data(), v.size() * 4);
    }
    // The pool this tensor lies in (its own allocation unless it is a view: `view`).
    const float* base = nullptr;
    const float* pool() const { return base ? base : p; }
    size_t offset() const { return (size_t)(p - pool()); }
    T view(size_t off, size_t len) const {
        T v;
        v.p = p + off, v.n = len, v.base = pool();
        return v;
    }
    vector<float> get() const { return vector<float>(p, p + n); }
    uint64_t d() const { return (uint64_t)(uintptr_t)p; }
    size_t numel() const { return n; }
    bool overlaps(const T& o) const { return p < o.p + o.n && o.p < p + n; }
};

// An `ensure!` failing in the Rust wrapper (returns Err; the case fails with the message).
struct RustErr : std::runtime_error {
    using std::runtime_error::runtime_error;
};
#define ENSURE(cond, ...)                                  \
    do {                                                   \
        if (!(cond)) {                                     \
            char m_[512];                                  \
            snprintf(m_, sizeof m_, __VA_ARGS__);          \
            throw RustErr(m_);                             \
        }                                                  \
    } while (0)

static size_t cdiv(size_t a, size_t b) { return (a + b - 1) / b; }
static size_t clampz(size_t v, size_t lo, size_t hi) { return std::min(std::max(v, lo), hi); }
static size_t next_pow2(size_t v) {
    size_t p = 1;
    while (p < v) p <<= 1;
    return p;
}

// ================================================================================================
// class Cuda: src/backend/cuda/{mod.rs, ops.rs, conv.rs, attention.rs}, transcribed.
// ================================================================================================
struct Cuda {
    bool bf16 = false;
    bool use_bf16() const { return bf16; }

    // mod.rs `launch`: an empty grid launches nothing.
    void launch(const string& kernel, std::tuple<size_t, size_t, size_t> grid, std::tuple<size_t, size_t, size_t> block,
                size_t shared, const vector<Arg>& args) const {
        auto [gx, gy, gz] = grid;
        auto [bx, by, bz] = block;
        // The Rust takes (u32, u32, u32): a value past u32 would have been truncated by `as u32`.
        ENSURE(gx <= 0xFFFFFFFFu && gy <= 0xFFFFFFFFu && gz <= 0xFFFFFFFFu, "grid dimension past u32");
        if (gx == 0 || gy == 0 || gz == 0) return;
        auto it = registry().find(kernel);
        ENSURE(it != registry().end(), "CUDA: no kernel named '%s' in the embedded modules", kernel.c_str());
        it->second(dim3((unsigned)gx, (unsigned)gy, (unsigned)gz), dim3((unsigned)bx, (unsigned)by, (unsigned)bz),
                   (unsigned)shared, args);
    }
    void set_max_dynamic_shared(const string& kernel, unsigned bytes) const {
        ENSURE(registry().count(kernel), "CUDA: no kernel named '%s'", kernel.c_str());
        emu::set_max_dynamic_shared(kernel, bytes);
    }

    // mod.rs `scratch`: a slot grows (freeing the old allocation) only when a larger request
    // arrives. The allocation here is exactly the rounded size the Rust allocates, filled with NaN
    // ("contents undefined") — the Rust zeroes fresh allocations, but a reused slot holds old data.
    struct Scratch {
        void* p = nullptr;
        size_t bytes = 0;
    };
    mutable Scratch f32s[4], u32s[4];
    uint64_t scratch(Scratch* table, size_t slot, size_t bytes) const {
        ENSURE(slot < 4, "scratch slot out of range");
        Scratch& s = table[slot];
        if (s.bytes < bytes) {
            if (s.p) dev_free(s.p);
            size_t grow = std::max<size_t>(next_pow2(bytes), 1024);
            s.p = dev_alloc(grow, 0xFF);
            s.bytes = grow;
        }
        return (uint64_t)(uintptr_t)s.p;
    }
    uint64_t upload_u32(size_t slot, const vector<uint32_t>& data) const {
        uint64_t p = scratch(u32s, slot, data.size() * 4);
        if (!data.empty()) memcpy((void*)(uintptr_t)p, data.data(), data.size() * 4);
        return p;
    }
    uint64_t workspace(size_t slot, size_t n) const { return scratch(f32s, slot, n * 4); }
    uint64_t dptr(const T& t) const { return t.d(); }

    // mod.rs `check_disjoint`: outputs must not overlap each other or any input.
    static void check_disjoint(const char* what, const vector<const T*>& outs, const vector<const T*>& ins) {
        for (size_t i = 0; i < outs.size(); i++) {
            for (size_t j = i + 1; j < outs.size(); j++)
                ENSURE(!outs[i]->overlaps(*outs[j]), "%s: output tensors overlap", what);
            for (auto* x : ins) ENSURE(!outs[i]->overlaps(*x), "%s: output overlaps an input", what);
        }
    }

    // mod.rs `gemm` / `gemm_for` (cuBLAS gemm_ex, not emulable): C (col-major m×n, ldc) =
    // op(A)·op(B) + beta·C, a naive loop with f64 sums rounded to f32 once. In bf16 mode the operands
    // are rounded to bf16 first (CUBLAS_COMPUTE_32F_FAST_16BF). beta == 0 does not read C (as BLAS).
    void gemm(bool ta, bool tb, size_t m, size_t n, size_t k, uint64_t a, size_t lda, uint64_t b, size_t ldb,
              float beta, uint64_t c, size_t ldc) const {
        if (m == 0 || n == 0) return;
        const float* A = (const float*)(uintptr_t)a;
        const float* B = (const float*)(uintptr_t)b;
        float* C = (float*)(uintptr_t)c;
        ENSURE(lda >= std::max<size_t>(1, ta ? k : m) && ldb >= std::max<size_t>(1, tb ? n : k) && ldc >= std::max<size_t>(1, m),
               "cuBLAS: gemm leading dimensions (invalid value)");
        auto rd = [&](float x) { return bf16 ? __bfloat162float(__float2bfloat16_rn(x)) : x; };
        vector<double> col(m);
        for (size_t j = 0; j < n; j++) {
            for (size_t i = 0; i < m; i++) {
                double acc = 0;
                for (size_t l = 0; l < k; l++) {
                    const float av = ta ? A[i * lda + l] : A[l * lda + i];
                    const float bv = tb ? B[l * ldb + j] : B[j * ldb + l];
                    acc += (double)rd(av) * (double)rd(bv);
                }
                col[i] = acc;
            }
            for (size_t i = 0; i < m; i++) {
                float& cv = C[j * ldc + i];
                cv = beta == 0.0f ? (float)col[i] : (float)(col[i] + (double)beta * (double)cv);
            }
        }
    }
    // mod.rs `attention_workspace_limit` (tests lower it to exercise the chunking).
    size_t attn_ws_limit = 32u << 20;

    // ---------------------------------------------------------------- mod.rs (linear bias parts)
    static constexpr unsigned LIN_BLOCK = 256;
    void linear_bias_fill(const T& out, const T& b, size_t rows, size_t out_f) const {
        size_t n = rows * out_f;
        launch("linear_bias_fill", {clampz(cdiv(n, LIN_BLOCK), 1, 65535), 1, 1}, {LIN_BLOCK, 1, 1}, 0,
               {emu::P(dptr(out)), emu::P(dptr(b)), emu::I((int)rows), emu::I((int)out_f)});
    }
    void linear_bias_grad(const T& db, const T& dout, size_t rows, size_t out_f) const {
        launch("linear_bias_grad", {cdiv(out_f, 32), 1, 1}, {32, 8, 1}, 0,
               {emu::P(dptr(db)), emu::P(dptr(dout)), emu::I((int)rows), emu::I((int)out_f)});
    }

    // ---------------------------------------------------------------- conv.rs
    static constexpr size_t F_BM = 64, F_BN = 64, F_BK = 16, H_BM = 128, H_BN = 64, H_BK = 32;
    static constexpr unsigned THREADS = 256;
    static Arg cint(const char* what, size_t v) {
        ENSURE(v <= 2147483647u, "conv2d: %s = %zu exceeds the kernels' 32-bit indices", what, v);
        return emu::I((int)v);
    }
    static Arg csmall(const char* what, int64_t v) {
        ENSURE((uint64_t)std::llabs(v) <= 2147483647u, "conv2d: %s = %lld exceeds the kernels' 32-bit indices", what,
               (long long)v);
        return emu::I((int)v);
    }
    static size_t out_dim(size_t size, size_t lo, size_t hi, size_t k, size_t s) { return (size + lo + hi - k) / s + 1; }
    struct Igemm {
        uint64_t dst, src, wt, bias;
        size_t batch, rh, rw, n, c, sh, sw, ss;
        int64_t sy0, sx0, tys, txs;
        size_t nty, ntx, tap0, tapys, tapxs, bs_n, bs_t, dh, dw, os, dy0, dx0;
        bool accumulate;
    };
    // ---------------------------------------------------------------- params.rs (bf16 copies)
    // A "pool" is a whole T; a tensor in it is a T whose `base` is the pool's first element.
    struct ParamCopy {
        void* p;
        size_t len;
        bool stale;
    };
    mutable std::map<const float*, ParamCopy> param_copies;
    void mark_params(const T& pool) {
        if (!use_bf16() || param_copies.count(pool.p)) return;
        param_copies[pool.p] = ParamCopy{dev_alloc(std::max<size_t>(pool.n * 2, 4), 0xFF), pool.n, true};
    }
    void params_written(const T& t) const {
        auto it = param_copies.find(t.pool());
        if (it != param_copies.end()) it->second.stale = true;
    }
    // param_bf16: the address of t's element in the copy, refreshed by ew_to_bf16 (over the whole
    // pool) when stale; 0 when t is in no parameter pool.
    uint64_t param_bf16(const T& t) const {
        auto it = param_copies.find(t.pool());
        if (it == param_copies.end()) return 0;
        ParamCopy& c = it->second;
        if (c.stale) {
            int n = oint("bf16 copy of a parameter pool", c.len);
            launch("ew_to_bf16", {clampz(cdiv(c.len, 256), 1, 65535), 1, 1}, {256, 1, 1}, 0,
                   {emu::P((uint64_t)(uintptr_t)c.p), emu::P((uint64_t)(uintptr_t)t.pool()), emu::I(n)});
            c.stale = false;
        }
        return (uint64_t)(uintptr_t)c.p + 2 * (uint64_t)t.offset();
    }
    uint64_t param_copy_for_update(const T& param, size_t n) const {
        auto it = param_copies.find(param.pool());
        if (it == param_copies.end()) return 0;
        if (param.offset() == 0 && n == it->second.len) it->second.stale = false;
        return (uint64_t)(uintptr_t)it->second.p + 2 * (uint64_t)param.offset();
    }

    uint64_t conv_permute_weight(const T& weight, size_t c_out, size_t c_in, size_t taps, size_t s_co, size_t s_ci,
                                 size_t s_t) const {
        size_t total = c_out * c_in * taps;
        const char* kernel = "conv2d_weight_permute";
        uint64_t ws, src = dptr(weight);
        if (use_bf16()) {
            ws = workspace(0, std::max<size_t>(cdiv(total, 2), 1));
            uint64_t copy = param_bf16(weight);
            kernel = copy ? "conv2d_weight_permute_bf16_copy" : "conv2d_weight_permute_bf16";
            if (copy) src = copy;
        } else {
            ws = workspace(0, std::max<size_t>(total, 1));
        }
        launch(kernel, {cdiv(total, THREADS), 1, 1}, {THREADS, 1, 1}, 0,
               {emu::P(ws), emu::P(src), cint("weight elements", total), cint("c_in", c_in), cint("taps", taps),
                cint("weight stride", s_co), cint("weight stride", s_ci), cint("weight stride", s_t)});
        return ws;
    }
    void conv_igemm(const Igemm& g) const {
        size_t m = g.batch * g.rh * g.rw;
        if (m == 0 || g.n == 0) return;
        cint("rows", m);
        cint("batch·height", g.batch * std::max(g.sh, g.dh));
        const char* kernel = use_bf16() ? "conv2d_igemm_bf16" : "conv2d_igemm_f32";
        size_t bm = use_bf16() ? H_BM : F_BM, bn = use_bf16() ? H_BN : F_BN;
        size_t grid_x = cdiv(m, bm), grid_y = cdiv(g.n, bn);
        ENSURE(grid_x <= 2147483647u && grid_y <= 65535, "conv2d: grid too large");
        launch(kernel, {grid_x, grid_y, 1}, {THREADS, 1, 1}, 0,
               {emu::P(g.dst), emu::P(g.src), emu::P(g.wt), emu::P(g.bias), cint("rows", m), cint("rh", g.rh),
                cint("rw", g.rw), cint("n", g.n), cint("c", g.c), cint("sh", g.sh), cint("sw", g.sw), cint("ss", g.ss),
                csmall("sy0", g.sy0), csmall("sx0", g.sx0), csmall("tys", g.tys), csmall("txs", g.txs),
                cint("nty", g.nty), cint("ntx", g.ntx), cint("tap0", g.tap0), cint("tapys", g.tapys),
                cint("tapxs", g.tapxs), cint("bs_n", g.bs_n), cint("bs_t", g.bs_t), cint("dh", g.dh), cint("dw", g.dw),
                cint("os", g.os), cint("dy0", g.dy0), cint("dx0", g.dx0), emu::I((int)g.accumulate)});
    }
    void conv2d_forward(const T& out, const T& inp, const T& weight, const T* bias, size_t batch, size_t h, size_t w,
                        size_t c_in, size_t c_out, size_t kernel, size_t stride, const size_t pad[4]) const {
        size_t pt = pad[0], pb = pad[1], pl = pad[2], pr = pad[3];
        ENSURE(stride >= 1 && kernel >= 1 && h + pt + pb >= kernel && w + pl + pr >= kernel, "conv2d: does not fit");
        size_t oh = out_dim(h, pt, pb, kernel, stride), ow = out_dim(w, pl, pr, kernel, stride);
        size_t taps = kernel * kernel, k = c_in * taps;
        ENSURE(out.numel() >= batch * oh * ow * c_out && inp.numel() >= batch * h * w * c_in &&
                   weight.numel() >= c_out * k,
               "conv2d: sizes");
        if (bias) ENSURE(bias->numel() >= c_out, "conv2d bias");
        vector<const T*> ins{&inp, &weight};
        if (bias) ins.push_back(bias);
        check_disjoint("conv2d", {&out}, ins);
        uint64_t bias_ptr = bias ? dptr(*bias) : 0;
        if (batch * oh * ow == 0 || c_out == 0) return;
        uint64_t wt;
        if (taps == 1 && !use_bf16()) {
            wt = dptr(weight);
        } else if (taps == 1) {
            uint64_t copy = param_bf16(weight);
            wt = copy ? copy : conv_permute_weight(weight, c_out, c_in, taps, taps * c_in, 1, c_in);
        } else {
            wt = conv_permute_weight(weight, c_out, c_in, taps, taps * c_in, 1, c_in);
        }
        conv_igemm(Igemm{dptr(out), dptr(inp), wt, bias_ptr, batch, oh, ow, c_out, c_in, h, w, stride, -(int64_t)pt,
                         -(int64_t)pl, 1, 1, kernel, kernel, 0, kernel, 1, taps * c_in, c_in, oh, ow, 1, 0, 0, false});
    }
    void conv2d_backward(const T* dinp, const T& dweight, const T* dbias, const T& dout, const T& inp, const T& weight,
                         size_t batch, size_t h, size_t w, size_t c_in, size_t c_out, size_t kernel, size_t stride,
                         const size_t pad[4]) const {
        size_t pt = pad[0], pb = pad[1], pl = pad[2], pr = pad[3];
        ENSURE(stride >= 1 && kernel >= 1 && h + pt + pb >= kernel && w + pl + pr >= kernel, "conv2d bwd: does not fit");
        size_t oh = out_dim(h, pt, pb, kernel, stride), ow = out_dim(w, pl, pr, kernel, stride);
        size_t taps = kernel * kernel, k = c_in * taps, rows = batch * oh * ow;
        ENSURE(dout.numel() >= rows * c_out && inp.numel() >= batch * h * w * c_in && weight.numel() >= c_out * k &&
                   dweight.numel() >= c_out * k,
               "conv2d bwd: sizes");
        if (dbias) ENSURE(dbias->numel() >= c_out, "dbias");
        if (dinp) ENSURE(dinp->numel() >= batch * h * w * c_in, "dinp");
        {
            vector<const T*> outs{&dweight};
            if (dinp) outs.push_back(dinp);
            if (dbias) outs.push_back(dbias);
            check_disjoint("conv2d backward", outs, {&dout, &inp, &weight});
        }
        if (rows == 0 || c_out == 0) return;
        cint("rows", rows);
        cint("batch·height", batch * std::max(h, oh));
        if (dbias) {
            size_t col_blocks = cdiv(c_out, 32);
            size_t splits = std::min<size_t>(clampz(1024 / col_blocks, 1, std::max<size_t>(cdiv(rows, 64), 1)), 65535);
            size_t chunk = cdiv(rows, splits);
            splits = cdiv(rows, chunk);
            launch("conv2d_bias_grad", {col_blocks, splits, 1}, {THREADS, 1, 1}, 0,
                   {emu::P(dptr(*dbias)), emu::P(dptr(dout)), cint("rows", rows), cint("c_out", c_out),
                    cint("chunk", chunk)});
        }
        if (c_in > 0) {
            const char* kname = use_bf16() ? "conv2d_wgrad_bf16" : "conv2d_wgrad_f32";
            size_t bm = use_bf16() ? H_BM : F_BM, bn = use_bf16() ? H_BN : F_BN, bk = use_bf16() ? H_BK : F_BK;
            size_t gx = cdiv(c_out, bm), gy = cdiv(c_in, bn) * taps;
            ENSURE(gy <= 65535, "conv2d backward: grid");
            size_t splits = std::min<size_t>(clampz(1024 / (gx * gy), 1, cdiv(rows, 256)), 65535);
            size_t chunk = cdiv(cdiv(rows, splits), bk) * bk;
            splits = cdiv(rows, chunk);
            launch(kname, {gx, gy, splits}, {THREADS, 1, 1}, 0,
                   {emu::P(dptr(dweight)), emu::P(dptr(dout)), emu::P(dptr(inp)), cint("rows", rows), cint("oh", oh),
                    cint("ow", ow), cint("h", h), cint("w", w), cint("c_in", c_in), cint("c_out", c_out),
                    cint("kernel", kernel), cint("stride", stride), cint("pad top", pt), cint("pad left", pl),
                    cint("chunk", chunk)});
        }
        if (!dinp) return;
        if (batch * h * w == 0 || c_in == 0) return;
        uint64_t wt = conv_permute_weight(weight, c_out, c_in, taps, 1, c_out, c_in * c_out);
        size_t s = stride;
        for (size_t py = 0; py < std::min(s, h); py++) {
            size_t ky0 = (py + pt) % s;
            size_t nty = ky0 < kernel ? cdiv(kernel - ky0, s) : 0;
            for (size_t px = 0; px < std::min(s, w); px++) {
                size_t kx0 = (px + pl) % s;
                size_t ntx = kx0 < kernel ? cdiv(kernel - kx0, s) : 0;
                if (nty == 0 || ntx == 0) continue;
                conv_igemm(Igemm{dptr(*dinp), dptr(dout), wt, 0, batch, cdiv(h - py, s), cdiv(w - px, s), c_in, c_out,
                                 oh, ow, 1, (int64_t)((py + pt - ky0) / s), (int64_t)((px + pl - kx0) / s), -1, -1, nty,
                                 ntx, ky0 * kernel + kx0, s * kernel, s, c_out, c_in * c_out, h, w, s, py, px, true});
            }
        }
    }

    // ---------------------------------------------------------------- attention.rs
    static constexpr size_t MAX_HEAD_DIM = 160;
    static constexpr unsigned ATT_THREADS = 128;
    static constexpr size_t F32_BLOCK_ROWS = 16, BF16_BLOCK_ROWS = 64, DELTA_ITEMS_PER_BLOCK = 8;
    static constexpr size_t DEFAULT_SMEM_LIMIT = 48 * 1024;
    static size_t f32_fwd_smem(size_t hd) { return (16 * hd + 32 * (hd + 1) + 32 * hd) * 4; }
    static size_t f32_bwd_smem(size_t hd) { return (2 * 16 * hd + 2 * 32 * (hd + 1)) * 4; }
    static size_t bf16_bucket(size_t hd) { return cdiv(hd, 16) * 16; }
    static size_t bf16_fwd_smem(size_t h) {
        size_t s = h + 8;
        return (64 * s + 64 * s + h * (64 + 8)) * 2 + 64 * 4;
    }
    static size_t bf16_dq_smem(size_t h) {
        size_t s = h + 8, bn = h <= 64 ? 64 : 32;
        return (2 * 64 * s + 2 * bn * s) * 2 + bn * 4;
    }
    static size_t bf16_dkdv_smem(size_t h) {
        size_t s = h + 8, bmq = h <= 64 ? 64 : (h <= 128 ? 32 : 16);
        return (2 * 64 * s + 2 * bmq * s) * 2 + 2 * bmq * 4;
    }
    struct Dims {
        size_t batch, q_len, kv_len, heads, hd;
        Dims check(const char* what, bool causal) const {
            ENSURE(hd >= 1, "%s: head_dim 0", what);
            ENSURE(!causal || q_len == kv_len, "%s: causal attention needs q_len == kv_len", what);
            ENSURE(hd > MAX_HEAD_DIM || batch * heads <= 65535, "%s: batch × heads exceeds the grid's y limit", what);
            size_t mx = 2147483647u;
            ENSURE(q_len <= mx && kv_len <= mx && batch * q_len * heads <= mx && batch * kv_len <= mx, "%s: 32-bit", what);
            return *this;
        }
        size_t width() const { return heads * hd; }
        bool wide() const { return hd > MAX_HEAD_DIM; }
        void ints(vector<Arg>& a) const {
            a.push_back(emu::I((int)q_len));
            a.push_back(emu::I((int)kv_len));
            a.push_back(emu::I((int)heads));
            a.push_back(emu::I((int)hd));
        }
    };
    static void check_key_mask(const char* what, const vector<uint32_t>& m, size_t batch, size_t kv_len) {
        ENSURE(m.size() == batch * kv_len, "%s: attention mask size", what);
        for (size_t b = 0; b < batch; b++) {
            bool all0 = true;
            for (size_t j = 0; j < kv_len; j++) all0 &= m[b * kv_len + j] == 0;
            ENSURE(!all0, "%s: attention mask: sequence %zu masks every key", what, b);
        }
    }
    static size_t blocks(size_t n, size_t per) { return cdiv(n, per); }
    static constexpr size_t WS_DELTA = 0, WS_P = 1, WS_DP = 2;
    static constexpr unsigned WIDE_THREADS = 256;
    struct Seg {
        size_t b, h, i0, i1, ws_row;
    };
    struct Chunk {
        size_t row0, nrows;
        vector<Seg> segs;
    };
    // attention.rs `wide_chunks`: returns the rows per chunk.
    static size_t wide_chunks(size_t batch, size_t heads, size_t q_len, size_t kv_len, size_t limit, vector<Chunk>& out) {
        out.clear();
        size_t total = batch * heads * q_len;
        if (total == 0) return 0;
        size_t per = clampz(limit / std::max<size_t>(kv_len, 1), 1, total);
        for (size_t row0 = 0; row0 < total; row0 += per) {
            size_t end = std::min(row0 + per, total);
            Chunk c{row0, end - row0, {}};
            for (size_t pair = row0 / q_len; pair <= (end - 1) / q_len; pair++) {
                size_t i0 = std::max(row0, pair * q_len) - pair * q_len;
                size_t i1 = std::min(end, (pair + 1) * q_len) - pair * q_len;
                c.segs.push_back(Seg{pair / heads, pair % heads, i0, i1, pair * q_len + i0 - row0});
            }
            out.push_back(c);
        }
        return per;
    }
    static Arg wide_int(const char* what, size_t v) {
        ENSURE(v <= 2147483647u, "attention: %s = %zu exceeds the kernels' 32-bit indices", what, v);
        return emu::I((int)v);
    }
    static uint64_t at(uint64_t base, size_t elems) { return base + 4 * (uint64_t)elems; }
    void wide_forward(const T& out, const T& lse, const T& q, const T& k, const T& v, uint64_t mask, Dims d,
                      float scale, bool causal) const {
        size_t w = d.width();
        vector<Chunk> chunks;
        size_t per = wide_chunks(d.batch, d.heads, d.q_len, d.kv_len, attn_ws_limit, chunks);
        uint64_t s_ws = workspace(WS_P, per * d.kv_len);
        if (d.kv_len == 0) {
            T prefix;
            prefix.p = out.p;
            prefix.n = d.batch * d.q_len * w;
            zero(prefix);
        }
        uint64_t pq = dptr(q), pk = dptr(k), pv = dptr(v), po = dptr(out);
        for (auto& c : chunks) {
            for (auto& g : c.segs) {
                size_t qoff = (g.b * d.q_len + g.i0) * w + g.h * d.hd, koff = g.b * d.kv_len * w + g.h * d.hd;
                gemm(true, false, d.kv_len, g.i1 - g.i0, d.hd, at(pk, koff), w, at(pq, qoff), w, 0.0f,
                     at(s_ws, g.ws_row * d.kv_len), d.kv_len);
            }
            launch("attention_wide_softmax", {c.nrows, 1, 1}, {WIDE_THREADS, 1, 1}, 0,
                   {emu::P(s_ws), emu::P(dptr(lse)), emu::P(mask), wide_int("row", c.row0), wide_int("q_len", d.q_len),
                    wide_int("kv_len", d.kv_len), wide_int("heads", d.heads), emu::F(scale), emu::I((int)causal)});
            if (d.kv_len == 0) continue;
            for (auto& g : c.segs) {
                size_t qoff = (g.b * d.q_len + g.i0) * w + g.h * d.hd, koff = g.b * d.kv_len * w + g.h * d.hd;
                gemm(false, false, d.hd, g.i1 - g.i0, d.kv_len, at(pv, koff), w, at(s_ws, g.ws_row * d.kv_len), d.kv_len,
                     0.0f, at(po, qoff), w);
            }
        }
    }
    void wide_backward(const T& dq, const T& dk, const T& dv, const T& dout, const T& q, const T& k, const T& v,
                       const T& lse, uint64_t delta, uint64_t mask, uint64_t p_ws, uint64_t ds_ws,
                       const vector<Chunk>& chunks, Dims d, float scale, bool causal) const {
        size_t w = d.width();
        uint64_t pq = dptr(q), pk = dptr(k), pv = dptr(v), pdo = dptr(dout);
        uint64_t pdq = dptr(dq), pdk = dptr(dk), pdv = dptr(dv);
        for (auto& c : chunks) {
            for (auto& g : c.segs) {
                size_t n = g.i1 - g.i0, qoff = (g.b * d.q_len + g.i0) * w + g.h * d.hd, koff = g.b * d.kv_len * w + g.h * d.hd;
                size_t ws = g.ws_row * d.kv_len;
                gemm(true, false, d.kv_len, n, d.hd, at(pk, koff), w, at(pq, qoff), w, 0.0f, at(p_ws, ws), d.kv_len);
                gemm(true, false, d.kv_len, n, d.hd, at(pv, koff), w, at(pdo, qoff), w, 0.0f, at(ds_ws, ws), d.kv_len);
            }
            launch("attention_wide_bwd_ds", {c.nrows, 1, 1}, {WIDE_THREADS, 1, 1}, 0,
                   {emu::P(p_ws), emu::P(ds_ws), emu::P(dptr(lse)), emu::P(delta), emu::P(mask), wide_int("row", c.row0),
                    wide_int("q_len", d.q_len), wide_int("kv_len", d.kv_len), wide_int("heads", d.heads), emu::F(scale),
                    emu::I((int)causal)});
            for (auto& g : c.segs) {
                size_t n = g.i1 - g.i0, qoff = (g.b * d.q_len + g.i0) * w + g.h * d.hd, koff = g.b * d.kv_len * w + g.h * d.hd;
                size_t ws = g.ws_row * d.kv_len;
                gemm(false, true, d.hd, d.kv_len, n, at(pdo, qoff), w, at(p_ws, ws), d.kv_len, 1.0f, at(pdv, koff), w);
                gemm(false, true, d.hd, d.kv_len, n, at(pq, qoff), w, at(ds_ws, ws), d.kv_len, 1.0f, at(pdk, koff), w);
                gemm(false, false, d.hd, n, d.kv_len, at(pk, koff), w, at(ds_ws, ws), d.kv_len, 1.0f, at(pdq, qoff), w);
            }
        }
    }
    void attn_launch(const string& kernel, std::tuple<size_t, size_t, size_t> grid, size_t smem,
                     const vector<Arg>& args) const {
        unsigned sm = (unsigned)smem;
        if ((size_t)sm > DEFAULT_SMEM_LIMIT) set_max_dynamic_shared(kernel, sm);
        launch(kernel, grid, {ATT_THREADS, 1, 1}, sm, args);
    }
    void attn_forward(const char* what, const T& out, const T& lse, const T& q, const T& k, const T& v,
                      const vector<uint32_t>* key_mask, Dims d, float scale, bool causal) const {
        d = d.check(what, causal);
        size_t w = d.width();
        if (key_mask) check_key_mask(what, *key_mask, d.batch, d.kv_len);
        ENSURE(out.numel() >= d.batch * d.q_len * w && q.numel() >= d.batch * d.q_len * w &&
                   k.numel() >= d.batch * d.kv_len * w && v.numel() >= d.batch * d.kv_len * w &&
                   lse.numel() >= d.batch * d.q_len * d.heads,
               "%s: sizes", what);
        check_disjoint(what, {&out, &lse}, {&q, &k, &v});
        if (d.batch * d.heads * d.q_len == 0) return;
        uint64_t mask = key_mask ? upload_u32(0, *key_mask) : 0;
        if (d.wide()) return wide_forward(out, lse, q, k, v, mask, d, scale, causal);
        vector<Arg> args{emu::P(dptr(out)), emu::P(dptr(lse)), emu::P(dptr(q)), emu::P(dptr(k)), emu::P(dptr(v)),
                         emu::P(mask)};
        d.ints(args);
        args.push_back(emu::F(scale));
        args.push_back(emu::I((int)causal));
        size_t bh = d.batch * d.heads;
        if (use_bf16()) {
            size_t h = bf16_bucket(d.hd);
            attn_launch("attention_fwd_bf16_d" + std::to_string(h), {blocks(d.q_len, BF16_BLOCK_ROWS), bh, 1},
                        bf16_fwd_smem(h), args);
        } else {
            attn_launch("attention_fwd_f32", {blocks(d.q_len, F32_BLOCK_ROWS), bh, 1}, f32_fwd_smem(d.hd), args);
        }
    }
    void attn_backward(const char* what, const T& dq, const T& dk, const T& dv, const T& dout, const T& q, const T& k,
                       const T& v, const T& out, const T& lse, const vector<uint32_t>* key_mask, Dims d, float scale,
                       bool causal) const {
        d = d.check(what, causal);
        size_t w = d.width();
        if (key_mask) check_key_mask(what, *key_mask, d.batch, d.kv_len);
        ENSURE(dq.numel() >= d.batch * d.q_len * w && dk.numel() >= d.batch * d.kv_len * w &&
                   dv.numel() >= d.batch * d.kv_len * w && dout.numel() >= d.batch * d.q_len * w &&
                   q.numel() >= d.batch * d.q_len * w && k.numel() >= d.batch * d.kv_len * w &&
                   v.numel() >= d.batch * d.kv_len * w && out.numel() >= d.batch * d.q_len * w &&
                   lse.numel() >= d.batch * d.q_len * d.heads,
               "%s: sizes", what);
        check_disjoint(what, {&dq, &dk, &dv}, {&dout, &q, &k, &v, &out, &lse});
        if (d.batch * d.heads * d.q_len * d.kv_len == 0) return;
        size_t rows = d.batch * d.q_len;
        uint64_t delta = workspace(WS_DELTA, rows * d.heads);
        uint64_t mask = key_mask ? upload_u32(0, *key_mask) : 0;
        uint64_t p_ws = 0, ds_ws = 0;
        vector<Chunk> chunks;
        if (d.wide()) {
            size_t per = wide_chunks(d.batch, d.heads, d.q_len, d.kv_len, attn_ws_limit, chunks);
            p_ws = workspace(WS_P, per * d.kv_len);
            ds_ws = workspace(WS_DP, per * d.kv_len);
        }
        launch("attention_bwd_delta", {blocks(rows * d.heads, DELTA_ITEMS_PER_BLOCK), 1, 1},
               {32 * DELTA_ITEMS_PER_BLOCK, 1, 1}, 0,
               {emu::P(delta), emu::P(dptr(dout)), emu::P(dptr(out)), emu::I((int)rows), emu::I((int)d.heads),
                emu::I((int)d.hd)});
        if (d.wide()) return wide_backward(dq, dk, dv, dout, q, k, v, lse, delta, mask, p_ws, ds_ws, chunks, d, scale, causal);
        auto tail = [&](vector<Arg>& a) {
            d.ints(a);
            a.push_back(emu::F(scale));
            a.push_back(emu::I((int)causal));
        };
        vector<Arg> dq_args{emu::P(dptr(dq)), emu::P(dptr(dout)), emu::P(dptr(q)), emu::P(dptr(k)),
                            emu::P(dptr(v)),  emu::P(dptr(lse)),  emu::P(delta),   emu::P(mask)};
        tail(dq_args);
        vector<Arg> dkdv_args{emu::P(dptr(dk)), emu::P(dptr(dv)),  emu::P(dptr(dout)), emu::P(dptr(q)), emu::P(dptr(k)),
                              emu::P(dptr(v)),  emu::P(dptr(lse)), emu::P(delta),      emu::P(mask)};
        tail(dkdv_args);
        size_t bh = d.batch * d.heads;
        if (use_bf16()) {
            size_t h = bf16_bucket(d.hd);
            attn_launch("attention_bwd_dq_bf16_d" + std::to_string(h), {blocks(d.q_len, BF16_BLOCK_ROWS), bh, 1},
                        bf16_dq_smem(h), dq_args);
            attn_launch("attention_bwd_dkdv_bf16_d" + std::to_string(h), {blocks(d.kv_len, BF16_BLOCK_ROWS), bh, 1},
                        bf16_dkdv_smem(h), dkdv_args);
        } else {
            attn_launch("attention_bwd_dq_f32", {blocks(d.q_len, F32_BLOCK_ROWS), bh, 1}, f32_bwd_smem(d.hd), dq_args);
            attn_launch("attention_bwd_dkdv_f32", {blocks(d.kv_len, F32_BLOCK_ROWS), bh, 1}, f32_bwd_smem(d.hd),
                        dkdv_args);
        }
    }

    // ---------------------------------------------------------------- ops.rs
    static constexpr unsigned BLOCK = 256;
    static constexpr size_t MAX_GRID = 8192, GN_CHUNK_ELEMS = 8192, GN_MAX_CHUNKS = 1024, COL_CHUNK_ROWS = 256,
                            COL_MAX_CHUNKS = 256;
    static int oint(const char* what, size_t v) {
        ENSURE(v <= 2147483647u, "%s: %zu elements exceed the CUDA kernels' 32-bit index range", what, v);
        return (int)v;
    }
    static std::tuple<size_t, size_t, size_t> grid1(size_t n) { return {clampz(cdiv(n, BLOCK), 1, MAX_GRID), 1, 1}; }
    static std::pair<size_t, size_t> chunking(size_t rows, size_t target, size_t max_chunks) {
        size_t per = std::max<size_t>(target, 1);
        size_t chunks = cdiv(rows, per);
        if (chunks > max_chunks) {
            per = cdiv(rows, max_chunks);
            chunks = cdiv(rows, per);
        }
        return {chunks, per};
    }
    static uint64_t f64_at(uint64_t base, size_t index) { return base + 8 * (uint64_t)index; }
    void ops_launch1(const string& kernel, size_t n, const vector<Arg>& args) const {
        launch(kernel, grid1(n), {BLOCK, 1, 1}, 0, args);
    }
    uint64_t ops_workspace_f64(size_t slot, size_t n) const {
        uint64_t p = workspace(slot, 2 * std::max<size_t>(n, 1));
        ENSURE(p % 8 == 0, "CUDA workspace is not 8-byte aligned");
        return p;
    }

    void embedding_forward(const T& out, const vector<uint32_t>& ids, const T& wte, const T& wpe, size_t batch,
                           size_t seq, size_t dim) const {
        ENSURE(ids.size() == batch * seq && dim > 0, "embedding: ids");
        size_t vocab = wte.numel() / dim, positions = wpe.numel() / dim;
        ENSURE(seq <= positions, "embedding: positions");
        for (auto id : ids) ENSURE(id < vocab, "embedding: token id");
        size_t n = batch * seq * dim;
        ENSURE(out.numel() >= n, "embedding out");
        oint("embedding", n);
        if (n == 0) return;
        uint64_t ids_d = upload_u32(0, ids);
        ops_launch1("ew_embedding_fwd", n,
                    {emu::P(dptr(out)), emu::P(ids_d), emu::P(dptr(wte)), emu::P(dptr(wpe)), emu::I((int)batch),
                     emu::I((int)seq), emu::I((int)dim)});
    }
    void layer_norm_forward(const T& out, const T& mean, const T& rstd, const T& inp, const T& weight, const T& bias,
                            size_t rows, size_t cols, float eps) const {
        oint("layer_norm", rows * cols);
        if (rows == 0) return;
        launch("ln_forward", {clampz(cdiv(rows, 8), 1, MAX_GRID), 1, 1}, {BLOCK, 1, 1}, 0,
               {emu::P(dptr(out)), emu::P(dptr(mean)), emu::P(dptr(rstd)), emu::P(dptr(inp)), emu::P(dptr(weight)),
                emu::P(dptr(bias)), emu::I((int)rows), emu::I((int)cols), emu::F(eps)});
    }
    void activation_forward(const T& out, const T& inp, int act, size_t n) const {
        int ni = oint("activation", n);
        if (n == 0) return;
        ops_launch1("ew_activation_fwd", n, {emu::P(dptr(out)), emu::P(dptr(inp)), emu::I(ni), emu::I(act)});
    }
    void add_forward(const T& out, const T& a, const T& b, size_t n) const {
        int ni = oint("add", n);
        if (n == 0) return;
        ops_launch1("ew_add", n, {emu::P(dptr(out)), emu::P(dptr(a)), emu::P(dptr(b)), emu::I(ni)});
    }
    void group_norm_forward(const T& out, const T& mean, const T& rstd, const T& inp, const T& weight, const T& bias,
                            size_t batch, size_t hw, size_t c, size_t groups, float eps, bool silu) const {
        ENSURE(groups > 0 && c % groups == 0, "group_norm: groups");
        size_t n = batch * hw * c, bg = batch * groups;
        oint("group_norm", n);
        if (n == 0) return;
        size_t cpg = c / groups;
        auto [nchunks, rpc] = chunking(hw, GN_CHUNK_ELEMS / cpg, GN_MAX_CHUNKS);
        int blocks = oint("group_norm blocks", bg * nchunks);
        uint64_t ws = ops_workspace_f64(0, 2 * bg * nchunks + 2 * bg);
        uint64_t psum = ws, psq = f64_at(ws, bg * nchunks), stats = f64_at(ws, 2 * bg * nchunks);
        int hw_i = (int)hw, c_i = (int)c, g_i = (int)groups, nc_i = (int)nchunks, rpc_i = (int)rpc;
        uint64_t x = dptr(inp);
        std::tuple<size_t, size_t, size_t> grid{(size_t)blocks, 1, 1};
        launch("gn_forward_sum", grid, {BLOCK, 1, 1}, 0,
               {emu::P(psum), emu::P(x), emu::I(hw_i), emu::I(c_i), emu::I(g_i), emu::I(nc_i), emu::I(rpc_i)});
        launch("gn_forward_sqdev", grid, {BLOCK, 1, 1}, 0,
               {emu::P(psq), emu::P(psum), emu::P(x), emu::I(hw_i), emu::I(c_i), emu::I(g_i), emu::I(nc_i),
                emu::I(rpc_i)});
        launch("gn_forward_finalize", {bg, 1, 1}, {32, 1, 1}, 0,
               {emu::P(dptr(mean)), emu::P(dptr(rstd)), emu::P(stats), emu::P(psum), emu::P(psq), emu::I(hw_i),
                emu::I((int)cpg), emu::I(nc_i), emu::F(eps)});
        ops_launch1("gn_forward_apply", n,
                    {emu::P(dptr(out)), emu::P(x), emu::P(dptr(weight)), emu::P(dptr(bias)), emu::P(stats),
                     emu::I((int)batch), emu::I(hw_i), emu::I(c_i), emu::I(g_i), emu::I((int)silu)});
    }
    void upsample_nearest_forward(const T& out, const T& inp, size_t batch, size_t ih, size_t iw, size_t oh, size_t ow,
                                  size_t c) const {
        size_t n_out = batch * oh * ow * c;
        oint("upsample out", n_out);
        oint("upsample inp", batch * ih * iw * c);
        if (n_out == 0) return;
        ENSURE(ih > 0 && iw > 0, "upsample: empty input");
        float sy = (float)ih / (float)oh, sx = (float)iw / (float)ow;
        ops_launch1("ew_upsample_fwd", n_out,
                    {emu::P(dptr(out)), emu::P(dptr(inp)), emu::I((int)batch), emu::I((int)ih), emu::I((int)iw),
                     emu::I((int)oh), emu::I((int)ow), emu::I((int)c), emu::F(sy), emu::F(sx)});
    }
    void add_bias_rows_forward(const T& out, const T& inp, const T& bias, size_t batch, size_t rows, size_t c) const {
        size_t n = batch * rows * c;
        oint("add_bias_rows", n);
        if (n == 0) return;
        ops_launch1("ew_add_bias_rows", n,
                    {emu::P(dptr(out)), emu::P(dptr(inp)), emu::P(dptr(bias)), emu::I((int)batch), emu::I((int)rows),
                     emu::I((int)c)});
    }
    void concat_channels_forward(const T& out, const T& a, const T& b, size_t rows, size_t ca, size_t cb) const {
        size_t n = rows * (ca + cb);
        oint("concat", n);
        if (n == 0) return;
        ops_launch1("ew_concat_fwd", n,
                    {emu::P(dptr(out)), emu::P(dptr(a)), emu::P(dptr(b)), emu::I((int)rows), emu::I((int)ca),
                     emu::I((int)cb)});
    }
    void geglu_forward(const T& out, const T& inp, size_t rows, size_t inner) const {
        size_t n = rows * inner;
        oint("geglu inp", 2 * n);
        if (n == 0) return;
        ops_launch1("ew_geglu_fwd", n, {emu::P(dptr(out)), emu::P(dptr(inp)), emu::I((int)rows), emu::I((int)inner)});
    }
    void zero(const T& t) const {
        params_written(t);
        size_t n = t.numel();
        int ni = oint("zero", n);
        if (n == 0) return;
        ops_launch1("ew_zero", n, {emu::P(dptr(t)), emu::I(ni)});
    }
    void accumulate(const T& dst, const T& src, size_t n) const {
        params_written(dst);
        int ni = oint("accumulate", n);
        if (n == 0) return;
        ops_launch1("ew_accumulate", n, {emu::P(dptr(dst)), emu::P(dptr(src)), emu::I(ni)});
    }
    void scale(const T& t, float s, size_t n) const {
        params_written(t);
        int ni = oint("scale", n);
        if (n == 0) return;
        ops_launch1("ew_scale", n, {emu::P(dptr(t)), emu::F(s), emu::I(ni)});
    }
    void layer_norm_backward(const T& dinp, const T& dweight, const T& dbias, const T& dout, const T& inp,
                             const T& weight, const T& mean, const T& rstd, size_t rows, size_t cols) const {
        size_t n = rows * cols;
        oint("layer_norm_backward", n);
        if (n == 0) return;
        launch("ln_backward_dinp", {clampz(cdiv(rows, 8), 1, MAX_GRID), 1, 1}, {BLOCK, 1, 1}, 0,
               {emu::P(dptr(dinp)), emu::P(dptr(dout)), emu::P(dptr(inp)), emu::P(dptr(weight)), emu::P(dptr(mean)),
                emu::P(dptr(rstd)), emu::I((int)rows), emu::I((int)cols)});
        ops_norm_dparams(dptr(dweight), dptr(dbias), dptr(dout), dptr(inp), dptr(weight), 0, dptr(mean), dptr(rstd),
                         rows, 1, cols, 1, false);
    }
    void ops_norm_dparams(uint64_t dweight, uint64_t dbias, uint64_t dout, uint64_t inp, uint64_t weight, uint64_t bias,
                          uint64_t mean, uint64_t rstd, size_t rows, size_t hw, size_t c, size_t groups,
                          bool silu) const {
        auto [chunks, rpc] = chunking(rows, COL_CHUNK_ROWS, COL_MAX_CHUNKS);
        uint64_t part = ops_workspace_f64(1, chunks * c * 2);
        launch("nrm_dparams_partial", {cdiv(c, 32), chunks, 1}, {32, 8, 1}, 0,
               {emu::P(part), emu::P(dout), emu::P(inp), emu::P(weight), emu::P(bias), emu::P(mean), emu::P(rstd),
                emu::I((int)rows), emu::I((int)hw), emu::I((int)c), emu::I((int)groups), emu::I((int)rpc),
                emu::I((int)silu)});
        ops_launch1("nrm_dparams_finalize", c,
                    {emu::P(dweight), emu::P(dbias), emu::P(part), emu::I((int)c), emu::I((int)chunks)});
    }
    void activation_backward(const T& dinp, const T& dout, const T& inp, int act, size_t n) const {
        int ni = oint("activation_backward", n);
        if (n == 0) return;
        ops_launch1("ew_activation_bwd", n,
                    {emu::P(dptr(dinp)), emu::P(dptr(dout)), emu::P(dptr(inp)), emu::I(ni), emu::I(act)});
    }
    void group_norm_backward(const T& dinp, const T& dweight, const T& dbias, const T& dout, const T& inp,
                             const T& weight, const T& bias, const T& mean, const T& rstd, size_t batch, size_t hw,
                             size_t c, size_t groups, bool silu) const {
        ENSURE(groups > 0 && c % groups == 0, "group_norm: groups");
        size_t n = batch * hw * c, bg = batch * groups;
        oint("group_norm_backward", n);
        if (n == 0) return;
        size_t cpg = c / groups;
        auto [nchunks, rpc] = chunking(hw, GN_CHUNK_ELEMS / cpg, GN_MAX_CHUNKS);
        int blocks = oint("group_norm_backward blocks", bg * nchunks);
        uint64_t ws = ops_workspace_f64(0, 2 * bg * nchunks + 2 * bg);
        uint64_t p1 = ws, p2 = f64_at(ws, bg * nchunks), stats = f64_at(ws, 2 * bg * nchunks);
        uint64_t dy = dptr(dout), x = dptr(inp), w = dptr(weight), b = dptr(bias), m = dptr(mean), r = dptr(rstd);
        int hw_i = (int)hw, c_i = (int)c, g_i = (int)groups, nc_i = (int)nchunks;
        launch("gn_backward_reduce", {(size_t)blocks, 1, 1}, {BLOCK, 1, 1}, 0,
               {emu::P(p1), emu::P(p2), emu::P(dy), emu::P(x), emu::P(w), emu::P(b), emu::P(m), emu::P(r), emu::I(hw_i),
                emu::I(c_i), emu::I(g_i), emu::I(nc_i), emu::I((int)rpc), emu::I((int)silu)});
        launch("gn_backward_finalize", {bg, 1, 1}, {32, 1, 1}, 0,
               {emu::P(stats), emu::P(p1), emu::P(p2), emu::I(hw_i), emu::I((int)cpg), emu::I(nc_i)});
        ops_launch1("gn_backward_dinp", n,
                    {emu::P(dptr(dinp)), emu::P(dy), emu::P(x), emu::P(w), emu::P(b), emu::P(m), emu::P(r),
                     emu::P(stats), emu::I((int)batch), emu::I(hw_i), emu::I(c_i), emu::I(g_i), emu::I((int)silu)});
        ops_norm_dparams(dptr(dweight), dptr(dbias), dy, x, w, b, m, r, batch * hw, hw, c, groups, silu);
    }
    void upsample_nearest_backward(const T& dinp, const T& dout, size_t batch, size_t ih, size_t iw, size_t oh,
                                   size_t ow, size_t c) const {
        size_t n_in = batch * ih * iw * c, n_out = batch * oh * ow * c;
        oint("upsample_backward dinp", n_in);
        oint("upsample_backward dout", n_out);
        if (n_in == 0 || n_out == 0) return;
        float sy = (float)ih / (float)oh, sx = (float)iw / (float)ow;
        ops_launch1("ew_upsample_bwd", n_in,
                    {emu::P(dptr(dinp)), emu::P(dptr(dout)), emu::I((int)batch), emu::I((int)ih), emu::I((int)iw),
                     emu::I((int)oh), emu::I((int)ow), emu::I((int)c), emu::F(sy), emu::F(sx)});
    }
    void add_bias_rows_backward(const T& dbias, const T& dout, size_t batch, size_t rows, size_t c) const {
        oint("add_bias_rows_backward", batch * rows * c);
        if (batch * rows * c == 0) return;
        ENSURE(batch <= 65535, "add_bias_rows_backward: batch");
        auto [chunks, rpc] = chunking(rows, COL_CHUNK_ROWS, COL_MAX_CHUNKS);
        uint64_t part = ops_workspace_f64(1, batch * chunks * c);
        launch("ew_bias_rows_bwd_partial", {cdiv(c, 32), chunks, batch}, {32, 8, 1}, 0,
               {emu::P(part), emu::P(dptr(dout)), emu::I((int)rows), emu::I((int)c), emu::I((int)rpc)});
        ops_launch1("ew_bias_rows_bwd_finalize", batch * c,
                    {emu::P(dptr(dbias)), emu::P(part), emu::I((int)batch), emu::I((int)c), emu::I((int)chunks)});
    }
    void concat_channels_backward(const T& da, const T& db, const T& dout, size_t rows, size_t ca, size_t cb) const {
        size_t n = rows * (ca + cb);
        oint("concat_backward", n);
        if (n == 0) return;
        ops_launch1("ew_concat_bwd", n,
                    {emu::P(dptr(da)), emu::P(dptr(db)), emu::P(dptr(dout)), emu::I((int)rows), emu::I((int)ca),
                     emu::I((int)cb)});
    }
    void geglu_backward(const T& dinp, const T& dout, const T& inp, size_t rows, size_t inner) const {
        size_t n = rows * inner;
        oint("geglu_backward", 2 * n);
        if (n == 0) return;
        ops_launch1("ew_geglu_bwd", n,
                    {emu::P(dptr(dinp)), emu::P(dptr(dout)), emu::P(dptr(inp)), emu::I((int)rows), emu::I((int)inner)});
    }
    void embedding_backward(const T& dwte, const T& dwpe, const T& dout, const vector<uint32_t>& ids, size_t batch,
                            size_t seq, size_t dim) const {
        size_t rows = batch * seq;
        ENSURE(ids.size() == rows && dim > 0, "embedding_backward: ids");
        oint("embedding_backward", rows * dim);
        if (rows == 0) return;
        vector<uint32_t> order(rows);
        for (size_t i = 0; i < rows; i++) order[i] = (uint32_t)i;
        std::stable_sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) { return ids[a] < ids[b]; });
        vector<uint32_t> uniq, starts;
        for (size_t k = 0; k < order.size(); k++) {
            uint32_t id = ids[order[k]];
            if (uniq.empty() || uniq.back() != id) {
                uniq.push_back(id);
                starts.push_back((uint32_t)k);
            }
        }
        starts.push_back((uint32_t)rows);
        size_t u = uniq.size();
        vector<uint32_t> buf = uniq;
        buf.insert(buf.end(), starts.begin(), starts.end());
        buf.insert(buf.end(), order.begin(), order.end());
        uint64_t base = upload_u32(0, buf);
        uint64_t uniq_d = base, starts_d = base + 4 * (uint64_t)u, order_d = base + 4 * (uint64_t)(2 * u + 1);
        size_t items = u + seq;
        launch("ew_embedding_bwd", {std::min(cdiv(dim, 128), MAX_GRID), std::min<size_t>(items, 65535), 1}, {128, 1, 1},
               0,
               {emu::P(dptr(dwte)), emu::P(dptr(dwpe)), emu::P(dptr(dout)), emu::P(uniq_d), emu::P(starts_d),
                emu::P(order_d), emu::I((int)u), emu::I((int)batch), emu::I((int)seq), emu::I((int)dim)});
    }
    void mse_loss(const T& dpred, const T& loss, const T& pred, const T& target, size_t n) const {
        int ni = oint("mse", n);
        size_t parts = clampz(cdiv(n, BLOCK * 8), 1, 1024);
        uint64_t partial = ops_workspace_f64(0, parts);
        launch("opt_mse_partial", {parts, 1, 1}, {BLOCK, 1, 1}, 0,
               {emu::P(dptr(dpred)), emu::P(partial), emu::P(dptr(pred)), emu::P(dptr(target)), emu::I(ni)});
        launch("opt_sum_finalize", {1, 1, 1}, {BLOCK, 1, 1}, 0,
               {emu::P(dptr(loss)), emu::P(partial), emu::I((int)parts), emu::I(ni), emu::I(1)});
    }
    void sum_squares(const T& out, const T& x, size_t n) const {
        int ni = oint("sum_squares", n);
        size_t parts = clampz(cdiv(n, BLOCK * 8), 1, 1024);
        uint64_t partial = ops_workspace_f64(0, parts);
        launch("opt_sum_squares_partial", {parts, 1, 1}, {BLOCK, 1, 1}, 0, {emu::P(partial), emu::P(dptr(x)), emu::I(ni)});
        launch("opt_sum_finalize", {1, 1, 1}, {BLOCK, 1, 1}, 0,
               {emu::P(dptr(out)), emu::P(partial), emu::I((int)parts), emu::I(ni), emu::I(0)});
    }
    void adamw_step(const T& param, const T& grad, const T& m, const T& v, size_t n, float lr, float beta1, float beta2,
                    float eps, float weight_decay, size_t step) const {
        ENSURE(step >= 1, "adamw: step counts from 1");
        int ni = oint("adamw", n);
        if (n == 0) return;
        double bc1 = 1.0 - std::pow((double)beta1, (int)step);
        float bc2_sqrt = (float)std::sqrt(1.0 - std::pow((double)beta2, (int)step));
        float step_size = (float)((double)lr / bc1);
        float decay = (float)(1.0 - (double)lr * (double)weight_decay);
        uint64_t copy = param_copy_for_update(param, n);
        ops_launch1("opt_adamw", n,
                    {emu::P(dptr(param)), emu::P(copy), emu::P(dptr(grad)), emu::P(dptr(m)), emu::P(dptr(v)), emu::I(ni),
                     emu::F(decay), emu::F(beta2), emu::F(1.0f - beta1), emu::F(1.0f - beta2), emu::F(bc2_sqrt),
                     emu::F(step_size), emu::F(eps)});
    }
    void lerp(const T& dst, const T& src, size_t n, float w) const {
        params_written(dst);
        int ni = oint("lerp", n);
        if (n == 0) return;
        ops_launch1("ew_lerp", n, {emu::P(dptr(dst)), emu::P(dptr(src)), emu::I(ni), emu::F(w)});
    }
    void timestep_embedding(const T& out, const T& ts, size_t batch, size_t dim, bool flip, float shift) const {
        ENSURE(out.numel() >= batch * dim && ts.numel() >= batch, "timestep_embedding: sizes");
        check_disjoint("timestep_embedding", {&out}, {&ts});
        size_t n = batch * dim;
        oint("timestep_embedding", n);
        if (n == 0) return;
        const float log_period = (float)-std::log(10000.0);
        ops_launch1("ew_timestep_embedding", n,
                    {emu::P(dptr(out)), emu::P(dptr(ts)), emu::I((int)batch), emu::I((int)dim), emu::I((int)flip),
                     emu::F(shift), emu::F(log_period)});
    }
    // ops.rs `randn_impl`: one thread per group of four; u32 halves in the i32 slots, bit for bit.
    void randn(const T& out, size_t n, uint64_t seed, uint64_t stream) const {
        int ni = oint("randn", n);
        if (n == 0) return;
        auto half = [](uint64_t v, bool hi) { return emu::I((int)(uint32_t)(hi ? v >> 32 : v & 0xFFFFFFFFu)); };
        ops_launch1("rand_philox_normal", cdiv(n, 4),
                    {emu::P(dptr(out)), emu::I(ni), half(seed, false), half(seed, true), half(stream, false),
                     half(stream, true)});
    }
    void ddpm_add_noise(const T& x, const T& noise, size_t n, float sa, float s1a, bool v) const {
        check_disjoint("ddpm_add_noise", {&x, &noise}, {});
        int ni = oint("ddpm_add_noise", n);
        if (n == 0) return;
        ops_launch1("rand_ddpm_add_noise", n,
                    {emu::P(dptr(x)), emu::P(dptr(noise)), emu::I(ni), emu::F(sa), emu::F(s1a), emu::I((int)v)});
    }
};

// ================================================================================================
// Random inputs, comparisons
// ================================================================================================
struct Rng {
    uint64_t s;
    explicit Rng(uint64_t seed) : s(seed) {}
    uint64_t next() {
        s += 0x9E3779B97F4A7C15ull;
        uint64_t z = s;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    double uniform() { return (double)(next() >> 11) * (1.0 / 9007199254740992.0); }
    float normal() {
        double u1 = std::max(uniform(), 1e-300), u2 = uniform();
        return (float)(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
    }
    vector<float> randn(size_t n, float scale = 1.0f) {
        vector<float> v(n);
        for (auto& x : v) x = normal() * scale;
        return v;
    }
};

struct Report {
    bool ok = true;
    string detail;
    void note(const string& s) {
        if (!detail.empty()) detail += "; ";
        detail += s;
    }
    void failure(const string& s) {
        ok = false;
        note(s);
    }
};

static string fmt(const char* f, ...) {
    char b[1024];
    va_list ap;
    va_start(ap, f);
    vsnprintf(b, sizeof b, f, ap);
    va_end(ap);
    return b;
}

// f32 path: max |got − ref| ≤ 1e-4 · max(1, max |ref|). bf16 path: ‖got − ref‖₂ ≤ 2e-2 · ‖ref‖₂.
static void compare(Report& r, const char* what, bool bf16, const vector<double>& got, const vector<double>& ref) {
    if (got.size() != ref.size()) {
        r.failure(fmt("%s: %zu values vs %zu", what, got.size(), ref.size()));
        return;
    }
    double scale = 1.0, max_err = 0.0, num = 0.0, den = 0.0;
    size_t at = 0;
    for (size_t i = 0; i < got.size(); i++) {
        if (std::isnan(got[i]) || std::isinf(got[i])) {
            r.failure(fmt("%s: element %zu is %g (reference %g)", what, i, got[i], ref[i]));
            return;
        }
        scale = std::max(scale, std::fabs(ref[i]));
        double e = std::fabs(got[i] - ref[i]);
        if (e > max_err) {
            max_err = e;
            at = i;
        }
        num += e * e;
        den += ref[i] * ref[i];
    }
    if (bf16) {
        double rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
        if (rel <= 2e-2)
            r.note(fmt("%s relL2 %.1e", what, rel));
        else
            r.failure(fmt("%s relL2 %.3e > 2e-2 (max err %.3e at %zu: got %g, ref %g)", what, rel, max_err, at, got[at],
                          ref[at]));
    } else {
        double tol = 1e-4 * scale;
        if (max_err <= tol)
            r.note(fmt("%s %.1e", what, max_err / scale));
        else
            r.failure(fmt("%s max err %.3e > %.3e at %zu (got %.7g, ref %.7g)", what, max_err, tol, at, got[at],
                          ref[at]));
    }
}
static vector<double> dbl(const vector<float>& v) { return vector<double>(v.begin(), v.end()); }
// The increment of an accumulated output over its initial contents.
static vector<double> inc(const T& t, const vector<float>& init) {
    vector<double> d(t.n);
    for (size_t i = 0; i < t.n; i++) d[i] = (double)t.p[i] - (double)init[i];
    return d;
}
static void exact(Report& r, const char* what, const vector<float>& got, const vector<float>& want) {
    for (size_t i = 0; i < got.size(); i++)
        if (memcmp(&got[i], &want[i], 4) != 0) {
            r.failure(fmt("%s: not bit-identical to the CPU's f32 operation order at %zu (%.9g vs %.9g)", what, i, got[i],
                          want[i]));
            return;
        }
    r.note(fmt("%s bit-exact", what));
}

// ================================================================================================
// References (f64, from src/backend/cpu semantics)
// ================================================================================================
struct ConvShape {
    size_t b, h, w, ci, co, k, s;
    size_t pad[4];
    size_t oh() const { return (h + pad[0] + pad[1] - k) / s + 1; }
    size_t ow() const { return (w + pad[2] + pad[3] - k) / s + 1; }
};

// out[b, oy, ox, co] = bias[co] + Σ x[b, oy·s − pt + ky, ox·s − pl + kx, ci] · w[co, ci, ky, kx].
static vector<double> conv_fwd_ref(const ConvShape& c, const vector<float>& x, const vector<float>& w,
                                   const vector<float>* bias) {
    size_t oh = c.oh(), ow = c.ow();
    vector<double> out(c.b * oh * ow * c.co);
    for (size_t b = 0; b < c.b; b++)
        for (size_t oy = 0; oy < oh; oy++)
            for (size_t ox = 0; ox < ow; ox++)
                for (size_t co = 0; co < c.co; co++) {
                    double s = bias ? (*bias)[co] : 0.0;
                    for (size_t ky = 0; ky < c.k; ky++)
                        for (size_t kx = 0; kx < c.k; kx++) {
                            long iy = (long)(oy * c.s + ky) - (long)c.pad[0], ix = (long)(ox * c.s + kx) - (long)c.pad[2];
                            if (iy < 0 || iy >= (long)c.h || ix < 0 || ix >= (long)c.w) continue;
                            for (size_t ci = 0; ci < c.ci; ci++)
                                s += (double)x[((b * c.h + iy) * c.w + ix) * c.ci + ci] *
                                     (double)w[((co * c.ci + ci) * c.k + ky) * c.k + kx];
                        }
                    out[((b * oh + oy) * ow + ox) * c.co + co] = s;
                }
    return out;
}
static void conv_bwd_ref(const ConvShape& c, const vector<float>& dout, const vector<float>& x, const vector<float>& w,
                         vector<double>& dx, vector<double>& dw, vector<double>& db) {
    size_t oh = c.oh(), ow = c.ow();
    dx.assign(c.b * c.h * c.w * c.ci, 0.0);
    dw.assign(c.co * c.ci * c.k * c.k, 0.0);
    db.assign(c.co, 0.0);
    for (size_t b = 0; b < c.b; b++)
        for (size_t oy = 0; oy < oh; oy++)
            for (size_t ox = 0; ox < ow; ox++)
                for (size_t co = 0; co < c.co; co++) {
                    double g = dout[((b * oh + oy) * ow + ox) * c.co + co];
                    db[co] += g;
                    for (size_t ky = 0; ky < c.k; ky++)
                        for (size_t kx = 0; kx < c.k; kx++) {
                            long iy = (long)(oy * c.s + ky) - (long)c.pad[0], ix = (long)(ox * c.s + kx) - (long)c.pad[2];
                            if (iy < 0 || iy >= (long)c.h || ix < 0 || ix >= (long)c.w) continue;
                            for (size_t ci = 0; ci < c.ci; ci++) {
                                size_t xi = ((b * c.h + iy) * c.w + ix) * c.ci + ci, wi = ((co * c.ci + ci) * c.k + ky) * c.k + kx;
                                dw[wi] += g * (double)x[xi];
                                dx[xi] += g * (double)w[wi];
                            }
                        }
                }
}

struct AttShape {
    size_t b, lq, lkv, heads, hd;
    bool causal;
};
static bool allowed(const vector<uint32_t>* mask, size_t b, size_t kv_len, bool causal, size_t i, size_t j) {
    return (!mask || (*mask)[b * kv_len + j] != 0) && (!causal || j <= i);
}
static void att_fwd_ref(const AttShape& a, const vector<float>& q, const vector<float>& k, const vector<float>& v,
                        const vector<uint32_t>* mask, float scale, vector<double>& out, vector<double>& lse) {
    size_t w = a.heads * a.hd;
    out.assign(a.b * a.lq * w, 0.0);
    lse.assign(a.b * a.lq * a.heads, 0.0);
    vector<double> s(a.lkv);
    for (size_t b = 0; b < a.b; b++)
        for (size_t i = 0; i < a.lq; i++)
            for (size_t h = 0; h < a.heads; h++) {
                double m = -INFINITY;
                for (size_t j = 0; j < a.lkv; j++) {
                    if (!allowed(mask, b, a.lkv, a.causal, i, j)) continue;
                    double d = 0;
                    for (size_t t = 0; t < a.hd; t++)
                        d += (double)q[(b * a.lq + i) * w + h * a.hd + t] * (double)k[(b * a.lkv + j) * w + h * a.hd + t];
                    s[j] = d * (double)scale;
                    m = std::max(m, s[j]);
                }
                double l = 0;
                for (size_t j = 0; j < a.lkv; j++)
                    if (allowed(mask, b, a.lkv, a.causal, i, j)) l += std::exp(s[j] - m);
                for (size_t j = 0; j < a.lkv; j++) {
                    if (!allowed(mask, b, a.lkv, a.causal, i, j)) continue;
                    double p = std::exp(s[j] - m) / l;
                    for (size_t t = 0; t < a.hd; t++)
                        out[(b * a.lq + i) * w + h * a.hd + t] += p * (double)v[(b * a.lkv + j) * w + h * a.hd + t];
                }
                lse[(b * a.lq + i) * a.heads + h] = m + std::log(l);
            }
}
// backward.rs `attention`: D_i = dO_i·O_i from the given O; P_ij = exp(scale·q_i·k_j − lse_i).
static void att_bwd_ref(const AttShape& a, const vector<float>& dout, const vector<float>& q, const vector<float>& k,
                        const vector<float>& v, const vector<float>& o, const vector<float>& lse,
                        const vector<uint32_t>* mask, float scale, vector<double>& dq, vector<double>& dk,
                        vector<double>& dv) {
    size_t w = a.heads * a.hd;
    dq.assign(a.b * a.lq * w, 0.0);
    dk.assign(a.b * a.lkv * w, 0.0);
    dv.assign(a.b * a.lkv * w, 0.0);
    for (size_t b = 0; b < a.b; b++)
        for (size_t i = 0; i < a.lq; i++)
            for (size_t h = 0; h < a.heads; h++) {
                size_t qi = (b * a.lq + i) * w + h * a.hd;
                double D = 0;
                for (size_t t = 0; t < a.hd; t++) D += (double)dout[qi + t] * (double)o[qi + t];
                double l = lse[(b * a.lq + i) * a.heads + h];
                for (size_t j = 0; j < a.lkv; j++) {
                    if (!allowed(mask, b, a.lkv, a.causal, i, j)) continue;
                    size_t kj = (b * a.lkv + j) * w + h * a.hd;
                    double s = 0, dp = 0;
                    for (size_t t = 0; t < a.hd; t++) {
                        s += (double)q[qi + t] * (double)k[kj + t];
                        dp += (double)dout[qi + t] * (double)v[kj + t];
                    }
                    double p = std::exp(s * (double)scale - l);
                    double ds = p * (dp - D) * (double)scale;
                    for (size_t t = 0; t < a.hd; t++) {
                        dq[qi + t] += ds * (double)k[kj + t];
                        dk[kj + t] += ds * (double)q[qi + t];
                        dv[kj + t] += p * (double)dout[qi + t];
                    }
                }
            }
}

static double gelu_d(double x) { return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0))); }
static double gelu_grad_d(double x) {
    return 0.5 * (1.0 + std::erf(x / std::sqrt(2.0))) + x * std::exp(-0.5 * x * x) / std::sqrt(2.0 * M_PI);
}
static double act_d(double x, int act) {
    switch (act) {
        case 0: return x / (1.0 + std::exp(-1.702 * x));
        case 1: return gelu_d(x);
        case 2: {
            double c = std::sqrt(2.0 / M_PI);
            return 0.5 * x * (1.0 + std::tanh(c * (x + 0.044715 * x * x * x)));
        }
        default: return x / (1.0 + std::exp(-x));
    }
}
static double act_grad_d(double x, int act) {
    switch (act) {
        case 0: {
            double s = 1.0 / (1.0 + std::exp(-1.702 * x));
            return s + x * 1.702 * s * (1.0 - s);
        }
        case 1: return gelu_grad_d(x);
        case 2: {
            double c = std::sqrt(2.0 / M_PI), u = c * (x + 0.044715 * x * x * x), t = std::tanh(u);
            return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x);
        }
        default: {
            double s = 1.0 / (1.0 + std::exp(-x));
            return s * (1.0 + x * (1.0 - s));
        }
    }
}
static const char* act_name(int a) {
    static const char* n[] = {"QuickGelu", "Gelu", "GeluTanh", "Silu"};
    return n[a];
}

// ================================================================================================
// Cases
// ================================================================================================
static Report conv_case(bool bf16, ConvShape c, bool with_bias, bool with_dinp, uint64_t seed, size_t skew = 0) {
    Report r;
    Rng rng(seed);
    Cuda cu;
    cu.bf16 = bf16;
    const size_t oh = c.oh(), ow = c.ow(), rows = c.b * oh * ow;
    auto x = rng.randn(c.b * c.h * c.w * c.ci);
    auto w = rng.randn(c.co * c.ci * c.k * c.k, 1.0f / std::sqrt((float)(c.ci * c.k * c.k)));
    auto bias = rng.randn(c.co);
    T tx(x, skew), tw(w), tb(bias), tout(rows * c.co);
    cu.conv2d_forward(tout, tx, tw, with_bias ? &tb : nullptr, c.b, c.h, c.w, c.ci, c.co, c.k, c.s, c.pad);
    compare(r, "out", bf16, dbl(tout.get()), conv_fwd_ref(c, x, w, with_bias ? &bias : nullptr));

    auto dout = rng.randn(rows * c.co), dx0 = rng.randn(c.b * c.h * c.w * c.ci), dw0 = rng.randn(w.size()),
         db0 = rng.randn(c.co);
    T tdout(dout, skew), tdx(dx0), tdw(dw0), tdb(db0);
    cu.conv2d_backward(with_dinp ? &tdx : nullptr, tdw, &tdb, tdout, tx, tw, c.b, c.h, c.w, c.ci, c.co, c.k, c.s, c.pad);
    vector<double> dx, dw, db;
    conv_bwd_ref(c, dout, x, w, dx, dw, db);
    if (with_dinp) compare(r, "dinp", bf16, inc(tdx, dx0), dx);
    compare(r, "dweight", bf16, inc(tdw, dw0), dw);
    compare(r, "dbias(f32)", false, inc(tdb, db0), db);
    return r;
}

// bf16 convolutions whose weight is a parameter pool (params.rs): read through the pool's bf16
// copy, they give bit for bit what the same weight gives outside one (both round the f32 weight to
// nearest even); after the pool is written and declared written (an upload), the copy follows.
static Report conv_param_copy_case(ConvShape c, uint64_t seed) {
    Report r;
    Rng rng(seed);
    const size_t oh = c.oh(), ow = c.ow(), rows = c.b * oh * ow, nw = c.co * c.ci * c.k * c.k;
    auto x = rng.randn(c.b * c.h * c.w * c.ci), w = rng.randn(nw, 0.1f), bias = rng.randn(c.co);
    auto dout = rng.randn(rows * c.co), zeros = vector<float>(c.b * c.h * c.w * c.ci, 0.0f);
    auto run = [&](bool params, const vector<float>& wv, vector<float>& out, vector<float>& dx) {
        Cuda cu;
        cu.bf16 = true;
        // The weight at offset 40 of a pool of 40 + nw + 8 (parameters before and after it).
        vector<float> pv(40 + nw + 8, 0.25f);
        std::copy(wv.begin(), wv.end(), pv.begin() + 40);
        T pool(pv), tx(x), tb(bias), tout(rows * c.co), tdout(dout), tdx(zeros), tdw(nw, 0), tdb(c.co, 0);
        T tw = pool.view(40, nw);
        if (params) cu.mark_params(pool);
        cu.conv2d_forward(tout, tx, tw, &tb, c.b, c.h, c.w, c.ci, c.co, c.k, c.s, c.pad);
        cu.conv2d_backward(&tdx, tdw, &tdb, tdout, tx, tw, c.b, c.h, c.w, c.ci, c.co, c.k, c.s, c.pad);
        out = tout.get();
        dx = tdx.get();
        if (params) {  // an upload of new weights into the pool, then the forward again
            auto w2 = w;
            for (auto& v : w2) v = -0.5f * v + 0.01f;
            memcpy(tw.p, w2.data(), nw * 4);
            cu.params_written(tw);
            cu.conv2d_forward(tout, tx, tw, &tb, c.b, c.h, c.w, c.ci, c.co, c.k, c.s, c.pad);
            out.insert(out.end(), tout.p, tout.p + tout.n);
        }
    };
    vector<float> o0, d0, o1, d1, o2, d2;  // plain pool, parameter pool, plain pool with new weights
    run(false, w, o0, d0);
    run(true, w, o1, d1);
    auto w2 = w;
    for (auto& v : w2) v = -0.5f * v + 0.01f;
    run(false, w2, o2, d2);
    exact(r, "forward through the parameter copy", vector<float>(o1.begin(), o1.begin() + o0.size()), o0);
    exact(r, "data gradient through the parameter copy", d1, d0);
    exact(r, "forward after the pool was written", vector<float>(o1.begin() + o0.size(), o1.end()), o2);
    return r;
}

static vector<uint32_t> make_mask(Rng& rng, size_t batch, size_t kv) {
    vector<uint32_t> m(batch * kv);
    for (auto& x : m) x = rng.uniform() < 0.75 ? 1u : 0u;
    // Sequence 0: its leading keys masked (40, or half when short); sequence 1: only its last 5
    // keys kept (whole leading key tiles masked for every query). Each keeps ≥ 2 keys when kv ≥ 2:
    // with a single key the exact gradients of q and k vanish, and a relative error is meaningless.
    for (size_t j = 0; j < std::min<size_t>(40, kv / 2); j++) m[j] = 0;
    if (batch > 1)
        for (size_t j = 0; j < kv; j++) m[kv + j] = j + 5 >= kv ? 1u : 0u;
    for (size_t b = 0; b < batch; b++) {
        m[b * kv + kv - 1] = 1;
        if (kv >= 2) m[b * kv + kv - 2] = 1;
    }
    return m;
}

// ws_limit: the materialised path's workspace limit (elements per score-matrix chunk; 0: default).
static Report attention_case(bool bf16, AttShape a, bool masked, uint64_t seed, size_t ws_limit = 0) {
    Report r;
    Rng rng(seed);
    Cuda cu;
    cu.bf16 = bf16;
    if (ws_limit) cu.attn_ws_limit = ws_limit;
    const size_t w = a.heads * a.hd;
    const float scale = 1.0f / std::sqrt((float)a.hd);
    auto q = rng.randn(a.b * a.lq * w), k = rng.randn(a.b * a.lkv * w), v = rng.randn(a.b * a.lkv * w);
    vector<uint32_t> mask;
    if (masked) mask = make_mask(rng, a.b, a.lkv);
    const vector<uint32_t>* mp = masked ? &mask : nullptr;
    T tq(q), tk(k), tv(v), tout(a.b * a.lq * w), tlse(a.b * a.lq * a.heads);
    Cuda::Dims d{a.b, a.lq, a.lkv, a.heads, a.hd};
    cu.attn_forward(masked ? "masked attention" : "attention", tout, tlse, tq, tk, tv, mp, d, scale, a.causal);
    vector<double> out, lse;
    att_fwd_ref(a, q, k, v, mp, scale, out, lse);
    compare(r, "out", bf16, dbl(tout.get()), out);
    compare(r, "lse", bf16, dbl(tlse.get()), lse);

    // Backward from the exact forward's O and lse (rounded to f32), as the CPU reference would get.
    vector<float> of(out.begin(), out.end()), lf(lse.begin(), lse.end());
    auto dout = rng.randn(a.b * a.lq * w), dq0 = rng.randn(a.b * a.lq * w), dk0 = rng.randn(a.b * a.lkv * w),
         dv0 = rng.randn(a.b * a.lkv * w);
    T to(of), tl(lf), tdout(dout), tdq(dq0), tdk(dk0), tdv(dv0);
    cu.attn_backward(masked ? "masked_attention_backward" : "attention_backward", tdq, tdk, tdv, tdout, tq, tk, tv, to,
                     tl, mp, d, scale, a.causal);
    vector<double> dq, dk, dv;
    att_bwd_ref(a, dout, q, k, v, of, lf, mp, scale, dq, dk, dv);
    compare(r, "dq", bf16, inc(tdq, dq0), dq);
    compare(r, "dk", bf16, inc(tdk, dk0), dk);
    compare(r, "dv", bf16, inc(tdv, dv0), dv);
    return r;
}

// The materialised path without keys: out 0 and lse -inf (as the flash kernels), backward a no-op;
// and the wrappers refuse outputs overlapping inputs (as the CPU reference).
static Report attention_wide_edge_case(bool bf16) {
    Report r;
    Rng rng(7);
    Cuda cu;
    cu.bf16 = bf16;
    const size_t b = 2, lq = 5, heads = 2, hd = 200, w = heads * hd;
    T tq(rng.randn(b * lq * w)), tk(1), tv(1), tout(rng.randn(b * lq * w)), tlse(rng.randn(b * lq * heads));
    Cuda::Dims d{b, lq, 0, heads, hd};
    cu.attn_forward("attention", tout, tlse, tq, tk, tv, nullptr, d, 0.1f, false);
    for (size_t i = 0; i < tout.n; i++)
        if (tout.p[i] != 0.0f) {
            r.failure(fmt("kv 0: out[%zu] = %g, not 0", i, tout.p[i]));
            return r;
        }
    for (size_t i = 0; i < tlse.n; i++)
        if (!(std::isinf(tlse.p[i]) && tlse.p[i] < 0)) {
            r.failure(fmt("kv 0: lse[%zu] = %g, not -inf", i, tlse.p[i]));
            return r;
        }
    r.note("kv 0: out 0, lse -inf");
    // Overlap refusals (the Rust returns Err before launching anything).
    T big(rng.randn(3 * lq * w)), lse2(b * lq * heads);
    T qv, ov;
    qv.p = big.p;
    qv.n = lq * w;
    ov.p = big.p + lq * w / 2;  // overlaps qv
    ov.n = lq * w;
    Cuda::Dims d1{1, lq, lq, heads, hd};
    bool refused = false;
    try {
        cu.attn_forward("attention", ov, lse2, qv, qv, qv, nullptr, d1, 0.1f, false);
    } catch (const RustErr& e) {
        refused = string(e.what()).find("overlaps an input") != string::npos;
    }
    if (!refused) r.failure("attention forward with out overlapping q was not refused");
    refused = false;
    try {
        cu.attn_backward("attention_backward", ov, ov, ov, qv, qv, qv, qv, qv, lse2, nullptr, d1, 0.1f, false);
    } catch (const RustErr& e) {
        refused = string(e.what()).find("output tensors overlap") != string::npos;
    }
    if (!refused) r.failure("attention backward with dq = dk was not refused");
    refused = false;
    try {
        const size_t pad[4] = {1, 1, 1, 1};
        T cw(rng.randn(4 * 4 * 9));
        T co;
        co.p = cw.p;
        co.n = 4 * 4 * 4;
        T cx(rng.randn(4 * 4 * 4));
        cu.conv2d_forward(co, cx, cw, nullptr, 1, 4, 4, 4, 4, 3, 1, pad);
    } catch (const RustErr& e) {
        refused = string(e.what()).find("overlaps an input") != string::npos;
    }
    if (!refused) r.failure("conv2d forward with out overlapping the weight was not refused");
    if (r.ok) r.note("overlapping outputs refused (attention fwd/bwd, conv2d fwd)");
    return r;
}

static Report group_norm_case(size_t batch, size_t hw, size_t c, size_t groups, bool silu, uint64_t seed) {
    Report r;
    Rng rng(seed);
    Cuda cu;
    const size_t n = batch * hw * c, bg = batch * groups, cpg = c / groups;
    const float eps = 1e-5f;
    auto x = rng.randn(n, 2.0f);
    for (size_t i = 0; i < n; i++) x[i] += 0.5f + 0.1f * (float)((i % c) / cpg);  // per-group offsets
    auto wt = rng.randn(c), bi = rng.randn(c);
    T tx(x), tw(wt), tb(bi), tout(n), tm(bg), tr(bg);
    cu.group_norm_forward(tout, tm, tr, tx, tw, tb, batch, hw, c, groups, eps, silu);
    vector<double> mu(bg), rs(bg), out(n);
    for (size_t b = 0; b < batch; b++)
        for (size_t g = 0; g < groups; g++) {
            double s = 0, q = 0;
            for (size_t p = 0; p < hw; p++)
                for (size_t j = 0; j < cpg; j++) s += x[(b * hw + p) * c + g * cpg + j];
            double m = s / (double)(hw * cpg);
            for (size_t p = 0; p < hw; p++)
                for (size_t j = 0; j < cpg; j++) q += std::pow(x[(b * hw + p) * c + g * cpg + j] - m, 2);
            mu[b * groups + g] = m;
            rs[b * groups + g] = 1.0 / std::sqrt(q / (double)(hw * cpg) + (double)eps);
        }
    for (size_t i = 0; i < n; i++) {
        size_t ch = i % c, st = (i / (hw * c)) * groups + ch / cpg;
        double y = (x[i] - mu[st]) * rs[st] * wt[ch] + bi[ch];
        out[i] = silu ? y / (1.0 + std::exp(-y)) : y;
    }
    compare(r, "out", false, dbl(tout.get()), out);
    compare(r, "mean", false, dbl(tm.get()), mu);
    compare(r, "rstd", false, dbl(tr.get()), rs);

    vector<float> mf(mu.begin(), mu.end()), rf(rs.begin(), rs.end());
    auto dout = rng.randn(n), di0 = rng.randn(n), dw0 = rng.randn(c), db0 = rng.randn(c);
    T tmf(mf), trf(rf), tdout(dout), tdi(di0), tdw(dw0), tdb(db0);
    cu.group_norm_backward(tdi, tdw, tdb, tdout, tx, tw, tb, tmf, trf, batch, hw, c, groups, silu);
    vector<double> dy(n), xh(n), m1(bg, 0.0), m2(bg, 0.0), di(n), dw(c, 0.0), db(c, 0.0);
    for (size_t i = 0; i < n; i++) {
        size_t ch = i % c, st = (i / (hw * c)) * groups + ch / cpg;
        xh[i] = ((double)x[i] - mf[st]) * (double)rf[st];
        if (silu) {
            double y = xh[i] * wt[ch] + bi[ch], s = 1.0 / (1.0 + std::exp(-y));
            dy[i] = dout[i] * s * (1.0 + y * (1.0 - s));
        } else {
            dy[i] = dout[i];
        }
        m1[st] += dy[i] * wt[ch];
        m2[st] += dy[i] * wt[ch] * xh[i];
        dw[ch] += dy[i] * xh[i];
        db[ch] += dy[i];
    }
    for (size_t i = 0; i < n; i++) {
        size_t ch = i % c, st = (i / (hw * c)) * groups + ch / cpg;
        double cnt = (double)(hw * cpg);
        di[i] = (dy[i] * wt[ch] - m1[st] / cnt - xh[i] * m2[st] / cnt) * (double)rf[st];
    }
    compare(r, "dinp", false, inc(tdi, di0), di);
    compare(r, "dweight", false, inc(tdw, dw0), dw);
    compare(r, "dbias", false, inc(tdb, db0), db);
    return r;
}

static Report layer_norm_case(size_t rows, size_t cols, uint64_t seed) {
    Report r;
    Rng rng(seed);
    Cuda cu;
    const size_t n = rows * cols;
    const float eps = 1e-5f;
    auto x = rng.randn(n, 1.5f);
    for (size_t i = 0; i < n; i++) x[i] += 0.3f * (float)(i / cols % 5);
    auto wt = rng.randn(cols), bi = rng.randn(cols);
    T tx(x), tw(wt), tb(bi), tout(n), tm(rows), tr(rows);
    cu.layer_norm_forward(tout, tm, tr, tx, tw, tb, rows, cols, eps);
    vector<double> mu(rows), rs(rows), out(n);
    for (size_t i = 0; i < rows; i++) {
        double s = 0, q = 0;
        for (size_t j = 0; j < cols; j++) s += x[i * cols + j];
        mu[i] = s / cols;
        for (size_t j = 0; j < cols; j++) q += std::pow(x[i * cols + j] - mu[i], 2);
        rs[i] = 1.0 / std::sqrt(q / cols + eps);
        for (size_t j = 0; j < cols; j++) out[i * cols + j] = (x[i * cols + j] - mu[i]) * rs[i] * wt[j] + bi[j];
    }
    compare(r, "out", false, dbl(tout.get()), out);
    compare(r, "mean", false, dbl(tm.get()), mu);
    compare(r, "rstd", false, dbl(tr.get()), rs);

    vector<float> mf(mu.begin(), mu.end()), rf(rs.begin(), rs.end());
    auto dout = rng.randn(n), di0 = rng.randn(n), dw0 = rng.randn(cols), db0 = rng.randn(cols);
    T tmf(mf), trf(rf), tdout(dout), tdi(di0), tdw(dw0), tdb(db0);
    cu.layer_norm_backward(tdi, tdw, tdb, tdout, tx, tw, tmf, trf, rows, cols);
    vector<double> di(n), dw(cols, 0.0), db(cols, 0.0);
    for (size_t i = 0; i < rows; i++) {
        double m1 = 0, m2 = 0;
        for (size_t j = 0; j < cols; j++) {
            double xh = ((double)x[i * cols + j] - mf[i]) * rf[i], g = (double)dout[i * cols + j] * wt[j];
            m1 += g;
            m2 += g * xh;
            dw[j] += dout[i * cols + j] * xh;
            db[j] += dout[i * cols + j];
        }
        m1 /= cols;
        m2 /= cols;
        for (size_t j = 0; j < cols; j++) {
            double xh = ((double)x[i * cols + j] - mf[i]) * rf[i], g = (double)dout[i * cols + j] * wt[j];
            di[i * cols + j] = (g - m1 - xh * m2) * rf[i];
        }
    }
    compare(r, "dinp", false, inc(tdi, di0), di);
    compare(r, "dweight", false, inc(tdw, dw0), dw);
    compare(r, "dbias", false, inc(tdb, db0), db);
    return r;
}

static Report activation_case(int act, uint64_t seed) {
    Report r;
    Rng rng(seed);
    Cuda cu;
    const size_t n = 3000;
    auto x = rng.randn(n, 3.0f);
    x[0] = 0.0f;
    x[1] = -12.0f;
    x[2] = 12.0f;
    x[3] = -40.0f;
    T tx(x), tout(n);
    cu.activation_forward(tout, tx, act, n);
    vector<double> out(n), di(n);
    for (size_t i = 0; i < n; i++) out[i] = act_d(x[i], act);
    compare(r, "out", false, dbl(tout.get()), out);
    auto dout = rng.randn(n), di0 = rng.randn(n);
    T tdout(dout), tdi(di0);
    cu.activation_backward(tdi, tdout, tx, act, n);
    for (size_t i = 0; i < n; i++) di[i] = dout[i] * act_grad_d(x[i], act);
    compare(r, "dinp", false, inc(tdi, di0), di);
    return r;
}

static Report geglu_case(uint64_t seed) {
    Report r;
    Rng rng(seed);
    Cuda cu;
    const size_t rows = 9, inner = 45;
    auto x = rng.randn(rows * 2 * inner, 2.0f);
    T tx(x), tout(rows * inner);
    cu.geglu_forward(tout, tx, rows, inner);
    vector<double> out(rows * inner), di(rows * 2 * inner);
    for (size_t i = 0; i < rows; i++)
        for (size_t j = 0; j < inner; j++) out[i * inner + j] = x[i * 2 * inner + j] * gelu_d(x[i * 2 * inner + inner + j]);
    compare(r, "out", false, dbl(tout.get()), out);
    auto dout = rng.randn(rows * inner), di0 = rng.randn(rows * 2 * inner);
    T tdout(dout), tdi(di0);
    cu.geglu_backward(tdi, tdout, tx, rows, inner);
    for (size_t i = 0; i < rows; i++)
        for (size_t j = 0; j < inner; j++) {
            double xv = x[i * 2 * inner + j], gate = x[i * 2 * inner + inner + j], g = dout[i * inner + j];
            di[i * 2 * inner + j] = g * gelu_d(gate);
            di[i * 2 * inner + inner + j] = g * xv * gelu_grad_d(gate);
        }
    compare(r, "dinp", false, inc(tdi, di0), di);
    return r;
}

static Report upsample_case(size_t batch, size_t ih, size_t iw, size_t oh, size_t ow, size_t c, uint64_t seed) {
    Report r;
    Rng rng(seed);
    Cuda cu;
    auto x = rng.randn(batch * ih * iw * c);
    T tx(x), tout(batch * oh * ow * c);
    cu.upsample_nearest_forward(tout, tx, batch, ih, iw, oh, ow, c);
    const float sy = (float)ih / (float)oh, sx = (float)iw / (float)ow;  // PyTorch / the CPU: f32 scale
    auto src = [](size_t o, float s, size_t in) { return std::min((size_t)std::floor((float)o * s), in - 1); };
    vector<double> out(batch * oh * ow * c), di(batch * ih * iw * c, 0.0);
    auto dout = rng.randn(out.size()), di0 = rng.randn(di.size());
    for (size_t b = 0; b < batch; b++)
        for (size_t oy = 0; oy < oh; oy++)
            for (size_t ox = 0; ox < ow; ox++)
                for (size_t ch = 0; ch < c; ch++) {
                    size_t si = ((b * ih + src(oy, sy, ih)) * iw + src(ox, sx, iw)) * c + ch,
                           oi = ((b * oh + oy) * ow + ox) * c + ch;
                    out[oi] = x[si];
                    di[si] += dout[oi];
                }
    compare(r, "out", false, dbl(tout.get()), out);
    T tdout(dout), tdi(di0);
    cu.upsample_nearest_backward(tdi, tdout, batch, ih, iw, oh, ow, c);
    compare(r, "dinp", false, inc(tdi, di0), di);
    // The kernel claims backward.rs's f32 summation order (bit-identical).
    vector<float> cpu = di0;
    for (size_t b = 0; b < batch; b++)
        for (size_t oy = 0; oy < oh; oy++)
            for (size_t ox = 0; ox < ow; ox++)
                for (size_t ch = 0; ch < c; ch++)
                    cpu[((b * ih + src(oy, sy, ih)) * iw + src(ox, sx, iw)) * c + ch] += dout[((b * oh + oy) * ow + ox) * c + ch];
    exact(r, "dinp", tdi.get(), cpu);
    return r;
}

static Report bias_rows_concat_add_case(uint64_t seed) {
    Report r;
    Rng rng(seed);
    Cuda cu;
    {  // add_bias_rows forward/backward
        const size_t batch = 3, rows = 300, c = 37;  // rows > 256: two row chunks in the backward
        auto x = rng.randn(batch * rows * c), b = rng.randn(batch * c);
        T tx(x), tb(b), tout(x.size());
        cu.add_bias_rows_forward(tout, tx, tb, batch, rows, c);
        vector<double> out(x.size()), db(batch * c, 0.0);
        auto dout = rng.randn(x.size()), db0 = rng.randn(batch * c);
        for (size_t i = 0; i < x.size(); i++) {
            size_t bb = i / (rows * c), ch = i % c;
            out[i] = (double)x[i] + (double)b[bb * c + ch];
            db[bb * c + ch] += dout[i];
        }
        compare(r, "bias_rows out", false, dbl(tout.get()), out);
        T tdout(dout), tdb(db0);
        cu.add_bias_rows_backward(tdb, tdout, batch, rows, c);
        compare(r, "bias_rows dbias", false, inc(tdb, db0), db);
    }
    {  // concat_channels forward/backward
        const size_t rows = 30, ca = 13, cb = 22;
        auto a = rng.randn(rows * ca), b = rng.randn(rows * cb);
        T ta(a), tb(b), tout(rows * (ca + cb));
        cu.concat_channels_forward(tout, ta, tb, rows, ca, cb);
        vector<double> out(rows * (ca + cb)), da(rows * ca), db(rows * cb);
        auto dout = rng.randn(out.size()), da0 = rng.randn(da.size()), db0 = rng.randn(db.size());
        for (size_t i = 0; i < rows; i++) {
            for (size_t j = 0; j < ca; j++) out[i * (ca + cb) + j] = a[i * ca + j], da[i * ca + j] = dout[i * (ca + cb) + j];
            for (size_t j = 0; j < cb; j++)
                out[i * (ca + cb) + ca + j] = b[i * cb + j], db[i * cb + j] = dout[i * (ca + cb) + ca + j];
        }
        compare(r, "concat out", false, dbl(tout.get()), out);
        T tdout(dout), tda(da0), tdb(db0);
        cu.concat_channels_backward(tda, tdb, tdout, rows, ca, cb);
        compare(r, "concat da", false, inc(tda, da0), da);
        compare(r, "concat db", false, inc(tdb, db0), db);
    }
    {  // add, accumulate, scale, zero
        const size_t n = 2500;
        auto a = rng.randn(n), b = rng.randn(n);
        T ta(a), tb(b), tout(n);
        cu.add_forward(tout, ta, tb, n);
        vector<double> out(n), acc(n), sc(n);
        for (size_t i = 0; i < n; i++) out[i] = (double)a[i] + b[i], acc[i] = (double)a[i] + b[i], sc[i] = a[i] * 0.37;
        compare(r, "add", false, dbl(tout.get()), out);
        T tacc(a);
        cu.accumulate(tacc, tb, n);
        compare(r, "accumulate", false, dbl(tacc.get()), acc);
        T tsc(a);
        cu.scale(tsc, 0.37f, n);
        compare(r, "scale", false, dbl(tsc.get()), sc);
        T tz(a);
        cu.zero(tz);
        compare(r, "zero", false, dbl(tz.get()), vector<double>(n, 0.0));
    }
    return r;
}

static Report embedding_case(uint64_t seed) {
    Report r;
    Rng rng(seed);
    Cuda cu;
    const size_t batch = 2, seq = 7, dim = 150, vocab = 10, positions = 9;
    vector<uint32_t> ids(batch * seq);
    for (auto& id : ids) id = (uint32_t)(rng.next() % 4) * 3;  // repeats; ids 0, 3, 6, 9
    auto wte = rng.randn(vocab * dim), wpe = rng.randn(positions * dim);
    T twte(wte), twpe(wpe), tout(batch * seq * dim);
    cu.embedding_forward(tout, ids, twte, twpe, batch, seq, dim);
    vector<double> out(batch * seq * dim), dte(vocab * dim, 0.0), dpe(positions * dim, 0.0);
    auto dout = rng.randn(out.size()), dte0 = rng.randn(dte.size()), dpe0 = rng.randn(dpe.size());
    for (size_t row = 0; row < batch * seq; row++)
        for (size_t d = 0; d < dim; d++) {
            out[row * dim + d] = (double)wte[ids[row] * dim + d] + wpe[(row % seq) * dim + d];
            dte[ids[row] * dim + d] += dout[row * dim + d];
            dpe[(row % seq) * dim + d] += dout[row * dim + d];
        }
    compare(r, "out", false, dbl(tout.get()), out);
    T tdout(dout), tdte(dte0), tdpe(dpe0);
    cu.embedding_backward(tdte, tdpe, tdout, ids, batch, seq, dim);
    compare(r, "dwte", false, inc(tdte, dte0), dte);
    compare(r, "dwpe", false, inc(tdpe, dpe0), dpe);
    // The kernel claims the CPU's serial row order (bit-identical).
    vector<float> te = dte0, pe = dpe0;
    for (size_t row = 0; row < batch * seq; row++)
        for (size_t d = 0; d < dim; d++) {
            te[ids[row] * dim + d] += dout[row * dim + d];
            pe[(row % seq) * dim + d] += dout[row * dim + d];
        }
    exact(r, "dwte", tdte.get(), te);
    exact(r, "dwpe", tdpe.get(), pe);
    return r;
}

static Report optim_case(uint64_t seed) {
    Report r;
    Rng rng(seed);
    Cuda cu;
    {  // mse_loss: loss = mean((p − t)²) (f64 sum), dpred = (2·(p − t)) / n written
        const size_t n = 5000;
        auto p = rng.randn(n), t = rng.randn(n);
        T tp(p), tt(t), td(n), tl(1);
        cu.mse_loss(td, tl, tp, tt, n);
        double s = 0;
        vector<float> dcpu(n);
        for (size_t i = 0; i < n; i++) {
            float d = p[i] - t[i];
            s += (double)d * d;
            dcpu[i] = 2.0f * d / (float)n;
        }
        compare(r, "mse loss", false, dbl(tl.get()), {s / n});
        exact(r, "mse dpred", td.get(), dcpu);
        T tss(1);
        cu.sum_squares(tss, tp, n);
        double q = 0;
        for (float v : p) q += (double)v * v;
        compare(r, "sum_squares", false, dbl(tss.get()), {q});
    }
    {  // adamw, step 3
        const size_t n = 3000, step = 3;
        const float lr = 1e-3f, b1 = 0.9f, b2 = 0.999f, eps = 1e-8f, wd = 1e-2f;
        auto p = rng.randn(n), g = rng.randn(n), m = rng.randn(n, 0.1f), v = rng.randn(n, 0.1f);
        for (auto& x : v) x = x * x;
        T tp(p), tg(g), tm(m), tv(v);
        cu.adamw_step(tp, tg, tm, tv, n, lr, b1, b2, eps, wd, step);
        // backward.rs `adamw`, f32 in its operation order (bit-exact expected), and in f64.
        double bc1 = 1.0 - std::pow((double)b1, (int)step);
        float bc2_sqrt = (float)std::sqrt(1.0 - std::pow((double)b2, (int)step));
        float step_size = (float)((double)lr / bc1);
        float decay = (float)(1.0 - (double)lr * (double)wd);
        vector<float> pc = p, mc = m, vc = v;
        vector<double> pd(n), md(n), vd(n);
        for (size_t i = 0; i < n; i++) {
            pc[i] *= decay;
            mc[i] = mc[i] + (g[i] - mc[i]) * (1.0f - b1);
            vc[i] = vc[i] * b2 + g[i] * g[i] * (1.0f - b2);
            float denom = std::sqrt(vc[i]) / bc2_sqrt + eps;
            pc[i] -= step_size * mc[i] / denom;
            double mm = (double)m[i] + ((double)g[i] - m[i]) * (1.0 - b1);
            double vv = (double)v[i] * b2 + (double)g[i] * g[i] * (1.0 - b2);
            md[i] = mm;
            vd[i] = vv;
            pd[i] = (double)p[i] * (1.0 - (double)lr * wd) -
                    ((double)lr / bc1) * mm / (std::sqrt(vv) / std::sqrt(1.0 - std::pow((double)b2, (int)step)) + eps);
        }
        compare(r, "adamw param", false, dbl(tp.get()), pd);
        compare(r, "adamw m", false, dbl(tm.get()), md);
        compare(r, "adamw v", false, dbl(tv.get()), vd);
        exact(r, "adamw", tp.get(), pc);
        // The same step on a parameter pool in bf16 mode: the f32 result as before, and the pool's
        // bf16 copy written in the same pass with the new weights rounded to nearest even.
        Cuda cb;
        cb.bf16 = true;
        T tp2(p), tg2(g), tm2(m), tv2(v);
        cb.mark_params(tp2);
        cb.adamw_step(tp2, tg2, tm2, tv2, n, lr, b1, b2, eps, wd, step);
        exact(r, "adamw (parameter pool)", tp2.get(), pc);
        const uint16_t* copy = (const uint16_t*)cb.param_copies.at(tp2.p).p;
        size_t bad = 0;
        for (size_t i = 0; i < n; i++) bad += copy[i] != __float2bfloat16_rn(pc[i]).__x;
        if (bad) r.failure(fmt("adamw: %zu of the bf16 copy's values are not the new weights rounded", bad));
        else r.note("adamw bf16 copy exact");
        if (cb.param_copies.at(tp2.p).stale) r.failure("adamw over the whole pool left its copy stale");
        {  // a step over part of the pool (elements 100..100+k) writes that part of the copy only
            const size_t off = 100, k = 1000;
            Cuda cp;
            cp.bf16 = true;
            T pp(p), gp(g), mp(m), vp(v);
            cp.mark_params(pp);
            cp.param_bf16(pp);  // the copy made from the old weights
            T part = pp.view(off, k), gpart = gp.view(off, k), mpart = mp.view(off, k), vpart = vp.view(off, k);
            cp.adamw_step(part, gpart, mpart, vpart, k, lr, b1, b2, eps, wd, step);
            const uint16_t* cc = (const uint16_t*)cp.param_copies.at(pp.p).p;
            size_t wrong = 0;
            for (size_t i = 0; i < n; i++) {
                const float want = (i >= off && i < off + k) ? pc[i] : p[i];
                wrong += cc[i] != __float2bfloat16_rn(want).__x;
            }
            if (wrong) r.failure(fmt("adamw over part of a pool: %zu copy values wrong", wrong));
            else r.note("partial adamw copy exact");
        }
    }
    {  // lerp: dst −= w·(dst − src)
        const size_t n = 2000;
        auto d = rng.randn(n), s = rng.randn(n);
        T td(d), ts(s);
        cu.lerp(td, ts, n, 0.001f);
        vector<float> want = d;
        vector<double> wd(n);
        for (size_t i = 0; i < n; i++) {
            want[i] -= 0.001f * (want[i] - s[i]);
            wd[i] = (double)d[i] - 0.001 * ((double)d[i] - s[i]);
        }
        compare(r, "lerp", false, dbl(td.get()), wd);
        exact(r, "lerp", td.get(), want);
    }
    return r;
}

// src/rng.rs `philox4x32_10`, `box_muller`, `philox_normals`, transcribed (the reference of the
// kernel's output); the Random123 known answers pin both this and the device function.
static void philox_ref(uint32_t c[4], uint32_t k0, uint32_t k1) {
    for (int round = 0; round < 10; round++) {
        if (round > 0) k0 += 0x9E3779B9u, k1 += 0xBB67AE85u;
        uint64_t p0 = 0xD2511F53ull * c[0], p1 = 0xCD9E8D57ull * c[2];
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c[1] ^ k0, n1 = (uint32_t)p1, n2 = (uint32_t)(p0 >> 32) ^ c[3] ^ k1,
                 n3 = (uint32_t)p0;
        c[0] = n0, c[1] = n1, c[2] = n2, c[3] = n3;
    }
}
static vector<float> philox_normals_ref(size_t n, uint64_t seed, uint64_t stream) {
    vector<float> out(n);
    for (size_t g = 0; 4 * g < n; g++) {
        uint32_t c[4] = {(uint32_t)g, (uint32_t)((uint64_t)g >> 32), (uint32_t)stream, (uint32_t)(stream >> 32)};
        philox_ref(c, (uint32_t)seed, (uint32_t)(seed >> 32));
        for (int p = 0; p < 2; p++) {
            double u1 = ((double)c[2 * p] + 1.0) * (1.0 / 4294967296.0), u2 = (double)c[2 * p + 1] * (1.0 / 4294967296.0);
            double r = std::sqrt(-2.0 * std::log(u1)), t = 2.0 * 3.141592653589793 * u2;
            float z[2] = {(float)(r * std::cos(t)), (float)(r * std::sin(t))};
            for (int j = 0; j < 2; j++)
                if (4 * g + 2 * p + j < n) out[4 * g + 2 * p + j] = z[j];
        }
    }
    return out;
}
// The device function on the known-answer inputs (counter, key) → four words.
__global__ void emu_philox_kat(uint32_t* out, const uint32_t* in) {
    const uint32_t* v = in + 6 * threadIdx.x;
    PhiloxWords w = philox4x32_10(v[0], v[1], v[2], v[3], v[4], v[5]);
    for (int j = 0; j < 4; j++) out[4 * threadIdx.x + j] = w.w[j];
}

// diffusers' get_timestep_embedding, the CPU's f32 operations transcribed (expected bit-exact
// here: the emulation uses the same libm), and in f64 (the tolerance the GPU's expf/sinf/cosf get).
static Report timestep_embedding_case() {
    Report r;
    Cuda cu;
    const float ts_v[3] = {999.0f, 1.0f, 481.5f};
    for (auto [dim, flip, shift] : {std::tuple<size_t, bool, float>{320, true, 0.0f}, {33, false, 1.0f}}) {
        vector<float> tsv(ts_v, ts_v + 3);
        T ts(tsv), out(3 * dim);
        cu.timestep_embedding(out, ts, 3, dim, flip, shift);
        vector<float> want(3 * dim, 0.0f);
        vector<double> wd(3 * dim, 0.0);
        const size_t half = dim / 2;
        const float log_period = (float)-std::log(10000.0);
        for (size_t b = 0; b < 3; b++)
            for (size_t i = 0; i < half; i++) {
                float e = log_period * (float)i / ((float)half - shift);
                float arg = ts_v[b] * std::exp(e);
                double ad = (double)ts_v[b] * std::exp(-std::log(10000.0) * i / ((double)half - shift));
                size_t s_at = b * dim + (flip ? half + i : i), c_at = b * dim + (flip ? i : half + i);
                want[s_at] = std::sin(arg), want[c_at] = std::cos(arg);
                wd[s_at] = std::sin(ad), wd[c_at] = std::cos(ad);
            }
        compare(r, fmt("dim %zu", dim).c_str(), false, dbl(out.get()), wd);
        exact(r, fmt("dim %zu", dim).c_str(), out.get(), want);
    }
    return r;
}

static Report random_case(uint64_t seed) {
    Report r;
    Cuda cu;
    {  // Random123's kat_vectors, philox4x32 10 rounds
        const uint32_t kat[3][10] = {
            {0, 0, 0, 0, 0, 0, 0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8},
            {~0u, ~0u, ~0u, ~0u, ~0u, ~0u, 0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd},
            {0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344, 0xa4093822, 0x299f31d0, 0xd16cfe09, 0x94fdcceb, 0x5001e420,
             0x24126ea1},
        };
        T in(18), out(12);
        uint32_t* ip = (uint32_t*)in.p;
        for (int i = 0; i < 3; i++)
            for (int j = 0; j < 6; j++) ip[6 * i + j] = kat[i][j];
        emu::launch_args("emu_philox_kat", &emu_philox_kat, 0, dim3(1), dim3(3), 0, {emu::P(out.p), emu::P(in.p)});
        for (int i = 0; i < 3; i++)
            for (int j = 0; j < 4; j++) {
                uint32_t got;
                memcpy(&got, &out.p[4 * i + j], 4);
                if (got != kat[i][6 + j]) r.failure(fmt("Philox KAT %d word %d: %08x, want %08x", i, j, got, kat[i][6 + j]));
            }
        uint32_t c[4] = {0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344};
        philox_ref(c, 0xa4093822, 0x299f31d0);
        if (c[0] != 0xd16cfe09 || c[3] != 0x24126ea1) r.failure("the C++ Philox reference fails its known answer");
        r.note("Philox KATs");
    }
    // Lengths not a multiple of 4 (a partial last group), 64-bit seeds and streams, an offset view.
    const struct { size_t n; uint64_t seed, stream; } draws[] = {
        {4099, seed, 0}, {1, 7, (5ull << 32) | 3}, {70001, 0xFEEDFACECAFEBEEFull, 42}};
    for (auto& d : draws) {
        T o(d.n + 3);
        vector<float> before(o.p, o.p + o.n);
        T view;
        view.p = o.p + 1, view.n = d.n;
        cu.randn(view, d.n, d.seed, d.stream);
        exact(r, fmt("randn n=%zu", d.n).c_str(), view.get(), philox_normals_ref(d.n, d.seed, d.stream));
        if (memcmp(&o.p[0], &before[0], 4) != 0 || memcmp(&o.p[d.n + 1], &before[d.n + 1], 8) != 0)
            r.failure(fmt("randn n=%zu wrote outside its view", d.n));
    }
    for (int v = 0; v < 2; v++) {  // add_noise in place, epsilon and v-prediction targets
        Rng rng(seed + v);
        const size_t n = 3001;
        auto x = rng.randn(n), e = rng.randn(n);
        const float sa = 0.8f, s1a = 0.6f;
        T tx(x), te(e);
        cu.ddpm_add_noise(tx, te, n, sa, s1a, v);
        vector<float> wx(n), we(n);
        for (size_t i = 0; i < n; i++) {
            wx[i] = sa * x[i] + s1a * e[i];
            we[i] = v ? sa * e[i] - s1a * x[i] : e[i];
        }
        exact(r, v ? "add_noise (v) latents" : "add_noise latents", tx.get(), wx);
        exact(r, v ? "add_noise (v) target" : "add_noise target", te.get(), we);
    }
    return r;
}

static Report linear_bias_case(uint64_t seed) {
    Report r;
    Rng rng(seed);
    Cuda cu;
    const size_t rows = 50, out_f = 70;
    auto b = rng.randn(out_f);
    T tb(b), tout(rows * out_f);
    cu.linear_bias_fill(tout, tb, rows, out_f);
    vector<double> out(rows * out_f), db(out_f, 0.0);
    auto dout = rng.randn(rows * out_f), db0 = rng.randn(out_f);
    for (size_t i = 0; i < rows * out_f; i++) out[i] = b[i % out_f], db[i % out_f] += dout[i];
    compare(r, "bias fill", false, dbl(tout.get()), out);
    T tdout(dout), tdb(db0);
    cu.linear_bias_grad(tdb, tdout, rows, out_f);
    compare(r, "dbias", false, inc(tdb, db0), db);
    return r;
}

// ---- emulator self-tests ------------------------------------------------------------------------------
__global__ void emu_selftest_block(float* out, int n) {
    __shared__ float s[256];
    const int t = threadIdx.x;
    s[t] = (float)t;
    __syncthreads();
    float v = s[(t + 1) % blockDim.x];
    __syncthreads();
    s[t] = v * 2.0f;
    __syncthreads();
    float w = warp_sum((float)(t & 31));  // 0 + 1 + … + 31 = 496 in every lane
    float dn = __shfl_down_sync(0xffffffffu, (float)t, 3);
    float bc = __shfl_sync(0xffffffffu, (float)t, 5);
    if (t < n) out[t] = s[(t + 2) % blockDim.x] + 1000.0f * (w == 496.0f) + 10000.0f * dn + 1e6f * bc;
}
// One warp: A (16×16) and B (16×8) bf16 values from global memory into the documented fragments.
__global__ void emu_selftest_mma(float* d_out, const float* A, const float* B, const float* C) {
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    uint32_t a[4], b[2];
    a[0] = pack_bf16x2(A[g * 16 + 2 * t], A[g * 16 + 2 * t + 1]);
    a[1] = pack_bf16x2(A[(g + 8) * 16 + 2 * t], A[(g + 8) * 16 + 2 * t + 1]);
    a[2] = pack_bf16x2(A[g * 16 + 2 * t + 8], A[g * 16 + 2 * t + 9]);
    a[3] = pack_bf16x2(A[(g + 8) * 16 + 2 * t + 8], A[(g + 8) * 16 + 2 * t + 9]);
    b[0] = pack_bf16x2(B[(2 * t) * 8 + g], B[(2 * t + 1) * 8 + g]);
    b[1] = pack_bf16x2(B[(2 * t + 8) * 8 + g], B[(2 * t + 9) * 8 + g]);
    float c[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t], C[(g + 8) * 8 + 2 * t + 1]};
    float d[4];
    mma_bf16_16816(d, a, b, c);
    d_out[g * 8 + 2 * t] = d[0];
    d_out[g * 8 + 2 * t + 1] = d[1];
    d_out[(g + 8) * 8 + 2 * t] = d[2];
    d_out[(g + 8) * 8 + 2 * t + 1] = d[3];
}

// Shared memory starts as garbage (0xFF bytes: NaN), static and dynamic.
__global__ void emu_selftest_uninit(float* out) {
    __shared__ float u[8];
    extern __shared__ float att_smem_f32[];
    if (threadIdx.x == 0) {
        u[0] = 1.0f;
        out[0] = u[3];
        out[1] = att_smem_f32[7];
    }
}

static Report emu_selftest() {
    Report r;
    {
        T o(2, 0);
        emu::launch_args("emu_selftest_uninit", &emu_selftest_uninit, 0, dim3(1), dim3(32), 64, {emu::P(o.p)});
        uint32_t b0, b1;
        memcpy(&b0, &o.p[0], 4);
        memcpy(&b1, &o.p[1], 4);
        if (b0 != 0xFFFFFFFFu || b1 != 0xFFFFFFFFu)
            r.failure(fmt("uninitialised shared memory reads %08x / %08x, want the NaN fill ffffffff", b0, b1));
    }
    // bf16 round to nearest even.
    struct {
        uint32_t in;
        uint16_t out;
    } cases[] = {{0x3F800000u, 0x3F80}, {0x3F808000u, 0x3F80}, {0x3F818000u, 0x3F82}, {0x3F808001u, 0x3F81},
                 {0x7F7FFFFFu, 0x7F80}, {0xFF800000u, 0xFF80}, {0x7FC00001u, 0x7FFF}, {0x00000001u, 0x0000},
                 {0x80008000u, 0x8000}, {0x00018000u, 0x0002}};
    for (auto& c : cases) {
        float f;
        memcpy(&f, &c.in, 4);
        uint16_t got = __float2bfloat16_rn(f).__x;
        if (got != c.out) r.failure(fmt("bf16(%08x) = %04x, want %04x", c.in, got, c.out));
    }
    // Barriers and shuffles.
    T out(96);
    emu::launch_args("emu_selftest_block", &emu_selftest_block, 0, dim3(1), dim3(96), 0,
                     {emu::P(out.p), emu::I(96)});
    for (int t = 0; t < 96; t++) {
        int lane = t & 31, base = t - lane;
        double want = 2.0 * ((t + 3) % 96) + 1000.0 + 10000.0 * (lane + 3 < 32 ? t + 3 : t) + 1e6 * (base + 5);
        if ((double)out.p[t] != (double)(float)want) {
            r.failure(fmt("block self-test thread %d: %g, want %g", t, out.p[t], want));
            break;
        }
    }
    // mma against the naive product of the bf16-rounded operands.
    Rng rng(7);
    auto A = rng.randn(256), B = rng.randn(128), C = rng.randn(128);
    T tA(A), tB(B), tC(C), tD(128);
    emu::launch_args("emu_selftest_mma", &emu_selftest_mma, 0, dim3(1), dim3(32), 0,
                     {emu::P(tD.p), emu::P(tA.p), emu::P(tB.p), emu::P(tC.p)});
    vector<double> ref(128);
    for (int i = 0; i < 16; i++)
        for (int n = 0; n < 8; n++) {
            double s = C[i * 8 + n];
            for (int k = 0; k < 16; k++)
                s += (double)__bfloat162float(__float2bfloat16_rn(A[i * 16 + k])) *
                     (double)__bfloat162float(__float2bfloat16_rn(B[k * 8 + n]));
            ref[i * 8 + n] = s;
        }
    compare(r, "mma", false, dbl(tD.get()), ref);
    if (r.ok) r.note("bf16 rounding, barriers, shuffles, mma fragments");
    return r;
}

struct Case {
    string name;
    std::function<Report()> fn;
    // Negative tests of the emulator's checks: the case passes when it fails with this in its output.
    string expect_error;
};

// ---- negative tests: each must be reported by the emulator ---------------------------------------------
__global__ void emu_bad_divergent_barrier(float* out) {
    if (threadIdx.x < 16) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 0.0f;
}
__global__ void emu_bad_shfl_after_exit(float* out) {
    if (threadIdx.x == 3) return;
    out[threadIdx.x] = warp_sum(1.0f);
}
__global__ void emu_bad_dynamic_smem(float* out, int n) {
    extern __shared__ float att_smem_f32[];
    att_smem_f32[threadIdx.x * n] = 1.0f;  // n floats per thread: thread 1 writes past n·4 bytes
    out[threadIdx.x] = 0.0f;
}
__global__ void emu_bad_read_past_end(float* out, const float* in, int n) { out[threadIdx.x] = in[n + threadIdx.x]; }
__global__ void emu_bad_misaligned(float* out, const float* in) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(in + 1));
    out[threadIdx.x] = v.x;
}
// Missing __syncthreads: under the warp-greedy schedule warp 0 reads what warp 1 has not written.
__global__ void emu_bad_race(float* out) {
    __shared__ float s[64];
    s[threadIdx.x] = 1.0f;
    out[threadIdx.x] = s[(threadIdx.x + 32) % 64];
}

static void negative_cases(vector<Case>& v) {
    v.push_back({"emu check: divergent __syncthreads", [] {
                     T o(32);
                     emu::launch_args("emu_bad_divergent_barrier", &emu_bad_divergent_barrier, 0, dim3(1), dim3(32), 0,
                                      {emu::P(o.p)});
                     return Report{};
                 }, "different call sites"});
    v.push_back({"emu check: shuffle naming an exited lane", [] {
                     T o(32);
                     emu::launch_args("emu_bad_shfl_after_exit", &emu_bad_shfl_after_exit, 0, dim3(1), dim3(32), 0,
                                      {emu::P(o.p)});
                     return Report{};
                 }, "exited"});
    v.push_back({"emu check: write past the dynamic shared memory", [] {
                     T o(32);
                     emu::launch_args("emu_bad_dynamic_smem", &emu_bad_dynamic_smem, 0, dim3(1), dim3(32), 64,
                                      {emu::P(o.p), emu::I(16)});
                     return Report{};
                 }, "past the launch's 64 bytes"});
    v.push_back({"emu check: read past the end of a buffer", [] {
                     T o(32), in(10);
                     emu::launch_args("emu_bad_read_past_end", &emu_bad_read_past_end, 0, dim3(1), dim3(32), 0,
                                      {emu::P(o.p), emu::P(in.p), emu::I(10)});
                     return Report{};
                 }, "SIGSEGV"});
    v.push_back({"emu check: misaligned float4 load", [] {
                     T o(32), in(64);
                     emu::launch_args("emu_bad_misaligned", &emu_bad_misaligned, 0, dim3(1), dim3(32), 0,
                                      {emu::P(o.p), emu::P(in.p)});
                     return Report{};
                 }, "misaligned"});
    v.push_back({"emu check: argument kinds (an f32 for an int)", [] {
                     T o(32), in(10);
                     emu::launch_args("emu_bad_read_past_end", &emu_bad_read_past_end, 0, dim3(1), dim3(32), 0,
                                      {emu::P(o.p), emu::P(in.p), emu::F(1.0f)});
                     return Report{};
                 }, "argument 2"});
    v.push_back({"emu check: argument count", [] {
                     T o(32), in(10);
                     Cuda().launch("ew_zero", {1, 1, 1}, {256, 1, 1}, 0, {emu::P(o.d())});
                     return Report{};
                 }, "takes 2 parameters"});
    v.push_back({"emu check: __launch_bounds__", [] {
                     T db(64), dout(64);
                     Cuda().launch("conv2d_bias_grad", {1, 1, 1}, {512, 1, 1}, 0,
                                   {emu::P(db.d()), emu::P(dout.d()), emu::I(1), emu::I(64), emu::I(1)});
                     return Report{};
                 }, "__launch_bounds__(256)"});
    v.push_back({"emu check: missing __syncthreads (warp-greedy schedule)", [] {
                     T o(64);
                     emu::g.policy = 1;
                     emu::launch_args("emu_bad_race", &emu_bad_race, 0, dim3(1), dim3(64), 0, {emu::P(o.p)});
                     Report r;
                     for (int i = 0; i < 64; i++)
                         if (std::isnan(o.p[i])) {
                             r.failure("stale shared memory read");
                             break;
                         }
                     return r;
                 }, "stale shared memory read"});
}

// ================================================================================================
// Driver: one process per case, EMU_JOBS at a time, output in case order.
// ================================================================================================

static vector<Case> all_cases() {
    vector<Case> v;
    v.push_back({"emu self-test", emu_selftest});
    // Convolutions: [b, h, w, c_in, c_out, k, stride, pad t b l r].
    struct C {
        const char* what;
        ConvShape s;
        bool bias, dinp;
        size_t skew;
    } convs[] = {
        {"3x3 s1 p1, c_in 5 (unaligned), 2 images", {2, 7, 6, 5, 9, 3, 1, {1, 1, 1, 1}}, true, true},
        {"3x3 s1 p1, c_in 40 c_out 70 (tiles, K tail)", {1, 9, 8, 40, 70, 3, 1, {1, 1, 1, 1}}, true, true},
        {"1x1, 162 rows (M tiles)", {2, 9, 9, 12, 20, 1, 1, {0, 0, 0, 0}}, true, true},
        {"downsample 3x3 s2 p1", {2, 9, 8, 8, 12, 3, 2, {1, 1, 1, 1}}, true, true},
        {"downsample 3x3 s2 pad (0,1,0,1) (VAE)", {1, 8, 10, 8, 8, 3, 2, {0, 1, 0, 1}}, false, true},
        {"3x3 s1 p1, c_in 3 (VAE conv_in), no dinp", {1, 6, 5, 3, 16, 3, 1, {1, 1, 1, 1}}, true, false},
        {"3x3 s1 p1, 390 rows (weight/bias grads split mid-row)", {2, 15, 13, 8, 12, 3, 1, {1, 1, 1, 1}}, true, true},
        {"3x3 s1 p1, input and dout 4-byte aligned only", {1, 7, 9, 8, 16, 3, 1, {1, 1, 1, 1}}, true, true, 1},
        {"3x3 s1 p1, 320 -> 192 channels, 4x5 (SD widths: 180 K tiles)", {1, 4, 5, 320, 192, 3, 1, {1, 1, 1, 1}}, true, true},
    };
    for (int bf = 0; bf < 2; bf++)
        for (auto& c : convs) {
            auto cc = c;
            v.push_back({fmt("conv2d fwd+bwd %s: %s", bf ? "bf16" : "f32", c.what),
                         [cc, bf] { return conv_case(bf, cc.s, cc.bias, cc.dinp, 11 + cc.s.ci * 7 + cc.s.co, cc.skew); }});
        }
    v.push_back({"conv2d bf16 through a parameter pool's bf16 copy: 3x3 s1 p1, 12 -> 20",
                 [] { return conv_param_copy_case({1, 7, 6, 12, 20, 3, 1, {1, 1, 1, 1}}, 201); }});
    v.push_back({"conv2d bf16 through a parameter pool's bf16 copy: 1x1 (the copy read directly)",
                 [] { return conv_param_copy_case({2, 5, 5, 16, 24, 1, 1, {0, 0, 0, 0}}, 202); }});
    v.push_back({"conv2d bf16 through a parameter pool's bf16 copy: 3x3 s2, c_in 5 (unaligned)",
                 [] { return conv_param_copy_case({1, 9, 8, 5, 7, 3, 2, {1, 1, 1, 1}}, 203); }});
    struct A {
        const char* what;
        AttShape s;
        bool masked;
    } atts[] = {
        {"hd 40, q 70 kv 77 (cross), 2x2 heads", {2, 70, 77, 2, 40, false}, false},
        {"hd 80, q=kv 70, causal", {1, 70, 70, 2, 80, true}, false},
        {"hd 64, q 33 kv 77, key mask", {2, 33, 77, 1, 64, false}, true},
        {"hd 8, q=kv 20, causal", {2, 20, 20, 1, 8, true}, false},
        {"hd 160, q 40 kv 50", {1, 40, 50, 1, 160, false}, false},
        {"hd 33 (odd), q 45 kv 70", {1, 45, 70, 2, 33, false}, false},
        {"hd 40, q=kv 144 (several 64-row tiles)", {1, 144, 144, 2, 40, false}, false},
    };
    for (int bf = 0; bf < 2; bf++)
        for (auto& a : atts) {
            auto aa = a;
            v.push_back({fmt("attention fwd+bwd %s: %s", bf ? "bf16" : "f32", a.what),
                         [aa, bf] { return attention_case(bf, aa.s, aa.masked, 101 + aa.s.hd); }});
        }
    // Head dims past the flash kernels (> 160): the materialised path (cuBLAS emulated by a naive
    // GEMM in class Cuda; the softmax / dS kernels and attention_bwd_delta are the real ones).
    struct AW {
        const char* what;
        AttShape s;
        bool masked;
        size_t ws_limit;  // elements per score chunk (0: the default 32 Mi)
    } wides[] = {
        {"wide hd 512 (VAE: 1 head), q=kv 64, 2 images", {2, 64, 64, 1, 512, false}, false, 0},
        {"wide hd 200, q 33 kv 41, 2x2 heads", {2, 33, 41, 2, 200, false}, false, 0},
        {"wide hd 176, q 30 kv 45, key mask", {2, 30, 45, 1, 176, false}, true, 0},
        {"wide hd 200, q=kv 40, causal", {1, 40, 40, 2, 200, true}, false, 0},
        {"wide hd 161, q 23 kv 300 (> 256 keys a row), 2x3 pairs, chunks of 7 rows split pairs",
         {2, 23, 300, 3, 161, false}, false, 7 * 300},
        {"wide hd 200, q=kv 9, 2x3 pairs, chunks of 40 rows span pairs, causal", {2, 9, 9, 3, 200, true}, false, 40 * 9},
    };
    for (int bf = 0; bf < 2; bf++)
        for (auto& a : wides) {
            auto aa = a;
            v.push_back({fmt("attention fwd+bwd %s: %s", bf ? "bf16" : "f32", a.what),
                         [aa, bf] { return attention_case(bf, aa.s, aa.masked, 301 + aa.s.hd, aa.ws_limit); }});
        }
    for (int bf = 0; bf < 2; bf++)
        v.push_back({fmt("attention %s: wide path without keys; overlap refusals", bf ? "bf16" : "f32"),
                     [bf] { return attention_wide_edge_case(bf); }});
    v.push_back({"group_norm fwd+bwd: 2x600x96, 3 groups (3 chunks per group)",
                 [] { return group_norm_case(2, 600, 96, 3, false, 21); }});
    v.push_back({"group_norm+SiLU fwd+bwd: 2x600x96, 3 groups", [] { return group_norm_case(2, 600, 96, 3, true, 22); }});
    v.push_back({"group_norm+SiLU fwd+bwd: 1x40x64, 32 groups", [] { return group_norm_case(1, 40, 64, 32, true, 23); }});
    v.push_back({"group_norm+SiLU fwd+bwd: 1x64x320, 32 groups (SD)", [] { return group_norm_case(1, 64, 320, 32, true, 24); }});
    v.push_back({"layer_norm fwd+bwd: 600x77", [] { return layer_norm_case(600, 77, 31); }});
    v.push_back({"layer_norm fwd+bwd: 5x320", [] { return layer_norm_case(5, 320, 32); }});
    for (int act = 0; act < 4; act++)
        v.push_back({fmt("activation fwd+bwd: %s", act_name(act)), [act] { return activation_case(act, 41 + act); }});
    v.push_back({"geglu fwd+bwd", [] { return geglu_case(51); }});
    v.push_back({"upsample_nearest fwd+bwd: 5x4 -> 10x8", [] { return upsample_case(2, 5, 4, 10, 8, 6, 61); }});
    v.push_back({"upsample_nearest fwd+bwd: 5x7 -> 7x10", [] { return upsample_case(1, 5, 7, 7, 10, 3, 62); }});
    v.push_back({"upsample_nearest fwd+bwd: 7x5 -> 3x2 (down)", [] { return upsample_case(2, 7, 5, 3, 2, 4, 63); }});
    v.push_back({"add_bias_rows, concat, add, accumulate, scale, zero", [] { return bias_rows_concat_add_case(71); }});
    v.push_back({"embedding fwd+bwd", [] { return embedding_case(81); }});
    v.push_back({"mse_loss, sum_squares, adamw, lerp", [] { return optim_case(91); }});
    v.push_back({"linear bias fill + bias grad", [] { return linear_bias_case(95); }});
    v.push_back({"philox randn (KATs, partial groups, 64-bit seeds), ddpm add_noise", [] { return random_case(97); }});
    v.push_back({"timestep embedding: SD's (320, flip), odd dim with shift", timestep_embedding_case});
    negative_cases(v);
    return v;
}

// EMU_FUZZ=N: N random shapes per family instead of the fixed cases (not run by the test).
static vector<Case> fuzz_cases(int n) {
    vector<Case> v;
    const char* se = getenv("EMU_FUZZ_SEED");
    const uint64_t seed = se ? strtoull(se, nullptr, 10) : 1000;
    for (int i = 0; i < n; i++) {
        Rng r(seed + i);
        auto u = [&](int lo, int hi) { return (size_t)(lo + (int)(r.next() % (uint64_t)(hi - lo + 1))); };
        ConvShape c;
        c.k = u(1, 5);
        c.s = u(1, 3);
        for (auto& p : c.pad) p = u(0, c.k + 1);
        c.b = u(1, 2);
        c.h = u(std::max<int>(1, (int)c.k - (int)(c.pad[0] + c.pad[1])), 12);
        c.w = u(std::max<int>(1, (int)c.k - (int)(c.pad[2] + c.pad[3])), 12);
        c.ci = u(1, 40);
        c.co = u(1, 80);
        bool bf = r.next() & 1, bias = r.next() & 1;
        size_t skew = u(0, 3);
        v.push_back({fmt("fuzz conv %s b%zu %zux%zu ci%zu co%zu k%zu s%zu pad %zu,%zu,%zu,%zu skew %zu", bf ? "bf16" : "f32",
                         c.b, c.h, c.w, c.ci, c.co, c.k, c.s, c.pad[0], c.pad[1], c.pad[2], c.pad[3], skew),
                     [c, bf, bias, skew, i] { return conv_case(bf, c, bias, true, 500 + i, skew); }});
        AttShape a;
        a.b = u(1, 2);
        a.heads = u(1, 3);
        a.causal = r.next() % 3 == 0;
        bool masked = !a.causal && r.next() % 2;
        // bf16: at least 4 keys (with a single key the exact dq and dk are 0 and the bf16 path leaves
        // rounding noise, D being computed from the f32 dO and O: a relative error is meaningless).
        bool abf = r.next() & 1;
        a.lq = u(a.causal && abf ? 4 : 1, 90);
        a.lkv = a.causal ? a.lq : u(masked ? 6 : (abf ? 4 : 1), 90);
        a.hd = u(1, 160);
        v.push_back({fmt("fuzz attention %s b%zu heads%zu q%zu kv%zu hd%zu%s%s", abf ? "bf16" : "f32", a.b, a.heads, a.lq,
                         a.lkv, a.hd, a.causal ? " causal" : "", masked ? " masked" : ""),
                     [a, abf, masked, i] { return attention_case(abf, a, masked, 700 + i); }});
        size_t groups = u(1, 8), cpg = u(1, 40), batch = u(1, 2), hw = u(1, 700);
        bool silu = r.next() & 1;
        v.push_back({fmt("fuzz group_norm b%zu hw%zu c%zu groups%zu silu%d", batch, hw, groups * cpg, groups, silu),
                     [=] { return group_norm_case(batch, hw, groups * cpg, groups, silu, 900 + i); }});
        size_t rows = u(1, 300), cols = u(1, 200);
        v.push_back({fmt("fuzz layer_norm %zux%zu", rows, cols), [=] { return layer_norm_case(rows, cols, 950 + i); }});
        size_t ih = u(1, 9), iw = u(1, 9), oh = u(1, 20), ow = u(1, 20), ch = u(1, 5);
        v.push_back({fmt("fuzz upsample %zux%zu -> %zux%zu c%zu", ih, iw, oh, ow, ch),
                     [=] { return upsample_case(1, ih, iw, oh, ow, ch, 990 + i); }});
    }
    return v;
}

static void run_child(const Case& c, int fd) {
    dup2(fd, 1);
    close(fd);
    emu::register_dynamic_smem(att_smem_f32, sizeof att_smem_f32);
    emu::register_dynamic_smem(att_smem_bf16, sizeof att_smem_bf16);
    const char* to = getenv("EMU_CASE_TIMEOUT");
    alarm(to ? (unsigned)atoi(to) : 300);
    // Under both schedules (emu.h): round-robin, then warp-greedy; EMU_SCHED=0 or 1 picks one.
    const char* se = getenv("EMU_SCHED");
    Report r;
    bool first = true;
    for (int policy = 0; policy < 2; policy++) {
        if (se && atoi(se) != policy) continue;
        emu::g.policy = policy;
        Report rp;
        try {
            rp = c.fn();
        } catch (const RustErr& e) {
            rp.failure(string("the Rust wrapper returns Err: ") + e.what());
        }
        if (first)
            r = rp;
        else if (!rp.ok)
            r.failure("under the warp-greedy schedule: " + rp.detail);
        first = false;
    }
    printf("%s\n", r.detail.c_str());
    fflush(stdout);
    _exit(r.ok ? 0 : 1);
}

int main(int argc, char** argv) {
    register_kernels();
    setvbuf(stdout, nullptr, _IOLBF, 0);
    const char* filter = argc > 1 ? argv[1] : nullptr;
    vector<Case> cases;
    const char* fz = getenv("EMU_FUZZ");
    for (auto& c : fz ? fuzz_cases(atoi(fz)) : all_cases())
        if (!filter || c.name.find(filter) != string::npos) cases.push_back(c);
    if (getenv("EMU_NOFORK")) {  // debugging (gdb): the cases in this process, stop at the first failure
        emu::register_dynamic_smem(att_smem_f32, sizeof att_smem_f32);
        emu::register_dynamic_smem(att_smem_bf16, sizeof att_smem_bf16);
        for (auto& c : cases) {
            const char* se = getenv("EMU_SCHED");
            emu::g.policy = se ? atoi(se) : 0;
            Report r = c.fn();
            printf("%-7s %s: %s\n", r.ok ? "ok" : "FAILED", c.name.c_str(), r.detail.c_str());
            if (!r.ok) return 1;
        }
        return 0;
    }
    const char* je = getenv("EMU_JOBS");
    int jobs = je ? std::max(1, atoi(je)) : 2;
    struct Run {
        pid_t pid = 0;
        int fd = -1;
        string out;
        int status = 0;
        bool done = false;
        double secs = 0;
        struct timespec t0;
    };
    vector<Run> runs(cases.size());
    size_t next = 0, printed = 0, running = 0;
    int failed = 0;
    auto now = [] {
        struct timespec t;
        clock_gettime(CLOCK_MONOTONIC, &t);
        return t;
    };
    auto start = now();
    while (printed < cases.size()) {
        while (running < (size_t)jobs && next < cases.size()) {
            int p[2];
            if (pipe(p) != 0) return 2;
            fflush(stdout);
            pid_t pid = fork();
            if (pid == 0) {
                close(p[0]);
                run_child(cases[next], p[1]);
            }
            close(p[1]);
            runs[next].pid = pid;
            runs[next].fd = p[0];
            runs[next].t0 = now();
            next++;
            running++;
        }
        // Drain the running children's pipes until one exits.
        vector<struct pollfd> pf;
        vector<size_t> idx;
        for (size_t i = 0; i < next; i++)
            if (runs[i].fd >= 0) {
                pf.push_back({runs[i].fd, POLLIN, 0});
                idx.push_back(i);
            }
        if (!pf.empty() && poll(pf.data(), pf.size(), 1000) > 0)
            for (size_t k = 0; k < pf.size(); k++)
                if (pf[k].revents) {
                    char buf[4096];
                    ssize_t n = read(pf[k].fd, buf, sizeof buf);
                    Run& rr = runs[idx[k]];
                    if (n > 0) {
                        rr.out.append(buf, (size_t)n);
                    } else {
                        close(rr.fd);
                        rr.fd = -1;
                        waitpid(rr.pid, &rr.status, 0);
                        auto t = now();
                        rr.secs = (double)(t.tv_sec - rr.t0.tv_sec) + 1e-9 * (double)(t.tv_nsec - rr.t0.tv_nsec);
                        rr.done = true;
                        running--;
                    }
                }
        while (printed < cases.size() && runs[printed].done) {
            Run& rr = runs[printed];
            string out = rr.out;
            while (!out.empty() && out.back() == '\n') out.pop_back();
            for (auto& ch : out)
                if (ch == '\n') ch = ' ';
            bool ok = WIFEXITED(rr.status) && WEXITSTATUS(rr.status) == 0;
            const string& expect = cases[printed].expect_error;
            if (!expect.empty()) {
                ok = !ok && out.find(expect) != string::npos;
                out = (ok ? "detected: " : "NOT detected (expected \"" + expect + "\"): ") + out;
            }
            if (!ok) failed++;
            string why;
            if (WIFSIGNALED(rr.status))
                why = fmt(" (killed by signal %d%s)", WTERMSIG(rr.status), WTERMSIG(rr.status) == SIGALRM ? ": timeout" : "");
            printf("%-7s %s [%.1fs]: %s%s\n", ok ? "ok" : "FAILED", cases[printed].name.c_str(), rr.secs, out.c_str(),
                   why.c_str());
            printed++;
        }
    }
    auto end = now();
    double total = (double)(end.tv_sec - start.tv_sec) + 1e-9 * (double)(end.tv_nsec - start.tv_nsec);
    printf("kernel emulation: %zu cases, %d failed (%.1fs, %d jobs)\n", cases.size(), failed, total, jobs);
    return failed ? 1 : 0;
}
