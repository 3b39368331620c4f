//! The mixture-of-experts step (`Op::Moe`): rows are routed to their top-k experts, each expert's
//! rows are gathered into one block, and only those blocks go through the expert's three products
//! — an expert no row chose is never read. A decode step of one token therefore reads k experts'
//! weights, not all of them (`MoeStats` counts them).

use kiln_ir::{DType, ExpertAct, Gating, Op};

use crate::cpu::Level;
use crate::kernels::{self, Buf, Epilogue};

/// What one step routed: experts whose weights were read, and (row, expert) pairs computed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MoeStats {
    /// Distinct experts that received at least one row.
    pub experts_read: usize,
    /// Bytes of expert weights those experts hold (what the step read of them).
    pub weight_bytes: usize,
    /// Rows × top_k.
    pub pairs: usize,
}

/// The op's attributes.
#[derive(Clone, Copy)]
struct Routing {
    top_k: usize,
    gating: Gating,
    renormalize: bool,
    act: ExpertAct,
}

/// The chosen experts and weights of one row of logits, best first (ties to the lower index).
fn route(logits: &[f32], r: &Routing, scores: &mut Vec<f32>, chosen: &mut Vec<(usize, f32)>) {
    scores.clear();
    match r.gating {
        Gating::Softmax => {
            let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            scores.extend(logits.iter().map(|l| (l - m).exp()));
            let s: f32 = scores.iter().sum();
            scores.iter_mut().for_each(|x| *x /= s);
        }
        Gating::Sigmoid => scores.extend(logits.iter().map(|l| 1.0 / (1.0 + (-l).exp()))),
    }
    chosen.clear();
    for (e, &s) in scores.iter().enumerate() {
        // Insert keeping the list sorted by descending score; equal scores keep index order.
        let at = chosen.iter().position(|&(_, c)| s > c).unwrap_or(chosen.len());
        if at < r.top_k {
            chosen.insert(at, (e, s));
            chosen.truncate(r.top_k);
        }
    }
    let sum: f32 = chosen.iter().map(|c| c.1).sum();
    if r.renormalize && sum > 0.0 {
        chosen.iter_mut().for_each(|c| c.1 /= sum);
    }
}

/// The activation, in place.
fn activate(act: ExpertAct, g: &mut [f32], up: &[f32]) {
    for (g, u) in g.iter_mut().zip(up) {
        let x = *g;
        let a = match act {
            ExpertAct::Silu => x / (1.0 + (-x).exp()),
            ExpertAct::Gelu => 0.5 * x * (1.0 + libm::erff(x / std::f32::consts::SQRT_2)),
            ExpertAct::GeluTanh => {
                let c = (2.0 / std::f32::consts::PI).sqrt();
                0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
            }
            ExpertAct::Relu => x.max(0.0),
        };
        *g = a * u;
    }
}

fn buf(v: &mut [f32]) -> Buf {
    Buf {
        ptr: v.as_mut_ptr() as *mut u8,
        len: v.len() * 4,
    }
}

/// `out [rows, n] = a [rows, k] @ wᵀ` for a weight `w [n, k]`.
fn product(
    a: &mut [f32],
    w: Buf,
    (n, k): (usize, usize),
    out: &mut [f32],
    threads: usize,
    level: Level,
) -> Result<(), String> {
    let rows = a.len() / k.max(1);
    let e = Epilogue {
        ta: false,
        tb: true,
        scale: 1.0,
        bias: None,
        acc: None,
    };
    kernels::matmul(
        (buf(a), &[rows, k]),
        (w, &[n, k]),
        (buf(out), &[rows, n]),
        e,
        threads,
        level,
    )
}

/// Shapes `(rows, d, experts, ffn)` after checking every operand against its buffer.
fn shapes(
    args: &[(Buf, &[usize], DType)],
    out: (Buf, &[usize], DType),
) -> Result<(usize, usize, usize, usize), String> {
    let bad = || {
        format!(
            "moe operands {:?} do not fit",
            args.iter().map(|a| a.1).collect::<Vec<_>>()
        )
    };
    let (Some(x), Some(l), Some(&[f, d])) = (args.first(), args.get(1), args.get(2).map(|g| g.1)) else {
        return Err(bad());
    };
    let experts = (args.len() - 2) / 3;
    let (Some((&dx, lead)), Some((&el, lead_l))) = (x.1.split_last(), l.1.split_last()) else {
        return Err(bad());
    };
    let weights_fit = args[2..]
        .chunks(3)
        .all(|w| w.len() == 3 && w[0].1 == [f, d] && w[1].1 == [f, d] && w[2].1 == [d, f]);
    let ok = dx == d && el == experts && lead == lead_l && out.1 == x.1 && weights_fit && args.len() == 2 + 3 * experts;
    if !ok || args.iter().any(|a| a.2 != DType::F32) || out.2 != DType::F32 {
        return Err(bad());
    }
    for a in args {
        kernels::check_len("moe operand", a.0, a.1, 4)?;
    }
    kernels::check_len("moe output", out.0, out.1, 4)?;
    Ok((lead.iter().product(), d, experts, f))
}

/// Runs `op` if it is `Op::Moe`; `None` for any other op.
pub fn try_moe(
    op: &Op,
    args: &[(Buf, &[usize], DType)],
    out: (Buf, &[usize], DType),
    threads: usize,
    level: Level,
) -> Option<Result<MoeStats, String>> {
    let Op::Moe {
        top_k,
        experts: _,
        gating,
        renormalize,
        act,
    } = *op
    else {
        return None;
    };
    let r = Routing {
        top_k: top_k as usize,
        gating,
        renormalize,
        act,
    };
    Some(shapes(args, out).and_then(|s| run(args, out.0, s, r, threads, level)))
}

fn slice<'a>(b: Buf) -> &'a [f32] {
    // SAFETY: `shapes` checked the buffer holds whole f32s; the runtime aligns values to 64 bytes.
    unsafe { std::slice::from_raw_parts(b.ptr as *const f32, b.len / 4) }
}

fn run(
    args: &[(Buf, &[usize], DType)],
    out: Buf,
    (rows, d, experts, f): (usize, usize, usize, usize),
    r: Routing,
    threads: usize,
    level: Level,
) -> Result<MoeStats, String> {
    let (x, logits) = (slice(args[0].0), slice(args[1].0));
    // Buckets: per expert, the rows routed to it and their weights.
    let mut buckets: Vec<Vec<(usize, f32)>> = vec![Vec::new(); experts];
    let (mut scores, mut chosen) = (Vec::new(), Vec::new());
    for row in 0..rows {
        route(
            &logits[row * experts..(row + 1) * experts],
            &r,
            &mut scores,
            &mut chosen,
        );
        for &(e, w) in &chosen {
            buckets[e].push((row, w));
        }
    }
    // SAFETY: `shapes` checked the output buffer holds rows × d f32s; it is a distinct value.
    let o = unsafe { std::slice::from_raw_parts_mut(out.ptr as *mut f32, rows * d) };
    o.fill(0.0);
    let mut stats = MoeStats {
        pairs: rows * r.top_k,
        ..MoeStats::default()
    };
    let (mut xe, mut g, mut u, mut y) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (e, bucket) in buckets.iter().enumerate() {
        if bucket.is_empty() {
            continue;
        }
        let n = bucket.len();
        xe.clear();
        for &(row, _) in bucket {
            xe.extend_from_slice(&x[row * d..(row + 1) * d]);
        }
        g.resize(n * f, 0.0);
        u.resize(n * f, 0.0);
        y.resize(n * d, 0.0);
        let w = &args[2 + 3 * e..5 + 3 * e];
        product(&mut xe, w[0].0, (f, d), &mut g, threads, level)?;
        product(&mut xe, w[1].0, (f, d), &mut u, threads, level)?;
        activate(r.act, &mut g, &u);
        product(&mut g, w[2].0, (d, f), &mut y, threads, level)?;
        for (i, &(row, w)) in bucket.iter().enumerate() {
            for (o, v) in o[row * d..(row + 1) * d].iter_mut().zip(&y[i * d..(i + 1) * d]) {
                *o += w * v;
            }
        }
        stats.experts_read += 1;
        stats.weight_bytes += 3 * f * d * 4;
    }
    Ok(stats)
}
