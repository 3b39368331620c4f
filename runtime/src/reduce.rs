//! Sums and means of f32 values over a run of adjacent axes, natively (`Step::Fallback` of a
//! reduction the generated kernels do not cover: those reduce the last axis only).
//!
//! MiniLM's mean pooling sums `[b, s, h]` over `s`; through the interpreter's evaluator (f64
//! values, one element at a time) that cost 1.5 ms of 83 at 8 × 128. Here the input is seen as
//! `[outer, reduced, inner]` and whole inner rows are added, in f32 like every compiled kernel.

use crate::kernels::{check_len, Buf};
use kiln_ir::{DType, Op, ReduceOp};

/// Runs `op` natively if it is an f32 sum or mean over adjacent axes; `None` leaves it to the
/// interpreter's evaluator.
pub fn try_reduce(op: &Op, args: &[(Buf, &[usize], DType)], out: (Buf, &[usize], DType)) -> Option<Result<(), String>> {
    let Op::Reduce { op: rop, axes, .. } = op else {
        return None;
    };
    let [(x, shape, DType::F32)] = args else {
        return None;
    };
    let adjacent = axes.windows(2).all(|w| w[1] == w[0] + 1);
    let mean = match rop {
        ReduceOp::Sum => false,
        ReduceOp::Mean => true,
        ReduceOp::Max | ReduceOp::Min => return None,
    };
    let (xs, ys) = (x.ptr as usize, out.0.ptr as usize);
    let overlap = xs < ys + out.0.len && ys < xs + x.len;
    if out.2 != DType::F32 || !adjacent || overlap || axes.last().is_none_or(|a| *a >= shape.len()) {
        return None;
    }
    Some(run(*x, shape, (axes[0], axes[axes.len() - 1] + 1), out, mean))
}

fn run(
    x: Buf,
    shape: &[usize],
    (a0, a1): (usize, usize),
    out: (Buf, &[usize], DType),
    mean: bool,
) -> Result<(), String> {
    check_len("reduce input", x, shape, 4)?;
    check_len("reduce output", out.0, out.1, 4)?;
    let outer: usize = shape[..a0].iter().product();
    let red: usize = shape[a0..a1].iter().product();
    let inner: usize = shape[a1..].iter().product();
    if outer * inner * 4 != out.0.len {
        return Err(format!(
            "reduce of {shape:?} over axes {a0}..{a1} does not give {:?}",
            out.1
        ));
    }
    // SAFETY: both lengths were just checked; `try_reduce` checked that they do not overlap.
    let (xs, ys) = unsafe {
        (
            std::slice::from_raw_parts(x.ptr as *const f32, outer * red * inner),
            std::slice::from_raw_parts_mut(out.0.ptr as *mut f32, outer * inner),
        )
    };
    let scale = if mean && red > 0 { 1.0 / red as f32 } else { 1.0 };
    for (o, y) in ys.chunks_exact_mut(inner.max(1)).enumerate().take(outer) {
        y.fill(0.0);
        for r in 0..red {
            let row = &xs[(o * red + r) * inner..][..inner];
            y.iter_mut().zip(row).for_each(|(y, x)| *y += x);
        }
        if mean {
            y.iter_mut().for_each(|y| *y *= scale);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sums over adjacent axes of a `[2, 3, 4, 5]` tensor against the interpreter's evaluator.
    #[test]
    fn sums_and_means_match_the_interpreter() {
        let shape = [2usize, 3, 4, 5];
        let xs: Vec<f32> = (0..120).map(|i| ((i * 37) % 23) as f32 * 0.25 - 2.0).collect();
        let xt = kiln_ir::Tensor::from_f32(shape.to_vec(), xs.clone()).unwrap();
        for (rop, axes) in [
            (ReduceOp::Sum, vec![1]),
            (ReduceOp::Mean, vec![1, 2]),
            (ReduceOp::Sum, vec![0]),
            (ReduceOp::Mean, vec![3]),
            (ReduceOp::Sum, vec![0, 1, 2, 3]),
        ] {
            let op = Op::Reduce {
                op: rop,
                axes: axes.clone(),
                keep_dims: false,
            };
            let ty = kiln_ir::TensorType::new(
                DType::F32,
                shape.iter().map(|d| kiln_ir::Dim::known(*d as u64)).collect(),
            );
            let want_ty = op.infer(&[&ty]).unwrap();
            let want = kiln_interp::eval_op(
                &op,
                &want_ty,
                &[&kiln_interp::Value::from_tensor(&xt, DType::F32)],
                &Default::default(),
            )
            .unwrap()
            .to_tensor()
            .to_f64_vec();
            let oshape: Vec<usize> = want_ty.shape.iter().map(|d| d.as_known().unwrap() as usize).collect();
            let mut ys = vec![f32::NAN; want.len()];
            let xb = Buf {
                ptr: xs.as_ptr() as *mut u8,
                len: xs.len() * 4,
            };
            let yb = Buf {
                ptr: ys.as_mut_ptr() as *mut u8,
                len: ys.len() * 4,
            };
            try_reduce(&op, &[(xb, &shape, DType::F32)], (yb, &oshape, DType::F32))
                .unwrap()
                .unwrap();
            for (y, w) in ys.iter().zip(&want) {
                assert!((*y as f64 - w).abs() < 1e-4, "{rop:?} over {axes:?}: {y} vs {w}");
            }
        }
    }

    #[test]
    fn max_and_non_adjacent_axes_stay_with_the_interpreter() {
        let mut xs = [0f32; 8];
        let b = Buf {
            ptr: xs.as_mut_ptr() as *mut u8,
            len: 32,
        };
        let mut ys = [0f32; 2];
        let o = Buf {
            ptr: ys.as_mut_ptr() as *mut u8,
            len: 8,
        };
        let max = Op::Reduce {
            op: ReduceOp::Max,
            axes: vec![1],
            keep_dims: false,
        };
        assert!(try_reduce(&max, &[(b, &[2, 4], DType::F32)], (o, &[2], DType::F32)).is_none());
        let gap = Op::Reduce {
            op: ReduceOp::Sum,
            axes: vec![0, 2],
            keep_dims: false,
        };
        assert!(try_reduce(&gap, &[(b, &[2, 2, 2], DType::F32)], (o, &[2], DType::F32)).is_none());
    }
}
