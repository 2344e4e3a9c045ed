#!/usr/bin/env python3
"""What PyTorch (cuBLAS, cuDNN, its SDPA kernels) reaches on this card, for the operations that make
up SD v1.4's U-Net at 512×512 with guidance (batch 2): the ceilings that roentgen's own kernels are
measured against (scripts/gpu-check.sh runs this beside `roentgen bench`).

Measures, in bf16 unless named, on random data (never zeros: they run faster than real data):
  - a large GEMM (8192×8192×8192; also f32 without TF32, the ceiling of `--precision f32`);
  - a device-to-device copy (memory bandwidth, bytes read + written);
  - channels-last conv2d 3×3, padding 1, c_in = c_out, at the U-Net's four resolutions for batch 2:
    64×64×320, 32×32×640, 16×16×1280, 8×8×1280 (cuDNN autotuned: torch.backends.cudnn.benchmark);
  - scaled_dot_product_attention at head dim 40 (batch 2, 8 heads): 4096 queries × 4096 keys
    (self-attention at 64×64) and × 77 keys (cross-attention to the text), with PyTorch's own choice
    and with each backend forced (flash, memory-efficient, cuDNN) where it accepts the shape.

Each row is the median of --iters timed calls (CUDA events) after --warmup untimed ones; a short
busy-wait kernel is queued before each timed call so that the host's launch latency stays out of the
time. Small inputs rotate among several copies, more bytes than the L2 holds, so the numbers are not
the cache's. Rows print as they are measured (a kill keeps what came before), as a markdown table;
--json adds one JSON line (prefixed "json: ") with every number.

    python3 scripts/gpu-ceilings.py [--json] [--iters 20] [--warmup 5]

Without PyTorch, or without a CUDA device, it says so and exits 0 having measured nothing.
"""
import argparse
import json
import statistics
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help='also print every number as one JSON line ("json: {...}")')
    ap.add_argument("--iters", type=int, default=20, help="timed calls per row (the median is reported)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed calls first (autotuning, handle creation)")
    a = ap.parse_args()
    if a.iters < 1 or a.warmup < 0:
        sys.exit("gpu-ceilings: --iters must be at least 1 and --warmup at least 0")

    try:
        import torch
    except ImportError as e:
        print(f"gpu-ceilings: skipped: PyTorch is not installed here ({e}); nothing measured")
        return 0
    if not torch.cuda.is_available():
        print(
            f"gpu-ceilings: skipped: PyTorch {torch.__version__} sees no CUDA device "
            f"(built for CUDA {torch.version.cuda}); nothing measured"
        )
        return 0

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    l2 = getattr(props, "L2_cache_size", 50 << 20) or (50 << 20)
    torch.backends.cudnn.benchmark = True  # the best cuDNN algorithm per shape: a ceiling, not a default
    torch.backends.cuda.matmul.allow_tf32 = False  # f32 rows are true f32, like roentgen's --precision f32
    torch.backends.cudnn.allow_tf32 = False
    head = {
        "device": props.name,
        "multiprocessors": props.multi_processor_count,
        "l2_bytes": l2,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }
    print(
        f"PyTorch {head['torch']} (CUDA {head['cuda']}, cuDNN {head['cudnn']}) on {props.name}, "
        f"{props.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MiB; median of {a.iters} after {a.warmup} warm-up\n"
    )
    print("| measurement | shape | median ms | TFLOP/s | TB/s | note |")
    print("|---|---|---:|---:|---:|---|")
    sys.stdout.flush()
    rows = []

    def error_text(e):
        first = (str(e).strip().splitlines() or [""])[0]
        return f"error: {type(e).__name__}: {first[:160]}".replace("|", "/")

    def copies(make, nbytes):
        """Enough independent input sets that together they hold about 3× the L2 (at most 64)."""
        n = max(1, min(64, -(-3 * l2 // max(1, nbytes))))
        return [make() for _ in range(n)]

    def timed(fn, n_sets):
        """Median milliseconds of fn(i) (i cycles through the input sets) over the timed calls."""
        for i in range(a.warmup):
            fn(i % n_sets)
        torch.cuda.synchronize()
        sleep = getattr(torch.cuda, "_sleep", None)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(a.iters)]
        for i, (s, e) in enumerate(events):
            if sleep is not None:
                sleep(1_000_000)  # ~0.5 ms of GPU busy-wait: the host queues the call before the GPU reaches it
            s.record()
            fn(i % n_sets)
            e.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in events]
        return statistics.median(times)

    def row(name, shape, fn=None, n_sets=1, flop=0.0, nbytes=0.0, note=""):
        """Times fn and prints one table row; an error becomes the row's note, never the end of the run."""
        r = {"name": name, "shape": shape, "note": note}
        try:
            ms = timed(fn, n_sets)
            r["ms"] = ms
            if flop:
                r["tflops"] = flop / (ms * 1e-3) / 1e12
            if nbytes:
                r["tbps"] = nbytes / (ms * 1e-3) / 1e12
        except Exception as e:  # one unsupported shape or backend must not lose the other rows
            r["note"] = (note + "; " if note else "") + error_text(e)
            try:
                torch.cuda.synchronize()
            except Exception:
                pass  # a sticky device error: the rows after this one will say so too
        rows.append(r)
        cell = lambda k, fmt: format(r[k], fmt) if k in r else "–"
        print(f"| {name} | {shape} | {cell('ms', '.3f')} | {cell('tflops', '.1f')} | {cell('tbps', '.2f')} | {r['note']} |")
        sys.stdout.flush()

    def guarded(name, shape, build):
        """build() allocates the inputs and returns row()'s keyword arguments; out of memory or an
        unsupported dtype there is reported as the row, like an error while timing."""
        try:
            kw = build()
        except Exception as e:
            kw = {"fn": None, "note": error_text(e)}
        if kw.get("fn") is None:
            rows.append({"name": name, "shape": shape, "note": kw["note"]})
            print(f"| {name} | {shape} | – | – | – | {kw['note']} |")
            sys.stdout.flush()
        else:
            row(name, shape, **kw)
        try:
            torch.cuda.empty_cache()
        except Exception:
            pass

    bf16 = torch.bfloat16
    torch.manual_seed(0)

    # GEMM: compute-bound at this size (each operand 128 MiB in bf16, far past the L2), one input set.
    def gemm(dtype, n):
        def build():
            x = torch.randn(n, n, device=dev, dtype=dtype)
            y = torch.randn(n, n, device=dev, dtype=dtype)
            out = torch.empty(n, n, device=dev, dtype=dtype)
            return {"fn": lambda i: torch.matmul(x, y, out=out), "flop": 2.0 * n * n * n}

        return build

    guarded("GEMM bf16 (cuBLAS)", "8192×8192×8192", gemm(bf16, 8192))
    guarded("GEMM f32, no TF32 (cuBLAS)", "4096×4096×4096", gemm(torch.float32, 4096))

    # Memory bandwidth: one 1 GiB buffer copied into another; bytes read + written.
    def copy():
        n = 1 << 29  # bf16 elements: 1 GiB
        src = torch.randn(n, device=dev, dtype=bf16)
        dst = torch.empty_like(src)
        return {"fn": lambda i: dst.copy_(src), "nbytes": 2.0 * src.numel() * src.element_size()}

    guarded("device-to-device copy", "1 GiB → 1 GiB", copy)

    # The U-Net's 3×3 convolutions (c_in = c_out) at each resolution, batch 2, NHWC (channels-last).
    for hw, c in [(64, 320), (32, 640), (16, 1280), (8, 1280)]:

        def conv(hw=hw, c=c):
            w = torch.randn(c, c, 3, 3, device=dev, dtype=bf16).mul_(0.02).to(memory_format=torch.channels_last)
            mk = lambda: torch.randn(2, c, hw, hw, device=dev, dtype=bf16).to(memory_format=torch.channels_last)
            xs = copies(mk, 2 * c * hw * hw * 2)
            fn = lambda i: torch.nn.functional.conv2d(xs[i], w, padding=1)
            moved = 2.0 * (2 * 2 * hw * hw * c + 9 * c * c)  # bf16 input and output, and the weights
            return {"fn": fn, "n_sets": len(xs), "flop": 2.0 * 2 * hw * hw * c * c * 9, "nbytes": moved}

        guarded("conv2d 3×3 bf16 channels-last (cuDNN)", f"2×{hw}×{hw}×{c} → {c}", conv)

    # Attention at head dim 40 (the U-Net's first level: 320 channels, 8 heads), batch 2.
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older PyTorch: only its own choice can be timed
        SDPBackend = sdpa_kernel = None
    backends = [("PyTorch's choice", None)]
    if SDPBackend is not None:
        for label, attr in [("flash", "FLASH_ATTENTION"), ("mem-efficient", "EFFICIENT_ATTENTION"), ("cuDNN", "CUDNN_ATTENTION")]:
            if hasattr(SDPBackend, attr):
                backends.append((label, getattr(SDPBackend, attr)))
    for nk, what in [(4096, "self"), (77, "cross")]:
        for label, backend in backends:

            def attn(nk=nk, backend=backend):
                b, h, nq, d = 2, 8, 4096, 40
                mk = lambda: tuple(
                    torch.randn(b, h, n, d, device=dev, dtype=bf16) for n in (nq, nk, nk)
                )
                qkv = copies(mk, 2 * b * h * d * (nq + 2 * nk))
                sdpa = torch.nn.functional.scaled_dot_product_attention
                if backend is None:
                    fn = lambda i: sdpa(*qkv[i])
                else:

                    def fn(i):
                        with sdpa_kernel([backend]):
                            return sdpa(*qkv[i])

                # QKᵀ and PV: 2 · 2·b·h·nq·nk·d; at least q, k, v and the output move (bf16).
                moved = 2.0 * b * h * d * (2 * nq + 2 * nk)
                return {"fn": fn, "n_sets": len(qkv), "flop": 4.0 * b * h * nq * nk * d, "nbytes": moved}

            guarded(f"SDPA bf16, {what}-attention ({label})", f"2×8 heads × 4096 q × {nk} k, d 40", attn)

    if a.json:
        print("json: " + json.dumps({**head, "iters": a.iters, "warmup": a.warmup, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
