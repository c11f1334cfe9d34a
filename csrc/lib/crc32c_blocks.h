/* crc32c (Castagnoli) of every block of a buffer: the SSE4.2 `crc32` instruction where the CPU
 * has it (compiled with a target attribute, chosen at run time), a slicing-by-8 table otherwise.
 * Header-only because setup.py compiles one .pyx per extension.
 *
 * The instruction has a 3-cycle latency and a throughput of one per cycle, so three independent
 * chains keep it busy: three whole blocks at once, and a block left over split in three parts.
 *
 * Every function here works on the "raw" register: no inversion on entry or exit. The
 * standard crc32c of a message is ~raw(~0, message).
 *
 * Splitting: for a message A|B|C with |B| = |C| = s, raw(x, A|B|C) = Z(Z(raw(x, A)) ^
 * raw(0, B)) ^ raw(0, C), where Z is the linear map "feed s zero bytes". Z is a 32x32 matrix
 * over GF(2), built by repeated squaring and applied through four 256-entry byte tables.
 */
#ifndef SHADOWBLK_CRC32C_BLOCKS_H
#define SHADOWBLK_CRC32C_BLOCKS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <nmmintrin.h>
#define CRC32C_X86 1
#endif

#define CRC32C_POLY 0x82F63B78u /* reflected Castagnoli polynomial */

static uint32_t crc32c_table[8][256];

/* Fill the slicing-by-8 tables; call once before anything else (at module import). */
static void crc32c_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (CRC32C_POLY & (0u - (c & 1u)));
        crc32c_table[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++)
        for (int k = 1; k < 8; k++)
            crc32c_table[k][n] =
                (crc32c_table[k - 1][n] >> 8) ^ crc32c_table[0][crc32c_table[k - 1][n] & 0xff];
}

static inline uint64_t crc32c_load64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, 8); /* unaligned-safe; a plain load on x86 */
    return v;
}

/* Software raw update, eight bytes per step (byte by byte on big-endian hosts). */
static uint32_t crc32c_sw(uint32_t crc, const unsigned char *p, size_t n)
{
    while (__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ && n >= 8) {
        uint64_t v = crc32c_load64(p) ^ crc;
        crc = crc32c_table[7][v & 0xff] ^ crc32c_table[6][(v >> 8) & 0xff] ^
              crc32c_table[5][(v >> 16) & 0xff] ^ crc32c_table[4][(v >> 24) & 0xff] ^
              crc32c_table[3][(v >> 32) & 0xff] ^ crc32c_table[2][(v >> 40) & 0xff] ^
              crc32c_table[1][(v >> 48) & 0xff] ^ crc32c_table[0][v >> 56];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = crc32c_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return crc;
}

/* --- feeding zeros as a linear map -------------------------------------------------------- */

typedef struct {
    uint32_t byte[4][256]; /* byte[k][b] = Z(b << 8k) */
} crc32c_shift_t;

static uint32_t crc32c_gf2_apply(const uint32_t mat[32], uint32_t v)
{
    uint32_t r = 0;
    for (int i = 0; v; i++, v >>= 1)
        if (v & 1u)
            r ^= mat[i];
    return r;
}

/* dst = a after b (dst may not alias a or b). */
static void crc32c_gf2_compose(uint32_t dst[32], const uint32_t a[32], const uint32_t b[32])
{
    for (int i = 0; i < 32; i++)
        dst[i] = crc32c_gf2_apply(a, b[i]);
}

/* The operator "feed nbytes zero bytes" as byte tables. */
static void crc32c_shift_make(crc32c_shift_t *op, size_t nbytes)
{
    uint32_t power[32], result[32], tmp[32];
    /* power = one zero bit: bit 0 folds in the polynomial, bit i moves to i - 1 */
    power[0] = CRC32C_POLY;
    for (int i = 1; i < 32; i++)
        power[i] = 1u << (i - 1);
    for (int k = 0; k < 3; k++) { /* one bit -> one byte */
        crc32c_gf2_compose(tmp, power, power);
        memcpy(power, tmp, sizeof(tmp));
    }
    for (int i = 0; i < 32; i++)
        result[i] = 1u << i; /* identity */
    while (nbytes) {
        if (nbytes & 1) {
            crc32c_gf2_compose(tmp, power, result);
            memcpy(result, tmp, sizeof(tmp));
        }
        nbytes >>= 1;
        if (nbytes) {
            crc32c_gf2_compose(tmp, power, power);
            memcpy(power, tmp, sizeof(tmp));
        }
    }
    for (int k = 0; k < 4; k++)
        for (uint32_t b = 0; b < 256; b++)
            op->byte[k][b] = crc32c_gf2_apply(result, b << (8 * k));
}

static inline uint32_t crc32c_shift(const crc32c_shift_t *op, uint32_t c)
{
    return op->byte[0][c & 0xff] ^ op->byte[1][(c >> 8) & 0xff] ^ op->byte[2][(c >> 16) & 0xff] ^
           op->byte[3][c >> 24];
}

/* --- hardware ----------------------------------------------------------------------------- */

#ifdef CRC32C_X86
static int crc32c_hw_available(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.2");
}

__attribute__((target("sse4.2"))) static uint32_t crc32c_hw_serial(uint32_t crc,
                                                                  const unsigned char *p, size_t n)
{
#ifdef __x86_64__
    uint64_t c = crc;
    for (; n >= 8; p += 8, n -= 8)
        c = _mm_crc32_u64(c, crc32c_load64(p));
    crc = (uint32_t)c;
#endif
    for (; n >= 4; p += 4, n -= 4) {
        uint32_t v;
        memcpy(&v, p, 4);
        crc = _mm_crc32_u32(crc, v);
    }
    while (n--)
        crc = _mm_crc32_u8(crc, *p++);
    return crc;
}

/* raw(crc, p[0..n)) with three interleaved streams of `part` bytes (a multiple of 8), then the
 * tail serially; op feeds `part` zero bytes. */
__attribute__((target("sse4.2"))) static uint32_t crc32c_hw_3way(uint32_t crc,
                                                                const unsigned char *p, size_t n,
                                                                size_t part,
                                                                const crc32c_shift_t *op)
{
#ifdef __x86_64__
    uint64_t c0 = crc, c1 = 0, c2 = 0;
    const unsigned char *a = p, *b = p + part, *c = p + 2 * part;
    for (size_t i = 0; i < part; i += 8) {
        c0 = _mm_crc32_u64(c0, crc32c_load64(a + i));
        c1 = _mm_crc32_u64(c1, crc32c_load64(b + i));
        c2 = _mm_crc32_u64(c2, crc32c_load64(c + i));
    }
    crc = crc32c_shift(op, crc32c_shift(op, (uint32_t)c0) ^ (uint32_t)c1) ^ (uint32_t)c2;
    return crc32c_hw_serial(crc, p + 3 * part, n - 3 * part);
#else
    (void)part;
    (void)op;
    return crc32c_hw_serial(crc, p, n);
#endif
}

/* raw(~0, ...) of three consecutive blocks of n bytes at once: three independent streams, no
 * combining needed. */
__attribute__((target("sse4.2"))) static void crc32c_hw_3blocks(const unsigned char *p, size_t n,
                                                                 uint32_t out[3])
{
#ifdef __x86_64__
    uint64_t c0 = 0xffffffffu, c1 = 0xffffffffu, c2 = 0xffffffffu;
    const unsigned char *a = p, *b = p + n, *c = p + 2 * n;
    size_t words = n & ~(size_t)7;
    for (size_t i = 0; i < words; i += 8) {
        c0 = _mm_crc32_u64(c0, crc32c_load64(a + i));
        c1 = _mm_crc32_u64(c1, crc32c_load64(b + i));
        c2 = _mm_crc32_u64(c2, crc32c_load64(c + i));
    }
    out[0] = crc32c_hw_serial((uint32_t)c0, a + words, n - words);
    out[1] = crc32c_hw_serial((uint32_t)c1, b + words, n - words);
    out[2] = crc32c_hw_serial((uint32_t)c2, c + words, n - words);
#else
    for (int k = 0; k < 3; k++)
        out[k] = crc32c_hw_serial(~0u, p + k * n, n);
#endif
}
#else
static int crc32c_hw_available(void) { return 0; }
#endif

/* --- blocks ------------------------------------------------------------------------------- */

#define CRC32C_MIN_PART 64 /* below three streams of this, interleaving does not pay */

/* The part length a block of n bytes is split into three streams of (0: no interleaving). */
static size_t crc32c_part(size_t n)
{
    size_t part = (n / 3) & ~(size_t)7;
    return part >= CRC32C_MIN_PART ? part : 0;
}

/* raw(~0, p[0..n)) in hardware, one block split in three streams; op feeds crc32c_part(n) zero
 * bytes. */
static uint32_t crc32c_hw_block(const unsigned char *p, size_t n, const crc32c_shift_t *op)
{
#ifdef CRC32C_X86
    size_t part = crc32c_part(n);
    return part ? crc32c_hw_3way(~0u, p, n, part, op) : crc32c_hw_serial(~0u, p, n);
#else
    (void)op;
    return crc32c_sw(~0u, p, n); /* not reached: crc32c_hw_available() is 0 */
#endif
}

/* The standard crc32c of each `block`-byte piece of buf[0..len) into out (the last piece may be
 * shorter). In hardware, three whole blocks go at once; a lone block is split in three, with
 * `full` shifting by crc32c_part(block) (callers cache it) and `scratch` filled for a short
 * last piece. */
static void crc32c_blocks(const unsigned char *buf, size_t len, size_t block, uint32_t *out, int hw,
                          const crc32c_shift_t *full, crc32c_shift_t *scratch)
{
    size_t i = 0;
#ifdef CRC32C_X86
    for (; hw && len >= 3 * block; i += 3, buf += 3 * block, len -= 3 * block) {
        crc32c_hw_3blocks(buf, block, out + i);
        out[i] = ~out[i];
        out[i + 1] = ~out[i + 1];
        out[i + 2] = ~out[i + 2];
    }
#endif
    for (; len; i++) {
        size_t n = len < block ? len : block;
        if (!hw) {
            out[i] = ~crc32c_sw(~0u, buf, n);
        } else if (n == block) {
            out[i] = ~crc32c_hw_block(buf, n, full);
        } else {
            if (crc32c_part(n))
                crc32c_shift_make(scratch, crc32c_part(n));
            out[i] = ~crc32c_hw_block(buf, n, scratch);
        }
        buf += n;
        len -= n;
    }
}

#endif
