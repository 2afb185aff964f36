//! The exposition every Hangar component serves at `/metrics`: the
//! component gathers its samples into [`Family`]s at scrape time, and
//! `prometheus-client` writes them out, in OpenMetrics when the scraper
//! asks for it (Prometheus does), else in the classic text format 0.0.4.
//!
//! Names are `hangar_<component>_<what>[_<unit>]`; counters end in
//! `_total` in both formats. `docs/metrics.md` lists them all.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What a family's samples are.
#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    Counter,
    Gauge,
    /// Bucket upper bounds (ascending, `+Inf` implied), and per series the
    /// sum and the count in each bucket (not cumulative).
    Histogram(Vec<f64>),
}

/// One sample of a family: its labels and its value (for a histogram,
/// [`Family::histogram`] rows instead).
pub type Labels = Vec<(String, String)>;

/// A metric family, gathered for one scrape.
#[derive(Clone, Debug)]
pub struct Family {
    /// Without the unit or `_total` (those are added).
    pub name: String,
    pub help: String,
    pub unit: Option<&'static str>,
    pub kind: Kind,
    pub samples: Vec<(Labels, f64)>,
    /// Histograms: labels, sum, and per-bucket counts, not cumulative
    /// (`buckets.len() + 1` entries, the last for `+Inf`).
    pub histograms: Vec<(Labels, f64, Vec<u64>)>,
}

impl Family {
    pub fn counter(name: &str, help: &str, unit: Option<&'static str>) -> Family {
        Family::new(name, help, unit, Kind::Counter)
    }

    pub fn gauge(name: &str, help: &str, unit: Option<&'static str>) -> Family {
        Family::new(name, help, unit, Kind::Gauge)
    }

    pub fn histogram(
        name: &str,
        help: &str,
        unit: Option<&'static str>,
        buckets: &[f64],
    ) -> Family {
        Family::new(name, help, unit, Kind::Histogram(buckets.to_vec()))
    }

    fn new(name: &str, help: &str, unit: Option<&'static str>, kind: Kind) -> Family {
        Family {
            name: name.into(),
            help: help.into(),
            unit,
            kind,
            samples: Vec::new(),
            histograms: Vec::new(),
        }
    }

    /// Add a sample.
    pub fn push(&mut self, labels: &[(&str, &str)], value: f64) -> &mut Family {
        self.samples.push((owned(labels), value));
        self
    }

    /// Add a histogram series.
    pub fn push_histogram(
        &mut self,
        labels: &[(&str, &str)],
        sum: f64,
        counts: Vec<u64>,
    ) -> &mut Family {
        self.histograms.push((owned(labels), sum, counts));
        self
    }
}

fn owned(labels: &[(&str, &str)]) -> Labels {
    labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn unit(name: &'static str) -> Unit {
    match name {
        "bytes" => Unit::Bytes,
        "seconds" => Unit::Seconds,
        "ratio" | "ratios" => Unit::Ratios,
        other => Unit::Other(other.into()),
    }
}

#[derive(Debug)]
struct Snapshot(Vec<Family>);

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0 {
            let unit = f.unit.map(unit);
            // prometheus-client appends the unit to the name itself.
            let kind = match f.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
                Kind::Histogram(_) => MetricType::Histogram,
            };
            let mut metric = encoder.encode_descriptor(&f.name, &f.help, unit.as_ref(), kind)?;
            match &f.kind {
                Kind::Counter | Kind::Gauge => {
                    for (labels, v) in &f.samples {
                        // No labels: no braces.
                        if labels.is_empty() {
                            sample(&mut metric, &f.kind, *v)?;
                        } else {
                            sample(&mut metric.encode_family(labels)?, &f.kind, *v)?;
                        }
                    }
                }
                Kind::Histogram(bounds) => {
                    for (labels, sum, counts) in &f.histograms {
                        // Per bucket (the encoder sums them up); the
                        // encoder writes f64::MAX as `+Inf`.
                        let buckets: Vec<(f64, u64)> = bounds
                            .iter()
                            .copied()
                            .chain([f64::MAX])
                            .zip(counts.iter().copied().chain(std::iter::repeat(0)))
                            .collect();
                        let total = buckets.iter().map(|b| b.1).sum();
                        metric
                            .encode_family(labels)?
                            .encode_histogram::<NoLabelSet>(*sum, total, &buckets, None)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// One counter or gauge value; whole numbers are written as such (`3`,
/// not `3.0`).
fn sample(m: &mut MetricEncoder, kind: &Kind, v: f64) -> Result<(), std::fmt::Error> {
    match (kind, whole(v)) {
        (Kind::Counter, Some(n)) => {
            m.encode_counter::<NoLabelSet, u64, f64>(&(n.max(0) as u64), None)
        }
        (Kind::Counter, None) => m.encode_counter::<NoLabelSet, f64, f64>(&v.max(0.0), None),
        (_, Some(n)) => m.encode_gauge(&n),
        (_, None) => m.encode_gauge(&v),
    }
}

/// `v` as an integer when it is one (and exactly representable).
fn whole(v: f64) -> Option<i64> {
    (v.fract() == 0.0 && v.abs() < 9.0e15).then_some(v as i64)
}

/// Write `families` for a scraper whose `Accept` header is `accept`:
/// the content type and the body.
pub fn render(families: Vec<Family>, accept: Option<&str>) -> (&'static str, String) {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshot(families)));
    let mut open = String::new();
    if prometheus_client::encoding::text::encode(&mut open, &registry).is_err() {
        open = "# EOF\n".into();
    }
    if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
        (OPENMETRICS, open)
    } else {
        (TEXT, classic(&open))
    }
}

/// OpenMetrics text as the classic text format: no `# UNIT` or `# EOF`,
/// and a counter's `# HELP` and `# TYPE` name its `_total` samples.
fn classic(open: &str) -> String {
    let mut out = String::with_capacity(open.len());
    let lines: Vec<&str> = open.lines().collect();
    let counter = |name: &str| lines.iter().any(|l| *l == format!("# TYPE {name} counter"));
    for line in &lines {
        if line.starts_with("# UNIT ") || *line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counter(name).then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn families() -> Vec<Family> {
        let mut c = Family::counter("hangar_test_requests", "Requests served.", None);
        c.push(&[("app", "web"), ("status", "2xx")], 3.0);
        let mut g = Family::gauge("hangar_test_memory", "Memory in use.", Some("bytes"));
        g.push(&[("instance", "m1")], 1024.0);
        let mut bare = Family::gauge("hangar_test_open", "Open now.", None);
        bare.push(&[], 2.0);
        let mut h = Family::histogram(
            "hangar_test_latency",
            "Latency.",
            Some("seconds"),
            &[0.1, 1.0],
        );
        h.push_histogram(&[("app", "web")], 2.5, vec![1, 2, 3]);
        vec![c, g, bare, h]
    }

    #[test]
    fn openmetrics_when_asked_and_the_classic_format_otherwise() {
        let (ty, open) = render(
            families(),
            Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
        );
        assert_eq!(ty, OPENMETRICS);
        assert!(
            open.contains("# TYPE hangar_test_requests counter"),
            "{open}"
        );
        assert!(
            open.contains(r#"hangar_test_requests_total{app="web",status="2xx"} 3"#),
            "{open}"
        );
        assert!(
            open.contains("# UNIT hangar_test_memory_bytes bytes"),
            "{open}"
        );
        assert!(
            open.contains(r#"hangar_test_memory_bytes{instance="m1"} 1024"#),
            "{open}"
        );
        assert!(
            open.contains(r#"hangar_test_latency_seconds_bucket{le="1.0",app="web"} 3"#),
            "{open}"
        );
        assert!(
            open.contains(r#"hangar_test_latency_seconds_bucket{le="+Inf",app="web"} 6"#),
            "{open}"
        );
        assert!(
            open.contains("hangar_test_latency_seconds_count{app=\"web\"} 6"),
            "{open}"
        );
        assert!(open.ends_with("# EOF\n"));

        let (ty, text) = render(families(), Some("text/plain"));
        assert_eq!(ty, TEXT);
        assert!(
            text.contains("# TYPE hangar_test_requests_total counter"),
            "{text}"
        );
        assert!(
            text.contains("# HELP hangar_test_requests_total Requests served."),
            "{text}"
        );
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE hangar_test_memory_bytes gauge"),
            "{text}"
        );
    }
}
