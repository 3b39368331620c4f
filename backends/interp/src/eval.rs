//! Evaluation of one primitive op on concrete values.

use kiln_ir::{BinaryOp, Bindings, CmpOp, DType, Op, ReduceOp, TensorType, UnaryOp};

use crate::value::{round_to, Value};

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Strides of `shape` seen through broadcasting to `out` (0 on stretched or missing axes).
fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let own = strides(shape);
    let off = out.len() - shape.len();
    (0..out.len())
        .map(|i| {
            if i < off || shape[i - off] == 1 {
                0
            } else {
                own[i - off]
            }
        })
        .collect()
}

/// Calls `f(out_index, [operand offsets])` for every element of `out`, in row-major order.
fn for_each_broadcast<const N: usize>(out: &[usize], strides: [&[usize]; N], mut f: impl FnMut(usize, [usize; N])) {
    let total: usize = out.iter().product();
    let mut idx = vec![0usize; out.len()];
    let mut offs = [0usize; N];
    for o in 0..total {
        f(o, offs);
        for ax in (0..out.len()).rev() {
            idx[ax] += 1;
            for k in 0..N {
                offs[k] += strides[k][ax];
            }
            if idx[ax] < out[ax] {
                break;
            }
            for k in 0..N {
                offs[k] -= strides[k][ax] * out[ax];
            }
            idx[ax] = 0;
        }
    }
}

/// A fused op: its body node by node, on the operands' concrete types.
fn fused(f: &kiln_ir::Fused, args: &[&Value], b: &Bindings) -> Result<Value, String> {
    let tys: Vec<TensorType> = args
        .iter()
        .map(|v| {
            TensorType::new(
                v.dtype,
                v.shape.iter().map(|d| kiln_ir::Dim::known(*d as u64)).collect(),
            )
        })
        .collect();
    let body_tys = f.types(&tys.iter().collect::<Vec<_>>()).map_err(|e| e.0)?;
    let mut vals: Vec<Value> = Vec::with_capacity(f.body.len());
    for (n, ty) in f.body.iter().zip(&body_tys) {
        let operands: Vec<&Value> = n
            .args
            .iter()
            .map(|a| match *a {
                kiln_ir::fused::Arg::Operand(o) => args[o as usize],
                kiln_ir::fused::Arg::Node(j) => &vals[j as usize],
            })
            .collect();
        let v = eval(&n.op, ty, &operands, b)?;
        vals.push(v);
    }
    Ok(vals.pop().expect("types checks the body is not empty"))
}

fn concrete(ty: &TensorType, b: &Bindings) -> Result<Vec<usize>, String> {
    ty.shape
        .iter()
        .map(|d| d.eval(b).map_err(|s| format!("symbol `{s}` is not bound")))
        .collect()
}

fn unary(u: UnaryOp, x: f64) -> f64 {
    match u {
        UnaryOp::Neg => -x,
        UnaryOp::Abs => x.abs(),
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Rsqrt => 1.0 / x.sqrt(),
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Erf => libm::erf(x),
        UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        UnaryOp::Relu => x.max(0.0),
        UnaryOp::Recip => 1.0 / x,
        UnaryOp::Sin => x.sin(),
        UnaryOp::Cos => x.cos(),
        UnaryOp::Not => (x == 0.0) as u8 as f64,
    }
}

fn binary(op: BinaryOp, int: bool, a: f64, b: f64) -> Result<f64, String> {
    Ok(match op {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div if int => {
            if b == 0.0 {
                return Err("integer division by zero".into());
            }
            (a / b).trunc()
        }
        BinaryOp::Div => a / b,
        BinaryOp::Max => a.max(b),
        BinaryOp::Min => a.min(b),
        BinaryOp::Pow => a.powf(b),
    })
}

fn compare(op: CmpOp, a: f64, b: f64) -> f64 {
    (match op {
        CmpOp::Eq => a == b,
        CmpOp::Ne => a != b,
        CmpOp::Lt => a < b,
        CmpOp::Le => a <= b,
        CmpOp::Gt => a > b,
        CmpOp::Ge => a >= b,
    }) as u8 as f64
}

/// Evaluates `op` (not an input or param) producing a value of type `ty`.
pub fn eval(op: &Op, ty: &TensorType, args: &[&Value], b: &Bindings) -> Result<Value, String> {
    let out_shape = concrete(ty, b)?;
    let n: usize = out_shape.iter().product();
    let dt = ty.dtype;
    let data = match op {
        Op::Input { .. } | Op::Param { .. } => unreachable!("inputs and params are bound by the caller"),
        Op::Scalar { value, .. } => vec![value.as_f64()],
        Op::Iota { .. } => (0..n).map(|i| i as f64).collect(),
        Op::Unary(u) => args[0].data.iter().map(|x| unary(*u, *x)).collect(),
        Op::Cast { .. } => args[0].data.clone(),
        Op::CacheAppend { .. } => return Err("cache_append runs only with a cache (`run_with_cache`)".into()),
        Op::Fused(f) => return fused(f, args, b),
        Op::Moe {
            top_k,
            gating,
            renormalize,
            act,
            ..
        } => crate::moe::moe(args, *top_k as usize, *gating, *renormalize, *act),
        Op::Dequantize { bits, group } => dequantize(*bits, *group as usize, &out_shape, args),
        Op::Densify24 { n, k, .. } => unpack24(*n as usize, *k as usize, args)?,
        Op::Densify { n, k, block, .. } => {
            densify(*n as usize, *k as usize, [block[0] as usize, block[1] as usize], args)?
        }
        Op::Binary(bop) => {
            let (x, y) = (args[0], args[1]);
            let sx = broadcast_strides(&x.shape, &out_shape);
            let sy = broadcast_strides(&y.shape, &out_shape);
            let int = !dt.is_float();
            let mut out = vec![0.0; n];
            let mut fail = None;
            for_each_broadcast(&out_shape, [&sx, &sy], |o, [i, j]| {
                match binary(*bop, int, x.data[i], y.data[j]) {
                    Ok(v) => out[o] = v,
                    Err(e) => fail = Some(e),
                }
            });
            if let Some(e) = fail {
                return Err(e);
            }
            out
        }
        Op::Compare(c) => {
            let (x, y) = (args[0], args[1]);
            let sx = broadcast_strides(&x.shape, &out_shape);
            let sy = broadcast_strides(&y.shape, &out_shape);
            let mut out = vec![0.0; n];
            for_each_broadcast(&out_shape, [&sx, &sy], |o, [i, j]| {
                out[o] = compare(*c, x.data[i], y.data[j])
            });
            out
        }
        Op::Where => {
            let (c, x, y) = (args[0], args[1], args[2]);
            let sc = broadcast_strides(&c.shape, &out_shape);
            let sx = broadcast_strides(&x.shape, &out_shape);
            let sy = broadcast_strides(&y.shape, &out_shape);
            let mut out = vec![0.0; n];
            for_each_broadcast(&out_shape, [&sc, &sx, &sy], |o, [k, i, j]| {
                out[o] = if c.data[k] != 0.0 { x.data[i] } else { y.data[j] }
            });
            out
        }
        Op::Broadcast { .. } => {
            let x = args[0];
            let sx = broadcast_strides(&x.shape, &out_shape);
            let mut out = vec![0.0; n];
            for_each_broadcast(&out_shape, [&sx], |o, [i]| out[o] = x.data[i]);
            out
        }
        Op::Reshape { .. } => args[0].data.clone(),
        Op::Transpose { perm } => {
            let x = args[0];
            let sx = strides(&x.shape);
            let src: Vec<usize> = perm.iter().map(|&p| sx[p]).collect();
            let mut out = vec![0.0; n];
            for_each_broadcast(&out_shape, [&src], |o, [i]| out[o] = x.data[i]);
            out
        }
        Op::MatMul {
            transpose_a,
            transpose_b,
        } => matmul(args[0], args[1], *transpose_a, *transpose_b, &out_shape),
        Op::Reduce { op, axes, .. } => reduce(args[0], *op, axes),
        Op::Slice { axis, start, end } => {
            let x = args[0];
            let outer: usize = x.shape[..*axis].iter().product();
            let inner: usize = x.shape[axis + 1..].iter().product();
            let len = x.shape[*axis];
            let mut out = Vec::with_capacity(n);
            for o in 0..outer {
                let base = o * len * inner;
                out.extend_from_slice(&x.data[base + *start as usize * inner..base + *end as usize * inner]);
            }
            out
        }
        Op::Concat { axis } => {
            let outer: usize = out_shape[..*axis].iter().product();
            let mut out = Vec::with_capacity(n);
            for o in 0..outer {
                for x in args {
                    let chunk: usize = x.shape[*axis..].iter().product();
                    out.extend_from_slice(&x.data[o * chunk..(o + 1) * chunk]);
                }
            }
            out
        }
        Op::Gather { axis } => {
            let (t, idx) = (args[0], args[1]);
            let outer: usize = t.shape[..*axis].iter().product();
            let rows = t.shape[*axis];
            let inner: usize = t.shape[axis + 1..].iter().product();
            let mut out = Vec::with_capacity(n);
            for o in 0..outer {
                for (k, &i) in idx.data.iter().enumerate() {
                    if i < 0.0 || i as usize >= rows {
                        return Err(format!("index {i} at position {k} is out of range for {rows} rows"));
                    }
                    let base = (o * rows + i as usize) * inner;
                    out.extend_from_slice(&t.data[base..base + inner]);
                }
            }
            out
        }
    };
    debug_assert_eq!(data.len(), n, "{}", op.mnemonic());
    if let Op::Cast { to } = op {
        if *to == DType::Bool {
            return Ok(Value::rounded(dt, out_shape, data));
        }
        // Float to integer casts truncate toward zero, like C and PyTorch.
        return Ok(Value::rounded(
            dt,
            out_shape,
            data.into_iter()
                .map(|x| if to.is_float() { x } else { x.trunc() })
                .collect(),
        ));
    }
    let mut v = Value {
        dtype: dt,
        shape: out_shape,
        data,
    };
    if dt != DType::Bool {
        for x in &mut v.data {
            *x = round_to(dt, *x);
        }
    }
    Ok(v)
}

fn matmul(a: &Value, b: &Value, ta: bool, tb: bool, out_shape: &[usize]) -> Vec<f64> {
    let (ra, rb, ro) = (a.shape.len(), b.shape.len(), out_shape.len());
    let (m, n) = (out_shape[ro - 2], out_shape[ro - 1]);
    let k = if ta { a.shape[ra - 2] } else { a.shape[ra - 1] };
    let batch_out = &out_shape[..ro - 2];
    let sa = broadcast_strides(&a.shape[..ra - 2], batch_out);
    let sb = broadcast_strides(&b.shape[..rb - 2], batch_out);
    let (mat_a, mat_b) = (a.shape[ra - 2] * a.shape[ra - 1], b.shape[rb - 2] * b.shape[rb - 1]);
    // Element strides of a(i, kk) and b(kk, j) inside one matrix.
    let (a_i, a_k) = if ta { (1, m) } else { (k, 1) };
    let (b_k, b_j) = if tb { (1, k) } else { (n, 1) };
    let mut out = vec![0.0; out_shape.iter().product()];
    let mut acc = vec![0.0f64; n];
    let mut o = 0;
    for_each_broadcast(batch_out, [&sa, &sb], |_, [ia, ib]| {
        let (ba, bb) = (ia * mat_a, ib * mat_b);
        for i in 0..m {
            acc.iter_mut().for_each(|x| *x = 0.0);
            for kk in 0..k {
                let av = a.data[ba + i * a_i + kk * a_k];
                let row = bb + kk * b_k;
                if b_j == 1 {
                    for (x, bv) in acc.iter_mut().zip(&b.data[row..row + n]) {
                        *x += av * bv;
                    }
                } else {
                    for (j, x) in acc.iter_mut().enumerate() {
                        *x += av * b.data[row + j * b_j];
                    }
                }
            }
            out[o..o + n].copy_from_slice(&acc);
            o += n;
        }
    });
    out
}

fn reduce(x: &Value, op: ReduceOp, axes: &[usize]) -> Vec<f64> {
    // Map each input element to its output slot by zeroing the reduced axes' strides.
    let kept: Vec<usize> = x
        .shape
        .iter()
        .enumerate()
        .map(|(i, &d)| if axes.contains(&i) { 1 } else { d })
        .collect();
    let ks = strides(&kept);
    let to_out: Vec<usize> = (0..x.shape.len())
        .map(|i| if axes.contains(&i) { 0 } else { ks[i] })
        .collect();
    let n_out: usize = kept.iter().product();
    let count: usize = axes.iter().map(|&a| x.shape[a]).product();
    let init = match op {
        ReduceOp::Sum | ReduceOp::Mean => 0.0,
        ReduceOp::Max => f64::NEG_INFINITY,
        ReduceOp::Min => f64::INFINITY,
    };
    let mut out = vec![init; n_out];
    for_each_broadcast(&x.shape, [&to_out], |i, [o]| {
        let v = x.data[i];
        out[o] = match op {
            ReduceOp::Sum | ReduceOp::Mean => out[o] + v,
            ReduceOp::Max => out[o].max(v),
            ReduceOp::Min => out[o].min(v),
        };
    });
    if op == ReduceOp::Mean {
        out.iter_mut().for_each(|v| *v /= count as f64);
    }
    out
}

/// `w[r, c]` from quantized codes (see [`Op::Dequantize`]).
fn dequantize(bits: u8, group: usize, shape: &[usize], args: &[&Value]) -> Vec<f64> {
    let (n, k) = (shape[0], shape[1]);
    let groups = k / group;
    let mut out = Vec::with_capacity(n * k);
    for r in 0..n {
        for c in 0..k {
            let g = r * groups + c / group;
            let s = args[1].data[g];
            out.push(match bits {
                8 => args[0].data[r * k + c] * s,
                _ => {
                    let (block, i) = (c / 32, c % 32);
                    let byte = args[0].data[r * (k / 2) + block * 16 + i % 16] as u32;
                    let code = if i < 16 { byte & 15 } else { byte >> 4 };
                    code as f64 * s + args[2].data[g]
                }
            });
        }
    }
    out
}

/// The dense matrix of a packed 2:4 weight (see [`Op::Densify24`]), checking the offsets.
fn unpack24(n: usize, k: usize, args: &[&Value]) -> Result<Vec<f64>, String> {
    let (vals, idx) = (&args[0].data, &args[1].data);
    let mut out = vec![0.0; n * k];
    for r in 0..n {
        for g in 0..k / 4 {
            let b = idx[r * (k / 4) + g] as usize;
            let (i0, i1) = (b & 3, (b >> 2) & 3);
            if b > 15 || i0 >= i1 {
                return Err(format!("densify_2_4: row {r} group {g} has offsets byte {b}"));
            }
            out[r * k + 4 * g + i0] = vals[r * (k / 2) + 2 * g];
            out[r * k + 4 * g + i1] = vals[r * (k / 2) + 2 * g + 1];
        }
    }
    Ok(out)
}

/// The dense matrix of a block-CSR weight (see [`Op::Densify`]), checking the indices.
fn densify(n: usize, k: usize, [br, bc]: [usize; 2], args: &[&Value]) -> Result<Vec<f64>, String> {
    let (rp, cols, vals) = (&args[0].data, &args[1].data, &args[2].data);
    let mut out = vec![0.0; n * k];
    let per = br * bc;
    for r in 0..n / br {
        let (a, b) = (rp[r], rp[r + 1]);
        if a < 0.0 || b < a || b as usize > cols.len() || (b as usize) * per > vals.len() {
            return Err(format!(
                "densify: block row {r} spans {a}..{b} of {} blocks",
                cols.len()
            ));
        }
        for p in a as usize..b as usize {
            let c = cols[p];
            if c < 0.0 || (c as usize + 1) * bc > k {
                return Err(format!("densify: block column {c} out of range 0..{}", k / bc));
            }
            for j in 0..bc {
                for i in 0..br {
                    out[(r * br + i) * k + c as usize * bc + j] = vals[p * per + j * br + i];
                }
            }
        }
    }
    Ok(out)
}
