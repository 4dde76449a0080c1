//! Line charts as standalone SVG files (no plotting library: a few axes, ticks and
//! polylines are all a benchmark needs, and the files diff well).

use std::fmt::Write as _;
use std::path::Path;

/// One line of a chart.
pub struct Series<'a> {
    /// Legend text.
    pub name: &'a str,
    /// Points (x, y), in x order.
    pub points: &'a [(f64, f64)],
}

/// A chart: a title, axis labels, and a dashed horizontal line where a budget or target
/// sits.
pub struct Chart<'a> {
    /// Shown above the plot.
    pub title: &'a str,
    /// Under the x axis.
    pub x_label: &'a str,
    /// Beside the y axis.
    pub y_label: &'a str,
    /// The lines.
    pub series: Vec<Series<'a>>,
    /// A labelled horizontal reference line (e.g. the configured budget).
    pub limit: Option<(&'a str, f64)>,
}

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 360.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLOURS: [&str; 5] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"];

/// A "nice" step for about `target` ticks over `span`.
fn step(span: f64, target: f64) -> f64 {
    let raw = (span / target).max(f64::MIN_POSITIVE);
    let magnitude = 10f64.powf(raw.log10().floor());
    let fraction = raw / magnitude;
    let nice = if fraction <= 1.0 {
        1.0
    } else if fraction <= 2.0 {
        2.0
    } else if fraction <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

fn label(value: f64) -> String {
    if value.abs() >= 1_000_000.0 {
        format!("{:.1}M", value / 1_000_000.0)
    } else if value.abs() >= 10_000.0 {
        format!("{:.0}k", value / 1000.0)
    } else if value.fract().abs() < 1e-9 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

impl Chart<'_> {
    /// Renders the chart as SVG.
    pub fn svg(&self) -> String {
        let all = self.series.iter().flat_map(|s| s.points.iter());
        let (mut x_max, mut y_max) = (0f64, 0f64);
        for (x, y) in all {
            x_max = x_max.max(*x);
            y_max = y_max.max(*y);
        }
        if let Some((_, limit)) = self.limit {
            y_max = y_max.max(limit);
        }
        let (x_step, y_step) = (step(x_max.max(1.0), 8.0), step(y_max.max(1.0), 6.0));
        let (x_max, y_max) = ((x_max / x_step).ceil().max(1.0) * x_step, (y_max / y_step).ceil().max(1.0) * y_step);
        let (plot_w, plot_h) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
        let px = |x: f64| LEFT + x / x_max * plot_w;
        let py = |y: f64| TOP + plot_h - y / y_max * plot_h;

        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
            WIDTH / 2.0,
            escape(self.title)
        );
        let mut y = 0.0;
        while y <= y_max + y_step / 2.0 {
            let (right, at, label_x, text) = (WIDTH - RIGHT, py(y), LEFT - 6.0, label(y));
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT}" x2="{right}" y1="{at:.1}" y2="{at:.1}" stroke="#ddd"/><text x="{label_x}" y="{:.1}" text-anchor="end">{text}</text>"##,
                at + 4.0,
            );
            y += y_step;
        }
        let mut x = 0.0;
        while x <= x_max + x_step / 2.0 {
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
                px(x),
                TOP + plot_h + 16.0,
                label(x)
            );
            x += x_step;
        }
        let _ = writeln!(
            svg,
            r#"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="black"/>"#
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            LEFT + plot_w / 2.0,
            HEIGHT - 12.0,
            escape(self.x_label)
        );
        let _ = writeln!(
            svg,
            r#"<text transform="translate(16 {}) rotate(-90)" text-anchor="middle">{}</text>"#,
            TOP + plot_h / 2.0,
            escape(self.y_label)
        );
        if let Some((name, limit)) = self.limit {
            let (right, at, text) = (WIDTH - RIGHT, py(limit), escape(name));
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT}" x2="{right}" y1="{at:.1}" y2="{at:.1}" stroke="#555" stroke-dasharray="6 4"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555">{text}</text>"##,
                right - 4.0,
                at - 4.0,
            );
        }
        for (i, series) in self.series.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let points: Vec<String> =
                series.points.iter().map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y))).collect();
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"#,
                points.join(" ")
            );
            let ly = TOP + 14.0 + i as f64 * 16.0;
            let _ = writeln!(
                svg,
                r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{colour}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
                LEFT + 10.0,
                LEFT + 30.0,
                LEFT + 36.0,
                ly + 4.0,
                escape(series.name)
            );
        }
        svg.push_str("</svg>\n");
        svg
    }

    /// Writes the chart to `path`.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, self.svg())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_round_numbers() {
        assert_eq!(step(100.0, 5.0), 20.0);
        assert_eq!(step(7.0, 6.0), 2.0);
        assert_eq!(step(30_000.0, 6.0), 5_000.0);
    }

    #[test]
    fn a_chart_draws_every_series_and_the_limit() {
        let points = [(0.0, 1.0), (10.0, 5.0)];
        let chart = Chart {
            title: "t <1>",
            x_label: "s",
            y_label: "MiB",
            series: vec![Series { name: "used", points: &points }],
            limit: Some(("budget", 8.0)),
        };
        let svg = chart.svg();
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("<polyline") && svg.contains("stroke-dasharray") && svg.contains("t &lt;1&gt;"));
    }
}
