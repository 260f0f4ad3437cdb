/*
 * test_gpu_match.c - how fmtune's --gpu is matched against the card present (the refusal itself
 * is exercised by test_cli on a GPU machine).
 */
#include "check.h"
#include "tune.h"

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
    return fm_check_report();
}
