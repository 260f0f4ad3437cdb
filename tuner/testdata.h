/*
 * testdata.h - random inputs, 16-bit float conversions and output comparison, shared by the
 * tuner's correctness gate and the tests (host side, no CUDA).
 */
#ifndef FM_TESTDATA_H
#define FM_TESTDATA_H

#include <stddef.h>

typedef struct fm_check fm_check;

unsigned long long fm_test_seed(void);          /* from the clock and pid: fresh each run;
                                                 * $FM_TEST_SEED repeats a printed one */
float fm_bf16_to_float(unsigned short h);
unsigned short fm_float_to_bf16(float f);       /* round to nearest even */
float fm_half_to_float(unsigned short h);
unsigned short fm_float_to_half(float f);       /* round to nearest even */
static inline float fm_16_to_float(unsigned short h, int bf16) {
    return bf16 ? fm_bf16_to_float(h) : fm_half_to_float(h);
}
static inline unsigned short fm_float_to_16(float f, int bf16) {
    return bf16 ? fm_float_to_bf16(f) : fm_float_to_half(f);
}
/* n values ~ N(0, 1) rounded to bf16 (bf16 != 0) or fp16. */
void fm_fill_normal16(unsigned short *out, size_t n, int bf16, unsigned long long seed);
/* Compares 16-bit outputs with an fp32 reference: fills max_abs_err, rel_err (Frobenius),
 * unwritten (poison 0xFFFF left) and nonfinite. */
void fm_compare16(const unsigned short *out, const float *ref, size_t n, int bf16, fm_check *c);

#endif
