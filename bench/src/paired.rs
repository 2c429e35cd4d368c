//! The sidecar against bare Pingora by CPU per request, from paired rounds.
//!
//! On a shared machine one round can be several percent off the next for reasons neither proxy
//! controls (a neighbour's load, the frequency the core runs at). A ratio of two totals over
//! three rounds moves by as much as the difference it is meant to show. Short rounds taken in
//! pairs — the two proxies one right after the other, in alternating order — see nearly the
//! same machine. The median of the pairs' ratios ignores the odd round a neighbour spoiled; the
//! middle half of them shows how far the rest spread.

/// One pair of rounds: CPU µs per request of each proxy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pair {
    pub sidecar_us: f64,
    pub bare_us: f64,
}

/// What the pairs say. Ratios are bare Pingora's CPU per request over the sidecar's: 1 is
/// equal cost, below 1 the sidecar costs more.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub pairs: usize,
    /// Median of the pairs' ratios.
    pub median: f64,
    /// The middle half of the pairs' ratios (lower and upper quartile).
    pub middle: (f64, f64),
    /// Median CPU µs per request of each proxy.
    pub sidecar_us: f64,
    pub bare_us: f64,
}

/// The summary of `pairs`; `None` when there is none, or a round served nothing (no CPU
/// per request to compare).
pub fn summarize(pairs: &[Pair]) -> Option<Summary> {
    if pairs.is_empty()
        || pairs
            .iter()
            .any(|p| !(p.sidecar_us > 0.0 && p.bare_us > 0.0))
    {
        return None;
    }
    let mut ratios: Vec<f64> = pairs.iter().map(|p| p.bare_us / p.sidecar_us).collect();
    ratios.sort_by(f64::total_cmp);
    let n = ratios.len();
    Some(Summary {
        pairs: n,
        median: median_sorted(&ratios),
        middle: (ratios[n / 4], ratios[n - 1 - n / 4]),
        sidecar_us: median(pairs.iter().map(|p| p.sidecar_us).collect()),
        bare_us: median(pairs.iter().map(|p| p.bare_us).collect()),
    })
}

/// The median of `v`; 0 for none.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    median_sorted(&v)
}

fn median_sorted(v: &[f64]) -> f64 {
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(sidecar_us: f64, bare_us: f64) -> Pair {
        Pair {
            sidecar_us,
            bare_us,
        }
    }

    #[test]
    fn one_spoiled_round_moves_the_median_not_the_verdict() {
        // Four pairs at 0.96 and one where the sidecar's round met a busy neighbour.
        let pairs = [
            pair(50.0, 48.0),
            pair(25.0, 24.0),
            pair(80.0, 48.0),
            pair(50.0, 48.0),
            pair(100.0, 96.0),
        ];
        let s = summarize(&pairs).unwrap();
        assert_eq!(s.pairs, 5);
        assert!((s.median - 0.96).abs() < 1e-9, "{s:?}");
        // Sorted ratios: 0.6, 0.96, 0.96, 0.96, 0.96; the quartiles are the 2nd and 4th.
        assert!((s.middle.0 - 0.96).abs() < 1e-9 && (s.middle.1 - 0.96).abs() < 1e-9);
        assert_eq!((s.sidecar_us, s.bare_us), (50.0, 48.0));
    }

    #[test]
    fn an_even_count_takes_the_mean_of_the_two_middle_ratios() {
        let s = summarize(&[
            pair(10.0, 9.0),
            pair(10.0, 10.0),
            pair(10.0, 8.0),
            pair(10.0, 11.0),
        ])
        .unwrap();
        // Sorted: 0.8, 0.9, 1.0, 1.1.
        assert!((s.median - 0.95).abs() < 1e-9, "{s:?}");
        assert_eq!(s.middle, (0.9, 1.0));
    }

    #[test]
    fn nothing_to_compare_is_no_summary() {
        assert_eq!(summarize(&[]), None);
        assert_eq!(summarize(&[pair(10.0, 9.0), pair(0.0, 9.0)]), None);
        assert_eq!(summarize(&[pair(f64::NAN, 9.0)]), None);
    }
}
