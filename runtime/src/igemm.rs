//! Integer matrix products for quantized weights with many activation rows (prefills), on VNNI.
//!
//! The activations are quantized on the fly to int8, one step per row and block of [`ABLOCK`]
//! columns (or the weight group, if smaller); the weights are packed per call into panels of `NR`
//! output channels, four consecutive depths per channel, as unsigned bytes: 8-bit codes biased by
//! 128, 4-bit codes as they are. One `vpdpbusd` then multiplies 4 weight bytes by the 4 activation
//! bytes broadcast to every channel and adds the sum to a 32-bit lane, so a depth step of a tile is
//! two loads, `MR` broadcasts and `2·MR` instructions of 64 (AVX-512) or 32 (AVX-VNNI) products
//! each. At the end of each block the integer sums become f32:
//!
//! * 8 bits: `s_jg · d_rb · (Σ (c + 128) · q − 128 · Σ q)` (the bias removed with the block's sum of
//!   activation codes);
//! * 4 bits (`w = s · c + min`): `s_jg · d_rb · Σ c · q`, plus `min_jg · Σ_g a` once per group with
//!   the exact f32 sum of the activations.
//!
//! Nothing saturates: `vpdpbusd` widens to 32 bits, and a block's sum is at most
//! `ABLOCK · 255 · 127 < 2³¹`. The cost is accuracy: an activation moves by at most half its step,
//! the bound the tests hold the products to; `Model::set_int8_activations(false)` keeps the exact
//! f32 path.

use crate::cpu::Vnni;

/// Activation columns per step at most (the weight group, if smaller).
pub const ABLOCK: usize = 128;

/// The activation block for weights with groups of `group` columns.
pub fn block_for(group: usize) -> usize {
    if group.is_multiple_of(ABLOCK) {
        ABLOCK
    } else {
        group
    }
}

/// Whether a product with `bits`-bit weights in groups of `group` can take this path on `vnni`.
pub fn usable(bits: u8, group: usize, vnni: Vnni) -> bool {
    vnni != Vnni::None && matches!(bits, 4 | 8) && group > 0 && group.is_multiple_of(32)
}

/// Activation rows quantized to int8 per row and block.
pub struct QRows {
    /// Rows.
    pub m: usize,
    /// Columns.
    pub k: usize,
    /// Columns per block.
    pub ab: usize,
    /// `[m, k]` codes in -127..=127.
    pub q: Vec<i8>,
    /// `[m, k / ab]` steps.
    pub d: Vec<f32>,
    /// `[m, k / ab]` sums of each block's codes.
    pub csum: Vec<i32>,
    /// `[m, k / group]` exact sums of the activations per weight group (4-bit weights), or empty.
    pub fsum: Vec<f32>,
}

impl QRows {
    /// Quantizes `m` rows of `k` values for weights of `bits` in groups of `group` (a multiple of
    /// the block, which divides `k`). `None` if a value is not finite.
    pub fn new(a: &[f32], m: usize, k: usize, group: usize, bits: u8) -> Option<QRows> {
        let ab = block_for(group);
        assert!(k.is_multiple_of(group) && group.is_multiple_of(ab) && a.len() == m * k);
        let nb = k / ab;
        let mut r = QRows {
            m,
            k,
            ab,
            q: vec![0; m * k],
            d: vec![0.0; m * nb],
            csum: vec![0; m * nb],
            fsum: if bits == 4 {
                vec![0.0; m * (k / group)]
            } else {
                Vec::new()
            },
        };
        #[cfg(target_arch = "x86_64")]
        let finite = if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: just checked.
            unsafe { r.fill_avx2(a) }
        } else {
            r.fill(a)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let finite = r.fill(a);
        if !finite {
            return None;
        }
        if bits == 4 {
            for (s, x) in r.fsum.iter_mut().zip(a.chunks_exact(group)) {
                *s = x.iter().sum();
            }
        }
        Some(r)
    }

    /// The codes, steps and code sums of every block; false if a value is not finite.
    #[inline(always)]
    fn fill(&mut self, a: &[f32]) -> bool {
        let ab = self.ab;
        for (b, x) in a.chunks_exact(ab).enumerate() {
            // (`max` would skip a NaN.)
            if !x.iter().fold(true, |ok, v| ok & v.is_finite()) {
                return false;
            }
            let amax = x.iter().fold(0f32, |t, v| t.max(v.abs()));
            let (d, id) = (amax / 127.0, if amax > 0.0 { 127.0 / amax } else { 0.0 });
            self.d[b] = d;
            let q = &mut self.q[b * ab..(b + 1) * ab];
            for (o, v) in q.iter_mut().zip(x) {
                *o = (v * id).round_ties_even() as i8;
            }
            self.csum[b] = q.iter().map(|c| *c as i32).sum();
        }
        true
    }

    /// [`QRows::fill`] in AVX2 (blocks of a multiple of 32 columns): the same codes, since
    /// `cvtps` rounds to nearest even, as `round_ties_even` does.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fill_avx2(&mut self, a: &[f32]) -> bool {
        use std::arch::x86_64::*;
        let ab = self.ab;
        let sign = _mm256_set1_ps(-0.0);
        let inf = _mm256_set1_ps(f32::INFINITY);
        // Undoes the lane-wise order of the packs.
        let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for b in 0..a.len() / ab {
            let x = a.as_ptr().add(b * ab);
            let (mut m, mut bad) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for i in (0..ab).step_by(8) {
                let v = _mm256_andnot_ps(sign, _mm256_loadu_ps(x.add(i)));
                // True for NaN (unordered) and infinity.
                bad = _mm256_or_ps(bad, _mm256_cmp_ps::<_CMP_NLT_UQ>(v, inf));
                m = _mm256_max_ps(m, v);
            }
            if _mm256_movemask_ps(bad) != 0 {
                return false;
            }
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
            let (d, id) = (amax / 127.0, if amax > 0.0 { 127.0 / amax } else { 0.0 });
            self.d[b] = d;
            let id = _mm256_set1_ps(id);
            let mut sum = _mm256_setzero_si256();
            for i in (0..ab).step_by(32) {
                let c = [0, 8, 16, 24].map(|o| _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x.add(i + o)), id)));
                for v in c {
                    sum = _mm256_add_epi32(sum, v);
                }
                let bytes = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
                let out = self.q.as_mut_ptr().add(b * ab + i) as *mut __m256i;
                _mm256_storeu_si256(out, _mm256_permutevar8x32_epi32(bytes, perm));
            }
            let s = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256::<1>(sum));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
            self.csum[b] = _mm_cvtsi128_si32(s);
        }
        true
    }
}

/// A quantized weight `[n, k]` packed for a kernel: `⌈n / nr⌉` panels of `k / 4` depth steps, each
/// `nr` channels of 4 unsigned bytes; scales and minimums as `[panel, group, nr]` f32.
pub struct Packed {
    /// Bits per code.
    pub bits: u8,
    /// Output channels.
    pub n: usize,
    /// Depth.
    pub k: usize,
    /// Columns per scale.
    pub group: usize,
    /// Channels per panel.
    pub nr: usize,
    /// The panels.
    pub codes: Vec<u8>,
    /// Scales per panel and group.
    pub s: Vec<f32>,
    /// Minimums per panel and group (4 bits), or empty.
    pub mins: Vec<f32>,
}

impl Packed {
    /// Packs `n` weight rows: `code(j, c)` is row `j`'s code of column `c` as the kernels read it
    /// (8 bits: the i8 code + 128; 4 bits: 0..=15), `s` and `mins` are `[n, k / group]`.
    pub fn new(
        (bits, n, k, group): (u8, usize, usize, usize),
        nr: usize,
        code: impl Fn(usize, usize) -> u8 + Sync,
        s: &[f32],
        mins: &[f32],
    ) -> Packed {
        let (panels, groups) = (n.div_ceil(nr), k / group);
        let mut codes = vec![0u8; panels * k * nr];
        for (p, panel) in codes.chunks_exact_mut(k * nr).enumerate() {
            for (step, lanes) in panel.chunks_exact_mut(4 * nr).enumerate() {
                for jj in 0..nr.min(n - p * nr) {
                    for i in 0..4 {
                        lanes[jj * 4 + i] = code(p * nr + jj, step * 4 + i);
                    }
                }
            }
        }
        let per_panel = |v: &[f32]| {
            let mut out = vec![0f32; panels * groups * nr];
            for j in 0..n {
                for gi in 0..groups {
                    out[(j / nr * groups + gi) * nr + j % nr] = v[j * groups + gi];
                }
            }
            out
        };
        Packed {
            bits,
            n,
            k,
            group,
            nr,
            codes,
            s: per_panel(s),
            mins: if bits == 4 { per_panel(mins) } else { Vec::new() },
        }
    }
}

/// One integer microkernel.
pub struct IKernel {
    /// The extension it needs.
    pub vnni: Vnni,
    /// Rows per tile.
    pub mr: usize,
    /// Channels per panel.
    pub nr: usize,
    run: unsafe fn(usize, &ITile),
}

/// Every integer kernel.
pub const KERNELS: &[IKernel] = &[
    #[cfg(target_arch = "x86_64")]
    IKernel {
        vnni: Vnni::Avx,
        mr: x86::avx::MR,
        nr: x86::avx::NR,
        run: x86::avx::run,
    },
    #[cfg(target_arch = "x86_64")]
    IKernel {
        vnni: Vnni::Avx512,
        mr: x86::avx512::MR,
        nr: x86::avx512::NR,
        run: x86::avx512::run,
    },
];

impl IKernel {
    /// The kernel for `vnni`, if any.
    pub fn for_vnni(vnni: Vnni) -> Option<&'static IKernel> {
        KERNELS.iter().find(|k| k.vnni == vnni)
    }
}

/// One tile's operands: `rows` activation rows against one panel, into `out` (`[MR, NR]` f32).
pub struct ITile {
    a: *const i8,
    k: usize,
    ab: usize,
    group: usize,
    bits: u8,
    b: *const u8,
    d: *const f32,
    csum: *const i32,
    fsum: *const f32,
    s: *const f32,
    mins: *const f32,
    out: *mut f32,
}

/// `out = scale · (a @ wᵀ)`, or `out += …` if `accumulate`, for `a` quantized as `q` and `w`
/// packed for `kern`, on `threads` threads of the current pool.
///
/// # Safety
/// The CPU has `kern`'s extension; `out` holds `q.m` rows of `w.n` floats.
pub unsafe fn matmul(
    kern: &IKernel,
    q: &QRows,
    w: &Packed,
    out: *mut f32,
    scale: f32,
    accumulate: bool,
    threads: usize,
) {
    assert!(q.k == w.k && w.nr == kern.nr && q.k.is_multiple_of(q.ab));
    let (m, n, nr, mr) = (q.m, w.n, kern.nr, kern.mr);
    let panels = n.div_ceil(nr);
    let row_blocks = m.div_ceil(96);
    let mc = m.div_ceil(row_blocks).div_ceil(mr) * mr;
    let groups = ((3 * threads).div_ceil(row_blocks)).clamp(1, panels);
    let per = panels.div_ceil(groups);
    let op = out as usize;
    let task = |t: usize| {
        let (rb, g) = (t / groups, t % groups);
        let mut tmp = vec![0f32; mr * nr];
        for p in g * per..((g + 1) * per).min(panels) {
            for i in (rb * mc..((rb + 1) * mc).min(m)).step_by(mr) {
                let rows = mr.min(m - i);
                // SAFETY: the tile's rows and panel exist; `tmp` holds MR × NR floats.
                unsafe { (kern.run)(rows, &tile(q, w, (i, p), tmp.as_mut_ptr())) };
                let cols = nr.min(n - p * nr);
                for r in 0..rows {
                    // SAFETY: row i + r < m, columns p·nr + cols <= n; tasks own disjoint tiles.
                    let o = unsafe { std::slice::from_raw_parts_mut((op as *mut f32).add((i + r) * n + p * nr), cols) };
                    let t = &tmp[r * nr..r * nr + cols];
                    if accumulate {
                        o.iter_mut().zip(t).for_each(|(o, v)| *o += scale * v);
                    } else {
                        o.iter_mut().zip(t).for_each(|(o, v)| *o = scale * v);
                    }
                }
            }
        }
    };
    let tasks = row_blocks * groups;
    if threads > 1 && tasks > 1 {
        crate::pool::for_each(tasks, task);
    } else {
        (0..tasks).for_each(task);
    }
}

/// The tile of rows from `i` against panel `p`.
fn tile(q: &QRows, w: &Packed, (i, p): (usize, usize), out: *mut f32) -> ITile {
    let (nb, groups) = (q.k / q.ab, q.k / w.group);
    ITile {
        a: q.q[i * q.k..].as_ptr(),
        k: q.k,
        ab: q.ab,
        group: w.group,
        bits: w.bits,
        b: w.codes[p * q.k * w.nr..].as_ptr(),
        d: q.d[i * nb..].as_ptr(),
        csum: q.csum[i * nb..].as_ptr(),
        fsum: if q.fsum.is_empty() {
            std::ptr::null()
        } else {
            q.fsum[i * groups..].as_ptr()
        },
        s: w.s[p * groups * w.nr..].as_ptr(),
        mins: if w.mins.is_empty() {
            std::ptr::null()
        } else {
            w.mins[p * groups * w.nr..].as_ptr()
        },
        out,
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The VNNI tiles: one macro for AVX-VNNI (ymm, 6 × 16) and AVX-512 VNNI (zmm, 8 × 32).
    use super::ITile;

    macro_rules! ikernel {
        (
            $module:ident, $feature:literal, $lanes:expr, $mr:expr,
            zero = $zero:ident, load = $load:ident, loadps = $loadps:ident,
            storeps = $storeps:ident, set1 = $set1:ident, set1ps = $set1ps:ident, dp = $dp:ident,
            sub = $sub:ident, cvt = $cvt:ident, fma = $fma:ident, mul = $mul:ident
        ) => {
            pub mod $module {
                use super::ITile;
                use std::arch::x86_64::*;

                /// Rows per tile.
                pub const MR: usize = $mr;
                /// Channels per panel.
                pub const NR: usize = 2 * $lanes;
                const L: usize = $lanes;

                /// Runs one tile of `rows` (1..=MR) rows.
                ///
                /// # Safety
                /// The CPU has the kernel's features; the tile's pointers are valid.
                pub unsafe fn run(rows: usize, t: &ITile) {
                    match rows {
                        1 => tile::<1>(t),
                        2 => tile::<2>(t),
                        3 => tile::<3>(t),
                        4 => tile::<4>(t),
                        5 => tile::<5>(t),
                        6 if MR >= 6 => tile::<6>(t),
                        7 if MR >= 7 => tile::<7>(t),
                        _ => tile::<MR>(t),
                    }
                }

                #[target_feature(enable = $feature)]
                unsafe fn tile<const R: usize>(t: &ITile) {
                    // The f32 sums live in `out` (L1), so the integer sums have the registers.
                    for i in 0..R * NR {
                        *t.out.add(i) = 0.0;
                    }
                    let (nb, groups) = (t.k / t.ab, t.k / t.group);
                    for blk in 0..nb {
                        let mut acc = [[$zero(); 2]; R];
                        let mut b = t.b.add(blk * t.ab * NR);
                        let mut a = t.a.add(blk * t.ab);
                        for _ in 0..t.ab / 4 {
                            let w0 = $load(b as *const _);
                            let w1 = $load(b.add(4 * L) as *const _);
                            for (r, row) in acc.iter_mut().enumerate() {
                                let x = $set1((a.add(r * t.k) as *const i32).read_unaligned());
                                row[0] = $dp(row[0], w0, x);
                                row[1] = $dp(row[1], w1, x);
                            }
                            a = a.add(4);
                            b = b.add(4 * NR);
                        }
                        let gi = blk * t.ab / t.group;
                        let s = [$loadps(t.s.add(gi * NR)), $loadps(t.s.add(gi * NR + L))];
                        for (r, row) in acc.iter().enumerate() {
                            let d = $set1ps(*t.d.add(r * nb + blk));
                            let corr = $set1(if t.bits == 8 {
                                128 * *t.csum.add(r * nb + blk)
                            } else {
                                0
                            });
                            for h in 0..2 {
                                let v = $cvt($sub(row[h], corr));
                                let o = t.out.add(r * NR + h * L);
                                $storeps(o, $fma(v, $mul(s[h], d), $loadps(o)));
                            }
                        }
                        if t.bits == 4 && ((blk + 1) * t.ab).is_multiple_of(t.group) {
                            let mn = [$loadps(t.mins.add(gi * NR)), $loadps(t.mins.add(gi * NR + L))];
                            for r in 0..R {
                                let sum = $set1ps(*t.fsum.add(r * groups + gi));
                                for (h, mn) in mn.iter().enumerate() {
                                    let o = t.out.add(r * NR + h * L);
                                    $storeps(o, $fma(*mn, sum, $loadps(o)));
                                }
                            }
                        }
                    }
                }
            }
        };
    }

    ikernel!(
        avx,
        "avx2,fma,avxvnni",
        8,
        6,
        zero = _mm256_setzero_si256,
        load = _mm256_loadu_si256,
        loadps = _mm256_loadu_ps,
        storeps = _mm256_storeu_ps,
        set1 = _mm256_set1_epi32,
        set1ps = _mm256_set1_ps,
        dp = _mm256_dpbusd_avx_epi32,
        sub = _mm256_sub_epi32,
        cvt = _mm256_cvtepi32_ps,
        fma = _mm256_fmadd_ps,
        mul = _mm256_mul_ps
    );

    ikernel!(
        avx512,
        "avx512f,avx512bw,avx512vnni",
        16,
        8,
        zero = _mm512_setzero_si512,
        load = _mm512_loadu_si512,
        loadps = _mm512_loadu_ps,
        storeps = _mm512_storeu_ps,
        set1 = _mm512_set1_epi32,
        set1ps = _mm512_set1_ps,
        dp = _mm512_dpbusd_epi32,
        sub = _mm512_sub_epi32,
        cvt = _mm512_cvtepi32_ps,
        fma = _mm512_fmadd_ps,
        mul = _mm512_mul_ps
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::has;

    fn uniform(seed: u64) -> impl FnMut() -> f32 {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        move || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    fn runs_here(v: Vnni) -> bool {
        v.feature().is_some_and(|f| has(f) == Some(true))
            && match v {
                Vnni::Avx512 => crate::cpu::Level::V4.runs_here(),
                _ => crate::cpu::Level::V3.runs_here(),
            }
    }

    /// Every kernel this CPU runs, against the same arithmetic in f64 on the quantized activations
    /// (f32 rounding only) and against the exact product within half an activation step per
    /// column; partial tiles and panels, both widths, 8 bits per channel and 4 bits in groups.
    #[test]
    fn integer_tiles_match_the_quantized_arithmetic() {
        for kern in KERNELS {
            if !runs_here(kern.vnni) {
                eprintln!("SKIPPED the {:?} kernel: this CPU lacks it", kern.vnni);
                continue;
            }
            for (bits, m, k, n, g) in [
                (8, 13, 384, 70, 384),
                (8, 1, 96, 33, 96),
                (4, 19, 256, 45, 128),
                (4, 9, 192, 17, 32),
            ] {
                let mut u = uniform((m * k + n + g) as u64);
                let a: Vec<f32> = (0..m * k).map(|i| if i % 41 == 0 { 6.0 * u() } else { u() }).collect();
                let groups = k / g;
                let codes: Vec<u8> = (0..n * k)
                    .map(|i| {
                        if bits == 8 {
                            (i * 97 % 256) as u8
                        } else {
                            (i * 7 % 16) as u8
                        }
                    })
                    .collect();
                let s: Vec<f32> = (0..n * groups).map(|_| 0.01 + 0.02 * u().abs()).collect();
                let mins: Vec<f32> = (0..n * groups).map(|_| -0.1 * u().abs()).collect();
                let wv = |j: usize, c: usize| {
                    let (sc, q) = (s[j * groups + c / g] as f64, codes[j * k + c]);
                    if bits == 8 {
                        sc * q as i8 as f64
                    } else {
                        sc * q as f64 + mins[j * groups + c / g] as f64
                    }
                };
                let code = |j: usize, c: usize| {
                    if bits == 8 {
                        codes[j * k + c] ^ 0x80
                    } else {
                        codes[j * k + c]
                    }
                };
                let p = Packed::new((bits, n, k, g), kern.nr, code, &s, &mins);
                let q = QRows::new(&a, m, k, g, bits).unwrap();
                for threads in [1, 2] {
                    let mut out = vec![1f32; m * n];
                    // SAFETY: the CPU runs the kernel (checked); out is [m, n].
                    unsafe { matmul(kern, &q, &p, out.as_mut_ptr(), 0.5, true, threads) };
                    for r in 0..m {
                        for j in 0..n {
                            let (mut on_codes, mut exact, mut bound, mut mag) = (0f64, 0f64, 0f64, 0f64);
                            for c in 0..k {
                                let dq = q.d[(r * k + c) / q.ab] as f64;
                                let x = q.q[r * k + c] as f64 * dq;
                                let mn = if bits == 4 {
                                    mins[j * groups + c / g] as f64
                                } else {
                                    0.0
                                };
                                on_codes += x * (wv(j, c) - mn) + a[r * k + c] as f64 * mn;
                                exact += a[r * k + c] as f64 * wv(j, c);
                                bound += (wv(j, c) - mn).abs() * dq / 2.0;
                                mag += (a[r * k + c] as f64 * wv(j, c)).abs();
                            }
                            let got = (out[r * n + j] as f64 - 1.0) / 0.5;
                            let rounding = (k / q.ab + groups + 8) as f64 * f32::EPSILON as f64 * (mag + 1.0);
                            assert!(
                                (got - on_codes).abs() <= rounding,
                                "{:?} int{bits} {m}x{k}x{n} g{g} ({r}, {j}): {got} vs {on_codes}",
                                kern.vnni
                            );
                            assert!(
                                (got - exact).abs() <= bound + rounding,
                                "{:?} ({r}, {j}): {got} vs exact {exact}",
                                kern.vnni
                            );
                        }
                    }
                }
            }
        }
    }

    /// The AVX2 quantizer writes exactly what the portable one defines.
    #[test]
    fn quantizers_agree() {
        let mut u = uniform(3);
        let a: Vec<f32> = (0..5 * 256)
            .map(|i| if i % 29 == 0 { 9.0 * u() } else { u() })
            .collect();
        for (k, g) in [(256, 32), (192, 96), (256, 128), (256, 256)] {
            let a = &a[..5 * k];
            let q = QRows::new(a, 5, k, g, 8).unwrap();
            let mut p = QRows {
                q: vec![0; q.q.len()],
                d: vec![0.0; q.d.len()],
                csum: vec![0; q.csum.len()],
                fsum: Vec::new(),
                ..q
            };
            assert!(p.fill(a));
            let q = QRows::new(a, 5, k, g, 8).unwrap();
            assert_eq!((&q.q, &q.d, &q.csum), (&p.q, &p.d, &p.csum), "groups of {g}");
            assert!(q.q.iter().any(|c| c.abs() == 127) && q.q.iter().all(|c| *c != -128));
        }
    }

    #[test]
    fn activations_that_are_not_finite_take_the_f32_path() {
        let mut a = vec![0.5f32; 2 * 128];
        assert!(QRows::new(&a, 2, 128, 128, 8).is_some());
        a[130] = f32::NAN;
        assert!(QRows::new(&a, 2, 128, 128, 8).is_none());
        a[130] = f32::INFINITY;
        assert!(QRows::new(&a, 2, 128, 128, 4).is_none());
    }
}
