//! A small grouped bar chart in SVG, written by hand (no plotting dependency).

use std::fmt::Write as _;

/// Bars in groups: one group per category, one bar per series in each.
#[derive(Debug, Clone)]
pub struct BarChart {
    /// Title above the chart.
    pub title: String,
    /// What the values are (the y axis).
    pub unit: String,
    /// The categories along the x axis.
    pub groups: Vec<String>,
    /// (series name, one value per group; `None` for a missing one).
    pub series: Vec<(String, Vec<Option<f64>>)>,
    /// A logarithmic y axis (for values spanning decades).
    pub log: bool,
}

const COLORS: [&str; 6] = [
    "#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2",
];
const WIDTH: f64 = 820.0;
const HEIGHT: f64 = 400.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 80.0;
const BOTTOM: f64 = 50.0;

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A short label for a value: 3 significant digits.
pub fn short(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// Axis ticks: decades for a log axis, 1-2-5 steps for a linear one.
fn ticks(max: f64, log: bool, min_positive: f64) -> Vec<f64> {
    if log {
        let low = min_positive.log10().floor() as i32;
        let high = max.log10().ceil() as i32;
        return (low..=high).map(|e| 10f64.powi(e)).collect();
    }
    let raw = max / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(raw);
    (0..=((max / step).ceil() as usize))
        .map(|i| i as f64 * step)
        .collect()
}

impl BarChart {
    /// The chart as an SVG document.
    pub fn render(&self) -> String {
        let values: Vec<f64> = self
            .series
            .iter()
            .flat_map(|(_, v)| v.iter().flatten().copied())
            .filter(|v| v.is_finite() && *v > 0.0)
            .collect();
        let max = values.iter().copied().fold(0.0, f64::max).max(1e-9);
        let min_positive = values
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min)
            .min(max);
        let ticks = ticks(max, self.log, min_positive);
        let (low, high) = (ticks[0], *ticks.last().unwrap_or(&max));
        let plot_h = HEIGHT - TOP - BOTTOM;
        let plot_w = WIDTH - LEFT - RIGHT;
        let y = |v: f64| -> f64 {
            let f = if self.log {
                (v.max(low).log10() - low.log10()) / (high.log10() - low.log10()).max(1e-9)
            } else {
                v / high.max(1e-9)
            };
            TOP + plot_h * (1.0 - f)
        };
        let mut out = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
             viewBox=\"0 0 {WIDTH} {HEIGHT}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"{x}\" y=\"22\" font-size=\"15\" text-anchor=\"middle\">{title}</text>\n",
            x = WIDTH / 2.0,
            title = escape(&self.title)
        );
        for t in &ticks {
            let ty = y(*t);
            let _ = writeln!(
                out,
                "<line x1=\"{LEFT}\" x2=\"{x2}\" y1=\"{ty:.1}\" y2=\"{ty:.1}\" stroke=\"#ddd\"/>\
                 <text x=\"{tx}\" y=\"{ly:.1}\" text-anchor=\"end\">{label}</text>",
                x2 = WIDTH - RIGHT,
                tx = LEFT - 6.0,
                ly = ty + 4.0,
                label = short(*t)
            );
        }
        let _ = writeln!(
            out,
            "<text transform=\"translate(16 {cy}) rotate(-90)\" text-anchor=\"middle\">{unit}{scale}</text>",
            cy = TOP + plot_h / 2.0,
            unit = escape(&self.unit),
            scale = if self.log { " (log scale)" } else { "" }
        );
        let group_w = plot_w / self.groups.len().max(1) as f64;
        let bar_w = group_w * 0.8 / self.series.len().max(1) as f64;
        for (g, group) in self.groups.iter().enumerate() {
            let gx = LEFT + g as f64 * group_w;
            let _ = writeln!(
                out,
                "<text x=\"{x:.1}\" y=\"{ly}\" text-anchor=\"middle\">{label}</text>",
                x = gx + group_w / 2.0,
                ly = HEIGHT - BOTTOM + 18.0,
                label = escape(group)
            );
            for (s, (_, values)) in self.series.iter().enumerate() {
                let Some(v) = values.get(g).copied().flatten() else {
                    continue;
                };
                let x = gx + group_w * 0.1 + s as f64 * bar_w;
                let top = y(v);
                let _ = writeln!(
                    out,
                    "<rect x=\"{x:.1}\" y=\"{top:.1}\" width=\"{w:.1}\" height=\"{h:.1}\" fill=\"{c}\"/>\
                     <text x=\"{cx:.1}\" y=\"{ty:.1}\" font-size=\"10\" text-anchor=\"middle\">{label}</text>",
                    w = bar_w * 0.92,
                    h = (TOP + plot_h - top).max(0.5),
                    c = COLORS[s % COLORS.len()],
                    cx = x + bar_w * 0.46,
                    ty = top - 3.0,
                    label = short(v)
                );
            }
        }
        // The legend, in rows under the title.
        let (mut lx, mut ly) = (LEFT, 34.0);
        for (s, (name, _)) in self.series.iter().enumerate() {
            let width = 24.0 + 6.5 * name.chars().count() as f64;
            if lx > LEFT && lx + width > WIDTH - RIGHT {
                lx = LEFT;
                ly += 18.0;
            }
            let _ = writeln!(
                out,
                "<rect x=\"{lx:.1}\" y=\"{ly:.1}\" width=\"12\" height=\"12\" fill=\"{c}\"/>\
                 <text x=\"{tx:.1}\" y=\"{ty:.1}\">{name}</text>",
                c = COLORS[s % COLORS.len()],
                tx = lx + 16.0,
                ty = ly + 10.0,
                name = escape(name)
            );
            lx += width;
        }
        let _ = writeln!(
            out,
            "<line x1=\"{LEFT}\" x2=\"{x2}\" y1=\"{by}\" y2=\"{by}\" stroke=\"#333\"/>\n</svg>",
            x2 = WIDTH - RIGHT,
            by = TOP + plot_h
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_bars_labels_and_escapes() {
        let chart = BarChart {
            title: "a < b".into(),
            unit: "ns".into(),
            groups: vec!["1".into(), "10".into()],
            series: vec![
                ("x".into(), vec![Some(5.0), Some(50.0)]),
                ("y".into(), vec![None, Some(500.0)]),
            ],
            log: true,
        };
        let svg = chart.render();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("a &lt; b"));
        // Three bars (one value missing), each with its label.
        assert_eq!(svg.matches("<rect x=").count(), 3 + 2);
        assert!(svg.contains(">500<") && svg.contains(">5.00<"));
        assert_eq!(ticks(500.0, true, 5.0), vec![1.0, 10.0, 100.0, 1000.0]);
        assert_eq!(ticks(9.0, false, 1.0), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
    }
}
