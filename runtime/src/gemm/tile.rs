//! One register tile of a packed product: what every microkernel is handed.

/// `C[0..R, 0..cols] (+)= A[0..R, 0..kc] · panel[0..kc, 0..NR]`, then, on the last depth block,
/// `C = scale · C + bias[col] + res[row, col]`. `A` is row-major with row stride `lda`; the panel
/// is `kc` rows of `NR` contiguous floats (zero past `cols`); `C` and `res` have row stride `ldc`.
pub struct Tile {
    /// First element of the tile's rows of `A` at this depth block.
    pub a: *const f32,
    /// Row stride of `A`.
    pub lda: usize,
    /// The panel at this depth block.
    pub b: *const f32,
    /// Depth of this block.
    pub kc: usize,
    /// First element of the tile in `C`.
    pub c: *mut f32,
    /// Row stride of `C` (and of `res`).
    pub ldc: usize,
    /// Valid columns (`<= NR`); the kernel writes no others.
    pub cols: usize,
    /// Whether `C` holds the partial sums of earlier depth blocks.
    pub load_c: bool,
    /// Whether this is the last depth block: apply the epilogue.
    pub last: bool,
    /// Multiplies the product.
    pub scale: f32,
    /// The bias at the tile's first column, or null.
    pub bias: *const f32,
    /// The residual at the tile's first element, or null.
    pub res: *const f32,
}

impl Tile {
    /// The epilogue of one element, in the order every kernel applies it: the sum so far (plus
    /// earlier blocks' partial sums), then on the last block scale, bias, residual.
    ///
    /// # Safety
    /// `r`, `j` lie inside the tile; `bias` and `res` are null or valid for it.
    #[inline(always)]
    pub unsafe fn finish(&self, r: usize, j: usize, mut v: f32) -> f32 {
        if self.load_c {
            v += *self.c.add(r * self.ldc + j);
        }
        if self.last {
            v *= self.scale;
            if !self.bias.is_null() {
                v += *self.bias.add(j);
            }
            if !self.res.is_null() {
                v += *self.res.add(r * self.ldc + j);
            }
        }
        v
    }

    /// Writes a tile computed into `tmp` (`R` rows of `nr` floats) through [`Tile::finish`],
    /// for the columns that exist.
    ///
    /// # Safety
    /// As for [`Tile::finish`], for `rows` rows.
    pub unsafe fn store_scalar(&self, rows: usize, nr: usize, tmp: &[f32]) {
        for r in 0..rows {
            for j in 0..self.cols {
                let v = self.finish(r, j, tmp[r * nr + j]);
                *self.c.add(r * self.ldc + j) = v;
            }
        }
    }
}
