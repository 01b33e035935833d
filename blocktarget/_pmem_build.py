"""cffi build script (API mode) for `blocktarget._pmem`, the libpmem glue of the pmem bdev.

Built at install time by setuptools (`cffi_modules` in setup.py) against Debian's
libpmem-dev. API mode so the compiler checks our declarations against libpmem.h, and so a
few helpers can live in C:

* `bt_store32`/`bt_store64` are single aligned stores (`__atomic_store_n`). The BTT map and
  flog rely on an 8-byte-aligned store reaching memory as one piece, both for power
  failure (the persistence domain guarantees 8-byte atomicity) and for `kill -9` (a store
  made byte by byte, as Python's struct module does, can be cut in the middle).
* `bt_store_many`, `bt_scatter` and `bt_gather` do one BTT step for a whole chunk of
  blocks (the map or sequence-number stores, the data copies into scattered free blocks,
  the copies out of scattered mapped blocks) in one call: every crossing from Python to C
  costs more than the C work for a 4 KiB block, and cffi releases the GIL around each
  call, so another reactor runs while the copies do.
* `memcpy` itself, for single large-block reads and writes, GIL released likewise.
* `bt_copy_msync` is memcpy plus `pmem_msync` in one call (the raw baseline of
  bench/pmem_vs_raw.py).

The extension is optional: when libpmem-dev is missing the compile fails, setuptools skips
the extension with a warning (`optional=True`), the install succeeds, and the pmem bdev says
at create time what is missing.
"""

from __future__ import annotations

from cffi import FFI

CDEF = r"""
typedef int... mode_t;

#define PMEM_FILE_CREATE ...
#define PMEM_FILE_EXCL ...
#define PMEM_MAJOR_VERSION ...
#define PMEM_MINOR_VERSION ...

void *pmem_map_file(const char *path, size_t len, int flags, mode_t mode,
                    size_t *mapped_lenp, int *is_pmemp);
int pmem_unmap(void *addr, size_t len);
int pmem_is_pmem(const void *addr, size_t len);
void pmem_persist(const void *addr, size_t len);
int pmem_msync(const void *addr, size_t len);
void pmem_flush(const void *addr, size_t len);
void pmem_drain(void);
int pmem_has_hw_drain(void);
void *pmem_memcpy_persist(void *pmemdest, const void *src, size_t len);
void *pmem_memcpy_nodrain(void *pmemdest, const void *src, size_t len);
const char *pmem_check_version(unsigned major_required, unsigned minor_required);
const char *pmem_errormsg(void);

void *memcpy(void *dst, const void *src, size_t len);

void bt_store32(void *addr, uint32_t value);
void bt_store64(void *addr, uint64_t value);
void bt_store_many(char *base, const uint64_t *offs, const uint64_t *vals, size_t n,
                   int width);
void bt_scatter(char *base, const uint64_t *offs, const char *src, size_t n, size_t bs,
                int flush);
void bt_gather(char *dst, const char *base, const uint64_t *offs, size_t n, size_t bs);
int bt_copy_msync(void *dst, const void *src, size_t len);
"""

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <libpmem.h>

static void bt_store32(void *addr, uint32_t value)
{
    __atomic_store_n((uint32_t *)addr, value, __ATOMIC_RELEASE);
}

static void bt_store64(void *addr, uint64_t value)
{
    __atomic_store_n((uint64_t *)addr, value, __ATOMIC_RELEASE);
}

static void bt_store_many(char *base, const uint64_t *offs, const uint64_t *vals, size_t n,
                          int width)
{
    for (size_t i = 0; i < n; i++) {
        if (width == 8)
            __atomic_store_n((uint64_t *)(base + offs[i]), vals[i], __ATOMIC_RELEASE);
        else
            __atomic_store_n((uint32_t *)(base + offs[i]), (uint32_t)vals[i], __ATOMIC_RELEASE);
    }
}

static void bt_scatter(char *base, const uint64_t *offs, const char *src, size_t n, size_t bs,
                       int flush)
{
    for (size_t i = 0; i < n; i++) {
        if (flush)
            pmem_memcpy_nodrain(base + offs[i], src + i * bs, bs);
        else
            memcpy(base + offs[i], src + i * bs, bs);
    }
}

static void bt_gather(char *dst, const char *base, const uint64_t *offs, size_t n, size_t bs)
{
    for (size_t i = 0; i < n; i++)
        memcpy(dst + i * bs, base + offs[i], bs);
}

static int bt_copy_msync(void *dst, const void *src, size_t len)
{
    memcpy(dst, src, len);
    return pmem_msync(dst, len);
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "blocktarget._pmem",
    SOURCE,
    libraries=["pmem"],
    # a missing libpmem-dev must not fail `pip install`; the bdev reports it at create time
    optional=True,
)

if __name__ == "__main__":  # `python blocktarget/_pmem_build.py` builds it in place
    ffibuilder.compile(verbose=True)
