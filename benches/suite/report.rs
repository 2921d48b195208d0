//! Results: one row per figure, printed as a table and written to BENCHMARKS.md, plus two
//! SVG line charts drawn here (no plotting crate needed for a few polylines).

use std::fmt::Write as _;
use std::time::Duration;

use crate::passthrough::CaseResult;

/// One figure: what the agent did, what the peer (or the physical limit) did, their ratio.
pub struct Sample {
    pub section: &'static str,
    pub case: String,
    pub agent: String,
    pub peer: String,
    /// agent / peer (time or size): below 1 is better.
    pub ratio: Option<f64>,
    pub goal: String,
    pub met: Option<bool>,
    pub rss_mib: Option<f64>,
}

pub fn ms(d: Duration) -> String {
    let v = d.as_secs_f64() * 1e3;
    if v < 10.0 {
        format!("{v:.2} ms")
    } else {
        format!("{v:.0} ms")
    }
}

pub fn pct(v: &[Duration], p: f64) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    if s.is_empty() {
        return Duration::ZERO;
    }
    let i = ((s.len() as f64 - 1.0) * p).round() as usize;
    s[i.min(s.len() - 1)]
}

pub fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

fn mb(bytes: usize) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

pub fn passthrough_sample(r: &CaseResult) -> Sample {
    let (d50, d99, v50, v99) = (
        pct(&r.direct, 0.5),
        pct(&r.direct, 0.99),
        pct(&r.via, 0.5),
        pct(&r.via, 0.99),
    );
    let rate = |d: Duration| r.burst_k as f64 * r.bytes as f64 / 1e6 / d.as_secs_f64();
    let ratio50 = ratio(v50, d50);
    let large = r.clusters >= 10_000;
    Sample {
        section: "pass-through",
        case: format!(
            "{} CDS, {} clusters ({})",
            r.flavor,
            r.clusters,
            mb(r.bytes)
        ),
        agent: format!(
            "p50 {} / p99 {}; {} × back to back: {:.0} MB/s",
            ms(v50),
            ms(v99),
            r.burst_k,
            rate(r.burst_via)
        ),
        peer: format!(
            "direct p50 {} / p99 {}; {:.0} MB/s",
            ms(d50),
            ms(d99),
            rate(r.burst_direct)
        ),
        ratio: Some(ratio50),
        goal: if large {
            "≤ 1.10× at p50".into()
        } else {
            "—".into()
        },
        met: large.then_some(ratio50 <= 1.10),
        rss_mib: Some(r.agent_peak_mib),
    }
}

pub fn eds_burst_sample(
    flavor: &str,
    k: usize,
    direct: Duration,
    via: Duration,
    peak: f64,
) -> Sample {
    Sample {
        section: "pass-through",
        case: format!("{flavor}: {k} small EDS updates back to back"),
        agent: format!(
            "{} ({:.0} updates/s)",
            ms(via),
            k as f64 / via.as_secs_f64()
        ),
        peer: format!(
            "direct {} ({:.0} updates/s)",
            ms(direct),
            k as f64 / direct.as_secs_f64()
        ),
        ratio: Some(ratio(via, direct)),
        goal: "—".into(),
        met: None,
        rss_mib: Some(peak),
    }
}

pub fn table(samples: &[Sample]) -> String {
    let mut out = String::from(
        "| figure | case | ecds-agent | peer / limit | ratio | goal | agent peak RSS |\n|---|---|---|---|---|---|---|\n",
    );
    for s in samples {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            s.section,
            s.case,
            s.agent,
            s.peer,
            s.ratio.map(|r| format!("{r:.2}×")).unwrap_or("—".into()),
            match s.met {
                Some(true) => format!("{} ✔", s.goal),
                Some(false) => format!("{} ✘", s.goal),
                None => s.goal.clone(),
            },
            s.rss_mib
                .map(|r| format!("{r:.1} MiB"))
                .unwrap_or("—".into()),
        );
    }
    out
}

/// One line of a chart: label, colour, points.
pub type Series<'a> = (String, &'a str, Vec<(f64, f64)>);

/// A line chart as SVG. `series`: (label, colour, points). Log-scaled x when `log_x`.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series<'_>],
    log_x: bool,
) -> String {
    let (w, h, l, r, t, b) = (720.0, 420.0, 70.0, 200.0, 40.0, 50.0);
    let fx = |x: f64| if log_x { x.max(1e-9).log10() } else { x };
    let pts: Vec<(f64, f64)> = series.iter().flat_map(|s| s.2.iter().copied()).collect();
    let (mut x0, mut x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| {
        (a.min(fx(p.0)), b.max(fx(p.0)))
    });
    if x0 >= x1 {
        x0 -= 1.0;
        x1 += 1.0;
    }
    let y1 = pts.iter().fold(0.0f64, |a, p| a.max(p.1)).max(1e-9) * 1.1;
    let px = |x: f64| l + (fx(x) - x0) / (x1 - x0) * (w - l - r);
    let py = |y: f64| t + (1.0 - y / y1) * (h - t - b);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" font-size=\"15\" text-anchor=\"middle\">{}</text>\n\
         <line x1=\"{l}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n\
         <text x=\"16\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {})\">{}</text>\n",
        (w - r + l) / 2.0,
        esc(title),
        h - b,
        w - r,
        h - b,
        h - b,
        (w - r + l) / 2.0,
        h - 12.0,
        esc(x_label),
        (h - b + t) / 2.0,
        (h - b + t) / 2.0,
        esc(y_label)
    );
    for i in 0..=4 {
        let y = y1 * i as f64 / 4.0;
        let _ = writeln!(
            s,
            "<line x1=\"{l}\" y1=\"{0:.1}\" x2=\"{1}\" y2=\"{0:.1}\" stroke=\"#ddd\"/><text x=\"{2}\" y=\"{3:.1}\" text-anchor=\"end\">{4}</text>",
            py(y),
            w - r,
            l - 6.0,
            py(y) + 4.0,
            short(y)
        );
    }
    let mut xs: Vec<f64> = pts.iter().map(|p| p.0).collect();
    xs.sort_by(|a, b| a.total_cmp(b));
    xs.dedup();
    for x in xs {
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            px(x),
            h - b + 16.0,
            short(x)
        );
    }
    for (i, (label, colour, p)) in series.iter().enumerate() {
        let path: Vec<String> = p
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
            path.join(" ")
        );
        for &(x, y) in p {
            let _ = writeln!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{colour}\"/>",
                px(x),
                py(y)
            );
        }
        let ly = t + 10.0 + i as f64 * 18.0;
        let _ = writeln!(
            s,
            "<line x1=\"{0}\" y1=\"{ly}\" x2=\"{1}\" y2=\"{ly}\" stroke=\"{colour}\" stroke-width=\"2\"/><text x=\"{2}\" y=\"{3}\">{4}</text>",
            w - r + 10.0,
            w - r + 30.0,
            w - r + 36.0,
            ly + 4.0,
            esc(label)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn short(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 10.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
