/*
 * ptx_sm80.cuh - inline-PTX wrappers for the sm_80 data path (also valid on sm_90):
 * warp-level tensor-core mma, ldmatrix, cp.async and 16-byte shared/global vector moves.
 *
 * Shared-memory operands are 32-bit shared-window addresses (fm_smem_u32), which is what the
 * instructions take and what lets address arithmetic stay in 32-bit registers.
 *
 * Asm that touches memory is volatile so the compiler keeps it in program order with respect to
 * barriers and other volatile asm; the wait on cp.async also clobbers "memory" so that ordinary
 * C++ loads of the landed data cannot be hoisted above it. mma is a pure register function and is
 * left non-volatile so the scheduler may interleave it freely.
 */
#pragma once

/* Generic pointer to a shared-memory window address. */
static __device__ __forceinline__ unsigned fm_smem_u32(const void *p) {
    unsigned r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}

/* ---- tensor-core mma: D(16x8 f32) += A(16x16, row) * B(16x8, col) ----------------------------
 * Lane l, g = l/4, t = l%4. A: a0 = (row g, k 2t..2t+1), a1 = (g+8, 2t), a2 = (g, 2t+8),
 * a3 = (g+8, 2t+8). B: b0 = (k 2t..2t+1, col g), b1 = (k 2t+8.., col g).
 * C/D: c0,c1 = (row g, col 2t, 2t+1), c2,c3 = (row g+8, col 2t, 2t+1). */
static __device__ __forceinline__ void fm_mma_bf16_16816(float (&d)[4], const unsigned (&a)[4],
                                                         unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

static __device__ __forceinline__ void fm_mma_f16_16816(float (&d)[4], const unsigned (&a)[4],
                                                        unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* The kernel's element type (FM_DTYPE_BF16 from numeric.cuh; defaults to bf16). */
static __device__ __forceinline__ void fm_mma_16816(float (&d)[4], const unsigned (&a)[4],
                                                    unsigned b0, unsigned b1) {
#if defined(FM_DTYPE_BF16) && FM_DTYPE_BF16 == 0
    fm_mma_f16_16816(d, a, b0, b1);
#else
    fm_mma_bf16_16816(d, a, b0, b1);
#endif
}

/* ---- ldmatrix: four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i
 * (16-byte aligned). Register i receives matrix i: lane l holds row l/4, columns 2(l%4), +1.
 * The .trans form delivers the transpose (lane l holds column l/4, rows 2(l%4), +1), which turns
 * a row-major [k][n] tile into the B operand of mma without a shared-memory transpose. */
static __device__ __forceinline__ void fm_ldmatrix_x4(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

static __device__ __forceinline__ void fm_ldmatrix_x4_trans(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

static __device__ __forceinline__ void fm_ldmatrix_x2(unsigned (&r)[2], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(addr));
}

static __device__ __forceinline__ void fm_ldmatrix_x2_trans(unsigned (&r)[2], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(addr));
}

/* ---- cp.async (global -> shared, bypassing registers) ---------------------------------------
 * 16 bytes, cached in L2 only (.cg: the tile is used once per CTA, L1 would only be polluted).
 * src_bytes < 16 zero-fills the rest of the destination; src_bytes == 0 reads nothing, which is
 * how tiles past the end of a sequence become zeros (the source address must still be a valid
 * pointer value, callers clamp it to a row that exists). */
static __device__ __forceinline__ void fm_cp_async_16(unsigned smem_addr, const void *gmem,
                                                      int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :
                 : "r"(smem_addr), "l"(gmem), "r"(src_bytes));
}

/* Closes the group of cp.async issued by this thread since the last commit. */
static __device__ __forceinline__ void fm_cp_async_commit(void) {
    asm volatile("cp.async.commit_group;" ::: "memory");
}

/* Waits until at most N of this thread's committed groups are still in flight. Only this
 * thread's copies are covered: other threads' data needs a barrier afterwards. */
template <int N>
static __device__ __forceinline__ void fm_cp_async_wait(void) {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

/* ---- 16-byte vector moves ------------------------------------------------------------------- */
static __device__ __forceinline__ void fm_lds128(unsigned (&r)[4], unsigned smem_addr) {
    asm volatile("ld.shared.v4.b32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr));
}

static __device__ __forceinline__ void fm_sts32(unsigned smem_addr, unsigned v) {
    asm volatile("st.shared.b32 [%0], %1;" ::"r"(smem_addr), "r"(v));
}

static __device__ __forceinline__ void fm_stg128(void *gmem, const unsigned (&r)[4]) {
    asm volatile("st.global.v4.b32 [%0], {%1,%2,%3,%4};" ::"l"(gmem), "r"(r[0]), "r"(r[1]),
                 "r"(r[2]), "r"(r[3])
                 : "memory");
}
