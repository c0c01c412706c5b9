/* Reading bytes as a wider integer, for every ISA build (scalar C, no intrinsics). */
#ifndef VILASERVE_BYTES_H
#define VILASERVE_BYTES_H

#include <stdint.h>
#include <string.h>

/* Four bytes as one int32, to broadcast to every lane (a row's 4 columns for `vpdpbusd`,
 * `vpmaddubsw` or `sdot`); memcpy, as the bytes need not be aligned. */
static inline int32_t load4(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

#endif
