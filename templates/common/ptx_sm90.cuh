/*
 * ptx_sm90.cuh - inline-PTX wrappers for the Hopper (sm_90a) data path: mbarriers, the bulk
 * tensor copy engine (TMA), warpgroup MMA (wgmma) with its shared-memory matrix descriptors,
 * register reallocation (setmaxnreg) and named barriers.
 *
 * Addresses of shared memory are 32-bit shared-window addresses (fm_smem_u32 from ptx_sm80.cuh).
 * Asm that orders memory (barriers, copies, waits) is volatile with a "memory" clobber so that
 * ordinary loads and stores are not moved across it.
 *
 * wgmma is asynchronous: the instruction returns before its accumulator registers are written.
 * The compiler does not know that, so code must (1) call fm_wgmma_fence() before the first wgmma
 * of a batch (orders earlier register writes, e.g. a rescaled accumulator, before the tensor
 * core reads them), (2) after fm_wgmma_wait<N>(), pass every accumulator it will read through
 * fm_fence_regs(), a volatile empty asm that "redefines" the registers and therefore cannot be
 * hoisted above the wait. ptxas itself tracks the physical registers of in-flight wgmma.
 */
#pragma once

#include "ptx_sm80.cuh" /* fm_smem_u32 */

/* The tensor map (CUtensorMap on the host: 128 bytes, 64-byte aligned, opaque). Kernels take it
 * by value as a `const __grid_constant__` parameter and hand its generic address to the copy
 * engine; cuda.h cannot be included by NVRTC kernels, hence this stand-in of the same layout. */
struct __align__(64) fm_tma_desc {
    unsigned long long v[16];
};

/* ---- mbarrier (shared::cta) ------------------------------------------------------------------
 * A phase completes when `count` arrivals have been made and the expected transaction bytes (if
 * any) have landed. Waiters name the phase by its parity. A fresh barrier is in phase 0, and a
 * wait for parity 1 returns at once (the "previous" phase counts as complete): producers start
 * waiting on their empty barriers with parity 1, consumers on full barriers with parity 0. */
static __device__ __forceinline__ void fm_mbar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

/* Makes barrier initialisation visible to the async proxy (the copy engine's complete_tx) and
 * to other threads; follow it with a CTA barrier. */
static __device__ __forceinline__ void fm_mbar_init_fence(void) {
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

static __device__ __forceinline__ void fm_mbar_arrive(unsigned bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

/* ---- thread-block clusters ------------------------------------------------------------------
 * A CTA's rank in its cluster, the address of the same shared-memory location in another CTA of
 * the cluster, an arrival on a barrier there, and the cluster-wide barrier (every non-exited
 * thread of the cluster; release/acquire order the shared-memory accesses around it). */
static __device__ __forceinline__ unsigned fm_cluster_rank(void) {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
static __device__ __forceinline__ unsigned fm_cluster_map(unsigned addr, unsigned rank) {
    unsigned r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(addr), "r"(rank));
    return r;
}
/* Default (CTA-scope) release semantics: the arrival only has to follow this thread's own reads
 * of its CTA's shared memory (waited for before it), and a cluster-scope release costs a fence
 * that measured 2x the kernel time when it sat on every key block's critical path. */
static __device__ __forceinline__ void fm_mbar_arrive_cluster(unsigned cluster_addr) {
    asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];" ::"r"(cluster_addr) : "memory");
}
static __device__ __forceinline__ void fm_cluster_sync(void) {
    asm volatile("barrier.cluster.arrive.release;\n\tbarrier.cluster.wait.acquire;" ::: "memory");
}

/* Arrives once and adds `bytes` to the transaction count the current phase waits for. */
static __device__ __forceinline__ void fm_mbar_arrive_expect_tx(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
                 : "memory");
}

static __device__ __forceinline__ unsigned fm_mbar_try_wait(unsigned bar, unsigned parity) {
    unsigned ok;
    asm volatile("{\n\t.reg .pred p;\n\t"
                 "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
                 "selp.u32 %0, 1, 0, p;\n\t}"
                 : "=r"(ok)
                 : "r"(bar), "r"(parity)
                 : "memory");
    return ok;
}

/* try_wait suspends the thread for a while inside the instruction, so the loop does not spin
 * hot. A wait that never ends is a protocol bug (a missing arrival, a wrong parity); rather
 * than hang the GPU, give up with a trap after FM_MBAR_SPIN_LIMIT failed tries (2^26 tries
 * take over a second even without suspension, far beyond any legitimate wait on one tile).
 * Define it to 0 to spin forever. */
#ifndef FM_MBAR_SPIN_LIMIT
#define FM_MBAR_SPIN_LIMIT (1u << 26)
#endif
static __device__ __forceinline__ void fm_mbar_wait(unsigned bar, unsigned parity) {
#if FM_MBAR_SPIN_LIMIT
    unsigned tries = 0;
    while (!fm_mbar_try_wait(bar, parity)) {
        if (++tries == FM_MBAR_SPIN_LIMIT) asm volatile("trap;");
    }
#else
    while (!fm_mbar_try_wait(bar, parity)) {
    }
#endif
}

/* ---- proxies, named barriers, registers ----------------------------------------------------- */
/* Orders this thread's earlier generic-proxy shared-memory accesses before later async-proxy
 * ones (TMA writes, wgmma reads) once a barrier has joined the threads. */
static __device__ __forceinline__ void fm_fence_proxy_async(void) {
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

/* Named barrier `id` (1..15; 0 is __syncthreads) over `count` threads (a multiple of 32).
 * sync waits; arrive only counts. */
static __device__ __forceinline__ void fm_bar_sync(unsigned id, unsigned count) {
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(count) : "memory");
}
static __device__ __forceinline__ void fm_bar_arrive(unsigned id, unsigned count) {
    asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(count) : "memory");
}

/* Per-thread register budget of the executing warpgroup (all four warps must execute it, and
 * the kernel must have a register cap at entry: __launch_bounds__(threads, 1)). */
template <int N> static __device__ __forceinline__ void fm_setmaxnreg_inc(void) {
    static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg takes 24..256, multiple of 8");
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(N));
}
template <int N> static __device__ __forceinline__ void fm_setmaxnreg_dec(void) {
    static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg takes 24..256, multiple of 8");
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(N));
}

/* ---- TMA: bulk tensor copies global <-> shared ------------------------------------------------
 * Loads complete on an mbarrier (complete_tx counts the whole box, out-of-bounds elements
 * included: those are written as zeros). Coordinates are element indices, innermost first. */
static __device__ __forceinline__ void fm_tma_prefetch_desc(const fm_tma_desc *d) {
    asm volatile("prefetch.tensormap [%0];" ::"l"(d) : "memory");
}

static __device__ __forceinline__ void fm_tma_load_3d(unsigned dst, const fm_tma_desc *d,
                                                      unsigned bar, int c0, int c1, int c2) {
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3, %4}], [%5];" ::"r"(dst),
                 "l"(d), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
                 : "memory");
}

static __device__ __forceinline__ void fm_tma_load_4d(unsigned dst, const fm_tma_desc *d,
                                                      unsigned bar, int c0, int c1, int c2,
                                                      int c3) {
    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3, %4, %5}], [%6];" ::"r"(dst),
                 "l"(d), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
                 : "memory");
}

static __device__ __forceinline__ void fm_tma_load_5d(unsigned dst, const fm_tma_desc *d,
                                                      unsigned bar, int c0, int c1, int c2,
                                                      int c3, int c4) {
    asm volatile("cp.async.bulk.tensor.5d.shared::cluster.global.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3, %4, %5, %6}], [%7];" ::"r"(dst),
                 "l"(d), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4), "r"(bar)
                 : "memory");
}

/* The same with an L2 eviction-priority policy from fm_l2_policy_*(). */
static __device__ __forceinline__ void fm_tma_load_4d_hint(unsigned dst, const fm_tma_desc *d,
                                                           unsigned bar, int c0, int c1, int c2,
                                                           int c3, unsigned long long policy) {
    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
                 ".L2::cache_hint [%0], [%1, {%2, %3, %4, %5}], [%6], %7;" ::"r"(dst),
                 "l"(d), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar), "l"(policy)
                 : "memory");
}

/* The same box written to the same shared-memory offset of every CTA in cta_mask (bit i: rank
 * i of the cluster), each CTA's barrier at `bar` receiving the bytes. */
/* The same copy delivered to every CTA of the cluster in cta_mask, at the same shared-memory
 * offset, each completing bytes on its own barrier at bar's offset (no cache hint). */
static __device__ __forceinline__ void fm_tma_load_4d_mc(unsigned dst, const fm_tma_desc *d,
                                                         unsigned bar, int c0, int c1, int c2,
                                                         int c3, unsigned short cta_mask) {
    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
                 ".multicast::cluster [%0], [%1, {%2, %3, %4, %5}], [%6], %7;"
                 ::"r"(dst), "l"(d), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar), "h"(cta_mask)
                 : "memory");
}
static __device__ __forceinline__ void fm_tma_load_4d_multicast(unsigned dst, const fm_tma_desc *d,
                                                                unsigned bar, int c0, int c1,
                                                                int c2, int c3,
                                                                unsigned short cta_mask,
                                                                unsigned long long policy) {
    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
                 ".multicast::cluster.L2::cache_hint [%0], [%1, {%2, %3, %4, %5}], [%6], %7, %8;"
                 ::"r"(dst), "l"(d), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar), "h"(cta_mask),
                 "l"(policy)
                 : "memory");
}

static __device__ __forceinline__ unsigned long long fm_l2_policy_evict_first(void) {
    unsigned long long p;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
    return p;
}
static __device__ __forceinline__ unsigned long long fm_l2_policy_evict_last(void) {
    unsigned long long p;
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(p));
    return p;
}

/* Store of a shared-memory box to global (rows/columns out of bounds are not written). The
 * source must have been written before a fence.proxy.async + barrier; commit, then wait before
 * reusing the shared memory (read) or before the kernel relies on the global result. */
static __device__ __forceinline__ void fm_tma_store_4d(const fm_tma_desc *d, unsigned src, int c0,
                                                       int c1, int c2, int c3) {
    asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%2, %3, %4, %5}],"
                 " [%1];" ::"l"(d),
                 "r"(src), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
                 : "memory");
}
/* 1-D bulk copy of `bytes` (a multiple of 16; both addresses 16-byte aligned) from shared to
 * global memory by the copy engine, in the issuing thread's bulk group (commit and wait as for
 * the tensor store). */
static __device__ __forceinline__ void fm_bulk_store(void *dst, unsigned src, unsigned bytes) {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst),
                 "r"(src), "r"(bytes)
                 : "memory");
}
static __device__ __forceinline__ void fm_tma_store_commit(void) {
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}
template <int N> static __device__ __forceinline__ void fm_tma_store_wait_read(void) {
    asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}

/* ---- wgmma shared-memory matrix descriptors ---------------------------------------------------
 * 64-bit: bits 0-13 start address >> 4, 16-29 leading-dimension byte offset (LBO) >> 4, 32-45
 * stride-dimension byte offset (SBO) >> 4, 49-51 base offset (0: every swizzle atom we use is
 * 1024-byte aligned), 62-63 swizzle (1 = 128-byte).
 *
 * With 128-byte swizzle a tile is stored as rows of 128 bytes (64 16-bit elements), 8 rows to a
 * 1024-byte atom, in which the 16-byte unit u of row r sits at unit u ^ (r % 8): exactly what the
 * copy engine writes with CU_TENSOR_MAP_SWIZZLE_128B and a 128-byte inner box.
 *  - K-major operand (K contiguous; A = Q, B = K in S = Q K^T): the 8-row groups of M/N follow
 *    each other at SBO = 1024; LBO is unused (one k16 step, 32 bytes, stays inside the 128-byte
 *    row). The k-th 16-element step starts 32*k bytes further into the row: the hardware applies
 *    the XOR to the final address, so advancing the start address inside an atom is exact.
 *  - MN-major operand (N contiguous; B = V in O = P V, transposed by the instruction): 64 N
 *    elements per 128-byte row, each row one K index; 8 K rows per atom, the next 8 K rows at
 *    SBO, the next 64 N elements at LBO. */
static __device__ __forceinline__ unsigned long long fm_wgmma_desc_sw128(unsigned addr,
                                                                         unsigned lbo_bytes,
                                                                         unsigned sbo_bytes) {
    return (unsigned long long)((addr & 0x3FFFFu) >> 4) |
           ((unsigned long long)((lbo_bytes >> 4) & 0x3FFFu) << 16) |
           ((unsigned long long)((sbo_bytes >> 4) & 0x3FFFu) << 32) | (1ull << 62);
}

/* ---- wgmma synchronisation ---------------------------------------------------------------- */
static __device__ __forceinline__ void fm_wgmma_fence(void) {
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}
static __device__ __forceinline__ void fm_wgmma_commit(void) {
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
/* Waits until at most N committed groups of this warpgroup are still in flight. */
template <int N> static __device__ __forceinline__ void fm_wgmma_wait(void) {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

/* Pins registers in program order (see the file comment). */
template <int K> static __device__ __forceinline__ void fm_fence_regs(float (&r)[K]) {
#pragma unroll
    for (int i = 0; i < K; i++) asm volatile("" : "+f"(r[i])::"memory");
}
template <int K> static __device__ __forceinline__ void fm_fence_regs(unsigned (&r)[K]) {
#pragma unroll
    for (int i = 0; i < K; i++) asm volatile("" : "+r"(r[i])::"memory");
}

/* ---- wgmma.mma_async m64nNk16, f32 accumulators, bf16/f16 inputs -------------------------------
 * fm_wgmma<N>::ss<BF16, TB>(d, a_desc, b_desc, scale_d): D(64xN) (+)= A(64x16, smem, K-major) *
 * B(16xN, smem; TB = 0: K-major, 1: MN-major); scale_d = 0 ignores the old D (zero-init).
 * fm_wgmma<N>::rs<BF16, TB>(d, a, b_desc, scale_d): A from registers, 4 x 32-bit per thread.
 *
 * Register layouts (warp w of the warpgroup owns rows 16w..16w+15; lane l, g = l/4, t = l%4):
 *  D: d[4i + r] = row g + 8*(r/2), column 8i + 2t + (r%2), i = 0..N/8-1.
 *  A: a[0] = (row g, k 2t..2t+1), a[1] = (row g+8, k 2t..), a[2] = (row g, k 2t+8..),
 *     a[3] = (row g+8, k 2t+8..); low half = lower k. The same as mma.m16n8k16's A fragment,
 *     and as D's columns 16j..16j+15, which is why a softmax tile S in D layout becomes the A
 *     operand of P V without any data movement.
 *
 * The operand lists are spelled out by macros because inline asm needs one "+f" operand per
 * accumulator register: FM_WG_OPS_K is "%0, ..., %(K-1)" and FM_WG_CONS_K(d) the matching
 * constraints; the scalar operands follow at the literal indices given to FM_WGMMA_DEFINE. */
template <int N> struct fm_wgmma;

#define FM_WGMMA_ASM_SS(N, K, TY, I0, I1, I2, I3)                                              \
    "{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %" I2 ", 0;\n\t"                                      \
    "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " {" FM_WG_OPS_##K "}, %" I0   \
    ", %" I1 ", p, 1, 1, 0, %" I3 ";\n\t}"

#define FM_WGMMA_ASM_RS(N, K, TY, I0, I1, I2, I3, I4, I5, I6)                                  \
    "{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %" I5 ", 0;\n\t"                                      \
    "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " {" FM_WG_OPS_##K "}, {%" I0  \
    ", %" I1 ", %" I2 ", %" I3 "}, %" I4 ", p, 1, 1, %" I6 ";\n\t}"

#define FM_WGMMA_DEFINE(N, K, I0, I1, I2, I3, I4, I5, I6)                                       \
    template <> struct fm_wgmma<N> {                                                           \
        template <int BF16, int TB>                                                            \
        static __device__ __forceinline__ void ss(float (&d)[K], unsigned long long a,         \
                                                  unsigned long long b, int scale_d) {         \
            if constexpr (BF16 != 0) {                                                         \
                asm volatile(FM_WGMMA_ASM_SS(N, K, "bf16", I0, I1, I2, I3)                     \
                             : FM_WG_CONS_##K(d)                                               \
                             : "l"(a), "l"(b), "r"(scale_d), "n"(TB));                         \
            } else {                                                                           \
                asm volatile(FM_WGMMA_ASM_SS(N, K, "f16", I0, I1, I2, I3)                      \
                             : FM_WG_CONS_##K(d)                                               \
                             : "l"(a), "l"(b), "r"(scale_d), "n"(TB));                         \
            }                                                                                  \
        }                                                                                      \
        template <int BF16, int TB>                                                            \
        static __device__ __forceinline__ void rs(float (&d)[K], const unsigned (&a)[4],       \
                                                  unsigned long long b, int scale_d) {         \
            if constexpr (BF16 != 0) {                                                         \
                asm volatile(FM_WGMMA_ASM_RS(N, K, "bf16", I0, I1, I2, I3, I4, I5, I6)         \
                             : FM_WG_CONS_##K(d)                                               \
                             : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b),             \
                               "r"(scale_d), "n"(TB));                                         \
            } else {                                                                           \
                asm volatile(FM_WGMMA_ASM_RS(N, K, "f16", I0, I1, I2, I3, I4, I5, I6)          \
                             : FM_WG_CONS_##K(d)                                               \
                             : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b),             \
                               "r"(scale_d), "n"(TB));                                         \
            }                                                                                  \
        }                                                                                      \
    };

/* "%0, ..., %7", "%8, ..., %15", ...: the accumulator operands in groups of 8. */
#define FM_WG_A0 "%0, %1, %2, %3, %4, %5, %6, %7"
#define FM_WG_A1 "%8, %9, %10, %11, %12, %13, %14, %15"
#define FM_WG_A2 "%16, %17, %18, %19, %20, %21, %22, %23"
#define FM_WG_A3 "%24, %25, %26, %27, %28, %29, %30, %31"
#define FM_WG_A4 "%32, %33, %34, %35, %36, %37, %38, %39"
#define FM_WG_A5 "%40, %41, %42, %43, %44, %45, %46, %47"
#define FM_WG_A6 "%48, %49, %50, %51, %52, %53, %54, %55"
#define FM_WG_A7 "%56, %57, %58, %59, %60, %61, %62, %63"
#define FM_WG_A8 "%64, %65, %66, %67, %68, %69, %70, %71"
#define FM_WG_A9 "%72, %73, %74, %75, %76, %77, %78, %79"
#define FM_WG_A10 "%80, %81, %82, %83, %84, %85, %86, %87"
#define FM_WG_A11 "%88, %89, %90, %91, %92, %93, %94, %95"
#define FM_WG_A12 "%96, %97, %98, %99, %100, %101, %102, %103"
#define FM_WG_A13 "%104, %105, %106, %107, %108, %109, %110, %111"
#define FM_WG_A14 "%112, %113, %114, %115, %116, %117, %118, %119"
#define FM_WG_A15 "%120, %121, %122, %123, %124, %125, %126, %127"
#define FM_WG_OPS_4 "%0, %1, %2, %3"
#define FM_WG_OPS_8 FM_WG_A0
#define FM_WG_OPS_12 FM_WG_OPS_8 ", %8, %9, %10, %11"
#define FM_WG_OPS_20 FM_WG_OPS_16 ", %16, %17, %18, %19"
#define FM_WG_OPS_16 FM_WG_OPS_8 ", " FM_WG_A1
#define FM_WG_OPS_24 FM_WG_OPS_16 ", " FM_WG_A2
#define FM_WG_OPS_32 FM_WG_OPS_24 ", " FM_WG_A3
#define FM_WG_OPS_40 FM_WG_OPS_32 ", " FM_WG_A4
#define FM_WG_OPS_48 FM_WG_OPS_40 ", " FM_WG_A5
#define FM_WG_OPS_56 FM_WG_OPS_48 ", " FM_WG_A6
#define FM_WG_OPS_64 FM_WG_OPS_56 ", " FM_WG_A7
#define FM_WG_OPS_72 FM_WG_OPS_64 ", " FM_WG_A8
#define FM_WG_OPS_80 FM_WG_OPS_72 ", " FM_WG_A9
#define FM_WG_OPS_88 FM_WG_OPS_80 ", " FM_WG_A10
#define FM_WG_OPS_96 FM_WG_OPS_88 ", " FM_WG_A11
#define FM_WG_OPS_104 FM_WG_OPS_96 ", " FM_WG_A12
#define FM_WG_OPS_112 FM_WG_OPS_104 ", " FM_WG_A13
#define FM_WG_OPS_120 FM_WG_OPS_112 ", " FM_WG_A14
#define FM_WG_OPS_128 FM_WG_OPS_120 ", " FM_WG_A15
#define FM_WG_C8(d, b) "+f"(d[b + 0]), "+f"(d[b + 1]), "+f"(d[b + 2]), "+f"(d[b + 3]), \
    "+f"(d[b + 4]), "+f"(d[b + 5]), "+f"(d[b + 6]), "+f"(d[b + 7])
#define FM_WG_C4(d, b) "+f"(d[b + 0]), "+f"(d[b + 1]), "+f"(d[b + 2]), "+f"(d[b + 3])
#define FM_WG_CONS_4(d) FM_WG_C4(d, 0)
#define FM_WG_CONS_8(d) FM_WG_C8(d, 0)
#define FM_WG_CONS_12(d) FM_WG_CONS_8(d), FM_WG_C4(d, 8)
#define FM_WG_CONS_20(d) FM_WG_CONS_16(d), FM_WG_C4(d, 16)
#define FM_WG_CONS_16(d) FM_WG_CONS_8(d), FM_WG_C8(d, 8)
#define FM_WG_CONS_24(d) FM_WG_CONS_16(d), FM_WG_C8(d, 16)
#define FM_WG_CONS_32(d) FM_WG_CONS_24(d), FM_WG_C8(d, 24)
#define FM_WG_CONS_40(d) FM_WG_CONS_32(d), FM_WG_C8(d, 32)
#define FM_WG_CONS_48(d) FM_WG_CONS_40(d), FM_WG_C8(d, 40)
#define FM_WG_CONS_56(d) FM_WG_CONS_48(d), FM_WG_C8(d, 48)
#define FM_WG_CONS_64(d) FM_WG_CONS_56(d), FM_WG_C8(d, 56)
#define FM_WG_CONS_72(d) FM_WG_CONS_64(d), FM_WG_C8(d, 64)
#define FM_WG_CONS_80(d) FM_WG_CONS_72(d), FM_WG_C8(d, 72)
#define FM_WG_CONS_88(d) FM_WG_CONS_80(d), FM_WG_C8(d, 80)
#define FM_WG_CONS_96(d) FM_WG_CONS_88(d), FM_WG_C8(d, 88)
#define FM_WG_CONS_104(d) FM_WG_CONS_96(d), FM_WG_C8(d, 96)
#define FM_WG_CONS_112(d) FM_WG_CONS_104(d), FM_WG_C8(d, 104)
#define FM_WG_CONS_120(d) FM_WG_CONS_112(d), FM_WG_C8(d, 112)
#define FM_WG_CONS_128(d) FM_WG_CONS_120(d), FM_WG_C8(d, 120)
/* N = 16..256 in steps of 16, and 8, 24, 40 (the swapped slabs of the MoE GEMMs: tokens as N,
 * in steps of 8); the literal numbers are the operand indices K = N/2 .. K+6 of the scalar
 * operands (ss: a, b, scale_d, tb; rs: a0..a3, b, scale_d, tb). */
FM_WGMMA_DEFINE(8, 4, "4", "5", "6", "7", "8", "9", "10")
FM_WGMMA_DEFINE(24, 12, "12", "13", "14", "15", "16", "17", "18")
FM_WGMMA_DEFINE(40, 20, "20", "21", "22", "23", "24", "25", "26")
FM_WGMMA_DEFINE(16, 8, "8", "9", "10", "11", "12", "13", "14")
FM_WGMMA_DEFINE(32, 16, "16", "17", "18", "19", "20", "21", "22")
FM_WGMMA_DEFINE(48, 24, "24", "25", "26", "27", "28", "29", "30")
FM_WGMMA_DEFINE(64, 32, "32", "33", "34", "35", "36", "37", "38")
FM_WGMMA_DEFINE(80, 40, "40", "41", "42", "43", "44", "45", "46")
FM_WGMMA_DEFINE(96, 48, "48", "49", "50", "51", "52", "53", "54")
FM_WGMMA_DEFINE(112, 56, "56", "57", "58", "59", "60", "61", "62")
FM_WGMMA_DEFINE(128, 64, "64", "65", "66", "67", "68", "69", "70")
FM_WGMMA_DEFINE(144, 72, "72", "73", "74", "75", "76", "77", "78")
FM_WGMMA_DEFINE(160, 80, "80", "81", "82", "83", "84", "85", "86")
FM_WGMMA_DEFINE(176, 88, "88", "89", "90", "91", "92", "93", "94")
FM_WGMMA_DEFINE(192, 96, "96", "97", "98", "99", "100", "101", "102")
FM_WGMMA_DEFINE(208, 104, "104", "105", "106", "107", "108", "109", "110")
FM_WGMMA_DEFINE(224, 112, "112", "113", "114", "115", "116", "117", "118")
FM_WGMMA_DEFINE(240, 120, "120", "121", "122", "123", "124", "125", "126")
FM_WGMMA_DEFINE(256, 128, "128", "129", "130", "131", "132", "133", "134")

#undef FM_WGMMA_DEFINE
