//! The sidecar against bare Pingora by CPU per request, from paired rounds.
//!
//! On a shared machine one round can be several percent off the next for reasons neither proxy
//! controls (a neighbour's load on the shared core and cache). A ratio of two totals over three
//! rounds moves by as much as the difference it is meant to show. Here the two proxies run in
//! many short rounds, in pairs (one right after the other, in alternating order). The median
//! of the pairs' ratios is one that the odd spoiled round cannot move; the middle half of them
//! shows how far the rest spread; the pooled ratio (all CPU time over all requests) is the
//! three-round measurement's, alternated more finely.

/// One proxy's round: the CPU time its process used and the requests it served.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Round {
    pub cpu_ns: u64,
    pub requests: u64,
}

impl Round {
    /// CPU µs per request; 0 when none was served.
    pub fn us_per_request(&self) -> f64 {
        if self.requests == 0 {
            return 0.0;
        }
        self.cpu_ns as f64 / 1000.0 / self.requests as f64
    }
}

/// One pair of rounds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Pair {
    pub sidecar: Round,
    pub bare: Round,
}

impl Pair {
    /// Bare Pingora's CPU per request over the sidecar's: 1 is equal cost, below 1 the sidecar
    /// costs more.
    pub fn ratio(&self) -> f64 {
        self.bare.us_per_request() / self.sidecar.us_per_request()
    }
}

/// What the pairs say (ratios as [`Pair::ratio`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub pairs: usize,
    /// Median of the pairs' ratios.
    pub median: f64,
    /// The middle half of the pairs' ratios (the ratios at [`quartile_ranks`]).
    pub middle: (f64, f64),
    /// CPU µs per request of each proxy over all its rounds, and their ratio.
    pub sidecar_us: f64,
    pub bare_us: f64,
    pub pooled: f64,
}

/// The summary of `pairs`; `None` when there is none, or a round served nothing or used no
/// CPU (no ratio to take).
pub fn summarize(pairs: &[Pair]) -> Option<Summary> {
    let counted = |r: &Round| r.requests > 0 && r.cpu_ns > 0;
    if pairs.is_empty()
        || !pairs
            .iter()
            .all(|p| counted(&p.sidecar) && counted(&p.bare))
    {
        return None;
    }
    let mut ratios: Vec<f64> = pairs.iter().map(Pair::ratio).collect();
    ratios.sort_by(f64::total_cmp);
    let n = ratios.len();
    let total = |f: fn(&Pair) -> Round| {
        pairs.iter().map(f).fold(Round::default(), |a, r| Round {
            cpu_ns: a.cpu_ns + r.cpu_ns,
            requests: a.requests + r.requests,
        })
    };
    let (sidecar_us, bare_us) = (
        total(|p| p.sidecar).us_per_request(),
        total(|p| p.bare).us_per_request(),
    );
    Some(Summary {
        pairs: n,
        median: median_sorted(&ratios),
        middle: {
            let (lo, hi) = quartile_ranks(n);
            (ratios[lo], ratios[hi])
        },
        sidecar_us,
        bare_us,
        pooled: bare_us / sidecar_us,
    })
}

/// The 0-based ranks of the lower and upper quartile in `n` (≥ 1) sorted values.
pub fn quartile_ranks(n: usize) -> (usize, usize) {
    (n / 4, n - 1 - n / 4)
}

/// The 0-based ranks, in `n` sorted values, of a distribution-free 95 % confidence interval
/// for the median: the `j`-th smallest and the `j`-th largest, for the largest `j` with
/// P(X < j) ≤ 2.5 % where X, the count of values under the median, is binomial(n, ½). It assumes
/// nothing about how the ratios spread, only that the pairs are independent. `None` below 6
/// values (the whole range would not reach 95 %) and above 1,000 (not needed here).
pub fn median_ranks(n: usize) -> Option<(usize, usize)> {
    if !(6..=1000).contains(&n) {
        return None;
    }
    // P(X = k), from P(X = 0) = 2^-n, and the running P(X <= k).
    let mut p = 0.5f64.powi(n as i32);
    let mut below = p;
    let mut j = 0;
    while below <= 0.025 {
        j += 1;
        p *= (n - j + 1) as f64 / j as f64;
        below += p;
    }
    // P(X <= j - 1) <= 2.5 % < P(X <= j): the j-th smallest (1-based) is the lower end.
    Some((j - 1, n - j))
}

/// The sentence the paired table's heading ends with: between which of the `n` ratios the
/// median lies with 95 % confidence, and whether those are the middle half's ends (as with 24
/// pairs); empty when `n` is too small for an interval.
pub fn median_interval_note(n: usize) -> String {
    let Some((lo, hi)) = median_ranks(n) else {
        return String::new();
    };
    let middle = if (lo, hi) == quartile_ranks(n) {
        ": the middle half's ends"
    } else {
        ""
    };
    format!(
        " The median of the machine's pairs lies, with 95 % confidence, between the ratios \
         ranked {} and {} of {n} from the smallest (distribution-free, from their order \
         alone){middle}.",
        lo + 1,
        hi + 1,
    )
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

    /// A pair from CPU µs per request, 1,000 requests each.
    fn pair(sidecar_us: u64, bare_us: u64) -> Pair {
        let round = |us: u64| Round {
            cpu_ns: us * 1_000_000,
            requests: 1000,
        };
        Pair {
            sidecar: round(sidecar_us),
            bare: round(bare_us),
        }
    }

    #[test]
    fn one_spoiled_round_moves_the_pooled_ratio_not_the_median() {
        // Four pairs at 0.96 and one where the sidecar's round met a busy neighbour.
        let pairs = [
            pair(50, 48),
            pair(25, 24),
            pair(80, 48),
            pair(50, 48),
            pair(100, 96),
        ];
        let s = summarize(&pairs).unwrap();
        assert_eq!(s.pairs, 5);
        assert!((s.median - 0.96).abs() < 1e-9, "{s:?}");
        // Sorted ratios: 0.6, 0.96, 0.96, 0.96, 0.96; the quartiles are the 2nd and 4th.
        assert!((s.middle.0 - 0.96).abs() < 1e-9 && (s.middle.1 - 0.96).abs() < 1e-9);
        // All CPU over all requests: 305 against 264 µs per 5 × 1,000 requests.
        assert!((s.sidecar_us - 61.0).abs() < 1e-9 && (s.bare_us - 52.8).abs() < 1e-9);
        assert!((s.pooled - 264.0 / 305.0).abs() < 1e-9, "{s:?}");
    }

    #[test]
    fn an_even_count_takes_the_mean_of_the_two_middle_ratios() {
        let s = summarize(&[pair(10, 9), pair(10, 10), pair(10, 8), pair(10, 11)]).unwrap();
        // Sorted: 0.8, 0.9, 1.0, 1.1.
        assert!((s.median - 0.95).abs() < 1e-9, "{s:?}");
        assert_eq!(s.middle, (0.9, 1.0));
    }

    /// The pooled ratio weighs rounds by their requests, as the three-round totals do.
    #[test]
    fn the_pooled_ratio_counts_every_request_once() {
        let mut busy = pair(10, 10);
        busy.sidecar.requests = 3000;
        busy.sidecar.cpu_ns = 3000 * 20_000;
        let s = summarize(&[busy, pair(10, 10)]).unwrap();
        // Sidecar: 70 ms over 4,000 requests; bare: 20 ms over 2,000.
        assert!((s.sidecar_us - 17.5).abs() < 1e-9 && (s.bare_us - 10.0).abs() < 1e-9);
        assert!((s.pooled - 10.0 / 17.5).abs() < 1e-9);
    }

    /// The ranks are the textbook ones (n = 12: the 3rd and 10th smallest, 96.1 %; n = 24: the
    /// 7th and 18th), inside the range and around the median for every size, none below 6.
    #[test]
    fn the_median_interval_takes_the_binomial_ranks() {
        let cases = [
            (5, None),
            (6, Some((0, 5))),
            (12, Some((2, 9))),
            (20, Some((5, 14))),
            (24, Some((6, 17))),
            (100, Some((39, 60))),
            (1001, None),
        ];
        for (n, want) in cases {
            assert_eq!(median_ranks(n), want, "n = {n}");
        }
        for n in 6..=1000 {
            let (lo, hi) = median_ranks(n).unwrap();
            assert!(
                lo <= (n - 1) / 2 && hi >= n / 2 && hi < n,
                "n = {n}: {lo}..{hi}"
            );
        }
        // With 24 pairs, the full benchmark's, it is the middle half, and the heading says so.
        assert_eq!(median_ranks(24), Some(quartile_ranks(24)));
        assert_ne!(median_ranks(12), Some(quartile_ranks(12)));
        let full = median_interval_note(24);
        assert!(
            full.contains("ranked 7 and 18 of 24") && full.ends_with("the middle half's ends."),
            "{full}"
        );
        let quick = median_interval_note(12);
        assert!(
            quick.contains("ranked 3 and 10 of 12") && !quick.contains("middle half"),
            "{quick}"
        );
        assert_eq!(median_interval_note(2), "");
    }

    #[test]
    fn nothing_to_compare_is_no_summary() {
        assert_eq!(summarize(&[]), None);
        assert_eq!(summarize(&[pair(10, 9), pair(0, 9)]), None);
        let mut idle = pair(10, 9);
        idle.bare.requests = 0;
        assert_eq!(summarize(&[idle]), None);
    }
}
