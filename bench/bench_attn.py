"""bench_attn.py - attention forward: flashmoe (as the runtime serves it) against PyTorch SDPA's
flash (FlashAttention-2) and cuDNN backends, in one process, on one card, on the same tensors.

Grid (the FlashAttention benchmark's): head dim 64/128/256, causal and not, sequence 512..16k with
batch x sequence = 16k tokens and heads x head dim = 2048; plus the mission shape 8x4096x128 (H=16).
FLOPs = 4*B*H*S^2*D, halved when causal. Timing: triton.testing.do_bench (CUDA events, L2 flushed
before every run outside the timed region, warm-up), median. Each flashmoe result is also checked
against SDPA's output before it is timed. Under this load the card runs at its power limit and
lowers its SM clock (bench/NOTES.md), so the three methods are timed interleaved: ROUNDS rounds of
one short do_bench each (order rotating), the median of the round medians kept; the SM clock and
board power are sampled after each of flashmoe's rounds.

usage: python3 bench/bench_attn.py --lib build/libflashmoe.so --out DIR [--quick]
                                   [--ref-lib OLD/libflashmoe.so] [--only D:causal:S,...]
--ref-lib: a second build of the library (e.g. the previous commit's), timed interleaved with the
others on the same configuration: the A/B of a kernel change in one process (column ref, ratio
new / ref).
"""
import argparse
import contextlib
import csv
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flashmoe_ctypes import FlashMoE  # noqa: E402
from gpu_state import gpu_state  # noqa: E402


def grid(quick):
    seqs = [512, 1024, 2048, 4096, 8192, 16384]
    if quick:
        seqs = [1024, 4096, 16384]
    pts = []
    for d in (64, 128, 256):
        for causal in (False, True):
            for s in seqs:
                pts.append((16384 // s, s, 2048 // d, d, causal, False))
    pts.append((8, 4096, 16, 128, False, True))  # the mission shape, outside the grid's mean
    pts.append((8, 4096, 16, 128, True, True))
    return pts


ROUNDS = 5


def bench_interleaved(fns):
    """{name: median ms} of fns (name -> (fn, SDPA backend or None)) timed in ROUNDS rounds (order
    rotating each round), each round a short do_bench per method, inside the method's backend
    context (entered outside the timed calls); the median of the round medians. Also
    {name: (MHz, W)} sampled right after each of the method's rounds (median). A method that
    raises gets nan."""
    names = list(fns)
    ms = {n: [] for n in names}
    st = {n: [] for n in names}
    for r in range(ROUNDS):
        for n in names[r % len(names):] + names[:r % len(names)]:
            if ms[n] and ms[n][-1] != ms[n][-1]:
                continue  # failed before
            fn, backend = fns[n]
            try:
                with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                    ms[n].append(triton.testing.do_bench(fn, warmup=10, rep=60,
                                                         return_mode="median"))
            except Exception as e:  # a backend that cannot run this shape
                print("  %s failed: %s" % (n, e))
                ms[n].append(float("nan"))
            st[n].append(gpu_state())
    med = {n: statistics.median(v) if all(x == x for x in v) else float("nan")
           for n, v in ms.items()}
    state = {n: (statistics.median(s[0] for s in v), statistics.median(s[1] for s in v))
             for n, v in st.items()}
    return med, state


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--ref-lib", default="",
                    help="another build of the library to time interleaved (A/B of a change)")
    ap.add_argument("--ref-shipped-db", default="",
                    help="with --ref-lib: the shipped database the ref library's context reads "
                         "(the same library file twice: the A/B of a database change)")
    ap.add_argument("--only", default="",
                    help="comma-separated D:causal:S points (and/or 'mission') to run, e.g. 128:0:4096")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dt = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    fm = FlashMoE(args.lib)
    reflib = (FlashMoE(args.ref_lib, shipped_db=args.ref_shipped_db or None)
              if args.ref_lib else None)
    dev = torch.cuda.get_device_name()
    print("card: %s, torch %s, cuDNN %s" % (dev, torch.__version__, torch.backends.cudnn.version()))
    rows = []
    pts = grid(args.quick)
    if args.only:
        want = set(args.only.split(","))
        pts = [p for p in pts if "%d:%d:%d" % (p[3], p[4], p[1]) in want
               or ("mission" in want and p[5])]
    for (b, s, h, d, causal, mission) in pts:
        torch.manual_seed(0)
        # SDPA layout is [B, H, S, D]; flashmoe reads [B, S, H, D] through strides, so both see
        # the very same memory: a [B, S, H, D] tensor transposed.
        q = torch.randn(b, s, h, d, device="cuda", dtype=dt)
        k = torch.randn(b, s, h, d, device="cuda", dtype=dt)
        v = torch.randn(b, s, h, d, device="cuda", dtype=dt)
        o = torch.empty_like(q)
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        flops = 4.0 * b * h * s * s * d * (0.5 if causal else 1.0)
        fa = fm.attention_args(q, k, v, o, causal)
        cfg, source, tuned = fm.select(fa)
        res = {"card": dev, "b": b, "s": s, "h": h, "d": d, "causal": int(causal), "mission": int(mission),
               "config": cfg, "source": source}

        def run_fm():
            fm.attention(fa, torch.cuda.current_stream().cuda_stream)

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ref = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)
        o.fill_(float("nan"))
        run_fm()
        torch.cuda.synchronize()
        err = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
        res["rel_err"] = err
        ok = err < 2e-2

        def run_sdpa(q=qt, k=kt, v=vt):
            F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        fns = {"flash": (run_sdpa, SDPBackend.FLASH_ATTENTION),
               "cudnn": (run_sdpa, SDPBackend.CUDNN_ATTENTION)}
        if ok:
            fns["flashmoe"] = (run_fm, None)
        if reflib is not None:
            ra = reflib.attention_args(q, k, v, o, causal)
            rcfg = reflib.select(ra)[0]
            if rcfg != cfg:
                print("  ref library selects %s, not %s" % (rcfg, cfg))

            def run_ref():
                reflib.attention(ra, torch.cuda.current_stream().cuda_stream)
            fns["ref"] = (run_ref, None)
        med, state = bench_interleaved(fns)
        for name in ("flash", "cudnn", "flashmoe", "ref"):
            if name == "ref" and reflib is None:
                continue
            res[name] = flops / med[name] / 1e9 if name in med else float("nan")
        if reflib is not None:
            res["vs_ref"] = res["flashmoe"] / res["ref"]
        res["sm_mhz"], res["watts"] = state.get("flashmoe", (float("nan"), float("nan")))
        res["vs_cudnn"] = res["flashmoe"] / res["cudnn"]
        res["vs_flash"] = res["flashmoe"] / res["flash"]
        rows.append(res)
        print("d=%3d causal=%d b=%2d s=%5d h=%2d  flashmoe %6.1f  flash %6.1f  cudnn %6.1f  "
              "x%.2f cuDNN x%.2f flash  err %.1e  %s (%s)  %.0f MHz %.0f W" % (
                  d, causal, b, s, h, res["flashmoe"], res["flash"], res["cudnn"],
                  res["vs_cudnn"], res["vs_flash"], err, cfg, source, res["sm_mhz"],
                  res["watts"]), flush=True)
        if reflib is not None:
            print("      ref %6.1f  new / ref x%.3f" % (res["ref"], res["vs_ref"]), flush=True)
        del q, k, v, o, qt, kt, vt, ref
    with open(os.path.join(args.out, "attn.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    g = [r for r in rows if not r["mission"]]

    def geo(key):
        vals = [r[key] for r in g if r[key] == r[key] and r[key] > 0]
        return math.exp(sum(math.log(x) for x in vals) / len(vals)) if vals else float("nan")

    print("\nTFLOP/s on %s (bf16 forward)" % dev)
    print("| D | causal | B | S | flashmoe | SDPA flash | SDPA cuDNN | vs cuDNN | vs flash |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| %d | %s | %d | %d | %.0f | %.0f | %.0f | %.2f | %.2f |" % (
            r["d"], "yes" if r["causal"] else "no", r["b"], r["s"], r["flashmoe"], r["flash"],
            r["cudnn"], r["vs_cudnn"], r["vs_flash"]))
    print("geometric mean over the grid: x%.2f cuDNN, x%.2f flash" % (geo("vs_cudnn"), geo("vs_flash")))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(2, 3, figsize=(15, 8), sharey=True)
        for i, d in enumerate((64, 128, 256)):
            for j, causal in enumerate((0, 1)):
                ax = axes[j][i]
                pts = [r for r in g if r["d"] == d and r["causal"] == causal]
                xs = [r["s"] for r in pts]
                for key, lab in (("flashmoe", "flashmoe"), ("cudnn", "SDPA cuDNN"), ("flash", "SDPA flash")):
                    ax.plot(xs, [r[key] for r in pts], marker="o", label=lab)
                ax.set_xscale("log", base=2)
                ax.set_title("D=%d %s" % (d, "causal" if causal else "non-causal"))
                ax.set_xlabel("sequence length")
                if i == 0:
                    ax.set_ylabel("TFLOP/s")
                ax.grid(True, alpha=0.3)
        axes[0][0].legend()
        fig.suptitle("Attention forward, bf16, %s" % dev)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "attn.png"), dpi=90)
    except Exception as e:
        print("plot failed: %s" % e)


if __name__ == "__main__":
    main()
