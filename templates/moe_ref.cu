/*
 * moe_ref.cu - the reference MoE forward used by the tuner to check every variant on the real
 * problem, plus its input generator and output comparison. Plain fp32 arithmetic, no tensor
 * cores, no tiling, no sorting: each kernel is the formula written out.
 *
 *   fm_moe_ref_route   one thread per token: the routing of moe_route.cu's header comment, by
 *                      serial loops (selection on the same fp32 values, ties to the lower index).
 *   fm_moe_ref_ffn1    one CTA per slot s = t*K + k, one warp per intermediate column j:
 *                      inter[s, j] = silu(x_t . Wg[e][j]) * (x_t . Wu[e][j]), kept in fp32.
 *   fm_moe_ref_ffn2    one CTA per token, one warp per output column n:
 *                      out[t, n] = sum_k w[t,k] * (inter[t*K+k] . W2[e][n]), fp32.
 *   fm_moe_fill        fills a buffer with uniform random values (hash of seed and index).
 *   fm_moe_compare     accumulates ||out - ref||^2, ||ref||^2, max |out - ref|, the number of
 *                      outputs still holding the poison pattern and of non-finite outputs.
 *
 * The fast path rounds the intermediate to 16 bits (and, combine = slot, each weighted expert
 * output too); the reference does not, so the two differ by about the 16-bit rounding
 * (relative ~2e-3 for bf16, ~3e-4 for fp16).
 *
 * Launch contract (all 256 threads, no dynamic shared memory): ref_route grid ceil(T/256);
 * ref_ffn1 grid T*K; ref_ffn2 grid T; fill and compare any grid (grid-stride loops).
 */
#include "common/moe_params.h"
#include "common/numeric.cuh"

namespace fm_moe_ref_k {
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

static __device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

static __device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

/* dot of a 16-bit row and an fp32 or 16-bit row, lanes striding over the length */
static __device__ __forceinline__ float dot16(const fm_elem_t *a, const fm_elem_t *b, int n,
                                              int lane) {
    float s = 0.f;
    for (int i = lane; i < n; i += 32) s += fm_elem_to_f32(a[i]) * fm_elem_to_f32(b[i]);
    return warp_sum(s);
}
static __device__ __forceinline__ float dot16f(const fm_elem_t *a, const float *b, int n,
                                               int lane) {
    float s = 0.f;
    for (int i = lane; i < n; i += 32) s += fm_elem_to_f32(a[i]) * b[i];
    return warp_sum(s);
}

static __device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
} // namespace fm_moe_ref_k

extern "C" __global__ void __launch_bounds__(256) fm_moe_ref_route(const fm_moe_ref_params p) {
    using namespace fm_moe_ref_k;
    const int t = blockIdx.x * kThreads + threadIdx.x;
    if (t >= p.tokens) return;
    const int E = p.experts, K = p.topk;
    const float *row = p.logits + (long long)t * E;
    const bool sig = p.routing == FM_MOE_ROUTE_SIGMOID;
    /* choice scores and availability of every expert */
    float score[FM_MOE_MAX_EXPERTS];
    bool taken[FM_MOE_MAX_EXPERTS];
    for (int e = 0; e < E; ++e) {
        const float x = row[e];
        score[e] = sig ? sigmoid(x) + (p.bias ? p.bias[e] : 0.f) : x;
        taken[e] = false;
    }
    if (sig && p.n_group > 1) {
        const int gsize = E / p.n_group;
        float gscore[FM_MOE_MAX_GROUPS];
        bool gkeep[FM_MOE_MAX_GROUPS];
        for (int g = 0; g < p.n_group; ++g) {
            float b1 = fm_neg_inf(), b2 = fm_neg_inf();
            for (int j = 0; j < gsize; ++j) {
                const float v = score[g * gsize + j];
                if (v > b1) {
                    b2 = b1;
                    b1 = v;
                } else if (v > b2) {
                    b2 = v;
                }
            }
            gscore[g] = gsize >= 2 ? b1 + b2 : b1;
            gkeep[g] = false;
        }
        for (int n = 0; n < p.topk_group; ++n) {
            int best = -1;
            for (int g = 0; g < p.n_group; ++g)
                if (!gkeep[g] && (best < 0 || gscore[g] > gscore[best])) best = g;
            gkeep[best] = true;
        }
        for (int e = 0; e < E; ++e)
            if (!gkeep[e / gsize]) taken[e] = true; /* excluded */
    }
    int ids[FM_MOE_MAX_TOPK];
    for (int k = 0; k < K; ++k) {
        int best = -1;
        for (int e = 0; e < E; ++e)
            if (!taken[e] && (best < 0 || score[e] > score[best])) best = e;
        ids[k] = best;
        taken[best] = true;
    }
    float w[FM_MOE_MAX_TOPK];
    if (sig) {
        float sum = 0.f;
        for (int k = 0; k < K; ++k) {
            w[k] = sigmoid(row[ids[k]]);
            sum += w[k];
        }
        for (int k = 0; k < K; ++k) w[k] = w[k] / (sum + 1e-20f) * p.scale;
    } else {
        float mx = fm_neg_inf();
        for (int e = 0; e < E; ++e) mx = fmaxf(mx, row[e]);
        float den = 0.f;
        if (p.renormalize)
            for (int k = 0; k < K; ++k) den += expf(row[ids[k]] - mx);
        else
            for (int e = 0; e < E; ++e) den += expf(row[e] - mx);
        for (int k = 0; k < K; ++k) w[k] = expf(row[ids[k]] - mx) / den;
    }
    for (int k = 0; k < K; ++k) {
        p.ids[(long long)t * K + k] = ids[k];
        p.weights[(long long)t * K + k] = w[k];
    }
}

extern "C" __global__ void __launch_bounds__(256) fm_moe_ref_ffn1(const fm_moe_ref_params p) {
    using namespace fm_moe_ref_k;
    const long long s = blockIdx.x; /* slot */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int H = p.hidden_size, I = p.inter_size;
    const long long t = s / p.topk;
    const int e = p.ids[s];
    const fm_elem_t *x = (const fm_elem_t *)p.hidden + t * H;
    const fm_elem_t *w13 = (const fm_elem_t *)p.w13 + (long long)e * 2 * I * H;
    for (int j = warp; j < I; j += kWarps) {
        const float gate = dot16(x, w13 + (long long)j * H, H, lane);
        const float up = dot16(x, w13 + (long long)(I + j) * H, H, lane);
        if (lane == 0) p.inter[s * I + j] = gate / (1.0f + expf(-gate)) * up;
    }
}

extern "C" __global__ void __launch_bounds__(256) fm_moe_ref_ffn2(const fm_moe_ref_params p) {
    using namespace fm_moe_ref_k;
    const long long t = blockIdx.x;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int H = p.hidden_size, I = p.inter_size, K = p.topk;
    for (int n = warp; n < H; n += kWarps) {
        float y = 0.f;
        for (int k = 0; k < K; ++k) {
            const long long s = t * K + k;
            const int e = p.ids[s];
            const fm_elem_t *w2 = (const fm_elem_t *)p.w2 + ((long long)e * H + n) * I;
            y += p.weights[s] * dot16f(w2, p.inter + s * I, I, lane);
        }
        if (lane == 0) p.out[t * H + n] = y;
    }
}

extern "C" __global__ void __launch_bounds__(256) fm_moe_fill(const fm_moe_fill_params p) {
    using namespace fm_moe_ref_k;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < p.count; i += stride) {
        const unsigned long long h = mix64(p.seed * 0x100000001b3ull + (unsigned long long)i);
        const float u = (float)(h >> 40) * (1.0f / 16777216.0f); /* [0, 1) */
        float v = p.lo + (p.hi - p.lo) * u;
        if (p.quantum > 0.f) v = rintf(v / p.quantum) * p.quantum;
        if (p.is_f32)
            ((float *)p.dst)[i] = v;
        else
            ((fm_elem_t *)p.dst)[i] = fm_f32_to_elem(v);
    }
}

extern "C" __global__ void __launch_bounds__(256) fm_moe_compare(const fm_moe_compare_params p) {
    using namespace fm_moe_ref_k;
    __shared__ double s_d2[kWarps], s_r2[kWarps], s_max[kWarps];
    __shared__ unsigned long long s_poison[kWarps], s_bad[kWarps];
    double d2 = 0, r2 = 0, mx = 0;
    unsigned long long poison = 0, bad = 0;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < p.count; i += stride) {
        const fm_elem_t o = ((const fm_elem_t *)p.out)[i];
        const float r = p.ref[i];
        if (o == (fm_elem_t)p.poison) {
            ++poison;
            continue;
        }
        const float v = fm_elem_to_f32(o);
        if (!isfinite(v)) {
            if (isfinite(r)) ++bad;
            continue;
        }
        const double d = (double)v - (double)r;
        d2 += d * d;
        r2 += (double)r * (double)r;
        mx = fmax(mx, fabs(d));
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        d2 += __shfl_xor_sync(0xffffffffu, d2, off);
        r2 += __shfl_xor_sync(0xffffffffu, r2, off);
        mx = fmax(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        poison += __shfl_xor_sync(0xffffffffu, poison, off);
        bad += __shfl_xor_sync(0xffffffffu, bad, off);
    }
    if (lane == 0) {
        s_d2[warp] = d2;
        s_r2[warp] = r2;
        s_max[warp] = mx;
        s_poison[warp] = poison;
        s_bad[warp] = bad;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < kWarps; ++w) {
            d2 += s_d2[w];
            r2 += s_r2[w];
            mx = fmax(mx, s_max[w]);
            poison += s_poison[w];
            bad += s_bad[w];
        }
        atomicAdd(&p.sums[0], d2);
        atomicAdd(&p.sums[1], r2);
        /* max of non-negative doubles = max of their bit patterns as unsigned integers */
        atomicMax((unsigned long long *)&p.sums[2], (unsigned long long)__double_as_longlong(mx));
        atomicAdd(&p.counts[0], poison);
        atomicAdd(&p.counts[1], bad);
    }
}
