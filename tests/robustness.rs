//! Malformed specs never panic: thousands of mutated copies of every bundled spec either lower or
//! produce a rendered error.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};

use common::Rng;
use kiln_frontend::{lower_source, Options};

const PIECES: &[&str] = &[
    "\"",
    "(",
    ")",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "0",
    "-1",
    "999999999999",
    "\"x\"",
    "\"hidden\"",
    "\"batch\"",
    "1e-5",
    "true",
    "Linear",
    "Add(a: \"x\", b: \"x\")",
    "// c\n",
    "\"{i}\"",
    "\"{\"",
    "\"1/0\"",
    "\"hidden / 0\"",
];

fn mutate(src: &str, rng: &mut Rng) -> String {
    let mut s: Vec<char> = src.chars().collect();
    for _ in 0..1 + rng.below(3) {
        let at = rng.below(s.len());
        match rng.below(3) {
            0 => {
                let n = 1 + rng.below(8);
                s.drain(at..(at + n).min(s.len()));
            }
            1 => {
                let p: Vec<char> = PIECES[rng.below(PIECES.len())].chars().collect();
                s.splice(at..at, p);
            }
            _ => {
                // Swap a number for another, or a name for a near-miss.
                if let Some(c) = s.get_mut(at) {
                    *c = if c.is_ascii_digit() {
                        char::from(b'0' + rng.below(10) as u8)
                    } else {
                        'z'
                    };
                }
            }
        }
    }
    s.into_iter().collect()
}

#[test]
fn mutated_specs_never_panic() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("specs");
    let mut rng = Rng(42);
    let (mut ok, mut rejected) = (0, 0);
    for name in ["minilm.ron", "gpt2.ron", "llama.ron", "mlp.ron"] {
        let src = std::fs::read_to_string(root.join(name)).expect("spec exists");
        for i in 0..400 {
            let m = mutate(&src, &mut rng);
            let r = catch_unwind(AssertUnwindSafe(|| {
                lower_source(name, &m, &Options::default())
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }));
            match r {
                Ok(Ok(())) => ok += 1,
                Ok(Err(msg)) => {
                    assert!(
                        msg.contains("error"),
                        "{name} mutation {i}: an error without a message: {msg}"
                    );
                    rejected += 1;
                }
                Err(_) => panic!("{name} mutation {i} panicked; the spec was:\n{m}"),
            }
        }
    }
    eprintln!("{ok} mutated specs still lowered, {rejected} were rejected with errors");
    assert!(rejected > 800, "the mutations should mostly break specs");
}
