//! Every microkernel this CPU runs, against a naive f64 product, on shapes with partial tiles in
//! both directions, several depth blocks, every epilogue combination and 1 and 3 threads.

use super::*;

fn rand(seed: &mut u64, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

struct Case {
    m: usize,
    k: usize,
    n: usize,
    transposed: bool,
    bias: bool,
    res: bool,
}

fn check(kern: &MicroKernel, c: &Case, threads: usize, seed: &mut u64) {
    let (m, k, n) = (c.m, c.k, c.n);
    let a = rand(seed, m * k);
    let w = rand(seed, k * n);
    let bias = rand(seed, n);
    let res = rand(seed, m * n);
    let scale = 0.75f32;
    let packed = pack(kern, &w, k, n, c.transposed);
    assert_eq!(packed.len(), kern.packed_len(k, n));
    let mut out = vec![f32::NAN; m * n];
    let o = Operands {
        a: a.as_ptr(),
        lda: k,
        ldc: n,
        b: packed.as_ptr(),
        out: out.as_mut_ptr(),
        bias: if c.bias { bias.as_ptr() } else { std::ptr::null() },
        res: if c.res { res.as_ptr() } else { std::ptr::null() },
        scale,
        post: None,
    };
    let pool = crate::kernels::pool(threads).unwrap();
    // SAFETY: the level was checked by the caller; sizes as documented.
    pool.install(|| unsafe { matmul(kern, o, m, k, n, threads) });
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            let mut mag = 0f64;
            for kk in 0..k {
                let b = if c.transposed { w[j * k + kk] } else { w[kk * n + j] };
                s += a[i * k + kk] as f64 * b as f64;
                mag += (a[i * k + kk] as f64 * b as f64).abs();
            }
            let mut want = s * scale as f64;
            want += if c.bias { bias[j] as f64 } else { 0.0 };
            want += if c.res { res[i * n + j] as f64 } else { 0.0 };
            let got = out[i * n + j] as f64;
            let tol = 1e-6 * (mag + 3.0);
            assert!(
                (got - want).abs() <= tol,
                "{} {m}x{k}x{n} (threads {threads}) at [{i}, {j}]: {got} vs {want}",
                kern.name
            );
        }
    }
}

fn cases() -> Vec<Case> {
    let shapes = [
        (1, 1, 1),
        (1, 37, 5),
        (3, 64, 40),
        (7, 300, 33),
        (13, 17, 64),
        (50, 513, 97),
        (130, 100, 70),
        (4, 800, 129),
        (97, 0, 20),
    ];
    let mut v = Vec::new();
    for (i, &(m, k, n)) in shapes.iter().enumerate() {
        v.push(Case {
            m,
            k,
            n,
            transposed: i % 2 == 0,
            bias: i % 3 != 1,
            res: i % 3 != 2,
        });
    }
    v
}

#[test]
fn every_runnable_kernel_matches_the_naive_product() {
    let mut seed = 7u64;
    for kern in REGISTRY {
        if !kern.level.runs_here() {
            eprintln!(
                "SKIPPED microkernel {}: this CPU lacks {} ({})",
                kern.name,
                kern.level,
                crate::cpu::model_name()
            );
            continue;
        }
        for c in cases() {
            for threads in [1, 3] {
                check(kern, &c, threads, &mut seed);
            }
        }
    }
}

#[test]
fn levels_pick_their_kernels() {
    if cfg!(target_arch = "x86_64") {
        assert_eq!(MicroKernel::for_level(Level::Portable).name, "sse_6x8");
        assert_eq!(MicroKernel::for_level(Level::V2).name, "sse_6x8");
        assert_eq!(MicroKernel::for_level(Level::V3).name, "avx2_6x16");
        assert_eq!(MicroKernel::for_level(Level::V4).name, "avx512_8x32");
    }
    for k in REGISTRY {
        assert_eq!(MicroKernel::by_name(k.name).map(|x| x.name), Some(k.name));
        assert_eq!(k.mc % k.mr, 0, "{}", k.name);
    }
    assert!(MicroKernel::by_name("neon_8x12").is_none());
}

#[test]
fn row_and_column_packing_match_pack() {
    let mut seed = 3;
    for kern in REGISTRY {
        for (k, n) in [(1, 1), (5, 7), (32, 40), (17, 64), (3, 100)] {
            let w = rand(&mut seed, k * n);
            let want = pack(kern, &w, k, n, false);
            let mut rows = vec![f32::NAN; kern.packed_len(k, n)];
            pack_rows(kern, k, n, &mut rows, |kk| &w[kk * n..(kk + 1) * n]);
            assert_eq!(rows, want, "{} rows {k}x{n}", kern.name);
            let t: Vec<f32> = (0..n * k).map(|i| w[(i % k) * n + i / k]).collect();
            let mut cols = vec![f32::NAN; kern.packed_len(k, n)];
            pack_cols(kern, k, n, &mut cols, |j| &t[j * k..(j + 1) * k]);
            assert_eq!(cols, want, "{} cols {k}x{n}", kern.name);
        }
    }
}
