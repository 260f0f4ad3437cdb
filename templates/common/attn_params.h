/*
 * attn_params.h - the parameter block every attention-forward kernel takes, by value.
 *
 * Shared verbatim by host C (runtime/) and device code (templates/), so it uses only types that
 * mean the same thing on both sides: no headers, no stdint. Strides are in elements.
 */
#ifndef FM_ATTN_PARAMS_H
#define FM_ATTN_PARAMS_H

typedef struct fm_attn_kernel_params {
    const void *q;
    const void *k;
    const void *v;
    void *o;
    float *lse;                 /* [B, H, Sq] fp32, or 0 */
    /* Split tail (sm90, persistent, not causal; see attn_fwd_sm90.cu): per CTA and consumer
     * warpgroup one partial-result slot and one ready flag (zeroed by the host before the
     * launch). Unused when sk_units is 0. */
    float *sk_partial;
    unsigned *sk_flags;
    long long q_stride_b, q_stride_s, q_stride_h;
    long long k_stride_b, k_stride_s, k_stride_h;
    long long v_stride_b, v_stride_s, v_stride_h;
    long long o_stride_b, o_stride_s, o_stride_h;
    int batch, seqlen_q, seqlen_k, heads, kv_heads;
    int head_group;             /* heads / kv_heads: query head h reads kv head h / head_group */
    int causal_offset;          /* seqlen_k - seqlen_q: query i sees keys j <= i + causal_offset */
    int num_m_blocks;           /* ceil(seqlen_q / BLOCK_M) */
    int num_tiles;              /* num_m_blocks * heads * batch (persistent schedulers) */
    float softmax_scale;        /* scale applied to q.k */
    float scale_log2;           /* softmax_scale * log2(e): exp(s*x) == exp2(scale_log2*x) */
    int sk_first_tile;          /* tiles below run whole (strided); the rest are split by key block */
    int sk_units;               /* key blocks in the split region: (num_tiles - sk_first_tile) * n_k */
    int sk_blocks;              /* key blocks per tile, n_k = ceil(seqlen_k / BLOCK_N) */
} fm_attn_kernel_params;

#endif
