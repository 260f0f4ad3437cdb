/*
 * driver.c - loads the CUDA driver at run time (see driver.h for why).
 */
#define _GNU_SOURCE
#include "driver.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

static fm_driver g_driver;
static int g_state;          /* 0 untried, 1 ok, -1 failed */
static char g_why[256];
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void load_driver(void) {
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        snprintf(g_why, sizeof g_why, "no CUDA driver (libcuda.so.1 not found): %s", dlerror());
        g_state = -1;
        return;
    }
    /* Each entry point is resolved under the exact name cuda.h maps it to (cuMemAlloc ->
     * cuMemAlloc_v2), so its ABI is the one declared in the header we compiled against, as if we
     * had linked libcuda. cuGetProcAddress is not used: asked for "cuCtxSynchronize" at CUDA 13.0
     * it hands out cuCtxSynchronize_v2(CUcontext), a different signature from the header's
     * cuCtxSynchronize(void). */
#define FM_XSTR(x) FM_STR(x)
#define FM_STR(x) #x
#define FM_RESOLVE(name, args)                                                                 \
    {                                                                                          \
        void *pfn = dlsym(lib, FM_XSTR(name));                                                 \
        if (!pfn) {                                                                            \
            snprintf(g_why, sizeof g_why, "CUDA driver lacks %s (driver older than CUDA %d.%d?)", \
                     FM_XSTR(name), CUDA_VERSION / 1000, (CUDA_VERSION % 1000) / 10);          \
            g_state = -1;                                                                      \
            return;                                                                            \
        }                                                                                      \
        memcpy(&g_driver.name, &pfn, sizeof pfn);                                              \
    }
    FM_DRIVER_FUNCS(FM_RESOLVE)
#undef FM_RESOLVE
    CUresult r = g_driver.cuInit(0);
    if (r != CUDA_SUCCESS) {
        const char *s = NULL;
        g_driver.cuGetErrorName(r, &s);
        snprintf(g_why, sizeof g_why, "no usable GPU: cuInit failed (%s)", s ? s : "unknown");
        g_state = -1;
        return;
    }
    int n = 0;
    if (g_driver.cuDeviceGetCount(&n) != CUDA_SUCCESS || n == 0) {
        snprintf(g_why, sizeof g_why, "no GPU: the CUDA driver reports no device");
        g_state = -1;
        return;
    }
    g_state = 1;
}

const fm_driver *fm_driver_get(char *why, size_t why_len) {
    pthread_once(&g_once, load_driver);
    if (g_state == 1) return &g_driver;
    if (why && why_len) snprintf(why, why_len, "%s", g_why);
    return NULL;
}

const char *fm_driver_error_text(CUresult r, char *buf, size_t len) {
    const char *name = NULL, *text = NULL;
    if (g_state == 1) {
        g_driver.cuGetErrorName(r, &name);
        g_driver.cuGetErrorString(r, &text);
    }
    snprintf(buf, len, "%s: %s", name ? name : "CUDA error", text ? text : "(no description)");
    return buf;
}

void fm_launch_config(CUlaunchConfig *lc, CUlaunchAttribute *attr, unsigned threads, unsigned smem,
                      unsigned cluster, CUstream stream) {
    memset(attr, 0, sizeof *attr);
    memset(lc, 0, sizeof *lc);
    lc->blockDimX = threads;
    lc->blockDimY = lc->blockDimZ = 1;
    lc->gridDimY = lc->gridDimZ = 1;
    lc->sharedMemBytes = smem;
    lc->hStream = stream;
    if (cluster > 1) {
        attr->id = CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
        attr->value.clusterDim.x = cluster;
        attr->value.clusterDim.y = attr->value.clusterDim.z = 1;
        lc->attrs = attr;
        lc->numAttrs = 1;
    }
}
