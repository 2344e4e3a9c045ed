// The CPU emulation of the CUDA subset our kernels use (kernels/emu/emu.h), tested on its own: its
// self-tests (bf16 rounding, barriers, warp shuffles, mma fragments, garbage-filled shared memory),
// known answers of cp.async (groups, zero-fill, bytes landing only at the wait) and ldmatrix (the
// PTX fragment table; its fragments feeding mma against the naive product),
// the Philox device function against Random123's known answers, and negative tests ("emu check: …")
// that pass only when the emulator reports a planted error (a divergent barrier, a shuffle naming
// an exited lane, out-of-bounds and misaligned accesses, wrong argument kinds and counts,
// __launch_bounds__, a missing __syncthreads under the warp-greedy schedule). One line per case,
// "ok" or "FAILED" with the error; exit status 1 on any failure.
//
//   g++ -std=c++17 -O2 -pthread -fno-strict-aliasing -ffp-contract=off -Wno-unknown-pragmas
//       -Ikernels/emu tests/kernel_emu/run.cpp -o /tmp/kernel_emu && /tmp/kernel_emu [filter]
//
// The kernels themselves are tested through the Rust backend on the emulated device (tests/cuda.rs
// with --features cuda-emu: the launches a GPU would receive, against the CPU backend); nothing
// here transcribes a launch of the Rust. Every case runs in its own process (a fault, a deadlock or
// an emulator check ends only that case), under both schedules of emu.h (round-robin, then
// warp-greedy); EMU_JOBS (default 2) cases run at once.
//
// Environment: EMU_JOBS (parallel cases), EMU_SCHED=0|1 (one schedule), EMU_CASE_TIMEOUT (seconds,
// default 300), EMU_NOFORK=1 (run in this process, for gdb). The kernels and their
// __launch_bounds__ are listed in kernels/emu/registry.h.
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

// ---- device memory: every allocation ends at a PROT_NONE guard page -----------------------------------
static size_t page_size() { return (size_t)sysconf(_SC_PAGESIZE); }

// `bytes` of memory ending exactly at a guard page (so reads or writes past the end fault), filled
// with `fill`. Never freed: every case is its own process.
static void* dev_alloc(size_t bytes, int fill) {
    const size_t pg = page_size();
    const size_t body = (bytes + pg - 1) / pg * pg;
    void* m = mmap(nullptr, body + pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
        perror("mmap");
        _exit(5);
    }
    mprotect(static_cast<char*>(m) + body, pg, PROT_NONE);
    char* p = static_cast<char*>(m) + body - bytes;
    memset(p, fill, bytes);
    return p;
}

// A "tensor": n floats of device memory (host-visible here).
struct T {
    float* p = nullptr;
    size_t n = 0;
    explicit T(size_t n_, int fill = 0xFF)
        : p(static_cast<float*>(dev_alloc(std::max<size_t>(n_, 1) * 4, fill))), n(n_) {}
    T(const vector<float>& v) : T(v.size()) { memcpy(p, v.data(), v.size() * 4); }
    vector<float> get() const { return vector<float>(p, p + n); }
};

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

// src/rng/philox.rs `philox4x32_10`, transcribed; the Random123 known answers pin both this and the device
// function.
static void philox_ref(uint32_t c[4], uint32_t k0, uint32_t k1) {
    for (int round = 0; round < 10; round++) {
        if (round > 0) k0 += 0x9E3779B9u, k1 += 0xBB67AE85u;
        uint64_t p0 = 0xD2511F53ull * c[0], p1 = 0xCD9E8D57ull * c[2];
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c[1] ^ k0, n1 = (uint32_t)p1, n2 = (uint32_t)(p0 >> 32) ^ c[3] ^ k1,
                 n3 = (uint32_t)p0;
        c[0] = n0, c[1] = n1, c[2] = n2, c[3] = n3;
    }
}
// The device function on the known-answer inputs (counter, key) → four words.
__global__ void emu_philox_kat(uint32_t* out, const uint32_t* in) {
    const uint32_t* v = in + 6 * threadIdx.x;
    PhiloxWords w = philox4x32_10(v[0], v[1], v[2], v[3], v[4], v[5]);
    for (int j = 0; j < 4; j++) out[4 * threadIdx.x + j] = w.w[j];
}

// Random123's kat_vectors, philox4x32 10 rounds: the device function and the transcription.
static Report philox_case() {
    Report r;
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

// mma.m16n8k8: A (16×8) and B (8×8) into the first two registers of the k16 layout and one.
__global__ void emu_selftest_mma8(float* d_out, const float* A, const float* B, const float* C) {
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    const uint32_t a[2] = {pack_bf16x2(A[g * 8 + 2 * t], A[g * 8 + 2 * t + 1]),
                           pack_bf16x2(A[(g + 8) * 8 + 2 * t], A[(g + 8) * 8 + 2 * t + 1])};
    const uint32_t b = pack_bf16x2(B[(2 * t) * 8 + g], B[(2 * t + 1) * 8 + g]);
    float c[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t], C[(g + 8) * 8 + 2 * t + 1]};
    float d[4];
    mma_bf16_1688(d, a, b, c);
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
    {
        auto A8 = rng.randn(128), B8 = rng.randn(64), C8 = rng.randn(128);
        T tA8(A8), tB8(B8), tC8(C8), tD8(128);
        emu::launch_args("emu_selftest_mma8", &emu_selftest_mma8, 0, dim3(1), dim3(32), 0,
                         {emu::P(tD8.p), emu::P(tA8.p), emu::P(tB8.p), emu::P(tC8.p)});
        vector<double> ref8(128);
        for (int i = 0; i < 16; i++)
            for (int n = 0; n < 8; n++) {
                double s = C8[i * 8 + n];
                for (int k = 0; k < 8; k++)
                    s += (double)__bfloat162float(__float2bfloat16_rn(A8[i * 8 + k])) *
                         (double)__bfloat162float(__float2bfloat16_rn(B8[k * 8 + n]));
                ref8[i * 8 + n] = s;
            }
        compare(r, "mma m16n8k8", false, dbl(tD8.get()), ref8);
    }
    if (r.ok) r.note("bf16 rounding, barriers, shuffles, mma fragments (k16 and k8)");
    return r;
}

// ---- cp.async and ldmatrix (common.cuh's helpers) --------------------------------------------------
// ldmatrix .x4, .x2, .x2.trans and .x4.trans of four 8×8 b16 matrices whose element (i, r, c) is
// i·64 + 8r + c: every register of every lane, for the host to compare with the PTX ISA's fragment
// table.
__global__ void emu_kat_ldmatrix(uint32_t* out) {
    __shared__ __align__(16) uint16_t m[4][8][8];
    const int lane = threadIdx.x;
    for (int e = lane; e < 256; e += 32) (&m[0][0][0])[e] = (uint16_t)e;
    __syncthreads();
    uint32_t r4[4], r2[2], t2[2], t4[4];
    ldmatrix_x4(r4, &m[lane / 8][lane % 8][0]);
    ldmatrix_x2<false>(r2, &m[(lane / 8) % 2][lane % 8][0]);
    ldmatrix_x2<true>(t2, &m[(lane / 8) % 2][lane % 8][0]);
    ldmatrix_x4<true>(t4, &m[lane / 8][lane % 8][0]);
    for (int i = 0; i < 4; i++) out[lane * 12 + i] = r4[i];
    for (int i = 0; i < 2; i++) out[lane * 12 + 4 + i] = r2[i];
    for (int i = 0; i < 2; i++) out[lane * 12 + 6 + i] = t2[i];
    for (int i = 0; i < 4; i++) out[lane * 12 + 8 + i] = t4[i];
}

// What a kernel does with them: A (16×16, row-major) and B staged in shared memory by cp.async as
// bf16, fragments by ldmatrix (A: .x4; B: .x2.trans from k×n rows, and .x2 from the same B stored
// n×k), two mma.m16n8k16 into d_out[0..128) and d_out[128..256).
__global__ void emu_kat_ldmatrix_mma(float* d_out, const uint16_t* A, const uint16_t* B, const uint16_t* Bt) {
    __shared__ __align__(16) uint16_t As[16][16], Bs[16][8], Bts[8][16];
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    // 16-byte chunks: A 32, B 16, Bᵀ 16; one A chunk and one of B or Bᵀ per lane.
    cp_async_16(&As[lane / 2][8 * (lane % 2)], A + 8 * lane);
    if (lane < 16)
        cp_async_16(&Bs[lane][0], B + 8 * lane);
    else
        cp_async_16(&Bts[(lane - 16) / 2][8 * (lane % 2)], Bt + 8 * (lane - 16));
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    uint32_t a[4], b[2], bt[2];
    ldmatrix_x4(a, &As[(lane % 8) + 8 * ((lane / 8) % 2)][8 * (lane / 16)]);
    ldmatrix_x2<true>(b, &Bs[lane % 16][0]);
    ldmatrix_x2<false>(bt, &Bts[lane % 8][8 * ((lane / 8) % 2)]);
    const float zero[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float d[4], e[4];
    mma_bf16_16816(d, a, b, zero);
    mma_bf16_16816(e, a, bt, zero);
    for (int q = 0; q < 4; q++) {
        const int row = g + (q >= 2 ? 8 : 0), col = 2 * t + (q & 1);
        d_out[row * 8 + col] = d[q];
        d_out[128 + row * 8 + col] = e[q];
    }
}

// cp.async groups: thread t copies 16 bytes into each of three stages, one commit per stage, then
// reads its own bytes after wait_group 2, 1 and 0; plus zero-filled copies (src-size 8 and 0).
// out[t·24 + 4k + j]: stage k after wait 2 (k = 0, 1), after wait 1 (k = 2, 3: stages 1, 2), after
// wait 0 (k = 4: stage 2), and the zero-filled copy (k = 5: 8 bytes then 0 bytes read).
__global__ void emu_kat_cp_async(float* out, const float* in) {
    __shared__ __align__(16) float s[4][32][4];
    const int t = threadIdx.x;
    for (int k = 0; k < 3; k++) {
        cp_async_16(&s[k][t][0], in + (k * 32 + t) * 4);
        cp_async_commit();
    }
    cp_async_wait<2>();
    for (int j = 0; j < 4; j++) out[t * 24 + j] = s[0][t][j], out[t * 24 + 4 + j] = s[1][t][j];
    cp_async_wait<1>();
    for (int j = 0; j < 4; j++) out[t * 24 + 8 + j] = s[1][t][j], out[t * 24 + 12 + j] = s[2][t][j];
    cp_async_wait<0>();
    for (int j = 0; j < 4; j++) out[t * 24 + 16 + j] = s[2][t][j];
    cp_async_16(&s[3][t][0], in + t * 4, t % 2 ? 0 : 8);
    cp_async_commit();
    cp_async_wait<0>();
    for (int j = 0; j < 4; j++) out[t * 24 + 20 + j] = s[3][t][j];
}

static uint16_t bf16_bits(float f) { return __float2bfloat16_rn(f).__x; }

static Report emu_kat_async_and_ldmatrix() {
    Report r;
    {
        vector<uint32_t> got(384, 0xDEADBEEFu);
        uint32_t* o = static_cast<uint32_t*>(dev_alloc(384 * 4, 0xFF));
        emu::launch_args("emu_kat_ldmatrix", &emu_kat_ldmatrix, 0, dim3(1), dim3(32), 0, {emu::P(o)});
        memcpy(got.data(), o, 384 * 4);
        // PTX ISA, "Warp-level matrix load instruction: ldmatrix", fragment figure: lane l holds
        // row l/4, columns 2(l%4) and 2(l%4)+1 of each matrix; .trans the element at (column, row).
        int bad = 0;
        for (int l = 0; l < 32; l++)
            for (int i = 0; i < 12; i++) {
                const int mat = i < 4 ? i : i < 8 ? (i - 4) % 2 : i - 8, row = l / 4, col = 2 * (l % 4);
                uint32_t want;
                if (i < 6)
                    want = (uint32_t)(mat * 64 + row * 8 + col) | (uint32_t)(mat * 64 + row * 8 + col + 1) << 16;
                else
                    want = (uint32_t)(mat * 64 + col * 8 + row) | (uint32_t)(mat * 64 + (col + 1) * 8 + row) << 16;
                if (got[l * 12 + i] != want && bad++ < 3)
                    r.failure(fmt("ldmatrix lane %d register %d: %08x, want %08x", l, i, got[l * 12 + i], want));
            }
    }
    {
        Rng rng(11);
        auto A = rng.randn(256), B = rng.randn(128);
        vector<uint16_t> a(256), b(128), bt(128);
        for (int i = 0; i < 256; i++) a[i] = bf16_bits(A[i]);
        for (int k = 0; k < 16; k++)
            for (int n = 0; n < 8; n++) b[k * 8 + n] = bt[n * 16 + k] = bf16_bits(B[k * 8 + n]);
        auto dev16 = [](const vector<uint16_t>& v) {
            uint16_t* p = static_cast<uint16_t*>(dev_alloc(v.size() * 2, 0));
            memcpy(p, v.data(), v.size() * 2);
            return p;
        };
        T d(256);
        emu::launch_args("emu_kat_ldmatrix_mma", &emu_kat_ldmatrix_mma, 0, dim3(1), dim3(32), 0,
                         {emu::P(d.p), emu::P(dev16(a)), emu::P(dev16(b)), emu::P(dev16(bt))});
        vector<double> ref(256);
        for (int i = 0; i < 16; i++)
            for (int n = 0; n < 8; n++) {
                double acc = 0.0;
                for (int k = 0; k < 16; k++)
                    acc += (double)__bfloat162float(__nv_bfloat16{a[i * 16 + k]}) *
                           (double)__bfloat162float(__nv_bfloat16{b[k * 8 + n]});
                ref[i * 8 + n] = ref[128 + i * 8 + n] = acc;
            }
        compare(r, "cp.async + ldmatrix + mma", false, dbl(d.get()), ref);
    }
    {
        Rng rng(12);
        auto in = rng.randn(3 * 128);
        T tin(in), o(32 * 24);
        emu::launch_args("emu_kat_cp_async", &emu_kat_cp_async, 0, dim3(1), dim3(32), 0, {emu::P(o.p), emu::P(tin.p)});
        const char* when[6] = {"stage 0 after wait 2", "stage 1 after wait 2", "stage 1 after wait 1",
                               "stage 2 after wait 1", "stage 2 after wait 0", "zero-filled copy"};
        int bad = 0;
        for (int t = 0; t < 32; t++)
            for (int k = 0; k < 6; k++)
                for (int j = 0; j < 4; j++) {
                    const float got = o.p[t * 24 + 4 * k + j];
                    // Retired groups hold the source; pending ones the block's 0xFF garbage (NaN).
                    const int stage[6] = {0, -1, 1, -1, 2, 0};
                    float want = stage[k] < 0 ? NAN : in[(stage[k] * 32 + t) * 4 + j];
                    if (k == 5 && (t % 2 || j >= 2)) want = 0.0f;
                    const bool same = std::isnan(want) ? std::isnan(got) : got == want;
                    if (!same && bad++ < 3) r.failure(fmt("thread %d, %s, float %d: %g, want %g", t, when[k], j, got, want));
                }
    }
    if (r.ok) r.note("ldmatrix fragments (x4, x2, x2.trans, x4.trans), cp.async + ldmatrix feeding mma, cp.async groups and zero-fill");
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

__global__ void emu_bad_cp_async_not_waited(float* out, const float* in) {
    __shared__ __align__(16) float s[32][4];
    cp_async_16(&s[threadIdx.x][0], in + 4 * threadIdx.x);
    cp_async_commit();
    out[threadIdx.x] = 0.0f;
}
__global__ void emu_bad_cp_async_to_global(float* out, const float* in) {
    cp_async_16(out + 4 * threadIdx.x, in + 4 * threadIdx.x);
    cp_async_commit();
    cp_async_wait<0>();
}
__global__ void emu_bad_ldmatrix_misaligned(uint32_t* out) {
    __shared__ __align__(16) uint16_t m[8][9];  // rows of 18 bytes: row 1 is not 16-byte aligned
    for (int e = threadIdx.x; e < 72; e += 32) (&m[0][0])[e] = 0;
    __syncthreads();
    uint32_t r[2];
    ldmatrix_x2<false>(r, &m[threadIdx.x % 8][0]);
    out[threadIdx.x] = r[0];
}

static void negative_cases(vector<Case>& v) {
    v.push_back({"emu check: cp.async never waited for", [] {
                     T o(32), in(128);
                     emu::launch_args("emu_bad_cp_async_not_waited", &emu_bad_cp_async_not_waited, 0, dim3(1), dim3(32),
                                      0, {emu::P(o.p), emu::P(in.p)});
                     return Report{};
                 }, "never waited for"});
    v.push_back({"emu check: cp.async into global memory", [] {
                     T o(128), in(128);
                     emu::launch_args("emu_bad_cp_async_to_global", &emu_bad_cp_async_to_global, 0, dim3(1), dim3(32),
                                      0, {emu::P(o.p), emu::P(in.p)});
                     return Report{};
                 }, "is not shared memory"});
    v.push_back({"emu check: misaligned ldmatrix row", [] {
                     uint32_t* o = static_cast<uint32_t*>(dev_alloc(32 * 4, 0));
                     emu::launch_args("emu_bad_ldmatrix_misaligned", &emu_bad_ldmatrix_misaligned, 0, dim3(1), dim3(32),
                                      0, {emu::P(o)});
                     return Report{};
                 }, "not 16-byte aligned"});
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
                     registry().at("ew_zero")(dim3(1), dim3(256), 0, {emu::P(o.p)});
                     return Report{};
                 }, "takes 2 parameters"});
    v.push_back({"emu check: __launch_bounds__", [] {
                     T db(64), dout(64);
                     registry().at("conv2d_bias_grad")(dim3(1), dim3(512), 0,
                                                       {emu::P(db.p), emu::P(dout.p), emu::I(1), emu::I(64), emu::I(1)});
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
    v.push_back({"emu known answers: cp.async groups, ldmatrix fragments, both feeding mma", emu_kat_async_and_ldmatrix});
    v.push_back({"philox device function: Random123 known answers", philox_case});
    negative_cases(v);
    return v;
}

static void run_child(const Case& c, int fd) {
    dup2(fd, 1);
    close(fd);
    register_kernel_dynamic_smem();
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
        } catch (const std::exception& e) {
            rp.failure(string("exception: ") + e.what());
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
    for (auto& c : all_cases())
        if (!filter || c.name.find(filter) != string::npos) cases.push_back(c);
    if (getenv("EMU_NOFORK")) {  // debugging (gdb): the cases in this process, stop at the first failure
        register_kernel_dynamic_smem();
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
