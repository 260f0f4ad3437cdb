/*
 * moe_route.cu - the router of the fused MoE forward: logits [T, E] -> top-k expert ids and
 * routing weights [T, K], one warp per token.
 *
 * Modes (fm_moe_route_params.routing):
 *  - softmax: p = softmax(logits); the K largest p (chosen on the logits themselves: softmax is
 *    monotonic, and comparing the inputs rather than rounded exponentials makes the choice exact
 *    and reproducible on any machine); weight = p, or p / sum of the chosen p (renormalize).
 *  - sigmoid (DeepSeek-V3): s = sigmoid(logit); choice score = s + bias (bias for selection
 *    only). With n_group > 1 the experts form n_group equal groups, a group scores the sum of
 *    its two best choice scores (its best one when groups have one expert), the topk_group best
 *    groups stay and the K best experts are taken from them (experts of dropped groups are
 *    excluded, not scored 0). weight = s / (sum of the chosen s + 1e-20) * scale.
 * Ties: the lower expert (group) index wins, everywhere. Output order: best first.
 *
 * Launch contract: block = FM_ROUTE_WARPS * 32 threads, grid = ceil(T / FM_ROUTE_WARPS), no
 * dynamic shared memory. E <= 512, K <= 16, n_group <= 32 (checked by the host).
 */
#include "common/moe_params.h"
#include "common/numeric.cuh"

#ifndef FM_ROUTE_WARPS
#define FM_ROUTE_WARPS 4
#endif
#if FM_ROUTE_WARPS < 1 || FM_ROUTE_WARPS > 32
#error "FM_ROUTE_WARPS must be in 1..32"
#endif

namespace fm_moe_route_k {
/* Lane l holds experts l, l + 32, ...: strided so that the logits load coalesces. */
constexpr int kPerLane = FM_MOE_MAX_EXPERTS / 32;
constexpr int kNone = 0x7fffffff;

/* (value, index) argmax across the warp; ties to the lower index. Every lane gets the result;
 * `aux` travels with the winner. */
static __device__ __forceinline__ void warp_argmax(float &v, int &i, float &aux) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, off);
        const int oi = __shfl_xor_sync(0xffffffffu, i, off);
        const float oa = __shfl_xor_sync(0xffffffffu, aux, off);
        if (ov > v || (ov == v && oi < i)) {
            v = ov;
            i = oi;
            aux = oa;
        }
    }
}

static __device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

static __device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

static __device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
} // namespace fm_moe_route_k

extern "C" __global__ void __launch_bounds__(FM_ROUTE_WARPS * 32)
fm_moe_route(const fm_moe_route_params p) {
    using namespace fm_moe_route_k;
    /* Choice scores of each warp's token, for the group pass (lanes read whole groups). */
    __shared__ float s_score[FM_ROUTE_WARPS][FM_MOE_MAX_EXPERTS];

    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int t = blockIdx.x * FM_ROUTE_WARPS + warp;
    if (t >= p.tokens) return; /* warps are independent: no block barrier below */

    const int E = p.experts, K = p.topk;
    const bool sig = p.routing == FM_MOE_ROUTE_SIGMOID;
    const float *row = p.logits + (long long)t * E;

    float score[kPerLane]; /* what the choice compares */
    float raw[kPerLane];   /* what the weight is made of: the logit, or the unbiased sigmoid */
    unsigned avail = 0;    /* bit i: expert lane + 32 i exists and is still choosable */
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
        const int e = lane + 32 * i;
        score[i] = fm_neg_inf();
        raw[i] = 0.f;
        if (e < E) {
            const float x = row[e];
            if (sig) {
                raw[i] = sigmoid(x);
                score[i] = raw[i] + (p.bias ? p.bias[e] : 0.f);
            } else {
                raw[i] = x;
                score[i] = x;
            }
            avail |= 1u << i;
        }
    }

    /* ---- grouped routing: keep the topk_group best groups ---- */
    if (sig && p.n_group > 1) {
        const int gsize = E / p.n_group;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i)
            if (lane + 32 * i < E) s_score[warp][lane + 32 * i] = score[i];
        __syncwarp();
        float gscore = fm_neg_inf();
        int gidx = kNone;
        if (lane < p.n_group) {
            float b1 = fm_neg_inf(), b2 = fm_neg_inf();
            for (int j = 0; j < gsize; ++j) {
                const float v = s_score[warp][lane * gsize + j];
                if (v > b1) {
                    b2 = b1;
                    b1 = v;
                } else if (v > b2) {
                    b2 = v;
                }
            }
            gscore = gsize >= 2 ? b1 + b2 : b1;
            gidx = lane;
        }
        unsigned keep = 0;
        for (int g = 0; g < p.topk_group; ++g) {
            float v = gscore, dummy = 0.f;
            int i = gidx;
            warp_argmax(v, i, dummy);
            if (i == kNone) break;
            keep |= 1u << i;
            if (lane == i) {
                gscore = fm_neg_inf();
                gidx = kNone; /* taken: out of the running */
            }
        }
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
            const int e = lane + 32 * i;
            if (e < E && !((keep >> (e / gsize)) & 1u)) avail &= ~(1u << i);
        }
    }

    /* ---- top-k by repeated warp argmax; lane k keeps choice k ---- */
    int my_id = 0;
    float my_raw = 0.f;
    for (int k = 0; k < K; ++k) {
        float bv = fm_neg_inf(), ba = 0.f;
        int bi = kNone;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
            /* Within a lane indices grow with i, so '>' keeps the lower index on ties; the
             * first available entry is taken even at -inf. */
            if (((avail >> i) & 1u) && (bi == kNone || score[i] > bv)) {
                bv = score[i];
                bi = lane + 32 * i;
                ba = raw[i];
            }
        }
        warp_argmax(bv, bi, ba);
        if (bi == kNone) bi = 0; /* unreachable: the host checks K <= choosable experts */
        if (lane == (bi & 31)) avail &= ~(1u << (bi >> 5));
        if (lane == k) {
            my_id = bi;
            my_raw = ba;
        }
    }

    /* ---- weights ---- */
    float w;
    if (sig) {
        const float sum = warp_sum(lane < K ? my_raw : 0.f);
        w = my_raw / (sum + 1e-20f) * p.scale;
    } else {
        float mx = fm_neg_inf();
#pragma unroll
        for (int i = 0; i < kPerLane; ++i)
            if (lane + 32 * i < E) mx = fmaxf(mx, raw[i]);
        mx = warp_max(mx);
        const float num = expf(my_raw - mx);
        float den;
        if (p.renormalize) {
            den = warp_sum(lane < K ? num : 0.f);
        } else {
            float part = 0.f;
#pragma unroll
            for (int i = 0; i < kPerLane; ++i)
                if (lane + 32 * i < E) part += expf(raw[i] - mx);
            den = warp_sum(part);
        }
        w = num / den;
    }
    if (lane < K) {
        p.topk_ids[(long long)t * K + lane] = my_id;
        p.topk_weights[(long long)t * K + lane] = w;
    }
}
