//! Static checks of a manifest against the artifact's sections, run once at load time. After
//! them every index in the plan is in range, every temporary is written before it is read, and
//! every step's element types are what its executor assumes. Shapes are symbolic and are checked
//! per run, by each step, before it touches memory.

use kiln_ir::DType;

use crate::plan::{KernelKind, Manifest, Step, Storage};
use crate::LoadError;

fn bad<T>(m: String) -> Result<T, LoadError> {
    Err(LoadError::Corrupt(m))
}

/// Validates `m` for weight and code sections of the given lengths.
pub fn manifest(m: &Manifest, weights_len: usize, code_len: usize) -> Result<(), LoadError> {
    let nv = m.values.len();
    let nd = m.dims.len();
    for (i, (name, bound)) in m.dims.iter().enumerate() {
        if *bound == 0 || m.dims[..i].iter().any(|(n, _)| n == name) {
            return bad(format!("dim `{name}` is repeated or has bound 0"));
        }
    }
    for (i, v) in m.values.iter().enumerate() {
        if v.shape.iter().any(|d| d.syms.iter().any(|s| *s as usize >= nd)) {
            return bad(format!("value {i} uses an undeclared dim"));
        }
        match &v.storage {
            Storage::Input(n) => {
                if m.inputs.get(*n as usize).map(|p| p.value as usize) != Some(i) {
                    return bad(format!("value {i} claims to be input {n}"));
                }
            }
            Storage::Weight { offset, len } => {
                if v.shape.iter().any(|d| !d.syms.is_empty()) {
                    return bad(format!("weight value {i} has a symbolic shape"));
                }
                let elems = v.shape.iter().try_fold(1u64, |a, d| a.checked_mul(d.coeff));
                let want = elems.and_then(|e| e.checked_mul(v.dtype.size_bytes() as u64));
                let end = offset.checked_add(*len);
                if want != Some(*len)
                    || end.is_none_or(|e| e > weights_len as u64)
                    || offset % v.dtype.size_bytes() as u64 != 0
                {
                    return bad(format!(
                        "weight value {i} (`{}`) lies outside the weight section or has the wrong size",
                        v.name
                    ));
                }
            }
            Storage::Temp => {}
            Storage::Alias(src) => {
                let Some(s) = m.values.get(*src as usize).filter(|_| (*src as usize) < i) else {
                    return bad(format!("value {i} aliases a later or missing value"));
                };
                if s.dtype != v.dtype {
                    return bad(format!("value {i} aliases a value of another dtype"));
                }
            }
        }
    }
    for p in m.inputs.iter().chain(&m.outputs) {
        if p.value as usize >= nv {
            return bad(format!("port `{}` names a missing value", p.name));
        }
    }
    for (i, p) in m.inputs.iter().enumerate() {
        if m.values[p.value as usize].storage != Storage::Input(i as u32) {
            return bad(format!("input `{}` is not backed by its input storage", p.name));
        }
        let dtype = m.values[p.value as usize].dtype;
        if let Some(d) = p.default.filter(|d| !d.fits(dtype)) {
            return bad(format!(
                "input `{}` defaults to {d}, which does not fit its dtype {dtype}",
                p.name
            ));
        }
    }
    // The code section is exactly the kernels (or, for a CUDA artifact, the PTX modules), in
    // order, each 16-byte aligned: an entry point can only be the start of code the compiler emitted.
    let gpu = m.target.arch == crate::plan::GPU_ARCH;
    if gpu != m.gpu.is_some() {
        return bad("a CUDA target needs PTX modules, and only a CUDA target has them".into());
    }
    let pieces: Vec<(String, u64, u64)> = match &m.gpu {
        Some(g) => {
            if m.kernels.iter().any(|k| k.offset != 0 || k.len != 0) {
                return bad("kernels of a CUDA artifact have no code of their own".into());
            }
            if g.modules.is_empty() {
                return bad("a CUDA artifact without PTX".into());
            }
            g.modules
                .iter()
                .map(|x| (format!("PTX for {}", x.arch), x.offset, x.len))
                .collect()
        }
        None => m
            .kernels
            .iter()
            .map(|k| (format!("kernel `{}`", k.name), k.offset, k.len))
            .collect(),
    };
    let mut next = 0u64;
    for (what, offset, len) in &pieces {
        let end = offset.checked_add(*len);
        if *len == 0 || end.is_none_or(|e| e > code_len as u64) || *offset != next.div_ceil(16) * 16 {
            return bad(format!("{what} does not lie where the code section puts it"));
        }
        next = offset + len;
    }
    if next != code_len as u64 {
        return bad(format!("the code section has {} bytes, its kernels {next}", code_len));
    }
    for k in &m.kernels {
        if let Some(t) = &k.tape {
            if k.inputs.iter().any(|d| *d != DType::F32) || k.output != DType::F32 {
                return bad(format!("kernel `{}` has a tape but is not an f32 kernel", k.name));
            }
            crate::vmap::check(t, k.inputs.len())
                .map_err(|e| LoadError::Corrupt(format!("kernel `{}`: {e}", k.name)))?;
        }
    }
    // Temporaries: written once, by a step, before anything reads them.
    let mut written = vec![false; nv];
    let mut slots = std::collections::HashSet::new();
    let root = |mut v: usize| {
        let mut hops = 0;
        while let Storage::Alias(s) = m.values[v].storage {
            v = s as usize;
            hops += 1;
            if hops > nv {
                break;
            }
        }
        v
    };
    let readable = |v: usize, written: &Vec<bool>| {
        let r = root(v);
        !matches!(m.values[r].storage, Storage::Temp) || written[r]
    };
    for (si, step) in m.steps.iter().enumerate() {
        let (ins, out) = (step.inputs(), step.out());
        for v in ins.iter().chain(std::iter::once(&out)) {
            if *v as usize >= nv {
                return bad(format!("step {si} names a missing value {v}"));
            }
        }
        for v in &ins {
            if !readable(*v as usize, &written) {
                return bad(format!("step {si} reads value {v} before it is computed"));
            }
        }
        let o = out as usize;
        if m.values[o].storage != Storage::Temp || written[o] {
            return bad(format!("step {si} writes value {o}, which is not a fresh temporary"));
        }
        written[o] = true;
        let dt = |v: u32| m.values[v as usize].dtype;
        match step {
            Step::Kernel {
                kernel,
                kind,
                inputs,
                contiguous,
                out,
                space,
            } => {
                let Some(k) = m.kernels.get(*kernel as usize) else {
                    return bad(format!("step {si} calls a missing kernel"));
                };
                let types: Vec<DType> = inputs.iter().map(|v| dt(*v)).collect();
                if k.inputs != types || k.output != dt(*out) || contiguous.len() != inputs.len() {
                    return bad(format!("step {si} does not match kernel `{}`'s signature", k.name));
                }
                if space.iter().any(|d| d.syms.iter().any(|s| *s as usize >= nd))
                    || (*kind != KernelKind::Map && space.is_empty())
                {
                    return bad(format!("step {si} has an invalid iteration space"));
                }
            }
            Step::MatMul {
                a, b, out, bias, acc, ..
            } => {
                if [*a, *b, *out]
                    .into_iter()
                    .chain(*bias)
                    .chain(*acc)
                    .any(|v| dt(v) != DType::F32)
                {
                    return bad(format!("step {si}: matmul on non-f32 values"));
                }
            }
            Step::PackedMatMul {
                a,
                w,
                kernel,
                out,
                bias,
                acc,
                post,
                ..
            } => {
                packed_matmul(m, si, (*a, *w, *out), kernel, (*bias, *acc))?;
                let k = post.map(|k| m.kernels.get(k as usize));
                if k.is_some_and(|k| k.is_none_or(|k| k.inputs != [DType::F32] || k.output != DType::F32)) {
                    return bad(format!("step {si}: its epilogue is not a one-input f32 kernel"));
                }
            }
            Step::QMatMul {
                a,
                codes,
                scales,
                mins,
                bits,
                group,
                out,
                bias,
                acc,
                ..
            } => {
                let want_codes = if *bits == 8 { DType::I8 } else { DType::U8 };
                let float = |v: &u32| matches!(dt(*v), DType::F32 | DType::F16 | DType::BF16);
                if ![8, 4].contains(bits)
                    || *group == 0
                    || dt(*codes) != want_codes
                    || !float(scales)
                    || mins.is_some() != (*bits == 4)
                    || mins.iter().any(|m| !float(m))
                    || [*a, *out]
                        .into_iter()
                        .chain(*bias)
                        .chain(*acc)
                        .any(|v| dt(v) != DType::F32)
                {
                    return bad(format!("step {si}: quantized matmul types"));
                }
            }
            Step::SpMatMul {
                a,
                row_ptr,
                cols,
                vals,
                out,
                bias,
                acc,
                ..
            } => {
                if dt(*row_ptr) != DType::I32
                    || dt(*cols) != DType::I32
                    || [*a, *vals, *out]
                        .into_iter()
                        .chain(*bias)
                        .chain(*acc)
                        .any(|v| dt(v) != DType::F32)
                {
                    return bad(format!("step {si}: sparse matmul types"));
                }
            }
            Step::SpMatMul24 {
                a,
                vals,
                idx,
                out,
                bias,
                acc,
                ..
            } => {
                if dt(*idx) != DType::U8
                    || [*a, *vals, *out]
                        .into_iter()
                        .chain(*bias)
                        .chain(*acc)
                        .any(|v| dt(v) != DType::F32)
                {
                    return bad(format!("step {si}: 2:4 sparse matmul types"));
                }
            }
            Step::Gather { table, idx, out, .. } => {
                if !matches!(dt(*idx), DType::I64 | DType::I32) || dt(*table) != dt(*out) {
                    return bad(format!("step {si}: gather types"));
                }
            }
            Step::Transpose { x, out, .. } | Step::Slice { x, out, .. } | Step::Broadcast { x, out } => {
                if dt(*x) != dt(*out) {
                    return bad(format!("step {si}: changes dtype"));
                }
            }
            Step::Concat { xs, out, .. } => {
                if xs.is_empty() || xs.iter().any(|x| dt(*x) != dt(*out)) {
                    return bad(format!("step {si}: concat types"));
                }
            }
            Step::Fallback { .. } => {}
            Step::CacheAppend { x, out, slot, view } => {
                if *view {
                    let readers_ok = m.steps.iter().all(|st| match st {
                        Step::Attention { k, v, cached, .. } => {
                            (*k != *out || cached[0]) && (*v != *out || cached[1]) && !step_reads_other(st, *out)
                        }
                        other => !other.inputs().contains(out),
                    });
                    if !readers_ok {
                        return bad(format!(
                            "step {si}: a cache read in place has readers other than attention"
                        ));
                    }
                }
                if dt(*x) != DType::F32 || dt(*out) != DType::F32 {
                    return bad(format!("step {si}: cache_append on non-f32 values"));
                }
                if m.values[*x as usize].shape.len() != 4 || m.values[*out as usize].shape.len() != 4 {
                    return bad(format!("step {si}: cache_append operands must have rank 4"));
                }
                if !slots.insert(*slot) {
                    return bad(format!("step {si}: cache slot {slot} is written twice"));
                }
            }
            Step::Attention {
                q,
                k,
                v,
                out,
                kernel,
                logits,
                kernel_inputs,
                contiguous,
                ..
            } => {
                let Some(kd) = m.kernels.get(*kernel as usize) else {
                    return bad(format!("step {si} calls a missing kernel"));
                };
                if let Some(l) = logits {
                    let Some(ld) = m.kernels.get(*l as usize) else {
                        return bad(format!("step {si} calls a missing logits kernel"));
                    };
                    if ld.inputs != kd.inputs || ld.output != DType::F32 {
                        return bad(format!(
                            "step {si}: logits kernel `{}` does not match `{}`",
                            ld.name, kd.name
                        ));
                    }
                }
                let blocks = kernel_inputs.iter().filter(|i| i.is_none()).count();
                let types: Vec<DType> = kernel_inputs.iter().map(|i| i.map_or(DType::F32, dt)).collect();
                if blocks != 1
                    || contiguous.len() != kernel_inputs.len()
                    || kd.inputs != types
                    || kd.output != DType::F32
                    || [*q, *k, *v, *out].iter().any(|x| dt(*x) != DType::F32)
                {
                    return bad(format!("step {si}: attention does not match kernel `{}`", kd.name));
                }
            }
        }
    }
    for p in &m.outputs {
        if !readable(p.value as usize, &written) {
            return bad(format!("output `{}` is never computed", p.name));
        }
    }
    Ok(())
}

/// Whether an attention step reads `v` other than as its k or v operand.
fn step_reads_other(st: &Step, val: u32) -> bool {
    match st {
        Step::Attention { q, kernel_inputs, .. } => *q == val || kernel_inputs.iter().flatten().any(|x| *x == val),
        _ => false,
    }
}

/// A packed product: f32 operands, a kernel this runtime has and the artifact's level allows, and
/// a weight in that kernel's panel layout `[panels, k, nr]`.
fn packed_matmul(
    m: &Manifest,
    si: usize,
    (a, w, out): (u32, u32, u32),
    kernel: &str,
    (bias, acc): (Option<u32>, Option<u32>),
) -> Result<(), LoadError> {
    let dt = |v: u32| m.values[v as usize].dtype;
    if [a, w, out]
        .into_iter()
        .chain(bias)
        .chain(acc)
        .any(|v| dt(v) != DType::F32)
    {
        return bad(format!("step {si}: matmul on non-f32 values"));
    }
    let Some(kern) = crate::gemm::MicroKernel::by_name(kernel) else {
        return bad(format!(
            "step {si} uses microkernel `{kernel}`, which this runtime does not have; recompile the model with this kiln"
        ));
    };
    if kern.level > m.target.level() {
        return bad(format!(
            "step {si} uses microkernel `{kernel}` (level {}), above the artifact's level {}",
            kern.level,
            m.target.level()
        ));
    }
    let wv = &m.values[w as usize];
    let shape: Vec<u64> = wv.shape.iter().map(|d| d.coeff).collect();
    if !matches!(wv.storage, Storage::Weight { .. }) || shape.len() != 3 || shape[2] != kern.nr as u64 {
        return bad(format!(
            "step {si}: the packed weight is not `{kernel}`'s panels [panels, k, {}]",
            kern.nr
        ));
    }
    Ok(())
}
