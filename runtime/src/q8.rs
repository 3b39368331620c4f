//! Integer dot products for quantized products with few activation rows (decode steps).
//!
//! Converting every weight code to f32 bound the few-row quantized product by arithmetic, not by
//! memory. Here the activation rows are instead quantized on the fly to int8 in blocks of 32 values
//! with one f32 step per block (round to nearest even; llama.cpp's Q8_0), and each block of a
//! weight row is an integer dot product: `_mm256_maddubs_epi16` (u8 × i8, adjacent pairs summed to
//! i16), `_mm256_madd_epi16` with ones (→ i32), converted to f32 and scaled by the block's step
//! and its group's weight scale.
//!
//! * 4-bit codes (0..=15) are the unsigned operand as they are; the affine minimum adds
//!   `min_g · Σ_g a` with the exact f32 sum of the activations over the group. With groups of 64
//!   columns or more, two blocks are read as one 32-byte load and the activation codes are stored
//!   in the order of its nibbles ([`Q8::at`]), so unpacking needs no shuffle.
//! * 8-bit codes are signed: `|w|` is the unsigned operand and the activations take `w`'s sign
//!   (`_mm256_sign_epi8`).
//!
//! Nothing saturates: activation codes are in -127..=127, so a `maddubs` pair is at most
//! 2 · 15 · 127 for 4 bits (and the sum of two pairs 4 · 15 · 127) and 2 · 128 · 127 = 32512 < 32767
//! for 8 bits (|-128| read as u8 is 128).
//!
//! The cost is accuracy, and this is what makes the runtime differ from the interpreter, which
//! multiplies the exact activations: an activation moves by at most half its block's step
//! `d_b = max|a_b| / 127`, so an output moves by at most `Σ_c |w_c| · d_b(c) / 2`, the bound the
//! unit tests hold the kernel to.
//!
//! Assumes groups of a multiple of 32 columns and AVX2 and FMA ([`usable`]); the caller keeps the
//! f32 path for everything else, and for activations that are not finite ([`Q8::new`]).

use crate::cpu::Vnni;

/// Values per activation block (one f32 scale each).
pub const BLOCK: usize = 32;

/// How far ahead of the weight codes being read the kernels prefetch, in bytes. The prefetches
/// are non-temporal: measured on GPT-2 small decoding (2 threads, one run), prefetching 4 KiB ahead
/// took the int8 step from 9.1 ms to 7.4 with `prefetcht0` and to 5.9 with `prefetchnta`, which
/// keeps the streamed codes out of the caches' reused part; 1–8 KiB measured alike.
const PREFETCH: usize = 4096;

/// Whether a weight of `bits` with groups of `group` columns can take the integer path here.
pub fn usable(bits: u8, group: usize, level: crate::cpu::Level) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        group > 0 && group.is_multiple_of(BLOCK) && matches!(bits, 4 | 8) && level.avx2()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (bits, group, level);
        false
    }
}

/// Activation rows quantized to int8 in blocks of [`BLOCK`].
pub struct Q8 {
    /// Columns per row (a multiple of [`BLOCK`]).
    pub k: usize,
    /// Rows.
    pub rows: usize,
    /// Columns per weight group, over which `sums` add up.
    pub group: usize,
    /// Bits per code of the weights these activations are for (4 or 8).
    pub bits: u8,
    /// `[rows, k]` codes in -127..=127, in column order or, if `paired`, in the order of 4-bit
    /// weight codes (see [`Q8::at`]).
    pub q: Vec<i8>,
    /// `[rows, k / BLOCK]` steps: a block's values are `q · d`.
    pub d: Vec<f32>,
    /// If `paired`, `[rows, k / 64, 8]`: each pair of blocks' steps as the 8 lanes of the pair's
    /// integer sums hold them (4 of the first block's step, 4 of the second's); empty otherwise.
    pub pair_d: Vec<f32>,
    /// `[rows, sum_stride]` f32 sums of the exact activations per group (for affine minimums),
    /// zero after the `k / group` groups, or empty.
    pub sums: Vec<f32>,
    /// The groups rounded up to a multiple of 8, so the kernels read a row's sums in vectors.
    pub sum_stride: usize,
    /// Codes ordered for 4-bit weights read two blocks (32 bytes) at a time.
    pub paired: bool,
}

impl Q8 {
    /// Quantizes `rows` rows of `k` values (`k` a multiple of `group`, itself a multiple of
    /// [`BLOCK`]) for a product with `bits`-bit weights: 4-bit ones also get each group's f32 sum
    /// and, with groups of 64 or more columns, codes in paired order. `None` if a value is
    /// infinite or NaN, which a block scale cannot represent.
    pub fn new(a: &[f32], rows: usize, k: usize, group: usize, bits: u8, level: crate::cpu::Level) -> Option<Q8> {
        assert!(group.is_multiple_of(BLOCK) && k.is_multiple_of(group) && a.len() == rows * k);
        let paired = bits == 4 && group.is_multiple_of(2 * BLOCK);
        let sum_stride = if bits == 4 { (k / group).div_ceil(8) * 8 } else { 0 };
        let mut q = Q8 {
            k,
            rows,
            group,
            bits,
            q: vec![0; rows * k],
            d: vec![0.0; rows * k / BLOCK],
            pair_d: vec![0.0; if paired { rows * k / 8 } else { 0 }],
            sums: vec![0.0; rows * sum_stride],
            sum_stride,
            paired,
        };
        #[cfg(target_arch = "x86_64")]
        let finite = if level.avx2() {
            // SAFETY: the artifact's level has AVX2 (checked at load); the buffers have the sizes set above.
            unsafe { q.fill_avx2(a) }
        } else {
            q.fill(a)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let finite = {
            let _ = level;
            q.fill(a)
        };
        if paired {
            for (p, d) in q.pair_d.chunks_exact_mut(8).zip(q.d.chunks_exact(2)) {
                p[..4].fill(d[0]);
                p[4..].fill(d[1]);
            }
        }
        finite.then_some(q)
    }

    /// Where the code of element `i` (of the row-major `[rows, k]` activations) is stored. In
    /// paired order, each 64 columns hold, 16 codes each: columns 0–15 of the first block, 0–15
    /// of the second, 16–31 of the first, 16–31 of the second; so a 32-byte load of two blocks'
    /// 4-bit weights has its low nibbles line up with the first 32 codes and its high nibbles
    /// with the next 32.
    pub fn at(&self, i: usize) -> usize {
        if !self.paired {
            return i;
        }
        let (pair, within) = (i / 64, i % 64);
        let (half, c) = (within / BLOCK, within % BLOCK);
        pair * 64 + (c / 16) * 32 + half * 16 + c % 16
    }

    /// Where the sum of group `i` (of all rows' groups, row-major) is stored.
    fn sum_at(&self, i: usize) -> usize {
        let groups = self.k / self.group;
        i / groups * self.sum_stride + i % groups
    }

    /// The portable quantizer, the definition [`Q8::fill_avx2`] follows.
    fn fill(&mut self, a: &[f32]) -> bool {
        let mut finite = true;
        for (b, x) in a.chunks_exact(BLOCK).enumerate() {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            finite &= x.iter().all(|v| v.is_finite());
            let (d, id) = steps(amax);
            self.d[b] = d;
            for (c, v) in x.iter().enumerate() {
                let i = self.at(b * BLOCK + c);
                self.q[i] = (v * id).round_ties_even() as i8;
            }
        }
        if !self.sums.is_empty() {
            for (i, x) in a.chunks_exact(self.group).enumerate() {
                let at = self.sum_at(i);
                self.sums[at] = x.iter().sum();
            }
        }
        finite
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn fill_avx2(&mut self, a: &[f32]) -> bool {
        use std::arch::x86_64::*;
        let sign = _mm256_set1_ps(-0.0);
        let inf = _mm256_set1_ps(f32::INFINITY);
        // Restores the order that the lane-wise packs leave (llama.cpp's quantize_row_q8_0).
        let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let mut bad = _mm256_setzero_ps();
        let bpg = self.group / BLOCK;
        let mut gsum = _mm256_setzero_ps();
        for b in 0..a.len() / BLOCK {
            let p = a.as_ptr().add(b * BLOCK);
            let v = [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ];
            let abs = v.map(|x| _mm256_andnot_ps(sign, x));
            for x in abs {
                // True for NaN (unordered) and infinity.
                bad = _mm256_or_ps(bad, _mm256_cmp_ps::<_CMP_NLT_UQ>(x, inf));
            }
            let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let m = _mm_max_ss(m, _mm_movehdup_ps(m));
            let (d, id) = steps(_mm_cvtss_f32(m));
            *self.d.get_unchecked_mut(b) = d;
            let id = _mm256_set1_ps(id);
            let i = v.map(|x| {
                _mm256_cvtps_epi32(_mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    _mm256_mul_ps(x, id),
                ))
            });
            let lo = _mm256_packs_epi32(i[0], i[1]);
            let hi = _mm256_packs_epi32(i[2], i[3]);
            let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(lo, hi), perm);
            let out = self.q.as_mut_ptr();
            if self.paired {
                let (lo, hi) = (self.at(b * BLOCK), self.at(b * BLOCK + 16));
                _mm_storeu_si128(out.add(lo) as *mut __m128i, _mm256_castsi256_si128(bytes));
                _mm_storeu_si128(out.add(hi) as *mut __m128i, _mm256_extracti128_si256::<1>(bytes));
            } else {
                _mm256_storeu_si256(out.add(b * BLOCK) as *mut __m256i, bytes);
            }
            if !self.sums.is_empty() {
                gsum = _mm256_add_ps(
                    gsum,
                    _mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])),
                );
                if (b + 1) % bpg == 0 {
                    let at = self.sum_at(b / bpg);
                    *self.sums.get_unchecked_mut(at) = hsum(gsum);
                    gsum = _mm256_setzero_ps();
                }
            }
        }
        _mm256_movemask_ps(bad) == 0
    }
}

/// A block's step and its inverse for the largest magnitude `amax`: codes `round(a / d)` reach ±127.
fn steps(amax: f32) -> (f32, f32) {
    let d = amax / 127.0;
    (d, if amax > 0.0 { 127.0 / amax } else { 0.0 })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Outputs `j0..j0 + n` of every activation row: `put(r, jj, value)` for row `r` and weight row
/// `j0 + jj`, where `codes` holds those `n` weight rows of `q.bits` (`k` or `k / 2` bytes each)
/// and `s`, `m` their scales and minimums (`n · k / group` each; `m` unread for 8 bits).
///
/// # Safety
/// [`usable`] said yes for `q.bits` and `q.group`; `codes` holds `n` whole weight rows of `q.k`
/// columns.
/// With `vnni` (the artifact's, for a CPU that has it), each block's integer dot product is one
/// `vpdpbusd` instead of `vpmaddubsw` and `vpmaddwd`: the same sums exactly, as neither
/// saturates.
pub unsafe fn rows(q: &Q8, vnni: Vnni, codes: &[u8], s: &[f32], m: &[f32], mut put: impl FnMut(usize, usize, f32)) {
    #[cfg(target_arch = "x86_64")]
    {
        let put = &mut put;
        match (q.rows, vnni) {
            (1, Vnni::None) => band::<1>(q, codes, s, m, put),
            (2, Vnni::None) => band::<2>(q, codes, s, m, put),
            (3, Vnni::None) => band::<3>(q, codes, s, m, put),
            (4, Vnni::None) => band::<4>(q, codes, s, m, put),
            (1, Vnni::Avx) => band_avx_vnni::<1>(q, codes, s, m, put),
            (2, Vnni::Avx) => band_avx_vnni::<2>(q, codes, s, m, put),
            (3, Vnni::Avx) => band_avx_vnni::<3>(q, codes, s, m, put),
            (4, Vnni::Avx) => band_avx_vnni::<4>(q, codes, s, m, put),
            (1, Vnni::Avx512) => band_avx512_vnni::<1>(q, codes, s, m, put),
            (2, Vnni::Avx512) => band_avx512_vnni::<2>(q, codes, s, m, put),
            (3, Vnni::Avx512) => band_avx512_vnni::<3>(q, codes, s, m, put),
            (4, Vnni::Avx512) => band_avx512_vnni::<4>(q, codes, s, m, put),
            _ => unreachable!("the integer path takes 1 to 4 rows"),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (q, vnni, codes, s, m, &mut put);
        unreachable!("usable() is false off x86_64");
    }
}

/// [`band_with`] on AVX2: `vpmaddubsw` and `vpmaddwd`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn band<const R: usize>(q: &Q8, codes: &[u8], s: &[f32], m: &[f32], put: &mut impl FnMut(usize, usize, f32)) {
    band_with::<R, NO_VNNI>(q, codes, s, m, put)
}

/// [`band_with`] with AVX-VNNI's `vpdpbusd` (VEX).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avxvnni")]
unsafe fn band_avx_vnni<const R: usize>(
    q: &Q8,
    codes: &[u8],
    s: &[f32],
    m: &[f32],
    put: &mut impl FnMut(usize, usize, f32),
) {
    band_with::<R, AVX_VNNI>(q, codes, s, m, put)
}

/// [`band_with`] with AVX-512 VNNI's `vpdpbusd` on 256-bit vectors (EVEX).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
unsafe fn band_avx512_vnni<const R: usize>(
    q: &Q8,
    codes: &[u8],
    s: &[f32],
    m: &[f32],
    put: &mut impl FnMut(usize, usize, f32),
) {
    band_with::<R, AVX512_VNNI>(q, codes, s, m, put)
}

/// The integer dot product instruction of a band (a const parameter of the kernels).
const NO_VNNI: u8 = 0;
const AVX_VNNI: u8 = 1;
const AVX512_VNNI: u8 = 2;

/// `acc + Σ u · s` over each 4 adjacent bytes (`u` unsigned, `s` signed), as i32 lanes; exact
/// when no pair of products exceeds an i16 (true of every caller here).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot4<const V: u8>(
    acc: std::arch::x86_64::__m256i,
    u: std::arch::x86_64::__m256i,
    s: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    match V {
        AVX_VNNI => _mm256_dpbusd_avx_epi32(acc, u, s),
        AVX512_VNNI => _mm256_dpbusd_epi32(acc, u, s),
        _ => _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))),
    }
}

/// [`rows`] for `R` activation rows: the loop over weight rows; inlined into a wrapper compiled
/// with the instructions `V` needs, with the per-row kernels inlined into it.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn band_with<const R: usize, const V: u8>(
    q: &Q8,
    codes: &[u8],
    s: &[f32],
    m: &[f32],
    put: &mut impl FnMut(usize, usize, f32),
) {
    let bits = q.bits;
    let cb = if bits == 8 { q.k } else { q.k / 2 };
    let l = Layout {
        k: q.k,
        groups: q.k / q.group,
        nb: q.k / BLOCK,
        bpg: q.group / BLOCK,
    };
    let n = codes.len() / cb.max(1);
    assert!(s.len() >= n * l.groups && (bits == 8 || m.len() >= n * l.groups));
    for jj in 0..n {
        let c = codes.as_ptr().add(jj * cb);
        let sr = s.as_ptr().add(jj * l.groups);
        let t: [f32; R] = if bits == 8 {
            row8::<R, V>(q, l, c, sr)
        } else {
            let mr = m.as_ptr().add(jj * l.groups);
            let acc = if !q.paired {
                row4::<R, V>(q, l, c, sr)
            } else if l.bpg == 2 {
                // Groups of 64 and 128 columns: the loop over a group's pairs unrolls.
                row4_paired::<R, 1, V>(q, l, c, sr)
            } else if l.bpg == 4 {
                row4_paired::<R, 2, V>(q, l, c, sr)
            } else {
                row4_paired::<R, 0, V>(q, l, c, sr)
            };
            with_minimums(q, l, mr, acc)
        };
        for (r, v) in t.into_iter().enumerate() {
            put(r, jj, v);
        }
    }
}

/// A weight row's divisions, done once per band.
#[derive(Clone, Copy)]
struct Layout {
    /// Columns.
    k: usize,
    /// Weight groups.
    groups: usize,
    /// Activation blocks.
    nb: usize,
    /// Blocks per group.
    bpg: usize,
}

/// The outputs of a 4-bit weight row from its accumulators: their sums plus the affine minimums'
/// term `Σ_g min_g · Σ_g a`, a dot product of the row's minimums `m` with the group sums, eight
/// groups per vector.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn with_minimums<const R: usize>(
    q: &Q8,
    l: Layout,
    m: *const f32,
    acc: [std::arch::x86_64::__m256; R],
) -> [f32; R] {
    use std::arch::x86_64::*;
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let mut out = [0f32; R];
    for (r, a) in acc.into_iter().enumerate() {
        let mut t = a;
        for c in (0..l.groups).step_by(8) {
            // Only this row's minimums are read; the sums are zero past the last group.
            let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((l.groups - c) as i32), lanes);
            let mv = _mm256_maskload_ps(m.add(c), mask);
            let sv = _mm256_loadu_ps(q.sums.as_ptr().add(r * q.sum_stride + c));
            t = _mm256_fmadd_ps(mv, sv, t);
        }
        out[r] = hsum(t);
    }
    out
}

/// The accumulators of one 4-bit weight row against `R` activation rows, a block at a time (groups
/// of an odd number of blocks, in practice 32 columns). Each block's product is scaled by its
/// activation step times its group's scale, alternating between two accumulator chains.
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn row4<const R: usize, const V: u8>(
    q: &Q8,
    l: Layout,
    codes: *const u8,
    s: *const f32,
) -> [std::arch::x86_64::__m256; R] {
    use std::arch::x86_64::*;
    let Layout { k, groups, nb, bpg } = l;
    let low = _mm256_set1_epi8(15);
    let (mut a0, mut a1) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
    for gi in 0..groups {
        let sc = *s.add(gi);
        for b in gi * bpg..(gi + 1) * bpg {
            // 16 bytes: column i in the low nibble of byte i and column i + 16 in its high
            // nibble, unpacked into 32 bytes in column order.
            _mm_prefetch::<_MM_HINT_NTA>(codes.wrapping_add(b * 16 + PREFETCH) as *const i8);
            let raw = _mm_loadu_si128(codes.add(b * 16) as *const __m128i);
            let w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(raw), raw), low);
            for r in 0..R {
                let x = _mm256_loadu_si256(q.q.as_ptr().add(r * k + b * BLOCK) as *const __m256i);
                let p = dot4::<V>(_mm256_setzero_si256(), w, x);
                let d = _mm256_set1_ps(*q.d.get_unchecked(r * nb + b) * sc);
                a0[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, a0[r]);
            }
            std::mem::swap(&mut a0, &mut a1);
        }
    }
    let mut acc = [_mm256_setzero_ps(); R];
    for r in 0..R {
        acc[r] = _mm256_add_ps(a0[r], a1[r]);
    }
    acc
}

/// The accumulators of one 4-bit weight row against `R` activation rows in paired order (groups
/// of an even number of blocks; `PPG` pairs per group if not 0): two blocks' 32 code bytes per
/// load, whose low nibbles meet the first 32 activation codes and high nibbles the next 32 without
/// any shuffle; both products share one i16 sum (at most 4 · 15 · 127), one widening, one
/// conversion and one FMA with the pair's steps times the group's scale. Scaling each pair, rather
/// than each group's sum, leaves no reduction per group: measured 10% faster for groups of 128.
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn row4_paired<const R: usize, const PPG: usize, const V: u8>(
    q: &Q8,
    l: Layout,
    codes: *const u8,
    s: *const f32,
) -> [std::arch::x86_64::__m256; R] {
    use std::arch::x86_64::*;
    let Layout { k, groups, bpg, .. } = l;
    let (ppg, np) = (if PPG > 0 { PPG } else { bpg / 2 }, k / 64);
    let ones = _mm256_set1_epi16(1);
    let low = _mm256_set1_epi8(15);
    let (mut a0, mut a1) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
    for gi in 0..groups {
        let sc = _mm256_set1_ps(*s.add(gi));
        for p in gi * ppg..(gi + 1) * ppg {
            _mm_prefetch::<_MM_HINT_NTA>(codes.wrapping_add(p * 32 + PREFETCH) as *const i8);
            let raw = _mm256_loadu_si256(codes.add(p * 32) as *const __m256i);
            let lo = _mm256_and_si256(raw, low);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low);
            for r in 0..R {
                let x = q.q.as_ptr().add(r * k + p * 64);
                let xl = _mm256_loadu_si256(x as *const __m256i);
                let xh = _mm256_loadu_si256(x.add(32) as *const __m256i);
                let sum = if V == NO_VNNI {
                    let s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
                    _mm256_madd_epi16(s16, ones)
                } else {
                    dot4::<V>(dot4::<V>(_mm256_setzero_si256(), lo, xl), hi, xh)
                };
                let d = _mm256_mul_ps(_mm256_loadu_ps(q.pair_d.as_ptr().add((r * np + p) * 8)), sc);
                a0[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), d, a0[r]);
            }
            std::mem::swap(&mut a0, &mut a1);
        }
    }
    let mut acc = [_mm256_setzero_ps(); R];
    for r in 0..R {
        acc[r] = _mm256_add_ps(a0[r], a1[r]);
    }
    acc
}

/// One 8-bit weight row against `R` activation rows.
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn row8<const R: usize, const V: u8>(q: &Q8, l: Layout, codes: *const u8, s: *const f32) -> [f32; R] {
    use std::arch::x86_64::*;
    let Layout { k, groups, nb, bpg } = l;
    let mut total = [_mm256_setzero_ps(); R];
    // |w| as the unsigned operand, w's sign moved onto the activations.
    let dot = |w: __m256i, aw: __m256i, r: usize, b: usize, acc: __m256| {
        let x = _mm256_loadu_si256(q.q.as_ptr().add(r * k + b * BLOCK) as *const __m256i);
        let p = dot4::<V>(_mm256_setzero_si256(), aw, _mm256_sign_epi8(x, w));
        _mm256_fmadd_ps(
            _mm256_cvtepi32_ps(p),
            _mm256_set1_ps(*q.d.get_unchecked(r * nb + b)),
            acc,
        )
    };
    let load = |b: usize| {
        _mm_prefetch::<_MM_HINT_NTA>(codes.wrapping_add(b * BLOCK + PREFETCH) as *const i8);
        let w = _mm256_loadu_si256(codes.add(b * BLOCK) as *const __m256i);
        (w, _mm256_sign_epi8(w, w))
    };
    for gi in 0..groups {
        // Two accumulator chains per row, so FMA latency does not bound a row.
        let (mut a0, mut a1) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
        let (mut b, end) = (gi * bpg, (gi + 1) * bpg);
        while b + 2 <= end {
            let ((w0, aw0), (w1, aw1)) = (load(b), load(b + 1));
            for r in 0..R {
                a0[r] = dot(w0, aw0, r, b, a0[r]);
                a1[r] = dot(w1, aw1, r, b + 1, a1[r]);
            }
            b += 2;
        }
        if b < end {
            let (w0, aw0) = load(b);
            for r in 0..R {
                a0[r] = dot(w0, aw0, r, b, a0[r]);
            }
        }
        let sc = _mm256_set1_ps(*s.add(gi));
        for r in 0..R {
            total[r] = _mm256_fmadd_ps(_mm256_add_ps(a0[r], a1[r]), sc, total[r]);
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = hsum(total[r]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{qmatmul, Buf, QWeight};
    use kiln_interp::Value;
    use kiln_ir::{DType, Op, TensorType};

    /// The largest difference quantizing the activations can make to output `(r, j)` of a product with
    /// `w` (`[n, k]` f32, the dequantized weight): half a step per activation, times its weight.
    pub fn error_bound(q: &Q8, w: &[f32], r: usize, j: usize) -> f64 {
        let k = q.k;
        (0..k)
            .map(|c| (w[j * k + c] as f64).abs() * q.d[(r * k + c) / BLOCK] as f64 / 2.0)
            .sum()
    }

    /// A deterministic stream of uniform values in [-1, 1).
    fn uniform(seed: u64) -> impl FnMut() -> f32 {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        move || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// Activations with the spread a transformer's have: mostly small, a few large, one zero block.
    fn activations(rows: usize, k: usize, seed: u64) -> Vec<f32> {
        let mut u = uniform(seed);
        (0..rows * k)
            .map(|i| match (i % k / BLOCK, i % 37) {
                (1, _) => 0.0,
                (_, 0) => 8.0 * u(),
                _ => u(),
            })
            .collect()
    }

    /// A random quantized weight `[n, k]`: codes, scale bytes, minimum bytes and the interpreter's
    /// values of each.
    struct Weight {
        codes: Vec<u8>,
        scales: Vec<u8>,
        mins: Vec<u8>,
        sdt: DType,
        vals: [Value; 3],
    }

    fn weight(bits: u8, n: usize, k: usize, g: usize, seed: u64) -> Weight {
        let mut u = uniform(seed);
        let groups = n * k / g;
        let value = |dtype, shape: Vec<usize>, data| Value { dtype, shape, data };
        if bits == 8 {
            // Every code, -128 (outside what the quantizer makes, but representable) included.
            let codes: Vec<u8> = (0..n * k).map(|i| (i * 97 % 256) as u8).collect();
            let s: Vec<f32> = (0..groups).map(|_| 0.01 + 0.02 * u().abs()).collect();
            Weight {
                vals: [
                    value(DType::I8, vec![n, k], codes.iter().map(|c| *c as i8 as f64).collect()),
                    value(DType::F32, vec![n, k / g], s.iter().map(|x| *x as f64).collect()),
                    value(DType::F32, vec![0], vec![]),
                ],
                codes,
                scales: s.iter().flat_map(|x| x.to_le_bytes()).collect(),
                mins: Vec::new(),
                sdt: DType::F32,
            }
        } else {
            let codes: Vec<u8> = (0..n * k / 2).map(|i| (i * 151 % 256) as u8).collect();
            let half = |x: f32| half::f16::from_f32(x);
            let s: Vec<half::f16> = (0..groups).map(|_| half(0.05 + 0.1 * u().abs())).collect();
            let m: Vec<half::f16> = (0..groups).map(|_| half(-0.5 * u().abs())).collect();
            let f = |v: &[half::f16]| v.iter().map(|x| x.to_f64()).collect();
            Weight {
                vals: [
                    value(DType::U8, vec![n, k / 2], codes.iter().map(|c| *c as f64).collect()),
                    value(DType::F16, vec![n, k / g], f(&s)),
                    value(DType::F16, vec![n, k / g], f(&m)),
                ],
                codes,
                scales: s.iter().flat_map(|x| x.to_le_bytes()).collect(),
                mins: m.iter().flat_map(|x| x.to_le_bytes()).collect(),
                sdt: DType::F16,
            }
        }
    }

    /// The VNNI forms this CPU runs; the others are reported as skipped.
    fn vnni_modes() -> Vec<Vnni> {
        use crate::cpu::Level;
        let host = Level::host();
        let mut modes = Vec::new();
        for (level, want) in [(Level::V3, Vnni::Avx), (Level::V4, Vnni::Avx512)] {
            if host >= level && Vnni::host(level) == want {
                modes.push(want);
            } else {
                eprintln!("SKIPPED: decode products with {want:?} VNNI (not on this CPU)");
            }
        }
        modes
    }

    fn buf(b: &[u8]) -> Buf {
        Buf {
            ptr: b.as_ptr() as *mut u8,
            len: b.len(),
        }
    }

    /// The kernel against the interpreter's `dequantize` and `matmul` on the exact activations,
    /// within the bound that quantizing the activations allows (per output, from the actual
    /// steps), and against the same arithmetic on the quantized activations in f64 within f32
    /// rounding only.
    #[test]
    fn integer_products_stay_within_the_activation_step() {
        if !usable(8, BLOCK, crate::cpu::Level::host()) {
            eprintln!("no AVX2 and FMA: the integer path is not taken on this CPU");
            return;
        }
        let n = 37;
        let mut worst = 0f64;
        for (bits, k, g) in [
            (8, 96, 96),
            (8, 256, 256),
            (8, 256, 64),
            (8, 288, 96),
            (4, 384, 32),
            (4, 384, 96),
            (4, 384, 128),
            (4, 256, 64),
            (4, 512, 256),
        ] {
            let w = weight(bits, n, k, g, k as u64 + g as u64);
            let ty = TensorType::new(DType::F32, vec![(n as u64).into(), (k as u64).into()]);
            let args: Vec<&Value> = w.vals.iter().take(if bits == 8 { 2 } else { 3 }).collect();
            let op = Op::Dequantize { bits, group: g as u64 };
            let deq = kiln_interp::eval_op(&op, &ty, &args, &Default::default()).unwrap();
            let wf: Vec<f32> = deq.data.iter().map(|x| *x as f32).collect();
            for rows in 1..=4 {
                let a = activations(rows, k, (rows * 7 + k) as u64);
                let av = Value {
                    dtype: DType::F32,
                    shape: vec![rows, k],
                    data: a.iter().map(|x| *x as f64).collect(),
                };
                let mm = Op::MatMul {
                    transpose_a: false,
                    transpose_b: true,
                };
                let oty = TensorType::new(DType::F32, vec![(rows as u64).into(), (n as u64).into()]);
                let want = kiln_interp::eval_op(&mm, &oty, &[&av, &deq], &Default::default()).unwrap();
                let q = Q8::new(&a, rows, k, g, bits, crate::cpu::Level::host()).unwrap();
                for threads in [1, 2] {
                    let run = |int8: bool, vnni: Vnni| {
                        let mut out = vec![0f32; rows * n];
                        let ab: &[u8] = unsafe { std::slice::from_raw_parts(a.as_ptr() as *const u8, a.len() * 4) };
                        let ob = Buf {
                            ptr: out.as_mut_ptr() as *mut u8,
                            len: out.len() * 4,
                        };
                        let qw = QWeight {
                            codes: buf(&w.codes),
                            scales: (buf(&w.scales), w.sdt),
                            mins: (bits == 4).then(|| (buf(&w.mins), w.sdt)),
                            bits,
                            group: g,
                        };
                        qmatmul(
                            (buf(ab), &[rows, k]),
                            qw,
                            (ob, &[rows, n]),
                            1.0,
                            None,
                            None,
                            (int8, &Default::default(), vnni),
                            threads,
                            crate::cpu::CpuArg::host(),
                        )
                        .unwrap();
                        out
                    };
                    let out = run(true, Vnni::None);
                    // The VNNI forms give the same sums: the same outputs, bit for bit.
                    for vnni in vnni_modes() {
                        let got = run(true, vnni);
                        assert!(
                            got.iter().zip(&out).all(|(x, y)| x.to_bits() == y.to_bits()),
                            "{vnni:?}: {bits} bits, k {k}, group {g}, {rows} rows"
                        );
                    }
                    for r in 0..rows {
                        for j in 0..n {
                            let got = out[r * n + j] as f64;
                            // The same products on the quantized activations, exactly; the minimums
                            // multiply the exact activations.
                            let quantized: f64 = (0..k)
                                .map(|c| {
                                    let m = if bits == 4 {
                                        w.vals[2].data[j * (k / g) + c / g]
                                    } else {
                                        0.0
                                    };
                                    let x = q.q[q.at(r * k + c)] as f64 * q.d[(r * k + c) / BLOCK] as f64;
                                    x * (wf[j * k + c] as f64 - m) + a[r * k + c] as f64 * m
                                })
                                .sum();
                            // f32 rounding of block terms, group sums and the result.
                            let mag: f64 = (0..k).map(|c| (a[r * k + c] as f64 * wf[j * k + c] as f64).abs()).sum();
                            let rounding = (k / BLOCK + k / g + 8) as f64 * f32::EPSILON as f64 * mag;
                            let e = (got - quantized).abs();
                            assert!(
                                e <= rounding,
                                "int{bits} k {k} g {g}, {rows} rows, ({r}, {j}): {got} vs {quantized} on the quantized activations"
                            );
                            let bound = error_bound(&q, &wf, r, j);
                            let e = (got - want.data[r * n + j]).abs();
                            assert!(
                                e <= bound + rounding,
                                "int{bits} k {k} g {g}, {rows} rows, ({r}, {j}): off the interpreter by {e:e}, more than the activation step allows ({bound:e})"
                            );
                            worst = worst.max(e / bound);
                        }
                    }
                    // Without int8 activations, the f32 path (the fallback for other CPUs) is exact.
                    let out = run(false, Vnni::None);
                    for (i, (x, y)) in out.iter().zip(&want.data).enumerate() {
                        let mag: f64 = (0..k)
                            .map(|c| (a[i / n * k + c] as f64 * wf[i % n * k + c] as f64).abs())
                            .sum();
                        assert!((*x as f64 - y).abs() <= 1e-6 * mag, "f32 path: {x} vs {y}");
                    }
                }
            }
        }
        // The bound is not vacuous: some output uses a good part of it.
        eprintln!("largest error / bound: {worst:.3}");
        assert!(worst > 0.05, "{worst}");
    }

    /// The AVX2 quantizer writes what the portable one defines, in both orders, and refuses
    /// non-finite values.
    #[test]
    fn quantizers_agree() {
        let (rows, k) = (3, 256);
        let a = activations(rows, k, 5);
        for (bits, g) in [(8, 256), (4, 32), (4, 128)] {
            let q = Q8::new(&a, rows, k, g, bits, crate::cpu::Level::host()).unwrap();
            assert_eq!(q.paired, bits == 4 && g >= 64);
            let mut p = Q8 {
                q: vec![0; rows * k],
                d: vec![0.0; rows * k / BLOCK],
                sums: vec![0.0; q.sums.len()],
                pair_d: Vec::new(),
                ..q
            };
            assert!(p.fill(&a));
            assert_eq!(q.q, p.q);
            assert_eq!(q.d, p.d);
            for (x, y) in q.sums.iter().zip(&p.sums) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
            }
            assert!(q.q.iter().all(|c| *c != -128) && q.q.iter().any(|c| c.abs() == 127));
            // Every code lands somewhere, once.
            let mut seen = vec![false; rows * k];
            (0..rows * k).for_each(|i| seen[q.at(i)] = true);
            assert!(seen.iter().all(|x| *x));
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut b = a.clone();
                b[k + 40] = bad;
                assert!(
                    Q8::new(&b, rows, k, g, bits, crate::cpu::Level::host()).is_none(),
                    "{bad}"
                );
                assert!(!p.fill(&b), "{bad}");
            }
        }
    }
}
