//! Executors of plan steps: the calling side of generated kernels, the GEMM, and data movement.
//!
//! Every function checks the concrete shapes it is given before touching memory, so a manifest
//! whose shapes disagree is an error, not an out-of-bounds access.

use kiln_ir::{DType, Dim, Op, Tensor, TensorType};

use crate::cpu::{CpuArg, Level};
use crate::plan::{KernelDecl, KernelKind};

/// The ABI of generated kernels: `rows` rows of `n` elements; `offs` holds, per row, the element
/// offset of every operand (inputs, then the output); `ptrs` the operands' base addresses.
pub type KernelFn = unsafe extern "C" fn(rows: i64, n: i64, offs: *const i64, ptrs: *const *mut u8);

/// A value's memory.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    /// Base address.
    pub ptr: *mut u8,
    /// Length in bytes.
    pub len: usize,
}

// SAFETY: buffers are handed to parallel workers that write disjoint parts of an output and only
// read inputs; the executor never lets two steps run at once.
unsafe impl Send for Buf {}
unsafe impl Sync for Buf {}

/// 64 bytes aligned to 64.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct Align64([u8; 64]);

impl Default for Align64 {
    fn default() -> Self {
        Align64([0; 64])
    }
}

impl Align64 {
    /// 64 copies of `byte`.
    pub fn filled(byte: u8) -> Self {
        Align64([byte; 64])
    }
}

/// Copies bytes into 64-byte aligned storage (the tail of the last block is zero).
pub fn aligned_copy(b: &[u8]) -> Vec<Align64> {
    let mut v = vec![Align64::default(); b.len().div_ceil(64)];
    bytes_of_mut(&mut v)[..b.len()].copy_from_slice(b);
    v
}

/// The bytes of an aligned copy, including the zero tail.
pub fn bytes_of(v: &[Align64]) -> &[u8] {
    // SAFETY: Align64 is plain bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 64) }
}

fn bytes_of_mut(v: &mut [Align64]) -> &mut [u8] {
    // SAFETY: Align64 is plain bytes.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, v.len() * 64) }
}

/// Copies machine code into fresh executable memory.
pub fn executable(code: &[u8]) -> std::io::Result<memmap2::Mmap> {
    let mut m = memmap2::MmapMut::map_anon(code.len().max(1))?;
    m[..code.len()].copy_from_slice(code);
    m.make_exec()
}

/// A thread pool of `n` workers.
pub fn pool(n: usize) -> Result<rayon::ThreadPool, String> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .map_err(|e| e.to_string())
}

/// Element strides of `shape` broadcast to `space` (0 on stretched axes), or an error.
pub(crate) fn bstrides(shape: &[usize], space: &[usize]) -> Result<Vec<usize>, String> {
    if shape.len() > space.len() {
        return Err(format!("operand of shape {shape:?} does not broadcast to {space:?}"));
    }
    let off = space.len() - shape.len();
    let mut own = vec![0usize; shape.len()];
    let mut acc = 1usize;
    for i in (0..shape.len()).rev() {
        own[i] = acc;
        acc = acc.saturating_mul(shape[i]);
    }
    (0..space.len())
        .map(|i| {
            if i < off {
                return Ok(0);
            }
            let d = shape[i - off];
            if d == space[i] {
                Ok(if d == 1 { 0 } else { own[i - off] })
            } else if d == 1 {
                Ok(0)
            } else {
                Err(format!("operand of shape {shape:?} does not broadcast to {space:?}"))
            }
        })
        .collect()
}

fn elems(shape: &[usize]) -> usize {
    shape.iter().fold(1usize, |a, d| a.saturating_mul(*d))
}

pub(crate) fn check_len(what: &str, b: Buf, shape: &[usize], es: usize) -> Result<(), String> {
    if elems(shape).saturating_mul(es) != b.len {
        return Err(format!(
            "{what} buffer of {} bytes does not hold shape {shape:?}",
            b.len
        ));
    }
    Ok(())
}

/// Runs a generated kernel over its iteration space, splitting rows across threads.
#[allow(clippy::too_many_arguments)]
pub fn run_kernel(
    f: KernelFn,
    kind: KernelKind,
    inputs: &[(Buf, &[usize])],
    contiguous: &[bool],
    out: (Buf, &[usize]),
    space: &[usize],
    decl: &KernelDecl,
    threads: usize,
) -> Result<(), String> {
    let (rows, n, nops, offs) = row_offsets(kind, inputs, contiguous, out, space, decl)?;
    if rows == 0 || n == 0 {
        return Ok(());
    }
    let ptrs: Vec<usize> = inputs
        .iter()
        .map(|(b, _)| b.ptr as usize)
        .chain(std::iter::once(out.0.ptr as usize))
        .collect();
    let work = rows * n;
    let chunks = if threads <= 1 || work < 32 * 1024 {
        1
    } else {
        (threads * 4).min(rows)
    };
    let per = rows.div_ceil(chunks);
    let call = |c: usize| {
        let start = c * per;
        let count = per.min(rows - start.min(rows));
        if count > 0 {
            // SAFETY: the offsets were computed from checked shapes, so every row the kernel
            // touches lies inside its operand; chunks write disjoint rows of the output.
            unsafe {
                f(
                    count as i64,
                    n as i64,
                    offs.as_ptr().add(start * nops),
                    ptrs.as_ptr() as *const *mut u8,
                )
            };
        }
    };
    if chunks == 1 {
        call(0);
    } else {
        crate::pool::for_each(chunks, call);
    }
    Ok(())
}

/// A kernel's iteration space as `rows × n` and its row offsets table (`rows × nops` element
/// offsets: every input's and the output's start of each row), after checking every operand's
/// shape and layout against what the kernel was generated for.
pub(crate) fn row_offsets(
    kind: KernelKind,
    inputs: &[(Buf, &[usize])],
    contiguous: &[bool],
    out: (Buf, &[usize]),
    space: &[usize],
    decl: &KernelDecl,
) -> Result<(usize, usize, usize, Vec<i64>), String> {
    let r = space.len();
    let (rows, n) = if r == 0 {
        (1, 1)
    } else {
        (elems(&space[..r - 1]), space[r - 1])
    };
    let nops = inputs.len() + 1;
    let mut strides = Vec::with_capacity(nops);
    for (i, (b, s)) in inputs.iter().enumerate() {
        check_len("kernel input", *b, s, decl.inputs[i].size_bytes())?;
        let st = bstrides(s, space)?;
        let last = st.last().copied().unwrap_or(0);
        // The code reads input i with unit stride along the last axis iff it was generated so.
        if n > 1 && (last == 1) != contiguous[i] {
            return Err(format!(
                "input {i} of shape {s:?} does not match the kernel's layout for space {space:?}"
            ));
        }
        strides.push(st);
    }
    check_len("kernel output", out.0, out.1, decl.output.size_bytes())?;
    match kind {
        KernelKind::Map | KernelKind::SoftmaxLast => {
            if out.1 != space {
                return Err(format!(
                    "output shape {:?} differs from the iteration space {space:?}",
                    out.1
                ));
            }
            strides.push(bstrides(out.1, space)?);
        }
        KernelKind::ReduceLast => {
            if elems(out.1) != rows {
                return Err(format!(
                    "reduction output {:?} does not have one element per row of {space:?}",
                    out.1
                ));
            }
            let mut s = vec![0usize; r];
            let mut acc = 1;
            for i in (0..r.saturating_sub(1)).rev() {
                s[i] = acc;
                acc *= space[i];
            }
            strides.push(s);
        }
    }
    if rows == 0 || n == 0 {
        return Ok((rows, n, nops, Vec::new()));
    }
    // Row offsets table: rows × nops element offsets.
    let mut offs = vec![0i64; rows * nops];
    let mut idx = vec![0usize; r.saturating_sub(1)];
    let mut cur = vec![0usize; nops];
    for row in 0..rows {
        for j in 0..nops {
            offs[row * nops + j] = cur[j] as i64;
        }
        for ax in (0..idx.len()).rev() {
            idx[ax] += 1;
            for j in 0..nops {
                cur[j] += strides[j][ax];
            }
            if idx[ax] < space[ax] {
                break;
            }
            for j in 0..nops {
                cur[j] -= strides[j][ax] * space[ax];
            }
            idx[ax] = 0;
        }
    }
    Ok((rows, n, nops, offs))
}

/// How a matrix product is transposed, scaled and accumulated.
pub struct Epilogue<'a> {
    /// Transpose the left operand.
    pub ta: bool,
    /// Transpose the right operand.
    pub tb: bool,
    /// Multiplies the product.
    pub scale: f32,
    /// Added to every row.
    pub bias: Option<(Buf, &'a [usize])>,
    /// Added elementwise.
    pub acc: Option<(Buf, &'a [usize])>,
}

/// Batched f32 matrix product with numpy broadcasting over leading axes, with its epilogue.
pub fn matmul(
    a: (Buf, &[usize]),
    b: (Buf, &[usize]),
    out: (Buf, &[usize]),
    e: Epilogue,
    threads: usize,
    level: Level,
) -> Result<(), String> {
    let (ta, tb) = (e.ta, e.tb);
    let (sa, sb, so) = (a.1, b.1, out.1);
    if sa.len() < 2 || sb.len() < 2 || so.len() < 2 {
        return Err("matmul operands need rank >= 2".into());
    }
    check_len("matmul lhs", a.0, sa, 4)?;
    check_len("matmul rhs", b.0, sb, 4)?;
    check_len("matmul output", out.0, so, 4)?;
    let (ra, rb, ro) = (sa.len(), sb.len(), so.len());
    let (m, ka) = if ta {
        (sa[ra - 1], sa[ra - 2])
    } else {
        (sa[ra - 2], sa[ra - 1])
    };
    let (kb, n) = if tb {
        (sb[rb - 1], sb[rb - 2])
    } else {
        (sb[rb - 2], sb[rb - 1])
    };
    if ka != kb || so[ro - 2] != m || so[ro - 1] != n {
        return Err(format!("matmul shapes {sa:?} x {sb:?} -> {so:?} do not fit"));
    }
    let k = ka;
    let batch = &so[..ro - 2];
    let bsa = bstrides(&sa[..ra - 2], batch)?;
    let bsb = bstrides(&sb[..rb - 2], batch)?;
    let nb = elems(batch);
    let (mat_a, mat_b) = (sa[ra - 2] * sa[ra - 1], sb[rb - 2] * sb[rb - 1]);
    // The epilogue's addends are written into the output first; the GEMM then accumulates.
    let read_dst = prefill_epilogue(out, n, e.bias, e.acc)?;
    let scale = e.scale;
    let (a_rs, a_cs) = if ta { (1isize, m as isize) } else { (k as isize, 1isize) };
    let (b_rs, b_cs) = if tb { (1isize, k as isize) } else { (n as isize, 1isize) };
    let (ap, bp, op) = (a.0.ptr as usize, b.0.ptr as usize, out.0.ptr as usize);
    let par = |big: bool| {
        if big && threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        }
    };
    // SAFETY (all calls below): shapes were checked against buffer lengths, and the strides
    // describe row-major matrices inside those buffers.
    let one = |a_off: usize, b_off: usize, o_off: usize, rows: usize, p: gemm::Parallelism| unsafe {
        gemm::gemm::<f32>(
            rows,
            n,
            k,
            (op as *mut f32).add(o_off),
            1,
            n as isize,
            read_dst,
            (ap as *const f32).add(a_off),
            a_cs,
            a_rs,
            (bp as *const f32).add(b_off),
            b_cs,
            b_rs,
            1.0,
            scale,
            false,
            false,
            false,
            p,
        )
    };
    if nb == 0 || m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !read_dst {
            // SAFETY: the output buffer holds exactly this many f32s.
            unsafe { std::ptr::write_bytes(out.0.ptr, 0, out.0.len) };
        }
        return Ok(());
    }
    // A shared right operand and a row-major left one: one tall GEMM over every batch row.
    if !ta && bsb.iter().all(|s| *s == 0) && sa[..ra - 2].len() == batch.len() && sa[..ra - 2] == *batch {
        if nb * m <= GEMV_ROWS {
            // SAFETY: as for the GEMM: a is [rows, k], b is [k, n] or [n, k], out is [rows, n].
            unsafe {
                gemv(
                    nb * m,
                    n,
                    k,
                    ap as *const f32,
                    bp as *const f32,
                    tb,
                    op as *mut f32,
                    read_dst,
                    scale,
                    threads,
                    level.avx2(),
                )
            };
        } else {
            one(0, 0, 0, nb * m, par(true));
        }
        return Ok(());
    }
    let offsets = |bi: usize| {
        let (mut rem, mut oa, mut ob) = (bi, 0usize, 0usize);
        for ax in (0..batch.len()).rev() {
            let i = rem % batch[ax];
            rem /= batch[ax];
            oa += i * bsa[ax];
            ob += i * bsb[ax];
        }
        (oa * mat_a, ob * mat_b)
    };
    if nb >= threads && threads > 1 {
        crate::pool::for_each(nb, |bi| {
            let (oa, ob) = offsets(bi);
            one(oa, ob, bi * m * n, m, gemm::Parallelism::None);
        });
    } else {
        for bi in 0..nb {
            let (oa, ob) = offsets(bi);
            one(oa, ob, bi * m * n, m, par(m * n * k > 1 << 18));
        }
    }
    Ok(())
}

/// An optional operand: its buffer and shape.
type Operand<'a> = Option<(Buf, &'a [usize])>;

/// A product by a weight packed for a microkernel (`Step::PackedMatMul`), after checking every
/// shape against its buffer.
pub fn packed_matmul(
    a: (Buf, &[usize]),
    (w, ws, kernel): (Buf, &[usize], &str),
    out: (Buf, &[usize]),
    scale: f32,
    (bias, acc): (Operand, Operand),
    post: Option<crate::gemm::Post>,
    threads: usize,
) -> Result<(), String> {
    let kern = crate::gemm::MicroKernel::by_name(kernel).ok_or_else(|| format!("no microkernel `{kernel}`"))?;
    let (sa, so) = (a.1, out.1);
    let (Some((&k, lead_a)), Some((&n, lead_o)), &[panels, kw, nr]) = (sa.split_last(), so.split_last(), ws) else {
        return Err(format!("packed matmul shapes {sa:?} x {ws:?} -> {so:?} do not fit"));
    };
    if lead_a != lead_o || k != kw || nr != kern.nr || n.div_ceil(nr) != panels {
        return Err(format!("packed matmul shapes {sa:?} x {ws:?} -> {so:?} do not fit"));
    }
    check_len("matmul lhs", a.0, sa, 4)?;
    check_len("packed weight", w, ws, 4)?;
    check_len("matmul output", out.0, so, 4)?;
    check_epilogue(so, n, bias, acc)?;
    let ptr = |x: Option<(Buf, &[usize])>| x.map_or(std::ptr::null(), |(b, _)| b.ptr as *const f32);
    let o = crate::gemm::Operands {
        a: a.0.ptr as *const f32,
        lda: k,
        ldc: n,
        b: w.ptr as *const f32,
        out: out.0.ptr as *mut f32,
        bias: ptr(bias),
        res: ptr(acc),
        scale,
        post,
    };
    // SAFETY: every length was checked above; loading checked that this CPU runs the kernel's
    // level (the artifact's, which validation checked the kernel does not exceed).
    unsafe { crate::gemm::matmul(kern, o, elems(lead_o), k, n, threads) };
    Ok(())
}

/// Products with at most this many rows (decode steps) take the matrix-vector path.
const GEMV_ROWS: usize = 4;

/// `out[r, :] (+)= scale * a[r, :] @ B` for a few rows: one streaming pass over `B` (`[k, n]`, or
/// `[n, k]` if `tb`) shared by every row, split across threads by output columns. Decode steps are
/// bound by reading the weights, so this path is about memory bandwidth, not arithmetic.
///
/// # Safety
/// `a` holds `rows * k` floats, `b` holds `k * n`, `out` holds `rows * n`, none overlapping `out`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemv(
    rows: usize,
    n: usize,
    k: usize,
    a: *const f32,
    b: *const f32,
    tb: bool,
    out: *mut f32,
    accumulate: bool,
    scale: f32,
    threads: usize,
    avx2: bool,
) {
    let (ap, bp, op) = (a as usize, b as usize, out as usize);
    let store = |r: usize, j0: usize, acc: &[f32]| {
        // SAFETY: the caller's bounds; callers write disjoint column ranges of `out`.
        let o = unsafe { std::slice::from_raw_parts_mut((op as *mut f32).add(r * n + j0), acc.len()) };
        if accumulate {
            o.iter_mut().zip(acc).for_each(|(o, x)| *o += scale * x);
        } else {
            o.iter_mut().zip(acc).for_each(|(o, x)| *o = scale * x);
        }
    };
    // SAFETY: the caller's bounds.
    let a = unsafe { std::slice::from_raw_parts(ap as *const f32, rows * k) };
    if tb {
        // B is [n, k]: blocks of output columns are contiguous blocks of B's rows.
        let blocks = (threads * 4).clamp(1, n.div_ceil(64).max(1));
        let width = n.div_ceil(blocks);
        let work = |bi: usize| {
            let (j0, j1) = (bi * width, ((bi + 1) * width).min(n));
            if j0 >= j1 {
                return;
            }
            // SAFETY: rows j0..j1 of B.
            let b = unsafe { std::slice::from_raw_parts((bp as *const f32).add(j0 * k), (j1 - j0) * k) };
            let mut acc = vec![0f32; rows * (j1 - j0)];
            dot_rows(a, rows, k, b, j1 - j0, &mut acc, avx2);
            for r in 0..rows {
                store(r, j0, &acc[r * (j1 - j0)..(r + 1) * (j1 - j0)]);
            }
        };
        for_blocks(blocks, threads, work);
    } else {
        // B is [k, n]: each thread streams a contiguous band of B's rows into partial sums,
        // which are then added up (a few KiB per row).
        let bands = threads.clamp(1, k.max(1));
        let height = k.div_ceil(bands);
        let band = |t: usize| -> Vec<f32> {
            let (k0, k1) = (t * height, ((t + 1) * height).min(k));
            let mut acc = vec![0f32; rows * n];
            if k0 < k1 {
                // SAFETY: rows k0..k1 of B.
                let b = unsafe { std::slice::from_raw_parts((bp as *const f32).add(k0 * n), (k1 - k0) * n) };
                axpy_rows(a, rows, k, k0, k1, b, n, &mut acc, avx2);
            }
            acc
        };
        let parts: Vec<Vec<f32>> = if bands > 1 {
            let slots: Vec<std::sync::OnceLock<Vec<f32>>> = (0..bands).map(|_| Default::default()).collect();
            crate::pool::for_each(bands, |t| {
                let _ = slots[t].set(band(t));
            });
            slots.into_iter().map(|s| s.into_inner().unwrap_or_default()).collect()
        } else {
            vec![band(0)]
        };
        let mut sum = parts[0].clone();
        for p in &parts[1..] {
            sum.iter_mut().zip(p).for_each(|(s, x)| *s += x);
        }
        for r in 0..rows {
            store(r, 0, &sum[r * n..(r + 1) * n]);
        }
    }
}

/// `acc[r, j] = a[r, :] · b[j, :]` for `cols` rows `j` of `b` (`[cols, k]`).
fn dot_rows(a: &[f32], rows: usize, k: usize, b: &[f32], cols: usize, acc: &mut [f32], avx2: bool) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: the artifact's level has AVX2 and FMA, which loading checked this CPU has.
        unsafe { dot_rows_avx2(a, rows, k, b, cols, acc) };
        return;
    }
    for j in 0..cols {
        let bj = &b[j * k..(j + 1) * k];
        for r in 0..rows {
            acc[r * cols + j] = a[r * k..(r + 1) * k].iter().zip(bj).map(|(x, y)| x * y).sum();
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_rows_avx2(a: &[f32], rows: usize, k: usize, b: &[f32], cols: usize, acc: &mut [f32]) {
    use std::arch::x86_64::*;
    let k8 = k / 8 * 8;
    for j in 0..cols {
        let bj = b.as_ptr().add(j * k);
        for r in 0..rows {
            let ar = a.as_ptr().add(r * k);
            let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut c = 0;
            while c + 16 <= k8 {
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(ar.add(c)), _mm256_loadu_ps(bj.add(c)), s0);
                s1 = _mm256_fmadd_ps(_mm256_loadu_ps(ar.add(c + 8)), _mm256_loadu_ps(bj.add(c + 8)), s1);
                c += 16;
            }
            if c < k8 {
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(ar.add(c)), _mm256_loadu_ps(bj.add(c)), s0);
            }
            let s = _mm256_add_ps(s0, s1);
            let lo = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
            let lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
            let lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
            let mut t = _mm_cvtss_f32(lo);
            for c in k8..k {
                t += *ar.add(c) * *bj.add(c);
            }
            acc[r * cols + j] = t;
        }
    }
}

/// `acc[r, :] += a[r, k0..k1] @ b` for `b` the rows `k0..k1` of a `[k, n]` matrix.
#[allow(clippy::too_many_arguments)]
fn axpy_rows(a: &[f32], rows: usize, k: usize, k0: usize, k1: usize, b: &[f32], n: usize, acc: &mut [f32], avx2: bool) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: the artifact's level has AVX2 and FMA, which loading checked this CPU has.
        unsafe { axpy_rows_avx2(a, rows, k, k0, k1, b, n, acc) };
        return;
    }
    for kk in k0..k1 {
        let bk = &b[(kk - k0) * n..(kk - k0 + 1) * n];
        for r in 0..rows {
            let x = a[r * k + kk];
            acc[r * n..(r + 1) * n]
                .iter_mut()
                .zip(bk)
                .for_each(|(o, y)| *o += x * y);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn axpy_rows_avx2(a: &[f32], rows: usize, k: usize, k0: usize, k1: usize, b: &[f32], n: usize, acc: &mut [f32]) {
    for kk in k0..k1 {
        let bk = &b[(kk - k0) * n..(kk - k0 + 1) * n];
        for r in 0..rows {
            let x = a[r * k + kk];
            // Elementwise, so LLVM vectorises it with the enabled AVX2/FMA.
            acc[r * n..(r + 1) * n]
                .iter_mut()
                .zip(bk)
                .for_each(|(o, y)| *o = x.mul_add(*y, *o));
        }
    }
}

/// `table` rows picked by `idx` along `axis`.
pub fn gather(
    table: (Buf, &[usize], DType),
    idx: (Buf, &[usize], DType),
    out: (Buf, &[usize]),
    axis: usize,
) -> Result<(), String> {
    let (ts, is, os) = (table.1, idx.1, out.1);
    let es = table.2.size_bytes();
    if axis >= ts.len() {
        return Err("gather axis out of range".into());
    }
    let mut want = ts[..axis].to_vec();
    want.extend_from_slice(is);
    want.extend_from_slice(&ts[axis + 1..]);
    if want != os {
        return Err(format!("gather of {ts:?} by {is:?} cannot give {os:?}"));
    }
    check_len("gather table", table.0, ts, es)?;
    check_len("gather indices", idx.0, is, idx.2.size_bytes())?;
    check_len("gather output", out.0, os, es)?;
    let outer = elems(&ts[..axis]);
    let rows = ts[axis];
    let inner = elems(&ts[axis + 1..]) * es;
    let ni = elems(is);
    let read = |k: usize| -> i64 {
        // SAFETY: k < ni and the index buffer holds ni elements of its dtype.
        unsafe {
            match idx.2 {
                DType::I64 => *(idx.0.ptr as *const i64).add(k),
                _ => *(idx.0.ptr as *const i32).add(k) as i64,
            }
        }
    };
    for o in 0..outer {
        for k in 0..ni {
            let i = read(k);
            if i < 0 || i as usize >= rows {
                return Err(format!("index {i} at position {k} is out of range for {rows} rows"));
            }
            // SAFETY: the source row and destination slot lie inside the checked buffers.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    table.0.ptr.add((o * rows + i as usize) * inner),
                    out.0.ptr.add((o * ni + k) * inner),
                    inner,
                );
            }
        }
    }
    Ok(())
}

/// Copies elements of `x` to `out` where `out`'s element `i` comes from `x` at the offset given
/// by `src_strides` (in elements) over `out`'s shape, moving the unit-stride tail in blocks.
fn strided_copy(x: Buf, out: Buf, oshape: &[usize], src_strides: &[usize], es: usize) {
    let r = oshape.len();
    // Longest tail of axes that are contiguous in the source too: copied as one block.
    let mut block = 1usize;
    let mut tail = r;
    while tail > 0 && src_strides[tail - 1] == block {
        block *= oshape[tail - 1];
        tail -= 1;
    }
    let outer = elems(&oshape[..tail]);
    let bytes = block * es;
    let mut idx = vec![0usize; tail];
    let mut src = 0usize;
    for o in 0..outer {
        // SAFETY: callers checked both buffers against their shapes; `src` stays in range.
        unsafe { std::ptr::copy_nonoverlapping(x.ptr.add(src * es), out.ptr.add(o * bytes), bytes) };
        for ax in (0..tail).rev() {
            idx[ax] += 1;
            src += src_strides[ax];
            if idx[ax] < oshape[ax] {
                break;
            }
            src -= src_strides[ax] * oshape[ax];
            idx[ax] = 0;
        }
    }
}

fn own_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Axis permutation.
pub fn transpose(x: (Buf, &[usize]), out: (Buf, &[usize]), perm: &[u32], es: usize) -> Result<(), String> {
    let mut seen = vec![false; x.1.len()];
    if perm.len() != x.1.len()
        || perm
            .iter()
            .any(|p| (*p as usize) >= seen.len() || std::mem::replace(&mut seen[*p as usize], true))
    {
        return Err("invalid permutation".into());
    }
    let want: Vec<usize> = perm.iter().map(|p| x.1[*p as usize]).collect();
    if want != out.1 {
        return Err(format!("transpose of {:?} cannot give {:?}", x.1, out.1));
    }
    check_len("transpose input", x.0, x.1, es)?;
    check_len("transpose output", out.0, out.1, es)?;
    let s = own_strides(x.1);
    let src: Vec<usize> = perm.iter().map(|p| s[*p as usize]).collect();
    strided_copy(x.0, out.0, out.1, &src, es);
    Ok(())
}

/// Elements `start..` of one axis.
pub fn slice(x: (Buf, &[usize]), out: (Buf, &[usize]), axis: usize, start: usize, es: usize) -> Result<(), String> {
    if axis >= x.1.len() || x.1.len() != out.1.len() || start.saturating_add(out.1[axis]) > x.1[axis] {
        return Err(format!("slice of {:?} at {start} cannot give {:?}", x.1, out.1));
    }
    if x.1.iter().zip(out.1).enumerate().any(|(i, (a, b))| i != axis && a != b) {
        return Err(format!("slice of {:?} cannot give {:?}", x.1, out.1));
    }
    check_len("slice input", x.0, x.1, es)?;
    check_len("slice output", out.0, out.1, es)?;
    let s = own_strides(x.1);
    let base = start * s[axis];
    let shifted = Buf {
        ptr: x.0.ptr.wrapping_add(base * es),
        len: x.0.len - base * es,
    };
    strided_copy(shifted, out.0, out.1, &s, es);
    Ok(())
}

/// Concatenation along `axis`.
pub fn concat(parts: &[(Buf, &[usize])], out: (Buf, &[usize]), axis: usize, es: usize) -> Result<(), String> {
    let os = out.1;
    if axis >= os.len() {
        return Err("concat axis out of range".into());
    }
    let mut total = 0;
    for (b, s) in parts {
        if s.len() != os.len() || s.iter().zip(os).enumerate().any(|(i, (a, o))| i != axis && a != o) {
            return Err(format!("concat part {s:?} does not fit {os:?}"));
        }
        check_len("concat input", *b, s, es)?;
        total += s[axis];
    }
    if total != os[axis] {
        return Err(format!("concat parts add up to {total}, output axis has {}", os[axis]));
    }
    check_len("concat output", out.0, os, es)?;
    let outer = elems(&os[..axis]);
    let mut dst = 0usize;
    for o in 0..outer {
        for (b, s) in parts {
            let chunk = elems(&s[axis..]) * es;
            // SAFETY: offsets stay within the checked buffers.
            unsafe { std::ptr::copy_nonoverlapping(b.ptr.add(o * chunk), out.0.ptr.add(dst), chunk) };
            dst += chunk;
        }
    }
    Ok(())
}

/// numpy broadcast, materialised.
pub fn broadcast(x: (Buf, &[usize]), out: (Buf, &[usize]), es: usize) -> Result<(), String> {
    check_len("broadcast input", x.0, x.1, es)?;
    check_len("broadcast output", out.0, out.1, es)?;
    let s = bstrides(x.1, out.1)?;
    strided_copy(x.0, out.0, out.1, &s, es);
    Ok(())
}

/// Runs one op with the reference evaluator (for small index and table computations).
pub fn fallback(
    op: &Op,
    args: &[(Buf, &[usize], DType)],
    out: (Buf, &[usize], DType),
    dim_names: &[String],
    syms: &[usize],
) -> Result<(), String> {
    if let Some(r) = crate::reduce::try_reduce(op, args, out) {
        return r;
    }
    if let Some(r) = crate::moe::try_moe(op, args, out, 1, crate::cpu::Level::Portable) {
        return r.map(|_| ());
    }
    let mut vals = Vec::with_capacity(args.len());
    let mut tys = Vec::with_capacity(args.len());
    for (b, s, dt) in args {
        check_len("input", *b, s, dt.size_bytes())?;
        // SAFETY: the buffer holds exactly `s` elements of `dt`, as just checked.
        let bytes = unsafe { std::slice::from_raw_parts(b.ptr as *const u8, b.len) };
        let t = Tensor::from_le_bytes(*dt, s.to_vec(), bytes).map_err(|e| e.to_string())?;
        vals.push(kiln_interp::Value::from_tensor(&t, *dt));
        tys.push(TensorType::new(*dt, s.iter().map(|d| Dim::known(*d as u64)).collect()));
    }
    let bindings = dim_names.iter().cloned().zip(syms.iter().copied()).collect();
    // Ops that mention symbolic dims (iota, reshape targets) need them bound; others are typed
    // from their concrete operands, which also checks the plan's shapes.
    let refs: Vec<&TensorType> = tys.iter().collect();
    let mut ty = op.infer(&refs).map_err(|e| e.to_string())?;
    ty.shape = ty
        .shape
        .iter()
        .map(|d| {
            d.eval(&bindings)
                .map(|v| Dim::known(v as u64))
                .map_err(|s| format!("dim `{s}` is not bound"))
        })
        .collect::<Result<_, _>>()?;
    let want = TensorType::new(out.2, out.1.iter().map(|d| Dim::known(*d as u64)).collect());
    if ty != want {
        return Err(format!("{} gives {ty}, the plan expects {want}", op.mnemonic()));
    }
    let arg_refs: Vec<&kiln_interp::Value> = vals.iter().collect();
    let v = kiln_interp::eval_op(op, &ty, &arg_refs, &bindings)?;
    let t = v.to_tensor();
    let bytes = t.as_bytes();
    if bytes.len() != out.0.len {
        return Err("fallback result has the wrong size".into());
    }
    // SAFETY: sizes are equal, and the output buffer is a distinct temporary.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), out.0.ptr, bytes.len()) };
    Ok(())
}

/// A quantized `[n, k]` weight, as `Step::QMatMul` reads it.
pub struct QWeight {
    /// Codes: i8 `[n, k]` or packed u8 `[n, k/2]`.
    pub codes: Buf,
    /// `[n, k / group]` scales and their element type (f32 or f16).
    pub scales: (Buf, DType),
    /// `[n, k / group]` minimums (4 bits).
    pub mins: Option<(Buf, DType)>,
    /// 8 or 4.
    pub bits: u8,
    /// Columns per scale.
    pub group: usize,
}

/// Scales or minimums as stored (f32, f16 or bf16), read a weight row at a time inside the kernels
/// rather than converted whole on every call.
#[derive(Clone, Copy)]
struct Floats<'a> {
    bytes: &'a [u8],
    dt: DType,
    f16c: bool,
}

impl<'a> Floats<'a> {
    fn new(b: Buf, dt: DType, n: usize, level: Level) -> Result<Floats<'a>, String> {
        if !matches!(dt, DType::F32 | DType::F16 | DType::BF16) {
            return Err(format!("quantization scales of dtype {dt}"));
        }
        if b.len != n * dt.size_bytes() {
            return Err(format!("{} bytes of {dt} where {n} values were expected", b.len));
        }
        // SAFETY: `b` holds exactly `n` values of `dt` and outlives the call.
        Ok(Floats {
            bytes: unsafe { std::slice::from_raw_parts(b.ptr as *const u8, b.len) },
            dt,
            f16c: level.avx2(),
        })
    }

    /// Values `start..start + dst.len()` into `dst`.
    fn read(&self, start: usize, dst: &mut [f32]) {
        let es = self.dt.size_bytes();
        let src = &self.bytes[start * es..(start + dst.len()) * es];
        #[cfg(target_arch = "x86_64")]
        if self.dt == DType::F16 && self.f16c {
            // SAFETY: the artifact's level has F16C, which loading checked this CPU has; `src` holds `dst.len()` f16 values.
            unsafe { f16_to_f32_f16c(src, dst) };
            return;
        }
        for (d, c) in dst.iter_mut().zip(src.chunks_exact(es)) {
            *d = match self.dt {
                DType::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                DType::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f32(),
                _ => half::bf16::from_le_bytes([c[0], c[1]]).to_f32(),
            };
        }
    }
}

/// Little-endian f16 values `src` into `dst`, 8 at a time with F16C. Inline in the caller's loop,
/// unlike `half`'s slice conversion, whose call per 8 values cost 6% of a GPT-2 int4 decode.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn f16_to_f32_f16c(src: &[u8], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let n8 = dst.len() / 8 * 8;
    for i in (0..n8).step_by(8) {
        let h = _mm_loadu_si128(src.as_ptr().add(2 * i) as *const __m128i);
        _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
    }
    for i in n8..dst.len() {
        let h = u16::from_le_bytes([src[2 * i], src[2 * i + 1]]);
        dst[i] = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)));
    }
}

/// Row `j` of the weight, dequantized into `dst` (`k` floats) with that row's scales `s` and
/// minimums `m`; branch-free inner loops, so LLVM vectorises them.
fn dequant_row(w: &QWeight, codes: &[u8], s: &[f32], m: &[f32], k: usize, j: usize, dst: &mut [f32]) {
    let g = w.group;
    let groups = k / g;
    if w.bits == 8 {
        let row = &codes[j * k..(j + 1) * k];
        for gi in 0..groups {
            let sc = s[gi];
            for (d, q) in dst[gi * g..(gi + 1) * g].iter_mut().zip(&row[gi * g..(gi + 1) * g]) {
                *d = *q as i8 as f32 * sc;
            }
        }
    } else {
        let row = &codes[j * k / 2..(j + 1) * k / 2];
        for gi in 0..groups {
            let (sc, mn) = (s[gi], m[gi]);
            for b in gi * g / 32..(gi + 1) * g / 32 {
                let bytes = &row[b * 16..b * 16 + 16];
                let (lo, hi) = dst[b * 32..b * 32 + 32].split_at_mut(16);
                for i in 0..16 {
                    lo[i] = (bytes[i] & 15) as f32 * sc + mn;
                    hi[i] = (bytes[i] >> 4) as f32 * sc + mn;
                }
            }
        }
    }
}

/// `Σ a[c] · code[c]` over one group of one weight row (the scale is applied by the caller); the
/// portable path, for CPUs without AVX2 (`qrow_avx2` otherwise).
fn qdot(bits: u8, a: &[f32], codes: &[u8]) -> f32 {
    if bits == 8 {
        a.iter().zip(codes).map(|(x, q)| x * (*q as i8 as f32)).sum()
    } else {
        a.iter()
            .enumerate()
            .map(|(c, x)| {
                let byte = codes[(c / 32) * 16 + c % 16];
                x * (if c % 32 < 16 { byte & 15 } else { byte >> 4 }) as f32
            })
            .sum()
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum256(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    let lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    _mm_cvtss_f32(lo)
}

/// One output of a quantized product: `Σ_g scale_g · (a_g · codes_g) (+ min_g · Σ a_g)` over the
/// groups of a weight row, accumulated in vectors (one horizontal sum per row).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn qrow_avx2(bits: u8, g: usize, a: &[f32], codes: &[u8], s: &[f32], m: &[f32], asum: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    // Four independent accumulator chains: FMA latency, not the loads, bounds one chain.
    let mut total = _mm256_setzero_ps();
    let mut tail = 0f32;
    let ap = a.as_ptr();
    if bits == 8 {
        for (gi, sc) in s.iter().enumerate() {
            let (mut s0, mut s1, mut s2, mut s3) = (
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
            );
            let base = gi * g;
            let cp = codes.as_ptr().add(base);
            let p = ap.add(base);
            let mut c = 0;
            while c + 32 <= g {
                let q = _mm_loadu_si128(cp.add(c) as *const __m128i);
                let r = _mm_loadu_si128(cp.add(c + 16) as *const __m128i);
                s0 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(p.add(c)),
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)),
                    s0,
                );
                s1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(p.add(c + 8)),
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8))),
                    s1,
                );
                s2 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(p.add(c + 16)),
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(r)),
                    s2,
                );
                s3 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(p.add(c + 24)),
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(r, 8))),
                    s3,
                );
                c += 32;
            }
            while c + 8 <= g {
                let q = _mm_loadl_epi64(cp.add(c) as *const __m128i);
                s0 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(p.add(c)),
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)),
                    s0,
                );
                c += 8;
            }
            let mut rest = 0f32;
            while c < g {
                rest += a[base + c] * (codes[base + c] as i8 as f32);
                c += 1;
            }
            let sum = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
            total = _mm256_fmadd_ps(sum, _mm256_set1_ps(*sc), total);
            tail += rest * sc;
        }
    } else {
        let mask = _mm_set1_epi8(15);
        for (gi, sc) in s.iter().enumerate() {
            let (mut s0, mut s1, mut s2, mut s3) = (
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
            );
            for b in 0..g / 32 {
                let col = gi * g + b * 32;
                let bytes = _mm_loadu_si128(codes.as_ptr().add(col / 2) as *const __m128i);
                let lo = _mm_and_si128(bytes, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
                let p = ap.add(col);
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(p), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), s0);
                s1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(p.add(8)),
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
                    s1,
                );
                s2 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(p.add(16)),
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)),
                    s2,
                );
                s3 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(p.add(24)),
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))),
                    s3,
                );
            }
            let sum = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
            total = _mm256_fmadd_ps(sum, _mm256_set1_ps(*sc), total);
            tail += m[gi] * asum[gi];
        }
    }
    hsum256(total) + tail
}

/// `out = acc + bias + scale · (a @ wᵀ)` with a quantized `w`: rows of `a` at most [`GEMV_ROWS`]
/// take one streaming pass over the codes, with `int8_activations` (and AVX2) as integer dot
/// products on the activations quantized to int8 (`q8`), otherwise in f32 (dot products per group,
/// scaled once per group); more rows dequantize 64 output channels at a time into a per-thread
/// tile and call the GEMM on it, exactly.
#[allow(clippy::too_many_arguments)]
pub fn qmatmul(
    a: (Buf, &[usize]),
    w: QWeight,
    out: (Buf, &[usize]),
    scale: f32,
    bias: Option<(Buf, &[usize])>,
    acc: Option<(Buf, &[usize])>,
    (int8_activations, packed, decode_vnni): (bool, &std::sync::OnceLock<crate::igemm::Packed>, crate::cpu::Vnni),
    threads: usize,
    cpu: CpuArg,
) -> Result<(), String> {
    let level = cpu.level;
    let (sa, so) = (a.1, out.1);
    let (Some(&k), Some(&n)) = (sa.last(), so.last()) else {
        return Err("quantized matmul operands need rank >= 1".into());
    };
    if sa.len() != so.len() || sa[..sa.len() - 1] != so[..so.len() - 1] {
        return Err(format!("quantized matmul {sa:?} -> {so:?}: rows differ"));
    }
    let g = w.group;
    let ok = g > 0
        && k % g == 0
        && match w.bits {
            8 => w.codes.len == n * k,
            4 => g.is_multiple_of(32) && w.codes.len == n * k / 2,
            _ => false,
        };
    if !ok {
        return Err(format!(
            "quantized weight ({} bits, groups of {g}, {} code bytes) does not fit [{n}, {k}]",
            w.bits, w.codes.len
        ));
    }
    check_len("quantized matmul lhs", a.0, sa, 4)?;
    check_len("quantized matmul output", out.0, so, 4)?;
    let groups = k / g;
    let sf = Floats::new(w.scales.0, w.scales.1, n * groups, level)?;
    let mf = match w.mins {
        Some((b, dt)) => Some(Floats::new(b, dt, n * groups, level)?),
        None if w.bits == 4 => return Err("4-bit weights need minimums".into()),
        None => None,
    };
    // Row j's scales and minimums, into per-task buffers.
    let row_params = |j: usize, s: &mut Vec<f32>, m: &mut Vec<f32>| {
        s.resize(groups, 0.0);
        sf.read(j * groups, s);
        if let Some(mf) = &mf {
            m.resize(groups, 0.0);
            mf.read(j * groups, m);
        }
    };
    let rows = elems(sa) / k.max(1);
    let read_dst = prefill_epilogue(out, n, bias, acc)?;
    if rows == 0 || n == 0 {
        return Ok(());
    }
    // SAFETY: lengths checked above.
    let av = unsafe { std::slice::from_raw_parts(a.0.ptr as *const f32, rows * k) };
    let codes = unsafe { std::slice::from_raw_parts(w.codes.ptr as *const u8, w.codes.len) };
    let op = out.0.ptr as usize;
    let store = |r: usize, j: usize, v: f32| {
        // SAFETY: r < rows, j < n; each (r, j) is written by one task.
        let o = unsafe { &mut *(op as *mut f32).add(r * n + j) };
        *o = if read_dst { *o + scale * v } else { scale * v };
    };
    let cb = if w.bits == 8 { k } else { k / 2 };
    if rows <= GEMV_ROWS && int8_activations && crate::q8::usable(w.bits, g, level) {
        if let Some(q) = crate::q8::Q8::new(av, rows, k, g, w.bits, level) {
            // Integer dot products on the activations quantized to int8 (see `q8`); a task converts
            // the scales and minimums of up to `CHUNK` weight rows at a time.
            const CHUNK: usize = 64;
            let blocks = (threads * 4).clamp(1, n.div_ceil(16).max(1));
            let width = n.div_ceil(blocks);
            let work = |bi: usize| {
                let (mut s, mut m) = (Vec::new(), Vec::new());
                let (j0, j1) = (bi * width, ((bi + 1) * width).min(n));
                for c0 in (j0..j1).step_by(CHUNK) {
                    let c1 = (c0 + CHUNK).min(j1);
                    s.resize((c1 - c0) * groups, 0.0);
                    sf.read(c0 * groups, &mut s);
                    if let Some(mf) = &mf {
                        m.resize((c1 - c0) * groups, 0.0);
                        mf.read(c0 * groups, &mut m);
                    }
                    // SAFETY: `usable` said yes; the codes are whole weight rows c0..c1.
                    unsafe {
                        crate::q8::rows(&q, decode_vnni, &codes[c0 * cb..c1 * cb], &s, &m, |r, jj, v| {
                            store(r, c0 + jj, v)
                        })
                    };
                }
            };
            for_blocks(blocks, threads, work);
            return Ok(());
        }
    }
    if rows <= GEMV_ROWS {
        // Per-group sums of each row of `a`, for the minimums.
        let asum: Vec<f32> = if w.bits == 4 {
            (0..rows * groups)
                .map(|i| av[(i / groups) * k + (i % groups) * g..][..g].iter().sum())
                .collect()
        } else {
            Vec::new()
        };
        let blocks = (threads * 4).clamp(1, n.div_ceil(16).max(1));
        let width = n.div_ceil(blocks);
        #[cfg(target_arch = "x86_64")]
        let fast = level.avx2();
        let work = |bi: usize| {
            let (mut s, mut m) = (Vec::new(), Vec::new());
            for j in bi * width..((bi + 1) * width).min(n) {
                let crow = &codes[j * cb..(j + 1) * cb];
                row_params(j, &mut s, &mut m);
                for r in 0..rows {
                    let ar = &av[r * k..(r + 1) * k];
                    #[cfg(target_arch = "x86_64")]
                    if fast {
                        let (sr, mr) = (&s[..], &m[..]);
                        let asr = if w.bits == 4 {
                            &asum[r * groups..(r + 1) * groups]
                        } else {
                            &[][..]
                        };
                        // SAFETY: the CPU has AVX2 and FMA; slices hold a row of k columns.
                        let t = unsafe { qrow_avx2(w.bits, g, ar, crow, sr, mr, asr) };
                        store(r, j, t);
                        continue;
                    }
                    let mut t = 0f32;
                    for gi in 0..groups {
                        let gc = if w.bits == 8 {
                            &crow[gi * g..(gi + 1) * g]
                        } else {
                            &crow[gi * g / 2..(gi + 1) * g / 2]
                        };
                        let d = qdot(w.bits, &ar[gi * g..(gi + 1) * g], gc);
                        t += s[gi] * d;
                        if w.bits == 4 {
                            t += m[gi] * asum[r * groups + gi];
                        }
                    }
                    store(r, j, t);
                }
            }
        };
        for_blocks(blocks, threads, work);
        return Ok(());
    }
    if int8_activations && crate::igemm::usable(w.bits, g, cpu.vnni) {
        if let Some(q) = crate::igemm::QRows::new(av, rows, k, g, w.bits) {
            let kern = crate::igemm::IKernel::for_vnni(cpu.vnni).expect("a kernel per extension");
            let p = packed.get_or_init(|| pack_for_vnni(&w, codes, (&sf, mf.as_ref()), (n, k), kern.nr));
            // SAFETY: the extension is the artifact's (checked at load); `out` is [rows, n].
            unsafe { crate::igemm::matmul(kern, &q, p, op as *mut f32, scale, read_dst, threads) };
            return Ok(());
        }
    }
    // SAFETY: a is [rows, k] and out [rows, n], as checked above.
    unsafe {
        tiled_gemm(
            rows,
            n,
            k,
            a.0.ptr as *const f32,
            op as *mut f32,
            read_dst,
            scale,
            threads,
            |j0, j1, t| {
                let (mut s, mut m) = (Vec::new(), Vec::new());
                for j in j0..j1 {
                    row_params(j, &mut s, &mut m);
                    dequant_row(&w, codes, &s, &m, k, j, &mut t[(j - j0) * k..(j - j0 + 1) * k]);
                }
            },
        )
    };
    Ok(())
}

/// A quantized weight `[n, k]` packed for the integer kernel with `nr` channels per panel.
fn pack_for_vnni(
    w: &QWeight,
    codes: &[u8],
    (sf, mf): (&Floats, Option<&Floats>),
    (n, k): (usize, usize),
    nr: usize,
) -> crate::igemm::Packed {
    let groups = k / w.group;
    let mut s = vec![0f32; n * groups];
    sf.read(0, &mut s);
    let mut m = Vec::new();
    if let Some(mf) = mf {
        m.resize(n * groups, 0.0);
        mf.read(0, &mut m);
    }
    let code = |j: usize, c: usize| {
        if w.bits == 8 {
            codes[j * k + c] ^ 0x80
        } else {
            // Column i of a 32-column block: byte i % 16, the low nibble for i < 16.
            let byte = codes[j * k / 2 + c / 32 * 16 + c % 16];
            if c % 32 < 16 {
                byte & 15
            } else {
                byte >> 4
            }
        }
    };
    crate::igemm::Packed::new((w.bits, n, k, w.group), nr, code, &s, &m)
}

/// Writes a product's addends (`acc`, then `bias` per row) into `out` before the product
/// accumulates into it; returns whether there were any.
fn prefill_epilogue(out: (Buf, &[usize]), n: usize, bias: Operand, acc: Operand) -> Result<bool, String> {
    check_epilogue(out.1, n, bias, acc)?;
    if let Some((accb, _)) = acc {
        // SAFETY: same length (checked), distinct buffers.
        unsafe { std::ptr::copy_nonoverlapping(accb.ptr, out.0.ptr, out.0.len) };
    }
    if let Some((bb, _)) = bias {
        // SAFETY: checked lengths.
        let (bv, ov) = unsafe {
            (
                std::slice::from_raw_parts(bb.ptr as *const f32, n),
                std::slice::from_raw_parts_mut(out.0.ptr as *mut f32, out.0.len / 4),
            )
        };
        for row in ov.chunks_exact_mut(n.max(1)) {
            if acc.is_some() {
                row.iter_mut().zip(bv).for_each(|(o, b)| *o += b);
            } else {
                row.copy_from_slice(bv);
            }
        }
    }
    Ok(acc.is_some() || bias.is_some())
}

/// Checks a product's epilogue operands against its result `so` (`n` columns): the bias is `[n]`,
/// the accumulator has the result's shape, and both buffers hold their shapes.
fn check_epilogue(so: &[usize], n: usize, bias: Operand, acc: Operand) -> Result<(), String> {
    if let Some((b, s)) = bias {
        if s != [n] {
            return Err(format!("matmul bias {s:?} is not [{n}]"));
        }
        check_len("matmul bias", b, s, 4)?;
    }
    if let Some((r, s)) = acc {
        if s != so {
            return Err(format!("matmul accumulator {s:?} differs from the result {so:?}"));
        }
        check_len("matmul accumulator", r, s, 4)?;
    }
    Ok(())
}

/// `(k, n)` of a sparse product `a [.., m, k] -> out [.., m, n]`, after checking that the rows
/// agree and both buffers hold their shapes.
fn sparse_shapes(a: (Buf, &[usize]), out: (Buf, &[usize])) -> Result<(usize, usize), String> {
    let (sa, so) = (a.1, out.1);
    let (Some(&k), Some(&n)) = (sa.last(), so.last()) else {
        return Err("sparse matmul operands need rank >= 1".into());
    };
    if sa.len() != so.len() || sa[..sa.len() - 1] != so[..so.len() - 1] {
        return Err(format!("sparse matmul {sa:?} -> {so:?}: rows differ"));
    }
    check_len("sparse matmul lhs", a.0, sa, 4)?;
    check_len("sparse matmul output", out.0, so, 4)?;
    Ok((k, n))
}

/// A block-CSR weight `[n, k]` (see `Op::Densify`), as `Step::SpMatMul` reads it.
pub struct CsrWeight {
    /// i32 `[n / br + 1]`.
    pub row_ptr: Buf,
    /// i32 `[nb]` block columns.
    pub cols: Buf,
    /// f32 `[nb · br · bc]`, each block column by column.
    pub vals: Buf,
    /// `[br, bc]`; `[1, 1]` is plain CSR.
    pub block: [usize; 2],
}

/// `out = acc + bias + scale · (a @ wᵀ)` with a CSR `w` of `n` rows: up to `sparse_rows` rows of
/// `a` gather their columns per nonzero; more rows densify 64 output channels at a time for the GEMM.
#[allow(clippy::too_many_arguments)]
pub fn spmatmul(
    a: (Buf, &[usize]),
    w: CsrWeight,
    out: (Buf, &[usize]),
    sparse_rows: usize,
    scale: f32,
    bias: Option<(Buf, &[usize])>,
    acc: Option<(Buf, &[usize])>,
    threads: usize,
    level: Level,
) -> Result<(), String> {
    let (k, n) = sparse_shapes(a, out)?;
    if w.block != [1, 1] {
        return block_spmatmul(a, w, out, sparse_rows, scale, bias, acc, threads, level);
    }
    if w.row_ptr.len != (n + 1) * 4 || w.cols.len != w.vals.len {
        return Err(format!("CSR weight does not fit [{n}, {k}]"));
    }
    // SAFETY: lengths checked.
    let rp = unsafe { std::slice::from_raw_parts(w.row_ptr.ptr as *const i32, n + 1) };
    let cols = unsafe { std::slice::from_raw_parts(w.cols.ptr as *const i32, w.cols.len / 4) };
    let vals = unsafe { std::slice::from_raw_parts(w.vals.ptr as *const f32, w.vals.len / 4) };
    let nnz = vals.len();
    if rp[0] != 0 || rp.windows(2).any(|p| p[1] < p[0]) || rp[n] as usize != nnz {
        return Err("CSR row offsets are not increasing from 0 to the number of values".into());
    }
    let rows = elems(a.1) / k.max(1);
    let read_dst = prefill_epilogue(out, n, bias, acc)?;
    if rows == 0 || n == 0 {
        return Ok(());
    }
    let av = unsafe { std::slice::from_raw_parts(a.0.ptr as *const f32, rows * k) };
    let op = out.0.ptr as usize;
    let bad_col = std::sync::atomic::AtomicBool::new(false);
    if rows <= sparse_rows {
        let blocks = (threads * 4).clamp(1, n.div_ceil(16).max(1));
        let width = n.div_ceil(blocks);
        let work = |bi: usize| {
            for j in bi * width..((bi + 1) * width).min(n) {
                let (p0, p1) = (rp[j] as usize, rp[j + 1] as usize);
                for r in 0..rows {
                    let ar = &av[r * k..(r + 1) * k];
                    let mut t = 0f32;
                    for p in p0..p1 {
                        match ar.get(cols[p] as usize) {
                            Some(x) => t += x * vals[p],
                            None => bad_col.store(true, std::sync::atomic::Ordering::Relaxed),
                        }
                    }
                    // SAFETY: (r, j) is in the output and written by this task only.
                    let o = unsafe { &mut *(op as *mut f32).add(r * n + j) };
                    *o = if read_dst { *o + scale * t } else { scale * t };
                }
            }
        };
        for_blocks(blocks, threads, work);
    } else {
        // SAFETY: a is [rows, k] and out [rows, n], as checked above.
        unsafe {
            tiled_gemm(
                rows,
                n,
                k,
                a.0.ptr as *const f32,
                op as *mut f32,
                read_dst,
                scale,
                threads,
                |j0, j1, t| {
                    for j in j0..j1 {
                        for p in rp[j] as usize..rp[j + 1] as usize {
                            match t
                                .get_mut((j - j0) * k + cols[p] as usize)
                                .filter(|_| (cols[p] as usize) < k)
                            {
                                Some(x) => *x = vals[p],
                                None => bad_col.store(true, std::sync::atomic::Ordering::Relaxed),
                            }
                        }
                    }
                },
            )
        };
    }
    if bad_col.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(format!("a CSR column index is outside 0..{k}"));
    }
    Ok(())
}

/// `spmatmul` for blocks of `br x bc`: up to `sparse_rows` rows, per block row, every stored block
/// adds `a[:, block columns] · blockᵀ` into `br` output columns held in registers, four (or two)
/// activation rows at a time (blocks of 8, 16 or 32 rows use AVX2/FMA); more rows densify 64
/// output channels at a time for the GEMM.
#[allow(clippy::too_many_arguments)]
fn block_spmatmul(
    a: (Buf, &[usize]),
    w: CsrWeight,
    out: (Buf, &[usize]),
    sparse_rows: usize,
    scale: f32,
    bias: Option<(Buf, &[usize])>,
    acc: Option<(Buf, &[usize])>,
    threads: usize,
    level: Level,
) -> Result<(), String> {
    let sa = a.1;
    let (k, n) = sparse_shapes(a, out)?;
    let [br, bc] = w.block;
    if br == 0 || bc == 0 || n % br != 0 || k % bc != 0 || w.row_ptr.len != (n / br + 1) * 4 {
        return Err(format!("a {br}x{bc} block-CSR weight does not fit [{n}, {k}]"));
    }
    let nb = w.cols.len / 4;
    // Blocks come from the manifest: an absurd size must not overflow.
    let per = br
        .checked_mul(bc)
        .filter(|p| *p <= n * k)
        .ok_or("block larger than the weight")?;
    if w.vals.len != nb * per * 4 {
        return Err(format!(
            "{nb} blocks of {br}x{bc} need {} values, got {}",
            nb * per,
            w.vals.len / 4
        ));
    }
    // SAFETY: lengths checked above.
    let rp = unsafe { std::slice::from_raw_parts(w.row_ptr.ptr as *const i32, n / br + 1) };
    let cols = unsafe { std::slice::from_raw_parts(w.cols.ptr as *const i32, nb) };
    let vals = unsafe { std::slice::from_raw_parts(w.vals.ptr as *const f32, nb * br * bc) };
    if rp[0] != 0 || rp.windows(2).any(|p| p[1] < p[0]) || rp[n / br] as usize != nb {
        return Err("block-CSR row offsets are not increasing from 0 to the number of blocks".into());
    }
    if cols.iter().any(|c| *c < 0 || (*c as usize + 1) * bc > k) {
        return Err(format!("a block column is outside 0..{}", k / bc));
    }
    let rows = elems(sa) / k.max(1);
    let read_dst = prefill_epilogue(out, n, bias, acc)?;
    if rows == 0 || n == 0 {
        return Ok(());
    }
    let av = unsafe { std::slice::from_raw_parts(a.0.ptr as *const f32, rows * k) };
    let op = out.0.ptr as usize;
    if rows > sparse_rows {
        // SAFETY: a is [rows, k] and out [rows, n]; block columns were checked above.
        unsafe {
            tiled_gemm(
                rows,
                n,
                k,
                a.0.ptr as *const f32,
                op as *mut f32,
                read_dst,
                scale,
                threads,
                |j0, j1, t| {
                    for j in j0..j1 {
                        let (band, i) = (j / br, j % br);
                        let row = &mut t[(j - j0) * k..(j - j0 + 1) * k];
                        for p in rp[band] as usize..rp[band + 1] as usize {
                            let c0 = cols[p] as usize * bc;
                            for jj in 0..bc {
                                row[c0 + jj] = vals[p * br * bc + jj * br + i];
                            }
                        }
                    }
                },
            )
        };
        return Ok(());
    }
    let bands = n / br;
    let tasks = (threads * 4).clamp(1, bands.max(1));
    let per = bands.div_ceil(tasks);
    #[cfg(target_arch = "x86_64")]
    let simd = matches!(br, 8 | 16 | 32) && level.avx2();
    let work = |t: usize| {
        for band in t * per..((t + 1) * per).min(bands) {
            let blocks = rp[band] as usize..rp[band + 1] as usize;
            // SAFETY: this task alone writes output columns band·br..(band+1)·br; every index was
            // checked above.
            unsafe {
                #[cfg(target_arch = "x86_64")]
                if simd {
                    match br {
                        8 => block_band_avx2::<1, 4>(
                            av,
                            k,
                            rows,
                            cols,
                            vals,
                            blocks,
                            bc,
                            band,
                            op as *mut f32,
                            n,
                            scale,
                            read_dst,
                        ),
                        16 => block_band_avx2::<2, 4>(
                            av,
                            k,
                            rows,
                            cols,
                            vals,
                            blocks,
                            bc,
                            band,
                            op as *mut f32,
                            n,
                            scale,
                            read_dst,
                        ),
                        _ => block_band_avx2::<4, 2>(
                            av,
                            k,
                            rows,
                            cols,
                            vals,
                            blocks,
                            bc,
                            band,
                            op as *mut f32,
                            n,
                            scale,
                            read_dst,
                        ),
                    }
                    continue;
                }
                let o = op as *mut f32;
                for r in 0..rows {
                    for i in 0..br {
                        let mut t = 0f32;
                        for p in blocks.clone() {
                            let c0 = cols[p] as usize * bc;
                            for j in 0..bc {
                                t += av[r * k + c0 + j] * vals[p * br * bc + j * br + i];
                            }
                        }
                        let d = o.add(r * n + band * br + i);
                        *d = if read_dst { *d + scale * t } else { scale * t };
                    }
                }
            }
        }
    };
    for_blocks(tasks, threads, work);
    Ok(())
}

/// One band of `8·V` output columns over every activation row, `R` rows at a time with `R × V`
/// accumulators; the remaining rows one at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_band_avx2<const V: usize, const R: usize>(
    a: &[f32],
    k: usize,
    rows: usize,
    cols: &[i32],
    vals: &[f32],
    blocks: std::ops::Range<usize>,
    bc: usize,
    band: usize,
    out: *mut f32,
    n: usize,
    scale: f32,
    read_dst: bool,
) {
    use std::arch::x86_64::*;
    let br = 8 * V;
    let sv = _mm256_set1_ps(scale);
    let mut r0 = 0;
    while r0 < rows {
        let rr = if rows - r0 >= R { R } else { 1 };
        let mut accs = [[_mm256_setzero_ps(); V]; R];
        for p in blocks.clone() {
            let c0 = cols[p] as usize * bc;
            let blk = vals.as_ptr().add(p * br * bc);
            for j in 0..bc {
                let mut w = [_mm256_setzero_ps(); V];
                for (v, wv) in w.iter_mut().enumerate() {
                    *wv = _mm256_loadu_ps(blk.add(j * br + 8 * v));
                }
                for (i, acc) in accs.iter_mut().enumerate().take(rr) {
                    let x = _mm256_set1_ps(*a.get_unchecked((r0 + i) * k + c0 + j));
                    for v in 0..V {
                        acc[v] = _mm256_fmadd_ps(x, w[v], acc[v]);
                    }
                }
            }
        }
        for (i, acc) in accs.iter().enumerate().take(rr) {
            for (v, x) in acc.iter().enumerate() {
                let d = out.add((r0 + i) * n + band * br + 8 * v);
                let y = _mm256_mul_ps(*x, sv);
                let y = if read_dst {
                    _mm256_add_ps(_mm256_loadu_ps(d), y)
                } else {
                    y
                };
                _mm256_storeu_ps(d, y);
            }
        }
        r0 += rr;
    }
}

/// Row `j` of a packed 2:4 weight, unpacked into `dst` (`k` values; offsets bytes are masked to
/// their two 2-bit fields, so any byte stays inside the group — the loader checked them).
fn unpack24_row(vals: &[f32], idx: &[u8], j: usize, k: usize, dst: &mut [f32], avx2: bool) {
    let (v, ix) = (
        &vals[j * (k / 2)..(j + 1) * (k / 2)],
        &idx[j * (k / 4)..(j + 1) * (k / 4)],
    );
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: the artifact's level has AVX2 (checked at load); `v`, `ix` and `dst` hold one row each.
        unsafe { unpack24_row_avx2(v, ix, dst) };
        return;
    }
    for (g, (quad, b)) in dst.chunks_exact_mut(4).zip(ix).enumerate() {
        quad.fill(0.0);
        quad[(*b & 3) as usize] = v[2 * g];
        quad[((*b >> 2) & 3) as usize] = v[2 * g + 1];
    }
}

/// For a pair of offsets bytes `b0 | b1 << 4` (two groups): where each group's two kept columns
/// are among 8 consecutive columns, `[i0(b0), i1(b0), 4 + i0(b1), 4 + i1(b1)]`, twice (for the
/// low and the high 128-bit lane's use); and, for unpacking, per column of the two groups which
/// kept value (0–3) lands there and whether one does.
struct Lut24 {
    gather: [[i32; 8]; 256],
    expand: [[i32; 8]; 256],
    keep: [[i32; 8]; 256],
}

static LUT24: std::sync::LazyLock<Lut24> = std::sync::LazyLock::new(|| {
    let mut l = Lut24 {
        gather: [[0; 8]; 256],
        expand: [[0; 8]; 256],
        keep: [[0; 8]; 256],
    };
    for pair in 0..256usize {
        for (h, b) in [pair & 15, pair >> 4].into_iter().enumerate() {
            let (i0, i1) = ((b & 3) as i32, ((b >> 2) & 3) as i32);
            for rep in [0, 4] {
                l.gather[pair][rep + 2 * h] = 4 * h as i32 + i0;
                l.gather[pair][rep + 2 * h + 1] = 4 * h as i32 + i1;
            }
            for c in 0..4 {
                let at = 4 * h + c as usize;
                if c == i0 {
                    (l.expand[pair][at], l.keep[pair][at]) = (2 * h as i32, -1);
                } else if c == i1 && i1 != i0 {
                    (l.expand[pair][at], l.keep[pair][at]) = (2 * h as i32 + 1, -1);
                }
            }
        }
    }
    l
});

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn unpack24_row_avx2(v: &[f32], ix: &[u8], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let lut = &*LUT24;
    let groups = ix.len();
    let mut g = 0;
    // Two groups (8 columns) per step: their 4 kept values permuted into place, the rest zeroed.
    while g + 2 <= groups {
        let pair = ((ix[g] & 15) | (ix[g + 1] & 15) << 4) as usize;
        let vals = _mm256_castps128_ps256(_mm_loadu_ps(v.as_ptr().add(2 * g)));
        let at = _mm256_loadu_si256(lut.expand[pair].as_ptr() as *const __m256i);
        let keep = _mm256_loadu_si256(lut.keep[pair].as_ptr() as *const __m256i);
        let x = _mm256_and_ps(_mm256_permutevar8x32_ps(vals, at), _mm256_castsi256_ps(keep));
        _mm256_storeu_ps(dst.as_mut_ptr().add(4 * g), x);
        g += 2;
    }
    for g in g..groups {
        let q = &mut dst[4 * g..4 * g + 4];
        q.fill(0.0);
        q[(ix[g] & 3) as usize] = v[2 * g];
        q[((ix[g] >> 2) & 3) as usize] = v[2 * g + 1];
    }
}

/// `Σ_c w[c] · x[c]` for one packed 2:4 row (`v` kept values, `ix` offsets) against a dense row:
/// four groups per step, the kept activations permuted out of two 8-column registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot24_avx2(v: &[f32], ix: &[u8], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let lut = &*LUT24;
    let groups = ix.len();
    let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut g = 0;
    while g + 8 <= groups {
        for (half, s) in [(0, &mut s0), (4, &mut s1)] {
            let gg = g + half;
            let p0 = ((ix[gg] & 15) | (ix[gg + 1] & 15) << 4) as usize;
            let p1 = ((ix[gg + 2] & 15) | (ix[gg + 3] & 15) << 4) as usize;
            let lo = _mm256_permutevar8x32_ps(
                _mm256_loadu_ps(x.as_ptr().add(4 * gg)),
                _mm256_loadu_si256(lut.gather[p0].as_ptr() as *const __m256i),
            );
            let hi = _mm256_permutevar8x32_ps(
                _mm256_loadu_ps(x.as_ptr().add(4 * gg + 8)),
                _mm256_loadu_si256(lut.gather[p1].as_ptr() as *const __m256i),
            );
            let kept = _mm256_blend_ps(lo, hi, 0xF0);
            *s = _mm256_fmadd_ps(kept, _mm256_loadu_ps(v.as_ptr().add(2 * gg)), *s);
        }
        g += 8;
    }
    let mut t = hsum256(_mm256_add_ps(s0, s1));
    for g in g..groups {
        t += v[2 * g] * x[4 * g + (ix[g] & 3) as usize] + v[2 * g + 1] * x[4 * g + ((ix[g] >> 2) & 3) as usize];
    }
    t
}

/// Checks the offsets bytes of a packed 2:4 weight: two distinct offsets, in order.
pub(crate) fn check_24_offsets(idx: &[u8]) -> Result<(), String> {
    match idx.iter().position(|b| *b > 15 || (*b & 3) >= (*b >> 2)) {
        Some(i) => Err(format!(
            "2:4 offsets byte {i} is {}, not two increasing offsets in 0..4",
            idx[i]
        )),
        None => Ok(()),
    }
}

/// `out = acc + bias + scale · (a @ wᵀ)` with a packed 2:4 `w` (`vals [n, k/2]`, `idx [n, k/4]`):
/// up to `sparse_rows` rows of `a` unpack one weight row at a time and take its dot products with
/// every activation row (the packed bytes are read once: 2.25 instead of 4 bytes per weight);
/// more rows unpack 64 output channels at a time for the GEMM.
#[allow(clippy::too_many_arguments)]
pub fn spmatmul24(
    a: (Buf, &[usize]),
    (vals, idx): (Buf, Buf),
    out: (Buf, &[usize]),
    sparse_rows: usize,
    scale: f32,
    bias: Option<(Buf, &[usize])>,
    acc: Option<(Buf, &[usize])>,
    threads: usize,
    level: Level,
) -> Result<(), String> {
    let (k, n) = sparse_shapes(a, out)?;
    if k % 4 != 0 || vals.len != n * (k / 2) * 4 || idx.len != n * (k / 4) {
        return Err(format!("a packed 2:4 weight does not fit [{n}, {k}]"));
    }
    // SAFETY: lengths checked above.
    let vs = unsafe { std::slice::from_raw_parts(vals.ptr as *const f32, n * (k / 2)) };
    let ix = unsafe { std::slice::from_raw_parts(idx.ptr as *const u8, n * (k / 4)) };
    let rows = elems(a.1) / k.max(1);
    let read_dst = prefill_epilogue(out, n, bias, acc)?;
    if rows == 0 || n == 0 {
        return Ok(());
    }
    let av = unsafe { std::slice::from_raw_parts(a.0.ptr as *const f32, rows * k) };
    let op = out.0.ptr as usize;
    if rows <= sparse_rows {
        let blocks = (threads * 4).clamp(1, n.div_ceil(16).max(1));
        let width = n.div_ceil(blocks);
        let simd = level.avx2();
        let work = |bi: usize| {
            let mut w = vec![0f32; k];
            for j in bi * width..((bi + 1) * width).min(n) {
                let (vr, ir) = (&vs[j * (k / 2)..(j + 1) * (k / 2)], &ix[j * (k / 4)..(j + 1) * (k / 4)]);
                // One activation row gathers from the packed row; more unpack it once and reuse it.
                #[cfg(target_arch = "x86_64")]
                let direct = simd && rows == 1;
                #[cfg(not(target_arch = "x86_64"))]
                let direct = false;
                if !direct {
                    unpack24_row(vs, ix, j, k, &mut w, simd);
                }
                for r in 0..rows {
                    let x = &av[r * k..(r + 1) * k];
                    // SAFETY (AVX2): detected above; the row slices have their packed lengths.
                    #[cfg(target_arch = "x86_64")]
                    let t = if direct {
                        unsafe { dot24_avx2(vr, ir, x) }
                    } else {
                        dot(x, &w, simd)
                    };
                    #[cfg(not(target_arch = "x86_64"))]
                    let t = {
                        let _ = (vr, ir);
                        dot(x, &w, simd)
                    };
                    // SAFETY: (r, j) is in the output and written by this task only.
                    let o = unsafe { &mut *(op as *mut f32).add(r * n + j) };
                    *o = if read_dst { *o + scale * t } else { scale * t };
                }
            }
        };
        for_blocks(blocks, threads, work);
    } else {
        // SAFETY: a is [rows, k] and out [rows, n], as checked above.
        unsafe {
            tiled_gemm(
                rows,
                n,
                k,
                a.0.ptr as *const f32,
                op as *mut f32,
                read_dst,
                scale,
                threads,
                |j0, j1, t| {
                    for j in j0..j1 {
                        unpack24_row(vs, ix, j, k, &mut t[(j - j0) * k..(j - j0 + 1) * k], level.avx2());
                    }
                },
            )
        };
    }
    Ok(())
}

/// `Σ x·y`, eight lanes at a time where the CPU has AVX2 and FMA.
pub(crate) fn dot(x: &[f32], y: &[f32], avx2: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: the artifact's level has AVX2 and FMA (checked at load).
        return unsafe { dot_avx2(x, y) };
    }
    x.iter().zip(y).map(|(a, b)| a * b).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(x: &[f32], y: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = x.len().min(y.len());
    let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 16 <= n {
        s0 = _mm256_fmadd_ps(
            _mm256_loadu_ps(x.as_ptr().add(i)),
            _mm256_loadu_ps(y.as_ptr().add(i)),
            s0,
        );
        s1 = _mm256_fmadd_ps(
            _mm256_loadu_ps(x.as_ptr().add(i + 8)),
            _mm256_loadu_ps(y.as_ptr().add(i + 8)),
            s1,
        );
        i += 16;
    }
    let mut t = hsum256(_mm256_add_ps(s0, s1));
    while i < n {
        t += x[i] * y[i];
        i += 1;
    }
    t
}

/// A product with one operand's encoding fixed: `(activations, strides)`, `(output, strides)`.
type Product<'a> = dyn Fn((Buf, &[usize]), (Buf, &[usize])) -> Result<(), String> + Sync + 'a;

/// Median nanoseconds of `m`-row products with `w` (`[n, k]`, row-major f32) stored dense and as
/// `sparse` runs it (given the `[m, k]` activations and the `[m, n]` output), for the compiler's
/// choice of encoding.
fn measure_against_dense(
    w: &[f32],
    n: usize,
    k: usize,
    m: usize,
    threads: usize,
    level: Level,
    sparse: &Product,
) -> Result<(f64, f64), String> {
    let pool = pool(threads)?;
    let spin = crate::pool::Pool::new(threads)?;
    let a: Vec<f32> = (0..m * k).map(|i| ((i % 7) as f32 - 3.0) * 0.1).collect();
    let mut out = vec![0f32; m * n];
    let buf = |p: *const u8, len: usize| Buf { ptr: p as *mut u8, len };
    let (sa, so, sw) = ([m, k], [m, n], [n, k]);
    // Few-row (decoding) products stream their weights from memory, not from a warm cache: each
    // timed run starts after reading a buffer larger than the last-level cache.
    let cold = m <= 4;
    let time = |f: &dyn Fn() -> Result<(), String>| crate::measure::median_ns(cold, f);
    let ob = buf(out.as_mut_ptr() as *const u8, out.len() * 4);
    let ab = buf(a.as_ptr() as *const u8, a.len() * 4);
    spin.install(|| {
        pool.install(|| {
            let dense = time(&|| {
                matmul(
                    (ab, &sa),
                    (buf(w.as_ptr() as *const u8, w.len() * 4), &sw),
                    (ob, &so),
                    Epilogue {
                        ta: false,
                        tb: true,
                        scale: 1.0,
                        bias: None,
                        acc: None,
                    },
                    threads,
                    level,
                )
            })?;
            let sparse = time(&|| sparse((ab, &sa), (ob, &so)))?;
            Ok((dense, sparse))
        })
    })
}

/// Reads 64 MiB, pushing earlier data out of the caches.
pub(crate) fn evict_caches() {
    static JUNK: std::sync::LazyLock<Vec<u64>> = std::sync::LazyLock::new(|| vec![1u64; 8 << 20]);
    let s = JUNK.iter().step_by(8).fold(0u64, |a, x| a.wrapping_add(*x));
    std::hint::black_box(s);
}

/// [`measure_against_dense`] for the (block) CSR form of `w` (`row_ptr`, `cols`, `vals`, `block`).
#[allow(clippy::too_many_arguments)]
pub fn measure_sparse(
    w: &[f32],
    row_ptr: &[i32],
    cols: &[i32],
    vals: &[f32],
    block: [usize; 2],
    n: usize,
    k: usize,
    m: usize,
    threads: usize,
    level: Level,
) -> Result<(f64, f64), String> {
    let buf = |p: *const u8, len: usize| Buf { ptr: p as *mut u8, len };
    measure_against_dense(w, n, k, m, threads, level, &|a, out| {
        let w = CsrWeight {
            row_ptr: buf(row_ptr.as_ptr() as *const u8, row_ptr.len() * 4),
            cols: buf(cols.as_ptr() as *const u8, cols.len() * 4),
            vals: buf(vals.as_ptr() as *const u8, vals.len() * 4),
            block,
        };
        spmatmul(a, w, out, usize::MAX, 1.0, None, None, threads, level)
    })
}

/// [`measure_against_dense`] for the packed 2:4 form of `w` (`vals`, `idx`).
#[allow(clippy::too_many_arguments)]
pub fn measure_sparse24(
    w: &[f32],
    vals: &[f32],
    idx: &[u8],
    n: usize,
    k: usize,
    m: usize,
    threads: usize,
    level: Level,
) -> Result<(f64, f64), String> {
    let buf = |p: *const u8, len: usize| Buf { ptr: p as *mut u8, len };
    measure_against_dense(w, n, k, m, threads, level, &|a, out| {
        let packed = (
            buf(vals.as_ptr() as *const u8, vals.len() * 4),
            buf(idx.as_ptr(), idx.len()),
        );
        spmatmul24(a, packed, out, usize::MAX, 1.0, None, None, threads, level)
    })
}

/// Runs `f(block)` for every block, across the pool when there is more than one thread to use.
fn for_blocks(blocks: usize, threads: usize, f: impl Fn(usize) + Sync + Send) {
    if threads > 1 && blocks > 1 {
        crate::pool::for_each(blocks, f);
    } else {
        (0..blocks).for_each(f);
    }
}

/// `out (+)= scale · a @ wᵀ` for a weight that exists only 64 output channels at a time:
/// `fill(j0, j1, tile)` writes rows `j0..j1` of `w` (`[j1 - j0, k]`, zeroed) and the GEMM reads
/// the tile transposed into columns `j0..j1` of `out`. Tiles run on the pool.
///
/// # Safety
/// `a` holds `rows * k` floats and `out` `rows * n`.
#[allow(clippy::too_many_arguments)]
unsafe fn tiled_gemm(
    rows: usize,
    n: usize,
    k: usize,
    a: *const f32,
    out: *mut f32,
    read_dst: bool,
    scale: f32,
    threads: usize,
    fill: impl Fn(usize, usize, &mut [f32]) + Sync + Send,
) {
    const NB: usize = 64;
    let (ap, op) = (a as usize, out as usize);
    for_blocks(n.div_ceil(NB), threads, |bi| {
        let (j0, j1) = (bi * NB, ((bi + 1) * NB).min(n));
        let mut t = vec![0f32; (j1 - j0) * k];
        fill(j0, j1, &mut t);
        // SAFETY: the caller's bounds; the output block is columns j0..j1, written by this tile only.
        unsafe {
            gemm::gemm::<f32>(
                rows,
                j1 - j0,
                k,
                (op as *mut f32).add(j0),
                1,
                n as isize,
                read_dst,
                ap as *const f32,
                1,
                k as isize,
                t.as_ptr(),
                k as isize,
                1,
                1.0,
                scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        };
    });
}
