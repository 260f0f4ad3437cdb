/*
 * test_gpu_match.c - how fmtune's --gpu is matched against the card present (the refusal itself
 * is exercised by test_cli on a GPU machine), and the order the tuner measures in under a budget.
 */
#include "check.h"
#include "tune.h"

#include <string.h>

/* fm_tune_spread_order: a permutation whose every prefix covers the whole range evenly. */
static void check_spread(int n) {
    int idx[512], seen[512];
    for (int i = 0; i < n; i++) idx[i] = 100 + i; /* values, not positions */
    fm_tune_spread_order(idx, n);
    memset(seen, 0, sizeof seen);
    int perm = 1;
    for (int i = 0; i < n; i++) {
        int x = idx[i] - 100;
        if (x < 0 || x >= n || seen[x]++) perm = 0;
    }
    CHECK(perm, "n = %d: the spread order is a permutation", n);
    if (!perm || n < 40) return;
    /* the first quarter (10 or more) touches every fifth of the enumeration */
    int fifth[5] = {0};
    for (int i = 0; i < n / 4; i++) fifth[(idx[i] - 100) * 5 / n]++;
    int all = 1;
    for (int t = 0; t < 5; t++) all = all && fifth[t] > 0;
    CHECK(all, "n = %d: the first quarter of the order samples every fifth of the range", n);
}

int main(void) {
    const char *h100 = "NVIDIA H100 80GB HBM3", *h200 = "NVIDIA H200", *a100 = "NVIDIA A100-SXM4-80GB";
    CHECK(fm_gpu_matches("h100", h100), "h100 on an H100");
    CHECK(fm_gpu_matches("H100", h100), "case-insensitive");
    CHECK(!fm_gpu_matches("h100", h200), "h100 must not match an H200");
    CHECK(!fm_gpu_matches("h200", h100), "h200 must not match an H100");
    CHECK(fm_gpu_matches("h200", h200), "h200 on an H200");
    CHECK(!fm_gpu_matches("h20", h200), "h20 must not match an H200 (model number continues)");
    CHECK(!fm_gpu_matches("a100", h100), "a100 on an H100");
    CHECK(fm_gpu_matches("a100", a100), "a100 on an A100");
    CHECK(fm_gpu_matches("auto", h100) && fm_gpu_matches(NULL, h200), "auto matches anything");
    CHECK(fm_gpu_matches("80GB", h100), "a name fragment matches");
    CHECK(fm_gpu_arch("h100") == 90 && fm_gpu_arch("h200") == 90 && fm_gpu_arch("a100") == 80,
          "architectures");
    CHECK(fm_gpu_arch("auto") == 0 && fm_gpu_arch("rtx") == 0, "unknown names imply nothing");
    for (int n = 0; n <= 512; n += n < 64 ? 1 : 29) check_spread(n);
    check_spread(221); /* the MoE space at one dtype */
    {
        int two[2] = {7, 9};
        fm_tune_spread_order(two, 2);
        CHECK(two[0] == 7 && two[1] == 9, "n = 2 stays in order");
    }
    return fm_check_report();
}
