//! Weights packed at compile time for the CPU level's microkernel.
//!
//! Every f32 product whose right operand is a 2-D weight and whose left operand is row-major
//! becomes a `Step::PackedMatMul` reading that weight in the panel layout of the microkernel the
//! level selects (`kiln_runtime::gemm`); the product then never packs at run time and its
//! epilogue (scale, bias, residual) is applied in registers. A weight no other step reads any
//! more is dropped from the weight section: its value keeps its index (steps name values by
//! position) with an empty `[0]` shape and no bytes.

use std::collections::{HashMap, HashSet};

use kiln_runtime::artifact::ALIGN;
use kiln_runtime::cpu::Level;
use kiln_runtime::gemm::{self, MicroKernel};
use kiln_runtime::plan::{DimExpr, KernelKind, Manifest, Step, Storage, ValueDecl};

use crate::plan::Planned;

/// Packs every eligible product's weight for `level`'s microkernel; returns how many products
/// were packed.
pub fn pack_weights(p: &mut Planned, level: Level) -> usize {
    let kern = MicroKernel::for_level(level);
    let mut packed: HashMap<(u32, bool), u32> = HashMap::new();
    let mut count = 0;
    for si in 0..p.manifest.steps.len() {
        let Some((b, tb)) = eligible(&p.manifest, &p.manifest.steps[si]) else {
            continue;
        };
        let w = match packed.get(&(b, tb)) {
            Some(w) => *w,
            None => {
                let w = add_packed(p, kern, b, tb);
                packed.insert((b, tb), w);
                w
            }
        };
        let Step::MatMul {
            a,
            out,
            scale,
            bias,
            acc,
            ..
        } = p.manifest.steps[si].clone()
        else {
            unreachable!("eligible() accepts only products");
        };
        p.manifest.steps[si] = Step::PackedMatMul {
            a,
            w,
            kernel: kern.name.to_string(),
            out,
            scale,
            bias,
            acc,
            post: None,
        };
        count += 1;
    }
    if count > 0 {
        fuse_activations(&mut p.manifest, &mut p.predicted);
        drop_unread_weights(&mut p.manifest, &mut p.weights);
    }
    count
}

/// Moves a one-input elementwise kernel that is the only reader of a packed product's result
/// into the product (`post`): it then runs on each block of the result while the block is in
/// cache, in place, and the value it computed becomes an alias of the product's. The kernel's
/// estimated time joins the product's.
fn fuse_activations(m: &mut Manifest, predicted: &mut Vec<f64>) {
    let mut si = 0;
    while si < m.steps.len() {
        let Step::PackedMatMul { out, post: None, .. } = m.steps[si] else {
            si += 1;
            continue;
        };
        if let Some((ki, kernel, p)) = sole_map_reader(m, out) {
            m.steps.remove(ki);
            if ki < predicted.len() {
                let t = predicted.remove(ki);
                predicted[si] += t;
            }
            m.values[p as usize].storage = Storage::Alias(out);
            if let Step::PackedMatMul { post, .. } = &mut m.steps[si] {
                *post = Some(kernel);
            }
        }
        si += 1;
    }
}

/// `(step, kernel, its result)` of the Map kernel step that alone reads `v`, if `v` has no other
/// reader, alias or port and the kernel's one contiguous input is `v` with `v`'s shape.
fn sole_map_reader(m: &Manifest, v: u32) -> Option<(usize, u32, u32)> {
    let mut readers = m.steps.iter().enumerate().filter(|(_, s)| s.inputs().contains(&v));
    let (ki, step) = readers.next()?;
    let aliased = m.values.iter().any(|x| x.storage == Storage::Alias(v));
    let ported = m.outputs.iter().any(|o| o.value == v);
    if readers.next().is_some() || aliased || ported {
        return None;
    }
    let Step::Kernel {
        kernel,
        kind: KernelKind::Map,
        inputs,
        contiguous,
        out,
        space,
    } = step
    else {
        return None;
    };
    let shape = &m.values[v as usize].shape;
    let fits = inputs == &[v] && contiguous == &[true] && space == shape && m.values[*out as usize].shape == *shape;
    let later = *out > v && m.values[*out as usize].storage == Storage::Temp;
    let port = m.outputs.iter().any(|o| o.value == *out);
    (fits && later && !port).then_some((ki, *kernel, *out))
}

/// `(weight value, transposed)` of a product the microkernels can run with a packed weight.
fn eligible(m: &Manifest, step: &Step) -> Option<(u32, bool)> {
    let Step::MatMul {
        a,
        b,
        out,
        ta: false,
        tb,
        ..
    } = step
    else {
        return None;
    };
    let (va, vb, vo) = (&m.values[*a as usize], &m.values[*b as usize], &m.values[*out as usize]);
    let weight = matches!(vb.storage, Storage::Weight { .. }) && vb.dtype == kiln_ir::DType::F32;
    let rows_match =
        va.shape.len() == vo.shape.len() && va.shape[..va.shape.len() - 1] == vo.shape[..vo.shape.len() - 1];
    (weight && vb.shape.len() == 2 && rows_match).then_some((*b, *tb))
}

/// Appends `b` packed for `kern` to the weight section; returns the new value.
fn add_packed(p: &mut Planned, kern: &MicroKernel, b: u32, tb: bool) -> u32 {
    let v = &p.manifest.values[b as usize];
    let Storage::Weight { offset, len } = v.storage else {
        unreachable!("eligible() accepts only weights");
    };
    let (r, c) = (v.shape[0].coeff as usize, v.shape[1].coeff as usize);
    let (k, n) = if tb { (c, r) } else { (r, c) };
    let bytes = &p.weights[offset as usize..(offset + len) as usize];
    let w: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|x| f32::from_le_bytes(x.try_into().unwrap()))
        .collect();
    let panels = gemm::pack(kern, &w, k, n, tb);
    while !p.weights.len().is_multiple_of(ALIGN) {
        p.weights.push(0);
    }
    let start = p.weights.len();
    p.weights.extend(panels.iter().flat_map(|x| x.to_le_bytes()));
    let dim = |d: usize| DimExpr {
        coeff: d as u64,
        syms: Vec::new(),
    };
    let name = format!("{}@{}{}", v.name, kern.name, if tb { "ᵀ" } else { "" });
    p.manifest.values.push(ValueDecl {
        dtype: kiln_ir::DType::F32,
        shape: vec![dim(n.div_ceil(kern.nr)), dim(k), dim(kern.nr)],
        storage: Storage::Weight {
            offset: start as u64,
            len: (p.weights.len() - start) as u64,
        },
        name,
    });
    (p.manifest.values.len() - 1) as u32
}

/// Rebuilds the weight section with only the weights some step or output reads.
fn drop_unread_weights(m: &mut Manifest, weights: &mut Vec<u8>) {
    let mut read: HashSet<u32> = HashSet::new();
    for v in m
        .steps
        .iter()
        .flat_map(|s| s.inputs())
        .chain(m.outputs.iter().map(|o| o.value))
    {
        // A reshape of a weight is an alias of it: reading the alias reads the weight.
        let mut v = v;
        while read.insert(v) {
            match m.values[v as usize].storage {
                Storage::Alias(src) => v = src,
                _ => break,
            }
        }
    }
    let mut out = Vec::with_capacity(weights.len());
    for (i, v) in m.values.iter_mut().enumerate() {
        let Storage::Weight { offset, len } = v.storage else {
            continue;
        };
        if !read.contains(&(i as u32)) {
            v.shape = vec![DimExpr {
                coeff: 0,
                syms: Vec::new(),
            }];
            v.storage = Storage::Weight { offset: 0, len: 0 };
            continue;
        }
        while !out.len().is_multiple_of(ALIGN) {
            out.push(0);
        }
        v.storage = Storage::Weight {
            offset: out.len() as u64,
            len,
        };
        out.extend_from_slice(&weights[offset as usize..(offset + len) as usize]);
    }
    *weights = out;
}
