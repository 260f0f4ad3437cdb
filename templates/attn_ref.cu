/*
 * attn_ref.cu - reference attention forward: plain fp32 arithmetic, expf/logf, two passes over
 * the keys (row maximum, then exponentials and P V), no tensor cores and no online rescaling.
 * The tuner runs it once per shape to check every variant on the real problem; tests check it
 * against a float64 CPU reference.
 *
 * Masking is the same as the fast kernels': query i sees key j iff j < seqlen_k and, when
 * FM_CAUSAL, j <= i + causal_offset. A row that sees no key gets O = 0 and lse = -inf.
 *
 * Outputs: o_ref fp32 [B, Sq, H, D] contiguous; lse_ref fp32 [B, H, Sq] (natural log of the
 * sum of exp(scale * q.k)), skipped when null. p.o and p.lse are not touched.
 *
 * Launch contract: block = 256 threads, no dynamic shared memory (about 35 KiB static at
 * d=256), grid = (ceil(seqlen_q / 32), heads, batch). grid.x may be smaller: CTAs stride over
 * the 32-row blocks. Each CTA works on 32 query rows of one (batch, head) so that a K/V chunk
 * read from memory serves 32 rows (a CTA per row would re-read K and V Sq times).
 */
#include "common/attn_params.h"
#include "common/numeric.cuh"

#ifndef FM_HEAD_DIM
#define FM_HEAD_DIM 128
#endif
#ifndef FM_CAUSAL
#define FM_CAUSAL 0
#endif
#if FM_HEAD_DIM != 64 && FM_HEAD_DIM != 128 && FM_HEAD_DIM != 256
#error "FM_HEAD_DIM must be 64, 128 or 256"
#endif
#if FM_CAUSAL != 0 && FM_CAUSAL != 1
#error "FM_CAUSAL must be 0 or 1"
#endif

namespace fm_attn_ref_k {
constexpr int kD = FM_HEAD_DIM;
constexpr int kThreads = 256;
constexpr int kRows = 32;                  /* query rows per CTA */
constexpr int kKeys = 16;                  /* keys per shared-memory chunk */
constexpr int kRowGroups = kThreads / kKeys; /* score pass: thread = (row group, key) */
constexpr int kRowsPerThread = kRows / kRowGroups;
constexpr int kPad = kD + 2; /* K/V row stride: 16 lanes reading 16 keys hit 16 banks */
constexpr int kColGroups = kThreads / kD;  /* P V pass: thread = (row group, column) */
constexpr int kAccRows = kRows / kColGroups;
static_assert(kThreads % kD == 0 && kRows % kColGroups == 0, "P V thread mapping");
} // namespace fm_attn_ref_k

extern "C" __global__ void __launch_bounds__(256, 1)
fm_attn_ref(const fm_attn_kernel_params p, float *o_ref, float *lse_ref) {
    using namespace fm_attn_ref_k;
    __shared__ fm_elem_t q_s[kRows][kD];
    __shared__ fm_elem_t k_s[kKeys][kPad];
    __shared__ fm_elem_t v_s[kKeys][kPad];
    __shared__ float p_s[kRows][kKeys + 1];
    __shared__ float max_s[kRows], sum_s[kRows];

    const int tid = threadIdx.x;
    const int head = blockIdx.y, batch = blockIdx.z;
    const int kv_head = head / p.head_group;
    const int sq = p.seqlen_q, sk = p.seqlen_k;
    const float scale = p.softmax_scale;
    const fm_elem_t *qb = (const fm_elem_t *)p.q + batch * p.q_stride_b + head * p.q_stride_h;
    const fm_elem_t *kb = (const fm_elem_t *)p.k + batch * p.k_stride_b + kv_head * p.k_stride_h;
    const fm_elem_t *vb = (const fm_elem_t *)p.v + batch * p.v_stride_b + kv_head * p.v_stride_h;

    /* score pass mapping: key column kc, rows rg + kRowGroups * i */
    const int kc = tid % kKeys, rg = tid / kKeys;
    /* P V pass mapping: column d, rows cg + kColGroups * i */
    const int dcol = tid % kD, cg = tid / kD;

    const int row_blocks = (sq + kRows - 1) / kRows;
    for (int rb = blockIdx.x; rb < row_blocks; rb += gridDim.x) {
        const int r0 = rb * kRows;
        __syncthreads(); /* the previous row block's readers of q_s / max_s / sum_s are done */
        for (int e = tid; e < kRows * kD; e += kThreads) {
            const int r = e / kD, d = e % kD;
            q_s[r][d] = r0 + r < sq ? qb[(long long)(r0 + r) * p.q_stride_s + d] : (fm_elem_t)0;
        }

        /* Number of keys row r sees (0: none). */
        auto visible = [&](int r) -> int {
            int n = sk;
            if (FM_CAUSAL) n = min(n, r0 + r + p.causal_offset + 1);
            return n < 0 ? 0 : n;
        };
        /* scale * q_r . k_j for the chunk in k_s, -inf when masked */
        auto score = [&](int r, int j0) -> float {
            const int j = j0 + kc;
            if (j >= visible(r)) return fm_neg_inf();
            float dot = 0.f;
            for (int d = 0; d < kD; ++d)
                dot += fm_elem_to_f32(q_s[r][d]) * fm_elem_to_f32(k_s[kc][d]);
            return dot * scale;
        };
        auto load_chunk = [&](fm_elem_t(*dst)[kPad], const fm_elem_t *src, long long stride,
                              int j0) {
            for (int e = tid; e < kKeys * kD; e += kThreads) {
                const int j = e / kD, d = e % kD;
                dst[j][d] = j0 + j < sk ? src[(long long)(j0 + j) * stride + d] : (fm_elem_t)0;
            }
        };
        int keys_needed = 0; /* keys the last valid row of the block sees */
        for (int r = 0; r < kRows && r0 + r < sq; ++r) keys_needed = max(keys_needed, visible(r));

        /* ---- pass 1: row maxima ---- */
        float mx[kRowsPerThread];
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) mx[i] = fm_neg_inf();
        for (int j0 = 0; j0 < keys_needed; j0 += kKeys) {
            __syncthreads(); /* readers of the previous chunk are done */
            load_chunk(k_s, kb, p.k_stride_s, j0);
            __syncthreads();
#pragma unroll
            for (int i = 0; i < kRowsPerThread; ++i)
                mx[i] = fmaxf(mx[i], score(rg + kRowGroups * i, j0));
        }
        /* the kKeys lanes sharing a row group are consecutive lanes of one warp */
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) {
            for (int off = kKeys / 2; off > 0; off >>= 1)
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], off));
            if (kc == 0) max_s[rg + kRowGroups * i] = mx[i];
        }

        /* ---- pass 2: p = exp(s - max), row sums, O = sum p v ---- */
        float sum[kRowsPerThread];
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) sum[i] = 0.f;
        float acc[kAccRows];
#pragma unroll
        for (int i = 0; i < kAccRows; ++i) acc[i] = 0.f;
        for (int j0 = 0; j0 < keys_needed; j0 += kKeys) {
            __syncthreads();
            load_chunk(k_s, kb, p.k_stride_s, j0);
            load_chunk(v_s, vb, p.v_stride_s, j0);
            __syncthreads(); /* also publishes max_s on the first chunk */
#pragma unroll
            for (int i = 0; i < kRowsPerThread; ++i) {
                const int r = rg + kRowGroups * i;
                const float s = score(r, j0);
                const float pr = s == fm_neg_inf() ? 0.f : expf(s - max_s[r]);
                sum[i] += pr;
                p_s[r][kc] = pr;
            }
            __syncthreads();
#pragma unroll
            for (int i = 0; i < kAccRows; ++i) {
                const int r = cg + kColGroups * i;
                float a = acc[i];
                for (int j = 0; j < kKeys; ++j) a += p_s[r][j] * fm_elem_to_f32(v_s[j][dcol]);
                acc[i] = a;
            }
        }
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) {
            for (int off = kKeys / 2; off > 0; off >>= 1)
                sum[i] += __shfl_xor_sync(0xffffffffu, sum[i], off);
            if (kc == 0) sum_s[rg + kRowGroups * i] = sum[i];
        }
        __syncthreads();

#pragma unroll
        for (int i = 0; i < kAccRows; ++i) {
            const int r = cg + kColGroups * i;
            if (r0 + r >= sq) continue;
            const float l = sum_s[r];
            const float o = l > 0.f ? acc[i] / l : 0.f;
            o_ref[(((long long)batch * sq + r0 + r) * p.heads + head) * kD + dcol] = o;
        }
        if (lse_ref && tid < kRows && r0 + tid < sq) {
            const float l = sum_s[tid];
            lse_ref[((long long)batch * p.heads + head) * sq + r0 + tid] =
                l > 0.f ? max_s[tid] + logf(l) : fm_neg_inf();
        }
    }
}
