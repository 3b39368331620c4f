//! Throughput of kiln's packed-weight products (`kiln_runtime::gemm`) by depth and row block.
//! `cargo run --release -p kiln-runtime --example packed_gemm [threads] [kc] [mc] [MxKxN…]`.

use kiln_runtime::cpu::Level;
use kiln_runtime::gemm::{self, MicroKernel, Operands};
use std::time::Instant;

fn gflops(kern: &MicroKernel, (m, k, n): (usize, usize, usize), threads: usize) -> (f64, f64, f64) {
    let a = aligned((0..m * k).map(|i| (i % 7) as f32 * 0.1).collect());
    let w: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
    let b = aligned(gemm::pack(kern, &w, k, n, true));
    let mut c = aligned(vec![0f32; m * n]);
    let o = Operands {
        a: a.as_ptr(),
        lda: k,
        ldc: n,
        b: b.as_ptr(),
        out: c.as_mut_ptr(),
        bias: std::ptr::null(),
        res: std::ptr::null(),
        scale: 1.0,
        post: None,
    };
    // SAFETY: the buffers have the sizes `matmul` asks for; the level was checked by the caller.
    let run = || unsafe { gemm::matmul(kern, o, m, k, n, threads) };
    for _ in 0..5 {
        run();
    }
    let mut t: Vec<f64> = (0..60)
        .map(|_| {
            let s = Instant::now();
            run();
            2.0 * (m * k * n) as f64 / s.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    t.sort_by(f64::total_cmp);
    (t[t.len() / 2], t[t.len() / 10], t[t.len() * 9 / 10])
}

/// A copy of `v` starting on a 64-byte boundary, as the runtime's weights and arena do.
fn aligned(v: Vec<f32>) -> Aligned {
    let mut buf = vec![0f32; v.len() + 16];
    let skip = buf.as_ptr().align_offset(64);
    buf[skip..skip + v.len()].copy_from_slice(&v);
    Aligned(buf, skip)
}

struct Aligned(Vec<f32>, usize);

impl Aligned {
    fn as_ptr(&self) -> *const f32 {
        self.0[self.1..].as_ptr()
    }
    fn as_mut_ptr(&mut self) -> *mut f32 {
        self.0[self.1..].as_mut_ptr()
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let threads = num(0, 2);
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().ok();
    let base = MicroKernel::for_level(Level::host());
    let kern = base.blocked(num(1, base.kc), num(2, base.mc));
    let shapes: Vec<(usize, usize, usize)> = if args.len() > 3 {
        args[3..]
            .iter()
            .map(|s| {
                let d: Vec<usize> = s.split('x').map(|x| x.parse().expect("MxKxN")).collect();
                (d[0], d[1], d[2])
            })
            .collect()
    } else {
        vec![
            (128, 384, 1152),
            (128, 384, 1536),
            (128, 1536, 384),
            (1024, 384, 1152),
            (1024, 384, 1536),
            (1024, 1536, 384),
            (1024, 1024, 1024),
        ]
    };
    println!(
        "{} kc {} mc {}, {threads} thread(s): GFLOP/s median [p10 p90]",
        kern.name, kern.kc, kern.mc
    );
    for s in shapes {
        let (med, lo, hi) = gflops(&kern, s, threads);
        println!("  {}x{}x{}: {med:.1} [{lo:.1} {hi:.1}]", s.0, s.1, s.2);
    }
}
