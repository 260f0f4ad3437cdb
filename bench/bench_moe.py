"""bench_moe.py - the fused MoE forward: flashmoe (as the runtime serves it) against a naive
per-expert PyTorch loop and the sort + torch._grouped_mm pipeline (the TorchTitan way), in one
process, on one card, on the same tensors, with the floors measured in the same run.

Layer: routed experts of DeepSeek-V3 by default (E=256, K=8, H=7168, I=2048; router softmax ->
top-k -> renormalise), bf16, T = 1, 16, 128, 1024, 4096, 16384 tokens. FLOPs = 2*T*K*3*H*I.
Floors (measured here): device-to-device copy bandwidth (bytes read + written, 1 GiB buffers)
and a large bf16 matmul rate (8192^3 through torch). weight floor = bytes of the experts the
routing actually hits (3*H*I*2 bytes each), read once, at the copy bandwidth; compute floor =
FLOPs at the matmul rate; the floor is the larger.
Timing: CUDA events around each call, warm-up first, median of many runs; every run takes the
next of NROT input sets (hidden states and router logits; different logits route to different
experts), so neither L2 nor a fixed expert set flatters a method. Weights are allocated once
(22.5 GB at DeepSeek-V3). Each method's output is checked against the grouped_mm pipeline's.
Power: under this load an H200 sits at its 700 W limit and lowers its SM clock from 1980 MHz to
about 1450 (nvidia-smi dmon, bench/NOTES.md), and the clock a method sees depends on what ran
just before it. flashmoe and grouped_mm are therefore timed interleaved: a warm-up of both, then
ROUNDS rounds in which each runs for ROUND_MS (the order alternating), all runs of a method
pooled for its median; the SM clock and board power are sampled while each round runs.

usage: python3 bench/bench_moe.py --lib build/libflashmoe.so --out DIR
         [--preset deepseek-v3|qwen3-30b-a3b|mixtral-8x7b] [--tokens 1,16,...] [--no-naive]
Writes DIR/bench_moe.csv and DIR/bench_moe.png (when matplotlib is present); --replot CSV only
draws the PNG again from a CSV written before.
"""
import argparse
import csv
import ctypes
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flashmoe_ctypes import FlashMoE, MoeArgs, FM_DTYPE_BF16, FM_DTYPE_FP16  # noqa: E402
from gpu_state import gpu_state  # noqa: E402

PRESETS = {  # routed experts of the public model configurations: E, K, H, I
    "deepseek-v3": (256, 8, 7168, 2048),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "mixtral-8x7b": (8, 2, 4096, 14336),
}
NROT = 4
ROUNDS = 6
ROUND_MS = 250.0


# ---- the methods ------------------------------------------------------------------------------
def route(logits, k):
    """softmax -> top-k -> renormalise (ties: torch.topk's order)."""
    p = torch.softmax(logits.float(), dim=-1)
    w, ids = torch.topk(p, k, dim=-1)
    return w / w.sum(dim=-1, keepdim=True), ids


def grouped_mm_moe(x, logits, w13, w2, k):
    """Sort slots by expert, gate/up and down with torch._grouped_mm, SwiGLU, weighted
    index_add (TorchTitan's GroupedExperts path)."""
    T, H = x.shape
    E, I2, _ = w13.shape
    I = I2 // 2
    w, ids = route(logits, k)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    tok = order // k
    xs = x.index_select(0, tok)
    h = torch._grouped_mm(xs, w13.transpose(-2, -1), offs=offs)
    a = F.silu(h[:, :I]) * h[:, I:]
    y = torch._grouped_mm(a, w2.transpose(-2, -1), offs=offs)
    y = y * w.reshape(-1)[order].unsqueeze(1).to(y.dtype)
    out = torch.zeros_like(x)
    out.index_add_(0, tok, y)
    return out


def naive_moe(x, logits, w13, w2, k):
    """A Python loop over the experts, each doing its tokens with plain matmuls."""
    T, H = x.shape
    E, I2, _ = w13.shape
    I = I2 // 2
    w, ids = route(logits, k)
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    for e in range(E):
        tok, kk = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        h = x[tok] @ w13[e].t()
        a = F.silu(h[:, :I]) * h[:, I:]
        y = a @ w2[e].t()
        out.index_add_(0, tok, y.float() * w[tok, kk].unsqueeze(1))
    return out.to(x.dtype)


class FlashMoELayer:
    def __init__(self, fm, T, E, K, H, I, dtype):
        self.fm = fm
        self.a = MoeArgs()
        a = self.a
        a.dtype = FM_DTYPE_BF16 if dtype == torch.bfloat16 else FM_DTYPE_FP16
        a.tokens, a.hidden, a.intermediate, a.experts, a.topk = T, H, I, E, K
        a.routing, a.renormalize = 0, 1
        a.n_group, a.topk_group, a.routed_scaling_factor = 0, 0, 0.0
        size = ctypes.c_size_t(0)
        s = fm.lib.fm_moe_workspace_size(fm.ctx, ctypes.byref(a), ctypes.byref(size))
        if s != 0:
            raise RuntimeError("fm_moe_workspace_size: %s" % fm.error())
        self.ws = torch.empty(size.value, dtype=torch.uint8, device="cuda")
        a.workspace, a.workspace_bytes = self.ws.data_ptr(), size.value
        self.ids = torch.empty(T, K, dtype=torch.int32, device="cuda")
        self.wts = torch.empty(T, K, dtype=torch.float32, device="cuda")
        a.topk_ids, a.topk_weights = self.ids.data_ptr(), self.wts.data_ptr()

    def __call__(self, x, logits, w13, w2, out):
        a = self.a
        a.hidden_states, a.router_logits = x.data_ptr(), logits.data_ptr()
        a.w13, a.w2, a.out = w13.data_ptr(), w2.data_ptr(), out.data_ptr()
        a.correction_bias = None
        stream = torch.cuda.current_stream().cuda_stream
        s = self.fm.lib.fm_moe_fwd(self.fm.ctx, ctypes.byref(a), ctypes.c_void_p(stream))
        if s != 0:
            raise RuntimeError("fm_moe_fwd: %s" % self.fm.error())
        return out


# ---- timing ----------------------------------------------------------------------------------
def time_ms(fn, budget_ms=1500.0, min_runs=5, max_runs=200):
    """Median of CUDA-event timings of fn(i), i selecting the input set; warm-up first."""
    fn(0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(1)
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) * 1e3
    runs = int(max(min_runs, min(max_runs, budget_ms / max(est, 1e-3))))
    for i in range(min(3, runs)):
        fn(i)
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(runs)]
    for i in range(runs):
        ev[i][0].record()
        fn(i)
        ev[i][1].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in ev), runs


def time_interleaved(fns, rounds=ROUNDS, round_ms=ROUND_MS):
    """Median ms of each of fns (name -> fn(i)) under the same sustained load: a warm-up round of
    all, then `rounds` rounds in which each runs back to back for about round_ms (order reversed
    every other round); CUDA events per call, all calls of a method pooled. Returns
    {name: (median ms, runs, median SM MHz, median W)}; clock and power are read while the
    round's calls are still running."""
    names = list(fns)
    est = {}
    for n in names:  # first calls: module load, allocator, and a rough duration
        fns[n](0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fns[n](1)
        torch.cuda.synchronize()
        est[n] = max((time.perf_counter() - t0) * 1e3, 1e-3)
    times = {n: [] for n in names}
    state = {n: [] for n in names}
    for r in range(rounds + 1):  # round 0 is the warm-up
        for n in (names if r % 2 == 0 else names[::-1]):
            runs = int(max(3, min(400, round_ms / est[n])))
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(runs)]
            for i in range(runs):
                ev[i][0].record()
                fns[n](i)
                ev[i][1].record()
            st = gpu_state()  # the GPU is still working through this round
            torch.cuda.synchronize()
            if r > 0:
                times[n] += [a.elapsed_time(b) for a, b in ev]
                state[n].append(st)
    return {n: (statistics.median(times[n]), len(times[n]),
                statistics.median(s[0] for s in state[n]),
                statistics.median(s[1] for s in state[n])) for n in names}


def copy_bandwidth():
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    a.fill_(1)
    ms, _ = time_ms(lambda i: b.copy_(a), budget_ms=500)
    return 2.0 * n / (ms * 1e-3)  # bytes read + written per second


def matmul_rate(dtype):
    n = 8192
    a = torch.randn(n, n, dtype=dtype, device="cuda")
    b = torch.randn(n, n, dtype=dtype, device="cuda")
    ms, _ = time_ms(lambda i: a @ b, budget_ms=1000)
    return 2.0 * n ** 3 / (ms * 1e-3)


def kernel_breakdown(fn, total_ms, calls=10, warm_ms=1500.0):
    """Device time per kernel over `calls` calls of fn (CUPTI, through torch.profiler): where a
    layer's time goes (routing, alignment, each grouped GEMM, combine). The profiled calls follow
    about warm_ms of back-to-back calls with no synchronisation in between, so that they run
    under the same sustained load (and power-limited clock) as the timed rounds; also prints the
    span from the first profiled kernel's start to the last one's end, per call: with the
    kernels' sum it shows whether anything but kernels (launch gaps) takes time."""
    from torch.profiler import profile, ProfilerActivity
    torch.cuda.synchronize()
    for i in range(max(1, int(warm_ms / max(total_ms, 1e-3)))):
        fn(i)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            fn(i)
        torch.cuda.synchronize()
    per = {}
    t0, t1 = float("inf"), float("-inf")
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        t = getattr(e, "device_time", None)
        if t is None:
            t = e.cuda_time
        n = per.setdefault(e.name, [0.0, 0])
        n[0] += t / 1e3 / calls
        n[1] += 1
        tr = getattr(e, "time_range", None)
        if tr is not None:
            t0, t1 = min(t0, tr.start), max(t1, tr.end)
    for name, (ms, cnt) in sorted(per.items(), key=lambda kv: -kv[1][0]):
        print("    %-60s %8.3f ms/call (%4.1f%% of %.3f)  x%d"
              % (name[:60], ms, 100.0 * ms / total_ms, total_ms, cnt // calls))
    ksum = sum(ms for ms, _ in per.values())
    if t1 > t0:
        print("    kernels %.3f ms/call; first kernel start to last kernel end %.3f ms/call"
              % (ksum, (t1 - t0) / 1e3 / calls))


def rel_err(out, ref):
    d = (out.float() - ref.float()).norm()
    r = ref.float().norm()
    return (d / r).item() if r > 0 else d.item()


def plot(rows, png):
    """The table's times against T (log-log), one line per method; rows as in the CSV."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    r0 = rows[0]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ts = [int(r["T"]) for r in rows]
    for key, label in (("flashmoe_ms", "flashmoe"), ("grouped_mm_ms", "sort + torch._grouped_mm"),
                       ("naive_ms", "per-expert loop"), ("floor_ms", "floor (measured)")):
        ys = [float(r[key]) for r in rows]
        if all(math.isnan(y) for y in ys):
            continue
        ax.plot(ts, ys, marker="o", linestyle="--" if key == "floor_ms" else "-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens T")
    ax.set_ylabel("ms (median)")
    ax.set_title("MoE forward %s (E=%s K=%s H=%s I=%s) %s, %s" % (
        r0["preset"], r0["E"], r0["K"], r0["H"], r0["I"], r0["dtype"], r0["card"]), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print("wrote", png)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", help="path of libflashmoe.so")
    ap.add_argument("--out", required=True, help="folder for the CSV and the plot")
    ap.add_argument("--replot", default="",
                    help="only draw OUT/bench_moe.png again from this bench_moe.csv")
    ap.add_argument("--preset", default="deepseek-v3", choices=sorted(PRESETS))
    ap.add_argument("--tokens", default="1,16,128,1024,4096,16384")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    ap.add_argument("--no-naive", action="store_true", help="skip the per-expert loop")
    ap.add_argument("--routing", default="random", choices=("random", "uniform"),
                    help="uniform: every expert gets exactly T*K/E tokens (a diagnostic of the "
                         "cost of padded tile rows; needs T*K divisible by E)")
    ap.add_argument("--ref-lib", default="",
                    help="another build of the library, timed interleaved with the others "
                         "(the A/B of a change; column ref_ms)")
    ap.add_argument("--ref-shipped-db", default="",
                    help="with --ref-lib: the shipped database the ref library's context reads "
                         "(the same library file twice: the A/B of a database change)")
    ap.add_argument("--profile", action="store_true",
                    help="also print flashmoe's time per kernel (torch.profiler, 10 calls; "
                         "the ref library's too with --ref-lib)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.replot:
        with open(args.replot, newline="") as f:
            plot(list(csv.DictReader(f)), os.path.join(args.out, "bench_moe.png"))
        return
    if not args.lib:
        ap.error("--lib is required")
    E, K, H, I = PRESETS[args.preset]
    tokens = [int(t) for t in args.tokens.split(",")]
    dt = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    fm = FlashMoE(args.lib)
    reflib = (FlashMoE(args.ref_lib, shipped_db=args.ref_shipped_db or None)
              if args.ref_lib else None)
    print("card: %s, torch %s, flashmoe %s" % (torch.cuda.get_device_name(), torch.__version__,
                                                fm.lib.fm_version().decode()))
    bw = copy_bandwidth()
    mm = matmul_rate(dt)
    print("ceilings: copy %.2f TB/s (read + write), %s matmul 8192^3 %.0f TFLOP/s"
          % (bw / 1e12, args.dtype, mm / 1e12))

    # weights once, drawn on the GPU expert by expert (no fp32 temporaries of 22 GB)
    torch.manual_seed(0)
    w13 = torch.empty(E, 2 * I, H, dtype=dt, device="cuda")
    w2 = torch.empty(E, H, I, dtype=dt, device="cuda")
    for e in range(E):
        w13[e].uniform_(-math.sqrt(3.0 / H), math.sqrt(3.0 / H))
        w2[e].uniform_(-math.sqrt(3.0 / I), math.sqrt(3.0 / I))
    expert_bytes = 3 * H * I * torch.finfo(dt).bits // 8
    print("layer %s: E=%d K=%d H=%d I=%d, weights %.1f GB" % (args.preset, E, K, H, I,
                                                              E * expert_bytes / 1e9))

    rows = []
    for T in tokens:
        xs = [torch.empty(T, H, dtype=dt, device="cuda").uniform_(-1, 1) for _ in range(NROT)]
        ls = [torch.empty(T, E, dtype=torch.float32, device="cuda").uniform_(-3, 3)
              for _ in range(NROT)]
        if args.routing == "uniform":
            # token t prefers experts (t*K + j) mod E, j < K: each expert gets T*K/E tokens
            pick = (torch.arange(T, device="cuda").unsqueeze(1) * K
                    + torch.arange(K, device="cuda").unsqueeze(0)) % E
            for i, l in enumerate(ls):
                l.scatter_(1, (pick + i) % E, 10.0)
        out_fm = torch.empty(T, H, dtype=dt, device="cuda")
        layer = FlashMoELayer(fm, T, E, K, H, I, dt)
        flops = 2.0 * T * K * 3 * H * I
        hit = statistics.mean(len(torch.unique(route(l, K)[1])) for l in ls)
        floor_w = hit * expert_bytes / bw * 1e3
        floor_c = flops / mm * 1e3
        floor = max(floor_w, floor_c)

        # correctness first: flashmoe and the loop against the grouped_mm pipeline
        ref = grouped_mm_moe(xs[0], ls[0], w13, w2, K)
        layer(xs[0], ls[0], w13, w2, out_fm)
        err_fm = rel_err(out_fm, ref)
        err_nv = (rel_err(naive_moe(xs[0], ls[0], w13, w2, K), ref) if not args.no_naive
                  else float("nan"))
        ref = None

        fns = {"flashmoe": lambda i: layer(xs[i % NROT], ls[i % NROT], w13, w2, out_fm),
               "grouped_mm": lambda i: grouped_mm_moe(xs[i % NROT], ls[i % NROT], w13, w2, K)}
        if reflib is not None:
            ref_layer = FlashMoELayer(reflib, T, E, K, H, I, dt)
            out_ref = torch.empty_like(out_fm)
            fns["ref"] = lambda i: ref_layer(xs[i % NROT], ls[i % NROT], w13, w2, out_ref)
        tm = time_interleaved(fns)
        if reflib is not None:
            print("T=%-6d ref library %8.3f ms, this one / ref x%.3f"
                  % (T, tm["ref"][0], tm["flashmoe"][0] / tm["ref"][0]), flush=True)
            if args.profile:
                print("  per kernel, ref library:")
                kernel_breakdown(lambda i: ref_layer(xs[i % NROT], ls[i % NROT], w13, w2, out_ref),
                                 tm["ref"][0])
                print("  per kernel, this library:")
            ref_layer = out_ref = None
        t_fm, n_fm, mhz_fm, w_fm = tm["flashmoe"]
        t_gm, n_gm, mhz_gm, w_gm = tm["grouped_mm"]
        if args.no_naive:
            t_nv, n_nv = float("nan"), 0
        else:
            t_nv, n_nv = time_ms(lambda i: naive_moe(xs[i % NROT], ls[i % NROT], w13, w2, K),
                                 budget_ms=1000, min_runs=3, max_runs=30)
        if args.profile:
            kernel_breakdown(lambda i: layer(xs[i % NROT], ls[i % NROT], w13, w2, out_fm), t_fm)
        row = dict(preset=args.preset, dtype=args.dtype, routing=args.routing, T=T, E=E, K=K, H=H, I=I,
                   experts_hit=round(hit, 1), flashmoe_ms=t_fm, grouped_mm_ms=t_gm, naive_ms=t_nv,
                   floor_weights_ms=floor_w, floor_compute_ms=floor_c, floor_ms=floor,
                   flashmoe_tflops=flops / (t_fm * 1e-3) / 1e12,
                   grouped_over_flashmoe=t_gm / t_fm, naive_over_flashmoe=t_nv / t_fm,
                   flashmoe_over_floor=t_fm / floor, err_flashmoe=err_fm, err_naive=err_nv,
                   runs_flashmoe=n_fm, runs_grouped=n_gm, runs_naive=n_nv,
                   sm_mhz_flashmoe=mhz_fm, sm_mhz_grouped=mhz_gm, watts_flashmoe=w_fm,
                   watts_grouped=w_gm,
                   copy_tbs=bw / 1e12, matmul_tflops=mm / 1e12,
                   card=torch.cuda.get_device_name())
        rows.append(row)
        print("T=%-6d flashmoe %8.3f ms  grouped_mm %8.3f  naive %8.3f  floor %7.3f  (err %.1e)"
              "  SM %.0f/%.0f MHz, %.0f/%.0f W" % (T, t_fm, t_gm, t_nv, floor, err_fm, mhz_fm,
                                                  mhz_gm, w_fm, w_gm), flush=True)
        xs = ls = out_fm = layer = None  # free this size's buffers before the next
        torch.cuda.empty_cache()

    print()
    print("%-6s %10s %10s %10s %9s %8s %9s %9s %10s %9s" % (
        "T", "flashmoe", "grouped", "naive", "floor", "TFLOP/s", "grp/fm", "naive/fm",
        "fm/floor", "rel err"))
    for r in rows:
        print("%-6d %10.3f %10.3f %10.3f %9.3f %8.1f %9.2f %9.2f %10.2f %9.1e" % (
            r["T"], r["flashmoe_ms"], r["grouped_mm_ms"], r["naive_ms"], r["floor_ms"],
            r["flashmoe_tflops"], r["grouped_over_flashmoe"], r["naive_over_flashmoe"],
            r["flashmoe_over_floor"], r["err_flashmoe"]))
    path = os.path.join(args.out, "bench_moe.csv")
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        wr.writeheader()
        wr.writerows(rows)
    print("wrote", path)
    plot(rows, os.path.join(args.out, "bench_moe.png"))


if __name__ == "__main__":
    main()
