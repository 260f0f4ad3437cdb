/*
 * moe_device.cuh - device pieces the MoE GEMM families share (moe_gemm_sm80.cu, moe_gemm_sm90.cu):
 * the SwiGLU activation, fp32 vector atomics, the 16-byte swizzled tile loader, the A-row
 * sources of the cp.async pipelines and the combine kernel's body. Needs numeric.cuh, ptx_sm80.cuh and moe_params.h first.
 */
#pragma once

namespace fm_moe {

/* g * sigmoid(g); exp2 of a large argument gives inf and g / inf = -0, the right limit. */
static __device__ __forceinline__ float silu(float g) {
    return g / (1.0f + fm_exp2(-g * FM_LOG2E));
}

/* Operands swapped (weights on the wgmma M side, tokens on N), a thread holds for weight row g
 * (an output column) the values of tokens 2tq and 2tq + 1 (v0, v1). Lanes g and g^1 exchange one
 * value, so that each ends with two adjacent output columns of one token, 2tq + odd (odd = g & 1):
 * lo for column g - odd, hi for g - odd + 1. Every lane of the warp must call it. */
static __device__ __forceinline__ void swap_pair(float v0, float v1, int odd, float &lo,
                                                 float &hi) {
    const float r = __shfl_xor_sync(0xffffffffu, odd ? v0 : v1, 4);
    lo = odd ? r : v0;
    hi = odd ? v1 : r;
}

/* acc[0..1] += (a, b): one vector reduction on sm_90, two scalar ones before. 8-byte aligned. */
static __device__ __forceinline__ void red_add_f32x2(float *addr, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(addr), "f"(a), "f"(b) : "memory");
#else
    asm volatile("red.global.add.f32 [%0], %1;" ::"l"(addr), "f"(a) : "memory");
    asm volatile("red.global.add.f32 [%0], %1;" ::"l"(addr + 1), "f"(b) : "memory");
#endif
}

/* Tile row layout shared by both families: a row of BK 16-bit values is BK/8 chunks of 16 bytes;
 * chunk c of row r is stored at chunk c ^ f(r). With 128-byte rows (BK = 64) f(r) = r & 7, which
 * is also the wgmma 128-byte swizzle (8-row atoms of 1024 bytes); with 64-byte rows (BK = 32)
 * f(r) = (r >> 1) & 3. Either way the 8 rows one ldmatrix reads hit 8 different bank groups. */
template <int BK>
static __device__ __forceinline__ unsigned swz(int row, int chunk) {
    constexpr int kCPR = BK / 8;
    constexpr int kShift = kCPR == 8 ? 0 : 1;
    return (unsigned)(row * BK * 2 + ((chunk ^ ((row >> kShift) & (kCPR - 1))) << 4));
}

/* Combine: one thread per 8 consecutive outputs (16-byte loads and stores; H % 64 == 0 keeps a
 * vector inside one row). out[t] = sum_k slot_buf[t*K + k] (16-bit) or acc[t] (fp32). */
static __device__ __forceinline__ void combine(const fm_moe_combine_params &p) {
    const long long v = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long nvec = (long long)p.tokens * p.hidden / 8;
    if (v >= nvec) return;
    const long long t = v * 8 / p.hidden;
    const long long col = v * 8 - t * p.hidden;
    float s[8];
    if (p.atomic) {
        const float4 *src = (const float4 *)((const float *)p.src + t * p.hidden + col);
        const float4 x0 = src[0], x1 = src[1];
        s[0] = x0.x;
        s[1] = x0.y;
        s[2] = x0.z;
        s[3] = x0.w;
        s[4] = x1.x;
        s[5] = x1.y;
        s[6] = x1.z;
        s[7] = x1.w;
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) s[i] = 0.f;
        const fm_elem_t *base = (const fm_elem_t *)p.src + t * p.topk * p.hidden + col;
        for (int k = 0; k < p.topk; ++k) {
            const uint4 x = *(const uint4 *)(base + (long long)k * p.hidden);
            const unsigned w[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                s[2 * i] += fm_elem_to_f32((fm_elem_t)(w[i] & 0xffffu));
                s[2 * i + 1] += fm_elem_to_f32((fm_elem_t)(w[i] >> 16));
            }
        }
    }
    uint4 o;
    o.x = fm_pack_elem2(s[0], s[1]);
    o.y = fm_pack_elem2(s[2], s[3]);
    o.z = fm_pack_elem2(s[4], s[5]);
    o.w = fm_pack_elem2(s[6], s[7]);
    *(uint4 *)((fm_elem_t *)p.out + t * p.hidden + col) = o;
}

/* Sources of the A rows a thread copies in the cp.async pipelines of both families: thread tid
 * copies 16-byte chunk column tid % CPR of tile rows tid / CPR + j * STEP, j < ITERS (CPR chunks
 * per row, STEP rows per sweep of the CTA; rows at or past BM, where ITERS overhangs, copy
 * nothing). gemm1 rows are the token rows of the hidden states (padding rows copy nothing: the
 * loader zero-fills them), gemm2 rows the intermediate's. Returns the mask of rows to copy; the
 * sources stay fixed for the whole K loop. */
template <bool GATED, int BM, int CPR, int STEP, int ITERS>
static __device__ __forceinline__ unsigned a_sources(const fm_moe_gemm_params &p, int m0, int tid,
                                                     const fm_elem_t *(&src)[ITERS]) {
    const fm_elem_t *A = (const fm_elem_t *)p.a;
    const int ccol = tid % CPR, rbase = tid / CPR;
    unsigned ok = 0;
#pragma unroll
    for (int j = 0; j < ITERS; ++j) {
        const int r = rbase + j * STEP;
        src[j] = A + ccol * 8;
        if (r >= BM) continue;
        if (GATED) {
            const int slot = p.sorted_slot[m0 + r];
            if (slot < 0) continue;
            src[j] = A + (long long)(slot / p.topk) * p.k + ccol * 8;
        } else {
            src[j] = A + (long long)(m0 + r) * p.k + ccol * 8;
        }
        ok |= 1u << j;
    }
    return ok;
}

/* The tile raster of both GEMMs: grid.x = m_tiles * n_tiles; groups of group_m M-tiles walk the
 * N tiles together (CTAs running at the same time then share A tiles and weight tiles in L2).
 * A bijection onto [0, m_tiles) x [0, n_tiles), the last group possibly shorter. */
static __device__ __forceinline__ void raster(const fm_moe_gemm_params &p, int pid, int &m_tile,
                                              int &n_tile) {
    if (p.group_m <= 1) {
        m_tile = pid / p.n_tiles;
        n_tile = pid % p.n_tiles;
    } else {
        const int per_group = p.group_m * p.n_tiles;
        const int first = (pid / per_group) * p.group_m;
        const int rows = min(p.m_tiles - first, p.group_m);
        const int local = pid % per_group;
        m_tile = first + local % rows;
        n_tile = local / rows;
    }
}

/* The tile order of the warp-specialised pipelines (persistent or one CTA per tile): tile t of
 * m_tiles * n_tiles, in groups of group_m M-tiles walking the N tiles together, M fastest inside
 * a group. Unlike raster() above, m_tiles is the real count read on the device. */
static __device__ __forceinline__ void raster_tiles(int t, int m_tiles, int n_tiles, int group_m,
                                                    int &m_tile, int &n_tile) {
    const int gm = group_m < 1 ? 1 : group_m;
    const int per_group = gm * n_tiles;
    const int first = (t / per_group) * gm;
    const int rows = min(m_tiles - first, gm);
    const int local = t - (t / per_group) * per_group;
    m_tile = first + local % rows;
    n_tile = local / rows;
}

/* Tile t of the warp-specialised GEMMs: with group_m >= 1 raster_tiles; with group_m = 0 one
 * group per expert, whose M tiles walk its N tiles together (t in [first * n_tiles,
 * (first + rows) * n_tiles) for the expert whose M tiles are first..first + rows - 1, so the
 * expert is that of M tile t / n_tiles). A fixed group of group_m M tiles cuts through experts:
 * an expert on a group edge has its weights read by each group, a whole group's run apart, and
 * one expert's weights (DeepSeek-V3: 59 MB in gemm1, 29 MB in gemm2) do not stay in a 50 MB L2
 * that long (ncu, H100, T = 16384: gemm1 read about twice its weight bytes from DRAM). */
static __device__ __forceinline__ void tile_coords(int t, int m_tiles, int bm,
                                                   const fm_moe_gemm_params &p, int &m_tile,
                                                   int &n_tile) {
    if (p.group_m != 0) {
        raster_tiles(t, m_tiles, p.n_tiles, p.group_m, m_tile, n_tile);
        return;
    }
    const int e = p.tile_expert[t / p.n_tiles];
    const int first = p.expert_offsets[e] / bm;
    const int rows = p.expert_offsets[e + 1] / bm - first;
    const int local = t - first * p.n_tiles;
    m_tile = first + local % rows;
    n_tile = local / rows;
}

/* The role split of the warp-specialised pipelines: warpgroup 0 gives registers away and runs
 * producer(), the others take them and run consumer(). The warpgroup index is broadcast from
 * lane 0 so that the compiler sees it warp-uniform: ptxas then compiles each role under its own
 * setmaxnreg budget (a consumer's m64n256 wgmma needs more than the 128 registers per thread a
 * 512-thread CTA starts with). Needs ptx_sm90.cuh. */
template <int PRODUCER_REGS, int CONSUMER_REGS, class Producer, class Consumer>
static __device__ __forceinline__ void split_roles(Producer producer, Consumer consumer) {
    const int wg = __shfl_sync(0xffffffffu, (int)(threadIdx.x / 128), 0);
    if (wg == 0) {
        fm_setmaxnreg_dec<PRODUCER_REGS>();
        producer();
    } else {
        fm_setmaxnreg_inc<CONSUMER_REGS>();
        consumer();
    }
}

} // namespace fm_moe
