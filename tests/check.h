/*
 * check.h - the tests' few assertions. Each CHECK counts; main ends with fm_check_report(), which
 * prints "N passed, N failed" and returns the exit code.
 */
#ifndef FM_TEST_CHECK_H
#define FM_TEST_CHECK_H

#include <stdio.h>

static int fm_pass_, fm_fail_;

#define CHECK(cond, ...)                                                                       \
    do {                                                                                       \
        if (cond) {                                                                            \
            fm_pass_++;                                                                        \
        } else {                                                                               \
            fm_fail_++;                                                                        \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);                    \
            fprintf(stderr, __VA_ARGS__);                                                      \
            fprintf(stderr, "\n");                                                             \
        }                                                                                      \
    } while (0)

static inline int fm_check_report(void) {
    printf("%d passed, %d failed\n", fm_pass_, fm_fail_);
    return fm_fail_ ? 1 : 0;
}

/* Skips a test that needs what this machine lacks (CTest: SKIP_RETURN_CODE 77). */
#define FM_SKIP(...)                                                                           \
    do {                                                                                       \
        printf("SKIP: ");                                                                      \
        printf(__VA_ARGS__);                                                                   \
        printf("\n");                                                                          \
        return 77;                                                                             \
    } while (0)

#endif
