//! MLIR text to PTX with melior: parse, attach the NVVM target, lower `gpu` to `nvvm`, and
//! serialize each GPU module to PTX (`gpu-module-to-binary{format=isa}`), linking libdevice for the
//! math functions (`__nv_expf`, `__nv_tanhf`, …). No CUDA toolkit is needed beyond libdevice, which
//! the PyPI package `nvidia-cuda-nvcc-cu12` ships (with `ptxas`, used by the tests).

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use melior::dialect::DialectRegistry;
use melior::ir::attribute::{ArrayAttribute, AttributeLike};
use melior::ir::operation::OperationLike;
use melior::ir::{BlockLike, Module};
use melior::pass::PassManager;
use melior::utility::{
    parse_pass_pipeline, register_all_dialects, register_all_llvm_translations, register_all_passes,
};
use melior::Context;

/// The directory holding `nvvm/libdevice/libdevice.10.bc` (and `bin/ptxas`): `$KILN_CUDA_TOOLKIT`,
/// `$CUDA_HOME`, `$CUDA_PATH`, or the `nvidia/cuda_nvcc` directory of a Python installation's
/// `nvidia-cuda-nvcc-cu12` package.
pub fn toolkit() -> Result<PathBuf, String> {
    let has = |p: &Path| p.join("nvvm/libdevice/libdevice.10.bc").is_file();
    for var in ["KILN_CUDA_TOOLKIT", "CUDA_HOME", "CUDA_PATH"] {
        if let Some(v) = std::env::var_os(var) {
            let p = PathBuf::from(v);
            if has(&p) {
                return Ok(p);
            }
            if var == "KILN_CUDA_TOOLKIT" {
                return Err(format!(
                    "KILN_CUDA_TOOLKIT={} has no nvvm/libdevice/libdevice.10.bc",
                    p.display()
                ));
            }
        }
    }
    let script = "import site,sys\nfor p in site.getsitepackages()+[site.getusersitepackages()]+sys.path: print(p)";
    if let Ok(out) = std::process::Command::new("python3").args(["-c", script]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let p = Path::new(line.trim()).join("nvidia/cuda_nvcc");
            if has(&p) {
                return Ok(p);
            }
        }
    }
    Err(
        "libdevice not found: `pip install nvidia-cuda-nvcc-cu12` or set KILN_CUDA_TOOLKIT to a directory \
         with nvvm/libdevice/libdevice.10.bc"
            .into(),
    )
}

/// A GPU architecture PTX is generated for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arch {
    /// `sm_80`, `sm_90`.
    pub chip: &'static str,
    /// The PTX ISA version it needs (`+ptx70`).
    pub ptx: &'static str,
}

/// The architectures every CUDA artifact carries: Ampere (A100) and Hopper (H100).
pub const ARCHS: [Arch; 2] = [
    Arch {
        chip: "sm_80",
        ptx: "ptx70",
    },
    Arch {
        chip: "sm_90",
        ptx: "ptx80",
    },
];

/// Hopper with its architecture-specific instructions (`wgmma`): PTX for `sm_90a` runs on compute
/// capability 9.0 only, so it holds just the kernels that need it (`emit::wgmma_module`).
pub const HOPPER_A: Arch = Arch {
    chip: "sm_90a",
    ptx: "ptx80",
};

/// Lowers a module of `gpu.module`s (MLIR text) to PTX for `arch`.
pub fn to_ptx(mlir: &str, arch: Arch, toolkit: &Path) -> Result<String, String> {
    let registry = DialectRegistry::new();
    register_all_dialects(&registry);
    let ctx = Context::new();
    ctx.append_dialect_registry(&registry);
    ctx.load_all_available_dialects();
    register_all_llvm_translations(&ctx);
    register_all_passes();
    let diags = RefCell::new(Vec::<String>::new());
    let id = ctx.attach_diagnostic_handler(|d| {
        diags.borrow_mut().push(format!("{}: {}", d.location(), d));
        true
    });
    let fail = |what: &str| {
        let d = diags.borrow();
        if d.is_empty() {
            what.to_string()
        } else {
            format!("{what}: {}", d.join("; "))
        }
    };
    let result = (|| {
        let mut module = Module::parse(&ctx, mlir).ok_or_else(|| fail("the generated MLIR does not parse"))?;
        if !module.as_operation().verify() {
            return Err(fail("the generated MLIR does not verify"));
        }
        let pipeline = format!(
            "builtin.module(nvvm-attach-target{{chip={} features=+{} O=3}},\
             gpu.module(convert-scf-to-cf,convert-gpu-to-nvvm,{}reconcile-unrealized-casts),\
             gpu-module-to-binary{{format=isa toolkit={}}})",
            arch.chip,
            arch.ptx,
            // wgmma lowers to inline PTX (NVVM's PTX-builder ops), which LLVM translation needs done first.
            if arch.chip.ends_with('a') {
                "convert-nvvm-to-llvm,"
            } else {
                ""
            },
            toolkit.display()
        );
        let pm = PassManager::new(&ctx);
        parse_pass_pipeline(pm.as_operation_pass_manager(), &pipeline).map_err(|e| fail(&e.to_string()))?;
        pm.run(&mut module).map_err(|_| fail("lowering to PTX failed"))?;
        let mut op = module.body().first_operation();
        while let Some(o) = op {
            if o.name().as_string_ref().as_str() == Ok("gpu.binary") {
                let objects =
                    ArrayAttribute::try_from(o.attribute("objects").map_err(|_| fail("gpu.binary without objects"))?)
                        .map_err(|_| fail("gpu.binary objects are not an array"))?;
                let obj = objects.element(0).map_err(|_| fail("gpu.binary with no object"))?;
                // SAFETY: the attribute was checked to be a GPU object attribute; the returned string
                // ref points into the context, which outlives this copy.
                let text = unsafe {
                    if !mlir_sys::mlirAttributeIsAGPUObjectAttr(obj.to_raw()) {
                        return Err(fail("gpu.binary object is not a #gpu.object"));
                    }
                    let s = mlir_sys::mlirGPUObjectAttrGetObject(obj.to_raw());
                    std::slice::from_raw_parts(s.data as *const u8, s.length).to_vec()
                };
                return String::from_utf8(text).map_err(|_| fail("the PTX is not UTF-8"));
            }
            op = o.next_in_block();
        }
        Err(fail("lowering produced no gpu.binary"))
    })();
    ctx.detach_diagnostic_handler(id);
    result
}

/// Assembles PTX with the toolkit's `ptxas -v` for `chip`; returns its resource report (registers,
/// spills, shared memory per function), or its complaint on failure.
pub fn ptxas(ptx: &str, chip: &str, toolkit: &Path) -> Result<String, String> {
    let dir = std::env::temp_dir().join(format!("kiln-ptxas-{}-{chip}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let src = dir.join("k.ptx");
    std::fs::write(&src, ptx).map_err(|e| e.to_string())?;
    let out = std::process::Command::new(toolkit.join("bin/ptxas"))
        .arg(format!("-arch={chip}"))
        .arg("-v")
        .arg(&src)
        .arg("-o")
        .arg(dir.join("k.cubin"))
        .output()
        .map_err(|e| format!("cannot run {}: {e}", toolkit.join("bin/ptxas").display()))?;
    let _ = std::fs::remove_dir_all(&dir);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}
