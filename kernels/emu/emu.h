// A CPU emulation of the CUDA subset that kernels/*.cu use, so that the unmodified kernel sources
// compile as C++ (g++ -std=c++17) and run on the CPU in tests/kernel_emu/run.cpp.
//
// Execution model
//  * A launch runs its blocks one after another (in a seeded random order: CUDA promises no order).
//  * The threads of a block are fibers (x86-64: a 20-instruction stack switch; elsewhere ucontext)
//    run by a scheduler on one OS thread. A fiber runs until it blocks at a barrier:
//      __syncthreads()        waits for every thread of the block that has not exited;
//      warp collectives       (__shfl_*_sync, the emulated mma.sync) wait for every lane of the mask.
//    Two scheduling policies (run.cpp runs every case under both): round-robin over the runnable
//    fibers in a per-launch permuted order (warps advance in lockstep; lanes interleave), and
//    warp-greedy (a warp runs until all its lanes wait at __syncthreads, then the next warp), so code
//    that misses a barrier sees stale or unwritten (NaN-filled) shared memory.
//  * Checks that report an error and end the process (the test runs each case in its own process):
//    a warp collective whose mask names an exited or missing lane; lanes of one collective calling
//    different collectives, different masks, or (EMU_SITE_CHECK, default on) different source lines;
//    __syncthreads reached from different call sites (divergent barrier); deadlock; a launch past the
//    grid/block/launch-bounds/dynamic-shared-memory limits; kernel arguments whose count or kinds
//    (pointer / 32-bit int / f32) differ from the kernel's parameters (arguments are marshalled like
//    cuLaunchKernel: 64-bit slots, a parameter takes sizeof(param) bytes of its slot); misaligned
//    vector loads (__ldg of float4); writes past the launch's dynamic shared memory (canary), and
//    segmentation faults (guard pages after every device buffer) reported with the kernel, block and
//    thread that faulted.
//  * Shared memory: `__shared__` is `thread_local` (block-scope thread_local is static, and `extern
//    thread_local` names the dynamic array that run.cpp defines). Before every block the static
//    shared variables and the launch's dynamic bytes are filled with 0xFF (NaN as f32 and bf16), like
//    the garbage a real block starts with (x86-64 Linux: it finds the executable's TLS block).
//  * Environment: EMU_SITE_CHECK=0 turns the same-source-line check off.
//  * bf16 conversions round to nearest even (NaN → canonical NaN) like __float2bfloat16_rn; the
//    m16n8k16 bf16 MMA takes the PTX fragment layout and computes D = A·B + C exactly (f64 sum,
//    rounded to f32 once); floating-point is IEEE f32 without contraction (-ffp-contract=off).
//  * cp.async lands its bytes only when cp.async.wait_group retires its group (a read before the
//    wait sees stale shared memory); ldmatrix (x1/x2/x4, .trans) is a warp collective returning
//    the PTX fragments; both check alignment and that shared addresses are shared memory, and a
//    thread exiting with copies in flight is an error.
#pragma once
#define ROENTGEN_EMU 1

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <math.h>
#include <pthread.h>
#include <random>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <string>
#include <sys/mman.h>
#include <tuple>
#include <type_traits>
#include <unistd.h>
#include <utility>
#include <vector>
#if defined(__x86_64__) && defined(__linux__)
#include <link.h>
#else
#include <ucontext.h>
#endif

// ---- keywords ------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __shared__ thread_local
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

// ---- built-in types and variables ---------------------------------------------------------------
struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct __attribute__((aligned(16))) float4 {
    float x, y, z, w;
};
struct __attribute__((aligned(8))) float2 {
    float x, y;
};
struct __attribute__((aligned(8))) uint2 {
    unsigned x, y;
};
struct __attribute__((aligned(16))) uint4 {
    unsigned x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

// The scheduler sets these before resuming a fiber (one OS thread runs all fibers, so a fiber always
// sees its own values).
inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;
constexpr int warpSize = 32;

// ---- integer / float helpers of the CUDA math library --------------------------------------------
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

// Round-to-nearest f32 operations (never contracted: the emulation is built with -ffp-contract=off).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
// Fast-math intrinsics: the accurate functions (the hardware's are within a few ulp of them).
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __powf(float a, float b) { return powf(a, b); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float exp10f(float x) { return powf(10.0f, x); }
inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
inline int __float_as_int(float x) { int i; memcpy(&i, &x, 4); return i; }
inline unsigned __float_as_uint(float x) { unsigned i; memcpy(&i, &x, 4); return i; }
inline float __int_as_float(int i) { float x; memcpy(&x, &i, 4); return x; }
inline float __uint_as_float(unsigned i) { float x; memcpy(&x, &i, 4); return x; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }

// ---- emulator core ---------------------------------------------------------------------------------
namespace emu {

[[noreturn]] inline void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// The source location of a barrier or warp collective (see EMU_SITE_).
struct Site {
    const char* file;
    int line;
};
inline bool same_site(const Site& a, const Site& b) {
    return a.line == b.line && (a.file == b.file || (a.file && b.file && strcmp(a.file, b.file) == 0));
}

// Context switch.
#if defined(__x86_64__) && defined(__linux__)
#define EMU_ASM_SWITCH 1
extern "C" void emu_ctx_switch(void** save_sp, void* new_sp);
asm(R"(
    .pushsection .text
    .globl emu_ctx_switch
    .type emu_ctx_switch, @function
emu_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $16, %rsp
    fnstcw (%rsp)
    stmxcsr 8(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    fldcw (%rsp)
    ldmxcsr 8(%rsp)
    addq $16, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_ctx_switch, .-emu_ctx_switch
    .popsection
)");
#endif

enum FiberState { READY, WAIT_BAR, WAIT_WARP, DONE };

// One cp.async copy in flight: the source bytes as they were at issue (a bad source address faults
// in the issuing thread, as on hardware the copy's fault names it), written to `dst` only when a
// cp.async.wait_group retires its group — so shared memory read before the wait still holds the
// previous contents (the 0xFF garbage of a fresh block), as it may on hardware.
struct AsyncCopy {
    unsigned char* dst;
    unsigned char bytes[16];
    int n;
};

struct Fiber {
#ifdef EMU_ASM_SWITCH
    void* sp = nullptr;
#else
    ucontext_t ctx;
#endif
    uint3 tid{0, 0, 0};
    int linear = 0, lane = 0, warp = 0;
    FiberState state = READY;
    unsigned wait_gen = 0;  // warp generation this fiber waits on / collected in
    std::vector<AsyncCopy> async_open;                 // issued since the last cp.async.commit_group
    std::deque<std::vector<AsyncCopy>> async_groups;   // committed, not yet retired; oldest first
};

// Warp collectives: every participating lane deposits its operands in buf[gen & 1][lane]; the last
// lane to arrive releases the others; each lane then reads what it needs. The next collective uses
// the other buffer, and cannot complete before every lane has left this one: double buffering is
// enough.
struct WarpSlot {
    uint32_t a[4];
    uint32_t b[2];
    float c[4];
    uint64_t v;
};
enum CollKind { COLL_NONE, COLL_SHFL, COLL_MMA, COLL_SYNCWARP, COLL_LDMATRIX };

struct Warp {
    int exists = 0;         // lanes present in the block
    uint32_t exited = 0;    // lanes that have returned
    uint32_t arrived = 0;   // lanes waiting in the current collective
    uint32_t mask = 0;      // mask of the current collective
    CollKind kind = COLL_NONE;
    int size = 0;           // operand size (shuffles)
    Site site{nullptr, 0};
    unsigned gen = 0;
    WarpSlot buf[2][32];
};

struct Launch {
    const char* name = "?";
    dim3 grid, block;
    unsigned smem = 0;
    std::function<void()> body;
};

struct State {
    Launch* launch = nullptr;
    std::vector<Fiber> fibers;
    std::vector<int> order;         // round-robin visiting order (a permutation of the threads)
    std::vector<int> greedy_order;  // warp-greedy start order: warps permuted, lanes permuted within
    std::deque<int> ready;          // warp-greedy run queue
    int policy = 0;                 // 0: round-robin, 1: warp-greedy (see run_block)
    Warp warps[32];
    int nthreads = 0, live = 0;
    int bar_arrived = 0;
    Site bar_site{nullptr, 0};
    Fiber* cur = nullptr;
#ifdef EMU_ASM_SWITCH
    void* sched_sp = nullptr;
#else
    ucontext_t sched_ctx;
#endif
    char* stacks = nullptr;
    size_t stack_size = 0;
    int stacks_for = 0;
    bool site_check = true;
    uint64_t launches = 0;
    // Shared memory (thread_local in this executable's TLS block) and the dynamic array.
    unsigned char* tls_lo = nullptr;
    unsigned char* tls_hi = nullptr;
    unsigned char* dyn_lo = nullptr;  // the largest registered dynamic array (see register_dynamic_smem)
    size_t dyn_cap = 0;
    std::vector<std::pair<unsigned char*, size_t>> dyn_arrays;
    std::vector<std::pair<unsigned char*, size_t>> static_ranges;  // the TLS block less the dynamic arrays
    bool tls_filled = false;
    size_t dyn_dirty = 0;  // bytes of the dynamic arrays the previous launch may have written
    unsigned max_dyn_smem_default = 48 * 1024;
    unsigned max_dyn_smem_optin = 163 * 1024;  // sm_80 (A100); sm_90 allows 227 KiB
    std::map<std::string, unsigned> optin;
    // A host that survives kernel faults (kernels/emu/device.cpp, as a CUDA context turns a fault
    // into a sticky error) sets `recover` around a launch on its one launching thread: `fail` and
    // the fault handler then write the message to `fault` and siglongjmp there instead of ending
    // the process. Unset (tests/kernel_emu), a fault ends the process with the message.
    sigjmp_buf* recover = nullptr;
    pthread_t recover_thread{};
    bool recovering_host = false;  // set once by such a host: other threads' faults are not ours
    char fault[1024] = {0};
    // Whether the last fault came while a kernel ran (a sticky error on hardware) rather than from
    // a check before it started (a launch the driver refuses, which leaves the context usable).
    bool running = false, fault_while_running = false;
};
inline State g;
// The signal dispositions before install_signal_handlers: a fault outside a recoverable launch
// (a bug of the host program, Rust's stack-overflow guard) goes back to them.
inline struct sigaction g_old_segv, g_old_bus, g_old_fpe;

// After a fault the launch's fibers are abandoned where they stand; the next launch rebuilds them.
[[noreturn]] inline void recover_from_fault() {
    g.fault_while_running = g.running;
    g.running = false;
    g.launch = nullptr;
    g.cur = nullptr;
    g.live = 0;
    siglongjmp(*g.recover, 1);
}

inline void where(char* out, size_t n) {
    if (!g.launch) {
        snprintf(out, n, "(outside any kernel)");
        return;
    }
    if (g.cur)
        snprintf(out, n, "kernel %s grid (%u,%u,%u) block (%u,%u,%u) smem %u: in block (%u,%u,%u) thread (%u,%u,%u)",
                 g.launch->name, g.launch->grid.x, g.launch->grid.y, g.launch->grid.z, g.launch->block.x,
                 g.launch->block.y, g.launch->block.z, g.launch->smem, blockIdx.x, blockIdx.y, blockIdx.z, g.cur->tid.x,
                 g.cur->tid.y, g.cur->tid.z);
    else
        snprintf(out, n, "kernel %s grid (%u,%u,%u) block (%u,%u,%u) smem %u", g.launch->name, g.launch->grid.x,
                 g.launch->grid.y, g.launch->grid.z, g.launch->block.x, g.launch->block.y, g.launch->block.z,
                 g.launch->smem);
}

inline void fail(const char* fmt, ...) {
    char msg[1024], w[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    where(w, sizeof w);
    if (g.recover && pthread_equal(pthread_self(), g.recover_thread)) {
        snprintf(g.fault, sizeof g.fault, "%s [%s]", msg, w);
        recover_from_fault();
    }
    fprintf(stdout, "EMU ERROR: %s [%s]\n", msg, w);
    fflush(stdout);
    _exit(3);
}

inline void on_signal(int sig) {
    const bool ours = g.recover && g.launch != nullptr && pthread_equal(pthread_self(), g.recover_thread);
    if (g.recovering_host && !ours) {
        // Not a kernel's fault: restore the host's own handler and return; the faulting
        // instruction runs again and reaches it.
        sigaction(sig, sig == SIGSEGV ? &g_old_segv : (sig == SIGBUS ? &g_old_bus : &g_old_fpe), nullptr);
        return;
    }
    char w[512], msg[800];
    where(w, sizeof w);
    const char* what = sig == SIGSEGV ? "SIGSEGV" : (sig == SIGBUS ? "SIGBUS" : "fault");
    if (ours) {
        snprintf(g.fault, sizeof g.fault, "signal %d (%s: an out-of-bounds or misaligned access) [%s]", sig, what, w);
        recover_from_fault();
    }
    int n = snprintf(msg, sizeof msg, "EMU ERROR: signal %d (%s: an out-of-bounds or misaligned access) [%s]\n", sig,
                     what, w);
    if (n > 0) {
        ssize_t r = write(1, msg, (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1);
        (void)r;
    }
    _exit(4);
}

inline void install_signal_handlers() {
    static bool done = false;
    if (done) return;
    done = true;
    static char altstack[1 << 16];
    stack_t ss;
    ss.ss_sp = altstack;
    ss.ss_size = sizeof altstack;
    ss.ss_flags = 0;
    sigaltstack(&ss, nullptr);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_ONSTACK;
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
    sigaction(SIGFPE, &sa, &g_old_fpe);
    const char* e = getenv("EMU_SITE_CHECK");
    g.site_check = !(e && e[0] == '0');
}

// ---- shared memory ---------------------------------------------------------------------------------
#if defined(__x86_64__) && defined(__linux__)
struct TlsBlock {
    size_t memsz = 0;
    unsigned char* data = nullptr;  // this thread's instance of the executable's TLS segment
};
inline int tls_phdr_cb(struct dl_phdr_info* info, size_t, void* data) {
    // The first object is the executable.
    auto* out = static_cast<TlsBlock*>(data);
    for (int i = 0; i < info->dlpi_phnum; i++)
        if (info->dlpi_phdr[i].p_type == PT_TLS) {
            out->memsz = info->dlpi_phdr[i].p_memsz;
            out->data = static_cast<unsigned char*>(info->dlpi_tls_data);
        }
    return 1;
}
#endif

// Registers a dynamic shared-memory array (`extern __shared__ T name[]` of the kernels, defined in
// run.cpp as a thread_local array of `bytes`).
inline void register_dynamic_smem(void* p, size_t bytes) {
    g.dyn_arrays.push_back({static_cast<unsigned char*>(p), bytes});
}

// Locates this executable's TLS block in this thread, which holds every `__shared__` variable of
// the kernels (the emulator itself has no thread_local; in a Rust program it also holds Rust's own
// thread-locals, so kernels/emu/device.cpp launches on a thread that runs no Rust code).
inline void locate_tls() {
#if defined(__x86_64__) && defined(__linux__)
    if (g.tls_hi) return;
    // The block's exact place in this thread (glibc's dlpi_tls_data): its offset below the thread
    // pointer depends on the segment's alignment and start, which differ between executables (a
    // Rust program linking the emulated device has other TLS before the kernels' than run.cpp).
    TlsBlock tls;
    dl_iterate_phdr(tls_phdr_cb, &tls);
    if (!tls.data) return;
    g.tls_lo = tls.data;
    g.tls_hi = tls.data + tls.memsz;
    for (auto& d : g.dyn_arrays)
        if (d.first < g.tls_lo || d.first + d.second > g.tls_hi) {
            // Unexpected layout: do not touch the TLS block.
            g.tls_lo = g.tls_hi = nullptr;
            return;
        }
#endif
}

// Before every block: the static shared variables and the launch's dynamic bytes become garbage
// (0xFF). The rest of the dynamic arrays stays 0xFF from the first fill and is checked once per
// launch (check_dynamic_canary): a write past the launch's size shows there.
inline void fill_shared() {
    if (!g.tls_lo) return;
    if (!g.tls_filled) {
        memset(g.tls_lo, 0xFF, (size_t)(g.tls_hi - g.tls_lo));
        g.tls_filled = true;
        auto d = g.dyn_arrays;
        std::sort(d.begin(), d.end());
        unsigned char* at = g.tls_lo;
        for (auto& a : d) {
            if (a.first > at) g.static_ranges.push_back({at, (size_t)(a.first - at)});
            at = std::max(at, a.first + a.second);
        }
        if (g.tls_hi > at) g.static_ranges.push_back({at, (size_t)(g.tls_hi - at)});
    }
    for (auto& r : g.static_ranges) memset(r.first, 0xFF, r.second);
    for (auto& a : g.dyn_arrays) memset(a.first, 0xFF, std::min<size_t>(a.second, g.launch->smem));
}

inline void check_dynamic_canary() {
    for (auto& d : g.dyn_arrays) {
        if (g.launch->smem >= d.second) continue;
        if (!g.tls_lo) continue;
        for (size_t i = g.launch->smem; i < d.second; i++)
            if (d.first[i] != 0xFF)
                fail("wrote past the launch's %u bytes of dynamic shared memory (byte %zu of the dynamic array modified)",
                     g.launch->smem, i);
    }
}

// ---- fibers ------------------------------------------------------------------------------------------
[[noreturn]] inline void fiber_main();

inline void switch_to_scheduler() {
    Fiber* f = g.cur;
#ifdef EMU_ASM_SWITCH
    emu_ctx_switch(&f->sp, g.sched_sp);
#else
    swapcontext(&f->ctx, &g.sched_ctx);
#endif
}

inline void alloc_stacks(int n) {
    if (g.stacks_for >= n) return;
    if (g.stacks) munmap(g.stacks, g.stack_size * g.stacks_for);
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    g.stack_size = 64 * 1024 + page;  // 64 KiB + a guard page below each stack
    void* p = mmap(nullptr, g.stack_size * n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) fail("cannot map fiber stacks");
    g.stacks = static_cast<char*>(p);
    for (int i = 0; i < n; i++) mprotect(g.stacks + i * g.stack_size, page, PROT_NONE);
    g.stacks_for = n;
}

inline void init_fiber(Fiber& f, int i) {
    char* base = g.stacks + (size_t)i * g.stack_size;
    char* top = base + g.stack_size;
    top = reinterpret_cast<char*>(reinterpret_cast<uintptr_t>(top) & ~uintptr_t(15));
#ifdef EMU_ASM_SWITCH
    uint64_t* sp = reinterpret_cast<uint64_t*>(top - 80);
    memset(sp, 0, 80);
    uint16_t fcw = 0x037F;
    uint32_t mxcsr = 0x1F80;
    memcpy(sp, &fcw, 2);
    memcpy(reinterpret_cast<char*>(sp) + 8, &mxcsr, 4);
    sp[8] = reinterpret_cast<uint64_t>(&fiber_main);  // "return address" of the first switch
    sp[9] = 0;                                        // fake return address of fiber_main
    f.sp = sp;
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = base + sysconf(_SC_PAGESIZE);
    f.ctx.uc_stack.ss_size = g.stack_size - sysconf(_SC_PAGESIZE);
    f.ctx.uc_link = &g.sched_ctx;
    makecontext(&f.ctx, (void (*)())fiber_main, 0);
#endif
}

inline void release_barrier() {
    if (g.policy == 1) {
        for (int i : g.greedy_order)
            if (g.fibers[i].state == WAIT_BAR) g.ready.push_back(i);
    }
    for (auto& f : g.fibers)
        if (f.state == WAIT_BAR) f.state = READY;
    g.bar_arrived = 0;
    g.bar_site = Site{nullptr, 0};
}

inline void release_warp(Warp& w, int warp) {
    if (g.policy == 1)  // the warp runs on: its lanes go to the front of the queue
        for (int k = (int)g.greedy_order.size() - 1; k >= 0; k--) {
            const int i = g.greedy_order[k];
            if (i / 32 == warp && (w.arrived >> (i & 31) & 1u) && g.fibers[i].state == WAIT_WARP) g.ready.push_front(i);
        }
    for (int l = 0; l < 32; l++)
        if (w.arrived >> l & 1u) {
            Fiber& f = g.fibers[warp * 32 + l];
            if (f.state == WAIT_WARP) f.state = READY;
        }
    w.arrived = 0;
    w.mask = 0;
    w.kind = COLL_NONE;
    w.site = Site{nullptr, 0};
    w.gen++;
}

inline void fiber_exit() {
    Fiber* f = g.cur;
    f->state = DONE;
    g.live--;
    Warp& w = g.warps[f->warp];
    w.exited |= 1u << f->lane;
    if (w.arrived && (w.mask >> f->lane & 1u))
        fail("lane %d exited while lanes of its warp wait for it in a warp collective (mask %#x)", f->lane, w.mask);
    if (!f->async_open.empty() || !f->async_groups.empty())
        fail("a thread exited with cp.async copies it never waited for (%zu uncommitted, %zu groups committed): "
             "end with cp.async.wait_group 0",
             f->async_open.size(), f->async_groups.size());
    if (g.bar_arrived > 0 && g.bar_arrived == g.live) release_barrier();
}

inline void fiber_main() {
    g.launch->body();
    fiber_exit();
    switch_to_scheduler();
    fail("a finished fiber was resumed");
}

// __syncthreads: every live thread of the block.
inline void block_barrier(Site site) {
    Fiber* f = g.cur;
    if (g.bar_arrived == 0)
        g.bar_site = site;
    else if (g.site_check && !same_site(site, g.bar_site))
        fail("__syncthreads reached from different call sites by threads of one block (divergent barrier)");
    g.bar_arrived++;
    if (g.bar_arrived == g.live) {
        release_barrier();
        return;
    }
    f->state = WAIT_BAR;
    switch_to_scheduler();
}

// Enters a warp collective; returns the buffer generation holding every lane's operands.
__attribute__((noinline)) inline unsigned warp_collective(CollKind kind, unsigned mask, int size, Site site,
                                                          const WarpSlot& mine) {
    Fiber* f = g.cur;
    Warp& w = g.warps[f->warp];
    const uint32_t present = w.exists == 32 ? 0xFFFFFFFFu : ((1u << w.exists) - 1u);
    if (!(mask >> f->lane & 1u)) fail("warp collective: the calling lane %d is not in its mask %#x", f->lane, mask);
    if (mask & ~present)
        fail("warp collective with mask %#x in a warp of %d lanes (lanes past the block do not exist)", mask, w.exists);
    if (mask & w.exited) fail("warp collective with mask %#x names lanes that have exited (%#x)", mask, mask & w.exited);
    if (w.arrived == 0) {
        w.mask = mask;
        w.kind = kind;
        w.size = size;
        w.site = site;
    } else {
        if (w.mask != mask) fail("lanes of a warp entered one collective with different masks (%#x vs %#x)", w.mask, mask);
        if (w.kind != kind || w.size != size)
            fail("lanes of a warp are in different warp collectives (divergent shuffles / mma)");
        if (g.site_check && !same_site(w.site, site))
            fail("lanes of a warp reached a warp collective from different call sites (divergent code)");
    }
    const unsigned gen = w.gen;
    w.buf[gen & 1][f->lane] = mine;
    w.arrived |= 1u << f->lane;
    if (w.arrived == mask) {
        release_warp(w, f->warp);
        return gen;
    }
    f->state = WAIT_WARP;
    switch_to_scheduler();
    return gen;
}

// Runs fiber f until it blocks, exits or yields back to the scheduler.
inline void resume_fiber(Fiber& f) {
    g.cur = &f;
    threadIdx = f.tid;
#ifdef EMU_ASM_SWITCH
    emu_ctx_switch(&g.sched_sp, f.sp);
#else
    swapcontext(&g.sched_ctx, &f.ctx);
#endif
    g.cur = nullptr;
}

inline void run_block() {
    const int n = g.nthreads;
    g.live = n;
    g.bar_arrived = 0;
    g.bar_site = Site{nullptr, 0};
    for (int wi = 0; wi < (n + 31) / 32; wi++) {
        Warp& w = g.warps[wi];
        w.exists = std::min(32, n - wi * 32);
        w.exited = 0;
        w.arrived = 0;
        w.mask = 0;
        w.kind = COLL_NONE;
        w.site = Site{nullptr, 0};
        w.gen = 0;
    }
    for (int i = 0; i < n; i++) {
        Fiber& f = g.fibers[i];
        f.state = READY;
        f.async_open.clear();
        f.async_groups.clear();
        init_fiber(f, i);
    }
    fill_shared();
    // Round-robin: every runnable thread in turn, each until it blocks; warps advance in lockstep
    // (shuffles act as barriers), which exposes races between the lanes of a warp. Warp-greedy: a
    // warp runs on (its lanes first in the queue) until all of them wait at __syncthreads or exit,
    // then the next warp: the largest skew between warps, which exposes missing __syncthreads.
    if (g.policy == 1) {
        g.ready.assign(g.greedy_order.begin(), g.greedy_order.end());
        while (!g.ready.empty()) {
            Fiber& f = g.fibers[g.ready.front()];
            g.ready.pop_front();
            if (f.state != READY) continue;
            resume_fiber(f);
        }
    }
    for (;;) {
        bool ran = false;
        for (int k = 0; k < n && g.policy == 0; k++) {
            Fiber& f = g.fibers[g.order[k]];
            if (f.state != READY) continue;
            ran = true;
            resume_fiber(f);
        }
        if (g.live == 0) break;
        if (!ran) {
            int at_bar = 0, at_warp = 0;
            for (auto& f : g.fibers) {
                at_bar += f.state == WAIT_BAR;
                at_warp += f.state == WAIT_WARP;
            }
            fail("deadlock: %d threads wait at __syncthreads, %d in warp collectives, %d live", at_bar, at_warp, g.live);
        }
    }
}

inline void run_launch(Launch& L) {
    install_signal_handlers();
    locate_tls();
    g.launch = &L;
    g.running = true;
    g.launches++;
    if (g.tls_filled)  // back to 0xFF where the previous launch had its dynamic shared memory
        for (auto& a : g.dyn_arrays) memset(a.first, 0xFF, std::min(a.second, g.dyn_dirty));
    g.dyn_dirty = L.smem;
    const dim3 b = L.block, gr = L.grid;
    const int n = (int)(b.x * b.y * b.z);
    g.nthreads = n;
    alloc_stacks(n);
    g.fibers.assign(n, Fiber());
    for (int i = 0; i < n; i++) {
        Fiber& f = g.fibers[i];
        f.linear = i;
        f.tid = uint3{(unsigned)(i % b.x), (unsigned)(i / b.x % b.y), (unsigned)(i / (b.x * b.y))};
        f.lane = i & 31;
        f.warp = i >> 5;
    }
    std::mt19937_64 rng(0x5eed0000ull + g.launches);
    g.order.resize(n);
    for (int i = 0; i < n; i++) g.order[i] = i;
    std::shuffle(g.order.begin(), g.order.end(), rng);
    {
        const int nw = (n + 31) / 32;
        std::vector<int> wo(nw);
        for (int i = 0; i < nw; i++) wo[i] = i;
        std::shuffle(wo.begin(), wo.end(), rng);
        g.greedy_order.clear();
        for (int wi : wo) {
            std::vector<int> lanes;
            for (int l = 0; l < 32 && wi * 32 + l < n; l++) lanes.push_back(wi * 32 + l);
            std::shuffle(lanes.begin(), lanes.end(), rng);
            g.greedy_order.insert(g.greedy_order.end(), lanes.begin(), lanes.end());
        }
    }
    blockDim = b;
    gridDim = gr;
    const uint64_t nblocks = (uint64_t)gr.x * gr.y * gr.z;
    std::vector<uint64_t> blocks(nblocks);
    for (uint64_t i = 0; i < nblocks; i++) blocks[i] = i;
    std::shuffle(blocks.begin(), blocks.end(), rng);
    for (uint64_t id : blocks) {
        blockIdx = uint3{(unsigned)(id % gr.x), (unsigned)(id / gr.x % gr.y), (unsigned)(id / ((uint64_t)gr.x * gr.y))};
        run_block();
    }
    check_dynamic_canary();
    g.running = false;
    g.launch = nullptr;
}

// ---- kernel arguments (marshalled like cuLaunchKernel) -----------------------------------------------
struct Arg {
    char kind;  // 'P' device address, 'I' i32, 'F' f32
    uint64_t bits;
};
inline Arg P(const void* p) { return Arg{'P', (uint64_t)(uintptr_t)p}; }
inline Arg P(uint64_t p) { return Arg{'P', p}; }
inline Arg I(int v) { return Arg{'I', (uint64_t)(uint32_t)v}; }
inline Arg F(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return Arg{'F', (uint64_t)u};
}

template <class T>
T unpack_arg(const char* kname, const std::vector<Arg>& args, size_t i) {
    const Arg& a = args[i];
    char want;
    if (std::is_pointer<T>::value)
        want = 'P';
    else if (std::is_floating_point<T>::value && sizeof(T) == 4)
        want = 'F';
    else if (std::is_integral<T>::value && sizeof(T) == 4)
        want = 'I';
    else
        want = '?';
    if (want != a.kind)
        fail("%s: argument %zu is passed as %c but the kernel's parameter is %s (%zu bytes)", kname, i, a.kind,
             want == 'P' ? "a pointer" : (want == 'F' ? "a float" : (want == 'I' ? "a 32-bit int" : "unsupported")),
             sizeof(T));
    T v;
    memcpy(&v, &a.bits, sizeof(T));
    return v;
}

template <class... Ps, size_t... Is>
std::tuple<Ps...> unpack_args(const char* kname, const std::vector<Arg>& args, std::index_sequence<Is...>) {
    return std::tuple<Ps...>(unpack_arg<Ps>(kname, args, Is)...);
}

// Launches `kernel` (a __global__ function) like cuLaunchKernel. `bound` is the kernel's
// __launch_bounds__ (0: none).
template <class... Ps>
void launch_args(const char* name, void (*kernel)(Ps...), int bound, dim3 grid, dim3 block, unsigned smem,
                 const std::vector<Arg>& args) {
    Launch L;
    L.name = name;
    L.grid = grid;
    L.block = block;
    L.smem = smem;
    g.launch = &L;
    if (args.size() != sizeof...(Ps))
        fail("%s takes %zu parameters, the launch passes %zu", name, sizeof...(Ps), args.size());
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) fail("empty grid (cuLaunchKernel: invalid value)");
    if (grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u) fail("grid past the limits (2^31-1, 65535, 65535)");
    const uint64_t threads = (uint64_t)block.x * block.y * block.z;
    if (threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64)
        fail("block past the limits (1024 threads; 1024, 1024, 64)");
    if (bound > 0 && threads > (uint64_t)bound)
        fail("%llu threads per block exceed the kernel's __launch_bounds__(%d) (launch fails: too many resources)",
             (unsigned long long)threads, bound);
    unsigned lim = g.max_dyn_smem_default;
    auto it = g.optin.find(name);
    if (it != g.optin.end()) lim = it->second;
    if (smem > lim)
        fail("%u bytes of dynamic shared memory exceed the kernel's limit of %u (opt in with "
             "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)",
             smem, lim);
    size_t dyn_cap = 0;
    for (auto& d : g.dyn_arrays) dyn_cap = std::max(dyn_cap, d.second);
    if (smem > dyn_cap) fail("emulator: %u bytes of dynamic shared memory exceed its arrays (%zu)", smem, dyn_cap);
    auto tup = std::make_shared<std::tuple<Ps...>>(unpack_args<Ps...>(name, args, std::index_sequence_for<Ps...>{}));
    L.body = [kernel, tup]() { std::apply(kernel, *tup); };
    run_launch(L);
}

// cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES).
inline void set_max_dynamic_shared(const std::string& name, unsigned bytes) {
    if (bytes > g.max_dyn_smem_optin) {
        Launch L;
        L.name = name.c_str();
        g.launch = &L;
        fail("%u bytes of dynamic shared memory refused (at most %u on sm_80)", bytes, g.max_dyn_smem_optin);
    }
    g.optin[name] = bytes;
}

}  // namespace emu

// ---- synchronisation and warp intrinsics --------------------------------------------------------------
// A call site is its source location (the intrinsics are macros): robust to the compiler
// duplicating code, which a return address is not. Sites of one helper (warp_sum, block_sum) are
// one site for all its callers.
#define EMU_SITE_ (::emu::Site{__FILE__, __LINE__})
#define __syncthreads() ::emu::block_barrier(EMU_SITE_)

inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) {
    emu::WarpSlot s{};
    emu::warp_collective(emu::COLL_SYNCWARP, mask, 0, emu::Site{nullptr, 0}, s);
}

namespace emu {
template <class T>
__attribute__((always_inline)) inline T shfl_impl(unsigned mask, T v, int mode, int arg, int width, Site site) {
    static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
    WarpSlot s{};
    memcpy(&s.v, &v, sizeof(T));
    const unsigned gen = warp_collective(COLL_SHFL, mask, (int)sizeof(T), site, s);
    const int lane = g.cur->lane;
    if (width <= 0 || width > 32 || (width & (width - 1))) fail("shuffle width %d is not a power of two ≤ 32", width);
    const int seg = lane & ~(width - 1);
    int src;
    switch (mode) {
        case 0: src = seg + (arg & (width - 1)); break;                          // __shfl_sync
        case 1: src = (lane - seg) + arg < width ? lane + arg : lane; break;     // __shfl_down_sync
        case 2: src = (lane - seg) - arg >= 0 ? lane - arg : lane; break;        // __shfl_up_sync
        default: src = ((lane - seg) ^ arg) < width ? (lane ^ arg) : lane; break;  // __shfl_xor_sync
    }
    const Warp& w = g.warps[g.cur->warp];
    if (!(mask >> src & 1u)) fail("shuffle reads lane %d, which is not in the mask %#x (undefined)", src, mask);
    T out;
    memcpy(&out, &w.buf[gen & 1][src].v, sizeof(T));
    return out;
}
}  // namespace emu

// Each intrinsic is a macro so that the call site (for the divergence check) is the kernel's line.
#define __shfl_sync(mask, v, src, ...) ::emu::shfl_impl((mask), (v), 0, (src), ::emu::width_(__VA_ARGS__ + 0), EMU_SITE_)
#define __shfl_down_sync(mask, v, d, ...) ::emu::shfl_impl((mask), (v), 1, (d), ::emu::width_(__VA_ARGS__ + 0), EMU_SITE_)
#define __shfl_up_sync(mask, v, d, ...) ::emu::shfl_impl((mask), (v), 2, (d), ::emu::width_(__VA_ARGS__ + 0), EMU_SITE_)
#define __shfl_xor_sync(mask, v, m, ...) ::emu::shfl_impl((mask), (v), 3, (m), ::emu::width_(__VA_ARGS__ + 0), EMU_SITE_)
namespace emu {
inline int width_(int w) { return w == 0 ? 32 : w; }
}

// ---- atomics (fibers never preempt each other: a plain read-modify-write is atomic) --------------------
template <class T>
inline T atomicAdd(T* p, T v) {  // float, double, int, unsigned: the overloads CUDA has
    T o = *p;
    *p = o + v;
    return o;
}
inline float atomicMax(float* p, float v) {
    float o = *p;
    *p = fmaxf(o, v);
    return o;
}

// ---- read-only loads ----------------------------------------------------------------------------------
template <class T>
inline T __ldg(const T* p) {
    if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0)
        emu::fail("misaligned %zu-byte load at %p (CUDA: misaligned address)", alignof(T), (const void*)p);
    return *p;
}

// ---- bf16 ---------------------------------------------------------------------------------------------
struct __nv_bfloat16 {
    uint16_t __x;
};
struct __attribute__((aligned(4))) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    __nv_bfloat16 r;
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) {
        r.__x = 0x7FFF;  // canonical NaN
        return r;
    }
    u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest, ties to even (overflow carries into ±inf)
    r.__x = (uint16_t)(u >> 16);
    return r;
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __bfloat162float(__nv_bfloat16 h) {
    uint32_t u = (uint32_t)h.__x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
    __nv_bfloat162 v;
    v.x = __float2bfloat16_rn(lo);
    v.y = __float2bfloat16_rn(hi);
    return v;
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return __floats2bfloat162_rn(f.x, f.y); }
inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }

// ---- mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 --------------------------------------------
// PTX ISA "Matrix Fragments for mma.m16n8k16 with floating point type", g = lane >> 2, t = lane & 3,
// each .b32 register two bf16 with the lower column / k index in the low 16 bits:
//   A (16×16, row):  a[0] = A[g][2t..2t+1]  a[1] = A[g+8][2t..2t+1]  a[2] = A[g][2t+8..]  a[3] = A[g+8][2t+8..]
//   B (16×8, col):   b[0] = B[2t..2t+1][g]  b[1] = B[2t+8..2t+9][g]
//   C, D (16×8 f32): c[0..1] = C[g][2t..2t+1]  c[2..3] = C[g+8][2t..2t+1]
namespace emu {
inline float bf16_half(uint32_t reg, int hi) {
    return __bfloat162float(__nv_bfloat16{(uint16_t)(hi ? reg >> 16 : reg & 0xFFFFu)});
}
// A[r][k] from the lanes' registers.
inline float mma_a(const WarpSlot* s, int r, int k) {
    const int lane = (r & 7) * 4 + ((k & 7) >> 1);
    const int reg = (r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    return bf16_half(s[lane].a[reg], k & 1);
}
inline float mma_b(const WarpSlot* s, int k, int n) {
    const int lane = n * 4 + ((k & 7) >> 1);
    return bf16_half(s[lane].b[k >= 8 ? 1 : 0], k & 1);
}
__attribute__((noinline)) inline void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                        const float c[4], Site site) {
    WarpSlot s{};
    memcpy(s.a, a, 16);
    memcpy(s.b, b, 8);
    memcpy(s.c, c, 16);
    const unsigned gen = warp_collective(COLL_MMA, 0xFFFFFFFFu, 0, site, s);
    const WarpSlot* all = g.warps[g.cur->warp].buf[gen & 1];
    const int lane = g.cur->lane, gq = lane >> 2, t = lane & 3;
    float out[4];
    for (int e = 0; e < 4; e++) {
        const int r = gq + (e >= 2 ? 8 : 0), n = 2 * t + (e & 1);
        double acc = 0.0;
        for (int k = 0; k < 16; k++) acc += (double)mma_a(all, r, k) * (double)mma_b(all, k, n);
        out[e] = (float)(acc + (double)all[lane].c[e]);
    }
    memcpy(d, out, 16);
}
}  // namespace emu
// Called by common.cuh's mma_bf16_16816 under ROENTGEN_EMU.
#define emu_mma_bf16_16816(d, a, b, c) ::emu::mma_m16n8k16_bf16((d), (a), (b), (c), EMU_SITE_)

// ---- cp.async (sm_80): global → shared copies that complete at cp.async.wait_group ------------------
// PTX ISA "cp.async", "cp.async.commit_group", "cp.async.wait_group": a thread's copies since its last
// commit form one group; wait_group N returns once at most N of its newest groups are pending.
// Emulated strictly: a copy lands in shared memory only when a wait retires its group (see
// AsyncCopy), so a read before the wait sees stale bytes; __syncthreads does not complete copies
// (it does not on hardware either); a thread that exits with copies pending is an error.
// `src_bytes` < `n` zero-fills the rest (the src-size operand: padding and out-of-range rows).
namespace emu {
inline bool in_shared(const void* p, size_t n) {
    const unsigned char* c = static_cast<const unsigned char*>(p);
    return !g.tls_lo || (c >= g.tls_lo && c + n <= g.tls_hi);
}
inline void cp_async(void* dst, const void* src, int n, int src_bytes) {
    if (n != 4 && n != 8 && n != 16) fail("cp.async of %d bytes (4, 8 or 16)", n);
    if (src_bytes < 0 || src_bytes > n) fail("cp.async src-size %d outside [0, %d]", src_bytes, n);
    if (reinterpret_cast<uintptr_t>(dst) % n || (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % n))
        fail("misaligned %d-byte cp.async (shared %p, global %p)", n, dst, src);
    if (!in_shared(dst, n)) fail("cp.async destination %p is not shared memory", dst);
    AsyncCopy c{static_cast<unsigned char*>(dst), {0}, n};
    if (src_bytes > 0) memcpy(c.bytes, src, src_bytes);
    g.cur->async_open.push_back(c);
}
inline void cp_async_commit() {
    Fiber* f = g.cur;
    f->async_groups.push_back(std::move(f->async_open));
    f->async_open.clear();
}
inline void cp_async_wait(int pending) {
    Fiber* f = g.cur;
    while ((int)f->async_groups.size() > pending) {
        for (const AsyncCopy& c : f->async_groups.front()) memcpy(c.dst, c.bytes, c.n);
        f->async_groups.pop_front();
    }
}

// ---- ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{,.trans}.shared.b16 ----------------------------------------
// PTX ISA "ldmatrix": matrix i (of `count`) has its 8 rows at the addresses of lanes 8i..8i+7, each
// row 8 b16 elements (16 bytes, 16-byte aligned, in shared memory). Register i of lane l holds
// row l/4, elements 2(l%4) and 2(l%4)+1 of matrix i (lower element in the low half); with .trans,
// elements (2(l%4), l/4) and (2(l%4)+1, l/4): the matrix transposed. A warp collective: every lane
// takes part, even those whose address is not used.
__attribute__((noinline)) inline void ldmatrix(uint32_t* r, int count, bool trans, const void* row, Site site) {
    if (count != 1 && count != 2 && count != 4) fail("ldmatrix .x%d (x1, x2 or x4)", count);
    WarpSlot s{};
    s.v = reinterpret_cast<uintptr_t>(row);
    const unsigned gen = warp_collective(COLL_LDMATRIX, 0xFFFFFFFFu, count * 2 + trans, site, s);
    const WarpSlot* all = g.warps[g.cur->warp].buf[gen & 1];
    const int lane = g.cur->lane;
    for (int m = 0; m < count; m++)
        for (int q = 0; q < 8; q++) {
            const void* p = reinterpret_cast<const void*>(all[8 * m + q].v);
            if (reinterpret_cast<uintptr_t>(p) % 16) fail("ldmatrix row address %p (lane %d) is not 16-byte aligned", p, 8 * m + q);
            if (!in_shared(p, 16)) fail("ldmatrix row address %p (lane %d) is not shared memory", p, 8 * m + q);
        }
    auto elem = [&](int m, int rr, int cc) -> uint32_t {
        uint16_t v;
        memcpy(&v, reinterpret_cast<const unsigned char*>(all[8 * m + rr].v) + 2 * cc, 2);
        return v;
    };
    const int a = lane >> 2, b = 2 * (lane & 3);
    for (int m = 0; m < count; m++)
        r[m] = trans ? (elem(m, b, a) | elem(m, b + 1, a) << 16) : (elem(m, a, b) | elem(m, a, b + 1) << 16);
}
}  // namespace emu
// Called by common.cuh's cp_async_* and ldmatrix_* under ROENTGEN_EMU (a macro: the call site names
// the collective for the divergence check).
#define emu_ldmatrix(r, count, trans, row) ::emu::ldmatrix((r), (count), (trans), (row), EMU_SITE_)
