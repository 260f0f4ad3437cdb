/*
 * moe_params.h - the parameter blocks of the fused mixture-of-experts kernels, taken by value.
 *
 * Shared verbatim by host C (runtime/moe.c, tuner/op_moe.c) and device code (templates/moe_*.cu),
 * so it uses only types that mean the same thing on both sides: no headers, no stdint
 * (int is 32 bits, long long 64, pointers 64 on every platform CUDA supports).
 *
 * Vocabulary: a "slot" is one (token, choice) pair, numbered token * topk + k; T * topk slots in
 * all. The alignment kernel sorts slots by expert into "padded rows": expert e owns rows
 * [expert_offsets[e], expert_offsets[e+1]), a multiple of the GEMM tile BLOCK_M, the first
 * counts[e] of them holding its slots and the rest padding (slot id -1). Tile i of BLOCK_M
 * rows belongs to expert tile_expert[i]; *num_tiles tiles are real. With merge_max > 0
 * (ws_tail = merge) the list leaves out each expert's last tile when it holds at most merge_max
 * rows (the tile before it runs them), so tile i starts at row tile_row0[i], not i * BLOCK_M.
 */
#ifndef FM_MOE_PARAMS_H
#define FM_MOE_PARAMS_H

/* Limits the kernels are written for (checked again by the host). */
#define FM_MOE_MAX_EXPERTS 512
#define FM_MOE_MAX_TOPK 16
#define FM_MOE_MAX_GROUPS 32   /* grouped routing: one warp lane per group */
#define FM_MOE_MIN_BLOCK_M 16  /* the workspace is sized for every block_m in [MIN, MAX] */
#define FM_MOE_MAX_BLOCK_M 256

#define FM_MOE_ROUTE_SOFTMAX 0 /* = FM_MOE_ROUTING_SOFTMAX_TOPK */
#define FM_MOE_ROUTE_SIGMOID 1 /* = FM_MOE_ROUTING_SIGMOID_GROUPED */

/* Router: one warp per token. */
typedef struct fm_moe_route_params {
    const float *logits;    /* [T, E] */
    const float *bias;      /* [E] correction bias (sigmoid routing), or 0 */
    int *topk_ids;          /* [T, K] out, best first */
    float *topk_weights;    /* [T, K] out */
    int tokens, experts, topk;
    int routing;            /* FM_MOE_ROUTE_* */
    int renormalize;        /* softmax: divide the chosen probabilities by their sum */
    int n_group;            /* sigmoid: expert groups (1: no grouping); divides experts */
    int topk_group;         /* sigmoid: groups kept */
    float scale;            /* sigmoid: routed_scaling_factor */
} fm_moe_route_params;

/* Alignment: one CTA sorts every slot by expert. */
typedef struct fm_moe_align_params {
    const int *topk_ids;    /* [T * K] */
    int *sorted_slot;       /* [max_rows] out: slot id per padded row, -1 for padding */
    int *tile_expert;       /* [max_tiles] out */
    int *num_tiles;         /* [1] out: real tiles (of block_m rows) */
    int *expert_counts;     /* [E] out */
    int *expert_offsets;    /* [E + 1] out: first padded row of each expert, then the total */
    const float *slot_weight; /* [T * K] routing weights, read when sorted_weight is set */
    float *sorted_weight;   /* [max_rows] out or 0: routing weight per padded row, 0 for padding */
    int *cursor;            /* [E] scratch: next free row of each expert (fm_moe_align_place) */
    int *ticket;            /* [1] scratch: CTAs of fm_moe_align done; zero before the launch,
                             * as expert_counts (both accumulate) */
    int *tile_row0;         /* [max_tiles] out or 0: first padded row of each tile */
    int *expert_tiles;      /* [E + 1] out or 0: index of each expert's first tile, then the count */
    int slots;              /* T * K */
    int experts;
    int block_m;
    int max_tiles;          /* capacity of tile_expert (a bound the host computed) */
    int merge_max;          /* > 0 (ws_tail = merge): an expert's last tile of at most this many
                             * rows is not listed; the tile before it runs those rows */
    int pad_;
} fm_moe_align_params;

/* Routing slots per CTA of the two alignment kernels: threads x this many. */
#define FM_MOE_ALIGN_PER_THREAD 8

/* Grouped GEMM (both halves of the expert MLP). Row r of M-tile i is padded row
 * i * BLOCK_M + r. gemm1: A row = hidden[sorted_slot[row] / topk] (gathered; padding rows are
 * zeros), B = w13[e], out = intermediate[row] = silu(A Wg^T) * (A Wu^T) in 16 bits.
 * gemm2: A row = intermediate[row], B = w2[e], out scattered by slot and scaled by its routing
 * weight: 16-bit rows of the slot buffer [T*K, H] (combine = slot) or fp32 atomics into
 * acc [T, H] (combine = atomic). */
typedef struct fm_moe_gemm_params {
    const void *a;             /* gemm1: hidden [T, H]; gemm2: intermediate [rows, I] */
    const void *b;             /* gemm1: w13 [E, 2I, H]; gemm2: w2 [E, H, I] */
    void *c;                   /* see above */
    const int *sorted_slot;    /* [rows] */
    const int *tile_expert;    /* [tiles] */
    const int *num_tiles;      /* [1] real tiles; CTAs of tiles past it exit at once */
    const float *slot_weight;  /* [T * K] routing weights (gemm2) */
    long long b_expert_stride; /* elements from one expert's B to the next */
    int n;                     /* output columns: gemm1 I, gemm2 H */
    int k;                     /* reduction length, also A's row length: gemm1 H, gemm2 I */
    int topk;
    int m_tiles;               /* upper bound of real tiles (grid size) */
    int n_tiles;               /* output column tiles */
    int split_k;               /* gemm2: CTAs along the reduction (grid.y) */
    int k_tiles_per_split;     /* BLOCK_K tiles each split reduces */
    int group_m;               /* tile raster: group_m M-tiles walk the N tiles together */
    int atomic;                /* gemm2: 1 = fp32 red.add into c [T, H], 0 = 16-bit slot rows */
    int pad_;
    const int *expert_counts;  /* [E] slots per expert (pipe = swap: real rows of a tile) */
    const int *expert_offsets; /* [E + 1] first padded row of each expert */
    const float *sorted_weight; /* [rows] routing weight per padded row (pipe = swap, gemm2) */
    int *tile_counter;          /* ws_grid = dynamic: next tile to take, zeroed before launch */
    const int *tile_row0;       /* ws_tail = merge: [tiles] first padded row of each listed tile */
    const int *expert_tiles;    /* ws_tail = merge: [E + 1] each expert's first listed tile */
} fm_moe_gemm_params;

/* Combine: out[t] = sum_k slot_buf[t*K + k] (combine = slot) or out[t] = acc[t] (atomic),
 * in fp32, rounded once to the output type. */
typedef struct fm_moe_combine_params {
    const void *src;        /* slot buffer [T*K, H] 16-bit, or acc [T, H] fp32 */
    void *out;              /* [T, H] */
    int tokens, hidden, topk;
    int atomic;
} fm_moe_combine_params;

/* Reference (templates/moe_ref.cu): plain fp32 arithmetic, one CTA per slot. */
typedef struct fm_moe_ref_params {
    const void *hidden;        /* [T, H] */
    const float *logits;       /* [T, E] */
    const float *bias;         /* [E] or 0 */
    const void *w13;           /* [E, 2I, H] */
    const void *w2;            /* [E, H, I] */
    int *ids;                  /* [T, K] out (route pass) */
    float *weights;            /* [T, K] out (route pass) */
    float *inter;              /* [T*K, I] fp32 scratch (pass 1) */
    float *out;                /* [T, H] fp32 out (pass 2) */
    int tokens, hidden_size, inter_size, experts, topk;
    int routing, renormalize, n_group, topk_group;
    float scale;
} fm_moe_ref_params;

/* Random fill and comparison helpers of the tuner (templates/moe_ref.cu). */
typedef struct fm_moe_fill_params {
    void *dst;
    long long count;           /* elements */
    unsigned long long seed;
    float lo, hi;              /* uniform range */
    int is_f32;                /* 1: fp32 elements, 0: the kernel's 16-bit type */
    float quantum;             /* > 0: round values to multiples of it (makes exact ties) */
} fm_moe_fill_params;

typedef struct fm_moe_compare_params {
    const void *out;           /* [count] 16-bit */
    const float *ref;          /* [count] fp32 */
    double *sums;              /* [3] out, accumulated: sum (out-ref)^2, sum ref^2, max |out-ref| */
    unsigned long long *counts; /* [2] out, accumulated: poison patterns, non-finite */
    long long count;
    unsigned poison;           /* 16-bit pattern written before a checked run */
    int pad_;
} fm_moe_compare_params;

#endif
