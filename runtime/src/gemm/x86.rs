//! x86-64 microkernels: SSE2 (x86-64's baseline; 6 × 8 tiles, multiply then add), AVX2 + FMA
//! (6 × 16 tiles, 12 of the 16 ymm registers accumulate) and AVX-512 (8 × 32 tiles, 16 of the 32
//! zmm registers accumulate). One macro writes all three, so the AVX-512 kernel — which cannot
//! run on an AVX2-only machine — has exactly the structure of the ones the tests run everywhere.
//!
//! Per depth step a tile loads two vectors of the packed panel, broadcasts one element of each
//! of its rows of `A` and issues two FMAs per row. Full tiles apply the epilogue on the vectors;
//! tiles with fewer than `NR` valid columns go through a scalar store of the same arithmetic.

use super::tile::Tile;

macro_rules! microkernel {
    (
        $module:ident, $feature:literal, $lanes:expr, $mr:expr, $vec:ty,
        zero = $zero:ident, load = $load:ident, store = $store:ident, splat = $splat:ident,
        fma = $fma:ident, add = $add:ident, mul = $mul:ident
    ) => {
        pub mod $module {
            #[allow(unused_imports)]
            use super::{sse_mul_add, Tile};
            use std::arch::x86_64::*;

            /// Rows per tile.
            pub const MR: usize = $mr;
            /// Columns per packed panel.
            pub const NR: usize = 2 * $lanes;
            const L: usize = $lanes;

            /// Runs one tile of `rows` (1..=MR) rows.
            ///
            /// # Safety
            /// The CPU has the kernel's features; the tile's pointers are valid for `rows` rows.
            pub unsafe fn run(rows: usize, t: &Tile) {
                dispatch_rows!(rows, t)
            }

            #[target_feature(enable = $feature)]
            pub(super) unsafe fn tile<const R: usize>(t: &Tile) {
                let mut acc = [[$zero(); 2]; R];
                let (mut a, mut b) = (t.a, t.b);
                for _ in 0..t.kc {
                    let b0 = $load(b);
                    let b1 = $load(b.add(L));
                    for (r, row) in acc.iter_mut().enumerate() {
                        let x = $splat(*a.add(r * t.lda));
                        row[0] = $fma(x, b0, row[0]);
                        row[1] = $fma(x, b1, row[1]);
                    }
                    a = a.add(1);
                    b = b.add(NR);
                }
                if t.cols < NR {
                    let mut tmp = [0f32; NR * MR];
                    for (r, row) in acc.iter().enumerate() {
                        $store(tmp.as_mut_ptr().add(r * NR), row[0]);
                        $store(tmp.as_mut_ptr().add(r * NR + L), row[1]);
                    }
                    t.store_scalar(R, NR, &tmp);
                    return;
                }
                let scale = $splat(t.scale);
                for (r, row) in acc.iter().enumerate() {
                    for (h, v) in row.iter().enumerate() {
                        let c = t.c.add(r * t.ldc + h * L);
                        let mut v = *v;
                        if t.load_c {
                            v = $add(v, $load(c));
                        }
                        if t.last {
                            v = $mul(v, scale);
                            if !t.bias.is_null() {
                                v = $add(v, $load(t.bias.add(h * L)));
                            }
                            if !t.res.is_null() {
                                v = $add(v, $load(t.res.add(r * t.ldc + h * L)));
                            }
                        }
                        $store(c, v);
                    }
                }
            }
        }
    };
}

/// Dispatches a runtime row count to the const-generic tile of that many rows.
macro_rules! dispatch_rows {
    ($rows:expr, $t:expr) => {
        match $rows {
            1 => tile::<1>($t),
            2 => tile::<2>($t),
            3 => tile::<3>($t),
            4 => tile::<4>($t),
            5 => tile::<5>($t),
            6 if MR >= 6 => tile::<6>($t),
            7 if MR >= 7 => tile::<7>($t),
            _ => tile::<MR>($t),
        }
    };
}

/// `a · b + c` in two SSE instructions (SSE has no FMA).
///
/// # Safety
/// None beyond SSE2, which every x86-64 CPU has.
#[inline(always)]
unsafe fn sse_mul_add(
    a: std::arch::x86_64::__m128,
    b: std::arch::x86_64::__m128,
    c: std::arch::x86_64::__m128,
) -> std::arch::x86_64::__m128 {
    use std::arch::x86_64::*;
    _mm_add_ps(_mm_mul_ps(a, b), c)
}

// SAFETY (all): the unaligned loads and stores read and write inside the tile, as `Tile`
// describes; `run` is only called once the CPU level has the features.
microkernel!(
    sse,
    "sse2",
    4,
    6,
    __m128,
    zero = _mm_setzero_ps,
    load = _mm_loadu_ps,
    store = _mm_storeu_ps,
    splat = _mm_set1_ps,
    fma = sse_mul_add,
    add = _mm_add_ps,
    mul = _mm_mul_ps
);

microkernel!(
    avx2,
    "avx2,fma",
    8,
    6,
    __m256,
    zero = _mm256_setzero_ps,
    load = _mm256_loadu_ps,
    store = _mm256_storeu_ps,
    splat = _mm256_set1_ps,
    fma = _mm256_fmadd_ps,
    add = _mm256_add_ps,
    mul = _mm256_mul_ps
);

microkernel!(
    avx512,
    "avx512f",
    16,
    8,
    __m512,
    zero = _mm512_setzero_ps,
    load = _mm512_loadu_ps,
    store = _mm512_storeu_ps,
    splat = _mm512_set1_ps,
    fma = _mm512_fmadd_ps,
    add = _mm512_add_ps,
    mul = _mm512_mul_ps
);
