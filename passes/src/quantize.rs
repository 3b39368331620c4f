//! Weight-only quantization of matrix products whose right operand is a weight (`Linear`s, merged
//! projections, a tied LM head): the weight becomes `dequantize(codes, scales[, mins])` over new
//! parameters, which backends fuse into the product so the f32 matrix never exists at run time.
//!
//! Schemes: `int8` (symmetric, one scale per output channel), `int4[:G]` (affine, a scale and a
//! minimum per group of G input columns, f16), `gptq4[:G]` (int4 codes chosen by GPTQ: columns are
//! quantized in order and each one's rounding error is compensated on the columns not yet quantized,
//! weighted by the inverse Hessian `H = 2/n Σ x xᵀ` of the layer's calibration inputs; Frantar et al.,
//! 2022). Quantized weights are stored `[n, k]` (output channels as rows): a weight stored `[k, n]`
//! (GPT-2's Conv1D) is transposed once here and the product's `transpose_b` flipped.
//!
//! Where it pays: only products with at least [`MIN_ELEMENTS`] weights are quantized (a small matrix
//! saves nothing and costs a kernel with poor reuse); `exclude` glob patterns keep named weights in
//! f32. Every decision is in the report.

use std::collections::{BTreeMap, HashMap};

use kiln_ir::{DType, Dim, Graph, NodeId, Op, Tensor};
use rayon::prelude::*;

/// Weights smaller than this stay f32.
pub const MIN_ELEMENTS: usize = 4096;

/// How weights are quantized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// Symmetric int8, one scale per output channel.
    Int8,
    /// Affine int4, a scale and a minimum per group of input columns, round to nearest.
    Int4 {
        /// Columns per group.
        group: u64,
    },
    /// Affine int4 with codes chosen by GPTQ.
    Gptq4 {
        /// Columns per group.
        group: u64,
    },
}

impl std::str::FromStr for Scheme {
    type Err = String;
    fn from_str(s: &str) -> Result<Scheme, String> {
        let (name, group) = match s.split_once(':') {
            Some((n, g)) => (
                n,
                Some(
                    g.parse::<u64>()
                        .map_err(|_| format!("`{s}`: the group size must be a number"))?,
                ),
            ),
            None => (s, None),
        };
        let group = group.unwrap_or(128);
        if name != "int8" && ![32, 64, 128].contains(&group) {
            return Err(format!("`{s}`: int4 groups are 32, 64 or 128 columns"));
        }
        match name {
            "int8" if s.contains(':') => Err(format!("`{s}`: int8 has one scale per output channel, no groups")),
            "int8" => Ok(Scheme::Int8),
            "int4" => Ok(Scheme::Int4 { group }),
            "gptq4" => Ok(Scheme::Gptq4 { group }),
            _ => Err(format!(
                "unknown quantization `{s}` (expected int8, int4[:GROUP] or gptq4[:GROUP])"
            )),
        }
    }
}

impl std::fmt::Display for Scheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scheme::Int8 => write!(f, "int8"),
            Scheme::Int4 { group } => write!(f, "int4:{group}"),
            Scheme::Gptq4 { group } => write!(f, "gptq4:{group}"),
        }
    }
}

/// A product whose weight can be quantized.
#[derive(Clone, Debug)]
pub struct Target {
    /// The matrix product.
    pub matmul: NodeId,
    /// Its weight operand (a parameter, or a subgraph of parameters such as a concatenation).
    pub weight: NodeId,
    /// A name for reports: the parameter's, or the weight node's.
    pub name: String,
    /// Output channels.
    pub n: usize,
    /// Input columns.
    pub k: usize,
}

/// Does `name` match the glob `pat` (`*` any run, `?` one character)?
pub fn glob(pat: &str, name: &str) -> bool {
    fn go(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], s) || (!s.is_empty() && go(p, &s[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &s[1..]),
            _ => false,
        }
    }
    go(pat.as_bytes(), name.as_bytes())
}

/// Whether `n` depends on weights and constants only.
fn weight_only(g: &Graph, n: NodeId, memo: &mut HashMap<NodeId, bool>) -> bool {
    if let Some(v) = memo.get(&n) {
        return *v;
    }
    let v = match g.node(n).op {
        Op::Param { .. } | Op::Scalar { .. } => true,
        Op::Input { .. }
        | Op::Iota { .. }
        | Op::CacheAppend { .. }
        | Op::Dequantize { .. }
        | Op::Densify { .. }
        | Op::Densify24 { .. } => false,
        _ => g.args(n).iter().all(|a| weight_only(g, *a, memo)),
    };
    memo.insert(n, v);
    v
}

/// The products that could be quantized, and why others are not.
pub fn targets(g: &Graph, exclude: &[String]) -> (Vec<Target>, Vec<(String, String)>) {
    let mut memo = HashMap::new();
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    let order = g.topo_order().unwrap_or_default();
    for id in order {
        let Op::MatMul {
            transpose_a: false,
            transpose_b,
        } = g.node(id).op
        else {
            continue;
        };
        let w = g.args(id)[1];
        let wt = &g.node(w).ty;
        if wt.rank() != 2 || wt.dtype != DType::F32 || !weight_only(g, w, &mut memo) {
            continue;
        }
        let (Some(r), Some(c)) = (wt.shape[0].as_known(), wt.shape[1].as_known()) else {
            continue;
        };
        let (n, k) = if transpose_b { (r, c) } else { (c, r) };
        let name = match &g.node(w).op {
            Op::Param { name, .. } => name.clone(),
            _ => g.node(w).name.clone(),
        };
        let params = param_names(g, w);
        if let Some(p) = exclude
            .iter()
            .find(|p| glob(p, &name) || params.iter().any(|q| glob(p, q)))
        {
            skipped.push((name, format!("excluded by `{p}`")));
            continue;
        }
        if ((n * k) as usize) < MIN_ELEMENTS {
            skipped.push((name, format!("{n}x{k} is below {MIN_ELEMENTS} weights")));
            continue;
        }
        out.push(Target {
            matmul: id,
            weight: w,
            name,
            n: n as usize,
            k: k as usize,
        });
    }
    (out, skipped)
}

fn param_names(g: &Graph, n: NodeId) -> Vec<String> {
    match &g.node(n).op {
        Op::Param { name, .. } => vec![name.clone()],
        _ => g.args(n).iter().flat_map(|a| param_names(g, *a)).collect(),
    }
}

/// The value of a weight-only node, `[n, k]` row-major (output channels as rows).
pub(crate) fn weight_rows(g: &Graph, t: &Target, weights: &BTreeMap<String, Tensor>) -> Result<Vec<f32>, String> {
    fn eval(
        g: &Graph,
        n: NodeId,
        weights: &BTreeMap<String, Tensor>,
        memo: &mut HashMap<NodeId, kiln_interp::Value>,
    ) -> Result<kiln_interp::Value, String> {
        if let Some(v) = memo.get(&n) {
            return Ok(v.clone());
        }
        let node = g.node(n);
        let v = match &node.op {
            Op::Param { name, ty } => {
                let t = weights
                    .get(name)
                    .ok_or_else(|| format!("weight `{name}` is not bound"))?;
                kiln_interp::Value::from_tensor(t, ty.dtype)
            }
            op => {
                let args: Vec<kiln_interp::Value> = g
                    .args(n)
                    .iter()
                    .map(|a| eval(g, *a, weights, memo))
                    .collect::<Result<_, _>>()?;
                let refs: Vec<&kiln_interp::Value> = args.iter().collect();
                kiln_interp::eval_op(op, &node.ty, &refs, &kiln_ir::Bindings::new())?
            }
        };
        memo.insert(n, v.clone());
        Ok(v)
    }
    let Op::MatMul { transpose_b, .. } = g.node(t.matmul).op else {
        unreachable!("targets are matrix products")
    };
    let (n, k) = (t.n, t.k);
    // A weight bound as it is (the usual case) is read as f32, without the evaluator's f64 copy.
    let stored = match &g.node(t.weight).op {
        Op::Param { name, .. } => weights.get(name).and_then(|t| match t.data() {
            kiln_ir::TensorData::F32(v) if v.len() == n * k => Some(v.as_slice()),
            _ => None,
        }),
        _ => None,
    };
    let flat: std::borrow::Cow<[f32]> = match stored {
        Some(v) => std::borrow::Cow::Borrowed(v),
        None => {
            let v = eval(g, t.weight, weights, &mut HashMap::new())?;
            std::borrow::Cow::Owned(v.data.iter().map(|x| *x as f32).collect())
        }
    };
    Ok(if transpose_b {
        flat.into_owned()
    } else {
        // [k, n] → [n, k] in 32 × 32 tiles: row by row, every write would touch a new line.
        const T: usize = 32;
        let mut w = vec![0f32; n * k];
        for r0 in (0..k).step_by(T) {
            for c0 in (0..n).step_by(T) {
                for r in r0..(r0 + T).min(k) {
                    for c in c0..(c0 + T).min(n) {
                        w[c * k + r] = flat[r * n + c];
                    }
                }
            }
        }
        w
    })
}

/// `Σ x xᵀ` over the rows of a layer's calibration inputs.
///
/// Rows are buffered and added [`FLUSH_ROWS`] at a time as one matrix product: adding each
/// sample's few rows with scalar-width loops was most of a GPTQ compile's calibration time.
#[derive(Clone, Debug)]
pub struct Hessian {
    k: usize,
    h: Vec<f64>,
    rows: usize,
    weight: f64,
    /// Rows not yet added, and each one's weight.
    pending: Vec<f64>,
    pending_weights: Vec<f64>,
}

/// Buffered rows per addition.
const FLUSH_ROWS: usize = 128;

impl Hessian {
    /// An empty accumulator for `k` input columns.
    pub fn new(k: usize) -> Hessian {
        Hessian {
            k,
            h: vec![0.0; k * k],
            rows: 0,
            weight: 0.0,
            pending: Vec::new(),
            pending_weights: Vec::new(),
        }
    }

    /// Adds the rows of `x` (`[.., k]`, f32).
    pub fn add(&mut self, x: &Tensor) -> Result<(), String> {
        self.add_weighted(x, 1.0)
    }

    /// Adds the rows of `x` (`[.., k]`, f32), each counted `weight` times.
    pub fn add_weighted(&mut self, x: &Tensor, weight: f64) -> Result<(), String> {
        if x.shape().last() != Some(&self.k) {
            return Err(format!("calibration input {:?} does not end in {}", x.shape(), self.k));
        }
        let v = x.to_f64_vec();
        let rows = v.len() / self.k;
        self.pending.extend(v);
        self.pending_weights.extend(std::iter::repeat_n(weight, rows));
        self.rows += rows;
        self.weight += weight * rows as f64;
        if self.pending_weights.len() >= FLUSH_ROWS {
            self.flush();
        }
        Ok(())
    }

    /// Adds the buffered rows: `H += (w ⊙ X)ᵀ X` as one matrix product (the `gemm` crate, at the
    /// CPU's vector width and on every thread), though only the lower triangle is read.
    fn flush(&mut self) {
        let (k, rows) = (self.k, self.pending_weights.len());
        let mut xw = self.pending.clone();
        for (row, w) in xw.chunks_exact_mut(k).zip(&self.pending_weights) {
            row.iter_mut().for_each(|x| *x *= w);
        }
        let threads = rayon::current_num_threads();
        let par = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        // Only the lower triangle is read: row block [i0, i1) takes columns 0..i1 (eight blocks
        // do 56% of the full product's work).
        let step = k.div_ceil(8).max(1);
        for i0 in (0..k).step_by(step) {
            let i1 = (i0 + step).min(k);
            // SAFETY: `h` is k × k row-major; `xw` and `pending` are rows × k row-major, read as
            // `xwᵀ` rows i0..i1 (columns of xw) and `x` columns 0..i1.
            unsafe {
                gemm::gemm::<f64>(
                    i1 - i0,
                    i1,
                    rows,
                    self.h.as_mut_ptr().add(i0 * k),
                    1,
                    k as isize,
                    true,
                    xw.as_ptr().add(i0),
                    k as isize,
                    1,
                    self.pending.as_ptr(),
                    1,
                    k as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    par,
                )
            };
        }
        self.pending.clear();
        self.pending_weights.clear();
    }

    /// Rows accumulated.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The symmetric matrix `2/n Σ x xᵀ`.
    fn matrix(&self) -> Vec<f64> {
        if !self.pending_weights.is_empty() {
            let mut all = self.clone();
            all.flush();
            return all.matrix();
        }
        let k = self.k;
        let s = if self.weight > 0.0 { 2.0 / self.weight } else { 0.0 };
        let mut m = vec![0.0; k * k];
        for i in 0..k {
            for j in 0..=i {
                let v = self.h[i * k + j] * s;
                m[i * k + j] = v;
                m[j * k + i] = v;
            }
        }
        m
    }
}

/// What quantization did.
#[derive(Clone, Debug, Default)]
pub struct QuantReport {
    /// Per quantized weight: name, `[n, k]`, relative Frobenius error of the dequantized weight,
    /// the scheme of the form kept.
    pub quantized: Vec<(String, usize, usize, f64, String)>,
    /// Weights whose f32 form was measured fastest and kept.
    pub kept: Vec<String>,
    /// Per weight given a choice: name, the form kept, the measured times of every form.
    pub forms: Vec<(String, String, String)>,
    /// Weights left in f32, and why.
    pub skipped: Vec<(String, String)>,
    /// Bytes of the quantized weights before (f32) and after (codes, scales, mins).
    pub bytes: (usize, usize),
}

/// Quantized codes and their scales (and mins for int4) of one `[n, k]` matrix.
struct Quantized {
    codes: Tensor,
    scale: Tensor,
    min: Option<Tensor>,
    dequantized: Vec<f32>,
    /// Column `c` of the stored matrix is column `perm[c]` of the original (act-order GPTQ).
    perm: Option<Vec<usize>>,
}

fn quantize_int8(w: &[f32], n: usize, k: usize) -> Quantized {
    let mut codes = vec![0i8; n * k];
    let mut scales = vec![0f32; n];
    let mut deq = vec![0f32; n * k];
    for r in 0..n {
        let row = &w[r * k..(r + 1) * k];
        let amax = row.iter().fold(0f32, |m, x| m.max(x.abs()));
        let s = if amax > 0.0 { amax / 127.0 } else { 1.0 };
        scales[r] = s;
        for c in 0..k {
            let q = (row[c] / s).round().clamp(-127.0, 127.0);
            codes[r * k + c] = q as i8;
            deq[r * k + c] = q * s;
        }
    }
    Quantized {
        codes: Tensor::new(vec![n, k], kiln_ir::TensorData::I8(codes)).expect("n × k codes"),
        scale: Tensor::from_f32(vec![n, 1], scales).expect("shape"),
        min: None,
        dequantized: deq,
        perm: None,
    }
}

/// Scale and minimum of a group (as stored, f16-rounded) for 4-bit codes: the range is shrunk
/// towards the group's middle by the factor (of 20 tried, 1.0 down to 0.62) that minimises the
/// group's squared rounding error — clipping a few outliers buys a finer step for the rest.
fn int4_params(vals: &[f32]) -> (f32, f32) {
    int4_params_weighted(vals, None)
}

/// [`int4_params`] with each value's squared error weighted by `imp`: the search compiled for
/// the widest vectors this CPU has (the candidates' loop vectorises; IEEE division and no
/// contraction into FMA, so every width computes the same result).
fn int4_params_weighted(vals: &[f32], imp: Option<&[f64]>) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { int4_search_avx512(vals, imp) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { int4_search_avx2(vals, imp) };
        }
    }
    int4_search(vals, imp)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn int4_search_avx512(vals: &[f32], imp: Option<&[f64]>) -> (f32, f32) {
    int4_search(vals, imp)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn int4_search_avx2(vals: &[f32], imp: Option<&[f64]>) -> (f32, f32) {
    int4_search(vals, imp)
}

/// The clipping search behind [`int4_params_weighted`].
#[inline(always)]
fn int4_search(vals: &[f32], imp: Option<&[f64]>) -> (f32, f32) {
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for v in vals {
        lo = lo.min(*v);
        hi = hi.max(*v);
    }
    if hi <= lo {
        let m = half::f16::from_f32(lo).to_f32();
        return (1.0, m);
    }
    // Every candidate's scale and minimum first; then one pass over the values accumulates all
    // candidates' errors, each in value order as a candidate-at-a-time loop would (the same
    // sums), but as independent chains instead of one latency-bound chain per candidate.
    const CANDIDATES: usize = 20;
    let (mut ss, mut ms) = ([0f32; CANDIDATES], [0f32; CANDIDATES]);
    for step in 0..CANDIDATES {
        let shrink = 1.0 - 0.02 * step as f32;
        let mid = 0.5 * (lo + hi);
        let (l, h) = (mid - (mid - lo) * shrink, mid + (hi - mid) * shrink);
        ss[step] = half::f16::from_f32((h - l) / 15.0).to_f32().max(f32::MIN_POSITIVE);
        ms[step] = half::f16::from_f32(l).to_f32();
    }
    let mut err = [0f32; CANDIDATES];
    let mut add = |v: f32, weight: f32| {
        for ((e, s), m) in err.iter_mut().zip(&ss).zip(&ms) {
            let d = code4(v, *s, *m) as f32 * s + m - v;
            *e += d * d * weight;
        }
    };
    match imp {
        None => vals.iter().for_each(|v| add(*v, 1.0)),
        Some(w) => vals.iter().zip(w).for_each(|(v, w)| add(*v, *w as f32)),
    }
    let mut best = (f32::INFINITY, 1.0, lo);
    for ((e, s), m) in err.iter().zip(&ss).zip(&ms) {
        if *e < best.0 {
            best = (*e, *s, *m);
        }
    }
    (best.1, best.2)
}

/// The 4-bit code of `v`: `((v - m) / s)` rounded half away from zero, clamped to 0..=15.
/// Clamping first lets the rounding be a truncation and one comparison (`t - ⌊t⌋` is exact for
/// `t ≥ 0`), the same result as `f32::round` without its libm call: on x86-64's baseline (no
/// SSE4.1) `round` is a function call, and this runs 20 times per weight in the clipping search.
#[inline]
fn code4(v: f32, s: f32, m: f32) -> u8 {
    let t = ((v - m) / s).clamp(0.0, 15.0);
    let i = t as u8;
    i + (t - i as f32 >= 0.5) as u8
}

/// Packs `[n, k]` 4-bit codes: per 32-column block, byte `i` = column `i` | column `i + 16` << 4.
fn pack4(codes: &[u8], n: usize, k: usize) -> Tensor {
    let mut out = vec![0u8; n * k / 2];
    for r in 0..n {
        for b in 0..k / 32 {
            for i in 0..16 {
                let lo = codes[r * k + b * 32 + i];
                let hi = codes[r * k + b * 32 + i + 16];
                out[r * k / 2 + b * 16 + i] = lo | (hi << 4);
            }
        }
    }
    Tensor::new(vec![n, k / 2], kiln_ir::TensorData::U8(out)).expect("n × k/2 codes")
}

fn finish4(
    codes: Vec<u8>,
    scales: Vec<f32>,
    mins: Vec<f32>,
    deq: Vec<f32>,
    n: usize,
    k: usize,
    group: usize,
) -> Quantized {
    let groups = k / group;
    let f16 = |v: &[f32]| {
        Tensor::from_f64(
            DType::F16,
            vec![n, groups],
            &v.iter().map(|x| *x as f64).collect::<Vec<_>>(),
        )
        .expect("scales fit f16")
    };
    Quantized {
        codes: pack4(&codes, n, k),
        scale: f16(&scales),
        min: Some(f16(&mins)),
        dequantized: deq,
        perm: None,
    }
}

fn quantize_int4(w: &[f32], n: usize, k: usize, group: usize) -> Quantized {
    use rayon::prelude::*;
    let groups = k / group;
    // Rows in parallel: each is independent, and the clipping search is most of a compile.
    // Per row: codes, scales, minimums, dequantized values.
    type Row = (Vec<u8>, Vec<f32>, Vec<f32>, Vec<f32>);
    let rows: Vec<Row> = w
        .par_chunks(k.max(1))
        .take(n)
        .map(|row| {
            let (mut codes, mut scales, mut mins, mut deq) =
                (vec![0u8; k], vec![0f32; groups], vec![0f32; groups], vec![0f32; k]);
            for gi in 0..groups {
                let cols = gi * group..(gi + 1) * group;
                let (s, m) = int4_params(&row[cols.clone()]);
                scales[gi] = s;
                mins[gi] = m;
                for c in cols {
                    codes[c] = code4(row[c], s, m);
                    deq[c] = codes[c] as f32 * s + m;
                }
            }
            (codes, scales, mins, deq)
        })
        .collect();
    let (mut codes, mut deq) = (Vec::with_capacity(n * k), Vec::with_capacity(n * k));
    let (mut scales, mut mins) = (Vec::with_capacity(n * groups), Vec::with_capacity(n * groups));
    for (c, s, m, d) in rows {
        codes.extend(c);
        scales.extend(s);
        mins.extend(m);
        deq.extend(d);
    }
    finish4(codes, scales, mins, deq, n, k, group)
}

/// Lower Cholesky factor of the symmetric positive definite `a` (`k x k`), in place.
///
/// Column `j`'s entries below the diagonal are independent dot products with row `j`: they run
/// four at a time (four independent accumulation chains instead of one latency-bound chain) and
/// in parallel, each summed in the same order as one at a time.
fn cholesky(a: &mut [f64], k: usize) -> Result<(), String> {
    use rayon::prelude::*;
    for j in 0..k {
        let mut d = a[j * k + j];
        for p in 0..j {
            d -= a[j * k + p] * a[j * k + p];
        }
        if d <= 0.0 || !d.is_finite() {
            return Err(format!("the calibration Hessian is not positive definite (pivot {j})"));
        }
        let d = d.sqrt();
        a[j * k + j] = d;
        let (head, below) = a.split_at_mut((j + 1) * k);
        let rj = &head[j * k..j * k + j];
        let column = |rows: &mut [f64]| {
            let n = rows.len() / k;
            let mut s = [0f64; 4];
            for (r, si) in s.iter_mut().enumerate().take(n) {
                *si = rows[r * k + j];
            }
            for (p, x) in rj.iter().enumerate() {
                for (r, si) in s.iter_mut().enumerate().take(n) {
                    *si -= rows[r * k + p] * x;
                }
            }
            for (r, si) in s.iter().enumerate().take(n) {
                rows[r * k + j] = si / d;
            }
        };
        if (k - j) * j > 1 << 16 {
            below.par_chunks_mut(4 * k).for_each(column);
        } else {
            below.chunks_mut(4 * k).for_each(column);
        }
        for i in 0..j {
            a[i * k + j] = 0.0;
        }
    }
    Ok(())
}

/// The upper-triangular `U` with `H⁻¹ = Uᵀ U`, as GPTQ needs it: with `J` the reversal and
/// `J H J = L Lᵀ`, `U = J L⁻¹ J`.
fn inverse_upper_cholesky(h: &[f64], k: usize) -> Result<Vec<f64>, String> {
    let mut l = vec![0.0; k * k];
    for i in 0..k {
        for j in 0..k {
            l[i * k + j] = h[(k - 1 - i) * k + (k - 1 - j)];
        }
    }
    cholesky(&mut l, k)?;
    // Inverse of the lower-triangular L, row by row: row i of L⁻¹ is (e_i − Σ_{p<i} L[i,p] ·
    // row p of L⁻¹) / L[i,i] — contiguous row updates, so the O(k³) work streams through cache.
    let mut inv = vec![0.0; k * k];
    for i in 0..k {
        let (done, rest) = inv.split_at_mut(i * k);
        let row = &mut rest[..k];
        row[i] = 1.0;
        for p in 0..i {
            let c = l[i * k + p];
            if c != 0.0 {
                let prow = &done[p * k..p * k + p + 1];
                for (x, y) in row[..=p].iter_mut().zip(prow) {
                    *x -= c * y;
                }
            }
        }
        let d = l[i * k + i];
        for x in row[..=i].iter_mut() {
            *x /= d;
        }
    }
    let mut u = vec![0.0; k * k];
    for i in 0..k {
        for j in 0..k {
            u[i * k + j] = inv[(k - 1 - i) * k + (k - 1 - j)];
        }
    }
    Ok(u)
}

/// GPTQ with affine int4 groups in activation order: columns are quantized by decreasing `H_ii`
/// (the inputs with the most energy first, while the most columns remain to absorb their error),
/// and stored in that order so each group is contiguous; the product then gathers its input's
/// columns in the same order. Blocks of 128 columns with lazy updates.
fn quantize_gptq4(w: &[f32], n: usize, k: usize, group: usize, hess: &Hessian) -> Result<Quantized, String> {
    let h0 = hess.matrix();
    let mut perm: Vec<usize> = (0..k).collect();
    perm.sort_by(|a, b| h0[b * k + b].total_cmp(&h0[a * k + a]).then(a.cmp(b)));
    let mut h = vec![0.0; k * k];
    for (i, pi) in perm.iter().enumerate() {
        for (j, pj) in perm.iter().enumerate() {
            h[i * k + j] = h0[pi * k + pj];
        }
    }
    let mut wv: Vec<f64> = vec![0.0; n * k];
    for r in 0..n {
        for (c, pc) in perm.iter().enumerate() {
            wv[r * k + c] = w[r * k + pc] as f64;
        }
    }
    // Columns no calibration row touched carry no information: quantize them as they are.
    for i in 0..k {
        if h[i * k + i] == 0.0 {
            h[i * k + i] = 1.0;
        }
    }
    // Dampening: GPTQ's 1% of the mean diagonal once the calibration rows outnumber the inputs
    // twice over; 10% below that, where H is rank-deficient and 1% overfits. MiniLM held-out cosine
    // (gptq4:128): 670 calibration tokens 0.9858 at 1%, 0.9885 at 10%; 5000 tokens 0.9925 at 1%,
    // 0.9917 at 10%.
    let damp = if hess.rows >= 2 * k { 0.01 } else { 0.1 };
    let mean_diag = (0..k).map(|i| h[i * k + i]).sum::<f64>() / k as f64;
    for i in 0..k {
        h[i * k + i] += damp * mean_diag;
    }
    let u = inverse_upper_cholesky(&h, k)?;
    let groups = k / group;
    let (mut codes, mut scales, mut mins, mut deq) = (
        vec![0u8; n * k],
        vec![0f32; n * groups],
        vec![0f32; n * groups],
        vec![0f32; n * k],
    );
    const BLOCK: usize = 128;
    // Coordinate-descent sweeps after the GPTQ pass (MiniLM gptq4:128: 0.99251 -> 0.99284 with 3,
    // 0.99287 with 8).
    const REFINE_SWEEPS: usize = 3;
    let wv0 = wv.clone();
    // Rows are independent given U: each is quantized on its own thread.
    codes
        .par_chunks_mut(k)
        .zip(deq.par_chunks_mut(k))
        .zip(scales.par_chunks_mut(groups))
        .zip(mins.par_chunks_mut(groups))
        .zip(wv.par_chunks_mut(k))
        .zip(wv0.par_chunks(k))
        .for_each(|(((((codes, deq), scales), mins), wr), wr0)| {
            let mut err = [0f64; BLOCK];
            let mut i1 = 0;
            while i1 < k {
                let i2 = (i1 + BLOCK).min(k);
                for i in i1..i2 {
                    if i % group == 0 {
                        let cols: Vec<f32> = wr[i..i + group].iter().map(|x| *x as f32).collect();
                        // The range is clipped for the error GPTQ itself weighs: column c's rounding
                        // error counts 1 / U_cc² (MiniLM gptq4:128: 0.98849 -> 0.98903; weighting
                        // by H_cc instead gave 0.98872).
                        let imp: Vec<f64> = (i..i + group).map(|c| 1.0 / u[c * k + c].powi(2)).collect();
                        let (s, m) = int4_params_weighted(&cols, Some(&imp));
                        scales[i / group] = s;
                        mins[i / group] = m;
                    }
                    let (s, m) = (scales[i / group], mins[i / group]);
                    let x = wr[i];
                    let q = code4(x as f32, s, m);
                    let dq = q as f32 * s + m;
                    codes[i] = q;
                    deq[i] = dq;
                    let e = (x - dq as f64) / u[i * k + i];
                    err[i - i1] = e;
                    let urow = &u[i * k..i * k + k];
                    for c in i + 1..i2 {
                        wr[c] -= e * urow[c];
                    }
                }
                // The block's errors update every later column at once.
                for (bi, e) in err[..i2 - i1].iter().enumerate() {
                    if *e == 0.0 {
                        continue;
                    }
                    let urow = &u[(i1 + bi) * k..(i1 + bi) * k + k];
                    for c in i2..k {
                        wr[c] -= e * urow[c];
                    }
                }
                i1 = i2;
            }
            refine_row(wr0, codes, scales, mins, deq, &h, k, group, REFINE_SWEEPS);
        });
    // The report compares against the original column order.
    let mut unpermuted = vec![0f32; n * k];
    for r in 0..n {
        for (c, pc) in perm.iter().enumerate() {
            unpermuted[r * k + pc] = deq[r * k + c];
        }
    }
    let mut q = finish4(codes, scales, mins, unpermuted, n, k, group);
    q.perm = (perm.iter().enumerate().any(|(i, p)| i != *p)).then_some(perm);
    Ok(q)
}

/// Lowers one row's quantization objective `(dq - w)ᵀ H (dq - w)` further after GPTQ's single
/// pass: alternately refits each group's scale and minimum exactly (a 2x2 least-squares solve
/// under `H`, kept only if it still helps after f16 rounding) and moves single codes by ±1 where
/// that lowers the objective (coordinate descent with the gradient `H (dq - w)` kept current).
#[allow(clippy::too_many_arguments)]
fn refine_row(
    w: &[f64],
    codes: &mut [u8],
    scales: &mut [f32],
    mins: &mut [f32],
    deq: &mut [f32],
    h: &[f64],
    k: usize,
    group: usize,
    sweeps: usize,
) {
    let mut e: Vec<f64> = (0..k).map(|c| deq[c] as f64 - w[c]).collect();
    // g = H e, four rows at a time: four independent sums (each in column order) instead of one
    // latency-bound chain.
    let mut g = vec![0f64; k];
    for (g4, h4) in g.chunks_mut(4).zip(h.chunks(4 * k)) {
        let mut s = [-0.0f64; 4];
        for (c, ec) in e.iter().enumerate() {
            for (r, sr) in s.iter_mut().enumerate().take(g4.len()) {
                *sr += h4[r * k + c] * ec;
            }
        }
        g4.copy_from_slice(&s[..g4.len()]);
    }
    let apply = |c: usize, d: f64, e: &mut [f64], g: &mut [f64]| {
        e[c] += d;
        for (gi, hc) in g.iter_mut().zip(&h[c * k..c * k + k]) {
            *gi += d * hc;
        }
    };
    let block_sums: Vec<f64> = (0..k / group)
        .map(|gi| {
            let cols = gi * group..(gi + 1) * group;
            cols.clone()
                .map(|c| h[c * k + cols.start..c * k + cols.end].iter().sum::<f64>())
                .sum()
        })
        .collect();
    let mut hq = vec![0f64; group];
    for _ in 0..sweeps {
        let mut changed = false;
        for gi in 0..k / group {
            let cols = gi * group..(gi + 1) * group;
            let (s, m) = (scales[gi] as f64, mins[gi] as f64);
            // Δ_c = a q_c + b: minimise 2 Σ Δ_c g_c + ΔᵀHΔ over (a, b), with the group's block of
            // H: aqq = qᵀHq, aq1 = qᵀH1 = 1ᵀ(Hq) (H is symmetric), a11 = 1ᵀH1 (fixed per group).
            // Hq as a sum of H's rows scaled by q: contiguous and vectorizable.
            hq.fill(0.0);
            for d in cols.clone() {
                let qd = codes[d] as f64;
                if qd != 0.0 {
                    for (t, hdc) in hq.iter_mut().zip(&h[d * k + cols.start..d * k + cols.end]) {
                        *t += qd * hdc;
                    }
                }
            }
            let (mut aqq, mut aq1, mut bq, mut b1) = (0.0, 0.0, 0.0, 0.0);
            for (t, c) in hq.iter().zip(cols.clone()) {
                let qc = codes[c] as f64;
                aqq += qc * t;
                aq1 += t;
                bq += qc * g[c];
                b1 += g[c];
            }
            let a11 = block_sums[gi];
            let det = aqq * a11 - aq1 * aq1;
            if det.abs() <= 1e-12 * (aqq * a11).abs().max(f64::MIN_POSITIVE) {
                continue;
            }
            let a = -(a11 * bq - aq1 * b1) / det;
            let b = -(aqq * b1 - aq1 * bq) / det;
            let s2 = half::f16::from_f32((s + a) as f32).to_f32();
            let m2 = half::f16::from_f32((m + b) as f32).to_f32();
            if !(s2 > 0.0 && s2.is_finite() && m2.is_finite()) {
                continue;
            }
            let (a, b) = (s2 as f64 - s, m2 as f64 - m);
            let df = 2.0 * (a * bq + b * b1) + a * a * aqq + 2.0 * a * b * aq1 + b * b * a11;
            if df < 0.0 && (a != 0.0 || b != 0.0) {
                for c in cols.clone() {
                    apply(c, a * codes[c] as f64 + b, &mut e, &mut g);
                    deq[c] = codes[c] as f32 * s2 + m2;
                }
                scales[gi] = s2;
                mins[gi] = m2;
                changed = true;
            }
        }
        for c in 0..k {
            let s = scales[c / group] as f64;
            let hcc = h[c * k + c];
            let mut best = (0.0, 0i32);
            for dq in [-1i32, 1] {
                let q = codes[c] as i32 + dq;
                if !(0..=15).contains(&q) {
                    continue;
                }
                let d = dq as f64 * s;
                let df = 2.0 * d * g[c] + d * d * hcc;
                if df < best.0 {
                    best = (df, dq);
                }
            }
            if best.1 != 0 {
                codes[c] = (codes[c] as i32 + best.1) as u8;
                deq[c] = codes[c] as f32 * scales[c / group] + mins[c / group];
                apply(c, best.1 as f64 * s, &mut e, &mut g);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
}

/// A copy of `g` that also returns the input of every target product (`calib.{i}`), for
/// collecting GPTQ's calibration statistics.
pub fn calibration_graph(g: &Graph, targets: &[Target]) -> Graph {
    let mut c = g.clone();
    for (i, t) in targets.iter().enumerate() {
        let a = g.args(t.matmul)[0];
        c.add_output(format!("calib.{i}"), a).expect("calib outputs are unique");
    }
    c
}

/// How each product's form is chosen.
pub enum Choice<'a> {
    /// Every eligible product takes the granted scheme (`--quant-strict`).
    Strict,
    /// The product's f32 form, its int8 form (when the scheme is 4-bit) and the granted one join
    /// its e-class and extraction keeps the fastest ([`crate::forms`]); `time(kernel, n, k)`
    /// measures a product's kernel (`f32`, `int8`, `int4:G`) at the weight's shape, `None` where
    /// it cannot (the product then takes the granted scheme).
    Measured(&'a mut dyn FnMut(&str, usize, usize) -> Option<f64>),
}

/// A product over one quantized form of a target's weight.
struct Encoded {
    product: NodeId,
    /// Relative Frobenius error of the dequantized weight.
    rel: f64,
    /// Bytes of codes, scales and minimums.
    bytes: usize,
}

/// Quantizes target `t` (f32 values `w`, `[n, k]`) as `scheme` and adds the product over the
/// quantized weight, read by nothing yet.
fn encode(
    g: &mut Graph,
    weights: &mut BTreeMap<String, Tensor>,
    t: &Target,
    w: &[f32],
    scheme: Scheme,
    hessian: Option<&Hessian>,
) -> Result<Encoded, String> {
    let (n, k) = (t.n, t.k);
    let group = match scheme {
        Scheme::Int8 => k,
        Scheme::Int4 { group } | Scheme::Gptq4 { group } => group as usize,
    };
    let q = match scheme {
        Scheme::Int8 => quantize_int8(w, n, k),
        Scheme::Int4 { .. } => quantize_int4(w, n, k, group),
        Scheme::Gptq4 { .. } => {
            let h = hessian.ok_or("gptq4 needs calibration statistics for every product")?;
            if h.rows() == 0 {
                return Err(format!("no calibration rows reached `{}`", t.name));
            }
            quantize_gptq4(w, n, k, group, h).map_err(|e| format!("{}: {e}", t.name))?
        }
    };
    let (num, den) = w.iter().zip(&q.dequantized).fold((0.0f64, 0.0f64), |(a, b), (x, y)| {
        (a + ((x - y) as f64).powi(2), b + (*x as f64).powi(2))
    });
    let bits = if scheme == Scheme::Int8 { 8 } else { 4 };
    let base = format!("{}.q{bits}", t.name);
    let mut bytes = 0;
    let mut add = |suffix: &str, tensor: Tensor| -> Result<NodeId, String> {
        let pname = format!("{base}.{suffix}");
        let ty = kiln_ir::TensorType::new(
            tensor.dtype(),
            tensor.shape().iter().map(|d| Dim::known(*d as u64)).collect(),
        );
        bytes += tensor.as_bytes().len();
        weights.insert(pname.clone(), tensor);
        g.add(
            Op::Param {
                name: pname.clone(),
                ty,
            },
            &[],
            pname,
        )
        .map_err(|e| e.to_string())
    };
    let mut args = vec![add("codes", q.codes)?, add("scale", q.scale)?];
    if let Some(m) = q.min {
        args.push(add("min", m)?);
    }
    let perm = match &q.perm {
        Some(p) => Some(add(
            "perm",
            Tensor::from_f64(DType::I32, vec![k], &p.iter().map(|c| *c as f64).collect::<Vec<_>>())
                .expect("column indices fit i32"),
        )?),
        None => None,
    };
    let rule = format!("quantize-{scheme}");
    let name = g.node(t.matmul).name.clone();
    let dq = g
        .add(
            Op::Dequantize {
                bits,
                group: group as u64,
            },
            &args,
            format!("{name}/dequantize"),
        )
        .map_err(|e| e.to_string())?;
    g.add_rules(dq, [rule.clone()]);
    let mut a = g.args(t.matmul)[0];
    if let Some(pn) = perm {
        let axis = g.node(a).ty.rank() - 1;
        a = g
            .add(Op::Gather { axis }, &[a, pn], format!("{name}/act_order"))
            .map_err(|e| e.to_string())?;
        g.add_rules(a, [rule.clone()]);
    }
    let product = g
        .add(
            Op::MatMul {
                transpose_a: false,
                transpose_b: true,
            },
            &[a, dq],
            name,
        )
        .map_err(|e| e.to_string())?;
    g.add_rules(product, [rule]);
    Ok(Encoded {
        product,
        rel: (num / den.max(f64::MIN_POSITIVE)).sqrt(),
        bytes,
    })
}

/// The kernel a scheme's products run (GPTQ's codes are int4 codes).
fn kernel(scheme: Scheme) -> String {
    match scheme {
        Scheme::Int8 => "int8".into(),
        Scheme::Int4 { group } | Scheme::Gptq4 { group } => format!("int4:{group}"),
    }
}

/// The forms target `t` may take under `scheme`, most accurate first: the granted scheme alone,
/// or with `Measured`, f32 and (for a 4-bit scheme) int8 before it.
fn schemes(scheme: Scheme, choice: &Choice) -> Vec<Option<Scheme>> {
    match (choice, scheme) {
        (Choice::Strict, _) => vec![Some(scheme)],
        (Choice::Measured(_), Scheme::Int8) => vec![None, Some(scheme)],
        (Choice::Measured(_), _) => vec![None, Some(Scheme::Int8), Some(scheme)],
    }
}

/// A form's scheme (`None`: f32), the relative error of its weight, and its bytes.
type FormInfo = (Option<Scheme>, f64, usize);

/// Enters the form extraction kept for each target (`chosen[i]` of `alts[i]`) in the report.
fn record_choices(
    report: &mut QuantReport,
    alts: &[crate::forms::Alternatives],
    meta: &[(&Target, Vec<FormInfo>)],
    chosen: &[usize],
) {
    for ((a, (t, info)), &c) in alts.iter().zip(meta).zip(chosen) {
        let times: Vec<String> = a
            .forms
            .iter()
            .map(|f| format!("{} {:.1} µs", f.label, f.ns / 1e3))
            .collect();
        let why = format!("measured {}", times.join(", "));
        report.forms.push((t.name.clone(), a.forms[c].label.clone(), why));
        match info[c] {
            (None, ..) => report.kept.push(t.name.clone()),
            (Some(s), rel, bytes) => {
                report.bytes.0 += t.n * t.k * 4;
                report.bytes.1 += bytes;
                report.quantized.push((t.name.clone(), t.n, t.k, rel, s.to_string()));
            }
        }
    }
}

/// Quantizes each target's weight as `scheme` — or, with [`Choice::Measured`], gives it its f32,
/// int8 and `scheme` forms and keeps the fastest; `hessians[i]` (for GPTQ) belongs to
/// `targets[i]`.
pub fn apply(
    g: &mut Graph,
    weights: &mut BTreeMap<String, Tensor>,
    targets: &[Target],
    scheme: Scheme,
    hessians: Option<&[Hessian]>,
    mut choice: Choice,
) -> Result<QuantReport, String> {
    let mut report = QuantReport::default();
    let progress = kiln_ir::progress::Progress::new(format!("quantizing products ({scheme})"), targets.len());
    let mut alts = Vec::new();
    let mut meta: Vec<(&Target, Vec<FormInfo>)> = Vec::new();
    for (ti, t) in targets.iter().enumerate() {
        progress.tick();
        let (n, k) = (t.n, t.k);
        if let Scheme::Int4 { group } | Scheme::Gptq4 { group } = scheme {
            if k % group as usize != 0 {
                report.skipped.push((
                    t.name.clone(),
                    format!("{k} input columns do not split into groups of {group}"),
                ));
                continue;
            }
        }
        let w = weight_rows(g, t, weights)?;
        let hessian = hessians.and_then(|h| h.get(ti));
        let mut forms = Vec::new();
        let mut info = Vec::new();
        for s in schemes(scheme, &choice) {
            let (product, rel, bytes, label) = match s {
                None => (t.matmul, 0.0, n * k * 4, "f32".to_string()),
                Some(s) => {
                    let e = encode(g, weights, t, &w, s, hessian)?;
                    (e.product, e.rel, e.bytes, s.to_string())
                }
            };
            let ns = match &mut choice {
                Choice::Strict => Some(0.0),
                Choice::Measured(time) => time(&s.map_or("f32".into(), kernel), n, k),
            };
            info.push((s, rel, bytes));
            forms.push((label, product, ns));
        }
        if forms.iter().all(|f| f.2.is_some()) && forms.len() > 1 {
            let forms = forms
                .into_iter()
                .map(|(label, product, ns)| crate::forms::Form {
                    label,
                    product,
                    ns: ns.unwrap_or(0.0),
                })
                .collect();
            alts.push(crate::forms::Alternatives {
                product: t.matmul,
                forms,
            });
            meta.push((t, info));
        } else {
            // Strict, or not measured: the granted scheme.
            let (_, product, _) = forms.last().expect("the granted form");
            g.replace_uses(t.matmul, *product);
            let (_, rel, bytes) = info.last().expect("the granted form");
            report.bytes.0 += n * k * 4;
            report.bytes.1 += bytes;
            report.quantized.push((t.name.clone(), n, k, *rel, scheme.to_string()));
        }
    }
    if !alts.is_empty() {
        let chosen = crate::forms::choose(g, &alts, crate::cost::CostModel::cpu());
        record_choices(&mut report, &alts, &meta, &chosen);
    }
    crate::dce::run(g, &crate::PipelineOptions::default());
    drop_unused(g, weights);
    Ok(report)
}

/// Removes the weights no parameter of `g` names (forms extraction did not keep).
pub fn drop_unused(g: &Graph, weights: &mut BTreeMap<String, Tensor>) {
    let used: std::collections::HashSet<&str> = g
        .node_ids()
        .filter_map(|n| match &g.node(n).op {
            Op::Param { name, .. } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    weights.retain(|k, _| used.contains(k.as_str()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_parse() {
        assert_eq!("int8".parse::<Scheme>(), Ok(Scheme::Int8));
        assert_eq!("int4".parse::<Scheme>(), Ok(Scheme::Int4 { group: 128 }));
        assert_eq!("gptq4:64".parse::<Scheme>(), Ok(Scheme::Gptq4 { group: 64 }));
        assert!("int4:48".parse::<Scheme>().is_err());
        assert!("int8:32".parse::<Scheme>().is_err());
        assert!("fp8".parse::<Scheme>().unwrap_err().contains("unknown quantization"));
    }

    #[test]
    fn code4_rounds_like_f32_round() {
        let (s, m) = (0.37f32, -1.3f32);
        let mut vals: Vec<f32> = (-400..=6400).map(|i| m + s * i as f32 / 400.0).collect();
        // Exact halves and their neighbours, where rounding decides.
        for i in 0..=16 {
            let t = m + s * (i as f32 - 0.5);
            vals.extend([t, f32::from_bits(t.to_bits() + 1), f32::from_bits(t.to_bits() - 1)]);
        }
        vals.extend([f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);
        for v in vals {
            let want = ((v - m) / s).round().clamp(0.0, 15.0) as u8;
            assert_eq!(code4(v, s, m), want, "code of {v}");
        }
    }

    #[test]
    fn globs() {
        assert!(glob("*.attn.*", "h.0.attn.c_attn"));
        assert!(glob("lm_head*", "lm_head.weight"));
        assert!(!glob("h.1*", "h.0.mlp"));
    }

    #[test]
    fn inverse_upper_cholesky_inverts() {
        let k = 5;
        let mut h = vec![0.0; k * k];
        for i in 0..k {
            for j in 0..k {
                h[i * k + j] = 1.0 / (1.0 + (i as f64 - j as f64).abs()) + if i == j { 2.0 } else { 0.0 };
            }
        }
        let u = inverse_upper_cholesky(&h, k).unwrap();
        // Uᵀ U H = I, and U is upper triangular.
        for i in 0..k {
            for j in 0..i {
                assert_eq!(u[i * k + j], 0.0);
            }
        }
        for i in 0..k {
            for j in 0..k {
                let mut s = 0.0;
                for p in 0..k {
                    let mut uu = 0.0;
                    for q in 0..k {
                        uu += u[q * k + i] * u[q * k + p];
                    }
                    s += uu * h[p * k + j];
                }
                assert!((s - (i == j) as u8 as f64).abs() < 1e-9, "{i} {j} {s}");
            }
        }
    }

    /// The refinement after GPTQ lowers (never raises) a row's objective `(dq - w)ᵀ H (dq - w)`,
    /// keeps codes in range, and leaves the dequantized row consistent with codes, scales and mins.
    #[test]
    fn refinement_lowers_the_layer_objective() {
        let (k, group) = (64, 32);
        let mut seed = 7u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f64 / (1u64 << 31) as f64) - 0.5
        };
        // Correlated inputs: H = XᵀX of 200 rows mixing 8 factors, plus a small ridge.
        let f: Vec<f64> = (0..8 * k).map(|_| rnd()).collect();
        let mut h = vec![0.0; k * k];
        for _ in 0..200 {
            let z: Vec<f64> = (0..8).map(|_| rnd()).collect();
            let x: Vec<f64> = (0..k)
                .map(|c| (0..8).map(|j| z[j] * f[j * k + c]).sum::<f64>() + 0.1 * rnd())
                .collect();
            for i in 0..k {
                for j in 0..k {
                    h[i * k + j] += x[i] * x[j];
                }
            }
        }
        let w: Vec<f64> = (0..k).map(|_| rnd()).collect();
        let obj = |deq: &[f32]| {
            let e: Vec<f64> = (0..k).map(|c| deq[c] as f64 - w[c]).collect();
            (0..k)
                .map(|i| e[i] * (0..k).map(|j| h[i * k + j] * e[j]).sum::<f64>())
                .sum::<f64>()
        };
        let wf: Vec<f32> = w.iter().map(|x| *x as f32).collect();
        let q = quantize_int4(&wf, 1, k, group);
        let mut codes = vec![0u8; k];
        let (mut scales, mut mins) = (vec![0f32; 2], vec![0f32; 2]);
        for g in 0..2 {
            let (s, m) = int4_params(&wf[g * group..(g + 1) * group]);
            scales[g] = s;
            mins[g] = m;
            for c in g * group..(g + 1) * group {
                codes[c] = code4(wf[c], s, m);
            }
        }
        let mut deq = q.dequantized.clone();
        let before = obj(&deq);
        let mut last = before;
        for sweeps in 1..=4 {
            refine_row(&w, &mut codes, &mut scales, &mut mins, &mut deq, &h, k, group, 1);
            let now = obj(&deq);
            assert!(
                now <= last * (1.0 + 1e-9),
                "sweep {sweeps} raised the objective: {last} -> {now}"
            );
            last = now;
        }
        eprintln!("objective {before} -> {last}");
        assert!(last < 0.8 * before, "refinement gained too little: {before} -> {last}");
        for c in 0..k {
            assert!(codes[c] <= 15);
            assert_eq!(deq[c], codes[c] as f32 * scales[c / group] + mins[c / group]);
        }
    }
}
