//! Trust calibration: how well a player's stated probabilities (that its
//! move is legal, that it will win) match what happened.
//!
//! The reliability diagram's bins follow scikit-learn's
//! `calibration_curve`, so the two agree on the same data: equal-width
//! bins split [0, 1] at `k / n`, equal-mass bins at the forecasts'
//! percentiles (linear interpolation), and a forecast on an edge falls in
//! the bin below it. ECE is the count-weighted mean gap between a bin's
//! mean forecast and its observed rate, MCE the largest gap; the Brier
//! score is decomposed (Murphy) over the equal-width bins into
//! reliability − resolution + uncertainty, with the within-bin remainder
//! given so the sum is exact.

use serde::Serialize;

use crate::rating::{quantile, SplitMix};

/// How bins are cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Binning {
    EqualWidth,
    EqualMass,
}

/// One bin of a reliability diagram.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Bin {
    pub low: f64,
    pub high: f64,
    pub count: usize,
    /// The mean forecast in the bin.
    pub forecast: f64,
    /// The share of the bin's events that happened.
    pub observed: f64,
}

/// A value and its bootstrap interval.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Estimate {
    pub value: f64,
    pub low: f64,
    pub high: f64,
}

/// The Brier score and its parts: `score = reliability - resolution +
/// uncertainty + within_bin`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Brier {
    pub score: f64,
    pub reliability: f64,
    pub resolution: f64,
    pub uncertainty: f64,
    pub within_bin: f64,
}

/// Everything the calibration report shows for one set of forecasts.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub n: usize,
    pub base_rate: f64,
    pub mean_forecast: f64,
    pub bins: usize,
    pub equal_width: Vec<Bin>,
    pub equal_mass: Vec<Bin>,
    pub ece: Estimate,
    pub mce: Estimate,
    pub ece_equal_mass: Estimate,
    pub brier: Brier,
    pub log_loss: f64,
    /// None when only one outcome occurred.
    pub auroc: Option<f64>,
}

/// The bin edges scikit-learn would use.
fn edges(p: &[f64], bins: usize, how: Binning) -> Vec<f64> {
    match how {
        // As numpy's linspace: k steps of 1/n, the last edge exactly 1.
        Binning::EqualWidth => (0..=bins)
            .map(|k| {
                if k == bins {
                    1.0
                } else {
                    k as f64 * (1.0 / bins as f64)
                }
            })
            .collect(),
        Binning::EqualMass => {
            let mut sorted = p.to_vec();
            sorted.sort_by(f64::total_cmp);
            (0..=bins)
                .map(|k| quantile(&sorted, k as f64 / bins as f64))
                .collect()
        }
    }
}

/// Which bin `x` falls in: the number of inner edges below it.
fn bin_of(inner: &[f64], x: f64) -> usize {
    inner.partition_point(|e| *e < x)
}

/// The reliability diagram's non-empty bins.
pub fn reliability(p: &[f64], y: &[bool], bins: usize, how: Binning) -> Vec<Bin> {
    let bins = bins.max(1);
    let e = edges(p, bins, how);
    let inner = &e[1..bins];
    let mut count = vec![0usize; bins];
    let mut sum_p = vec![0.0; bins];
    let mut sum_y = vec![0.0; bins];
    for (&pi, &yi) in p.iter().zip(y) {
        let b = bin_of(inner, pi);
        count[b] += 1;
        sum_p[b] += pi;
        sum_y[b] += f64::from(u8::from(yi));
    }
    (0..bins)
        .filter(|b| count[*b] > 0)
        .map(|b| Bin {
            low: e[b],
            high: e[b + 1],
            count: count[b],
            forecast: sum_p[b] / count[b] as f64,
            observed: sum_y[b] / count[b] as f64,
        })
        .collect()
}

/// Expected and maximum calibration error over `bins`.
pub fn ece_mce(bins: &[Bin]) -> (f64, f64) {
    let n: usize = bins.iter().map(|b| b.count).sum();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let gap = |b: &Bin| (b.observed - b.forecast).abs();
    let ece = bins.iter().map(|b| b.count as f64 * gap(b)).sum::<f64>() / n as f64;
    let mce = bins.iter().map(gap).fold(0.0, f64::max);
    (ece, mce)
}

/// The Brier score, decomposed over `bins` equal-width bins.
pub fn brier(p: &[f64], y: &[bool], bins: usize) -> Brier {
    let n = p.len().max(1) as f64;
    let yf = |b: bool| f64::from(u8::from(b));
    let score = p
        .iter()
        .zip(y)
        .map(|(pi, yi)| (pi - yf(*yi)).powi(2))
        .sum::<f64>()
        / n;
    let base = y.iter().map(|b| yf(*b)).sum::<f64>() / n;
    let bs = reliability(p, y, bins, Binning::EqualWidth);
    let reliability = bs
        .iter()
        .map(|b| b.count as f64 * (b.forecast - b.observed).powi(2))
        .sum::<f64>()
        / n;
    let resolution = bs
        .iter()
        .map(|b| b.count as f64 * (b.observed - base).powi(2))
        .sum::<f64>()
        / n;
    let uncertainty = base * (1.0 - base);
    Brier {
        score,
        reliability,
        resolution,
        uncertainty,
        within_bin: score - (reliability - resolution + uncertainty),
    }
}

/// Mean negative log likelihood, forecasts clipped as scikit-learn does.
pub fn log_loss(p: &[f64], y: &[bool]) -> f64 {
    let eps = f64::EPSILON;
    let n = p.len().max(1) as f64;
    -p.iter()
        .zip(y)
        .map(|(pi, yi)| {
            let q = pi.clamp(eps, 1.0 - eps);
            if *yi {
                q.ln()
            } else {
                (1.0 - q).ln()
            }
        })
        .sum::<f64>()
        / n
}

/// The area under the ROC curve: the chance a random event that happened
/// was given a higher forecast than one that did not (ties count half).
pub fn auroc(p: &[f64], y: &[bool]) -> Option<f64> {
    let mut idx: Vec<usize> = (0..p.len()).collect();
    idx.sort_by(|a, b| p[*a].total_cmp(&p[*b]));
    // Average ranks over ties, then Mann–Whitney.
    let mut ranks = vec![0.0; p.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && p[idx[j + 1]] == p[idx[i]] {
            j += 1;
        }
        let r = (i + j) as f64 / 2.0 + 1.0;
        for k in &idx[i..=j] {
            ranks[*k] = r;
        }
        i = j + 1;
    }
    let pos = y.iter().filter(|b| **b).count() as f64;
    let neg = y.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return None;
    }
    let sum: f64 = ranks
        .iter()
        .zip(y)
        .filter(|(_, b)| **b)
        .map(|(r, _)| r)
        .sum();
    Some((sum - pos * (pos + 1.0) / 2.0) / (pos * neg))
}

/// The whole report, with bootstrap intervals at `level` from `rounds`
/// resamplings of the forecasts.
pub fn report(p: &[f64], y: &[bool], bins: usize, rounds: usize, level: f64, seed: u64) -> Report {
    let n = p.len().min(y.len());
    let (p, y) = (&p[..n], &y[..n]);
    let ew = reliability(p, y, bins, Binning::EqualWidth);
    let em = reliability(p, y, bins, Binning::EqualMass);
    let (ece, mce) = ece_mce(&ew);
    let (ece_m, _) = ece_mce(&em);
    let mut samples = [Vec::new(), Vec::new(), Vec::new()];
    let mut rng = SplitMix(seed);
    let (mut bp, mut by) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..if n == 0 { 0 } else { rounds } {
        bp.clear();
        by.clear();
        for _ in 0..n {
            let k = (rng.next_u64() % n as u64) as usize;
            bp.push(p[k]);
            by.push(y[k]);
        }
        let (e, m) = ece_mce(&reliability(&bp, &by, bins, Binning::EqualWidth));
        let (em_e, _) = ece_mce(&reliability(&bp, &by, bins, Binning::EqualMass));
        samples[0].push(e);
        samples[1].push(m);
        samples[2].push(em_e);
    }
    let tail = (1.0 - level) / 2.0;
    let mut est = |k: usize, value: f64| {
        let xs = &mut samples[k];
        xs.sort_by(f64::total_cmp);
        Estimate {
            value,
            low: quantile(xs, tail),
            high: quantile(xs, 1.0 - tail),
        }
    };
    let ece = est(0, ece);
    let mce = est(1, mce);
    let ece_equal_mass = est(2, ece_m);
    Report {
        n,
        base_rate: y.iter().filter(|b| **b).count() as f64 / n.max(1) as f64,
        mean_forecast: p.iter().sum::<f64>() / n.max(1) as f64,
        bins,
        equal_width: ew,
        equal_mass: em,
        ece,
        mce,
        ece_equal_mass,
        brier: brier(p, y, bins),
        log_loss: log_loss(p, y),
        auroc: auroc(p, y),
    }
}

/// The reliability diagram as an SVG image: forecast against observed
/// rate for both binnings (the diagonal is perfect calibration), and each
/// equal-width bin's count as a bar along the bottom.
pub fn svg(r: &Report, title: &str) -> String {
    let (w, h, pad) = (420.0, 480.0, 40.0);
    let side = w - 2.0 * pad;
    let x = |v: f64| pad + v * side;
    let y = |v: f64| pad + (1.0 - v) * side;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"11\">\
<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\
<text x=\"{pad}\" y=\"24\" font-size=\"13\">{}</text>\
<rect x=\"{pad}\" y=\"{pad}\" width=\"{side}\" height=\"{side}\" fill=\"none\" stroke=\"#888\"/>\
<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#bbb\" stroke-dasharray=\"4 3\"/>",
        escape(title),
        x(0.0),
        y(0.0),
        x(1.0),
        y(1.0)
    );
    for k in 0..=5 {
        let v = k as f64 / 5.0;
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{v:.1}</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{v:.1}</text>",
            x(v),
            y(0.0) + 14.0,
            pad - 4.0,
            y(v) + 4.0
        );
    }
    let most = r
        .equal_width
        .iter()
        .map(|b| b.count)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    for b in &r.equal_width {
        // Counts along the bottom, under the legend.
        let bh = 40.0 * b.count as f64 / most;
        s += &format!(
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"#cde\"><title>{} in [{:.2}, {:.2}]</title></rect>",
            x(b.low),
            h - 10.0 - bh,
            (b.high - b.low) * side,
            b.count,
            b.low,
            b.high
        );
    }
    for (bins, colour) in [(&r.equal_width, "#1f6fb4"), (&r.equal_mass, "#d2691e")] {
        let points: Vec<String> = bins
            .iter()
            .map(|b| format!("{:.1},{:.1}", x(b.forecast), y(b.observed)))
            .collect();
        s += &format!(
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\"/>",
            points.join(" ")
        );
        for b in bins.iter() {
            s += &format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{colour}\"><title>forecast {:.3}, observed {:.3}, n={}</title></circle>",
                x(b.forecast),
                y(b.observed),
                b.forecast,
                b.observed,
                b.count
            );
        }
    }
    s += &format!(
        "<text x=\"{pad}\" y=\"{}\" fill=\"#1f6fb4\">equal width</text><text x=\"{}\" y=\"{}\" fill=\"#d2691e\">equal mass</text>\
<text x=\"{}\" y=\"{}\" text-anchor=\"end\">ECE {:.3}  MCE {:.3}  n={}</text></svg>",
        y(0.0) + 30.0,
        pad + 80.0,
        y(0.0) + 30.0,
        w - pad,
        y(0.0) + 30.0,
        r.ece.value,
        r.mce.value,
        r.n
    );
    s
}

/// Text made safe for HTML and SVG.
pub fn escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forecasts from `forecast(truth)` for events that happen with
    /// chance `truth`.
    fn sample(n: usize, seed: u64, forecast: impl Fn(f64) -> f64) -> (Vec<f64>, Vec<bool>) {
        let mut rng = SplitMix(seed);
        (0..n)
            .map(|_| {
                let t = rng.unit();
                (forecast(t), rng.unit() < t)
            })
            .unzip()
    }

    #[test]
    fn a_calibrated_forecaster_scores_near_zero_an_overconfident_one_does_not() {
        let (p, y) = sample(4000, 3, |t| t);
        let good = report(&p, &y, 10, 200, 0.95, 1);
        let (p, y) = sample(4000, 3, |t| if t > 0.5 { 0.99 } else { 0.01 });
        let bad = report(&p, &y, 10, 200, 0.95, 1);
        assert!(good.ece.value < 0.03, "{:?}", good.ece);
        assert!(bad.ece.value > 0.2, "{:?}", bad.ece);
        assert!(good.ece.high < bad.ece.low, "the intervals are apart");
        assert!(good.ece.low <= good.ece.value && good.ece.value <= good.ece.high);
        for r in [&good, &bad] {
            let b = &r.brier;
            let sum = b.reliability - b.resolution + b.uncertainty + b.within_bin;
            assert!((sum - b.score).abs() < 1e-12);
            assert_eq!(r.equal_width.iter().map(|b| b.count).sum::<usize>(), 4000);
            assert_eq!(r.equal_mass.iter().map(|b| b.count).sum::<usize>(), 4000);
        }
        assert!(bad.log_loss > good.log_loss);
        assert!(good.auroc.unwrap() > 0.7);
        assert!(svg(&bad, "a <test>").contains("&lt;test&gt;"));
    }

    #[test]
    fn edges_ties_and_one_class() {
        // A forecast on an edge goes to the bin below (as numpy's
        // searchsorted, left side, puts it).
        let bins = reliability(
            &[0.1, 0.2, 1.0, 0.0],
            &[true, false, true, false],
            10,
            Binning::EqualWidth,
        );
        assert_eq!(bins[0].count, 2, "{bins:?}");
        assert_eq!(bins.last().unwrap().count, 1);
        assert_eq!(auroc(&[0.5, 0.5], &[true, false]), Some(0.5));
        assert_eq!(auroc(&[0.1, 0.9], &[true, true]), None);
        assert_eq!(auroc(&[0.1, 0.9, 0.4], &[false, true, false]), Some(1.0));
        assert!((log_loss(&[1.0], &[false]) - 36.04365338911715).abs() < 1e-9);
    }
}
