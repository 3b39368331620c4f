//! Where a CUDA plan's memory lives and its kernels run: a GPU through the driver ([`Driver`]), or
//! kiln's GPU emulator ([`Emulator`], for testing the runtime's launches without a GPU).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::{c_void, CString};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::rc::Rc;
use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext};

/// A kernel argument, passed as one 64-bit parameter slot.
#[derive(Clone, Copy, Debug)]
pub(super) enum Arg {
    /// A device address.
    P(u64),
    I(i64),
    /// An f32 (the low half of its slot).
    F(f32),
}

impl Arg {
    fn slot(self) -> u64 {
        match self {
            Arg::P(p) => p,
            Arg::I(i) => i as u64,
            Arg::F(x) => x.to_bits() as u64,
        }
    }
}

/// A kernel of the loaded module: a fusion group's (`k{i}`) or a fixed one (`gemm_f32`, …).
#[derive(Clone, Copy, Debug)]
pub(super) enum Kernel<'a> {
    Fused(usize),
    Fixed(&'a str),
}

impl Kernel<'_> {
    pub(super) fn name(self) -> String {
        match self {
            Kernel::Fused(i) => format!("k{i}"),
            Kernel::Fixed(n) => n.to_string(),
        }
    }

    /// Bytes of dynamic shared memory the kernel launches with ([`super::dynamic_smem`]).
    fn dynamic_smem(self) -> u32 {
        match self {
            Kernel::Fused(_) => 0,
            Kernel::Fixed(n) => super::dynamic_smem(n),
        }
    }
}

/// Device memory and kernel launches. Launches may run asynchronously; reads wait for them.
pub(super) trait Device {
    fn alloc(&self, len: usize) -> Result<u64, String>;
    fn free(&self, ptr: u64);
    fn write(&self, ptr: u64, bytes: &[u8]) -> Result<(), String>;
    fn read(&self, ptr: u64, out: &mut [u8]) -> Result<(), String>;
    fn zero(&self, ptr: u64, len: usize) -> Result<(), String>;
    fn launch(&self, k: Kernel, grid: (u32, u32, u32), block: (u32, u32, u32), args: &[Arg]) -> Result<(), String>;
    /// Makes the device current on the calling thread.
    fn bind(&self) -> Result<(), String>;
    /// Waits for every launch; reports a failure of any of them.
    fn synchronize(&self) -> Result<(), String>;
    /// Whether the loaded module has kernel `name`.
    fn has(&self, name: &str) -> bool;
}

/// Device memory, freed on drop.
pub(super) struct DevMem {
    pub ptr: u64,
    pub len: usize,
    dev: Rc<dyn Device>,
}

impl DevMem {
    pub fn alloc(dev: &Rc<dyn Device>, len: usize) -> Result<DevMem, String> {
        let ptr = dev.alloc(len)?;
        Ok(DevMem {
            ptr,
            len,
            dev: dev.clone(),
        })
    }

    pub fn upload(dev: &Rc<dyn Device>, bytes: &[u8]) -> Result<DevMem, String> {
        let m = DevMem::alloc(dev, bytes.len())?;
        if !bytes.is_empty() {
            dev.write(m.ptr, bytes)?;
        }
        Ok(m)
    }

    pub fn zeroed(dev: &Rc<dyn Device>, len: usize) -> Result<DevMem, String> {
        let m = DevMem::alloc(dev, len)?;
        dev.zero(m.ptr, len)?;
        Ok(m)
    }
}

impl Drop for DevMem {
    fn drop(&mut self) {
        self.dev.free(self.ptr);
    }
}

/// `len` bytes at `addr`, after every launch before.
pub(super) fn download(dev: &dyn Device, addr: u64, len: usize) -> Result<Vec<u8>, String> {
    let mut out = vec![0u8; len];
    if len > 0 {
        dev.read(addr, &mut out)?;
    }
    Ok(out)
}

/// A GPU through the CUDA driver: one context, one loaded PTX module.
pub(super) struct Driver {
    ctx: Arc<CudaContext>,
    module: sys::CUmodule,
    /// Further modules (sm_90a's), unloaded with the first.
    extra: Vec<sys::CUmodule>,
    kernels: Vec<sys::CUfunction>,
    named: BTreeMap<String, sys::CUfunction>,
}

impl Driver {
    /// Loads a NUL-terminated PTX image and looks up `k0..k{fused}`, the `required` kernels, and
    /// those `optional` kernels the module has.
    pub fn load(
        ctx: Arc<CudaContext>,
        ptx: &[u8],
        fused: usize,
        required: &[&str],
        optional: &[String],
    ) -> Result<Driver, String> {
        ctx.bind_to_thread().map_err(|e| format!("CUDA context: {e}"))?;
        // SAFETY: a NUL-terminated PTX image (checked by the caller), as the driver expects.
        let module = unsafe { result::module::load_data(ptx.as_ptr() as *const c_void) }.map_err(|e| e.to_string())?;
        let mut d = Driver {
            ctx,
            module,
            extra: Vec::new(),
            kernels: Vec::new(),
            named: BTreeMap::new(),
        };
        let func = |name: &str| -> Result<sys::CUfunction, String> {
            let c = CString::new(name).map_err(|_| format!("kernel name `{name}`"))?;
            // SAFETY: the module was just loaded and stays loaded while the driver lives.
            unsafe { result::module::get_function(module, c) }.map_err(|e| format!("kernel `{name}`: {e}"))
        };
        for i in 0..fused {
            d.kernels.push(func(&format!("k{i}"))?);
        }
        for name in required {
            d.named.insert(name.to_string(), func(name)?);
        }
        for name in optional {
            if let Ok(f) = func(name) {
                d.named.insert(name.to_string(), f);
            }
        }
        Ok(d)
    }

    /// Loads a second NUL-terminated PTX image (sm_90a's) and its kernels `names`, raising each
    /// one's dynamic shared memory limit to what it launches with ([`super::dynamic_smem`]).
    pub fn load_extra(&mut self, ptx: &[u8], names: &[&str]) -> Result<(), String> {
        // SAFETY: a NUL-terminated PTX image (checked by the caller), as the driver expects.
        let module = unsafe { result::module::load_data(ptx.as_ptr() as *const c_void) }.map_err(|e| e.to_string())?;
        self.extra.push(module);
        for name in names {
            let c = CString::new(*name).map_err(|_| format!("kernel name `{name}`"))?;
            // SAFETY: the module was just loaded and stays loaded while the driver lives.
            let f = unsafe { result::module::get_function(module, c) }.map_err(|e| format!("kernel `{name}`: {e}"))?;
            let smem = super::dynamic_smem(name);
            if smem > 0 {
                let attr = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
                // SAFETY: a function of a loaded module; the driver checks the value against the device.
                unsafe { result::function::set_function_attribute(f, attr, smem as i32) }
                    .map_err(|e| format!("kernel `{name}` needs {smem} bytes of shared memory: {e}"))?;
            }
            self.named.insert(name.to_string(), f);
        }
        Ok(())
    }
}

impl Device for Driver {
    fn alloc(&self, len: usize) -> Result<u64, String> {
        // SAFETY: plain allocation (never of 0 bytes, which the driver refuses); freed once, by
        // `DevMem`'s drop.
        unsafe { result::malloc_sync(len.max(256)) }.map_err(|e| format!("cannot allocate {len} bytes on the GPU: {e}"))
    }

    fn free(&self, ptr: u64) {
        // SAFETY: allocated by `alloc`, freed only once.
        unsafe {
            let _ = result::free_sync(ptr);
        }
    }

    fn write(&self, ptr: u64, bytes: &[u8]) -> Result<(), String> {
        // SAFETY: callers write inside a live allocation of at least `bytes.len()` bytes.
        unsafe { result::memcpy_htod_sync(ptr, bytes) }.map_err(|e| format!("copy to the GPU: {e}"))
    }

    fn read(&self, ptr: u64, out: &mut [u8]) -> Result<(), String> {
        // SAFETY: callers read inside a live allocation of at least `out.len()` bytes.
        unsafe { result::memcpy_dtoh_sync(out, ptr) }.map_err(|e| format!("copy from the GPU: {e}"))
    }

    fn zero(&self, ptr: u64, len: usize) -> Result<(), String> {
        // SAFETY: callers clear inside a live allocation of at least `len` bytes.
        unsafe { result::memset_d8_sync(ptr, 0, len) }.map_err(|e| format!("clearing GPU memory: {e}"))
    }

    fn launch(&self, k: Kernel, grid: (u32, u32, u32), block: (u32, u32, u32), args: &[Arg]) -> Result<(), String> {
        let f = match k {
            Kernel::Fused(i) => *self.kernels.get(i).ok_or_else(|| format!("no kernel k{i}"))?,
            Kernel::Fixed(n) => *self.named.get(n).ok_or_else(|| format!("no kernel {n}"))?,
        };
        let mut store: Vec<u64> = args.iter().map(|a| a.slot()).collect();
        // Each parameter points at its 8-byte slot; a 4-byte f32 parameter reads the low half.
        let mut ptrs: Vec<*mut c_void> = store.iter_mut().map(|v| v as *mut u64 as *mut c_void).collect();
        // SAFETY: the argument list matches the kernel's signature (the emitter and the runtime agree
        // on it), every address lies in a live allocation, and the shapes were checked.
        unsafe { result::launch_kernel(f, grid, block, k.dynamic_smem(), std::ptr::null_mut(), &mut ptrs) }
            .map_err(|e| format!("launching {}: {e}", k.name()))
    }

    fn bind(&self) -> Result<(), String> {
        self.ctx.bind_to_thread().map_err(|e| format!("CUDA context: {e}"))
    }

    fn synchronize(&self) -> Result<(), String> {
        self.ctx
            .synchronize()
            .map_err(|e| format!("the GPU failed while running: {e}"))
    }

    fn has(&self, name: &str) -> bool {
        self.named.contains_key(name)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: loaded in `load` / `load_extra`, unloaded once.
            unsafe {
                for m in self.extra.drain(..) {
                    let _ = result::module::unload(m);
                }
                let _ = result::module::unload(self.module);
            }
        }
    }
}

/// kiln's GPU emulator (`backends/cuda/tests/emulate.py --serve`): a Python process that
/// interprets the kernels' MLIR thread by thread, with bounds-checked memory. Orders of magnitude
/// slower than a GPU; it exists so the runtime's launches (grids, argument lists, offsets tables,
/// strides, cache views) can be tested on machines without one.
pub(super) struct Emulator {
    io: RefCell<(Child, ChildStdin, BufReader<ChildStdout>)>,
    /// The module's `gpu.func` names.
    funcs: std::collections::BTreeSet<String>,
}

impl Emulator {
    /// Starts `python3 SCRIPT MODULE --serve` on the MLIR text `mlir`.
    pub fn start(script: &Path, mlir: &str) -> Result<Emulator, String> {
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("kiln-emulated-{}-{n}.mlir", std::process::id()));
        std::fs::write(&path, mlir).map_err(|e| format!("{}: {e}", path.display()))?;
        let child = Command::new("python3")
            .arg(script)
            .arg(&path)
            .arg("--serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start python3 {}: {e}", script.display()));
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
        let funcs = mlir
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix("gpu.func @"))
            .filter_map(|l| l.split('(').next())
            .map(str::to_string)
            .collect();
        let emu = Emulator {
            io: RefCell::new((child, stdin, stdout)),
            funcs,
        };
        // The module is parsed before the first answer.
        let ready = emu.answer();
        let _ = std::fs::remove_file(&path);
        match ready?.as_str() {
            "ready" => Ok(emu),
            other => Err(format!("the emulator said `{other}` on starting")),
        }
    }

    fn answer(&self) -> Result<String, String> {
        let mut io = self.io.borrow_mut();
        let mut line = String::new();
        io.2.read_line(&mut line)
            .map_err(|e| format!("reading from the emulator: {e}"))?;
        let line = line.trim_end();
        if line.is_empty() {
            return Err("the emulator exited".into());
        }
        match line.split_once(' ').unwrap_or((line, "")) {
            ("ok", rest) => Ok(rest.to_string()),
            ("err", msg) => Err(format!("emulated GPU: {msg}")),
            _ => Err(format!("the emulator answered `{line}`")),
        }
    }

    fn call(&self, cmd: &str) -> Result<String, String> {
        {
            let mut io = self.io.borrow_mut();
            writeln!(io.1, "{cmd}")
                .and_then(|_| io.1.flush())
                .map_err(|e| format!("writing to the emulator: {e}"))?;
        }
        self.answer()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Device for Emulator {
    fn alloc(&self, len: usize) -> Result<u64, String> {
        let a = self.call(&format!("alloc {len}"))?;
        a.parse().map_err(|_| format!("the emulator allocated `{a}`"))
    }

    fn free(&self, ptr: u64) {
        let _ = self.call(&format!("free {ptr}"));
    }

    fn write(&self, ptr: u64, bytes: &[u8]) -> Result<(), String> {
        self.call(&format!("write {ptr} {}", hex(bytes))).map(|_| ())
    }

    fn read(&self, ptr: u64, out: &mut [u8]) -> Result<(), String> {
        let h = self.call(&format!("read {ptr} {}", out.len()))?;
        if h.len() != 2 * out.len() {
            return Err(format!(
                "the emulator read {} hex digits for {} bytes",
                h.len(),
                out.len()
            ));
        }
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&h[2 * i..2 * i + 2], 16).map_err(|e| format!("emulator read: {e}"))?;
        }
        Ok(())
    }

    fn zero(&self, ptr: u64, len: usize) -> Result<(), String> {
        self.call(&format!("zero {ptr} {len}")).map(|_| ())
    }

    fn launch(&self, k: Kernel, grid: (u32, u32, u32), block: (u32, u32, u32), args: &[Arg]) -> Result<(), String> {
        let mut cmd = format!(
            "launch {} {} {} {} {} {} {} {}",
            k.name(),
            grid.0,
            grid.1,
            grid.2,
            block.0,
            block.1,
            block.2,
            k.dynamic_smem()
        );
        for a in args {
            cmd.push_str(&format!(" {}", a.slot()));
        }
        self.call(&cmd).map(|_| ()).map_err(|e| format!("{}: {e}", k.name()))
    }

    fn bind(&self) -> Result<(), String> {
        Ok(())
    }

    fn synchronize(&self) -> Result<(), String> {
        Ok(())
    }

    fn has(&self, name: &str) -> bool {
        self.funcs.contains(name)
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let io = self.io.get_mut();
        let _ = io.0.kill();
        let _ = io.0.wait();
    }
}
