//! The `kiln` command line (`src/lib.rs`).

fn main() -> std::process::ExitCode {
    kiln::main()
}
