/*
 * numeric.cuh - 16-bit float storage and conversions without any CUDA header.
 *
 * NVRTC on a user's machine may have no toolkit headers, so <cuda_bf16.h>/<cuda_fp16.h> are not
 * an option: values are kept as raw 16-bit patterns (unsigned short) and converted with inline
 * PTX. The element type of a kernel is chosen by FM_DTYPE_BF16 (1: bf16, 0: fp16); the generic
 * fm_elem_* helpers below follow it, the explicit fm_bf16_* / fm_f16_* ones are always there.
 *
 * Packing convention (matches the mma.sync register layout): in a packed 32-bit pair the element
 * with the lower column index sits in the low 16 bits.
 */
#pragma once

#ifndef FM_DTYPE_BF16
#define FM_DTYPE_BF16 1
#endif
#if FM_DTYPE_BF16 != 0 && FM_DTYPE_BF16 != 1
#error "FM_DTYPE_BF16 must be 0 (fp16) or 1 (bf16)"
#endif

typedef unsigned short fm_u16; /* storage of one bf16 or fp16 value */
typedef fm_u16 fm_elem_t;      /* storage of the kernel's element type */

/* ---- bf16 ---------------------------------------------------------------------------------- */
/* bf16 is the top half of an fp32: widening is a shift, exact. */
static __device__ __forceinline__ float fm_bf16_to_f32(fm_u16 x) {
    return __uint_as_float(((unsigned)x) << 16);
}

/* Round to nearest even (cvt.rn handles NaN and overflow to inf like the hardware does). */
static __device__ __forceinline__ fm_u16 fm_f32_to_bf16(float x) {
    fm_u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}

/* lo -> bits 0..15, hi -> bits 16..31. PTX puts its first source operand in the upper half. */
static __device__ __forceinline__ unsigned fm_pack_bf16x2(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

/* ---- fp16 ---------------------------------------------------------------------------------- */
static __device__ __forceinline__ float fm_f16_to_f32(fm_u16 x) {
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(x));
    return r;
}

static __device__ __forceinline__ fm_u16 fm_f32_to_f16(float x) {
    fm_u16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}

static __device__ __forceinline__ unsigned fm_pack_f16x2(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

/* ---- the kernel's element type ------------------------------------------------------------- */
static __device__ __forceinline__ float fm_elem_to_f32(fm_elem_t x) {
#if FM_DTYPE_BF16
    return fm_bf16_to_f32(x);
#else
    return fm_f16_to_f32(x);
#endif
}

static __device__ __forceinline__ fm_elem_t fm_f32_to_elem(float x) {
#if FM_DTYPE_BF16
    return fm_f32_to_bf16(x);
#else
    return fm_f32_to_f16(x);
#endif
}

static __device__ __forceinline__ unsigned fm_pack_elem2(float lo, float hi) {
#if FM_DTYPE_BF16
    return fm_pack_bf16x2(lo, hi);
#else
    return fm_pack_f16x2(lo, hi);
#endif
}

/* ---- fast transcendental helpers ------------------------------------------------------------ */
/* 2^x on the SFU. ex2.approx has ~2 ulp error and maps -inf to +0, which the online softmax
 * relies on for masked scores; .ftz flushes denormal results (probabilities below 2^-126 do
 * not matter next to the row maximum's 1.0). */
static __device__ __forceinline__ float fm_exp2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

/* log2(x) on the SFU (relative error ~2^-22); log2(0) = -inf. */
static __device__ __forceinline__ float fm_log2(float x) {
    float r;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

/* 1/x on the SFU (rcp.approx.ftz: within 1 ulp), without the IEEE division's slow path. */
static __device__ __forceinline__ float fm_rcp(float x) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

/* -inf without <math.h>. */
static __device__ __forceinline__ float fm_neg_inf(void) { return __uint_as_float(0xff800000u); }

#define FM_LN2 0.69314718055994530942f
#define FM_LOG2E 1.44269504088896340736f
