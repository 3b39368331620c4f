#!/usr/bin/env python3
"""Runs kiln's generated GPU kernels without a GPU: an interpreter for the MLIR subset that
`kiln_cuda::emit` writes (arith, math, scf, memref on workgroup buffers and dynamic shared memory,
llvm pointers, gpu ids, barriers and shuffles, cp.async, ldmatrix, nvvm.mma.sync, and Hopper's
asynchronous wgmma with its commit/wait groups and async-proxy fences), with every thread of a block
a coroutine that pauses at barriers and warp-collective operations.

    python3 emulate.py MODULE.mlir [KERNEL...]   # checks the fixed kernels (GEMMs, copy, gather)
    python3 emulate.py MODULE.mlir --launches JOBS.json   # runs launches, prints their outputs
    python3 emulate.py MODULE.mlir --serve   # a device for kiln_runtime::cuda::CudaModel::emulated

Serving, it reads one command per line and answers each with one line, `ok [VALUE]` or `err MESSAGE`:
`alloc LEN` (-> the buffer's address, `id << 32`), `free ADDR`, `write ADDR HEX`, `read ADDR LEN`
(-> hex), `zero ADDR LEN`, `launch KERNEL GX GY GZ BX BY BZ SMEM ARG...` (SMEM: bytes of dynamic
shared memory; each argument a 64-bit parameter slot as the driver gets it: an address, an
integer, or an f32's bits in the low half).
Every load and store is bounds-checked against the buffer its pointer came from.

The GEMM checks launch each kernel the way `kiln_runtime::cuda` does (grid, block size, parameter
order) on small products with partial tiles, batches, both operand layouts, int8 and int4 weights,
scale, bias and accumulator, and compare with a float64 reference (operands rounded to bf16 first
for the tensor-core kernels). `mma.sync.m16n8k16.row.col` is emulated from the PTX ISA's fragment
layouts: lane l holds A rows l/4 and l/4+8 at columns 2(l%4)+{0,1} (+8), B column l/4 at rows
2(l%4)+{0,1} (+8), and C rows l/4 and l/4+8 at columns 2(l%4)+{0,1}; the lower-indexed element of
a packed pair sits in the low half of the register.
"""
import math
import random
import re
import struct
import sys

SIZES = {"i1": 1, "i8": 1, "i16": 2, "i32": 4, "i64": 8, "f16": 2, "bf16": 2, "f32": 4, "index": 8}
PACK = {"i8": "<b", "i16": "<h", "i32": "<i", "i64": "<q", "f16": "<e", "f32": "<f"}


def f32(x):
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def safe(f):
    """IEEE results where Python's math raises: NaN outside the domain, ±inf on overflow."""
    def g(*a):
        try:
            return f(*a)
        except OverflowError:
            return math.inf
        except (ValueError, ZeroDivisionError):
            if f is math.log and a[0] == 0:
                return -math.inf
            if f is _rsqrt and a[0] == 0:
                return math.copysign(math.inf, a[0])
            return math.nan
    return g


def _rsqrt(a):
    return 1 / math.sqrt(a)


def bf16(x):
    """float -> nearest-even bf16 value, as a float."""
    b = struct.unpack("<I", struct.pack("<f", x))[0]
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return struct.unpack("<f", struct.pack("<I", b))[0]


def wrap(v, ty):
    bits = SIZES[ty] * 8 if ty != "i1" else 1
    if ty == "index":
        bits = 64
    v &= (1 << bits) - 1
    return v - (1 << bits) if v >> (bits - 1) else v


def unsigned(v, ty):
    bits = 64 if ty == "index" else (1 if ty == "i1" else SIZES[ty] * 8)
    return v & ((1 << bits) - 1)


class Ptr:
    __slots__ = ("buf", "off")

    def __init__(self, buf, off=0):
        self.buf, self.off = buf, off


# ---------------------------------------------------------------- parsing

def parse_module(text):
    """gpu.func name -> (params [(name, type)], workgroup [(name, type)], body)."""
    funcs = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"\s*gpu\.func @(\w+)\((.*?)\)(?: workgroup\((.*?)\))? kernel(?: attributes \{.*\})? \{", lines[i])
        if not m:
            i += 1
            continue
        params = [tuple(p.strip().lstrip("%").split(": ")) for p in m.group(2).split(", ") if p]
        wg = []
        if m.group(3):
            for w in m.group(3).split(", %"):
                name, ty = w.strip().lstrip("%").split(" : ", 1)
                wg.append((name, ty))
        body, i = parse_block(lines, i + 1)
        funcs[m.group(1)] = (params, wg, body)
    return funcs


def parse_block(lines, i):
    ops = []
    while i < len(lines):
        s = lines[i].strip()
        if s == "}" or s.startswith("} else {"):
            return ops, i
        i += 1
        m = re.match(r"(%[\w]+)(?::(\d+))? = scf\.for (%\w+) = (%\w+) to (%\w+) step (%\w+) iter_args\((.*?)\) -> \(.*\) : i64 \{", s)
        if m:
            inits = [a.split(" = ") for a in m.group(7).split(", ")]
            body, i = parse_block(lines, i)
            ops.append(("for", m.group(1), m.group(3), m.group(4), m.group(5), m.group(6), inits, body))
            i += 1
            continue
        m = re.match(r"scf\.for (%\w+) = (%\w+) to (%\w+) step (%\w+) : i64 \{", s)
        if m:
            body, i = parse_block(lines, i)
            ops.append(("for", None, m.group(1), m.group(2), m.group(3), m.group(4), [], body))
            i += 1
            continue
        m = re.match(r"(?:(%\w+) = )?scf\.if (%\w+)(?: -> \(.*\))? \{", s)
        if m:
            then, i = parse_block(lines, i)
            other = []
            if lines[i].strip().startswith("} else {"):
                other, i = parse_block(lines, i + 1)
            i += 1
            ops.append(("if", m.group(1), m.group(2), then, other))
            continue
        ops.append(("op", s))
    return ops, i


# ---------------------------------------------------------------- execution

# Each gpu.func is translated once into a Python generator function (SSA values become locals,
# scf loops and ifs Python loops and ifs) that runs one thread and yields at barriers and
# warp-collective operations; `launch` steps a block's threads in lockstep between those.

M = {t: (1 << b) - 1 for t, b in (("i1", 1), ("i8", 8), ("i16", 16), ("i32", 32), ("i64", 64), ("index", 64))}
STRUCTS = {ty: struct.Struct(f) for ty, f in PACK.items()}


class Fault(Exception):
    """An out-of-bounds or dangling memory access."""


def ld(mem, p, ty):
    buf = mem.get(p.buf)
    if buf is None:
        raise Fault(f"{ty} load through a pointer to buffer {p.buf}, which is not allocated")
    if p.off < 0 or p.off + SIZES[ty] > len(buf):
        raise Fault(f"{ty} load at byte {p.off} of buffer {p.buf}, which has {len(buf)} bytes")
    return STRUCTS[ty].unpack_from(buf, p.off)[0]


def st(mem, p, ty, v):
    buf = mem.get(p.buf)
    if buf is None:
        raise Fault(f"{ty} store through a pointer to buffer {p.buf}, which is not allocated")
    if p.off < 0 or p.off + SIZES[ty] > len(buf):
        raise Fault(f"{ty} store at byte {p.off} of buffer {p.buf}, which has {len(buf)} bytes")
    STRUCTS[ty].pack_into(buf, p.off, v)


def divf(a, b):
    if b:
        return f32(a / b)
    if a != a or not a:
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


def fmax(a, b):
    return math.nan if a != a or b != b else max(a, b)


def fmin(a, b):
    return math.nan if a != a or b != b else min(a, b)


def fexp(a):
    return math.exp(a) if a < 88.8 else (a if a != a else math.inf)


def trunc_div(a, b):
    q = abs(a) // abs(b)
    return q if (a < 0) == (b < 0) else -q


def bitcast(v, src, dst):
    if src == "bf16":
        return struct.unpack("<I", struct.pack("<f", v))[0] >> 16
    if src == "f32":
        return wrap(struct.unpack("<I", struct.pack("<f", v))[0], dst)
    if dst == "f32":
        return struct.unpack("<f", struct.pack("<I", unsigned(v, src)))[0]
    if dst == "f16":
        return struct.unpack("<e", struct.pack("<H", unsigned(v, src)))[0]
    raise SyntaxError(f"bitcast {src} to {dst}")


def f16(v):
    return struct.unpack("<e", struct.pack("<e", v))[0]


MATH = {"sqrt": "safe(math.sqrt)", "rsqrt": "safe(_rsqrt)", "tanh": "math.tanh", "erf": "math.erf",
        "log": "safe(math.log)", "exp": "fexp", "sin": "safe(math.sin)", "cos": "safe(math.cos)"}
CMPI = {"eq": "==", "ne": "!=", "slt": "<", "sle": "<=", "sgt": ">", "sge": ">=",
        "ult": "<", "ule": "<=", "ugt": ">", "uge": ">="}
CMPF = {"oeq": "{a} == {b}", "ogt": "{a} > {b}", "olt": "{a} < {b}", "oge": "{a} >= {b}", "ole": "{a} <= {b}",
        "one": "({a} != {b} and {a} == {a} and {b} == {b})", "une": "not ({a} == {b})"}


def py(name):
    """An SSA name as a Python identifier (`%r#1` -> `v_r_1`)."""
    return "v_" + name.lstrip("%").replace("#", "_")


def wrapped(expr, ty):
    if ty == "i1":
        return f"bool(({expr}) & 1)"
    bits = 64 if ty == "index" else SIZES[ty] * 8
    half = 1 << (bits - 1)
    return f"((({expr}) + {half}) & {(1 << bits) - 1}) - {half}"


def const(v, ty):
    if v in ("true", "false"):
        return "True" if v == "true" else "False"
    if ty in ("f32", "f16", "bf16"):
        x = struct.unpack("<f", struct.pack("<I", int(v, 16)))[0] if v.startswith("0x") else float(v)
        return repr(x) if math.isfinite(x) else f"float('{x}')"
    return str(int(v))


def expr_of(op, rest):
    """The Python expression an MLIR operation computes (no side effects, no collectives)."""
    if op == "arith.constant":
        v, ty = rest.rsplit(" : ", 1) if " : " in rest else (rest, "i1")
        return const(v, ty)
    if op.startswith("gpu."):
        return f"{op[4:]}[{'xyz'.index(rest.strip())}]"
    if op in ("arith.cmpi", "arith.cmpf"):
        pred, a, b = re.match(r"(\w+), (%[\w#]+), (%[\w#]+) :", rest).groups()
        ty = rest.rsplit(" : ", 1)[1]
        a, b = py(a), py(b)
        if op == "arith.cmpf":
            return "(" + CMPF[pred].format(a=a, b=b) + ")"
        if pred.startswith("u"):
            a, b = f"({a} & {M[ty]})", f"({b} & {M[ty]})"
        return f"({a} {CMPI[pred]} {b})"
    if op == "arith.select":
        c, a, b = re.match(r"(%[\w#]+), (%[\w#]+), (%[\w#]+) :", rest).groups()
        return f"({py(a)} if {py(c)} else {py(b)})"
    if op in ("arith.index_cast", "arith.extui", "arith.extsi", "arith.truncf", "arith.bitcast",
              "arith.sitofp", "arith.uitofp", "arith.extf", "arith.trunci"):
        a, src, dst = re.match(r"(%[\w#]+) : (\w+) to (\w+)", rest).groups()
        a = py(a)
        return {
            "arith.extui": f"({a} & {M.get(src, 0)})" if src != "i1" else f"int({a})",
            "arith.extsi": f"(-1 if {a} else 0)" if src == "i1" else a,
            "arith.uitofp": f"f32(float({a} & {M.get(src, 0)}))",
            "arith.sitofp": f"f32(float({a}))",
            "arith.truncf": f"bf16({a})" if dst == "bf16" else f"f16({a})",
            "arith.bitcast": f"bitcast({a}, '{src}', '{dst}')",
            "arith.trunci": wrapped(a, dst),
            "arith.index_cast": wrapped(a, dst) if dst not in ("index", "i64") else a,
            "arith.extf": a,
        }[op]
    if op.startswith("arith.") or op.startswith("math."):
        args = [py(x) for x in re.findall(r"%[\w#]+", rest.split(" : ")[0])]
        ty = rest.rsplit(" : ", 1)[1]
        name = op.split(".")[1]
        if name in ("andi", "ori", "xori") and ty == "i1":
            a, b = args
            return {"andi": f"({a} and {b})", "ori": f"({a} or {b})", "xori": f"({a} != {b})"}[name]
        if name in ("addi", "subi", "muli", "andi", "ori", "xori", "shli"):
            sym = {"addi": "+", "subi": "-", "muli": "*", "andi": "&", "ori": "|", "xori": "^", "shli": "<<"}[name]
            e = f"{args[0]} {sym} {args[1]}"
            return f"({e})" if name in ("andi", "ori", "xori") else wrapped(e, ty)
        if name in ("divui", "remui", "shrui"):
            a, b = f"({args[0]} & {M[ty]})", f"({args[1]} & {M[ty]})"
            return wrapped(f"{a} {'//' if name == 'divui' else '%' if name == 'remui' else '>>'} {b}", ty)
        if name == "divsi":
            return wrapped(f"trunc_div({args[0]}, {args[1]})", ty)
        if name == "remsi":
            return wrapped(f"{args[0]} - {args[1]} * trunc_div({args[0]}, {args[1]})", ty)
        if name in ("addf", "subf", "mulf"):
            return f"f32({args[0]} {dict(addf='+', subf='-', mulf='*')[name]} {args[1]})"
        if name == "fma":
            return f"f32({args[0]} * {args[1]} + {args[2]})"
        if name == "divf":
            return f"divf({args[0]}, {args[1]})"
        if name in ("maximumf", "minimumf"):
            return f"{'fmax' if name == 'maximumf' else 'fmin'}({args[0]}, {args[1]})"
        if name == "negf":
            return f"(-{args[0]})"
        if name == "absf":
            return f"abs({args[0]})"
        return f"f32({MATH[name]}({args[0]}))"
    if op == "llvm.getelementptr":
        base, idx, elem = re.match(r"(%\w+)\[(%[\w#]+)\] : \(!llvm\.ptr, i64\) -> !llvm\.ptr, (\w+)", rest).groups()
        return f"Ptr({py(base)}.buf, {py(base)}.off + {py(idx)} * {SIZES[elem]})"
    if op == "llvm.load":
        p, ty = re.match(r"(%\w+) : !llvm\.ptr -> (\w+)", rest).groups()
        return f"ld(mem, {py(p)}, '{ty}')"
    if op == "memref.load":
        buf, idx = re.match(r"(%\w+)\[(%[\w#]+)\]", rest).groups()
        return f"shld({py(buf)}, {py(idx)}, _me, _ep)"
    if op == "llvm.mlir.zero":
        return f"({', '.join(['0.0'] * rest.count('f32'))},)"
    if op == "memref.extract_aligned_pointer_as_index":
        return f"_shbase[{py(rest.split(' : ')[0].strip())!r}]"
    if op == "llvm.mlir.addressof":
        # The dynamic shared memory symbol: its raw shared address.
        return "env['__dyn'].base"
    if op in ("llvm.inttoptr", "llvm.addrspacecast", "llvm.ptrtoint"):
        return py(re.match(r"(%[\w#]+)", rest).group(1))
    if op == "llvm.extractvalue":
        v, k = re.match(r"(%[\w#]+)\[(\d+)\]", rest).groups()
        return f"{py(v)}[{k}]"
    raise SyntaxError(f"cannot run: {op} {rest}")


def emit_block(block, out, ind, targets):
    """Python lines for `block`; `targets` names what an `scf.yield` in it assigns."""
    pad = "    " * ind
    for op in block:
        kind = op[0]
        if kind == "for":
            _, res, iv, lb, ub, st_, inits, body = op
            carried = [py(name) for name, _ in inits]
            for (name, v) in inits:
                out.append(f"{pad}{py(name)} = {py(v)}")
            out.append(f"{pad}{py(iv)} = {py(lb)}")
            out.append(f"{pad}while {py(iv)} < {py(ub)}:")
            emit_block(body, out, ind + 1, carried)
            out.append(f"{pad}    {py(iv)} += {py(st_)}")
            if res:
                if len(carried) == 1:
                    out.append(f"{pad}{py(res)} = {carried[0]}")
                for j, c in enumerate(carried):
                    out.append(f"{pad}{py(res)}_{j} = {c}")
            continue
        if kind == "if":
            _, res, c, then, other = op
            t = [py(res)] if res else []
            out.append(f"{pad}if {py(c)}:")
            out.append(f"{pad}    pass")
            emit_block(then, out, ind + 1, t)
            if other:
                out.append(f"{pad}else:")
                out.append(f"{pad}    pass")
                emit_block(other, out, ind + 1, t)
            continue
        s = op[1]
        if s == "gpu.return":
            out.append(f"{pad}return")
        elif s == "gpu.barrier":
            out.append(f"{pad}yield BARRIER")
        elif s.startswith("scf.yield"):
            vals = [py(v) for v in s[len("scf.yield "):].split(" : ")[0].split(", ")]
            out.append(f"{pad}{', '.join(targets)} = {', '.join(vals)}")
        elif s.startswith("llvm.store"):
            m = re.match(r"llvm\.store (%[\w#]+), (%\w+) : (\w+), !llvm\.ptr", s)
            out.append(f"{pad}st(mem, {py(m.group(2))}, '{m.group(3)}', {py(m.group(1))})")
        elif s.startswith("memref.store"):
            m = re.match(r"memref\.store (%[\w#]+), (%\w+)\[(%[\w#]+)\] : ", s)
            out.append(f"{pad}shst({py(m.group(2))}, {py(m.group(3))}, {py(m.group(1))}, _me, _ep)")
        elif s.startswith("nvvm.cp.async.shared.global"):
            m = re.match(r"nvvm\.cp\.async\.shared\.global (%\w+), (%\w+), (\d+), cache = \w+(?:, (%\w+))? :", s)
            size = py(m.group(4)) if m.group(4) else m.group(3)
            out.append(f"{pad}cp_issue(_cp, mem, _sh, {py(m.group(1))}, {py(m.group(2))}, {m.group(3)}, {size}, _me, _ep)")
        elif s.startswith("nvvm.fence.proxy"):
            assert "async.shared" in s, s
            out.append(f"{pad}proxy_fence(_pf)")
        elif s == "nvvm.wgmma.fence.aligned":
            pass
        elif s == "nvvm.wgmma.commit.group.sync.aligned":
            out.append(f"{pad}yield ('wgcommit',)")
        elif m := re.match(r"nvvm\.wgmma\.wait\.group\.sync\.aligned (\d+)$", s):
            out.append(f"{pad}yield ('wgwait', {m.group(1)})")
        elif s == "nvvm.cp.async.commit.group":
            out.append(f"{pad}_cp.append([])")
        elif m := re.match(r"nvvm\.cp\.async\.wait\.group (\d+)$", s):
            out.append(f"{pad}cp_wait(_cp, mem, _sh, {m.group(1)}, _me, _ep, _pf)")
        elif m := re.match(r"(%\w+), (%\w+) = gpu\.shuffle (xor|idx) (%[\w#]+), (%\w+), (%\w+) : f32", s):
            out.append(f"{pad}{py(m.group(1))} = yield ('{m.group(3)}', {py(m.group(4))}, {py(m.group(5))})")
            out.append(f"{pad}{py(m.group(2))} = True")
        else:
            m = re.match(r"(%\w+) = ([\w.]+) ?(.*)$", s)
            if not m:
                raise SyntaxError(f"cannot run: {s}")
            res, opname, rest = m.groups()
            if opname == "nvvm.wgmma.mma_async":
                mm = re.match(r"(%[\w#]+), (%[\w#]+), (%[\w#]+), #nvvm\.shape<m = 64, n = (\d+), k = 16>, "
                              r"D \[<f32>, #nvvm\.wgmma_scale_out<one>\], A \[<bf16>, #nvvm\.wgmma_scale_in<one>, <row>\], "
                              r"B \[<bf16>, #nvvm\.wgmma_scale_in<one>, <col>\]", rest)
                assert mm, rest
                out.append(f"{pad}{py(res)} = yield ('wgmma', {py(mm.group(1))}, {py(mm.group(2))}, {py(mm.group(3))}, {mm.group(4)})")
            elif opname == "nvvm.ldmatrix":
                mm = re.match(r"(%\w+) \{num = (\d) : i32, layout = #nvvm\.mma_layout<(row|col)>", rest)
                assert mm and "m = 8, n = 8" in rest and "<b16>" in rest, rest
                out.append(f"{pad}{py(res)} = yield ('ldm', {py(mm.group(1))}, {mm.group(2)}, {mm.group(3) == 'col'})")
            elif opname == "nvvm.mma.sync":
                mm = re.match(r"A\[(.*?)\] B\[(.*?)\] C\[(.*?)\]", rest)
                assert "mma_type<bf16>" in rest and "m = 16, n = 8, k = 16" in rest, rest
                a, b, c = ("[" + ", ".join(py(x) for x in grp.split(", ")) + "]" for grp in mm.groups())
                out.append(f"{pad}{py(res)} = yield ('mma', {a}, {b}, {c})")
            else:
                out.append(f"{pad}{py(res)} = {expr_of(opname, rest)}")


BARRIER = ("barrier",)


def compile_func(name, func):
    """The Python generator function running one thread of `func`:
    f(thread_id, block_id, block_dim, grid_dim, env, mem)."""
    params, wg, body = func
    lines = [f"def {name}(thread_id, block_id, block_dim, grid_dim, env, mem):"]
    lines.append("    if False:")
    lines.append("        yield None")
    for pname, _ in params:
        lines.append(f"    {py('%' + pname)} = env['%{pname}']")
    for wname, _ in wg:
        lines.append(f"    {py('%' + wname)} = env['%{wname}']")
    # Workgroup buffers as raw shared addresses (cp.async, ldmatrix, wgmma descriptors): one flat
    # shared window, each buffer at `Shared.base`; `_cp` is this thread's cp.async groups, the last
    # one still open.
    lines.append("    _sh = env['__shared']")
    lines.append(f"    _shbase = {{{', '.join(repr(py('%' + w)) + f': _sh[{j}].base' for j, (w, _) in enumerate(wg))}}}")
    lines.append("    _cp = [[]]")
    # Shared words this thread's cp.async copies wrote since its last async-proxy fence.
    lines.append("    _pf = []")
    # Who this thread is, and the block's synchronisation clocks (see `Shared`).
    lines.append("    _me = thread_id[0] + block_dim[0] * (thread_id[1] + block_dim[1] * thread_id[2])")
    lines.append("    _ep = env['__clock']")
    lines.append("    v_c0_idx = 0")
    emit_block(body, lines, 1, [])
    scope = dict(globals())
    exec(compile("\n".join(lines), f"<gpu.func @{name}>", "exec"), scope)
    return scope[name]


class Race(Fault):
    """Two threads touch one shared-memory word with no synchronisation in between."""


class Shared(list):
    """A workgroup buffer (32-bit words) that remembers, per word, its last writer and readers with
    the block's clock at the time: `clock[0]` counts barriers; `clock[1 + warp]` counts the warp's
    collective operations (shuffle, ldmatrix, mma), which order accesses of lanes of one warp. An
    access races with an earlier one by another thread when no barrier (or, within a warp, no
    collective) separates them and one of them writes — what compute-sanitizer's racecheck reports.
    `inflight` counts, per word, the issued wgmma products reading it that no wait_group has
    retired yet (writing such a word is a race whatever the barriers); `generic` holds the words
    cp.async wrote that their copying thread has not yet fenced for the async proxy (wgmma may not
    read them)."""

    def __init__(self, n, name):
        super().__init__([0] * n)
        self.name = name
        self.w = {}
        self.r = {}
        self.inflight = {}
        self.generic = {}


def _clock(me, ep):
    return (me, ep[0], ep[1 + me // 32])


def _unordered(a, me, ep):
    """Whether access `a` (thread, barriers, warp clock) is unordered with thread `me` now."""
    if a[0] == me or a[1] != ep[0]:
        return False
    return a[0] // 32 != me // 32 or a[2] == ep[1 + me // 32]


def _bounds(buf, i, what):
    if not 0 <= i < len(buf):
        raise Fault(f"{what} of word {i} of workgroup buffer {buf.name}, which has {len(buf)} words")


def shld(buf, i, me, ep):
    _bounds(buf, i, "load")
    w = buf.w.get(i)
    if w is not None and _unordered(w, me, ep):
        raise Race(f"thread {me} reads word {i} of {buf.name} that thread {w[0]} wrote with no barrier between")
    rs = buf.r.get(i)
    if rs is None or rs[0][1] != ep[0]:
        buf.r[i] = [_clock(me, ep)]
    elif len(rs) < 4:
        rs.append(_clock(me, ep))
    return buf[i]


def shst(buf, i, v, me, ep, what="store"):
    _bounds(buf, i, what)
    if buf.inflight.get(i):
        raise Race(f"thread {me} {what}s word {i} of {buf.name} while a wgmma reading it is in flight")
    w = buf.w.get(i)
    if w is not None and _unordered(w, me, ep):
        raise Race(f"thread {me} {what}s word {i} of {buf.name} that thread {w[0]} wrote with no barrier between")
    for r in buf.r.get(i, ()):
        if _unordered(r, me, ep):
            raise Race(f"thread {me} {what}s word {i} of {buf.name} that thread {r[0]} read with no barrier between")
    buf.w[i] = _clock(me, ep)
    buf[i] = v


STATS = {"ldmatrix": 0, "ldmatrix_conflicts": 0, "wgmma": 0}


def place_shared(bufs):
    """Lays a block's workgroup buffers out in one shared window, each 1024-byte aligned (what a
    `{llvm.align}` up to 1024 asks), like the hardware's static shared memory."""
    at = 0
    for b in bufs:
        at = -(-at // 1024) * 1024
        b.base = at
        at += 4 * len(b)


def shared_at(sh, addr, n, what, align=16):
    """(buffer, word index) of an n-byte access at raw shared address `addr`, bounds-checked."""
    for b in sh:
        if b.base <= addr < b.base + 4 * len(b):
            off = addr - b.base
            if off % align:
                raise Fault(f"{what} at byte {off} of workgroup buffer {b.name}, which is not {align}-byte aligned")
            if off + n > 4 * len(b):
                raise Fault(f"{what} of {n} bytes at byte {off} of workgroup buffer {b.name}, which has {4 * len(b)} bytes")
            return b, off // 4
    raise Fault(f"{what} at shared address {addr:#x}, which is in no workgroup buffer")


def wgmma_operand(sh, desc, rows, me, ep, what, words):
    """The `rows` x 16 bf16 K-major operand a wgmma matrix descriptor names, as floats [row][k]:
    start address, leading and stride byte offsets (/16) in bits 0-13, 16-29, 32-45, base offset
    (bits 49-51, must be 0) and swizzle mode (bits 62-63: 0 none, 1 128-byte, 2 64-byte, 3 32-byte).
    No swizzle: 8 x 16-byte core matrices, `lbo` apart along k and `sbo` apart along rows; a
    swizzle of W bytes: rows W bytes apart in 8-row groups `sbo` apart, and the 16-byte chunk of
    byte address a XOR-ed with its bits 7 and up (`(a >> 7) % (W / 16)`)."""
    desc &= (1 << 64) - 1
    start, lbo, sbo = (desc & 0x3FFF) << 4, ((desc >> 16) & 0x3FFF) << 4, ((desc >> 32) & 0x3FFF) << 4
    mode = desc >> 62
    if (desc >> 49) & 7:
        raise Fault(f"{what}: descriptor {desc:#x} has a base offset, which the emulator does not model")
    width = {1: 128, 2: 64, 3: 32}.get(mode)
    out = []
    for r in range(rows):
        row = []
        for k in range(16):
            if width is None:
                a = start + (r // 8) * sbo + (k // 8) * lbo + (r % 8) * 16 + (k % 8) * 2
            else:
                a = start + (r // 8) * sbo + (r % 8) * width + 2 * k
                a ^= ((a >> 7) % (width // 16)) << 4
            buf, w = shared_at(sh, a - a % 4, 4, what, align=4)
            if w in buf.generic:
                raise Fault(f"{what} reads word {w} of {buf.name}, which thread {buf.generic[w]} copied with "
                            "cp.async and has not fenced for the async proxy (fence.proxy.async)")
            word = shld(buf, w, me, ep)
            words[(id(buf), w)] = buf
            row.append(halves(word)[(a % 4) // 2])
        out.append(row)
    return out


def wgmma_group(events, sh, first, ep, pending):
    """wgmma.mma_async m64nNk16 (bf16 in, f32 accumulators) for one warpgroup: events[i] =
    ("wgmma", desc_a, desc_b, acc, n). Thread i (warp w = i / 32, lane l) holds accumulator 4 j + q
    = D[16 w + l / 4 + 8 (q / 2)][8 j + 2 (l % 4) + q % 2]. The product is computed from shared
    memory as it is now; it stays in flight — its operand words marked, its accumulators
    unreadable — until a wait_group retires it (`pending`: the warpgroup's open group)."""
    _, da, db, _, n = events[0]
    for e in events:
        if e[1] != da or e[2] != db:
            raise Fault("wgmma descriptors differ within a warpgroup")
    STATS["wgmma"] += 1
    words = {}
    A = wgmma_operand(sh, da, 64, first, ep, "wgmma A", words)
    B = wgmma_operand(sh, db, n, first, ep, "wgmma B", words)
    for (_, w), buf in words.items():
        buf.inflight[w] = buf.inflight.get(w, 0) + 1
    out = []
    for i, e in enumerate(events):
        w, l = i // 32, i % 32
        acc = list(e[3])
        for j in range(n // 8):
            for q in range(4):
                r, c = 16 * w + l // 4 + 8 * (q // 2), 8 * j + 2 * (l % 4) + q % 2
                acc[4 * j + q] = f32(acc[4 * j + q] + sum(A[r][k] * B[c][k] for k in range(16)))
        d = InFlight(acc)
        d.done = False
        out.append(d)
    pending.append((words, out))
    return out


def wgmma_retire(groups, n, first, ep):
    """wgmma.wait_group n for one warpgroup (`groups`: its committed groups, oldest first, then the
    open one): retires all but the newest n committed groups. Their operand reads end now, as far
    as the race checks are concerned."""
    while len(groups) - 1 > n:
        for words, outs in groups.pop(0):
            for (_, w), buf in words.items():
                buf.inflight[w] -= 1
                shld(buf, w, first, ep)
            for d in outs:
                d.done = True


def cp_issue(cp, mem, sh, dst, src, size, src_size, me, ep):
    """cp.async: checked now, performed when a wait_group needs it (so a missing wait reads stale data).
    The copy may land any time from now on, so it races with unordered reads of its destination
    now (and with accesses when it lands, checked then)."""
    buf, w = shared_at(sh, dst, size, "cp.async destination")
    for i in range(w, w + size // 4):
        if buf.inflight.get(i):
            raise Race(f"thread {me} copies into word {i} of {buf.name} while a wgmma reading it is in flight")
        for r in buf.r.get(i, ()):
            if _unordered(r, me, ep):
                raise Race(f"thread {me} copies into word {i} of {buf.name} that thread {r[0]} read with no barrier between")
    if not 0 <= src_size <= size:
        raise Fault(f"cp.async of {src_size} source bytes into {size}")
    if src.off % size:
        raise Fault(f"cp.async source at byte {src.off} of buffer {src.buf}, which is not {size}-byte aligned")
    if src_size:
        buf = mem.get(src.buf)
        if buf is None or src.off < 0 or src.off + src_size > len(buf):
            raise Fault(f"cp.async of {src_size} bytes at byte {src.off} of buffer {src.buf}, which has "
                        f"{len(buf) if buf is not None else 0} bytes")
    cp[-1].append((dst, src, size, src_size))


def cp_wait(cp, mem, sh, n, me, ep, pf):
    """cp.async.wait_group n: completes all but the newest n committed groups. The words written
    are the generic proxy's until this thread's next `fence.proxy.async` (`pf`)."""
    while len(cp) - 1 > n:
        for dst, src, size, src_size in cp.pop(0):
            data = bytes(mem[src.buf][src.off:src.off + src_size]) + bytes(size - src_size) if src_size else bytes(size)
            buf, w = shared_at(sh, dst, size, "cp.async destination")
            for j, v in enumerate(struct.unpack(f"<{size // 4}i", data)):
                shst(buf, w + j, v, me, ep, "copie")
                buf.generic[w + j] = me
                pf.append((buf, w + j))


def proxy_fence(pf):
    """fence.proxy.async.shared::cta: this thread's shared-memory writes so far become visible to
    the async proxy (wgmma's operand reads)."""
    for buf, w in pf:
        buf.generic.pop(w, None)
    pf.clear()


class InFlight(tuple):
    """A wgmma's accumulators: they may feed further wgmma products at once, but reading them
    (`llvm.extractvalue`) needs a wait_group that retired the product first."""

    def __getitem__(self, i):
        if not self.done:
            raise Fault("wgmma accumulators read before a wgmma.wait_group retired their product")
        return tuple.__getitem__(self, i)


def ldmatrix_warp(events, sh, lanes, ep):
    """ldmatrix .x1/.x2/.x4 .m8n8 .b16: lane 8j + r addresses row r of matrix j; lane i receives,
    from each matrix j, the 32-bit word (i % 4) of row i / 4 — or with .trans (layout col) the
    elements (row 2 (i % 4), column i / 4) and (row 2 (i % 4) + 1, column i / 4), lower half
    first. Counts the phases whose eight rows share a bank."""
    num, trans = events[0][2], events[0][3]
    rows = [e[1] for e in events]
    for j in range(num):
        STATS["ldmatrix"] += 1
        banks = [((a % 128) // 16) for a in rows[8 * j:8 * j + 8]]
        if len(set(banks)) < 8:
            STATS["ldmatrix_conflicts"] += 1
    for i, a in enumerate(rows[:8 * num]):
        buf, w = shared_at(sh, a, 16, "ldmatrix row")
        for q in range(4):
            shld(buf, w + q, lanes[i], ep)
    out = []
    for i in range(len(events)):
        regs = []
        for j in range(num):
            if trans:
                col = i // 4
                pair = []
                for r in (2 * (i % 4), 2 * (i % 4) + 1):
                    buf, w = shared_at(sh, rows[8 * j + r], 16, "ldmatrix row")
                    pair.append(halves(buf[w + col // 2])[col % 2])
                regs.append(bf16_word(pair[0], pair[1]))
                continue
            buf, w = shared_at(sh, rows[8 * j + i // 4], 16, "ldmatrix row")
            regs.append(buf[w + i % 4])
        out.append(tuple(regs) if num > 1 else regs[0])
    return out


def bf16_word(lo, hi):
    """Two bf16-exact floats packed into one 32-bit word (as a signed int, like the kernels' i32)."""
    bits = lambda x: struct.unpack("<I", struct.pack("<f", x))[0] >> 16
    return wrap(bits(lo) | bits(hi) << 16, "i32")


def halves(word):
    """The two bf16 values of a packed word, low half first."""
    w = word & 0xFFFFFFFF
    lo = struct.unpack("<f", struct.pack("<I", (w & 0xFFFF) << 16))[0]
    hi = struct.unpack("<f", struct.pack("<I", (w >> 16) << 16))[0]
    return lo, hi


def mma_warp(events):
    """m16n8k16 row.col: events[lane] = ("mma", a[4], b[2], c[4]); returns d[lane]."""
    A = [[0.0] * 16 for _ in range(16)]
    B = [[0.0] * 8 for _ in range(16)]  # [k][n]
    C = [[0.0] * 8 for _ in range(16)]
    for lane, (_, a, b, c) in enumerate(events):
        g, t = lane // 4, lane % 4
        for reg, (r, k0) in enumerate(((g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8))):
            A[r][k0], A[r][k0 + 1] = halves(a[reg])
        for reg, k0 in enumerate((2 * t, 2 * t + 8)):
            B[k0][g], B[k0 + 1][g] = halves(b[reg])
        for q, (r, col) in enumerate(((g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1))):
            C[r][col] = c[q]
    out = []
    for lane in range(32):
        g, t = lane // 4, lane % 4
        d = []
        for r, col in ((g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)):
            d.append(f32(C[r][col] + sum(A[r][kk] * B[kk][col] for kk in range(16))))
        out.append(tuple(d))
    return out


COMPILED = {}


def launch(func, grid, block, args, mem, dyn=0):
    """Runs `func` over `grid` x `block` with `dyn` bytes of dynamic shared memory."""
    params, wg, body = func
    run = COMPILED.get(id(func))
    if run is None:
        run = COMPILED[id(func)] = compile_func("kernel", func)
    assert len(args) == len(params), f"{len(args)} arguments for {len(params)} parameters"
    env = {"%" + name: v for (name, _), v in zip(params, args)}
    env["%c0_idx"] = 0
    nthreads = block[0] * block[1] * block[2]
    for bz in range(grid[2]):
        for by in range(grid[1]):
            for bx in range(grid[0]):
                shared = {}
                for name, ty in wg:
                    n = int(re.match(r"memref<(\d+)x", ty).group(1))
                    shared["%" + name] = Shared(n, name)
                benv = dict(env)
                benv.update(shared)
                benv["__shared"] = [shared["%" + name] for name, _ in wg]
                place_shared(benv["__shared"])
                # Dynamic shared memory follows the static buffers; the hardware promises it only
                # 16-byte alignment, so the emulator gives it no more.
                dsm = benv["__dyn"] = Shared(dyn // 4, "dynamic shared memory")
                end = max([b.base + 4 * len(b) for b in benv["__shared"]], default=0)
                dsm.base = -(-end // 1024) * 1024 + 16
                benv["__shared"].append(dsm)
                wgroups = {g: [[]] for g in range(0, nthreads, 128)}
                clock = benv["__clock"] = [0] * (1 + -(-nthreads // 32))
                threads = []
                for t in range(nthreads):
                    tid = (t % block[0], t // block[0] % block[1], t // (block[0] * block[1]))
                    threads.append(run(tid, (bx, by, bz), block, grid, benv, mem))
                pending = [None] * nthreads
                live = list(range(nthreads))
                events = [None] * nthreads
                while live:
                    for t in live:
                        try:
                            events[t] = threads[t].send(pending[t])
                        except StopIteration:
                            events[t] = ("done",)
                        except Fault as e:
                            raise Fault(f"thread {t} of block {(bx, by, bz)}: {e}") from None
                    kinds = {events[t][0] for t in live}
                    if "done" in kinds:
                        assert kinds == {"done"}, f"threads diverged at a collective: {kinds}"
                        if any(ops for groups in wgroups.values() for grp in groups for ops in grp):
                            raise Fault(f"block {(bx, by, bz)} ended with wgmma products no wait_group retired")
                        break
                    assert len(kinds) == 1, f"threads diverged: {kinds}"
                    kind = kinds.pop()
                    if kind == "barrier":
                        clock[0] += 1
                    if kind == "wgmma":
                        if nthreads % 128:
                            raise Fault(f"wgmma in a block of {nthreads} threads (not whole warpgroups)")
                        for g in range(0, nthreads, 128):
                            group = list(range(g, g + 128))
                            ds = wgmma_group([events[t] for t in group], benv["__shared"], g, clock, wgroups[g][-1])
                            for t, d in zip(group, ds):
                                pending[t] = d
                            for w in range(g, g + 128, 32):
                                clock[1 + w // 32] += 1
                        continue
                    if kind in ("wgcommit", "wgwait"):
                        if nthreads % 128:
                            raise Fault(f"wgmma {kind[2:]} in a block of {nthreads} threads (not whole warpgroups)")
                        for g in range(0, nthreads, 128):
                            if len({events[t] for t in range(g, g + 128)}) != 1:
                                raise Fault("wgmma.wait_group counts differ within a warpgroup")
                            if kind == "wgcommit":
                                wgroups[g].append([])
                            else:
                                wgmma_retire(wgroups[g], events[g][1], g, clock)
                            for t in range(g, g + 128):
                                pending[t] = None
                        continue
                    for w in range(0, nthreads, 32):
                        lanes = list(range(w, min(w + 32, nthreads)))
                        if kind == "barrier":
                            for t in lanes:
                                pending[t] = None
                        elif kind == "ldm":
                            for t, d in zip(lanes, ldmatrix_warp([events[t] for t in lanes], benv["__shared"], lanes, clock)):
                                pending[t] = d
                        elif kind == "mma":
                            for t, d in zip(lanes, mma_warp([events[t] for t in lanes])):
                                pending[t] = d
                        elif kind == "xor":
                            for t in lanes:
                                pending[t] = events[w + ((t - w) ^ events[t][2])][1]
                        elif kind == "idx":
                            for t in lanes:
                                src = events[t][2]
                                pending[t] = events[w + src][1] if 0 <= src < len(lanes) else events[t][1]
                        if kind != "barrier":
                            clock[1 + w // 32] += 1


# ---------------------------------------------------------------- GEMM checks

def f32buf(vals):
    return bytearray(struct.pack(f"<{len(vals)}f", *vals))


def batch_layout(mats, rows, k, kfast):
    """Batches of `rows x k` matrices (row-major lists) laid out one after another, each stored
    row-major (`kfast`: k contiguous) or column-major."""
    flat = []
    for batch in mats:
        for mat in batch:
            flat += mat if kfast else [mat[r * k + c] for c in range(k) for r in range(rows)]
    return flat


def gemm_case(funcs, kernel, m, n, k, z, a_kfast, b_kfast, rng, tensor_cores):
    """One batched product through `kernel`, launched as kiln_runtime::cuda::Run::gemm does."""
    z1, z2 = z
    kind = kernel.rsplit("_", 1)[1]
    rnd = lambda count: [rng.uniform(-1, 1) for _ in range(count)]
    mem = {}
    A = [[rnd(m * k) for _ in range(z2)] for _ in range(z1)]
    # a[z1, z2] is m x k with strides (sam, sak): k-fast stores rows, otherwise columns.
    sam, sak = (k, 1) if a_kfast else (1, m)
    mem["a"] = f32buf(batch_layout(A, m, k, a_kfast))
    sa2, sa1 = m * k, z2 * m * k
    group = 32
    if kind == "f32":
        Bm = [[rnd(n * k) for _ in range(z2)] for _ in range(z1)]  # [n][k] values
        sbk, sbn = (1, k) if b_kfast else (n, 1)
        mem["b"] = f32buf(batch_layout(Bm, n, k, b_kfast))
        bargs = [Ptr("b"), z2 * n * k, n * k, sbk, sbn]
        bval = lambda i, j, col, kk: Bm[i][j][col * k + kk]
    elif kind == "i8":
        codes = [rng.randint(-127, 127) for _ in range(n * k)]
        scales = [rng.uniform(0.001, 0.02) for _ in range(n)]
        mem["codes"] = bytearray(struct.pack(f"<{n * k}b", *codes))
        mem["scales"] = f32buf(scales)
        bargs = [Ptr("codes"), Ptr("scales")]
        bval = lambda i, j, col, kk: f32(codes[col * k + kk] * f32(scales[col]))
    else:
        codes = [rng.randint(0, 15) for _ in range(n * k)]
        packed = []
        for r in range(n):
            for blk in range(k // 32):
                for i in range(16):
                    packed.append(codes[r * k + blk * 32 + i] | codes[r * k + blk * 32 + i + 16] << 4)
        g = k // group
        sc = [struct.unpack("<e", struct.pack("<e", rng.uniform(0.01, 0.1)))[0] for _ in range(n * g)]
        mn = [struct.unpack("<e", struct.pack("<e", rng.uniform(-0.5, 0)))[0] for _ in range(n * g)]
        mem["codes"] = bytearray(bytes(packed))
        mem["scales"] = bytearray(struct.pack(f"<{n * g}e", *sc))
        mem["mins"] = bytearray(struct.pack(f"<{n * g}e", *mn))
        bargs = [Ptr("codes"), Ptr("scales"), Ptr("mins"), group]
        bval = lambda i, j, col, kk: f32(codes[col * k + kk] * sc[col * g + kk // group] + mn[col * g + kk // group])
    bias = rnd(n)
    accv = rnd(z1 * z2 * m * n)
    mem["bias"] = f32buf(bias)
    mem["acc"] = f32buf(accv)
    mem["c"] = f32buf([float("nan")] * (z1 * z2 * m * n))
    scale = 0.5
    args = [m, n, k, z2, Ptr("a"), sa1, sa2, sam, sak] + bargs
    args += [Ptr("c"), z2 * m * n, m * n, n, scale, Ptr("bias"), 1, Ptr("acc"), z2 * m * n, m * n, n, 1]
    if kernel.startswith("gemv_cols"):
        grid, block = (-(-n // 32), 1, z1 * z2), (256, 1, 1)
    elif kernel.startswith("gemv"):
        grid, block = (-(-n // 8), 1, z1 * z2), (256, 1, 1)
    elif tensor_cores:
        grid, block = (-(-n // 128), -(-m // 128), z1 * z2), (256, 1, 1)
    else:
        grid, block = (-(-n // 64), -(-m // 64), z1 * z2), (256, 1, 1)
    launch(funcs[kernel], grid, block, args, mem)
    got = struct.unpack(f"<{z1 * z2 * m * n}f", mem["c"])
    rnd16 = bf16 if tensor_cores else (lambda x: x)
    for i in range(z1):
        for j in range(z2):
            for r in range(m):
                for col in range(n):
                    terms = [rnd16(A[i][j][r * k + kk]) * rnd16(bval(i, j, col, kk)) for kk in range(k)]
                    at = (i * z2 + j) * m * n + r * n + col
                    want = scale * sum(terms) + bias[col] + accv[at]
                    tol = 1e-5 * (scale * sum(abs(t) for t in terms) + abs(bias[col]) + abs(accv[at])) + 1e-6
                    err = abs(got[at] - want) if got[at] == got[at] else math.inf
                    if err > tol:
                        return f"{kernel} m={m} n={n} k={k} z={z}: c[{i},{j},{r},{col}] = {got[at]}, want {want}"
    return None


def bf16_case(funcs, m, n, k, z, a_kfast, rng, kernel="gemm_bf16"):
    """The runtime's tensor-core path for a weight: `to_bf16` turns the f32 left operand (either
    layout, z1 x z2 batches) into zero-padded bf16 rows, the weight is bf16 `[n, kp]` per batch as
    the runtime uploads it, and `gemm_bf16` multiplies with scale, bias and accumulator."""
    z1, z2 = z
    kp = -(-k // 8) * 8
    nb = z1 * z2
    A = [[rng.uniform(-1, 1) for _ in range(m * k)] for _ in range(nb)]
    Bm = [[rng.uniform(-1, 1) for _ in range(n * k)] for _ in range(nb)]  # [n][k]
    flat = []
    for mat in A:
        flat += mat if a_kfast else [mat[r * k + c] for c in range(k) for r in range(m)]
    mem = {"a": f32buf(flat), "abf": bytearray(2 * nb * m * kp + 16)}
    # The runtime converts one batch matrix per launch when the layout is not row-major.
    for i in range(nb):
        srow, sk = (k, 1) if a_kfast else (1, m)
        sub = Ptr("a", 4 * i * m * k)
        dst = Ptr("abf", 2 * i * m * kp)
        launch(funcs["to_bf16"], (-(-(m * kp // 2) // 256), 1, 1), (256, 1, 1), [m, k, kp, sub, srow, sk, dst], mem)
    words = []
    for mat in Bm:
        for col in range(n):
            row = [bf16(mat[col * k + kk]) for kk in range(k)] + [0.0] * (kp - k)
            words += [struct.unpack("<I", struct.pack("<f", v))[0] >> 16 for v in row]
    mem["b"] = bytearray(struct.pack(f"<{len(words)}H", *words))
    bias = [rng.uniform(-1, 1) for _ in range(n)]
    accv = [rng.uniform(-1, 1) for _ in range(nb * m * n)]
    mem["bias"], mem["acc"] = f32buf(bias), f32buf(accv)
    mem["c"] = f32buf([float("nan")] * (nb * m * n))
    scale = 0.5
    args = [m, n, kp, z2, Ptr("abf"), z2 * m * kp, m * kp, kp, 1, Ptr("b"), z2 * n * kp, n * kp, 1, kp]
    args += [Ptr("c"), z2 * m * n, m * n, n, scale, Ptr("bias"), 1, Ptr("acc"), z2 * m * n, m * n, n, 1]
    if kernel == "gemm_wgmma":
        # 128 x 256 tiles, four 48 KB stages in dynamic shared memory (emit::WG_SMEM).
        launch(funcs[kernel], (-(-n // 256), -(-m // 128), nb), (256, 1, 1), args, mem, 4 * 384 * 128 + 1024)
    else:
        launch(funcs[kernel], (-(-n // 128), -(-m // 128), nb), (256, 1, 1), args, mem)
    got = struct.unpack(f"<{nb * m * n}f", mem["c"])
    for i in range(nb):
        for r in range(m):
            for col in range(n):
                terms = [bf16(A[i][r * k + kk]) * bf16(Bm[i][col * k + kk]) for kk in range(k)]
                at = i * m * n + r * n + col
                want = scale * sum(terms) + bias[col] + accv[at]
                tol = 1e-5 * (scale * sum(abs(t) for t in terms) + abs(bias[col]) + abs(accv[at])) + 1e-6
                err = abs(got[at] - want) if got[at] == got[at] else math.inf
                if err > tol:
                    return f"c[{i},{r},{col}] = {got[at]}, want {want}"
    return None


def launches(funcs, path):
    """Runs the launches described in the JSON file `path` (written by tests/kernels.rs):
    [{"kernel", "grid", "block", "params": [{"i": int} | {"f": float} | {"buf": name}],
    "buffers": {name: [type, [values]]}, "out": [name, type, count]}]; prints one JSON list of
    output values per launch."""
    import json

    fmt = {"f32": "f", "i64": "q", "i8": "b"}
    results = []
    for job in json.load(open(path)):
        mem = {}
        for name, (ty, vals) in job["buffers"].items():
            mem[name] = bytearray(struct.pack(f"<{len(vals)}{fmt[ty]}", *vals))
        oname, oty, count = job["out"]
        mem[oname] = bytearray(struct.pack(f"<{count}{fmt[oty]}", *([float("nan")] * count if oty == "f32" else [-1] * count)))
        args = [Ptr(p["buf"]) if "buf" in p else p.get("i", p.get("f")) for p in job["params"]]
        launch(funcs[job["kernel"]], tuple(job["grid"]), tuple(job["block"]), args, mem)
        results.append(list(struct.unpack(f"<{count}{fmt[oty]}", mem[oname])))
    print(json.dumps(results))
    return 0


ADDR_BITS = 32


def serve(funcs, text):
    """The device protocol of the module docstring, over stdin/stdout."""
    mem, next_id = {}, 1

    def split(addr):
        buf, off = addr >> ADDR_BITS, addr & ((1 << ADDR_BITS) - 1)
        if buf not in mem:
            raise MemoryError(f"address {addr:#x} is not in an allocated buffer")
        return buf, off

    def param(ty, slot):
        if ty == "!llvm.ptr":
            return Ptr(slot >> ADDR_BITS, slot & ((1 << ADDR_BITS) - 1))
        if ty == "f32":
            return struct.unpack("<f", struct.pack("<I", slot & 0xFFFFFFFF))[0]
        return wrap(slot, ty)

    import os
    # KILN_EMULATOR_TRACE=PREFIX records each session (PREFIX.N.mlir and the commands, PREFIX.N.txt)
    # for replaying: python3 emulate.py PREFIX.N.mlir --serve < PREFIX.N.txt
    trace = None
    if os.environ.get("KILN_EMULATOR_TRACE"):
        n = 0
        while os.path.exists(f"{os.environ['KILN_EMULATOR_TRACE']}.{n}.mlir"):
            n += 1
        prefix = f"{os.environ['KILN_EMULATOR_TRACE']}.{n}"
        open(prefix + ".mlir", "w").write(text)
        trace = open(prefix + ".txt", "w")
    for line in sys.stdin:
        if trace:
            trace.write(line)
            trace.flush()
        w = line.split()
        try:
            cmd, reply = w[0], "ok"
            if cmd == "alloc":
                if int(w[1]) >= 1 << ADDR_BITS:
                    raise MemoryError(f"{w[1]} bytes is more than the emulator's buffers hold")
                mem[next_id] = bytearray(int(w[1]))
                reply = f"ok {next_id << ADDR_BITS}"
                next_id += 1
            elif cmd == "free":
                del mem[split(int(w[1]))[0]]
            elif cmd in ("write", "zero", "read"):
                buf, off = split(int(w[1]))
                data = bytes.fromhex(w[2]) if cmd == "write" else b""
                n = len(data) if cmd == "write" else int(w[2])
                if off + n > len(mem[buf]):
                    raise MemoryError(f"{cmd} of {n} bytes at byte {off} of a {len(mem[buf])}-byte buffer")
                if cmd == "read":
                    reply = "ok " + mem[buf][off:off + n].hex()
                else:
                    mem[buf][off:off + n] = data or bytes(n)
            elif cmd == "launch":
                func = funcs[w[1]]
                dims = [int(x) for x in w[2:9]]
                slots = [int(x) for x in w[9:]]
                if len(slots) != len(func[0]):
                    raise TypeError(f"{w[1]} takes {len(func[0])} parameters, the launch passed {len(slots)}")
                args = [param(ty, v) for (_, ty), v in zip(func[0], slots)]
                launch(func, tuple(dims[:3]), tuple(dims[3:6]), args, mem, dims[6])
            else:
                raise ValueError(f"unknown command `{cmd}`")
        except Exception as e:  # noqa: BLE001 - every failure goes back to the runtime as a message
            reply = "err " + f"{type(e).__name__}: {e}".replace("\n", " ")
        sys.stdout.write(reply + "\n")
        sys.stdout.flush()
    return 0


def reduce_case(funcs, op, outer, r, inner, scale, rng):
    """`reduce_axis_{op}` over x [outer, r, inner], launched as the runtime does."""
    x = [rng.uniform(-2, 2) for _ in range(outer * r * inner)]
    total = outer * inner
    mem = {"x": f32buf(x), "out": f32buf([math.nan] * total)}
    launch(funcs[f"reduce_axis_{op}"], (-(-total // 256), 1, 1), (256, 1, 1),
           [total, r, inner, scale, Ptr("x"), Ptr("out")], mem)
    got = struct.unpack(f"<{total}f", mem["out"])
    for o in range(outer):
        for c in range(inner):
            col = [x[(o * r + j) * inner + c] for j in range(r)]
            want = {"sum": sum(col) * scale, "max": max(col), "min": min(col)}[op]
            if abs(got[o * inner + c] - want) > 1e-5 * (1 + abs(want)):
                return f"out[{o}, {c}] = {got[o * inner + c]}, want {want}"
    return None


def copy_case(funcs, shape, perm, rng):
    """A transpose through copy_i32, with the runtime's argument packing (unit axes dropped, the
    rest right-aligned in 6 axes, padding extent 1 and stride 0)."""
    rank = len(shape)
    src_strides = [1] * rank
    for i in range(rank - 2, -1, -1):
        src_strides[i] = src_strides[i + 1] * shape[i + 1]
    out_shape = [shape[p] for p in perm]
    out_strides = [1] * rank
    for i in range(rank - 2, -1, -1):
        out_strides[i] = out_strides[i + 1] * out_shape[i + 1]
    # Walk the output's index space; read the source through the permuted strides.
    s = [src_strides[p] for p in perm]
    keep = [i for i in range(rank) if out_shape[i] != 1]
    pad = 6 - len(keep)
    d, ss, t = [1] * 6, [0] * 6, [0] * 6
    for j, i in enumerate(keep):
        d[pad + j], ss[pad + j], t[pad + j] = out_shape[i], s[i], out_strides[i]
    total = math.prod(shape)
    src = [rng.randint(-2**31, 2**31 - 1) for _ in range(total)]
    mem = {"src": bytearray(struct.pack(f"<{total}i", *src)), "dst": bytearray(struct.pack(f"<{total}i", *([0] * total)))}
    args = [total] + d + ss + t + [Ptr("src"), Ptr("dst")]
    launch(funcs["copy_i32"], (-(-total // 256), 1, 1), (256, 1, 1), args, mem)
    got = struct.unpack(f"<{total}i", mem["dst"])
    for o in range(total):
        rem, idx = o, [0] * rank
        for i in range(rank - 1, -1, -1):
            idx[i], rem = rem % out_shape[i], rem // out_shape[i]
        want = src[sum(idx[i] * s[i] for i in range(rank))]
        if got[o] != want:
            return f"copy_i32 {shape} by {perm}: out[{o}] = {got[o]}, want {want}"
    return None


def gather_case(funcs, outer, nidx, inner, axis_len, rng):
    """gather_f32-sized (i32) rows by i64 indices, one out of range (zeros and the error flag)."""
    table = [rng.randint(-1000, 1000) for _ in range(outer * axis_len * inner)]
    idx = [rng.randrange(axis_len) for _ in range(nidx)]
    idx[-1] = axis_len  # out of range
    total = outer * nidx * inner
    mem = {"table": bytearray(struct.pack(f"<{len(table)}i", *table)), "idx": bytearray(struct.pack(f"<{nidx}q", *idx)),
           "out": bytearray(struct.pack(f"<{total}i", *([7] * total))), "err": bytearray(4)}
    args = [outer, nidx, inner, axis_len, Ptr("table"), Ptr("idx"), Ptr("out"), Ptr("err")]
    launch(funcs["gather_i32_i64"], (-(-total // 256), 1, 1), (256, 1, 1), args, mem)
    got = struct.unpack(f"<{total}i", mem["out"])
    for o in range(outer):
        for p in range(nidx):
            for c in range(inner):
                ok = idx[p] < axis_len
                want = table[(o * axis_len + idx[p]) * inner + c] if ok else 0
                at = (o * nidx + p) * inner + c
                if got[at] != want:
                    return f"gather: out[{o},{p},{c}] = {got[at]}, want {want}"
    if struct.unpack("<i", mem["err"])[0] != 1:
        return "gather: an out-of-range index did not set the error flag"
    return None


def main():
    text = open(sys.argv[1]).read()
    if len(sys.argv) == 4 and sys.argv[2] == "--launches":
        return launches(parse_module(text), sys.argv[3])
    if len(sys.argv) == 3 and sys.argv[2] == "--serve":
        funcs = parse_module(text)
        print("ok ready", flush=True)
        return serve(funcs, text)
    funcs = parse_module(text)
    rng = random.Random(7)
    cases = [
        ("gemm_tc_f32", 40, 24, 40, (1, 1), True, True),
        ("gemm_tc_f32", 33, 136, 50, (1, 2), False, False),
        ("gemm_tc_f32", 130, 9, 17, (2, 1), True, False),
        ("gemm_tc_i8", 36, 20, 64, (1, 1), True, True),
        ("gemm_tc_i4", 34, 16, 64, (1, 1), False, True),
        ("gemm_f32", 20, 70, 21, (1, 2), True, False),
        ("gemm_f32", 65, 12, 18, (1, 1), False, True),
        ("gemm_i8", 5, 18, 40, (1, 1), True, True),
        ("gemm_i4", 3, 10, 64, (1, 1), True, True),
        ("gemv_f32", 3, 19, 70, (1, 2), True, True),
        ("gemv_cols_f32", 4, 45, 50, (2, 1), False, False),
        ("gemv_cols_f32", 1, 70, 9, (1, 1), True, False),
        ("gemv_i8", 1, 20, 64, (1, 1), True, True),
        ("gemv_i4", 2, 10, 96, (1, 1), False, True),
    ]
    only = sys.argv[2:] or None
    bad = 0
    for kernel, m, n, k, z, akf, bkf in cases:
        if only and kernel not in only:
            continue
        err = gemm_case(funcs, kernel, m, n, k, z, akf, bkf, rng, kernel.startswith("gemm_tc"))
        print(f"{'ok  ' if err is None else 'FAIL'} {kernel} m={m} n={n} k={k} z={z} a_kfast={akf} b_kfast={bkf}"
              + ("" if err is None else f": {err}"), flush=True)
        bad += err is not None
    for label, err in (
        ("gemm_bf16 m=40 n=24 k=136 (5 k-tiles, 3 stages)", lambda: bf16_case(funcs, 40, 24, 136, (1, 1), True, rng)),
        ("gemm_bf16 m=130 n=20 k=36 z=(2,1) a column-major", lambda: bf16_case(funcs, 130, 20, 36, (2, 1), False, rng)),
        ("gemm_bf16 m=33 n=136 k=64 z=(1,2)", lambda: bf16_case(funcs, 33, 136, 64, (1, 2), True, rng)),
        ("gemm_wgmma m=40 n=24 k=300 (5 k-tiles, 4 stages)", lambda: bf16_case(funcs, 40, 24, 300, (1, 1), True, rng, "gemm_wgmma")),
        ("gemm_wgmma m=130 n=140 k=40 z=(1,2) a column-major",
         lambda: bf16_case(funcs, 130, 140, 40, (1, 2), False, rng, "gemm_wgmma")),
        ("copy_i32 [2,3,5,4] by [2,0,3,1]", lambda: copy_case(funcs, [2, 3, 5, 4], [2, 0, 3, 1], rng)),
        ("copy_i32 [3,1,7] by [2,1,0]", lambda: copy_case(funcs, [3, 1, 7], [2, 1, 0], rng)),
        ("gather_i32_i64 2x5x3 from 4", lambda: gather_case(funcs, 2, 5, 3, 4, rng)),
        ("reduce_axis_sum [3,7,5] scale 1/7", lambda: reduce_case(funcs, "sum", 3, 7, 5, 1 / 7, rng)),
        ("reduce_axis_max [2,9,300]", lambda: reduce_case(funcs, "max", 2, 9, 300, 1.0, rng)),
        ("reduce_axis_min [4,3,1]", lambda: reduce_case(funcs, "min", 4, 3, 1, 1.0, rng)),
    ):
        if only and label.split()[0] not in only or label.split()[0] not in funcs and label.startswith("gemm_wgmma"):
            continue
        e = err()
        print(f"{'ok  ' if e is None else 'FAIL'} {label}" + ("" if e is None else f": {e}"), flush=True)
        bad += e is not None
    if STATS["wgmma"]:
        print(f"wgmma: {STATS['wgmma']} warpgroup products", flush=True)
    if STATS["ldmatrix"]:
        print(f"ldmatrix: {STATS['ldmatrix']} phases, {STATS['ldmatrix_conflicts']} with a bank conflict", flush=True)
        bad += STATS["ldmatrix_conflicts"] > 0
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
