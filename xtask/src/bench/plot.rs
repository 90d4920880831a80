//! SVG plots of benchmark runs (plotters): throughput against concurrency for each engine,
//! and TTFT / ITL distributions.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use super::serve::ServeReport;

const COLORS: [RGBColor; 4] =
    [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(214, 39, 40)];

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("plot: {e}")
}

/// Output tokens/s against max concurrency, one line per engine.
pub fn throughput_vs_concurrency(path: &Path, runs: &[ServeReport]) -> Result<()> {
    let mut engines: Vec<&str> = runs.iter().map(|r| r.engine.as_str()).collect();
    engines.dedup();
    engines.sort();
    engines.dedup();
    let xmax = runs.iter().filter_map(|r| r.max_concurrency).max().unwrap_or(1) as f64;
    let ymax = runs.iter().map(|r| r.output_throughput).fold(1.0, f64::max) * 1.15;
    let root = SVGBackend::new(path, (760, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Output throughput vs concurrency", ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((0.5f64..xmax * 1.5).log_scale(), 0f64..ymax)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("max concurrency (requests in flight)")
        .y_desc("output tokens/s")
        .draw()
        .map_err(err)?;
    for (k, e) in engines.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let mut pts: Vec<(f64, f64)> = runs
            .iter()
            .filter(|r| r.engine == *e)
            .map(|r| (r.max_concurrency.unwrap_or(1) as f64, r.output_throughput))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(*e)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled()))).map_err(err)?;
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw().map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Cumulative distributions of TTFT and ITL for each run (two panels).
pub fn latency_distributions(path: &Path, runs: &[ServeReport]) -> Result<()> {
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let panels = root.split_evenly((1, 2));
    for (panel, (title, pick)) in panels.iter().zip([
        ("TTFT (ms), cumulative", (|r: &ServeReport| r.ttfts.clone()) as fn(&ServeReport) -> Vec<f64>),
        ("ITL (ms), cumulative", |r: &ServeReport| r.itls.clone()),
    ]) {
        let xmax = runs.iter().flat_map(&pick).fold(1.0, f64::max) * 1.05;
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(0f64..xmax, 0f64..1.0)
            .map_err(err)?;
        chart.configure_mesh().x_desc("ms").y_desc("fraction").draw().map_err(err)?;
        for (k, r) in runs.iter().enumerate() {
            let mut v = pick(r);
            if v.is_empty() {
                continue;
            }
            v.sort_by(f64::total_cmp);
            let n = v.len() as f64;
            let color = COLORS[k % COLORS.len()];
            let label = match r.max_concurrency {
                Some(c) => format!("{} (c={c})", r.engine),
                None => r.engine.clone(),
            };
            chart
                .draw_series(LineSeries::new(
                    v.iter().enumerate().map(|(i, &x)| (x, (i + 1) as f64 / n)),
                    color.stroke_width(2),
                ))
                .map_err(err)?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}
