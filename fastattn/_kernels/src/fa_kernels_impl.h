/*
 * The kernels for one element type.  fa_kernels.h defines that type's names
 * and includes this file, once per type:
 *
 *   REAL, IREAL        the element type and the integer type of its width
 *   FA(name)           the exported name, fa_<name>_f32 / fa_<name>_f64
 *   FA_LOG2E, FA_EXP_MAGIC, FA_EXP_BIAS, FA_MANT_BITS, FA_EXP2_LO,
 *   FA_EXP2_DEG, FA_EXP2_C
 *                      the constants of the exponential (FA(vexp2))
 *   FA_VMAX, and FA_VREDUCE / FA_VSCALEF where the instruction set has them
 *                      fa_simd.h's instructions at this width
 *
 * The headers below are written in those names only, so an element type
 * joins by defining them once more in fa_kernels.h.  At the end every
 * per-type name is undefined, for the next type to define its own.
 *
 * The tile works on transposed blocks, queries along the vector lanes:
 *   S^T (keys x queries)   = K_block . Q^T          (K read in place)
 *   O^T (Ev x queries)    += V_block^T . P^T        (V read in place)
 * so the online softmax is lane-wise (a running max and sum per query lane,
 * no horizontal reductions) and only Q is packed, once per tile.
 * Buffers in per-thread scratch (Q^T, S^T, O^T, m, l) are FA_ALIGN-aligned
 * with leading dimensions that are multiples of NR; their query columns past
 * the real ones are zero-padded and never stored.
 */

#include "fa_vec.h"     /* vector types and primitives, exp, transpose, array loops */
#include "fa_gemm.h"    /* GEMM micro-kernel, packing, row-path products, projections */
#include "fa_mask.h"    /* masks, bands, ALiBi, non-finite value rows */
#include "fa_softmax.h" /* the softmax rule and its four kernels, finalize */

#undef VEC
#undef IVEC
#undef VLEN
#undef NR

#undef REAL
#undef IREAL
#undef FA
#undef FA_LOG2E
#undef FA_EXP_MAGIC
#undef FA_VMAX
#undef FA_ANY_LANE
#undef FA_VREDUCE
#undef FA_VSCALEF
#undef FA_EXP_BIAS
#undef FA_MANT_BITS
#undef FA_EXP2_LO
#undef FA_EXP2_DEG
#undef FA_EXP2_C
#undef FA_TANH_SMALL
#undef FA_TANH_DEG
#undef FA_TANH_C
