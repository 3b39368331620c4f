//! Magnitude pruning of matrix-product weights, and their sparse encoding where a backend measured
//! it faster than dense.
//!
//! Patterns: `2:4` (in every 4 consecutive input columns of a row, the 2 smallest magnitudes are
//! zeroed), a ratio such as `0.9` (the smallest 90% of a matrix's magnitudes), `block:RxC:ratio`
//! (the `R x C` blocks with the smallest L2 norms). Targets are those of quantization
//! ([`crate::quantize::targets`]), stored `[n, k]` afterwards. Each pruned weight becomes either a
//! dense f32 parameter (with its zeros) or `densify(row_ptr, cols, vals)` (CSR), as the backend's
//! `choose` decides — a sparse encoding is only used where it pays.

use std::collections::BTreeMap;

use kiln_ir::{DType, Dim, Graph, NodeId, Op, Tensor};

use crate::quantize::Target;

/// Which weights are zeroed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pattern {
    /// 2 of every 4 consecutive input columns.
    TwoFour,
    /// This fraction of the matrix, smallest magnitudes first.
    Unstructured(f64),
    /// This fraction of `rows x cols` blocks, smallest L2 norms first.
    Block {
        /// Block height (output channels).
        rows: usize,
        /// Block width (input columns).
        cols: usize,
        /// Fraction of blocks zeroed.
        ratio: f64,
    },
}

impl std::str::FromStr for Pattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Pattern, String> {
        let ratio = |r: &str| -> Result<f64, String> {
            let v: f64 = r.parse().map_err(|_| format!("`{s}`: `{r}` is not a number"))?;
            if !(0.0..1.0).contains(&v) {
                return Err(format!("`{s}`: the sparsity ratio must be in [0, 1)"));
            }
            Ok(v)
        };
        if s == "2:4" {
            return Ok(Pattern::TwoFour);
        }
        if let Some(rest) = s.strip_prefix("block:") {
            let (dims, r) = rest
                .split_once(':')
                .ok_or_else(|| format!("`{s}`: expected block:RxC:RATIO"))?;
            let (a, b) = dims
                .split_once('x')
                .ok_or_else(|| format!("`{s}`: block size must look like 32x32"))?;
            let (rows, cols) = (
                a.parse::<usize>().map_err(|_| format!("`{s}`: bad block height"))?,
                b.parse::<usize>().map_err(|_| format!("`{s}`: bad block width"))?,
            );
            if rows == 0 || cols == 0 {
                return Err(format!("`{s}`: blocks must be at least 1x1"));
            }
            return Ok(Pattern::Block {
                rows,
                cols,
                ratio: ratio(r)?,
            });
        }
        match ratio(s) {
            Ok(r) => Ok(Pattern::Unstructured(r)),
            Err(_) => Err(format!(
                "unknown sparsity `{s}` (expected 2:4, a ratio such as 0.9, or block:RxC:RATIO)"
            )),
        }
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::TwoFour => write!(f, "2:4"),
            Pattern::Unstructured(r) => write!(f, "{r}"),
            Pattern::Block { rows, cols, ratio } => write!(f, "block:{rows}x{cols}:{ratio}"),
        }
    }
}

/// Zeroes `w` (`[n, k]`) by `pattern`; `Err` if the shape does not fit it.
pub fn prune(w: &mut [f32], n: usize, k: usize, pattern: Pattern) -> Result<(), String> {
    match pattern {
        Pattern::TwoFour => {
            if !k.is_multiple_of(4) {
                return Err(format!("{k} input columns are not a multiple of 4"));
            }
            for quad in w.chunks_exact_mut(4) {
                let mut idx = [0usize, 1, 2, 3];
                idx.sort_by(|a, b| quad[*a].abs().total_cmp(&quad[*b].abs()));
                quad[idx[0]] = 0.0;
                quad[idx[1]] = 0.0;
            }
        }
        Pattern::Unstructured(r) => {
            let cut = (r * w.len() as f64).floor() as usize;
            let mut order: Vec<usize> = (0..w.len()).collect();
            order.sort_by(|a, b| w[*a].abs().total_cmp(&w[*b].abs()).then(a.cmp(b)));
            for i in &order[..cut] {
                w[*i] = 0.0;
            }
        }
        Pattern::Block { rows, cols, ratio } => {
            if !n.is_multiple_of(rows) || !k.is_multiple_of(cols) {
                return Err(format!("[{n}, {k}] does not split into {rows}x{cols} blocks"));
            }
            let (br, bc) = (n / rows, k / cols);
            let norm = |b: usize| -> f64 {
                let (r0, c0) = (b / bc * rows, b % bc * cols);
                (r0..r0 + rows)
                    .flat_map(|r| (c0..c0 + cols).map(move |c| (r, c)))
                    .map(|(r, c)| (w[r * k + c] as f64).powi(2))
                    .sum()
            };
            let mut order: Vec<(f64, usize)> = (0..br * bc).map(|b| (norm(b), b)).collect();
            order.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let cut = (ratio * order.len() as f64).floor() as usize;
            for (_, b) in &order[..cut] {
                let (r0, c0) = (b / bc * rows, b % bc * cols);
                for r in r0..r0 + rows {
                    w[r * k + c0..r * k + c0 + cols].fill(0.0);
                }
            }
        }
    }
    Ok(())
}

/// A weight in (block) compressed sparse row form, as [`Op::Densify`] defines it.
#[derive(Clone, Debug)]
pub struct Csr {
    /// `n / br + 1` offsets into `cols` (blocks).
    pub row_ptr: Vec<i32>,
    /// Block column of each stored block.
    pub cols: Vec<i32>,
    /// The stored blocks, `br · bc` values each, column by column.
    pub vals: Vec<f32>,
    /// Block height and width (`[1, 1]`: plain CSR).
    pub block: [usize; 2],
}

impl Csr {
    /// The nonzeros of `w` (`[n, k]`).
    pub fn from_dense(w: &[f32], n: usize, k: usize) -> Csr {
        Csr::blocked(w, n, k, [1, 1])
    }

    /// The blocks of `w` (`[n, k]`, `br | n`, `bc | k`) holding any nonzero.
    pub fn blocked(w: &[f32], n: usize, k: usize, [br, bc]: [usize; 2]) -> Csr {
        let mut c = Csr {
            row_ptr: vec![0],
            cols: Vec::new(),
            vals: Vec::new(),
            block: [br, bc],
        };
        for r in 0..n / br {
            for b in 0..k / bc {
                let at = |i: usize, j: usize| w[(r * br + i) * k + b * bc + j];
                if (0..br).any(|i| (0..bc).any(|j| at(i, j) != 0.0)) {
                    c.cols.push(b as i32);
                    for j in 0..bc {
                        for i in 0..br {
                            c.vals.push(at(i, j));
                        }
                    }
                }
            }
            c.row_ptr.push(c.cols.len() as i32);
        }
        c
    }
}

/// How a pruned weight is stored.
#[derive(Clone, Debug, PartialEq)]
pub enum Encoding {
    /// Dense f32 with its zeros.
    Dense,
    /// (Block) CSR, read directly by products with at most `sparse_rows` rows of activations.
    Csr {
        /// The measured break-even.
        sparse_rows: u64,
        /// Block height and width (`[1, 1]`: plain CSR).
        block: [u64; 2],
    },
    /// Packed 2:4 (values and 2-bit offsets), read directly by products with at most
    /// `sparse_rows` rows of activations. Only for 2:4-pruned weights.
    TwoFour {
        /// The measured break-even.
        sparse_rows: u64,
    },
}

impl Encoding {
    /// The storage, for reports: `dense`, `CSR`, `16x16 block CSR`, `packed 2:4`.
    pub fn kind(&self) -> String {
        match self {
            Encoding::Dense => "dense".into(),
            Encoding::Csr { block: [1, 1], .. } => "CSR".into(),
            Encoding::Csr { block: [r, c], .. } => format!("{r}x{c} block CSR"),
            Encoding::TwoFour { .. } => "packed 2:4".into(),
        }
    }
}

impl std::fmt::Display for Encoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Encoding::Dense => write!(f, "dense"),
            Encoding::Csr { sparse_rows, .. } | Encoding::TwoFour { sparse_rows } if *sparse_rows == u64::MAX => {
                write!(f, "{}", self.kind())
            }
            Encoding::Csr { sparse_rows, .. } | Encoding::TwoFour { sparse_rows } => {
                write!(f, "{} up to {sparse_rows} rows, dense tiles beyond", self.kind())
            }
        }
    }
}

/// A 2:4-pruned `[n, k]` weight packed as [`Op::Densify24`] defines it: the two kept values of
/// every group of four columns and their offsets. Groups with fewer than two nonzeros keep zeros
/// at the lowest free offsets.
pub fn pack24(w: &[f32], n: usize, k: usize) -> Result<(Vec<f32>, Vec<u8>), String> {
    let mut vals = Vec::with_capacity(n * k / 2);
    let mut idx = Vec::with_capacity(n * k / 4);
    for (g, quad) in w[..n * k].chunks_exact(4).enumerate() {
        let mut keep: Vec<usize> = (0..4).filter(|i| quad[*i] != 0.0).collect();
        if keep.len() > 2 {
            return Err(format!("group {g} of a 2:4 weight has {} nonzeros", keep.len()));
        }
        for i in 0..4 {
            if keep.len() < 2 && !keep.contains(&i) {
                keep.push(i);
            }
        }
        keep.sort_unstable();
        vals.extend([quad[keep[0]], quad[keep[1]]]);
        idx.push((keep[0] | keep[1] << 2) as u8);
    }
    Ok((vals, idx))
}

/// What pruning did, per weight: name, `[n, k]`, density kept, relative Frobenius change, the
/// encoding chosen and why.
#[derive(Clone, Debug, Default)]
pub struct SparsityReport {
    /// Pruned weights.
    pub pruned: Vec<(String, usize, usize, f64, f64, Encoding, String)>,
    /// Weights left as they were, and why.
    pub skipped: Vec<(String, String)>,
    /// Products whose all-zero input columns were removed with the features feeding them:
    /// product, features before, after.
    pub shrunk: Vec<(String, usize, usize)>,
}

fn param(g: &mut Graph, weights: &mut BTreeMap<String, Tensor>, name: String, t: Tensor) -> Result<NodeId, String> {
    let ty = kiln_ir::TensorType::new(t.dtype(), t.shape().iter().map(|d| Dim::known(*d as u64)).collect());
    weights.insert(name.clone(), t);
    g.add(Op::Param { name: name.clone(), ty }, &[], name)
        .map_err(|e| e.to_string())
}

/// Picks the encodings a pruned weight may take: `(name, pruned [n, k], n, k)` → each candidate
/// encoding with its measured time, and a note for the report (the measured times, say). One
/// candidate is taken as it is; several join the product's e-class and extraction keeps the
/// fastest ([`crate::forms`]).
pub type Chooser<'a> = dyn FnMut(&str, &[f32], usize, usize) -> (Vec<(Encoding, f64)>, String) + 'a;

/// The weight node storing pruned `w` (`[n, k]`) of target `t` as `enc`.
fn stored(
    g: &mut Graph,
    weights: &mut BTreeMap<String, Tensor>,
    t: &Target,
    w: &[f32],
    enc: &Encoding,
    pattern: Pattern,
) -> Result<NodeId, String> {
    let (n, k) = (t.n, t.k);
    let base = format!("{}.sparse", t.name);
    Ok(match *enc {
        Encoding::Dense => param(
            g,
            weights,
            format!("{base}.dense"),
            Tensor::from_f32(vec![n, k], w.to_vec()).map_err(|e| e.to_string())?,
        )?,
        Encoding::TwoFour { sparse_rows } => {
            let (vals, idx) = pack24(w, n, k)?;
            let vn = param(
                g,
                weights,
                format!("{base}.vals24"),
                Tensor::from_f32(vec![n, k / 2], vals).map_err(|e| e.to_string())?,
            )?;
            let idx_t = Tensor::from_f64(
                DType::U8,
                vec![n, k / 4],
                &idx.iter().map(|b| *b as f64).collect::<Vec<_>>(),
            )
            .map_err(|e| e.to_string())?;
            let inn = param(g, weights, format!("{base}.idx24"), idx_t)?;
            let d = g
                .add(
                    Op::Densify24 {
                        n: n as u64,
                        k: k as u64,
                        sparse_rows,
                    },
                    &[vn, inn],
                    format!("{}/densify_2_4", g.node(t.matmul).name),
                )
                .map_err(|e| e.to_string())?;
            g.add_rules(d, [format!("sparsity-{pattern}")]);
            d
        }
        Encoding::Csr { sparse_rows, block } => {
            let c = Csr::blocked(w, n, k, [block[0] as usize, block[1] as usize]);
            let i32s = |v: &[i32]| {
                Tensor::from_f64(
                    DType::I32,
                    vec![v.len()],
                    &v.iter().map(|x| *x as f64).collect::<Vec<_>>(),
                )
                .map_err(|e| e.to_string())
            };
            let rp = param(g, weights, format!("{base}.row_ptr"), i32s(&c.row_ptr)?)?;
            let cols = param(g, weights, format!("{base}.cols"), i32s(&c.cols)?)?;
            let vals = param(
                g,
                weights,
                format!("{base}.vals"),
                Tensor::from_f32(vec![c.vals.len()], c.vals).map_err(|e| e.to_string())?,
            )?;
            let d = g
                .add(
                    Op::Densify {
                        n: n as u64,
                        k: k as u64,
                        sparse_rows,
                        block,
                    },
                    &[rp, cols, vals],
                    format!("{}/densify", g.node(t.matmul).name),
                )
                .map_err(|e| e.to_string())?;
            g.add_rules(d, [format!("sparsity-{pattern}")]);
            d
        }
    })
}

/// A product over the stored weight `b` in place of `t`'s, read by nothing yet.
fn product(g: &mut Graph, t: &Target, b: NodeId, pattern: Pattern) -> Result<NodeId, String> {
    let a = g.args(t.matmul)[0];
    let mm = g
        .add(
            Op::MatMul {
                transpose_a: false,
                transpose_b: true,
            },
            &[a, b],
            g.node(t.matmul).name.clone(),
        )
        .map_err(|e| e.to_string())?;
    g.add_rules(mm, [format!("sparsity-{pattern}")]);
    Ok(mm)
}

/// Prunes every target's weight and re-encodes it in the fastest of the encodings `choose`
/// offers (and measured).
pub fn apply(
    g: &mut Graph,
    weights: &mut BTreeMap<String, Tensor>,
    targets: &[Target],
    pattern: Pattern,
    choose: &mut Chooser,
) -> Result<SparsityReport, String> {
    let mut report = SparsityReport::default();
    let mut alts = Vec::new();
    let mut pending = Vec::new();
    for t in targets {
        let (n, k) = (t.n, t.k);
        let orig = crate::quantize::weight_rows(g, t, weights)?;
        let mut w = orig.clone();
        if let Err(why) = prune(&mut w, n, k, pattern) {
            report.skipped.push((t.name.clone(), why));
            continue;
        }
        let nnz = w.iter().filter(|v| **v != 0.0).count();
        let (num, den) = orig.iter().zip(&w).fold((0.0f64, 0.0f64), |(a, b), (x, y)| {
            (a + ((x - y) as f64).powi(2), b + (*x as f64).powi(2))
        });
        let (cands, why) = choose(&t.name, &w, n, k);
        if cands.is_empty() {
            return Err(format!("no encoding offered for `{}`", t.name));
        }
        let mut forms = Vec::new();
        for (enc, ns) in &cands {
            let b = stored(g, weights, t, &w, enc, pattern)?;
            forms.push(crate::forms::Form {
                label: enc.kind(),
                product: product(g, t, b, pattern)?,
                ns: *ns,
            });
        }
        let entry = (
            t.name.clone(),
            n,
            k,
            nnz as f64 / (n * k) as f64,
            (num / den.max(f64::MIN_POSITIVE)).sqrt(),
            cands[0].0.clone(),
            why,
        );
        if forms.len() == 1 {
            g.replace_uses(t.matmul, forms[0].product);
            report.pruned.push(entry);
        } else {
            alts.push(crate::forms::Alternatives {
                product: t.matmul,
                forms,
            });
            pending.push((entry, cands));
        }
    }
    if !alts.is_empty() {
        let chosen = crate::forms::choose(g, &alts, crate::cost::CostModel::cpu());
        for ((mut entry, cands), c) in pending.into_iter().zip(chosen) {
            entry.5 = cands[c].0.clone();
            report.pruned.push(entry);
        }
    }
    crate::dce::run(g, &crate::PipelineOptions::default());
    crate::quantize::drop_unused(g, weights);
    report.shrunk = crate::shrink::run(g, weights);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_parse() {
        assert_eq!("2:4".parse::<Pattern>(), Ok(Pattern::TwoFour));
        assert_eq!("0.9".parse::<Pattern>(), Ok(Pattern::Unstructured(0.9)));
        assert_eq!(
            "block:16x32:0.8".parse::<Pattern>(),
            Ok(Pattern::Block {
                rows: 16,
                cols: 32,
                ratio: 0.8
            })
        );
        assert!("1.5".parse::<Pattern>().is_err());
        assert!("block:0x4:0.5".parse::<Pattern>().is_err());
        assert!("3:8".parse::<Pattern>().unwrap_err().contains("unknown sparsity"));
    }

    #[test]
    fn pruning_keeps_what_each_pattern_promises() {
        let (n, k) = (8, 16);
        let w0: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 101) as f32 - 50.5) / 7.0).collect();
        let mut w = w0.clone();
        prune(&mut w, n, k, Pattern::TwoFour).unwrap();
        for q in w.chunks(4) {
            assert_eq!(q.iter().filter(|v| **v == 0.0).count(), 2);
        }
        let mut w = w0.clone();
        prune(&mut w, n, k, Pattern::Unstructured(0.75)).unwrap();
        assert_eq!(w.iter().filter(|v| **v == 0.0).count(), 96);
        let kept = w
            .iter()
            .filter(|v| **v != 0.0)
            .map(|v| v.abs())
            .fold(f32::INFINITY, f32::min);
        let dropped = w0
            .iter()
            .zip(&w)
            .filter(|(_, b)| **b == 0.0)
            .map(|(a, _)| a.abs())
            .fold(0.0, f32::max);
        assert!(kept >= dropped);
        let mut w = w0.clone();
        prune(
            &mut w,
            n,
            k,
            Pattern::Block {
                rows: 4,
                cols: 4,
                ratio: 0.5,
            },
        )
        .unwrap();
        assert_eq!(w.iter().filter(|v| **v == 0.0).count(), 64);
        assert!(prune(&mut w, n, 6, Pattern::TwoFour).is_err());
        let mut p = w0.clone();
        prune(&mut p, n, k, Pattern::TwoFour).unwrap();
        let (vals, idx) = pack24(&p, n, k).unwrap();
        assert_eq!((vals.len(), idx.len()), (n * k / 2, n * k / 4));
        for (g, b) in idx.iter().enumerate() {
            let (i0, i1) = ((b & 3) as usize, (b >> 2) as usize);
            assert!(i0 < i1);
            assert_eq!((vals[2 * g], vals[2 * g + 1]), (p[4 * g + i0], p[4 * g + i1]));
        }
        let c = Csr::from_dense(&w, n, k);
        assert_eq!(c.vals.len(), 64);
        assert_eq!(c.row_ptr.len(), n + 1);
        // The 4x4 pruning leaves 4 of 8 blocks: block CSR stores exactly those, column by column.
        let b = Csr::blocked(&w, n, k, [4, 4]);
        assert_eq!((b.cols.len(), b.vals.len(), b.row_ptr.len()), (4, 64, 3));
        let (p, c0) = (0, b.cols[0] as usize);
        assert_eq!(
            b.vals[p * 16 + 4 + 1],
            w[k + c0 * 4 + 1],
            "element (1, 1) of the first block"
        );
    }
}
