//! The report's line charts, drawn with plotters (its SVG backend only) and laid out so that
//! nothing written overlaps the data, however many series and phases there are:
//!
//! ```text
//!  ┌──────────────────────── title ─────────────────────────┐
//!  │ ramp        broadcast   commands          rolling      │  phase labels, a strip of their
//!  │             idle                                       │  own (a second row when close)
//!  │ ┆ ─────────────┆──────────┆─────────────────┆───────── │  the plot: a dashed line where
//!  │ ┆              ┆          ┆                 ┆          │  each phase starts
//!  │ ── gateway r1   ── gateway r2   ── gateway r3   ── …   │  legend, a strip under the axes
//!  └────────────────────────────────────────────────────────┘
//! ```

use plotters::prelude::*;
use plotters::series::DashedLineSeries;

/// A line series: name and points.
pub type Series<'a> = (&'a str, Vec<(f64, f64)>);

/// Width of every chart, pixels.
const W: u32 = 960;
/// Height of the plot part (title, axes), pixels; the strips come on top of it.
const PLOT_H: u32 = 420;
/// Left and right margins.
const MARGIN: u32 = 16;
/// Room for the y axis's tick labels and description.
const Y_AREA: u32 = 72;
/// Room for the x axis's tick labels and description.
const X_AREA: u32 = 44;
const TITLE_H: u32 = 32;
const MARK_ROW_H: u32 = 15;
const LEGEND_ROW_H: u32 = 22;
const FONT: &str = "sans-serif";

/// Matplotlib's "tab10": ten colours told apart easily, also by most colour-blind readers.
const COLORS: [RGBColor; 10] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x17, 0xbe, 0xcf),
];

/// A width for `text` at nominal `size` that is not less than a browser's for sans-serif (which
/// the SVG leaves to the viewer; plotters writes `size / 1.24` px): layout decisions use it,
/// so labels never touch.
fn text_width(text: &str, size: f64) -> f64 {
    text.chars().count() as f64 * size * 0.62
}

/// Places labels of the given widths at the given left edges on as few rows as keep them
/// apart; returns each one's row.
fn rows_for(spans: &[(f64, f64)]) -> Vec<usize> {
    let mut ends: Vec<f64> = Vec::new();
    spans
        .iter()
        .map(
            |&(x, w)| match ends.iter().position(|end| *end + 8.0 <= x) {
                Some(r) => {
                    ends[r] = x + w;
                    r
                }
                None => {
                    ends.push(x + w);
                    ends.len() - 1
                }
            },
        )
        .collect()
}

/// Legend entries packed left to right on rows of the chart's width: each entry's row and x.
fn legend_layout(names: &[&str], size: f64) -> Vec<(usize, f64)> {
    let (mut row, mut x) = (0usize, f64::from(MARGIN) + f64::from(Y_AREA));
    names
        .iter()
        .map(|n| {
            let w = 26.0 + text_width(n, size) + 18.0;
            if x + w > f64::from(W - MARGIN) && x > f64::from(MARGIN + Y_AREA) {
                row += 1;
                x = f64::from(MARGIN + Y_AREA);
            }
            let at = (row, x);
            x += w;
            at
        })
        .collect()
}

fn fmt_tick(v: f64, step_hint: f64) -> String {
    if step_hint < 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.0}")
    }
}

/// A line chart as SVG. With `log_x`, x values must be positive and the axis is logarithmic
/// (decades). `marks` are `(x, name)`: a dashed vertical line at x, named above the plot.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series<'_>],
    log_x: bool,
    marks: &[(f64, String)],
) -> String {
    let fx = |x: f64| if log_x { x.max(1e-3).log10() } else { x };
    let points: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(x, y)| (fx(x), y)))
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let (mut x0, mut x1) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    if points.is_empty() {
        (x0, x1) = (0.0, 1.0);
    }
    if log_x {
        x0 = x0.floor();
        x1 = x1.ceil().max(x0 + 1.0);
    } else {
        x0 = x0.min(0.0);
        for (m, _) in marks {
            x1 = x1.max(*m);
        }
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
    }
    let mut y1 = points.iter().fold(0f64, |a, p| a.max(p.1));
    if y1 <= 0.0 {
        y1 = 1.0;
    }
    // A little headroom so a line at the maximum is not drawn on the frame.
    y1 *= 1.05;

    // Phase labels: rows from their pixel positions (the plot spans Y_AREA+MARGIN..W-MARGIN).
    let mark_size = 13.0;
    let (left, right) = (f64::from(MARGIN + Y_AREA), f64::from(W - MARGIN));
    let px = |x: f64| left + (fx(x) - x0) / (x1 - x0) * (right - left);
    let mut mark_spans: Vec<(f64, f64, &str, f64)> = marks
        .iter()
        .map(|(x, name)| {
            let w = text_width(name, mark_size);
            let at = (px(*x) + 2.0).min(right - w);
            (at, w, name.as_str(), *x)
        })
        .collect();
    mark_spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mark_rows = rows_for(
        &mark_spans
            .iter()
            .map(|(a, w, ..)| (*a, *w))
            .collect::<Vec<_>>(),
    );
    let n_mark_rows = mark_rows.iter().max().map_or(0, |r| r + 1) as u32;

    let legend_size = 15.0;
    let names: Vec<&str> = series.iter().map(|(n, _)| *n).collect();
    let legend = legend_layout(&names, legend_size);
    let n_legend_rows = legend.iter().map(|(r, _)| r + 1).max().unwrap_or(0) as u32;

    let marks_h = n_mark_rows * MARK_ROW_H + if n_mark_rows > 0 { 4 } else { 0 };
    let legend_h = n_legend_rows * LEGEND_ROW_H + if n_legend_rows > 0 { 8 } else { 0 };
    let height = PLOT_H + marks_h + legend_h;

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (W, height)).into_drawing_area();
        let _ = root.fill(&WHITE);
        let (head, rest) = root.split_vertically(TITLE_H + marks_h);
        let (plot, foot) = rest.split_vertically(PLOT_H - TITLE_H);
        let _ = head.draw(&Text::new(
            title.to_owned(),
            ((W / 2) as i32, 8),
            (FONT, 19)
                .into_font()
                .color(&BLACK)
                .pos(plotters::style::text_anchor::Pos::new(
                    plotters::style::text_anchor::HPos::Center,
                    plotters::style::text_anchor::VPos::Top,
                )),
        ));
        let mut chart = match ChartBuilder::on(&plot)
            .margin_left(MARGIN)
            .margin_right(MARGIN)
            .margin_top(6)
            .margin_bottom(4)
            .x_label_area_size(X_AREA)
            .y_label_area_size(Y_AREA)
            .build_cartesian_2d(x0..x1, 0.0..y1)
        {
            Ok(c) => c,
            Err(_) => return svg_fallback(title),
        };
        let decades = (x1 - x0).round() as usize + 1;
        let x_fmt = |v: &f64| {
            if log_x {
                let t = 10f64.powf(*v);
                if t >= 1.0 {
                    format!("{t:.0}")
                } else {
                    format!("{t}")
                }
            } else {
                fmt_tick(*v, (x1 - x0) / 10.0)
            }
        };
        let y_fmt = |v: &f64| fmt_tick(*v, y1 / 8.0);
        let mut mesh = chart.configure_mesh();
        mesh.x_desc(x_label)
            .y_desc(y_label)
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 15))
            .bold_line_style(RGBColor(0xdd, 0xdd, 0xdd))
            .light_line_style(RGBColor(0xf3, 0xf3, 0xf3))
            .y_labels(8);
        if log_x {
            mesh.x_labels(decades.max(2));
        } else {
            mesh.x_labels(10);
        }
        let _ = mesh.draw();
        let grey = RGBColor(0x88, 0x88, 0x88);
        for (x, _) in marks {
            let _ = chart.draw_series(DashedLineSeries::new(
                [(fx(*x), 0.0), (fx(*x), y1)],
                5,
                4,
                grey.stroke_width(1),
            ));
        }
        for (i, (_, pts)) in series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let _ = chart.draw_series(LineSeries::new(
                pts.iter()
                    .map(|&(x, y)| (fx(x), y))
                    .filter(|(x, y)| x.is_finite() && y.is_finite()),
                color.stroke_width(2),
            ));
        }
        // Phase names in their strip, each at its line's x (exact, from the chart's mapping).
        for ((at, w, name, x), row) in mark_spans.iter().zip(&mark_rows) {
            let exact = chart.backend_coord(&(fx(*x), 0.0)).0 as f64 + 2.0;
            let at = if (exact - at).abs() < 4.0 {
                exact.min(right - w)
            } else {
                *at
            };
            let _ = head.draw(&Text::new(
                (*name).to_owned(),
                (at as i32, (TITLE_H + *row as u32 * MARK_ROW_H) as i32),
                (FONT, mark_size)
                    .into_font()
                    .color(&RGBColor(0x55, 0x55, 0x55))
                    .pos(plotters::style::text_anchor::Pos::new(
                        plotters::style::text_anchor::HPos::Left,
                        plotters::style::text_anchor::VPos::Top,
                    )),
            ));
        }
        for (i, ((row, x), name)) in legend.iter().zip(&names).enumerate() {
            let color = COLORS[i % COLORS.len()];
            let y = (*row as u32 * LEGEND_ROW_H + 12) as i32;
            let x = *x as i32;
            let _ = foot.draw(&PathElement::new(
                [(x, y), (x + 22, y)],
                color.stroke_width(3),
            ));
            let _ = foot.draw(&Text::new(
                (*name).to_owned(),
                (x + 28, y),
                (FONT, legend_size).into_font().color(&BLACK).pos(
                    plotters::style::text_anchor::Pos::new(
                        plotters::style::text_anchor::HPos::Left,
                        plotters::style::text_anchor::VPos::Center,
                    ),
                ),
            ));
        }
        if points.is_empty() {
            let _ = plot.draw(&Text::new(
                "no data".to_owned(),
                ((W / 2) as i32, (PLOT_H / 2) as i32),
                (FONT, 16).into_font().color(&grey),
            ));
        }
        let _ = root.present();
    }
    svg
}

fn svg_fallback(title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{PLOT_H}\"><text x=\"20\" y=\"30\">{}: no chart (degenerate ranges)</text></svg>",
        title.replace('&', "&amp;").replace('<', "&lt;")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_series_and_a_dashed_line_per_mark() {
        let svg = line_chart(
            "t",
            "x",
            "y",
            &[
                ("a", vec![(0.0, 1.0), (1.0, 2.0)]),
                ("b", vec![(0.5, 3.0), (0.7, 1.0)]),
            ],
            false,
            &[(0.5, "mark".into())],
        );
        assert!(svg.starts_with("<svg"), "{svg}");
        // Each series: its line and its legend swatch, in its own colour.
        for color in ["#1F77B4", "#D62728"] {
            assert_eq!(
                svg.matches(&format!("stroke=\"{color}\"")).count(),
                2,
                "{color}: {svg}"
            );
        }
        assert!(
            svg.contains("stroke=\"#888888\""),
            "no dashed mark line: {svg}"
        );
        for text in ["mark", "a", "b", "t"] {
            assert!(svg.contains(&format!("\n{text}\n</text>")), "{text}: {svg}");
        }
        let log = line_chart(
            "t",
            "x",
            "y",
            &[("a", vec![(0.1, 0.5), (20.0, 1.0)])],
            true,
            &[],
        );
        assert_eq!(log.matches("stroke=\"#1F77B4\"").count(), 2, "{log}");
        // Decades on the x axis: 0.1, 1, 10, 100.
        for tick in ["0.1", "1", "10", "100"] {
            assert!(log.contains(&format!("\n{tick}\n</text>")), "{tick}: {log}");
        }
    }

    #[test]
    fn close_phase_labels_go_on_separate_rows_and_far_ones_share_one() {
        assert_eq!(
            rows_for(&[(0.0, 50.0), (20.0, 50.0), (200.0, 50.0)]),
            [0, 1, 0]
        );
        assert_eq!(rows_for(&[(0.0, 50.0), (60.0, 50.0)]), [0, 0]);
    }

    #[test]
    fn many_legend_entries_wrap_onto_rows_within_the_width() {
        let names: Vec<String> = (0..12).map(|i| format!("gateway replica {i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let l = legend_layout(&refs, 13.0);
        assert!(l.iter().any(|(r, _)| *r > 0));
        for ((_, x), n) in l.iter().zip(&refs) {
            assert!(
                x + 26.0 + text_width(n, 13.0) <= f64::from(W - MARGIN),
                "{n} at {x}"
            );
        }
    }
}
