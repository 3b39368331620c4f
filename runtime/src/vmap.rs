//! One-input elementwise kernels at the CPU level's full vector width, from their expression
//! tape (`KernelDecl::tape`).
//!
//! Cranelift's x64 backend emits 128-bit vectors only, so a generated GELU runs at a quarter of
//! what AVX-512 offers: on MiniLM (Intel Xeon, 2 threads) the FFN's GELU epilogue cost a third as
//! much as the product it follows. The compiler therefore also records a Map kernel's expressions
//! as a tape, and the runtime evaluates the tape over chunks of `CHUNK` elements, one expression
//! at a time, each a fixed-length loop the Rust compiler vectorises at the width of the
//! `#[target_feature]` wrapper it is inlined into. The functions are the code generator's —
//! exp (`softmax::exp`'s algorithm), erf (Abramowitz & Stegun 7.1.26), tanh and sigmoid through
//! exp — so both paths compute the same values to rounding.

use crate::cpu::Level;
use kiln_ir::{BinaryOp, UnaryOp};
use serde::{Deserialize, Serialize};

/// Elements per chunk: every expression's chunk stays in L1.
const CHUNK: usize = 64;

/// The longest tape evaluated this way (longer kernels keep their generated code).
pub const MAX_TAPE: usize = 48;

/// One expression of a tape; operands are earlier expressions' indices. Equality compares
/// constants bit for bit (the manifest's equality).
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub enum TapeOp {
    /// The kernel's (first) input element.
    Input,
    /// Input number `i` of a kernel with several (evaluated only by the runtime's recognised
    /// forms, such as [`row_sum`]; `apply` takes one-input tapes).
    Arg(u16),
    /// A constant.
    Const(f32),
    /// A unary function of an earlier expression.
    Unary(UnaryOp, u16),
    /// Binary arithmetic on two earlier expressions.
    Binary(BinaryOp, u16, u16),
}

impl PartialEq for TapeOp {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (TapeOp::Const(a), TapeOp::Const(b)) => a.to_bits() == b.to_bits(),
            (TapeOp::Input, TapeOp::Input) => true,
            (TapeOp::Arg(a), TapeOp::Arg(b)) => a == b,
            (TapeOp::Unary(u, a), TapeOp::Unary(v, b)) => u == v && a == b,
            (TapeOp::Binary(o, a, b), TapeOp::Binary(p, c, d)) => o == p && a == c && b == d,
            _ => false,
        }
    }
}

impl Eq for TapeOp {}

/// Whether a tape can evaluate `u`.
pub fn supports_unary(u: UnaryOp) -> bool {
    !matches!(u, UnaryOp::Log | UnaryOp::Sin | UnaryOp::Cos | UnaryOp::Not)
}

/// Whether a tape can evaluate `b`.
pub fn supports_binary(b: BinaryOp) -> bool {
    b != BinaryOp::Pow
}

/// Checks a tape read from an artifact, for a kernel of `inputs` inputs: short enough, inputs
/// that exist, operands earlier, functions supported.
pub fn check(tape: &[TapeOp], inputs: usize) -> Result<(), String> {
    if tape.is_empty() || tape.len() > MAX_TAPE {
        return Err(format!(
            "a tape of {} expressions (1 to {MAX_TAPE} allowed)",
            tape.len()
        ));
    }
    for (i, op) in tape.iter().enumerate() {
        let ok = match *op {
            TapeOp::Input | TapeOp::Const(_) => inputs > 0,
            TapeOp::Arg(a) => (a as usize) < inputs,
            TapeOp::Unary(u, a) => supports_unary(u) && (a as usize) < i,
            TapeOp::Binary(b, x, y) => supports_binary(b) && (x as usize) < i && (y as usize) < i,
        };
        if !ok {
            return Err(format!(
                "tape expression {i} ({op:?}) is not one this runtime evaluates"
            ));
        }
    }
    Ok(())
}

/// Whether the tape is `input 0 + input 1` (attention's logits with an additive mask: the
/// product's epilogue adds it as a bias row instead).
pub fn is_sum_of_two_inputs(tape: &[TapeOp]) -> bool {
    use TapeOp::{Arg, Binary, Input};
    let loads = |a: TapeOp, b: TapeOp| matches!((a, b), (Input, Arg(1)) | (Arg(1), Input));
    matches!(tape, [a, b, Binary(BinaryOp::Add, 0, 1) | Binary(BinaryOp::Add, 1, 0)] if loads(*a, *b))
}

/// Whether `level` evaluates tapes faster than the generated 128-bit kernels.
pub fn pays(level: Level) -> bool {
    level.avx2()
}

/// Applies the tape in place to `rows` rows of `cols` elements, `ldc` apart, from `out`.
///
/// # Safety
/// The tape passed [`check`]; the CPU runs `level`; the rows lie inside one buffer.
pub unsafe fn apply(tape: &[TapeOp], level: Level, out: *mut f32, rows: usize, cols: usize, ldc: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if level.avx512() {
            return x86::avx512(tape, out, rows, cols, ldc);
        }
        if level.avx2() {
            return x86::avx2(tape, out, rows, cols, ldc);
        }
    }
    let _ = level;
    apply_with::<false>(tape, out, rows, cols, ldc)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{apply_with, TapeOp};

    #[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
    pub unsafe fn avx512(tape: &[TapeOp], out: *mut f32, rows: usize, cols: usize, ldc: usize) {
        apply_with::<true>(tape, out, rows, cols, ldc)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn avx2(tape: &[TapeOp], out: *mut f32, rows: usize, cols: usize, ldc: usize) {
        apply_with::<true>(tape, out, rows, cols, ldc)
    }
}

type Chunk = [f32; CHUNK];

#[inline(always)]
unsafe fn apply_with<const FMA: bool>(tape: &[TapeOp], out: *mut f32, rows: usize, cols: usize, ldc: usize) {
    let mut scratch = [[0f32; CHUNK]; MAX_TAPE];
    let scratch = &mut scratch[..tape.len()];
    for r in 0..rows {
        // SAFETY: the caller's rows.
        let row = std::slice::from_raw_parts_mut(out.add(r * ldc), cols);
        for part in row.chunks_mut(CHUNK) {
            eval::<FMA>(tape, part, scratch);
            part.copy_from_slice(&scratch[tape.len() - 1][..part.len()]);
        }
    }
}

/// Evaluates every expression over one chunk (`x` is the input; the result is the last chunk).
#[inline(always)]
fn eval<const FMA: bool>(tape: &[TapeOp], x: &[f32], s: &mut [Chunk]) {
    for (i, op) in tape.iter().enumerate() {
        let (done, rest) = s.split_at_mut(i);
        let dst = &mut rest[0];
        match *op {
            // `apply` runs one-input tapes only (`check(tape, 1)`): `Arg(0)` at most.
            TapeOp::Input | TapeOp::Arg(_) => dst[..x.len()].copy_from_slice(x),
            TapeOp::Const(c) => dst.fill(c),
            TapeOp::Unary(u, a) => unary::<FMA>(u, &done[a as usize], dst),
            TapeOp::Binary(b, p, q) => binary(b, &done[p as usize], &done[q as usize], dst),
        }
    }
}

#[inline(always)]
fn map(a: &Chunk, d: &mut Chunk, f: impl Fn(f32) -> f32) {
    for (d, a) in d.iter_mut().zip(a) {
        *d = f(*a);
    }
}

#[inline(always)]
fn binary(op: BinaryOp, a: &Chunk, b: &Chunk, d: &mut Chunk) {
    let zip = |d: &mut Chunk, f: fn(f32, f32) -> f32| {
        for ((d, a), b) in d.iter_mut().zip(a).zip(b) {
            *d = f(*a, *b);
        }
    };
    match op {
        BinaryOp::Add => zip(d, |a, b| a + b),
        BinaryOp::Sub => zip(d, |a, b| a - b),
        BinaryOp::Mul => zip(d, |a, b| a * b),
        BinaryOp::Div => zip(d, |a, b| a / b),
        // The generated kernels' `a > b ? a : b` (and `<`), NaN included.
        BinaryOp::Max => zip(d, |a, b| if a > b { a } else { b }),
        BinaryOp::Min => zip(d, |a, b| if a < b { a } else { b }),
        BinaryOp::Pow => unreachable!("check() refuses pow"),
    }
}

#[inline(always)]
fn unary<const FMA: bool>(op: UnaryOp, a: &Chunk, d: &mut Chunk) {
    match op {
        UnaryOp::Neg => map(a, d, |x| -x),
        UnaryOp::Abs => map(a, d, f32::abs),
        UnaryOp::Sqrt => map(a, d, f32::sqrt),
        UnaryOp::Rsqrt => map(a, d, |x| 1.0 / x.sqrt()),
        UnaryOp::Recip => map(a, d, |x| 1.0 / x),
        UnaryOp::Relu => map(a, d, |x| if x > 0.0 { x } else { 0.0 }),
        UnaryOp::Exp => map(a, d, exp::<FMA>),
        UnaryOp::Sigmoid => map(a, d, |x| 1.0 / (1.0 + exp::<FMA>(-x))),
        UnaryOp::Tanh => map(a, d, |x| {
            let t = exp::<FMA>(-2.0 * x.abs());
            ((1.0 - t) / (1.0 + t)).copysign(x)
        }),
        UnaryOp::Erf => map(a, d, erf::<FMA>),
        UnaryOp::Log | UnaryOp::Sin | UnaryOp::Cos | UnaryOp::Not => unreachable!("check() refuses {op:?}"),
    }
}

#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `softmax::exp` without branches: the clamps and the flush to zero are selects.
#[inline(always)]
fn exp<const FMA: bool>(x: f32) -> f32 {
    use crate::softmax::{EXP_BIAS_BITS, LN2_HI, LN2_LO, LOG2_E, MAGIC, OVER, TAYLOR, UNDER};
    let under = x < UNDER;
    let x = if x > UNDER { x } else { UNDER };
    let x = if x < OVER { x } else { OVER };
    let t = madd::<FMA>(x, LOG2_E, MAGIC);
    let n = t - MAGIC;
    let r = madd::<FMA>(n, LN2_LO, madd::<FMA>(n, LN2_HI, x));
    let mut p = TAYLOR[0];
    for c in &TAYLOR[1..] {
        p = madd::<FMA>(p, r, *c);
    }
    let e = (t.to_bits() as i32).wrapping_sub(EXP_BIAS_BITS) << 23;
    let v = p * f32::from_bits(e as u32);
    if under {
        0.0
    } else {
        v
    }
}

/// Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), with the sign of x: the code generator's erf.
#[inline(always)]
fn erf<const FMA: bool>(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / madd::<FMA>(0.327_591_1, a, 1.0);
    let mut p = 1.061_405_4;
    for c in [-1.453_152_1, 1.421_413_8, -0.284_496_72, 0.254_829_6] {
        p = madd::<FMA>(p, t, c);
    }
    let y = 1.0 - p * t * exp::<FMA>(-(a * a));
    y.copysign(x)
}

#[cfg(test)]
mod tests;
