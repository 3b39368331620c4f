//! Softmax rows at the CPU level's full vector width: the row maximum and `x ← exp(x − shift)`
//! with its sum, the two sweeps of attention's online softmax (`attention.rs`).
//!
//! Cranelift's x64 backend emits 128-bit vectors only, so the generated softmax kernels run at
//! half (AVX2) or a quarter (AVX-512) of what the CPU offers; these run at the level's width. `exp`
//! is the generated kernels' algorithm (round `x·log2 e` with the 1.5·2²³ trick, Taylor series to
//! degree 7 on |r| ≤ ln 2 / 2, zero below −87), so every level computes the same function; the
//! code generator builds its exp from the constants here. One
//! macro writes the AVX2 and AVX-512 versions, so the AVX-512 one — which an AVX2-only machine
//! cannot run — has exactly the structure of the one the tests run.

use crate::cpu::Level;

/// log2(e).
pub const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// 1.5 · 2²³: adding it rounds an f32 of magnitude < 2²² to an integer.
pub const MAGIC: f32 = 12_582_912.0;
/// -ln 2 in two parts (Cody-Waite): the high part, exact in a product with small integers.
pub const LN2_HI: f32 = -0.693_145_75;
/// -ln 2, the low part.
pub const LN2_LO: f32 = -1.428_606_8e-6;
/// e^r's Taylor coefficients, highest degree first.
pub const TAYLOR: [f32; 8] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];
/// Below this, e^x is flushed to zero.
pub const UNDER: f32 = -87.0;
/// Above this, the argument is clamped (e^88 is near the largest f32).
pub const OVER: f32 = 88.0;
/// `MAGIC`'s bits less the exponent bias: subtracted from a rounded value's bits, leaves `n + 127`.
pub const EXP_BIAS_BITS: i32 = 0x4B40_0000 - 127;

/// e^x, as the vector versions compute it lane by lane.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    if x < UNDER {
        return 0.0;
    }
    let x = x.min(OVER);
    let t = x * LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = n * LN2_LO + (n * LN2_HI + x);
    let p = TAYLOR[1..].iter().fold(TAYLOR[0], |p, c| p * r + c);
    let e = (t.to_bits() as i32).wrapping_sub(EXP_BIAS_BITS) << 23;
    p * f32::from_bits(e as u32)
}

/// The largest element (−∞ for an empty row).
pub(crate) fn max(x: &[f32], level: Level) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the artifact's level has the features (checked at load).
        if level.avx512() {
            return unsafe { x86::avx512::max(x) };
        }
        if level.avx2() {
            return unsafe { x86::avx2::max(x) };
        }
    }
    let _ = level;
    x.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v))
}

/// `x ← e^(x − shift)` element by element; returns the new elements' sum.
pub(crate) fn exp_sum(x: &mut [f32], shift: f32, level: Level) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: as in `max`.
        if level.avx512() {
            return unsafe { x86::avx512::exp_sum(x, shift) };
        }
        if level.avx2() {
            return unsafe { x86::avx2::exp_sum(x, shift) };
        }
    }
    let _ = level;
    x.iter_mut().fold(0.0, |s, v| {
        *v = exp(*v - shift);
        s + *v
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    macro_rules! rows {
        (
            $module:ident, $feature:literal, $lanes:expr, $vec:ty,
            load = $load:ident, store = $store:ident, splat = $splat:ident, fma = $fma:ident,
            add = $add:ident, sub = $sub:ident, mul = $mul:ident, max = $max:ident, min = $min:ident,
            to_int = $to_int:ident, from_int = $from_int:ident, isub = $isub:ident, shl = $shl:ident,
            isplat = $isplat:ident, flush = $flush:path, hmax = $hmax:path, hsum = $hsum:path
        ) => {
            pub mod $module {
                use super::super::*;
                #[allow(unused_imports)]
                use super::*;

                const L: usize = $lanes;

                #[target_feature(enable = $feature)]
                unsafe fn exp_v(x: $vec) -> $vec {
                    let lo = $splat(UNDER);
                    let y = $min($max(x, lo), $splat(OVER));
                    let t = $fma(y, $splat(LOG2_E), $splat(MAGIC));
                    let n = $sub(t, $splat(MAGIC));
                    let r = $fma(n, $splat(LN2_HI), y);
                    let r = $fma(n, $splat(LN2_LO), r);
                    let mut p = $splat(TAYLOR[0]);
                    for c in &TAYLOR[1..] {
                        p = $fma(p, r, $splat(*c));
                    }
                    let e = $shl::<23>($isub($to_int(t), $isplat(EXP_BIAS_BITS)));
                    $flush(x, lo, $mul(p, $from_int(e)))
                }

                /// # Safety
                /// The CPU has the module's features.
                #[target_feature(enable = $feature)]
                pub unsafe fn max(x: &[f32]) -> f32 {
                    let (n, p) = (x.len(), x.as_ptr());
                    let mut m = $splat(f32::NEG_INFINITY);
                    let mut i = 0;
                    while i + L <= n {
                        m = $max(m, $load(p.add(i)));
                        i += L;
                    }
                    x[i..].iter().fold($hmax(m), |m, v| m.max(*v))
                }

                /// # Safety
                /// The CPU has the module's features.
                #[target_feature(enable = $feature)]
                pub unsafe fn exp_sum(x: &mut [f32], shift: f32) -> f32 {
                    let (n, p) = (x.len(), x.as_mut_ptr());
                    let (s, mut acc) = ($splat(shift), $splat(0.0));
                    let mut i = 0;
                    while i + L <= n {
                        let e = exp_v($sub($load(p.add(i)), s));
                        $store(p.add(i), e);
                        acc = $add(acc, e);
                        i += L;
                    }
                    x[i..].iter_mut().fold($hsum(acc), |t, v| {
                        *v = exp(*v - shift);
                        t + *v
                    })
                }
            }
        };
    }

    /// `res` where `x >= lo`, zero elsewhere.
    #[target_feature(enable = "avx2")]
    unsafe fn flush256(x: __m256, lo: __m256, res: __m256) -> __m256 {
        _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(x, lo), res)
    }

    #[target_feature(enable = "avx2")]
    unsafe fn hmax256(v: __m256) -> f32 {
        let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)))
    }

    #[target_feature(enable = "avx2")]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }

    /// `res` where `x >= lo`, zero elsewhere.
    #[target_feature(enable = "avx512f")]
    unsafe fn flush512(x: __m512, lo: __m512, res: __m512) -> __m512 {
        _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, lo), res)
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn hmax512(v: __m512) -> f32 {
        _mm512_reduce_max_ps(v)
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn hsum512(v: __m512) -> f32 {
        _mm512_reduce_add_ps(v)
    }

    rows!(
        avx2,
        "avx2,fma",
        8,
        __m256,
        load = _mm256_loadu_ps,
        store = _mm256_storeu_ps,
        splat = _mm256_set1_ps,
        fma = _mm256_fmadd_ps,
        add = _mm256_add_ps,
        sub = _mm256_sub_ps,
        mul = _mm256_mul_ps,
        max = _mm256_max_ps,
        min = _mm256_min_ps,
        to_int = _mm256_castps_si256,
        from_int = _mm256_castsi256_ps,
        isub = _mm256_sub_epi32,
        shl = _mm256_slli_epi32,
        isplat = _mm256_set1_epi32,
        flush = flush256,
        hmax = hmax256,
        hsum = hsum256
    );

    rows!(
        avx512,
        "avx512f",
        16,
        __m512,
        load = _mm512_loadu_ps,
        store = _mm512_storeu_ps,
        splat = _mm512_set1_ps,
        fma = _mm512_fmadd_ps,
        add = _mm512_add_ps,
        sub = _mm512_sub_ps,
        mul = _mm512_mul_ps,
        max = _mm512_max_ps,
        min = _mm512_min_ps,
        to_int = _mm512_castps_si512,
        from_int = _mm512_castsi512_ps,
        isub = _mm512_sub_epi32,
        shl = _mm512_slli_epi32,
        isplat = _mm512_set1_epi32,
        flush = flush512,
        hmax = hmax512,
        hsum = hsum512
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> Vec<Vec<f32>> {
        let mut seed = 0x2545_f491u32;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            (seed % 20_000) as f32 / 100.0 - 100.0
        };
        let mut out: Vec<Vec<f32>> = [0, 1, 7, 8, 15, 16, 17, 33, 100]
            .iter()
            .map(|&n| (0..n).map(|_| rnd()).collect())
            .collect();
        out.push(vec![f32::MIN, -1e30, -87.5, -86.9, 0.0, 1.0, 87.9, f32::MIN, 3.0]);
        out
    }

    #[test]
    fn scalar_exp_is_close_to_std() {
        for i in -870..879 {
            let x = i as f32 / 10.0 + 0.037;
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            assert!((got - want).abs() <= 4e-7 * want, "exp({x}) = {got}, want {want}");
        }
        assert_eq!(exp(-87.5), 0.0);
        assert_eq!(exp(f32::MIN), 0.0);
    }

    #[test]
    fn every_runnable_level_matches_the_scalar_rows() {
        for level in Level::runnable() {
            for row in rows() {
                let m = max(&row, level);
                let want_m = row.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
                assert_eq!(m, want_m, "{level}: max of {} elements", row.len());
                let shift = if row.is_empty() { 0.0 } else { m };
                let (mut got, mut want) = (row.clone(), row.clone());
                let s = exp_sum(&mut got, shift, level);
                let t = exp_sum(&mut want, shift, Level::Portable);
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= 1e-6 * w.abs().max(1e-30), "{level}: {g} vs {w}");
                }
                assert!((s - t).abs() <= 1e-5 * t.abs().max(1.0), "{level}: sum {s} vs {t}");
            }
        }
        for level in [Level::V3, Level::V4] {
            if !level.runs_here() {
                eprintln!(
                    "SKIPPED softmax rows at --cpu {level}: this CPU lacks {level} ({})",
                    crate::cpu::model_name()
                );
            }
        }
    }
}
