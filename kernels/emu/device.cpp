// The emulated device's kernel side (feature `cuda-emu`; src/backend/cuda/emu.rs is the Rust side):
// the unmodified kernels/*.cu compiled for the CPU emulation of emu.h, launched by name with the
// 64-bit argument slots cuLaunchKernel receives, behind a small C interface.
//
// One worker thread runs every launch. emu.h fills this thread's whole TLS block of the executable
// with 0xFF before a block runs (`__shared__` is thread_local, and fresh shared memory is garbage);
// in a Rust program that block also holds Rust's own thread-locals, so no Rust code may run on the
// thread that launches: the worker is a C++ thread that only ever runs emulated kernels. It also
// serialises launches, as one CUDA stream does (emu.h's state is global).
//
// What the driver would refuse and this returns as an error: an unknown kernel, an argument count
// that differs from the kernel's parameters, a slot whose upper bytes are set for a 4-byte
// parameter (a pointer passed where an int or float belongs), a dynamic-shared-memory opt-in above
// the card's limit, grid/block/launch-bounds limits. What a kernel does wrong while it runs
// (out-of-bounds access at a guard page, misaligned vector access, a divergent barrier, a
// deadlock) is a fault: emu.h names the kernel, block and thread and jumps back here (the launch's
// fibers are abandoned, their C++ locals leak), and the launch answers 2, which the Rust side
// turns into a sticky error, as a fault spoils a CUDA context. Launches alternate between emu.h's
// two block schedules (ROENTGEN_EMU_SCHEDULE pins one: see next_policy).
#include "registry.h"

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>

namespace {

using Slots = std::vector<uint64_t>;
using SlotLauncher = std::function<std::string(dim3, dim3, unsigned, const Slots&)>;

// The parameter kinds emu.h's argument check expects, from the kernel's own parameter types; the
// slots carry no kinds (the driver receives none either), so the check here is by size.
template <class T>
char kind_of() {
    if (std::is_pointer<T>::value) return 'P';
    if (std::is_floating_point<T>::value && sizeof(T) == 4) return 'F';
    if (std::is_integral<T>::value && sizeof(T) == 4) return 'I';
    return '?';
}

template <class... Ps>
std::string launch_slots(const char* name, void (*kernel)(Ps...), int bound, dim3 grid, dim3 block, unsigned smem,
                         const Slots& slots) {
    if (slots.size() != sizeof...(Ps))
        return std::string(name) + " takes " + std::to_string(sizeof...(Ps)) + " parameters, the launch passes " +
               std::to_string(slots.size());
    const char kinds[] = {kind_of<Ps>()..., 0};
    const size_t sizes[] = {sizeof(Ps)..., 0};
    std::vector<emu::Arg> args;
    for (size_t i = 0; i < slots.size(); i++) {
        if (kinds[i] == '?') return std::string(name) + ": parameter " + std::to_string(i) + " has an unsupported type";
        if (sizes[i] == 4 && (slots[i] >> 32) != 0)
            return std::string(name) + ": argument " + std::to_string(i) +
                   " is a 4-byte parameter but its slot has upper bytes set (a pointer passed as an int or float?)";
        args.push_back(emu::Arg{kinds[i], slots[i]});
    }
    emu::launch_args(name, kernel, bound, grid, block, smem, args);
    return std::string();
}

std::map<std::string, SlotLauncher>& registry() {
    static std::map<std::string, SlotLauncher> r = [] {
        std::map<std::string, SlotLauncher> m;
#define K(k, bound) \
    m[#k] = [](dim3 gr, dim3 bl, unsigned sm, const Slots& s) { return launch_slots(#k, &k, bound, gr, bl, sm, s); };
#define KAB(H)                                   \
    K(attention_fwd_bf16_d##H, AB_THREADS)       \
    K(attention_bwd_dq_bf16_d##H, AB_THREADS)    \
    K(attention_bwd_dkdv_bf16_d##H, AB_THREADS)
        ROENTGEN_EMU_KERNELS(K, KAB)
#undef K
#undef KAB
        return m;
    }();
    return r;
}

// The worker: runs one job at a time for the callers, which wait for it.
struct Worker {
    std::mutex mu;
    std::condition_variable cv;
    std::function<void()> job;
    bool busy = false, done = false;
    std::thread thread;

    Worker() {
        thread = std::thread([this] {
            register_kernel_dynamic_smem();
            for (;;) {
                std::unique_lock<std::mutex> lk(mu);
                cv.wait(lk, [this] { return busy && !done; });
                job();
                done = true;
                cv.notify_all();
            }
        });
        thread.detach();
    }

    void run(std::function<void()> f) {
        static std::mutex callers;  // one job at a time
        std::lock_guard<std::mutex> one(callers);
        std::unique_lock<std::mutex> lk(mu);
        job = std::move(f);
        busy = true;
        done = false;
        cv.notify_all();
        cv.wait(lk, [this] { return done; });
        busy = false;
    }
};

Worker& worker() {
    static Worker* w = new Worker();  // never destroyed: the thread outlives static destructors
    return *w;
}

void put(char* err, size_t n, const std::string& msg) {
    if (n == 0) return;
    size_t k = std::min(n - 1, msg.size());
    memcpy(err, msg.data(), k);
    err[k] = 0;
}

size_t page_size() { return (size_t)sysconf(_SC_PAGESIZE); }

// The schedule of the next launch (emu.h's policy: 0 round-robin, 1 warp-greedy), or -1 with the
// message in `why` for an unknown ROENTGEN_EMU_SCHEDULE. By default launches alternate: a missing
// __syncthreads shows under warp-greedy (a warp runs on past its neighbours' writes), and every
// kernel is launched many times by any test of it, so both schedules run without running
// anything twice (a kernel that accumulates could not simply be run again).
int next_policy(std::string& why) {
    static const char* env = getenv("ROENTGEN_EMU_SCHEDULE");
    static std::atomic<unsigned long> launches{0};
    const std::string v = env ? env : "";
    if (v.empty() || v == "alternate") return (int)(launches++ % 2);
    if (v == "round-robin") return 0;
    if (v == "warp-greedy") return 1;
    why = "ROENTGEN_EMU_SCHEDULE=" + v + ": expected round-robin, warp-greedy or alternate";
    return -1;
}

}  // namespace

extern "C" {

// 1 when the emulated device has a kernel of this name (cuModuleGetFunction), else 0.
int roentgen_emu_has_kernel(const char* name) { return registry().count(name) ? 1 : 0; }

// cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES): 0, or 1 with a message.
int roentgen_emu_set_max_dynamic_shared(const char* name, unsigned bytes, char* err, size_t n) {
    if (bytes > emu::g.max_dyn_smem_optin) {
        put(err, n, std::to_string(bytes) + " bytes of dynamic shared memory refused (at most " +
                        std::to_string(emu::g.max_dyn_smem_optin) + " on sm_80)");
        return 1;
    }
    std::string k(name);
    worker().run([k, bytes] { emu::set_max_dynamic_shared(k, bytes); });
    return 0;
}

// cuLaunchKernel with the argument slots; runs the kernel to completion before returning.
// 0; 1 with a message for what the driver would refuse; 2 with a message for a fault while the
// kernel ran.
int roentgen_emu_launch(const char* name, const unsigned* grid, const unsigned* block, unsigned smem,
                        const uint64_t* slots, size_t nslots, char* err, size_t n) {
    auto it = registry().find(name);
    if (it == registry().end()) {
        put(err, n, std::string("no kernel named ") + name);
        return 1;
    }
    std::string msg;
    const int policy = next_policy(msg);
    if (policy < 0) {
        put(err, n, msg);
        return 1;
    }
    Slots s(slots, slots + nslots);
    bool fault = false;
    const dim3 g(grid[0], grid[1], grid[2]), b(block[0], block[1], block[2]);
    worker().run([&] {
        sigjmp_buf env;
        emu::g.recovering_host = true;
        emu::g.recover_thread = pthread_self();
        emu::g.recover = &env;
        emu::g.policy = policy;
        if (sigsetjmp(env, 1) == 0) {
            msg = it->second(g, b, smem, s);
        } else {
            msg = emu::g.fault;
            fault = emu::g.fault_while_running;
        }
        emu::g.recover = nullptr;
    });
    if (!msg.empty()) {
        put(err, n, msg);
        return fault ? 2 : 1;
    }
    return 0;
}

// Device memory: `bytes` ending exactly at a PROT_NONE guard page (an access past the end faults),
// filled with 0xFF (NaN as f32 and bf16: cuMemAlloc's contents are undefined). NULL on failure.
void* roentgen_emu_alloc(size_t bytes) {
    const size_t pg = page_size();
    const size_t body = (std::max<size_t>(bytes, 1) + pg - 1) / pg * pg;
    void* m = mmap(nullptr, body + pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return nullptr;
    mprotect(static_cast<char*>(m) + body, pg, PROT_NONE);
    char* p = static_cast<char*>(m) + body - bytes;
    memset(p, 0xFF, bytes);
    return p;
}

// Frees what roentgen_emu_alloc returned for `bytes` (later accesses fault: use after free).
void roentgen_emu_free(void* p, size_t bytes) {
    const size_t pg = page_size();
    const size_t body = (std::max<size_t>(bytes, 1) + pg - 1) / pg * pg;
    char* base = static_cast<char*>(p) + bytes - body;
    munmap(base, body + pg);
}

}  // extern "C"
