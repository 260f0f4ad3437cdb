/*
 * driver.h - the CUDA driver API, loaded at run time.
 *
 * libflashmoe never links libcuda: it opens libcuda.so.1 with dlopen on first use and resolves
 * every entry point by its versioned name (see driver.c), so that everything but launching (generating,
 * compiling, database work) runs on a machine with no GPU and says so plainly when asked to launch.
 * cuda.h is used for its types and constants only.
 */
#ifndef FM_DRIVER_H
#define FM_DRIVER_H

#include <cuda.h>

#define FM_DRIVER_FUNCS(X)                                                                       \
    X(cuInit, (unsigned int))                                                                    \
    X(cuDriverGetVersion, (int *))                                                               \
    X(cuGetErrorString, (CUresult, const char **))                                               \
    X(cuGetErrorName, (CUresult, const char **))                                                 \
    X(cuDeviceGetCount, (int *))                                                                 \
    X(cuDeviceGet, (CUdevice *, int))                                                            \
    X(cuDeviceGetName, (char *, int, CUdevice))                                                  \
    X(cuDeviceGetAttribute, (int *, CUdevice_attribute, CUdevice))                               \
    X(cuDeviceTotalMem, (size_t *, CUdevice))                                                    \
    X(cuDevicePrimaryCtxRetain, (CUcontext *, CUdevice))                                         \
    X(cuDevicePrimaryCtxRelease, (CUdevice))                                                     \
    X(cuCtxSetCurrent, (CUcontext))                                                              \
    X(cuCtxGetCurrent, (CUcontext *))                                                            \
    X(cuCtxPushCurrent, (CUcontext))                                                             \
    X(cuCtxPopCurrent, (CUcontext *))                                                            \
    X(cuCtxSynchronize, (void))                                                                  \
    X(cuModuleLoadData, (CUmodule *, const void *))                                              \
    X(cuModuleUnload, (CUmodule))                                                                \
    X(cuModuleGetFunction, (CUfunction *, CUmodule, const char *))                               \
    X(cuFuncSetAttribute, (CUfunction, CUfunction_attribute, int))                               \
    X(cuFuncGetAttribute, (int *, CUfunction_attribute, CUfunction))                             \
    X(cuLaunchKernel, (CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,   \
                       unsigned, CUstream, void **, void **))                                    \
    X(cuLaunchKernelEx, (const CUlaunchConfig *, CUfunction, void **, void **))                  \
    X(cuOccupancyMaxActiveClusters, (int *, CUfunction, const CUlaunchConfig *))                 \
    X(cuMemAlloc, (CUdeviceptr *, size_t))                                                       \
    X(cuMemFree, (CUdeviceptr))                                                                  \
    X(cuMemcpyHtoD, (CUdeviceptr, const void *, size_t))                                         \
    X(cuMemcpyDtoH, (void *, CUdeviceptr, size_t))                                               \
    X(cuMemcpyDtoD, (CUdeviceptr, CUdeviceptr, size_t))                                          \
    X(cuMemsetD8, (CUdeviceptr, unsigned char, size_t))                                          \
    X(cuMemsetD32, (CUdeviceptr, unsigned int, size_t))                                          \
    X(cuMemsetD8Async, (CUdeviceptr, unsigned char, size_t, CUstream))                           \
    X(cuMemsetD32Async, (CUdeviceptr, unsigned int, size_t, CUstream))                           \
    X(cuMemGetInfo, (size_t *, size_t *))                                                        \
    X(cuStreamCreate, (CUstream *, unsigned int))                                                \
    X(cuStreamDestroy, (CUstream))                                                               \
    X(cuStreamSynchronize, (CUstream))                                                           \
    X(cuEventCreate, (CUevent *, unsigned int))                                                  \
    X(cuEventDestroy, (CUevent))                                                                 \
    X(cuEventRecord, (CUevent, CUstream))                                                        \
    X(cuEventSynchronize, (CUevent))                                                             \
    X(cuEventElapsedTime, (float *, CUevent, CUevent))                                           \
    X(cuTensorMapEncodeTiled, (CUtensorMap *, CUtensorMapDataType, cuuint32_t, void *,           \
                               const cuuint64_t *, const cuuint64_t *, const cuuint32_t *,       \
                               const cuuint32_t *, CUtensorMapInterleave, CUtensorMapSwizzle,    \
                               CUtensorMapL2promotion, CUtensorMapFloatOOBfill))

typedef struct fm_driver {
#define FM_DRIVER_MEMBER(name, args) CUresult(CUDAAPI *name) args;
    FM_DRIVER_FUNCS(FM_DRIVER_MEMBER)
#undef FM_DRIVER_MEMBER
} fm_driver;

/* Loads the driver once per process (thread-safe) and calls cuInit(0).
 * Returns NULL and writes a reason into why (if given) when there is no driver or no GPU. */
const fm_driver *fm_driver_get(char *why, size_t why_len);

/* "CUDA_ERROR_ILLEGAL_ADDRESS: an illegal memory access was encountered" */
const char *fm_driver_error_text(CUresult r, char *buf, size_t len);

/* A cuLaunchKernelEx configuration of 1-D blocks of `threads` with `smem` bytes of dynamic
 * shared memory on `stream`, in clusters of `cluster` CTAs when cluster > 1 (then *attr holds
 * the cluster dimension, and must outlive the launch). The grid is the caller's (gridDimX). */
void fm_launch_config(CUlaunchConfig *lc, CUlaunchAttribute *attr, unsigned threads, unsigned smem,
                      unsigned cluster, CUstream stream);

#endif
