/* embedded.h - the generator scripts and kernel templates compiled into the library. */
#ifndef FM_EMBEDDED_H
#define FM_EMBEDDED_H
#include <stddef.h>

typedef struct fm_embedded_file {
    const char *path;           /* "generator/space.lua", "templates/common/ptx_sm80.cuh" */
    const unsigned char *data;
    size_t size;
} fm_embedded_file;

extern const fm_embedded_file fm_embedded_files[];
extern const size_t fm_embedded_count;
const fm_embedded_file *fm_embedded_find(const char *path);
#endif
