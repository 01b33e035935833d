/* CRC32C (Castagnoli), the NVMe/TCP header and data digest.
 *
 * Chosen at run time, never at build time (the extension must run on any x86-64-v2
 * CPU and build on arm64): the CPU's CRC32 instruction when it has one (SSE4.2 on
 * x86-64, the CRC extension on arm64), else a portable slicing-by-8 table. The
 * instruction versions are compiled with a per-function target attribute, so the rest
 * of the file stays baseline code and nothing runs them on a CPU that lacks them.
 *
 * The instruction has a latency of about three cycles and a throughput of one, so one
 * dependency chain runs at a third of its speed: long buffers are cut into three
 * streams computed side by side, then joined. Joining needs the CRC of a stream moved
 * past the bytes of the next one; for a fixed stream length that move is linear over
 * GF(2) in the 32 CRC bits, so it is four 256-entry tables, built once at load.
 */
#include <stdint.h>
#include <string.h>

#include "bt_lane.h"

#define POLY 0x82F63B78u /* reflected Castagnoli polynomial */
#define LONG_STREAM 8192
#define SHORT_STREAM 256

static uint32_t table[8][256];
static uint32_t shift_long[4][256], shift_short[4][256];
static int use_hw;
static const char *impl_name = "table";

/* ---- the portable table version ---- */
static uint32_t crc_table(uint32_t crc, const unsigned char *p, size_t n)
{
    while (n && ((uintptr_t)p & 7)) {
        crc = table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        w = __builtin_bswap64(w);
#endif
        w ^= crc;
        crc = table[7][w & 0xFF] ^ table[6][(w >> 8) & 0xFF] ^ table[5][(w >> 16) & 0xFF]
            ^ table[4][(w >> 24) & 0xFF] ^ table[3][(w >> 32) & 0xFF]
            ^ table[2][(w >> 40) & 0xFF] ^ table[1][(w >> 48) & 0xFF] ^ table[0][w >> 56];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return crc;
}

/* the raw CRC register moved past n zero bytes (linear: used to build the shifts) */
static uint32_t zeros(uint32_t crc, size_t n)
{
    while (n--)
        crc = table[0][crc & 0xFF] ^ (crc >> 8);
    return crc;
}

static void build_shift(uint32_t t[4][256], size_t n)
{
    uint32_t basis[32];
    for (int i = 0; i < 32; i++)
        basis[i] = zeros(1u << i, n);
    for (int k = 0; k < 4; k++)
        for (int b = 0; b < 256; b++) {
            uint32_t v = 0;
            for (int i = 0; i < 8; i++)
                if (b & (1 << i))
                    v ^= basis[8 * k + i];
            t[k][b] = v;
        }
}

static inline uint32_t shift(uint32_t t[4][256], uint32_t crc)
{
    return t[0][crc & 0xFF] ^ t[1][(crc >> 8) & 0xFF] ^ t[2][(crc >> 16) & 0xFF]
         ^ t[3][crc >> 24];
}

/* ---- the instruction versions: one body, two primitives ---- */
#define CRC_BODY(STEP8, STEP1)                                                         \
    while (n && ((uintptr_t)p & 7)) {                                                  \
        crc = STEP1(crc, *p++);                                                        \
        n--;                                                                           \
    }                                                                                  \
    while (n >= 3 * LONG_STREAM) {                                                     \
        uint32_t c1 = 0, c2 = 0;                                                       \
        const unsigned char *end = p + LONG_STREAM;                                    \
        do {                                                                           \
            uint64_t a, b, c;                                                          \
            memcpy(&a, p, 8);                                                          \
            memcpy(&b, p + LONG_STREAM, 8);                                            \
            memcpy(&c, p + 2 * LONG_STREAM, 8);                                        \
            crc = STEP8(crc, a);                                                       \
            c1 = STEP8(c1, b);                                                         \
            c2 = STEP8(c2, c);                                                         \
            p += 8;                                                                    \
        } while (p < end);                                                             \
        crc = shift(shift_long, crc) ^ c1;                                             \
        crc = shift(shift_long, crc) ^ c2;                                             \
        p += 2 * LONG_STREAM;                                                          \
        n -= 3 * LONG_STREAM;                                                          \
    }                                                                                  \
    while (n >= 3 * SHORT_STREAM) {                                                    \
        uint32_t c1 = 0, c2 = 0;                                                       \
        const unsigned char *end = p + SHORT_STREAM;                                   \
        do {                                                                           \
            uint64_t a, b, c;                                                          \
            memcpy(&a, p, 8);                                                          \
            memcpy(&b, p + SHORT_STREAM, 8);                                           \
            memcpy(&c, p + 2 * SHORT_STREAM, 8);                                       \
            crc = STEP8(crc, a);                                                       \
            c1 = STEP8(c1, b);                                                         \
            c2 = STEP8(c2, c);                                                         \
            p += 8;                                                                    \
        } while (p < end);                                                             \
        crc = shift(shift_short, crc) ^ c1;                                            \
        crc = shift(shift_short, crc) ^ c2;                                            \
        p += 2 * SHORT_STREAM;                                                         \
        n -= 3 * SHORT_STREAM;                                                         \
    }                                                                                  \
    while (n >= 8) {                                                                   \
        uint64_t a;                                                                    \
        memcpy(&a, p, 8);                                                              \
        crc = STEP8(crc, a);                                                           \
        p += 8;                                                                        \
        n -= 8;                                                                        \
    }                                                                                  \
    while (n--)                                                                        \
        crc = STEP1(crc, *p++);                                                        \
    return crc;

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_HW 1
#define X86_STEP8(c, v) ((uint32_t)__builtin_ia32_crc32di((c), (v)))
#define X86_STEP1(c, v) __builtin_ia32_crc32qi((c), (v))
__attribute__((target("sse4.2")))
static uint32_t crc_hw(uint32_t crc, const unsigned char *p, size_t n)
{
    CRC_BODY(X86_STEP8, X86_STEP1)
}

static int cpu_has_crc(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.2");
}
#define HW_NAME "sse4.2"

#elif defined(__aarch64__) && defined(__GNUC__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_CRC32
#define HWCAP_CRC32 (1 << 7)
#endif
#define HAVE_HW 1
#define ARM_STEP8(c, v) __builtin_aarch64_crc32cx((c), (v))
#define ARM_STEP1(c, v) __builtin_aarch64_crc32cb((c), (v))
__attribute__((target("+crc")))
static uint32_t crc_hw(uint32_t crc, const unsigned char *p, size_t n)
{
    CRC_BODY(ARM_STEP8, ARM_STEP1)
}

static int cpu_has_crc(void)
{
    return (getauxval(AT_HWCAP) & HWCAP_CRC32) != 0;
}
#define HW_NAME "armv8-crc"
#endif

/* built before any Python code can call in (the extension's load) */
__attribute__((constructor))
static void crc32c_init(void)
{
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t c = b;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? (c >> 1) ^ POLY : c >> 1;
        table[0][b] = c;
    }
    for (uint32_t b = 0; b < 256; b++)
        for (int t = 1; t < 8; t++)
            table[t][b] = (table[t - 1][b] >> 8) ^ table[0][table[t - 1][b] & 0xFF];
    build_shift(shift_long, LONG_STREAM);
    build_shift(shift_short, SHORT_STREAM);
#ifdef HAVE_HW
    if (cpu_has_crc()) {
        use_hw = 1;
        impl_name = HW_NAME;
    }
#endif
}

uint32_t bt_crc32c(uint32_t crc, const void *data, size_t n)
{
    const unsigned char *p = data;
    crc = ~crc;
#ifdef HAVE_HW
    if (use_hw)
        return ~crc_hw(crc, p, n);
#endif
    return ~crc_table(crc, p, n);
}

const char *bt_crc32c_impl(void)
{
    return impl_name;
}

void bt_crc32c_force_table(int on)
{
#ifdef HAVE_HW
    use_hw = on ? 0 : cpu_has_crc();
    impl_name = use_hw ? HW_NAME : "table";
#else
    (void)on;
#endif
}
