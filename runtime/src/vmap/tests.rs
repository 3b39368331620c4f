//! Tapes at every level this CPU runs, against f64 arithmetic (erf from libm): each function on
//! its own, GELU as the frontend lowers it over rows with partial chunks, and bad tapes refused.

use super::*;

fn rand(seed: &mut u64, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Runs `tape` over a `rows × cols` block of a wider buffer and checks every element against
/// `want` within `tol` (absolute, or relative above 1), and that the columns past `cols` are
/// untouched.
fn check_tape(tape: &[TapeOp], scale: f32, tol: f64, want: impl Fn(f64) -> f64) {
    check(tape, 1).unwrap();
    let (rows, cols, ldc) = (3, 150, 160);
    for level in Level::runnable() {
        let x = rand(&mut 7, rows * ldc, scale);
        let mut y = x.clone();
        // SAFETY: the rows lie inside `y`; `runnable` levels run here.
        unsafe { apply(tape, level, y.as_mut_ptr(), rows, cols, ldc) };
        for (i, (x, y)) in x.iter().zip(&y).enumerate() {
            if i % ldc >= cols {
                assert_eq!(
                    x.to_bits(),
                    y.to_bits(),
                    "{level:?}: element {i} past the columns changed"
                );
                continue;
            }
            let w = want(*x as f64);
            let err = (*y as f64 - w).abs() / w.abs().max(1.0);
            assert!(err <= tol, "{level:?} {tape:?}: f({x}) = {y}, want {w}");
        }
    }
}

/// The function a tape should compute, in f64.
type Reference = fn(f64) -> f64;

#[test]
fn unary_functions_match_f64() {
    use UnaryOp::*;
    let cases: [(UnaryOp, f32, Reference); 10] = [
        (Neg, 5.0, |x| -x),
        (Abs, 5.0, f64::abs),
        (Sqrt, 5.0, |x| x.abs().sqrt()),
        (Rsqrt, 5.0, |x| 1.0 / x.abs().sqrt()),
        (Recip, 5.0, |x| 1.0 / x),
        (Relu, 5.0, |x| x.max(0.0)),
        (Exp, 80.0, f64::exp),
        (Sigmoid, 20.0, |x| 1.0 / (1.0 + (-x).exp())),
        (Tanh, 10.0, f64::tanh),
        (Erf, 5.0, libm::erf),
    ];
    for (u, scale, f) in cases {
        let tape = if matches!(u, Sqrt | Rsqrt) {
            vec![TapeOp::Input, TapeOp::Unary(Abs, 0), TapeOp::Unary(u, 1)]
        } else {
            vec![TapeOp::Input, TapeOp::Unary(u, 0)]
        };
        // Recip near zero is ill-conditioned in relative terms only.
        check_tape(&tape, scale, 2e-6, f);
    }
}

#[test]
fn binary_arithmetic_matches_f64() {
    use BinaryOp::*;
    let cases: [(BinaryOp, Reference); 6] = [
        (Add, |x| x + 0.375),
        (Sub, |x| 0.375 - x),
        (Mul, |x| x * 0.375),
        (Div, |x| 0.375 / x),
        (Max, |x| x.max(0.375)),
        (Min, |x| x.min(0.375)),
    ];
    for (b, f) in cases {
        let tape = [
            TapeOp::Input,
            TapeOp::Const(0.375),
            TapeOp::Binary(
                b,
                if b == Sub || b == Div { 1 } else { 0 },
                if b == Sub || b == Div { 0 } else { 1 },
            ),
        ];
        check_tape(&tape, 4.0, 1e-6, f);
    }
}

#[test]
fn gelu_as_lowered_matches_f64() {
    use BinaryOp::*;
    let tape = [
        TapeOp::Input,
        TapeOp::Const(std::f32::consts::FRAC_1_SQRT_2),
        TapeOp::Binary(Mul, 0, 1),
        TapeOp::Unary(UnaryOp::Erf, 2),
        TapeOp::Const(1.0),
        TapeOp::Binary(Add, 3, 4),
        TapeOp::Const(0.5),
        TapeOp::Binary(Mul, 0, 6),
        TapeOp::Binary(Mul, 7, 5),
    ];
    check_tape(&tape, 6.0, 1e-6, |x| {
        0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
    });
}

#[test]
fn bad_tapes_are_refused() {
    assert!(check(&[], 1).is_err());
    assert!(check(&[TapeOp::Input, TapeOp::Unary(UnaryOp::Exp, 1)], 1).is_err());
    assert!(check(&[TapeOp::Input, TapeOp::Binary(BinaryOp::Add, 0, 5)], 1).is_err());
    assert!(check(&[TapeOp::Input, TapeOp::Unary(UnaryOp::Log, 0)], 1).is_err());
    assert!(check(&[TapeOp::Input, TapeOp::Binary(BinaryOp::Pow, 0, 0)], 1).is_err());
    assert!(check(&vec![TapeOp::Input; MAX_TAPE + 1], 1).is_err());
    assert!(check(&[TapeOp::Input, TapeOp::Unary(UnaryOp::Erf, 0)], 1).is_ok());
}

#[test]
fn sums_of_two_inputs_are_recognised() {
    use BinaryOp::*;
    let sum = [TapeOp::Input, TapeOp::Arg(1), TapeOp::Binary(Add, 0, 1)];
    assert!(check(&sum, 2).is_ok() && check(&sum, 1).is_err());
    assert!(is_sum_of_two_inputs(&sum));
    assert!(is_sum_of_two_inputs(&[
        TapeOp::Arg(1),
        TapeOp::Input,
        TapeOp::Binary(Add, 1, 0)
    ]));
    assert!(!is_sum_of_two_inputs(&[
        TapeOp::Input,
        TapeOp::Arg(1),
        TapeOp::Binary(Sub, 0, 1)
    ]));
    assert!(!is_sum_of_two_inputs(&[
        TapeOp::Input,
        TapeOp::Input,
        TapeOp::Binary(Add, 0, 1)
    ]));
    assert!(!is_sum_of_two_inputs(&[
        TapeOp::Input,
        TapeOp::Arg(2),
        TapeOp::Binary(Add, 0, 1)
    ]));
}
