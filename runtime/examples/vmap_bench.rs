//! Throughput of the full-width elementwise path (`kiln_runtime::vmap`) on GELU as the frontend
//! lowers it, 128 x 1536 (MiniLM's FFN at 1 x 128), per level this CPU runs.
//! `cargo run --release -p kiln-runtime --example vmap_bench`.

use kiln_ir::{BinaryOp::*, UnaryOp};
use kiln_runtime::cpu::Level;
use kiln_runtime::vmap::{apply, TapeOp};
use std::time::Instant;
fn main() {
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
    let (rows, cols) = (128, 1536);
    for level in Level::runnable() {
        let x: Vec<f32> = (0..rows * cols).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
        let mut y = x.clone();
        let mut s = 0.0;
        for _ in 0..20 {
            y.copy_from_slice(&x);
            let t = Instant::now();
            // SAFETY: the rows lie inside `y`; `runnable` levels run here.
            unsafe { apply(&tape, level, y.as_mut_ptr(), rows, cols, cols) };
            s += t.elapsed().as_secs_f64() / 20.0;
        }
        println!(
            "{level:?}: {:.3} ms, {:.2} ns/elem",
            s * 1e3,
            s * 1e9 / (rows * cols) as f64
        );
    }
}
