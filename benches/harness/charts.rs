//! The charts of BENCHMARKS.md, drawn as SVG: grouped horizontal bars on a log scale
//! (throughput by lanes, by handler and ordering) and latency tails. Text
//! stays text, so a browser renders it with its own fonts.

use std::fmt::Write;

const WIDTH: f64 = 860.0;
const LEFT: f64 = 230.0;
const RIGHT: f64 = 40.0;
const COLOURS: &[&str] = &[
    "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#d62728", "#e377c2", "#17becf",
];

/// One group of bars: its label, then each bar's series index and value.
pub struct Group {
    pub label: String,
    pub bars: Vec<(usize, f64)>,
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn header(svg: &mut String, height: f64, title: &str) {
    let _ = write!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
         viewBox=\"0 0 {WIDTH} {height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" font-size=\"15\" text-anchor=\"middle\">{}</text>\n",
        WIDTH / 2.0,
        escape(title)
    );
}

/// Draws the legend from `y` down, wrapping at the right edge; returns the y below it.
fn legend(svg: &mut String, series: &[&str], left: f64, y: f64) -> f64 {
    let (mut x, mut y) = (left, y);
    for (i, name) in series.iter().enumerate() {
        let width = 30.0 + 7.0 * name.len() as f64;
        if x > left && x + width > WIDTH - RIGHT {
            (x, y) = (left, y + 18.0);
        }
        let colour = COLOURS[i % COLOURS.len()];
        let _ = writeln!(
            svg,
            "<rect x=\"{x}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{colour}\"/>\
             <text x=\"{}\" y=\"{}\">{}</text>",
            y - 10.0,
            x + 16.0,
            y,
            escape(name)
        );
        x += width;
    }
    y + 15.0
}

/// Powers of ten from below `low` to above `high`.
fn decades(low: f64, high: f64) -> (f64, f64) {
    let floor = 10f64.powf(low.max(1e-9).log10().floor());
    let ceil = 10f64.powf(high.max(1e-9).log10().ceil());
    (floor, ceil.max(floor * 10.0))
}

/// Grouped horizontal bars, `unit` after each value, on a log axis.
pub fn bars(title: &str, unit: &str, series: &[&str], groups: &[Group]) -> String {
    let bar = 16.0;
    let gap = 14.0;
    let heights: f64 = groups.iter().map(|g| g.bars.len() as f64 * bar + gap).sum();
    let top = legend(&mut String::new(), series, LEFT, 45.0);
    let height = top + heights + 50.0;
    let values = groups.iter().flat_map(|g| g.bars.iter().map(|b| b.1));
    let (low, high) = values.fold((f64::MAX, 0f64), |(l, h), v| (l.min(v), h.max(v)));
    let (lo, hi) = decades(low, high);
    let x_of = |v: f64| {
        let share = (v.max(lo).log10() - lo.log10()) / (hi.log10() - lo.log10());
        LEFT + share * (WIDTH - LEFT - RIGHT - 90.0)
    };
    let mut svg = String::new();
    header(&mut svg, height, title);
    legend(&mut svg, series, LEFT, 45.0);
    let bottom = top + heights;
    let mut tick = lo;
    while tick <= hi * 1.0001 {
        let x = x_of(tick);
        let _ = writeln!(
            svg,
            "<line x1=\"{x:.1}\" y1=\"{top}\" x2=\"{x:.1}\" y2=\"{bottom}\" stroke=\"#ddd\"/>\
             <text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            bottom + 16.0,
            short(tick)
        );
        tick *= 10.0;
    }
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{} (log scale)</text>",
        (LEFT + WIDTH - RIGHT) / 2.0,
        bottom + 36.0,
        escape(unit)
    );
    let mut y = top;
    for g in groups {
        let mut in_order = g.bars.clone();
        in_order.sort_by_key(|&(s, _)| s);
        let mid = y + g.bars.len() as f64 * bar / 2.0;
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT - 8.0,
            mid + 4.0,
            escape(&g.label)
        );
        for (s, v) in in_order {
            let x = x_of(v);
            let _ = writeln!(
                svg,
                "<rect x=\"{LEFT}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{}\" fill=\"{}\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
                (x - LEFT).max(1.0),
                bar - 2.0,
                COLOURS[s % COLOURS.len()],
                x + 4.0,
                y + bar - 5.0,
                grouped(v)
            );
            y += bar;
        }
        y += gap;
    }
    svg.push_str("</svg>\n");
    svg
}

/// The share of rows slower than a latency (y, log scale) by that latency in ms (x, log
/// scale), one curve per series of `(share, ms)` points: the tail, where a latency goal
/// is won or lost, takes most of the height.
pub fn tail(title: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    let left = 80.0;
    let names: Vec<&str> = series.iter().map(|(n, _)| n.as_str()).collect();
    let (top, plot_h) = (legend(&mut String::new(), &names, left, 45.0) + 5.0, 320.0);
    let height = top + plot_h + 60.0;
    let points = series.iter().flat_map(|(_, p)| p.iter());
    let (low, high, least) = points.fold((f64::MAX, 0f64, 1f64), |(l, h, s), &(share, ms)| {
        (l.min(ms), h.max(ms), s.min(share))
    });
    let (lo, hi) = decades(low.max(0.1), high);
    let floor = decades(least, 1.0).0;
    let x_of = |ms: f64| {
        let share = (ms.max(lo).log10() - lo.log10()) / (hi.log10() - lo.log10());
        left + share * (WIDTH - left - RIGHT)
    };
    let y_of = |share: f64| top + plot_h * (share.max(floor).log10() / floor.log10());
    let mut svg = String::new();
    header(&mut svg, height, title);
    legend(&mut svg, &names, left, 45.0);
    let mut share = 1.0;
    while share >= floor * 0.999 {
        let y = y_of(share);
        let _ = writeln!(
            svg,
            "<line x1=\"{}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}%</text>",
            x_of(lo),
            x_of(hi),
            x_of(lo) - 6.0,
            y + 4.0,
            percent(share)
        );
        share /= 10.0;
    }
    let mut tick = lo;
    while tick <= hi * 1.0001 {
        for step in [1.0, 2.0, 5.0] {
            let t = tick * step;
            if t > hi * 1.0001 {
                break;
            }
            let x = x_of(t);
            let _ = writeln!(
                svg,
                "<line x1=\"{x:.1}\" y1=\"{top}\" x2=\"{x:.1}\" y2=\"{}\" stroke=\"#eee\"/>\
                 <text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                top + plot_h,
                top + plot_h + 16.0,
                short(t)
            );
        }
        tick *= 10.0;
    }
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">commit to arrival, ms (log scale); share of rows slower (log scale)</text>",
        (x_of(lo) + x_of(hi)) / 2.0,
        top + plot_h + 40.0
    );
    for (i, (_, points)) in series.iter().enumerate() {
        let line: Vec<String> = points
            .iter()
            .map(|&(share, ms)| format!("{:.1},{:.1}", x_of(ms), y_of(share)))
            .collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>",
            COLOURS[i % COLOURS.len()],
            line.join(" ")
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// `0.001` -> `0.1`: a share of 1 down to 10^-n as a percentage, with the digits it needs.
fn percent(share: f64) -> String {
    let digits = (-(share * 100.0).log10()).ceil().max(0.0) as usize;
    format!("{:.*}", digits, share * 100.0)
}

/// `1500000` -> `1.5M`, `20000` -> `20k`, `0.5` -> `0.5`.
fn short(v: f64) -> String {
    match v {
        v if v >= 1e6 => format!("{}M", v / 1e6),
        v if v >= 1e3 => format!("{}k", v / 1e3),
        v => format!("{v}"),
    }
}

/// `1310164.2` -> `1,310,164`.
fn grouped(v: f64) -> String {
    let digits = format!("{:.0}", v);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// What a run measured, for its charts.
#[derive(Default)]
pub struct Results {
    /// Relay drains: name, outboxd's rows/s, the raw claim's rows/s just before.
    pub drains: Vec<(String, f64, f64)>,
    /// Consumer dispatch: handler, ordering, msgs/s; and the fastest bare consumer's.
    pub dispatches: Vec<(String, String, f64)>,
    pub bare: Option<f64>,
    /// The 10 ms endpoint's backlog, msgs/s, by ordering.
    pub slow: Vec<(String, f64)>,
    /// Latency tails: name, `(share of rows slower, ms)` points.
    pub curves: Vec<(String, Vec<(f64, f64)>)>,
}

/// Writes the charts `results` has data for into `dir`; returns the Markdown that shows
/// them, with paths relative to the repository root.
pub fn write(dir: &std::path::Path, results: &Results) -> std::io::Result<String> {
    let mut md = String::new();
    let mut save = |file: &str, alt: &str, svg: String| -> std::io::Result<()> {
        std::fs::write(dir.join(file), svg)?;
        let _ = writeln!(md, "![{alt}](docs/{file})\n");
        Ok(())
    };
    if !results.drains.is_empty() {
        let groups = results
            .drains
            .iter()
            .map(|(name, rate, raw)| Group {
                label: format!("relay drain, {name}"),
                bars: vec![(0, *rate), (1, *raw)],
            })
            .collect::<Vec<_>>();
        let svg = bars(
            "Relay drain by lanes, against the raw SQL claim",
            "rows/s",
            &["outboxd", "raw SQL claim (same run)"],
            &groups,
        );
        save("bench-relay.svg", "relay drain by lanes", svg)?;
    }
    if !results.dispatches.is_empty() || !results.slow.is_empty() {
        let mut groups: Vec<Group> = Vec::new();
        for (handler, ordering, rate) in &results.dispatches {
            let series = usize::from(ordering == "partition");
            match groups
                .iter_mut()
                .find(|g| g.label == format!("{handler} handler"))
            {
                Some(g) => g.bars.push((series, *rate)),
                None => groups.push(Group {
                    label: format!("{handler} handler"),
                    bars: vec![(series, *rate)],
                }),
            }
        }
        if !results.slow.is_empty() {
            groups.push(Group {
                label: "http, 10 ms endpoint".into(),
                bars: results
                    .slow
                    .iter()
                    .map(|(ordering, rate)| (usize::from(ordering == "partition"), *rate))
                    .collect(),
            });
        }
        if let Some(bare) = results.bare {
            groups.push(Group {
                label: "bare consumer".into(),
                bars: vec![(2, bare)],
            });
        }
        let svg = bars(
            "Consumer throughput by handler and ordering",
            "msgs/s",
            &[
                "ordering = key",
                "ordering = partition",
                "bare consumer (fastest)",
            ],
            &groups,
        );
        save(
            "bench-consumer.svg",
            "consumer throughput by handler and ordering",
            svg,
        )?;
    }
    if !results.curves.is_empty() {
        let svg = tail("Relay latency, commit to arrival", &results.curves);
        save("bench-latency.svg", "relay latency distribution", svg)?;
    }
    Ok(md)
}
