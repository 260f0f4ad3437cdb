/*
 * jit.c - NVRTC compilation with a memory cache and an on-disk cache.
 *
 * Cache key: FNV-1a over (canonical name, rendered source, target architecture, NVRTC version,
 * options). The rendered source already contains every template it includes and every tuned
 * parameter, so an edit to any template or a new NVRTC invalidates exactly the binaries it
 * affects. Disk entries are written to a temporary name and renamed, so concurrent processes
 * (several tuners, a tuner and a server) never read half a file.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <nvrtc.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

typedef struct mem_entry {
    unsigned long long key;
    void *cubin;
    size_t size;
    fm_compile_info info;
    struct mem_entry *next;
} mem_entry;

struct fm_jit {
    char dir[1024]; /* "" when the disk cache is off */
    pthread_mutex_t lock;
    mem_entry *entries;
};

static unsigned long long fnv(unsigned long long h, const void *data, size_t n) {
    const unsigned char *p = data;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

int fm_nvrtc_version(void) {
    int major = 0, minor = 0;
    if (nvrtcVersion(&major, &minor) != NVRTC_SUCCESS) return 0;
    return major * 1000 + minor * 10;
}

static int mkdir_p(const char *path) {
    char tmp[1024];
    snprintf(tmp, sizeof tmp, "%s", path);
    for (char *p = tmp + 1; *p; p++) {
        if (*p == '/') {
            *p = 0;
            if (mkdir(tmp, 0755) && errno != EEXIST) return -1;
            *p = '/';
        }
    }
    if (mkdir(tmp, 0755) && errno != EEXIST) return -1;
    return 0;
}

fm_status fm_jit_open(fm_jit **out, const char *cache_dir) {
    fm_jit *j = calloc(1, sizeof *j);
    if (!j) return FM_ERR_OUT_OF_MEMORY;
    pthread_mutex_init(&j->lock, NULL);
    if (cache_dir && cache_dir[0]) {
        snprintf(j->dir, sizeof j->dir, "%s", cache_dir);
        /* An unusable cache directory only costs recompiles; it is not an error. */
        if (mkdir_p(j->dir)) j->dir[0] = 0;
    }
    *out = j;
    return FM_OK;
}

void fm_jit_close(fm_jit *j) {
    if (!j) return;
    for (mem_entry *e = j->entries, *n; e; e = n) {
        n = e->next;
        free(e->cubin);
        free(e);
    }
    pthread_mutex_destroy(&j->lock);
    free(j);
}

/* Reads the ptxas report NVRTC put in the program log. A module may hold several kernels: the
 * report keeps the largest register count and stack, and the total of the spills. */
void fm_parse_ptxas_log(const char *log, fm_compile_info *info) {
    for (const char *p = log; (p = strstr(p, "Used ")); p += 5) {
        int regs = 0;
        if (sscanf(p, "Used %d registers", &regs) == 1 && regs > info->registers)
            info->registers = regs;
        const char *eol = strchr(p, '\n');
        const char *sm = strstr(p, "bytes smem");
        if (sm && (!eol || sm < eol)) {
            const char *q = sm;
            while (q > p && q[-1] == ' ') q--;
            while (q > p && q[-1] != ' ' && q[-1] != ',') q--;
            int smem = 0;
            if (sscanf(q, "%d", &smem) == 1 && smem > info->static_smem) info->static_smem = smem;
        }
    }
    /* "Potential Performance Loss: wgmma.mma_async instructions are serialized due to ...":
     * every wgmma of the kernel then waits for the previous one, which no timing would explain. */
    if (strstr(log, "wgmma.mma_async instructions are serialized")) info->wgmma_serialized = 1;
    /* NVRTC prefixes the line ("ptxas         .     56 bytes stack frame, ..."), nvcc does
     * not: start at the number just before "bytes stack frame". */
    for (const char *p = log; (p = strstr(p, "bytes stack frame")); p += 17) {
        const char *q = p;
        while (q > log && q[-1] == ' ') q--;
        while (q > log && q[-1] >= '0' && q[-1] <= '9') q--;
        int stack = 0, st = 0, ld = 0;
        if (sscanf(q, " %d bytes stack frame, %d bytes spill stores, %d bytes spill loads", &stack,
                   &st, &ld) == 3) {
            if (stack > info->stack_bytes) info->stack_bytes = stack;
            info->spill_stores += st;
            info->spill_loads += ld;
        }
    }
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static int read_file(const char *path, void **data, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    if (fseek(f, 0, SEEK_END) || ftell(f) <= 0) {
        fclose(f);
        return -1;
    }
    long n = ftell(f);
    rewind(f);
    void *buf = malloc((size_t)n);
    if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        fclose(f);
        return -1;
    }
    fclose(f);
    *data = buf;
    *size = (size_t)n;
    return 0;
}

static void write_atomic(const char *path, const void *data, size_t size) {
    char tmp[1100];
    snprintf(tmp, sizeof tmp, "%s.%d.tmp", path, (int)getpid());
    FILE *f = fopen(tmp, "wb");
    if (!f) return;
    int ok = fwrite(data, 1, size, f) == size;
    ok = (fclose(f) == 0) && ok;
    if (ok) ok = rename(tmp, path) == 0;
    if (!ok) unlink(tmp);
}

static void mem_put(fm_jit *j, unsigned long long key, const void *cubin, size_t size,
                    const fm_compile_info *info) {
    mem_entry *e = calloc(1, sizeof *e);
    if (!e) return;
    e->cubin = malloc(size);
    if (!e->cubin) {
        free(e);
        return;
    }
    memcpy(e->cubin, cubin, size);
    e->size = size;
    e->key = key;
    e->info = *info;
    pthread_mutex_lock(&j->lock);
    e->next = j->entries;
    j->entries = e;
    pthread_mutex_unlock(&j->lock);
}

static int mem_get(fm_jit *j, unsigned long long key, void **cubin, size_t *size,
                   fm_compile_info *info) {
    int found = 0;
    pthread_mutex_lock(&j->lock);
    for (mem_entry *e = j->entries; e; e = e->next) {
        if (e->key != key) continue;
        *cubin = malloc(e->size);
        if (*cubin) {
            memcpy(*cubin, e->cubin, e->size);
            *size = e->size;
            *info = e->info;
            found = 1;
        }
        break;
    }
    pthread_mutex_unlock(&j->lock);
    return found;
}

fm_status fm_jit_compile(fm_jit *j, const char *name, const fm_rendered *r, int arch,
                         void **cubin, size_t *cubin_size, fm_compile_info *info, char **log) {
    *cubin = NULL;
    *cubin_size = 0;
    if (log) *log = NULL;
    memset(info, 0, sizeof *info);

    char archopt[64];
    snprintf(archopt, sizeof archopt, "--gpu-architecture=sm_%d%s", arch, r->arch_suffix);
    /* -default-device: templates are device code only, helpers need no __device__ on lambdas */
    const char *opts[] = {archopt, "-std=c++17", "--ptxas-options=-v", "-default-device",
                          "-DFM_NVRTC=1"};
    const int nopts = (int)(sizeof opts / sizeof opts[0]);

    int nvrtc = fm_nvrtc_version();
    unsigned long long key = 0xcbf29ce484222325ULL;
    key = fnv(key, name, strlen(name) + 1);
    key = fnv(key, r->source, strlen(r->source) + 1);
    key = fnv(key, &nvrtc, sizeof nvrtc);
    for (int i = 0; i < nopts; i++) key = fnv(key, opts[i], strlen(opts[i]) + 1);
    /* Version of what the cache stores beside the cubin (.info): 2 since spills are read from
     * NVRTC's prefixed ptxas lines (entries written before said 0 spills, wrongly), 3 since it
     * records whether ptxas serialised the wgmma. */
    static const char info_version[] = "info-3";
    key = fnv(key, info_version, sizeof info_version);

    if (mem_get(j, key, cubin, cubin_size, info)) {
        info->from_cache = 2;
        return FM_OK;
    }
    char path[1300] = "";
    if (j->dir[0]) {
        snprintf(path, sizeof path, "%s/%s-sm%d%s-%016llx.cubin", j->dir, name, arch,
                 r->arch_suffix, key);
        char ipath[1310];
        snprintf(ipath, sizeof ipath, "%s.info", path);
        FILE *f = fopen(ipath, "r");
        if (f) {
            int ok = fscanf(f, "%d %d %d %d %d %lf %d", &info->registers, &info->spill_stores,
                            &info->spill_loads, &info->stack_bytes, &info->static_smem,
                            &info->compile_ms, &info->wgmma_serialized) == 7;
            fclose(f);
            if (ok && read_file(path, cubin, cubin_size) == 0) {
                info->from_cache = 1;
                mem_put(j, key, *cubin, *cubin_size, info);
                return FM_OK;
            }
            memset(info, 0, sizeof *info);
        }
    }

    double t0 = now_ms();
    nvrtcProgram prog;
    char prog_name[200];
    snprintf(prog_name, sizeof prog_name, "%s.cu", name);
    nvrtcResult rc = nvrtcCreateProgram(&prog, r->source, prog_name, 0, NULL, NULL);
    if (rc != NVRTC_SUCCESS) {
        if (log) *log = strdup(nvrtcGetErrorString(rc));
        return rc == NVRTC_ERROR_OUT_OF_MEMORY ? FM_ERR_OUT_OF_MEMORY : FM_ERR_COMPILE;
    }
    rc = nvrtcCompileProgram(prog, nopts, opts);
    size_t loglen = 0;
    nvrtcGetProgramLogSize(prog, &loglen);
    char *text = malloc(loglen + 1);
    if (text) {
        text[0] = 0;
        nvrtcGetProgramLog(prog, text);
        text[loglen] = 0;
    }
    if (rc != NVRTC_SUCCESS) {
        if (log) *log = text;
        else free(text);
        nvrtcDestroyProgram(&prog);
        return FM_ERR_COMPILE;
    }
    if (text) fm_parse_ptxas_log(text, info);
    size_t n = 0;
    rc = nvrtcGetCUBINSize(prog, &n);
    void *bin = rc == NVRTC_SUCCESS && n ? malloc(n) : NULL;
    if (!bin || nvrtcGetCUBIN(prog, bin) != NVRTC_SUCCESS) {
        free(bin);
        if (log) *log = text;
        else free(text);
        nvrtcDestroyProgram(&prog);
        return FM_ERR_COMPILE;
    }
    nvrtcDestroyProgram(&prog);
    info->compile_ms = now_ms() - t0;
    if (log) *log = text;
    else free(text);

    mem_put(j, key, bin, n, info);
    if (path[0]) {
        write_atomic(path, bin, n);
        char ipath[1310], line[160];
        snprintf(ipath, sizeof ipath, "%s.info", path);
        int len = snprintf(line, sizeof line, "%d %d %d %d %d %.3f %d\n", info->registers,
                           info->spill_stores, info->spill_loads, info->stack_bytes,
                           info->static_smem, info->compile_ms, info->wgmma_serialized);
        /* the .info is written last: a reader that finds it finds the cubin too */
        if (len > 0) write_atomic(ipath, line, (size_t)len);
    }
    *cubin = bin;
    *cubin_size = n;
    return FM_OK;
}
