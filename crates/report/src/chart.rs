//! Charts of one run or several: a panel per quantity, each with its own axis, ticks, units
//! and legend: accepted messages per second; latency percentiles (p50, p99, p99.9 for one
//! run, p50 and p99 per run when comparing); recipients delivered per route when the relay's
//! metrics were scraped. Short runs have few points, so points are marked as well as joined.
//!
//! Drawn with plotters to SVG (text left to the viewer's sans-serif font) or to an RGB
//! bitmap encoded as PNG. Text is measured (and, in PNG, drawn) with DejaVu Sans, embedded
//! in the binary: no system font, fontconfig or freetype is needed.

use crate::RenderError as ReportError;
use coexist_load::report::RunReport;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::sync::Once;

/// Width of a chart (pixels).
const WIDTH: u32 = 1000;
/// Height of one panel (pixels).
const PANEL: u32 = 300;
/// Height of the title band (pixels).
const TITLE: u32 = 40;
/// Runs with at most this many points get a marker on each.
const MARK_BELOW: usize = 60;
/// Series colours, in order (colour-blind safe: Okabe-Ito).
const COLOURS: [RGBColor; 7] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(0, 0, 0),
];

static FONT: &[u8] = include_bytes!("DejaVuSans.ttf");

/// Registers the embedded font for every family the charts use (once per process).
fn fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for family in ["sans-serif", "serif", "monospace"] {
            // The font is a constant known to parse; a failure leaves text unmeasured,
            // and drawing then reports the error.
            let _ = plotters::style::register_font(family, FontStyle::Normal, FONT);
        }
    });
}

fn chart_err(e: impl std::fmt::Display) -> ReportError {
    ReportError::Chart(e.to_string())
}

/// The chart of `runs` as an SVG document.
pub fn svg(runs: &[RunReport]) -> Result<String, ReportError> {
    fonts();
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (WIDTH, height(runs))).into_drawing_area();
        draw(&root, runs)?;
        root.present().map_err(chart_err)?;
    }
    Ok(out)
}

/// The chart of `runs` as a PNG image.
pub fn png(runs: &[RunReport]) -> Result<Vec<u8>, ReportError> {
    fonts();
    let (w, h) = (WIDTH, height(runs));
    let mut rgb = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        draw(&root, runs)?;
        root.present().map_err(chart_err)?;
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header()?;
        writer.write_image_data(&rgb)?;
        writer.finish()?;
    }
    Ok(out)
}

fn panels(runs: &[RunReport]) -> u32 {
    2 + u32::from(runs.iter().any(|r| r.routes.is_some()))
}

fn height(runs: &[RunReport]) -> u32 {
    TITLE + PANEL * panels(runs)
}

/// A label for a tick: as many decimals as the axis' range needs.
fn tick(v: f64, max: f64) -> String {
    let decimals = if max < 1.0 {
        2
    } else if max < 20.0 {
        1
    } else {
        0
    };
    let s = format!("{v:.decimals$}");
    if decimals == 0 && v.abs() >= 10_000.0 {
        // Thousands separators for large counts.
        let digits = s.trim_start_matches('-');
        let mut grouped = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                grouped.push(',');
            }
            grouped.push(c);
        }
        return if v < 0.0 {
            format!("-{grouped}")
        } else {
            grouped
        };
    }
    s
}

/// One line to draw: legend text, colour, thick or thin, points.
struct Line {
    name: String,
    colour: RGBColor,
    thin: bool,
    points: Vec<(f64, f64)>,
}

/// Accepted messages per second of `r` over buckets of `width` seconds (its own when they
/// are as wide or wider), each point in the middle of its bucket.
fn throughput(r: &RunReport, width: f64) -> Vec<(f64, f64)> {
    if width <= r.series_bucket_s || r.series_bucket_s <= 0.0 {
        return r
            .series
            .iter()
            .map(|p| (x_of(r, p.t), p.msg_per_s))
            .collect();
    }
    let mut sums: std::collections::BTreeMap<u64, u64> = std::collections::BTreeMap::new();
    for p in &r.series {
        // Bucket starts are multiples of the run's own width: round before dividing.
        let i = ((p.t + r.series_bucket_s / 2.0) / width).floor() as u64;
        *sums.entry(i).or_default() += p.accepted;
    }
    sums.into_iter()
        .map(|(i, n)| {
            let start = i as f64 * width;
            let span = (r.elapsed_s - start).clamp(r.series_bucket_s, width);
            ((start + span / 2.0), n as f64 / span)
        })
        .collect()
}

/// The middle of each bucket, so that a point sits over the time it measured.
fn x_of(r: &RunReport, t: f64) -> f64 {
    (t + r.series_bucket_s / 2.0).min(r.elapsed_s.max(t))
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    runs: &[RunReport],
) -> Result<(), ReportError> {
    let first = runs.first().ok_or(ReportError::Empty)?;
    root.fill(&WHITE).map_err(chart_err)?;
    let (title, body) = root.split_vertically(TITLE);
    let heading = if runs.len() == 1 {
        format!(
            "coexist load, {}: {} messages accepted in {:.2} s ({:.0} msg/s)",
            first.label, first.accepted, first.elapsed_s, first.msg_per_s
        )
    } else {
        format!(
            "coexist load: {}",
            runs.iter()
                .map(|r| r.label.as_str())
                .collect::<Vec<_>>()
                .join(" vs ")
        )
    };
    title
        .draw_text(
            &heading,
            &("sans-serif", 20).into_font().color(&BLACK),
            (12, 10),
        )
        .map_err(chart_err)?;
    let areas = body.split_evenly((panels(runs) as usize, 1));
    let x_max = runs
        .iter()
        .map(|r| r.elapsed_s)
        .fold(0.0, f64::max)
        .max(0.001);
    let several = runs.len() > 1;

    // Throughput, compared at one bucket width (the widest of the runs): rates over 10 ms
    // and over 100 ms are not alike.
    let width = runs.iter().map(|r| r.series_bucket_s).fold(0.0, f64::max);
    let lines = runs
        .iter()
        .enumerate()
        .map(|(i, r)| Line {
            name: if several {
                r.label.clone()
            } else {
                "accepted".into()
            },
            colour: COLOURS[i % COLOURS.len()],
            thin: false,
            points: throughput(r, width),
        })
        .collect();
    panel(
        &areas[0],
        "Throughput",
        "accepted messages/s",
        x_max,
        lines,
        SeriesLabelPosition::UpperRight,
    )?;

    // Latency percentiles.
    let mut lines = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        let name = |q: &str| {
            if several {
                format!("{} {q}", r.label)
            } else {
                q.to_string()
            }
        };
        let series = |f: fn(&coexist_load::report::Point) -> f64| {
            r.series
                .iter()
                .map(|p| (x_of(r, p.t), f(p)))
                .collect::<Vec<_>>()
        };
        if several {
            let colour = COLOURS[i % COLOURS.len()];
            lines.push(Line {
                name: name("p99"),
                colour,
                thin: false,
                points: series(|p| p.p99_ms),
            });
            lines.push(Line {
                name: name("p50"),
                colour,
                thin: true,
                points: series(|p| p.p50_ms),
            });
        } else {
            // Highest first, so that a lower percentile equal to it is drawn on top.
            for (j, (q, f)) in [
                (
                    "p99.9",
                    (|p: &coexist_load::report::Point| p.p99_9_ms)
                        as fn(&coexist_load::report::Point) -> f64,
                ),
                ("p99", |p| p.p99_ms),
                ("p50", |p| p.p50_ms),
            ]
            .into_iter()
            .enumerate()
            {
                lines.push(Line {
                    name: name(q),
                    // p50 keeps the first colour, as throughput does.
                    colour: COLOURS[2 - j],
                    thin: false,
                    points: series(f),
                });
            }
        }
    }
    panel(
        &areas[1],
        "Latency per message, MAIL to final reply",
        "latency (ms)",
        x_max,
        lines,
        SeriesLabelPosition::UpperRight,
    )?;

    // Deliveries per route.
    if let Some(area) = areas.get(2) {
        let mut lines = Vec::new();
        let mut c = 0;
        for r in runs {
            let Some(routes) = &r.routes else { continue };
            for route in routes.totals.keys() {
                lines.push(Line {
                    name: if several {
                        format!("{} {route}", r.label)
                    } else {
                        route.clone()
                    },
                    colour: COLOURS[c % COLOURS.len()],
                    thin: false,
                    points: routes
                        .series
                        .iter()
                        .map(|p| (p.t, p.sent.get(route).copied().unwrap_or(0) as f64))
                        .collect(),
                });
                c += 1;
            }
        }
        let x_max = lines
            .iter()
            .flat_map(|l| l.points.iter().map(|p| p.0))
            .fold(x_max, f64::max);
        // Counts that only grow: the upper left corner stays free.
        panel(
            area,
            "Deliveries per route (relay metrics)",
            "recipients delivered",
            x_max,
            lines,
            SeriesLabelPosition::UpperLeft,
        )?;
    }
    Ok(())
}

/// One panel: axes from zero, ticks, grid, units, the lines, markers when points are few,
/// and a legend.
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    caption: &str,
    y_desc: &str,
    x_max: f64,
    lines: Vec<Line>,
    legend: SeriesLabelPosition,
) -> Result<(), ReportError> {
    let y_max = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    // Headroom for the legend above the lines; a report file with absurd values (a hand
    // edit, a bad writer) must not give the plot an infinite range.
    const LIMIT: f64 = 1e15;
    let y_max = if y_max > 0.0 {
        y_max.min(LIMIT) * 1.25
    } else {
        1.0
    };
    let x_max = if x_max.is_finite() && x_max > 0.0 {
        x_max.min(LIMIT) * 1.02
    } else {
        1.0
    };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(72)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(chart_err)?;
    let fx = |v: &f64| tick(*v, x_max);
    let fy = |v: &f64| tick(*v, y_max);
    chart
        .configure_mesh()
        .x_desc("time since start (s)")
        .y_desc(y_desc)
        .x_labels(10)
        .y_labels(6)
        .x_label_formatter(&fx)
        .y_label_formatter(&fy)
        .light_line_style(RGBColor(235, 235, 235))
        .label_style(("sans-serif", 12))
        .axis_desc_style(("sans-serif", 13))
        .draw()
        .map_err(chart_err)?;
    let mut any = false;
    for l in &lines {
        if l.points.is_empty() {
            continue;
        }
        any = true;
        let style = ShapeStyle {
            color: l.colour.to_rgba(),
            filled: false,
            stroke_width: if l.thin { 1 } else { 2 },
        };
        let colour = l.colour;
        let thin = l.thin;
        chart
            .draw_series(LineSeries::new(l.points.iter().copied(), style))
            .map_err(chart_err)?
            .label(l.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(
                    vec![(x, y), (x + 20, y)],
                    ShapeStyle {
                        color: colour.to_rgba(),
                        filled: false,
                        stroke_width: if thin { 1 } else { 2 },
                    },
                )
            });
        if l.points.len() <= MARK_BELOW {
            let size = if l.thin { 2 } else { 3 };
            chart
                .draw_series(
                    l.points
                        .iter()
                        .map(|p| Circle::new(*p, size, l.colour.filled())),
                )
                .map_err(chart_err)?;
        }
    }
    if any {
        chart
            .configure_series_labels()
            .position(legend)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(160, 160, 160))
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(chart_err)?;
    } else {
        area.draw_text(
            "no data",
            &("sans-serif", 14)
                .into_font()
                .color(&RGBColor(120, 120, 120)),
            (WIDTH as i32 / 2 - 30, PANEL as i32 / 2),
        )
        .map_err(chart_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use coexist_load::report::sample;

    #[test]
    fn runs_are_compared_at_the_widest_bucket() {
        // 0.25 s of 10 ms buckets, 5 messages each: 500 msg/s.
        let r = sample("fine", 25, 0.01);
        let r = RunReport {
            series: r
                .series
                .into_iter()
                .map(|p| coexist_load::report::Point { accepted: 5, ..p })
                .collect(),
            ..r
        };
        let pts = throughput(&r, 0.1);
        assert_eq!(pts.len(), 3);
        assert!((pts[0].1 - 500.0).abs() < 1e-6 && (pts[1].1 - 500.0).abs() < 1e-6);
        // The last bucket holds 5 buckets (0.05 s) of mail.
        assert!((pts[2].1 - 500.0).abs() < 1e-6, "{pts:?}");
        assert_eq!(throughput(&r, 0.01).len(), 25);
    }

    #[test]
    fn ticks_have_the_decimals_their_range_needs() {
        assert_eq!(tick(0.15, 0.2), "0.15");
        assert_eq!(tick(2.5, 12.0), "2.5");
        assert_eq!(tick(1500.0, 2000.0), "1500");
        assert_eq!(tick(25000.0, 30000.0), "25,000");
        assert_eq!(tick(1234567.0, 2e6), "1,234,567");
    }

    /// The number of points of each data line in an SVG from plotters (grid lines, axes
    /// and legend samples have two).
    fn polylines(svg: &str) -> Vec<usize> {
        svg.split("<polyline")
            .skip(1)
            .filter_map(|p| p.split("points=\"").nth(1))
            .filter_map(|p| p.split('"').next())
            .map(|p| p.split_whitespace().count())
            .filter(|&n| n > 2)
            .collect()
    }

    #[test]
    fn a_thirty_second_run_has_a_point_per_second_on_labelled_axes() {
        let svg = svg(&[sample("long", 30, 1.0)]).unwrap();
        let lines = polylines(&svg);
        // Throughput, three percentiles, two routes (31 scrapes).
        assert_eq!(lines.len(), 6, "{lines:?}");
        assert!(lines[..4].iter().all(|&n| n == 30), "{lines:?}");
        assert!(lines[4..].iter().all(|&n| n == 31), "{lines:?}");
        for label in [
            "time since start (s)",
            "accepted messages/s",
            "latency (ms)",
            // x ticks, each text on a line of its own
            "\n10\n",
            "\n20\n",
        ] {
            assert!(svg.contains(label), "{label} missing");
        }
    }

    #[test]
    fn one_run_and_a_comparison_draw_every_panel() {
        let one = svg(&[sample("a", 3, 0.01)]).unwrap();
        for text in [
            "Throughput",
            "accepted messages/s",
            "latency (ms)",
            "p99.9",
            "time since start (s)",
            "Deliveries per route",
            "cloud",
        ] {
            assert!(one.contains(text), "{text} missing");
        }
        // Three points: joined and marked.
        assert!(one.contains("<polyline") && one.contains("<circle"));
        let two = svg(&[sample("postfix", 40, 1.0), sample("coexist", 8, 1.0)]).unwrap();
        assert!(two.contains("postfix vs coexist") && two.contains("coexist p99"));
        let png = png(&[sample("a", 100, 0.1)]).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 5_000);
        assert!(matches!(svg(&[]), Err(ReportError::Empty)));
    }
}
