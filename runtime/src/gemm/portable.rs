//! The portable microkernel: 4 × 8 tiles in plain Rust (the compiler vectorises the 8-wide rows
//! with whatever the architecture's baseline offers: SSE2 on x86-64, NEON on aarch64).

use super::tile::Tile;

/// Rows per tile.
pub const MR: usize = 4;
/// Columns per packed panel.
pub const NR: usize = 8;

/// Runs one tile of `rows` (1..=MR) rows.
///
/// # Safety
/// The tile's pointers are valid for `rows` rows (see [`Tile`]).
pub unsafe fn run(rows: usize, t: &Tile) {
    match rows {
        1 => tile::<1>(t),
        2 => tile::<2>(t),
        3 => tile::<3>(t),
        _ => tile::<4>(t),
    }
}

unsafe fn tile<const R: usize>(t: &Tile) {
    let mut acc = [[0f32; NR]; R];
    for kk in 0..t.kc {
        let b = std::slice::from_raw_parts(t.b.add(kk * NR), NR);
        for (r, row) in acc.iter_mut().enumerate() {
            let x = *t.a.add(r * t.lda + kk);
            for (o, w) in row.iter_mut().zip(b) {
                *o += x * w;
            }
        }
    }
    t.store_scalar(R, NR, acc.as_flattened());
}
