/*
 * Vector width and register-tile shape, chosen from the instruction set the
 * translation unit is compiled for.  The same kernel source is compiled once
 * per instruction set (see setup.py) and the Python side loads the widest
 * build the CPU supports, so nothing here may depend on -march=native.
 */
#ifndef FA_SIMD_H
#define FA_SIMD_H

#include <stdint.h>

#if !(defined(__GNUC__) || defined(__clang__))
#error "fastattn kernels need GCC-style vector extensions (gcc or clang)"
#endif

#if defined(__AVX512F__)
#define FA_VBYTES 64
#define FA_MR 8 /* 8 rows x 2 vectors = 16 of the 32 zmm registers */
#if defined(__AVX512BF16__)
#define FA_ISA_NAME "avx512bf16"
#else
#define FA_ISA_NAME "avx512"
#endif
#elif defined(__AVX2__) && defined(__FMA__)
#define FA_VBYTES 32
#define FA_MR 6 /* 6 x 2 = 12 of the 16 ymm registers, BLIS's AVX2 micro-tile */
#define FA_ISA_NAME "avx2"
#else
#define FA_VBYTES 16
#define FA_MR 4 /* 4 x 2 = 8 of the 16 xmm registers */
#define FA_ISA_NAME "baseline"
#endif

/* Lane-wise max in one instruction where there is one.  Operand order
 * matters for NaN: x86 max returns its second operand when either is NaN. */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#if FA_VBYTES == 64
#define FA_MAX_PS(a, b) ((__typeof__(a))_mm512_max_ps((__m512)(a), (__m512)(b)))
#define FA_MAX_PD(a, b) ((__typeof__(a))_mm512_max_pd((__m512d)(a), (__m512d)(b)))
/* any lane of a mask set (all-ones or all-zeros lanes): a test into a k-mask */
#define FA_ANY_PS(m) (_mm512_test_epi32_mask((__m512i)(m), (__m512i)(m)) != 0)
#define FA_ANY_PD(m) (_mm512_test_epi64_mask((__m512i)(m), (__m512i)(m)) != 0)
#if defined(__AVX512DQ__)
/* y - round(y) in one instruction (AVX512DQ; imm8 0: no fraction bits kept,
 * round to nearest even; an infinite y gives 0), and a * 2^floor(b) (AVX512F;
 * b = -inf gives 0, underflow rounds to denormals and 0).  Without DQ the
 * exponential keeps its portable form. */
#define FA_REDUCE_PS(y) ((__typeof__(y))_mm512_reduce_ps((__m512)(y), 0))
#define FA_REDUCE_PD(y) ((__typeof__(y))_mm512_reduce_pd((__m512d)(y), 0))
#define FA_SCALEF_PS(a, b) ((__typeof__(a))_mm512_scalef_ps((__m512)(a), (__m512)(b)))
#define FA_SCALEF_PD(a, b) ((__typeof__(a))_mm512_scalef_pd((__m512d)(a), (__m512d)(b)))
#endif
#elif FA_VBYTES == 32
#define FA_MAX_PS(a, b) ((__typeof__(a))_mm256_max_ps((__m256)(a), (__m256)(b)))
#define FA_MAX_PD(a, b) ((__typeof__(a))_mm256_max_pd((__m256d)(a), (__m256d)(b)))
#define FA_ANY_PS(m) (_mm256_movemask_ps((__m256)(m)) != 0)
#define FA_ANY_PD(m) (_mm256_movemask_pd((__m256d)(m)) != 0)
#else
#define FA_MAX_PS(a, b) ((__typeof__(a))_mm_max_ps((__m128)(a), (__m128)(b)))
#define FA_MAX_PD(a, b) ((__typeof__(a))_mm_max_pd((__m128d)(a), (__m128d)(b)))
#define FA_ANY_PS(m) (_mm_movemask_ps((__m128)(m)) != 0)
#define FA_ANY_PD(m) (_mm_movemask_pd((__m128d)(m)) != 0)
#endif
#endif

/* GCC's two-source __builtin_shuffle makes the in-register block transposes
 * (FA(transpose_block)); clang has no such builtin (and its shufflevector
 * wants literal indices), so a clang build transposes element by element, as
 * the edges of a block do. */
#if defined(__clang__)
#define FA_BLOCK_TRANSPOSE 0
#else
#define FA_BLOCK_TRANSPOSE 1
#endif

/* Vectors per micro-tile row: two, so loads of B overlap with the FMAs. */
#define FA_NV 2

#endif
