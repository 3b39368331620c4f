//! kiln's own matrix products by weights packed at compile time.
//!
//! A product `out = scale · (A @ B) + bias + res` whose right operand is a weight runs on a
//! register-tiled microkernel chosen for the artifact's CPU level ([`REGISTRY`]). The compiler
//! stores `B` in that kernel's panel layout ([`pack`]): `⌈n / NR⌉` panels, each `k` rows of `NR`
//! contiguous floats, zero past `n`; so the product reads `B` sequentially, never packs it at run
//! time, and serves decode steps (a few rows: one streaming pass over the panels) and prefills
//! alike. The epilogue is applied to the accumulators before the one store.
//!
//! Blocking: depth in blocks of `kc` (a panel's block stays in L1 while every row tile of the
//! task reuses it), rows in blocks of about `MC` (their `A` stays in L2), and tasks of (row
//! block × group of panels) spread over the pool's threads.

mod portable;
mod tile;
#[cfg(target_arch = "x86_64")]
mod x86;

use crate::cpu::Level;
pub use tile::Tile;

/// One microkernel: its name (recorded in the artifact), tile, packing and required level.
#[derive(Debug, Clone, Copy)]
pub struct MicroKernel {
    /// Recorded in `Step::PackedMatMul`.
    pub name: &'static str,
    /// The lowest CPU level it runs on.
    pub level: Level,
    /// Rows per register tile.
    pub mr: usize,
    /// Columns per panel (the packing's width).
    pub nr: usize,
    /// Depth block.
    pub kc: usize,
    /// Rows per row block (a multiple of `mr`).
    pub mc: usize,
    run: unsafe fn(usize, &Tile),
}

/// Every microkernel this runtime has, lowest level first (the last of a level is its choice).
pub const REGISTRY: &[MicroKernel] = &[
    MicroKernel {
        name: "portable_4x8",
        level: Level::Portable,
        mr: portable::MR,
        nr: portable::NR,
        kc: 256,
        mc: 64,
        run: portable::run,
    },
    #[cfg(target_arch = "x86_64")]
    MicroKernel {
        name: "sse_6x8",
        level: Level::Portable,
        mr: x86::sse::MR,
        nr: x86::sse::NR,
        kc: 256,
        mc: 72,
        run: x86::sse::run,
    },
    #[cfg(target_arch = "x86_64")]
    MicroKernel {
        name: "avx2_6x16",
        level: Level::V3,
        mr: x86::avx2::MR,
        nr: x86::avx2::NR,
        kc: 256,
        mc: 72,
        run: x86::avx2::run,
    },
    #[cfg(target_arch = "x86_64")]
    MicroKernel {
        name: "avx512_8x32",
        level: Level::V4,
        mr: x86::avx512::MR,
        nr: x86::avx512::NR,
        kc: 256,
        mc: 192,
        run: x86::avx512::run,
    },
];

impl MicroKernel {
    /// The best kernel for code of `level`.
    pub fn for_level(level: Level) -> &'static MicroKernel {
        REGISTRY.iter().rev().find(|k| k.level <= level).unwrap_or(&REGISTRY[0])
    }

    /// The kernel of that name, if this runtime has it.
    pub fn by_name(name: &str) -> Option<&'static MicroKernel> {
        REGISTRY.iter().find(|k| k.name == name)
    }

    /// This kernel with other depth and row blocks (for measurements).
    pub fn blocked(&self, kc: usize, mc: usize) -> MicroKernel {
        MicroKernel {
            kc,
            mc: mc.div_ceil(self.mr) * self.mr,
            ..*self
        }
    }

    /// Floats of `B` (`[k, n]`) packed for this kernel.
    pub fn packed_len(&self, k: usize, n: usize) -> usize {
        n.div_ceil(self.nr) * k * self.nr
    }
}

/// Packs `B` — `w` as `[k, n]`, or as `[n, k]` if `transposed` — into `kern`'s panels.
pub fn pack(kern: &MicroKernel, w: &[f32], k: usize, n: usize, transposed: bool) -> Vec<f32> {
    let mut out = vec![0f32; kern.packed_len(k, n)];
    if transposed {
        pack_into(kern, k, n, &mut out, |kk, j| w[j * k + kk]);
    } else {
        pack_into(kern, k, n, &mut out, |kk, j| w[kk * n + j]);
    }
    out
}

/// Packs `B [k, n]`, element `(kk, j)` being `at(kk, j)`, into `out` (`kern.packed_len(k, n)`
/// floats; the padding past `n` is written as zeros).
pub fn pack_into(kern: &MicroKernel, k: usize, n: usize, out: &mut [f32], at: impl Fn(usize, usize) -> f32) {
    let nr = kern.nr;
    if k == 0 {
        return;
    }
    for (p, panel) in out[..kern.packed_len(k, n)].chunks_exact_mut(k * nr).enumerate() {
        let width = nr.min(n - p * nr);
        for (kk, row) in panel.chunks_exact_mut(nr).enumerate() {
            for (jj, o) in row.iter_mut().enumerate() {
                *o = if jj < width { at(kk, p * nr + jj) } else { 0.0 };
            }
        }
    }
}

/// Packs `B [k, n]` whose row `kk` is `row(kk)` (at least `n` floats): panel rows are copies.
pub fn pack_rows<'a>(kern: &MicroKernel, k: usize, n: usize, out: &mut [f32], row: impl Fn(usize) -> &'a [f32]) {
    let nr = kern.nr;
    if k == 0 {
        return;
    }
    for (p, panel) in out[..kern.packed_len(k, n)].chunks_exact_mut(k * nr).enumerate() {
        let (c0, width) = (p * nr, nr.min(n - p * nr));
        for (kk, dst) in panel.chunks_exact_mut(nr).enumerate() {
            dst[..width].copy_from_slice(&row(kk)[c0..c0 + width]);
            dst[width..].fill(0.0);
        }
    }
}

/// Packs `B [k, n]` whose column `j` is `col(j)` (at least `k` floats): `Bᵀ` read row by row.
pub fn pack_cols<'a>(kern: &MicroKernel, k: usize, n: usize, out: &mut [f32], col: impl Fn(usize) -> &'a [f32]) {
    let nr = kern.nr;
    let out = &mut out[..kern.packed_len(k, n)];
    for j in 0..n.div_ceil(nr) * nr {
        let base = (j / nr) * k * nr + j % nr;
        let dst = out[base..].iter_mut().step_by(nr).take(k);
        if j < n {
            dst.zip(&col(j)[..k]).for_each(|(d, v)| *d = *v);
        } else {
            dst.for_each(|d| *d = 0.0);
        }
    }
}

/// A packed product's operands: `a` `[m, k]` with row stride `lda`, `b` packed for the kernel,
/// `out` `[m, n]` with row stride `ldc`; `bias` `[n]` and `res` (`out`'s layout) may be null.
#[derive(Clone, Copy)]
pub struct Operands {
    /// Left operand.
    pub a: *const f32,
    /// Row stride of `a` (`k` when contiguous).
    pub lda: usize,
    /// Row stride of `out` and `res` (`n` when contiguous).
    pub ldc: usize,
    /// Packed right operand.
    pub b: *const f32,
    /// Result.
    pub out: *mut f32,
    /// Bias row, or null.
    pub bias: *const f32,
    /// Residual, or null.
    pub res: *const f32,
    /// Multiplies the product.
    pub scale: f32,
    /// An elementwise function applied in place to each finished block (`rows × cols` of `out`).
    pub post: Option<Post>,
}

/// An activation applied to the product's blocks while they are in cache.
#[derive(Clone, Copy)]
pub enum Post {
    /// A generated one-input elementwise kernel.
    Kernel(crate::kernels::KernelFn),
    /// The same kernel's tape (`vmap`), its length, and the level to evaluate it at.
    Tape(*const crate::vmap::TapeOp, usize, Level),
}

// SAFETY: the pointers are only dereferenced inside `matmul`, whose caller vouches for them;
// tasks write disjoint tiles of `out`.
unsafe impl Send for Operands {}
unsafe impl Sync for Operands {}

/// `out = scale · (a @ b) + bias + res`, `[m, k] × [k, n]`, on `threads` threads of the current
/// rayon pool.
///
/// # Safety
/// The CPU runs `kern`'s level; `a` holds `m` rows of `k` floats `lda` apart, `b`
/// `kern.packed_len(k, n)` floats, `out` and `res` `m` rows of `n` floats `ldc` apart, `bias` `n`;
/// `out` overlaps none of them except, element for element, `res`.
pub unsafe fn matmul(kern: &MicroKernel, o: Operands, m: usize, k: usize, n: usize, threads: usize) {
    if m == 0 || n == 0 {
        return;
    }
    let panels = n.div_ceil(kern.nr);
    let tiles = m.div_ceil(kern.mr);
    let row_blocks = balanced_blocks(tiles, kern.mc / kern.mr, threads);
    let groups = if threads > 1 {
        (3 * threads).div_ceil(row_blocks).clamp(1, panels)
    } else {
        1
    };
    let per = panels.div_ceil(groups);
    // Few rows reuse no panel: stream the whole depth at once.
    let kc = if m <= kern.mr { k.max(1) } else { kern.kc };
    let task = |t: usize| {
        let (rb, g) = (t / groups, t % groups);
        let tile_range = rb * tiles / row_blocks..(rb + 1) * tiles / row_blocks;
        let rows = tile_range.start * kern.mr..(tile_range.end * kern.mr).min(m);
        let cols = g * per..((g + 1) * per).min(panels);
        // SAFETY: the caller's bounds; the task's tiles are its own.
        unsafe { block(kern, o, (rows.clone(), cols.clone()), (k, n, kc)) };
        if let Some(f) = o.post {
            let (c0, c1) = (cols.start * kern.nr, (cols.end * kern.nr).min(n));
            // SAFETY: the block lies inside `out`; the kernel reads and writes each element once.
            unsafe { post(f, o, rows, c0..c1) };
        }
    };
    let tasks = row_blocks * groups;
    if threads > 1 && tasks > 1 {
        crate::pool::for_each(tasks, task);
    } else {
        (0..tasks).for_each(task);
    }
}

/// How many row blocks `tiles` row tiles make, about `per` tiles each: a multiple of `threads`
/// where there are enough tiles, so that every thread gets the same number of equal blocks.
fn balanced_blocks(tiles: usize, per: usize, threads: usize) -> usize {
    let blocks = tiles.div_ceil(per.max(1));
    if threads > 1 && blocks > 1 && tiles >= threads {
        (blocks.div_ceil(threads) * threads).min(tiles)
    } else {
        blocks
    }
}

/// Applies the activation in place over rows × columns `c` of `out`.
unsafe fn post(f: Post, o: Operands, rows: std::ops::Range<usize>, c: std::ops::Range<usize>) {
    if rows.is_empty() || c.is_empty() {
        return;
    }
    match f {
        Post::Kernel(f) => {
            let offs: Vec<i64> = rows.clone().flat_map(|r| [(r * o.ldc + c.start) as i64; 2]).collect();
            let ptrs = [o.out as *mut u8; 2];
            f(rows.len() as i64, c.len() as i64, offs.as_ptr(), ptrs.as_ptr());
        }
        Post::Tape(tape, len, level) => {
            let tape = std::slice::from_raw_parts(tape, len);
            let at = o.out.add(rows.start * o.ldc + c.start);
            crate::vmap::apply(tape, level, at, rows.len(), c.len(), o.ldc);
        }
    }
}

/// Rows × panels of the product, depth block by depth block.
unsafe fn block(
    kern: &MicroKernel,
    o: Operands,
    (rows, panels): (std::ops::Range<usize>, std::ops::Range<usize>),
    (k, n, kc): (usize, usize, usize),
) {
    let nr = kern.nr;
    if k == 0 {
        // No depth: the product is zero; the epilogue still runs.
        let zero = vec![0f32; kern.mr * nr];
        for p in panels {
            for i in rows.clone().step_by(kern.mr) {
                let t = tile(o, (i, p * nr), n, nr, 0, false, true, zero.as_ptr());
                t.store_scalar(kern.mr.min(rows.end - i), nr, &zero);
            }
        }
        return;
    }
    for k0 in (0..k).step_by(kc) {
        let depth = kc.min(k - k0);
        let (first, last) = (k0 == 0, k0 + depth == k);
        let tiles = rows.len().div_ceil(kern.mr);
        for p in panels.clone() {
            let b = o.b.add(p * k * nr + k0 * nr);
            let next = next_block(nr, (k, k0, depth, kc), p, panels.clone(), o.b);
            for (ti, i) in rows.clone().step_by(kern.mr).enumerate() {
                if let (Some((nb, len)), true) = (next, tiles > 1) {
                    prefetch(nb, len, ti, tiles);
                }
                let mut t = tile(o, (i, p * nr), n, nr, depth, !first, last, b);
                t.a = t.a.add(k0);
                (kern.run)(kern.mr.min(rows.end - i), &t);
            }
        }
    }
}

/// The panel block a task reads after panel `p` at depth `k0` (the next panel, or the first
/// panel at the next depth block) and its length in floats.
fn next_block(
    nr: usize,
    (k, k0, depth, kc): (usize, usize, usize, usize),
    p: usize,
    panels: std::ops::Range<usize>,
    b: *const f32,
) -> Option<(*const f32, usize)> {
    if p + 1 < panels.end {
        Some((b.wrapping_add((p + 1) * k * nr + k0 * nr), depth * nr))
    } else if k0 + depth < k {
        let d = kc.min(k - k0 - depth);
        Some((b.wrapping_add(panels.start * k * nr + (k0 + depth) * nr), d * nr))
    } else {
        None
    }
}

/// Hints the `part`-th of `parts` slices of `len` floats at `p` into L2.
#[inline]
fn prefetch(p: *const f32, len: usize, part: usize, parts: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        let lines = (len * 4).div_ceil(64);
        let per = lines.div_ceil(parts.max(1));
        for l in part * per..((part + 1) * per).min(lines) {
            // SAFETY: a prefetch never faults; the address is computed without dereferencing.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(l * 16) as *const i8) };
        }
    }
    let _ = (p, len, part, parts);
}

/// The tile at row `i`, column `j`.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    o: Operands,
    (i, j): (usize, usize),
    n: usize,
    nr: usize,
    kc: usize,
    load_c: bool,
    last: bool,
    b: *const f32,
) -> Tile {
    let nullable = |p: *const f32, off: usize| if p.is_null() { p } else { p.add(off) };
    Tile {
        a: o.a.add(i * o.lda),
        lda: o.lda,
        b,
        kc,
        c: o.out.add(i * o.ldc + j),
        ldc: o.ldc,
        cols: nr.min(n - j),
        load_c,
        last,
        scale: o.scale,
        bias: nullable(o.bias, j),
        res: nullable(o.res, i * o.ldc + j),
    }
}

#[cfg(test)]
mod tests;
