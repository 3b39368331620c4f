//! The mixture of experts by its dense definition: every expert runs on every row, and its output
//! is weighted by the row's score for it — zero unless the expert is among the row's top k. The
//! backends run only the routed (row, expert) pairs; this is what they are checked against.

use kiln_ir::{ExpertAct, Gating};

use crate::value::Value;

/// The activation at `x`.
fn act(a: ExpertAct, x: f64) -> f64 {
    match a {
        ExpertAct::Silu => x / (1.0 + (-x).exp()),
        ExpertAct::Gelu => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
        ExpertAct::GeluTanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
        }
        ExpertAct::Relu => x.max(0.0),
    }
}

/// Every expert's weight for one row: the top `k` scores (ties to the lower index), divided by
/// their sum when `renormalize`; zero for the others.
pub(crate) fn expert_weights(logits: &[f64], k: usize, gating: Gating, renormalize: bool) -> Vec<f64> {
    let scores: Vec<f64> = match gating {
        Gating::Softmax => {
            let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|x| x / s).collect()
        }
        Gating::Sigmoid => logits.iter().map(|l| 1.0 / (1.0 + (-l).exp())).collect(),
    };
    // An expert is chosen when fewer than k experts beat it (higher score, or equal and lower index).
    let chosen: Vec<bool> = (0..scores.len())
        .map(|e| {
            let better = (0..scores.len())
                .filter(|&o| scores[o] > scores[e] || (scores[o] == scores[e] && o < e))
                .count();
            better < k
        })
        .collect();
    let sum: f64 = (0..scores.len()).filter(|e| chosen[*e]).map(|e| scores[e]).sum();
    let norm = if renormalize && sum > 0.0 { sum } else { 1.0 };
    (0..scores.len())
        .map(|e| if chosen[e] { scores[e] / norm } else { 0.0 })
        .collect()
}

/// `y = W x` for a row-major `[rows, cols]` matrix starting at `w`.
fn matvec(w: &[f64], rows: usize, cols: usize, x: &[f64]) -> Vec<f64> {
    (0..rows)
        .map(|r| w[r * cols..(r + 1) * cols].iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

/// `Op::Moe` on `x [.., d]`, `logits [.., E]`, then per expert `gate`/`up [f, d]`, `down [d, f]`.
pub(crate) fn moe(args: &[&Value], top_k: usize, gating: Gating, renormalize: bool, a: ExpertAct) -> Vec<f64> {
    let (x, logits) = (args[0], args[1]);
    let (experts, f, d) = ((args.len() - 2) / 3, args[2].shape[0], args[2].shape[1]);
    let rows = x.data.len() / d.max(1);
    let mut out = vec![0.0; rows * d];
    for r in 0..rows {
        let xr = &x.data[r * d..(r + 1) * d];
        let ws = expert_weights(&logits.data[r * experts..(r + 1) * experts], top_k, gating, renormalize);
        for (e, we) in ws.iter().enumerate() {
            let w = &args[2 + 3 * e..5 + 3 * e];
            let g = matvec(&w[0].data, f, d, xr);
            let u = matvec(&w[1].data, f, d, xr);
            let h: Vec<f64> = g.iter().zip(&u).map(|(g, u)| act(a, *g) * u).collect();
            let y = matvec(&w[2].data, d, f, &h);
            for (o, v) in out[r * d..(r + 1) * d].iter_mut().zip(y) {
                *o += we * v;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_top2_renormalized_is_a_softmax_over_the_chosen_logits() {
        let ws = expert_weights(&[0.5, 2.0, -1.0, 1.0], 2, Gating::Softmax, true);
        let (a, b) = (2.0f64.exp(), 1.0f64.exp());
        let want = [0.0, a / (a + b), 0.0, b / (a + b)];
        for (g, w) in ws.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{g} vs {w}");
        }
    }

    #[test]
    fn ties_go_to_the_lower_index_and_sigmoid_scores_stay_unnormalized() {
        let ws = expert_weights(&[1.0, 3.0, 3.0, 3.0], 2, Gating::Sigmoid, false);
        let s = 1.0 / (1.0 + (-3.0f64).exp());
        assert_eq!(ws, vec![0.0, s, s, 0.0]);
    }
}
