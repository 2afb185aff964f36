//! Panels drawn as SVG on the server: a time series chart with its axes
//! and legend, or a stat's one number. No script and no third-party code
//! reaches the browser; the page only swaps the drawings in.

use std::fmt::Write;

use crate::dashboard::Series;

const WIDTH: f64 = 600.0;
const PLOT_TOP: f64 = 10.0;
const PLOT_HEIGHT: f64 = 170.0;
const PLOT_LEFT: f64 = 64.0;
const PLOT_RIGHT: f64 = 590.0;
const LEGEND_ROW: f64 = 16.0;

/// Grafana's classic palette.
const COLOURS: [&str; 10] = [
    "#7eb26d", "#eab839", "#6ed0e0", "#ef843c", "#e24d42", "#1f78c1", "#ba43a9", "#705da0",
    "#508642", "#cca300",
];

/// `text` safe inside HTML or SVG text and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A line chart of `series` from `from` to `to` (Unix seconds); points
/// further apart than twice `step` are not joined.
pub fn timeseries(series: &[Series], unit: &str, from: f64, to: f64, step: f64) -> String {
    let legend_rows = legend_layout(series).last().map(|l| l.2 + 1).unwrap_or(0);
    let height = PLOT_TOP + PLOT_HEIGHT + 24.0 + legend_rows as f64 * LEGEND_ROW;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {WIDTH} {height}" data-series="{}" font-family="sans-serif" font-size="11">"#,
        series.iter().filter(|s| !s.points.is_empty()).count()
    );
    let values = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .filter(|v| v.is_finite());
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        let _ = write!(
            s,
            r##"<text class="nodata" x="{}" y="{}" text-anchor="middle" fill="#888">No data</text></svg>"##,
            WIDTH / 2.0,
            PLOT_TOP + PLOT_HEIGHT / 2.0
        );
        return s;
    }
    let (lo, hi) = (
        lo.min(0.0),
        if hi > lo.min(0.0) {
            hi
        } else {
            lo.min(0.0) + 1.0
        },
    );
    let tick = nice_step((hi - lo) / 4.0);
    let (lo, hi) = ((lo / tick).floor() * tick, (hi / tick).ceil() * tick);
    let span = (to - from).max(1.0);
    let x = |t: f64| PLOT_LEFT + (t - from) / span * (PLOT_RIGHT - PLOT_LEFT);
    let y = |v: f64| PLOT_TOP + PLOT_HEIGHT - (v - lo) / (hi - lo) * PLOT_HEIGHT;
    // The value axis: grid lines and labels.
    let mut v = lo;
    while v <= hi + tick / 2.0 {
        let _ = write!(
            s,
            r##"<line x1="{PLOT_LEFT}" x2="{PLOT_RIGHT}" y1="{y:.1}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{}" y="{:.1}" text-anchor="end" fill="#555">{}</text>"##,
            PLOT_LEFT - 6.0,
            y(v) + 4.0,
            escape(&format_value(unit, v)),
            y = y(v),
        );
        v += tick;
    }
    // The time axis (UTC).
    let every = time_step(span);
    let mut t = (from / every).ceil() * every;
    while t <= to {
        let _ = write!(
            s,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{PLOT_TOP}" y2="{}" stroke="#f0f0f0"/><text x="{x:.1}" y="{}" text-anchor="middle" fill="#555">{}</text>"##,
            PLOT_TOP + PLOT_HEIGHT,
            PLOT_TOP + PLOT_HEIGHT + 14.0,
            clock(t, every < 60.0),
            x = x(t),
        );
        t += every;
    }
    for (i, one) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let mut d = String::new();
        let mut last: Option<f64> = None;
        let mut lone = Vec::new();
        for (n, &(t, v)) in one.points.iter().enumerate() {
            if !v.is_finite() {
                last = None;
                continue;
            }
            let joined = last.is_some_and(|l| t - l <= 2.0 * step + 0.5);
            let _ = write!(
                d,
                "{}{:.1} {:.1} ",
                if joined { "L" } else { "M" },
                x(t),
                y(v)
            );
            let next_joined = one
                .points
                .get(n + 1)
                .is_some_and(|&(nt, nv)| nv.is_finite() && nt - t <= 2.0 * step + 0.5);
            if !joined && !next_joined {
                lone.push((x(t), y(v)));
            }
            last = Some(t);
        }
        let _ = write!(
            s,
            r#"<path class="series" data-name="{}" d="{}" fill="none" stroke="{colour}" stroke-width="1.5"/>"#,
            escape(&one.name),
            d.trim_end()
        );
        for (cx, cy) in lone {
            let _ = write!(
                s,
                r#"<circle cx="{cx:.1}" cy="{cy:.1}" r="2" fill="{colour}"/>"#
            );
        }
    }
    for (i, (one, col, row)) in series
        .iter()
        .zip(legend_layout(series))
        .map(|(one, (_, col, row))| (one, col, row))
        .enumerate()
    {
        let lx = PLOT_LEFT + col;
        let ly = PLOT_TOP + PLOT_HEIGHT + 34.0 + row as f64 * LEGEND_ROW;
        let last = one
            .points
            .iter()
            .rev()
            .find(|p| p.1.is_finite())
            .map(|p| format_value(unit, p.1))
            .unwrap_or_default();
        let _ = write!(
            s,
            r##"<rect x="{lx:.1}" y="{:.1}" width="10" height="3" fill="{}"/><text class="legend" x="{:.1}" y="{ly:.1}" fill="#333">{} <tspan fill="#888">{}</tspan></text>"##,
            ly - 4.0,
            COLOURS[i % COLOURS.len()],
            lx + 14.0,
            escape(&one.name),
            escape(&last),
        );
    }
    s.push_str("</svg>");
    s
}

/// Where each legend entry goes: (width, x offset, row).
fn legend_layout(series: &[Series]) -> Vec<(f64, f64, usize)> {
    let mut out = Vec::with_capacity(series.len());
    let (mut col, mut row) = (0.0, 0);
    for one in series {
        let w = 14.0 + (one.name.chars().count() + 10) as f64 * 6.2 + 12.0;
        if col > 0.0 && col + w > PLOT_RIGHT - PLOT_LEFT {
            col = 0.0;
            row += 1;
        }
        out.push((w, col, row));
        col += w;
    }
    out
}

/// One number: the last value of the first series.
pub fn stat(series: &[Series], unit: &str) -> String {
    let value = series
        .first()
        .and_then(|s| s.points.iter().rev().find(|p| p.1.is_finite()))
        .map(|p| p.1);
    let (text, attr) = match value {
        Some(v) => (format_value(unit, v), format!("{v}")),
        None => ("No data".to_string(), String::new()),
    };
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" class="stat" viewBox="0 0 300 90" font-family="sans-serif" data-value="{attr}"><text x="150" y="58" text-anchor="middle" font-size="{}" fill="{}">{}</text></svg>"##,
        if value.is_some() { 36 } else { 18 },
        if value.is_some() { "#1f78c1" } else { "#888" },
        escape(&text)
    )
}

/// A panel whose query failed: the reason, in place of the chart.
pub fn failed(why: &str) -> String {
    let mut short: String = why.chars().take(160).collect();
    if short.len() < why.len() {
        short.push('…');
    }
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" class="failed" viewBox="0 0 600 60" font-family="sans-serif" font-size="11"><text x="10" y="30" fill="#c4162a">{}</text></svg>"##,
        escape(&short)
    )
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    if raw <= 0.0 || !raw.is_finite() {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// Seconds between time labels: at most about 6 across `span`.
fn time_step(span: f64) -> f64 {
    const STEPS: [f64; 14] = [
        10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 10800.0, 21600.0,
        43200.0, 86400.0,
    ];
    STEPS
        .iter()
        .copied()
        .find(|s| span / s <= 6.0)
        .unwrap_or(86400.0)
}

/// `HH:MM` (or `HH:MM:SS`) of a Unix time, UTC.
fn clock(t: f64, seconds: bool) -> String {
    let day = (t as i64).rem_euclid(86400);
    let (h, m, s) = (day / 3600, day % 3600 / 60, day % 60);
    if seconds {
        format!("{h:02}:{m:02}:{s:02}")
    } else {
        format!("{h:02}:{m:02}")
    }
}

/// `v` in Grafana's `unit` (`s`, `bytes`, `Bps`, `percentunit`, `reqps`,
/// `cores`, `short`, `none`).
pub fn format_value(unit: &str, v: f64) -> String {
    match unit {
        "percentunit" => format!("{}%", number(v * 100.0)),
        "percent" => format!("{}%", number(v)),
        "s" => {
            let a = v.abs();
            if a == 0.0 {
                "0 s".into()
            } else if a < 1e-3 {
                format!("{} µs", number(v * 1e6))
            } else if a < 1.0 {
                format!("{} ms", number(v * 1e3))
            } else if a < 120.0 {
                format!("{} s", number(v))
            } else {
                format!("{} min", number(v / 60.0))
            }
        }
        "bytes" => binary(v, ""),
        "Bps" => binary(v, "/s"),
        "reqps" => format!("{} req/s", short(v)),
        "cores" if v != 0.0 && v.abs() < 1.0 => format!("{} mcores", number(v * 1e3)),
        "cores" => format!("{} cores", number(v)),
        "none" => number(v),
        _ => short(v),
    }
}

fn binary(v: f64, per: &str) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = v;
    let mut i = 0;
    while x.abs() >= 1024.0 && i < UNITS.len() - 1 {
        x /= 1024.0;
        i += 1;
    }
    format!("{} {}{per}", number(x), UNITS[i])
}

fn short(v: f64) -> String {
    const UNITS: [&str; 5] = ["", " k", " M", " G", " T"];
    let mut x = v;
    let mut i = 0;
    while x.abs() >= 1000.0 && i < UNITS.len() - 1 {
        x /= 1000.0;
        i += 1;
    }
    format!("{}{}", number(x), UNITS[i])
}

/// At most three significant digits (two decimals), no trailing zeros.
fn number(v: f64) -> String {
    let a = v.abs();
    let text = if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.01 || a == 0.0 {
        format!("{v:.2}")
    } else if a >= 0.0001 {
        format!("{v:.4}")
    } else {
        format!("{v:.1e}")
    };
    if text.contains('.') && !text.contains('e') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_in_their_units() {
        assert_eq!(format_value("percentunit", 0.0123), "1.23%");
        assert_eq!(format_value("s", 0.00025), "250 µs");
        assert_eq!(format_value("s", 0.5), "500 ms");
        assert_eq!(format_value("s", 3.0), "3 s");
        assert_eq!(format_value("bytes", 3.5 * 1024.0 * 1024.0), "3.5 MiB");
        assert_eq!(format_value("Bps", 512.0), "512 B/s");
        assert_eq!(format_value("reqps", 1500.0), "1.5 k req/s");
        assert_eq!(format_value("short", 0.0), "0");
        assert_eq!(format_value("none", 0.875), "0.88");
        assert_eq!(format_value("none", 0.0018), "0.0018");
        assert_eq!(format_value("cores", 0.0018), "1.8 mcores");
        assert_eq!(format_value("cores", 0.0), "0 cores");
        assert_eq!(nice_step(0.3), 0.5);
        assert_eq!(nice_step(1.7), 2.0);
        assert_eq!(nice_step(7.0), 10.0);
        assert_eq!(clock(3600.0 * 13.0 + 65.0, true), "13:01:05");
    }

    #[test]
    fn a_chart_draws_each_series_and_breaks_at_gaps() {
        let series = vec![
            Series {
                name: "2xx".into(),
                points: vec![(0.0, 1.0), (10.0, 2.0), (20.0, 3.0), (100.0, 1.0)],
            },
            Series {
                name: "<5xx>".into(),
                points: vec![(0.0, 0.5)],
            },
        ];
        let svg = timeseries(&series, "reqps", 0.0, 120.0, 10.0);
        assert!(svg.contains(r#"data-series="2""#), "{svg}");
        assert_eq!(svg.matches("<path class=\"series\"").count(), 2);
        // The gap from 20 to 100 starts a new line; the lone points get dots.
        let d = svg.split("data-name=\"2xx\" d=\"").nth(1).unwrap();
        let d = &d[..d.find('"').unwrap()];
        assert_eq!(d.matches('M').count(), 2, "{d}");
        assert_eq!(svg.matches("<circle").count(), 2);
        assert!(svg.contains("&lt;5xx&gt;"), "names are escaped");
        assert!(svg.contains("req/s"));
        assert!(timeseries(&[], "s", 0.0, 60.0, 5.0).contains("No data"));
        let s = stat(&series, "percentunit");
        assert!(
            s.contains(r#"data-value="1""#) && s.contains(">100%<"),
            "{s}"
        );
        assert!(stat(&[], "s").contains("No data"));
        assert!(failed("<bad>").contains("&lt;bad&gt;"));
    }
}
