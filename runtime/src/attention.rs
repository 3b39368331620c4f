//! Attention without the score matrix: FlashAttention's schedule on a CPU (`Step::Attention`).
//!
//! Per batch and head (one task each), blocks of up to `ATTN_ROWS` query rows stay hot while the
//! keys and values stream past in blocks of `KV_BLOCK`. Each block's scores (`scale · q kᵀ`, the
//! level's microkernel over keys packed once per head as `Kᵀ`) go through the step's logits kernel
//! (the softmax's prologue: mask, bias) and an online softmax at the level's vector width
//! (`softmax.rs`): a row's running maximum and sum rescale its accumulated `p v` whenever the
//! maximum grows, and the output row is divided by the sum once at the end. Scores only ever
//! exist as one `ATTN_ROWS × KV_BLOCK` block (64 KiB).
//!
//! Decode steps (≤ `FEW_QUERY_ROWS` query rows) read keys and values in place — from the
//! key/value cache when the step says so — with dot products and axpys: packing would cost as much
//! as the products. Artifacts written before the logits kernel existed bring only the fused softmax
//! kernel; it runs over whole score rows (one key block) and the normalisation is its own.

use crate::cpu::Level;
use crate::gemm::{self, MicroKernel, Operands};
use crate::kernels::{bstrides, check_len, dot, Buf, KernelFn};
use crate::plan::ColumnView;
use crate::softmax;

/// Query rows per block.
const ATTN_ROWS: usize = 64;

/// Keys per block: a multiple of every microkernel's panel width, so a block's keys are whole
/// panels of the packed `Kᵀ`.
const KV_BLOCK: usize = 256;

/// Attention with at most this many query rows reads keys and values in place (no packing).
const FEW_QUERY_ROWS: usize = 4;

/// The softmax a step brings.
#[derive(Clone, Copy)]
pub enum Softmax {
    /// The logits kernel (the softmax's elementwise prologue only), and whether it only adds
    /// its second input to the scores; the softmax runs here.
    Online(KernelFn, bool),
    /// The whole fused softmax kernel, over complete score rows (artifacts without a logits kernel).
    Rows(KernelFn),
}

/// A value and its shape.
pub type Operand<'a> = (Buf, &'a [usize]);

/// Element strides of an attention operand: (base, batch, head, row).
type Strides = (usize, usize, usize, usize);

/// An attention operand seen as `[b, h, s, d]` with `(base, batch, head, row)` element strides:
/// stored `[b, h, s, d]`, or `[b, s, h, d]` (`seq_major`), or `heads · d` columns at an offset of
/// a `[b, s, W]` row (a column view of a merged projection).
pub(crate) fn attn_layout(s: &[usize], sm: bool, view: Option<ColumnView>) -> Result<([usize; 4], Strides), String> {
    match view {
        Some(cv) => {
            let (h, d, off) = (cv.heads as usize, cv.head_dim as usize, cv.offset as usize);
            if s.len() != 3 || off.saturating_add(h.saturating_mul(d)) > s[2] {
                return Err(format!("column view {cv:?} does not fit a value of shape {s:?}"));
            }
            Ok(([s[0], h, s[1], d], (off, s[1] * s[2], d, s[2])))
        }
        None if s.len() != 4 => Err(format!("attention operand of shape {s:?} must have rank 4")),
        None if sm => Ok(([s[0], s[2], s[1], s[3]], (0, s[1] * s[2] * s[3], s[3], s[2] * s[3]))),
        None => Ok(([s[0], s[1], s[2], s[3]], (0, s[1] * s[2] * s[3], s[2] * s[3], s[3]))),
    }
}

/// How the step's operands are laid out (`Step::Attention`'s fields).
pub struct Layout<'a> {
    /// Per kernel input: contiguous along the key axis.
    pub contiguous: &'a [bool],
    /// q, k, v, out stored `[b, s, h, d]`.
    pub seq_major: [bool; 4],
    /// q, k, v read as columns of a wider value.
    pub views: [Option<ColumnView>; 3],
    /// k, v read in place from a cache of this capacity.
    pub cached: [Option<usize>; 2],
}

/// Blocked attention with an online softmax: see the module's documentation.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    [q, k, v, out]: [Operand; 4],
    scale: f32,
    softmax: Softmax,
    inputs: &[Option<Operand>],
    layout: &Layout,
    threads: usize,
    level: Level,
) -> Result<(), String> {
    let g = Geometry::new([q, k, v, out], layout)?;
    let strides = input_strides(inputs, layout.contiguous, [g.b, g.h, g.sq, g.sk])?;
    if g.b * g.h * g.sq == 0 || g.sk == 0 {
        return Ok(());
    }
    let row_bias = row_bias(softmax, inputs, &strides);
    let job = Job {
        ptrs: [q.0.ptr as usize, k.0.ptr as usize, v.0.ptr as usize, out.0.ptr as usize],
        inputs: inputs
            .iter()
            .map(|i| i.map_or(0, |(buf, _)| buf.ptr as usize))
            .collect(),
        strides,
        scale,
        row_bias,
        softmax,
        kern: MicroKernel::for_level(level),
        level,
        g,
    };
    if threads > 1 && g.b * g.h > 1 {
        crate::pool::for_each(g.b * g.h, |bh| job.head(bh));
    } else {
        (0..g.b * g.h).for_each(|bh| job.head(bh));
    }
    Ok(())
}

/// The checked sizes and strides of q, k, v and out.
#[derive(Clone, Copy)]
struct Geometry {
    b: usize,
    h: usize,
    sq: usize,
    sk: usize,
    d: usize,
    dv: usize,
    qst: Strides,
    kst: Strides,
    vst: Strides,
    ost: Strides,
}

impl Geometry {
    fn new([q, k, v, out]: [Operand; 4], l: &Layout) -> Result<Geometry, String> {
        let (qs, qst) = attn_layout(q.1, l.seq_major[0], l.views[0])?;
        let (ks, mut kst) = attn_layout(k.1, l.seq_major[1], l.views[1])?;
        let (vs, mut vst) = attn_layout(v.1, l.seq_major[2], l.views[2])?;
        // Keys and values read in place from the cache: [b, h, capacity, d], `s` rows valid per head.
        for (i, st, sh, buf, what) in [(0, &mut kst, ks, k.0, "k"), (1, &mut vst, vs, v.0, "v")] {
            if let Some(cap) = l.cached[i] {
                if l.seq_major[i + 1] || sh[2] > cap {
                    return Err(format!("{what} cannot be read from a cache of {cap} positions"));
                }
                if sh[0] * sh[1] * cap * sh[3] * 4 != buf.len {
                    return Err(format!(
                        "{what}: the cache buffer of {} bytes does not hold {sh:?} at capacity {cap}",
                        buf.len
                    ));
                }
                *st = (0, sh[1] * cap * sh[3], cap * sh[3], sh[3]);
            }
        }
        let (os, ost) = attn_layout(out.1, l.seq_major[3], None)?;
        let (b, h, sq, d) = (qs[0], qs[1], qs[2], qs[3]);
        let (sk, dv) = (ks[2], vs[3]);
        if ks != [b, h, sk, d] || vs != [b, h, sk, dv] || os != [b, h, sq, dv] {
            return Err(format!(
                "attention shapes q {qs:?}, k {ks:?}, v {vs:?}, out {os:?} do not fit"
            ));
        }
        let operands = [
            ("q", q, false),
            ("k", k, l.cached[0].is_some()),
            ("v", v, l.cached[1].is_some()),
            ("out", out, false),
        ];
        for (what, x, from_cache) in operands {
            if !from_cache {
                check_len(what, x.0, x.1, 4)?;
            }
        }
        Ok(Geometry {
            b,
            h,
            sq,
            sk,
            d,
            dv,
            qst,
            kst,
            vst,
            ost,
        })
    }
}

/// Per kernel input, its strides over `[b, h, sq, sk]`, or `None` for the score block.
fn input_strides(
    inputs: &[Option<Operand>],
    contiguous: &[bool],
    space: [usize; 4],
) -> Result<Vec<Option<Vec<usize>>>, String> {
    if contiguous.len() != inputs.len() {
        return Err("attention kernel layout does not match its inputs".into());
    }
    let sk = space[3];
    let mut strides = Vec::new();
    for (i, c) in inputs.iter().zip(contiguous) {
        match i {
            None if *c || sk == 1 => strides.push(None),
            None => return Err("the score block is contiguous, the kernel reads it as broadcast".into()),
            Some((buf, s)) => {
                check_len("attention kernel input", *buf, s, 4)?;
                let st = bstrides(s, &space)?;
                if sk > 1 && (st[3] == 1) != *c {
                    return Err(format!("attention input {s:?} does not match the kernel's layout"));
                }
                strides.push(Some(st));
            }
        }
    }
    Ok(strides)
}

/// The mask a sum-of-two-inputs logits kernel adds, if the scores are its first input and the
/// mask is contiguous along the keys and the same for every query row: its address and (batch,
/// head, key) strides.
fn row_bias(
    softmax: Softmax,
    inputs: &[Option<Operand>],
    strides: &[Option<Vec<usize>>],
) -> Option<(usize, [usize; 3])> {
    let Softmax::Online(_, true) = softmax else {
        return None;
    };
    match (inputs, strides) {
        ([None, Some((buf, _))], [None, Some(st)]) if st[2] == 0 && st[3] == 1 => {
            Some((buf.ptr as usize, [st[0], st[1], st[3]]))
        }
        _ => None,
    }
}

/// What every head's task reads. Addresses are `usize` so tasks can share them; every offset
/// derived from them was checked against its buffer in `Geometry::new` and `input_strides`.
struct Job {
    g: Geometry,
    /// q, k, v, out.
    ptrs: [usize; 4],
    /// The softmax kernel's inputs (0 for the score block).
    inputs: Vec<usize>,
    strides: Vec<Option<Vec<usize>>>,
    scale: f32,
    softmax: Softmax,
    /// Where the logits kernel only adds a mask that is the same for every query row: the
    /// mask's address and strides, added as the scores' bias row instead.
    row_bias: Option<(usize, [usize; 3])>,
    kern: &'static MicroKernel,
    level: Level,
}

/// One head's keys (as `Kᵀ`, `[d, sk]`) and values (each key block's `[rows, dv]` separately),
/// packed for the microkernel.
struct Packed {
    kt: Vec<f32>,
    v: Vec<f32>,
}

/// One block: query rows `q0..q0 + r` against keys `j0..j0 + n`.
#[derive(Clone, Copy)]
struct Block {
    bi: usize,
    hi: usize,
    q0: usize,
    r: usize,
    j0: usize,
    n: usize,
}

impl Job {
    fn head(&self, bh: usize) {
        let g = &self.g;
        let kv = match self.softmax {
            Softmax::Online(..) => KV_BLOCK.min(g.sk),
            Softmax::Rows(_) => g.sk,
        };
        let (bi, hi) = (bh / g.h, bh % g.h);
        let packed = (g.sq > FEW_QUERY_ROWS).then(|| self.pack(bi, hi, kv));
        let rows = ATTN_ROWS.min(g.sq);
        let mut scores = vec![0f32; rows * kv];
        // Per query row: the running maximum and sum of the online softmax.
        let mut state = vec![(f32::NEG_INFINITY, 0f32); rows];
        for q0 in (0..g.sq).step_by(rows) {
            let r = rows.min(g.sq - q0);
            state.fill((f32::NEG_INFINITY, 0.0));
            for j0 in (0..g.sk).step_by(kv) {
                let blk = Block {
                    bi,
                    hi,
                    q0,
                    r,
                    j0,
                    n: kv.min(g.sk - j0),
                };
                let s = &mut scores[..r * blk.n];
                self.scores(blk, packed.as_ref(), s);
                self.softmax(blk, s, &mut state);
                self.accumulate(
                    blk,
                    packed
                        .as_ref()
                        .map(|p| &p.v[(j0 / kv) * self.kern.packed_len(kv, g.dv)..]),
                    s,
                );
            }
            if matches!(self.softmax, Softmax::Online(..)) {
                for (i, (_, sum)) in state[..r].iter().enumerate() {
                    self.out_row(bi, hi, q0 + i).iter_mut().for_each(|o| *o /= sum);
                }
            }
        }
    }

    fn pack(&self, bi: usize, hi: usize, kv: usize) -> Packed {
        let (g, kern) = (&self.g, self.kern);
        let (kp, vp) = (self.ptrs[1] as *const f32, self.ptrs[2] as *const f32);
        let (k_off, v_off) = (
            g.kst.0 + bi * g.kst.1 + hi * g.kst.2,
            g.vst.0 + bi * g.vst.1 + hi * g.vst.2,
        );
        let mut kt = vec![0f32; kern.packed_len(g.d, g.sk)];
        // SAFETY (both): rows inside the buffers checked by `Geometry::new`.
        gemm::pack_cols(kern, g.d, g.sk, &mut kt, |j| unsafe {
            std::slice::from_raw_parts(kp.add(k_off + j * g.kst.3), g.d)
        });
        let per = kern.packed_len(kv, g.dv);
        let mut v = vec![0f32; per * g.sk.div_ceil(kv)];
        for (bl, dst) in v.chunks_mut(per).enumerate() {
            let j0 = bl * kv;
            gemm::pack_rows(kern, kv.min(g.sk - j0), g.dv, dst, |kk| unsafe {
                std::slice::from_raw_parts(vp.add(v_off + (j0 + kk) * g.vst.3), g.dv)
            });
        }
        Packed { kt, v }
    }

    /// Address of row `i` of `q` (`x = 0`), `k`, `v` or `out` (`x = 3`) of head (`bi`, `hi`), and
    /// the row's length.
    fn at(&self, x: usize, bi: usize, hi: usize, i: usize) -> (usize, usize) {
        let g = &self.g;
        let (st, len) = [(g.qst, g.d), (g.kst, g.d), (g.vst, g.dv), (g.ost, g.dv)][x];
        (self.ptrs[x] + 4 * (st.0 + bi * st.1 + hi * st.2 + i * st.3), len)
    }

    /// Row `i` of `q`, `k` (`x = 1`) or `v` (`x = 2`) of head (`bi`, `hi`).
    fn row(&self, x: usize, bi: usize, hi: usize, i: usize) -> &[f32] {
        let (p, len) = self.at(x, bi, hi, i);
        // SAFETY: inside the buffer checked by `Geometry::new`.
        unsafe { std::slice::from_raw_parts(p as *const f32, len) }
    }

    /// Output row `i` of head (`bi`, `hi`): this head's task alone writes it.
    #[allow(clippy::mut_from_ref)]
    fn out_row(&self, bi: usize, hi: usize, i: usize) -> &mut [f32] {
        let (p, len) = self.at(3, bi, hi, i);
        // SAFETY: inside the checked output; rows of different heads never overlap, and a task
        // holds one row at a time.
        unsafe { std::slice::from_raw_parts_mut(p as *mut f32, len) }
    }

    /// `s = scale · q kᵀ` for the block (`r × n`, row stride `n`).
    fn scores(&self, b: Block, packed: Option<&Packed>, s: &mut [f32]) {
        let g = &self.g;
        let bias = self.bias_row(b);
        let Some(p) = packed else {
            for i in 0..b.r {
                let q = self.row(0, b.bi, b.hi, b.q0 + i);
                for j in 0..b.n {
                    // SAFETY: the bias row holds the block's `n` keys (`bias_row`).
                    let m = if bias.is_null() { 0.0 } else { unsafe { *bias.add(j) } };
                    s[i * b.n + j] = self.scale * dot(q, self.row(1, b.bi, b.hi, b.j0 + j), self.level.avx2()) + m;
                }
            }
            return;
        };
        let o = Operands {
            a: self.at(0, b.bi, b.hi, b.q0).0 as *const f32,
            lda: g.qst.3,
            ldc: b.n,
            b: p.kt[(b.j0 / self.kern.nr) * g.d * self.kern.nr..].as_ptr(),
            out: s.as_mut_ptr(),
            bias,
            res: std::ptr::null(),
            scale: self.scale,
            post: None,
        };
        // SAFETY: the artifact's level runs the kernel (checked at load); the block's keys are
        // whole panels of `kt` (`KV_BLOCK` is a multiple of `nr`); `s` holds `r × n`.
        unsafe { gemm::matmul(self.kern, o, b.r, g.d, b.n, 1) };
    }

    /// The mask row the scores' epilogue adds for this block (`row_bias`), or null.
    fn bias_row(&self, b: Block) -> *const f32 {
        match self.row_bias {
            // Inside the mask checked by `input_strides`: this batch and head, keys j0...
            Some((p, st)) => (p as *const f32).wrapping_add(b.bi * st[0] + b.hi * st[1] + b.j0 * st[2]),
            None => std::ptr::null(),
        }
    }

    /// Runs the step's kernel over the score block in place; with the logits kernel, then the
    /// online softmax: `s ← exp(s − max)`, the running sums updated and the output rows written
    /// by earlier key blocks rescaled to the new maximum.
    fn softmax(&self, b: Block, s: &mut [f32], state: &mut [(f32, f32)]) {
        match self.softmax {
            // The mask was added by the scores' epilogue.
            Softmax::Online(_, _) if self.row_bias.is_some() => {}
            Softmax::Online(f, _) => self.call(f, b, s),
            Softmax::Rows(f) => return self.call(f, b, s),
        }
        for (i, (row, (m, sum))) in s.chunks_exact_mut(b.n).zip(state.iter_mut()).enumerate() {
            let m_new = m.max(softmax::max(row, self.level));
            let alpha = softmax::exp(*m - m_new);
            *sum = *sum * alpha + softmax::exp_sum(row, m_new, self.level);
            *m = m_new;
            if b.j0 > 0 && alpha != 1.0 {
                self.out_row(b.bi, b.hi, b.q0 + i).iter_mut().for_each(|o| *o *= alpha);
            }
        }
    }

    /// Calls a generated kernel over the block's `r` rows of `n` scores, written in place.
    fn call(&self, f: KernelFn, b: Block, s: &mut [f32]) {
        let nops = self.inputs.len() + 1;
        let mut offs = vec![0i64; b.r * nops];
        for (row, o) in offs.chunks_exact_mut(nops).enumerate() {
            for (j, st) in self.strides.iter().enumerate() {
                o[j] = match st {
                    None => (row * b.n) as i64,
                    Some(st) => (b.bi * st[0] + b.hi * st[1] + (b.q0 + row) * st[2] + b.j0 * st[3]) as i64,
                };
            }
            o[nops - 1] = (row * b.n) as i64;
        }
        let mut ptrs: Vec<usize> = self
            .inputs
            .iter()
            .map(|p| if *p == 0 { s.as_mut_ptr() as usize } else { *p })
            .collect();
        ptrs.push(s.as_mut_ptr() as usize);
        // SAFETY: the kernel reads row `row` of each input at the offsets just computed (inside
        // the checked buffers or the score block) and writes the score block in place, reading
        // each element before it writes it.
        unsafe { f(b.r as i64, b.n as i64, offs.as_ptr(), ptrs.as_ptr() as *const *mut u8) };
    }

    /// `out (+)= p v` for the block's rows (`=` on the first key block).
    fn accumulate(&self, b: Block, packed_v: Option<&[f32]>, p: &[f32]) {
        let g = &self.g;
        let Some(vv) = packed_v else {
            for i in 0..b.r {
                let o = self.out_row(b.bi, b.hi, b.q0 + i);
                if b.j0 == 0 {
                    o.fill(0.0);
                }
                for j in 0..b.n {
                    axpy(o, p[i * b.n + j], self.row(2, b.bi, b.hi, b.j0 + j));
                }
            }
            return;
        };
        let out = self.at(3, b.bi, b.hi, b.q0).0 as *mut f32;
        let o = Operands {
            a: p.as_ptr(),
            lda: b.n,
            ldc: g.ost.3,
            b: vv.as_ptr(),
            out,
            bias: std::ptr::null(),
            res: if b.j0 == 0 { std::ptr::null() } else { out },
            scale: 1.0,
            post: None,
        };
        // SAFETY: as in `scores`; the output rows are this task's, `res` is `out` element for
        // element.
        unsafe { gemm::matmul(self.kern, o, b.r, b.n, g.dv, 1) };
    }
}

/// `dst += a · x`.
fn axpy(dst: &mut [f32], a: f32, x: &[f32]) {
    for (d, x) in dst.iter_mut().zip(x) {
        *d += a * x;
    }
}
