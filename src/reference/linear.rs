//! Reference matmuls of a linear layer in PyTorch's convention (`W` is `[out, in]`): the
//! oracle for every fused kernel that computes one. f64 accumulation, one rounding to the
//! output dtype.

use crate::dtype::FloatElem;
use crate::error::{Error, Result};
use crate::reference::by_rows;

/// `y[m, n] = Σ_k x[m, k] · w[n, k]` (y = x Wᵀ) for `x` `[rows, k]`, `w` `[n, k]`. Errors
/// ([`Error::ShapeMismatch`]) if a length is not its shape's.
pub fn linear<T: FloatElem, W: FloatElem>(
    x: &[T],
    w: &[W],
    rows: usize,
    n: usize,
    k: usize,
) -> Result<Vec<T>> {
    Error::check_shape("linear x [rows, k]", &[rows, k], x.len())?;
    Error::check_shape("linear w [n, k]", &[n, k], w.len())?;
    output_fits("linear y [rows, n]", rows, n)?;
    let w: Vec<f64> = w.iter().map(|v| v.to_f32() as f64).collect();
    Ok(by_rows(rows, n, k, T::from_f32(0.0), |r, y| {
        let xr: Vec<f64> = x[r * k..(r + 1) * k]
            .iter()
            .map(|v| v.to_f32() as f64)
            .collect();
        for (j, out) in y.iter_mut().enumerate() {
            let wr = &w[j * k..(j + 1) * k];
            let s: f64 = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
            *out = T::from_f32(s as f32);
        }
    }))
}

/// `dx[m, k] = Σ_n dy[m, n] · w[n, k]` (dX = dY W) for `dy` `[rows, n]`, `w` `[n, k]`.
/// Errors ([`Error::ShapeMismatch`]) if a length is not its shape's.
pub fn linear_dx<T: FloatElem, W: FloatElem>(
    dy: &[T],
    w: &[W],
    rows: usize,
    n: usize,
    k: usize,
) -> Result<Vec<T>> {
    Error::check_shape("linear_dx dy [rows, n]", &[rows, n], dy.len())?;
    Error::check_shape("linear_dx w [n, k]", &[n, k], w.len())?;
    output_fits("linear_dx dx [rows, k]", rows, k)?;
    Ok(by_rows(rows, k, n, T::from_f32(0.0), |r, dx| {
        let mut acc = vec![0f64; k];
        for j in 0..n {
            let g = dy[r * n + j].to_f32() as f64;
            for (a, wv) in acc.iter_mut().zip(&w[j * k..(j + 1) * k]) {
                *a += g * wv.to_f32() as f64;
            }
        }
        for (d, a) in dx.iter_mut().zip(&acc) {
            *d = T::from_f32(*a as f32);
        }
    }))
}

/// An output `[rows, cols]` whose element count fits a usize (with an empty inner dimension
/// the inputs' lengths bound neither).
fn output_fits(what: &'static str, rows: usize, cols: usize) -> Result<()> {
    match rows.checked_mul(cols) {
        Some(_) => Ok(()),
        None => Err(Error::InvalidArgument {
            what,
            why: format!("{rows} × {cols} elements is more than a usize counts"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_known_products() {
        // x = [[1, 2]], w = [[3, 4], [5, 6], [7, 8]]: y = [11, 17, 23]; dX of dy = [1, 0, 2]
        // is 1*[3, 4] + 2*[7, 8] = [17, 20].
        let w = [3f32, 4.0, 5.0, 6.0, 7.0, 8.0];
        assert_eq!(
            linear(&[1f32, 2.0], &w, 1, 3, 2).unwrap(),
            [11.0, 17.0, 23.0]
        );
        assert_eq!(
            linear_dx(&[1f32, 0.0, 2.0], &w, 1, 3, 2).unwrap(),
            [17.0, 20.0]
        );
    }

    /// Lengths that are not their shapes', and outputs no usize counts, are typed errors.
    #[test]
    fn bad_shapes_are_errors() {
        let w = [3f32, 4.0, 5.0, 6.0, 7.0, 8.0];
        let shape = |r: Result<Vec<f32>>| matches!(r, Err(Error::ShapeMismatch { .. }));
        assert!(shape(linear(&[1f32, 2.0, 3.0], &w, 1, 3, 2)));
        assert!(shape(linear(&[1f32, 2.0], &w[..5], 1, 3, 2)));
        assert!(shape(linear(&[1f32, 2.0], &w, usize::MAX, 3, 2)));
        assert!(shape(linear_dx(&[1f32, 0.0], &w, 1, 3, 2)));
        assert!(shape(linear_dx(&[1f32, 0.0, 2.0], &w, 1, 2, 3)));
        let huge = usize::MAX / 2;
        assert!(matches!(
            linear::<f32, f32>(&[], &[], huge, huge, 0),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            linear_dx::<f32, f32>(&[], &[], huge, 0, huge),
            Err(Error::InvalidArgument { .. })
        ));
    }
}
