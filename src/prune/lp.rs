//! A small dense linear-program solver for the balance search: minimise `c·x` subject to
//! `A x = b`, `x >= 0`, by the two-phase simplex method with Bland's rule (no cycling on the
//! highly degenerate problems balance constraints give). Problems here have at most a few
//! hundred rows and columns; callers verify any answer exactly.

const EPS: f64 = 1e-9;

/// Most pivots before giving up.
const MAX_PIVOTS: usize = 100_000;

struct Tableau {
    /// `rows` constraint rows then the objective row; the last column is the right side.
    t: Vec<Vec<f64>>,
    basis: Vec<usize>,
    rows: usize,
    cols: usize,
}

impl Tableau {
    fn pivot(&mut self, r: usize, c: usize) {
        let p = self.t[r][c];
        for v in &mut self.t[r] {
            *v /= p;
        }
        let pivot_row = self.t[r].clone();
        for (i, row) in self.t.iter_mut().enumerate() {
            if i == r {
                continue;
            }
            let f = row[c];
            if f.abs() > 0.0 {
                for (v, pv) in row.iter_mut().zip(&pivot_row) {
                    *v -= f * pv;
                }
                row[c] = 0.0;
            }
        }
        self.basis[r] = c;
    }

    /// Runs simplex iterations on the objective row, letting only columns `allowed` enter.
    /// `false` if unbounded or out of pivots.
    fn optimise(&mut self, allowed: &dyn Fn(usize) -> bool, pivots: &mut usize) -> bool {
        let obj = self.rows;
        loop {
            let Some(c) = (0..self.cols).find(|&j| allowed(j) && self.t[obj][j] < -EPS) else {
                return true;
            };
            let mut best: Option<(f64, usize, usize)> = None;
            for r in 0..self.rows {
                let a = self.t[r][c];
                if a > EPS {
                    let ratio = self.t[r][self.cols] / a;
                    let better = match best {
                        None => true,
                        Some((q, _, b)) => {
                            ratio < q - EPS || (ratio <= q + EPS && self.basis[r] < b)
                        }
                    };
                    if better {
                        best = Some((ratio, r, self.basis[r]));
                    }
                }
            }
            let Some((_, r, _)) = best else {
                return false;
            };
            self.pivot(r, c);
            *pivots += 1;
            if *pivots > MAX_PIVOTS {
                return false;
            }
        }
    }
}

/// Minimises `c·x` subject to `a x = b`, `x >= 0`; `None` when infeasible, unbounded or too
/// hard. Rows of `a` all have `c.len()` entries.
pub(crate) fn minimise(a: &[Vec<f64>], b: &[f64], c: &[f64]) -> Option<Vec<f64>> {
    let (m, n) = (a.len(), c.len());
    let cols = n + m;
    let mut t = vec![vec![0.0; cols + 1]; m + 1];
    for i in 0..m {
        let sign = if b[i] < 0.0 { -1.0 } else { 1.0 };
        for j in 0..n {
            t[i][j] = sign * a[i][j];
        }
        t[i][n + i] = 1.0;
        t[i][cols] = sign * b[i];
    }
    // Phase 1: minimise the sum of the artificial variables.
    let (constraints, objective) = t.split_at_mut(m);
    for (j, v) in objective[0].iter_mut().enumerate() {
        let s: f64 = constraints.iter().map(|row| row[j]).sum();
        *v = if (n..n + m).contains(&j) { 0.0 } else { -s };
    }
    let mut tab = Tableau {
        t,
        basis: (n..n + m).collect(),
        rows: m,
        cols,
    };
    let mut pivots = 0;
    if !tab.optimise(&|_| true, &mut pivots) || -tab.t[m][cols] > 1e-7 {
        return None;
    }
    // Drive artificial variables out of the basis where a real column can replace them.
    for r in 0..m {
        if tab.basis[r] >= n
            && let Some(j) = (0..n).find(|&j| tab.t[r][j].abs() > EPS)
        {
            tab.pivot(r, j);
        }
    }
    // Phase 2: the real objective, artificial columns barred from entering.
    for j in 0..=cols {
        let mut v = if j < n { c[j] } else { 0.0 };
        for r in 0..m {
            let bj = tab.basis[r];
            if bj < n {
                v -= c[bj] * tab.t[r][j];
            }
        }
        tab.t[m][j] = v;
    }
    if !tab.optimise(&|j| j < n, &mut pivots) {
        return None;
    }
    let mut x = vec![0.0; n];
    for r in 0..m {
        if tab.basis[r] < n {
            x[tab.basis[r]] = tab.t[r][cols];
        }
    }
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::minimise;

    #[test]
    fn solves_a_small_problem() {
        // min x + y subject to x - 2y = 0, x >= 2 (x - s = 2).
        let a = vec![vec![1.0, -2.0, 0.0], vec![1.0, 0.0, -1.0]];
        let x = minimise(&a, &[0.0, 2.0], &[1.0, 1.0, 0.0]).unwrap();
        assert!(
            (x[0] - 2.0).abs() < 1e-9 && (x[1] - 1.0).abs() < 1e-9,
            "{x:?}"
        );
    }

    #[test]
    fn reports_infeasible() {
        // x + y = -1 with x, y >= 0.
        assert!(minimise(&[vec![1.0, 1.0]], &[-1.0], &[1.0, 1.0]).is_none());
    }
}
