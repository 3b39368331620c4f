//! kiln's runtime library.
//!
//! Today it carries the tensor interchange format users meet at the command line (`.npy` files in
//! and out); loading and executing compiled artifacts lands here with the CPU backend.
//!
//! Architecture invariant: this crate depends on `kiln-ir` only — never on the frontend, the
//! optimizer or a code generator — so a deployed binary carries none of them.

pub mod npy;

pub use kiln_ir::{DType, Tensor};
