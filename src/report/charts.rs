//! The report's charts, drawn by plotters into SVG strings: grouped benchmark bars with their 95%
//! intervals, and training curves. Labels are made markup-safe before plotters writes them, since
//! the page embeds the SVG as is.

use plotters::prelude::*;

use super::{BenchRow, Curve};

const COLORS: [RGBColor; 8] = [
    RGBColor(0x4c, 0x72, 0xb0),
    RGBColor(0xdd, 0x84, 0x52),
    RGBColor(0x55, 0xa8, 0x68),
    RGBColor(0xc4, 0x4e, 0x52),
    RGBColor(0x81, 0x72, 0xb3),
    RGBColor(0x93, 0x78, 0x60),
    RGBColor(0xda, 0x8b, 0xc3),
    RGBColor(0x8c, 0x8c, 0x8c),
];

/// Text for an SVG label: no markup characters survive.
pub fn safe_label(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '<' => '‹',
            '>' => '›',
            '&' => '+',
            '"' => '\'',
            c if c.is_control() => ' ',
            c => c,
        })
        .take(60)
        .collect()
}

fn err(e: impl std::fmt::Display) -> super::ReportError {
    super::ReportError::Render(format!("chart: {e}"))
}

/// Grouped bars: one group per benchmark of the given scale, one bar per model, with intervals.
pub fn bench_bars(
    rows: &[&BenchRow],
    models: &[String],
    y_max: f64,
    y_label: &str,
) -> Result<String, super::ReportError> {
    let mut svg = String::new();
    let width = (160 + rows.len() * (40 + 26 * models.len())).clamp(480, 1400) as u32;
    {
        let root = SVGBackend::with_string(&mut svg, (width, 360)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let n = rows.len().max(1) as f64;
        let names: Vec<String> = rows.iter().map(|r| safe_label(&r.bench)).collect();
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(52)
            .build_cartesian_2d(-0.5f64..n - 0.5, 0f64..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(rows.len().max(1))
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < names.len() {
                    names[i as usize].clone()
                } else {
                    String::new()
                }
            })
            .y_desc(safe_label(y_label))
            .draw()
            .map_err(err)?;
        let w = 0.8 / models.len().max(1) as f64;
        for (j, m) in models.iter().enumerate() {
            let color = COLORS[j % COLORS.len()];
            let mut bars = Vec::new();
            let mut whiskers = Vec::new();
            for (i, r) in rows.iter().enumerate() {
                let Some(c) = r.cells.iter().find(|c| &c.model == m) else {
                    continue;
                };
                let x0 = i as f64 - 0.4 + j as f64 * w;
                let clamp = |v: f64| {
                    if v.is_finite() {
                        v.clamp(0.0, y_max)
                    } else {
                        0.0
                    }
                };
                bars.push(Rectangle::new(
                    [(x0, 0.0), (x0 + w * 0.9, clamp(c.score))],
                    color.filled(),
                ));
                let xm = x0 + w * 0.45;
                whiskers.push(PathElement::new(
                    vec![(xm, clamp(c.lo)), (xm, clamp(c.hi))],
                    BLACK.stroke_width(1),
                ));
                whiskers.push(PathElement::new(
                    vec![(xm - w * 0.2, clamp(c.lo)), (xm + w * 0.2, clamp(c.lo))],
                    BLACK.stroke_width(1),
                ));
                whiskers.push(PathElement::new(
                    vec![(xm - w * 0.2, clamp(c.hi)), (xm + w * 0.2, clamp(c.hi))],
                    BLACK.stroke_width(1),
                ));
            }
            chart
                .draw_series(bars)
                .map_err(err)?
                .label(safe_label(m))
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
                });
            chart.draw_series(whiskers).map_err(err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// One training metric over steps (its `eval/` counterpart overlaid when the run logged it).
pub fn curve(c: &Curve, metric: &str) -> Result<Option<String>, super::ReportError> {
    let Some(train) = c.series.get(metric) else {
        return Ok(None);
    };
    let eval = c.series.get(&format!("eval/{metric}"));
    let all: Vec<&(f64, f64)> = train.iter().chain(eval.into_iter().flatten()).collect();
    let (x0, x1) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), (x, _)| {
            (a.min(*x), b.max(*x))
        });
    let (y0, y1) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), (_, y)| {
            (a.min(*y), b.max(*y))
        });
    let pad = ((y1 - y0) * 0.08).max(1e-6);
    let (x1, y0, y1) = (if x1 > x0 { x1 } else { x0 + 1.0 }, y0 - pad, y1 + pad);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (440, 260)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                safe_label(&format!("{} · {metric}", c.step)),
                ("sans-serif", 15),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(err)?;
        chart.configure_mesh().x_desc("step").draw().map_err(err)?;
        chart
            .draw_series(LineSeries::new(
                train.iter().copied(),
                COLORS[0].stroke_width(2),
            ))
            .map_err(err)?
            .label("train")
            .legend(|(x, y)| {
                PathElement::new(vec![(x, y), (x + 14, y)], COLORS[0].stroke_width(2))
            });
        if let Some(e) = eval {
            chart
                .draw_series(LineSeries::new(
                    e.iter().copied(),
                    COLORS[1].stroke_width(2),
                ))
                .map_err(err)?
                .label("eval")
                .legend(|(x, y)| {
                    PathElement::new(vec![(x, y), (x + 14, y)], COLORS[1].stroke_width(2))
                });
            chart
                .draw_series(e.iter().map(|p| Circle::new(*p, 3, COLORS[1].filled())))
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(Some(svg))
}

/// The metrics of a training curve worth a chart, in the order the report shows them.
pub fn curve_metrics(c: &Curve) -> Vec<String> {
    let preferred = [
        "loss",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "rewards/chosen",
        "rewards/rejected",
        "learning_rate",
    ];
    preferred
        .iter()
        .filter(|m| c.series.contains_key(**m))
        .map(|m| m.to_string())
        .collect()
}
