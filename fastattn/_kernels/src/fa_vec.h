/*
 * Vector primitives for one element type (see fa_kernels_impl.h for how the
 * per-type names REAL, IREAL, FA() and FA_* come in): the vector types,
 * splat / select / max / horizontal reductions, the exponential, the
 * in-register block transpose, and the plain array loops the drivers use.
 * No include guard: included once per element type.
 */

#define VLEN ((int64_t)(FA_VBYTES / sizeof(REAL)))
#define NR (FA_NV * VLEN)

typedef REAL FA(vec) __attribute__((vector_size(FA_VBYTES)));
typedef REAL FA(uvec) __attribute__((vector_size(FA_VBYTES), aligned(sizeof(REAL))));
typedef IREAL FA(ivec) __attribute__((vector_size(FA_VBYTES)));

#define VEC FA(vec)
#define IVEC FA(ivec)

/* The drivers size scratch in whole micro-tiles: columns in multiples of NR,
 * rows in multiples of FA_MR. */
static inline int64_t FA(col_align)(void) { return NR; }
static inline int64_t FA(row_align)(void) { return FA_MR; }

/* Broadcast; GCC and clang turn a scalar operand of a vector operation into
 * a splat (x - 0 is exact, signed zeros included). */
static inline VEC FA(vsplat)(REAL x) { return x - (VEC){0}; }

/* Lane-wise a if mask else b; mask lanes are all-ones or all-zeros. */
static inline VEC FA(vselect)(IVEC mask, VEC a, VEC b) {
    return (VEC)((mask & (IVEC)a) | (~mask & (IVEC)b));
}

/* Lane-wise max(a, b); where a lane of b is NaN the result is NaN, where
 * only a's is, the result may drop it (the softmax lets NaN reach the output
 * through the exponentials instead, see fa_softmax.h). */
static inline VEC FA(vmax)(VEC a, VEC b) {
#if defined(FA_MAX_PS)
    return FA_VMAX(a, b);
#else
    return FA(vselect)((b > a) | (b != b), b, a);
#endif
}

/* Scalar max that lets a NaN in either operand through (as numpy's max does). */
static inline REAL FA(smax)(REAL x, REAL m) { return (x > m || x != x) ? x : m; }

static inline REAL FA(hmax)(VEC v) {
    REAL m = v[0];
    for (int64_t i = 1; i < VLEN; i++) m = FA(smax)(v[i], m);
    return m;
}

/* Whether any lane of a comparison's mask is set: one instruction where the
 * ISA has a lane test, else a loop over the lanes. */
static inline int FA(any)(IVEC mask) {
#if defined(FA_ANY_LANE)
    return FA_ANY_LANE(mask);
#else
    IREAL acc = 0;
    for (int64_t i = 0; i < VLEN; i++) acc |= mask[i];
    return acc != 0;
#endif
}

static inline REAL FA(hsum)(VEC v) {
    REAL s = 0;
    for (int64_t i = 0; i < VLEN; i++) s += v[i];
    return s;
}

/*
 * 2^y lane-wise for y <= 0: no range reduction to do (r = y - round(y) is
 * exact), a polynomial for 2^r, and 2^n assembled in the exponent bits.
 * Clamping at FA_EXP2_LO makes the assembled 2^n exactly 0, so 2^-inf == 0
 * with no select; NaN stays NaN.  Relative error ~1 ulp in float and double.
 */
static inline VEC FA(vexp2)(VEC y) {
#if defined(FA_VREDUCE)
    /* AVX-512: the reduction and the scaling by 2^n are an instruction each,
     * and both handle y = -inf (r = 0, 2^-inf = 0): no clamp, no integer
     * work, 3 fewer operations per vector on the pipes the products need.
     * Unlike the path below, y just under the exponent range (-150 < y <=
     * -127 in float) gives denormals rather than 0: weights below 2^-126 of
     * the row's largest, the same to within 1e-38 */
    VEC r = FA_VREDUCE(y);
    VEC p = FA(vsplat)(FA_EXP2_C[FA_EXP2_DEG]);
    for (int d = FA_EXP2_DEG - 1; d >= 0; d--) p = p * r + FA(vsplat)(FA_EXP2_C[d]);
    return FA_VSCALEF(p, y - r);
#else
    VEC yc = FA(vmax)(FA(vsplat)(FA_EXP2_LO), y);
    const VEC magic = FA(vsplat)(FA_EXP_MAGIC);
    VEC t = yc + magic;
    VEC r = yc - (t - magic);
    IVEC n = (IVEC)t - (IVEC)magic;
    VEC p = FA(vsplat)(FA_EXP2_C[FA_EXP2_DEG]);
    for (int d = FA_EXP2_DEG - 1; d >= 0; d--) p = p * r + FA(vsplat)(FA_EXP2_C[d]);
    IVEC bits = (n + (IREAL)FA_EXP_BIAS) << FA_MANT_BITS;
    return p * (VEC)bits;
#endif
}

/*
 * exp(x) lane-wise for x <= 0 (the softmax only exponentiates score - max),
 * as 2^(x log2 e): x = s - m is exact where it matters (s near m) and the
 * product adds one relative rounding, so this is as accurate as a
 * Cody-Waite exp, while the FMA pipes (which the score and output GEMMs need
 * too) see eight operations per vector instead of eleven.
 */
static inline VEC FA(vexp)(VEC x) { return FA(vexp2)(x * FA(vsplat)(FA_LOG2E)); }



/*
 * Logit soft-capping, lane-wise: cap * tanh(x / cap), with inv = 1 / cap.
 * With a = |x| / cap: for a >= FA_TANH_SMALL, tanh(a) = (1 - e) / (1 + e),
 * e = exp(-2a) <= 1 (FA(vexp2) on the side it serves), whose absolute error
 * of a few ulp of 1 is a small relative error there; below it, where 1 - e
 * would cancel, the odd Taylor series a + a^3 P(a^2) (FA_TANH_C), accurate
 * to the type's precision, so a cap far above the scores leaves them as they
 * are.  The side is chosen for a whole block of vectors (FA(cap_side) over
 * the block's FA(cap_span)): one horizontal reduction per block, and a
 * block on one side computes that side only (at the caps models use, most
 * scores lie within half the cap), a mixed block both.  The sign is put
 * back by its bit; -inf and +inf give -cap and cap, NaN stays NaN.
 * Callers pass their vectors by value, so that accumulators stay in
 * registers.
 */
static inline VEC FA(cap_abs)(VEC x, VEC inv) {
    return (VEC)((IVEC)x & ~(IVEC)FA(vsplat)((REAL)-0.0)) * inv;
}

/* some_small and all_small gather, lane-wise, whether a = |x| / cap lies
 * below FA_TANH_SMALL in some or in every vector of a block. */
static inline void FA(cap_span)(VEC x, VEC inv, IVEC *some_small, IVEC *all_small) {
    IVEC small = FA(cap_abs)(x, inv) < FA(vsplat)(FA_TANH_SMALL);
    *some_small |= small;
    *all_small &= small;
}

/* Which sides such a block needs: 1 bit for the series, 2 for the exponential. */
static inline int FA(cap_side)(IVEC some_small, IVEC all_small) {
    return (FA(any)(some_small) ? 1 : 0) | (FA(any)(~all_small) ? 2 : 0);
}

static inline VEC FA(vcap)(VEC x, VEC inv, VEC cap, int side) {
    /* (a NaN lane is neither small nor large: either side keeps it NaN) */
    const IVEC sign_bit = (IVEC)FA(vsplat)((REAL)-0.0);
    IVEC sign = (IVEC)x & sign_bit;
    VEC a = FA(cap_abs)(x, inv), y = a;
    if (side & 2) {
        const VEC one = FA(vsplat)(1);
        VEC e = FA(vexp2)(a * FA(vsplat)((REAL)(-2.0 * 1.4426950408889634)));
        y = (one - e) / (one + e);
    }
    if (side & 1) {
        VEC a2 = a * a, p = FA(vsplat)(FA_TANH_C[FA_TANH_DEG]);
        for (int d = FA_TANH_DEG - 1; d >= 0; d--) p = p * a2 + FA(vsplat)(FA_TANH_C[d]);
        VEC s = a + a * a2 * p;
        y = side & 2 ? FA(vselect)(a < FA(vsplat)(FA_TANH_SMALL), s, y) : s;
    }
    return (VEC)((IVEC)(y * cap) ^ sign);
}

#if FA_BLOCK_TRANSPOSE
/*
 * Transposes a VLEN x VLEN block held in v[0..VLEN) (row r in v[r]) in
 * registers: log2(VLEN) rounds, each swapping the off-diagonal b x b
 * sub-blocks of every 2b x 2b block with one two-source shuffle per row.
 * That is VLEN log2 VLEN shuffles instead of VLEN^2 scalar moves, which
 * matters because Q is transposed in and O out once per tile, a fixed cost
 * that short sequences do not amortise.
 */
static inline void FA(transpose_block)(VEC *v) {
    static const IREAL iota[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    IVEC idx;
    memcpy(&idx, iota, sizeof idx);
    /* fully unrolled, so the block stays in registers and the masks fold to constants */
#pragma GCC unroll 16
    for (int64_t b = 1; b < VLEN; b *= 2) {
        /* new row r: lanes c with (c & b) == 0 from row r, else lane c-b of row r+b;
         * new row r+b: lanes c with (c & b) == 0 from lane c+b of row r, else row r+b */
        IVEC odd = (idx & (IREAL)b) != 0;
        IVEC lo = idx + (odd & (IREAL)(VLEN - b));
        IVEC hi = idx + (IREAL)b + (odd & (IREAL)(VLEN - b));
#pragma GCC unroll 16
        for (int64_t r = 0; r < VLEN; r++) {
            if (r & b) continue;
            VEC x = v[r], y = v[r + b];
            v[r] = __builtin_shuffle(x, y, lo);
            v[r + b] = __builtin_shuffle(x, y, hi);
        }
    }
}

/* blk[c] = column c of the VLEN x VLEN block at src (rows rs apart, any
 * alignment): a block read row by row and transposed in registers. */
static inline void FA(load_transposed)(VEC *blk, const REAL *restrict src, int64_t rs) {
    typedef FA(uvec) UVEC;
#pragma GCC unroll 16
    for (int64_t r = 0; r < VLEN; r++) blk[r] = *(const UVEC *)(src + r * rs);
    FA(transpose_block)(blk);
}
#endif

/* ---- array loops ---- */

/* dst[0:n] += src[0:n].  The output accumulators take each block of keys as
 * a separately summed partial: a running sum fed one product at a time would
 * round once per key (error growing with the sequence length, ~Lk * eps at
 * worst); block by block it grows with block_k + Lk / block_k. */
static void FA(add_into)(REAL *restrict dst, const REAL *restrict src, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] += src[i];
}

/* dst(r, c) = src(r, c) through strides, r < rows, c < cols. */
static void FA(copy_strided)(REAL *restrict dst, int64_t d_rs, int64_t d_cs,
                             const REAL *restrict src, int64_t s_rs, int64_t s_cs, int64_t rows,
                             int64_t cols) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) dst[r * d_rs + c * d_cs] = src[r * s_rs + c * s_cs];
}
