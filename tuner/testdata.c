/*
 * testdata.c - see testdata.h.
 */
#define _GNU_SOURCE
#include "testdata.h"
#include "op.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

unsigned long long fm_test_seed(void) {
    /* FM_TEST_SEED repeats a run whose seed a test printed */
    const char *env = getenv("FM_TEST_SEED");
    if (env && *env) return strtoull(env, NULL, 10);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (unsigned long long)ts.tv_nsec ^ ((unsigned long long)ts.tv_sec << 20) ^
           ((unsigned long long)getpid() << 40);
}

float fm_bf16_to_float(unsigned short h) {
    unsigned int u = (unsigned int)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

unsigned short fm_float_to_bf16(float f) {
    unsigned int u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40); /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

float fm_half_to_float(unsigned short h) {
    unsigned int sign = (unsigned int)(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    float f;
    if (exp == 0) {
        f = ldexpf((float)man, -24);
        return sign ? -f : f;
    }
    if (exp == 31) {
        unsigned int u = sign | 0x7f800000u | (man << 13);
        memcpy(&f, &u, 4);
        return f;
    }
    unsigned int u = sign | ((exp + 112) << 23) | (man << 13);
    memcpy(&f, &u, 4);
    return f;
}

unsigned short fm_float_to_half(float f) {
    unsigned int u;
    memcpy(&u, &f, 4);
    unsigned short sign = (unsigned short)((u >> 16) & 0x8000);
    float a = fabsf(f);
    if (isnan(f)) return 0x7e00;
    if (a >= 65520.0f) return (unsigned short)(sign | 0x7c00);
    if (a < 6.103515625e-05f) { /* subnormal: multiples of 2^-24 */
        float m = nearbyintf(a * 16777216.0f);
        return (unsigned short)(sign | (unsigned short)m);
    }
    int e;
    float m = frexpf(a, &e); /* a = m * 2^e, m in [0.5, 1) */
    float mant = nearbyintf((m * 2.0f - 1.0f) * 1024.0f);
    int exp = e - 1 + 15;
    if (mant >= 1024.0f) {
        mant = 0;
        exp++;
    }
    if (exp >= 31) return (unsigned short)(sign | 0x7c00);
    return (unsigned short)(sign | (exp << 10) | (int)mant);
}

static unsigned long long splitmix(unsigned long long *s) {
    unsigned long long z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void fm_fill_normal16(unsigned short *out, size_t n, int bf16, unsigned long long seed) {
    unsigned long long s = seed;
    for (size_t i = 0; i < n; i += 2) {
        double u1 = ((double)(splitmix(&s) >> 11) + 1.0) / 9007199254740993.0;
        double u2 = (double)(splitmix(&s) >> 11) / 9007199254740992.0;
        double r = sqrt(-2.0 * log(u1));
        out[i] = fm_float_to_16((float)(r * cos(6.283185307179586 * u2)), bf16);
        if (i + 1 < n) out[i + 1] = fm_float_to_16((float)(r * sin(6.283185307179586 * u2)), bf16);
    }
}

void fm_compare16(const unsigned short *out, const float *ref, size_t n, int bf16, fm_check *c) {
    double num = 0, den = 0, mx = 0;
    int unwritten = 0, nonfinite = 0;
    for (size_t i = 0; i < n; i++) {
        if (out[i] == 0xFFFF) {
            unwritten++;
            continue;
        }
        float v = fm_16_to_float(out[i], bf16);
        if (!isfinite(v)) {
            if (isfinite(ref[i])) nonfinite++;
            continue;
        }
        double e = fabs((double)v - ref[i]);
        num += e * e;
        den += (double)ref[i] * ref[i];
        if (e > mx) mx = e;
    }
    c->max_abs_err = mx;
    c->rel_err = den > 0 ? sqrt(num / den) : sqrt(num);
    c->unwritten = unwritten;
    c->nonfinite = nonfinite;
}
