//! PNG charts: stacked line panels (training curves, federation rounds) and labelled
//! scatter plots (2-D projections of embeddings). Text uses the bundled DejaVu Sans, so
//! no system fonts are needed.

pub mod pca;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use pca::pca_2d;

use std::path::Path;
use std::sync::Once;

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

#[derive(Debug, thiserror::Error)]
#[error("plot {path}: {message}")]
pub struct PlotError {
    pub path: String,
    pub message: String,
}

pub type Result<T> = std::result::Result<T, PlotError>;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

fn fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if register_font(FAMILY, FontStyle::Normal, FONT).is_err() {
            // Only possible if the bundled file is corrupt; text would be missing.
            eprintln!("warning: bundled plot font failed to load");
        }
    });
}

/// A named line.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// Draw a marker on every point (for sparse series such as periodic evaluations).
    pub markers: bool,
}

impl Series {
    pub fn line(label: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series {
            label: label.into(),
            points,
            markers: false,
        }
    }

    pub fn marked(label: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series {
            label: label.into(),
            points,
            markers: true,
        }
    }
}

/// One chart of a figure.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Start the y axis at 0 (quantities such as bytes, where a zoomed axis would make
    /// equal values look different).
    pub y_from_zero: bool,
}

fn err(path: &Path, e: impl std::fmt::Display) -> PlotError {
    PlotError {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Range of values with a little margin; a flat or empty range is widened.
fn span(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        let pad = lo.abs().max(1.0) * 0.05;
        return (lo - pad, hi + pad);
    }
    let pad = (hi - lo) * 0.05;
    (lo - pad, hi + pad)
}

fn color(i: usize) -> RGBColor {
    const COLORS: [RGBColor; 6] = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(255, 127, 14),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
    ];
    COLORS[i % COLORS.len()]
}

/// The corner of the plot area with the fewest data points near it, for the legend.
fn legend_corner(series: &[Series], xs: (f64, f64), ys: (f64, f64)) -> SeriesLabelPosition {
    let corners = [
        (SeriesLabelPosition::UpperRight, 1.0, 1.0),
        (SeriesLabelPosition::UpperLeft, 0.0, 1.0),
        (SeriesLabelPosition::LowerRight, 1.0, 0.0),
        (SeriesLabelPosition::LowerLeft, 0.0, 0.0),
    ];
    let unit = |v: f64, (lo, hi): (f64, f64)| (v - lo) / (hi - lo).max(1e-12);
    let crowding = |cx: f64, cy: f64| {
        series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|p| (unit(p.0, xs) - cx).abs() < 0.35 && (unit(p.1, ys) - cy).abs() < 0.3)
            .count()
    };
    corners
        .into_iter()
        .min_by_key(|&(_, cx, cy)| crowding(cx, cy))
        .map(|(position, _, _)| position)
        .unwrap_or(SeriesLabelPosition::UpperRight)
}

/// A chart on `area` with a caption (text, font size, margin) and f64 axes over `xs` × `ys`,
/// its mesh labelled `axes`; `x_ticks`: that many integer ticks on x.
fn chart<'a, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, plotters::coord::Shift>,
    caption: (&str, u32, u32),
    xs: (f64, f64),
    ys: (f64, f64),
    axes: (&str, &str),
    x_ticks: Option<usize>,
    path: &Path,
) -> Result<ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption.0, (FAMILY, caption.1))
        .margin(caption.2)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(xs.0..xs.1, ys.0..ys.1)
        .map_err(|e| err(path, e))?;
    let mut mesh = chart.configure_mesh();
    // x is a step or round number: integer ticks, never more than one per unit.
    let integer = |x: &f64| format!("{x:.0}");
    if let Some(n) = x_ticks {
        mesh.x_labels(n).x_label_formatter(&integer);
    }
    mesh.x_desc(axes.0)
        .y_desc(axes.1)
        .label_style((FAMILY, 13))
        .axis_desc_style((FAMILY, 14))
        .draw()
        .map_err(|e| err(path, e))?;
    Ok(chart)
}

/// Panels stacked vertically in one PNG, `width` pixels wide, 320 pixels per panel.
pub fn line_panels(path: &Path, title: &str, panels: &[Panel], width: u32) -> Result<()> {
    fonts();
    let height = 60 + 320 * panels.len().max(1) as u32;
    let root = BitMapBackend::new(path, (width, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(path, e))?;
    let root = root.titled(title, (FAMILY, 24)).map_err(|e| err(path, e))?;
    let areas = root.split_evenly((panels.len().max(1), 1));
    for (panel, area) in panels.iter().zip(areas.iter()) {
        draw_panel(area, panel, path)?;
    }
    root.present().map_err(|e| err(path, e))?;
    Ok(())
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    panel: &Panel,
    path: &Path,
) -> Result<()> {
    let points = || panel.series.iter().flat_map(|s| s.points.iter());
    let xs = span(points().map(|p| p.0));
    let mut ys = span(points().map(|p| p.1));
    if panel.y_from_zero {
        ys = (ys.0.min(0.0), ys.1.max(0.0) * 1.1);
    }
    let x_ticks = ((xs.1 - xs.0).floor() as usize + 1).clamp(2, 10);
    let legend_at = legend_corner(&panel.series, xs, ys);
    let axes = (panel.x_label.as_str(), panel.y_label.as_str());
    let mut chart = chart(
        area,
        (&panel.title, 18, 12),
        xs,
        ys,
        axes,
        Some(x_ticks),
        path,
    )?;
    for (i, s) in panel.series.iter().enumerate() {
        let c = color(i);
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|p| p.1.is_finite())
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
            .map_err(|e| err(path, e))?
            .label(&s.label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        if s.markers {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))
                .map_err(|e| err(path, e))?;
        }
    }
    // A single series is named by the panel's title; a legend would only hide data.
    if panel.series.len() > 1 {
        legend(&mut chart, 13, legend_at, path)?;
    }
    Ok(())
}

/// The series' legend at `position`, on a translucent white box.
fn legend<'a, DB: DrawingBackend + 'a>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    font_size: u32,
    position: SeriesLabelPosition,
    path: &Path,
) -> Result<()> {
    chart
        .configure_series_labels()
        .label_font((FAMILY, font_size))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .position(position)
        .draw()
        .map_err(|e| err(path, e))
}

/// A labelled scatter plot: `points[i] = (x, y, class)`, `classes[class]` its legend name.
pub fn scatter(
    path: &Path,
    title: &str,
    axes: (&str, &str),
    points: &[(f64, f64, usize)],
    classes: &[String],
) -> Result<()> {
    fonts();
    let root = BitMapBackend::new(path, (900, 760)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(path, e))?;
    let xs = span(points.iter().map(|p| p.0));
    let ys = span(points.iter().map(|p| p.1));
    let mut chart = chart(&root, (title, 22, 16), xs, ys, axes, None, path)?;
    for (k, name) in classes.iter().enumerate() {
        let c = color(k);
        chart
            .draw_series(
                points
                    .iter()
                    .filter(|p| p.2 == k)
                    .map(|p| Circle::new((p.0, p.1), 3, c.mix(0.75).filled())),
            )
            .map_err(|e| err(path, e))?
            .label(name)
            .legend(move |(x, y)| Circle::new((x + 8, y), 4, c.filled()));
    }
    legend(&mut chart, 14, SeriesLabelPosition::UpperRight, path)?;
    root.present().map_err(|e| err(path, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_drawn, decode, has_colour};

    #[test]
    fn writes_png_files() {
        let dir = std::env::temp_dir().join(format!("fedmicse-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("lines.png");
        let panel = Panel {
            title: "loss".into(),
            x_label: "step".into(),
            y_label: "loss".into(),
            series: vec![
                Series::line(
                    "loss",
                    (0..50)
                        .map(|i| (i as f64, 1.0 / (1.0 + i as f64)))
                        .collect(),
                ),
                Series::marked("dev", vec![(10.0, 0.5), (20.0, 0.3)]),
            ],
            y_from_zero: false,
        };
        line_panels(&p, "training", &[panel.clone(), panel], 800).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        // Two panels: 800 wide, 60 + 2 × 320 high; both series' colours drawn.
        let (w, h, px) = decode(&p);
        assert_eq!((w, h), (800, 700));
        assert_drawn(&px, w, h);
        assert!(has_colour(&px, 0) && has_colour(&px, 1));
        let s = dir.join("scatter.png");
        let pts: Vec<(f64, f64, usize)> = (0..100)
            .map(|i| ((i as f64).sin(), (i as f64).cos(), i % 3))
            .collect();
        scatter(
            &s,
            "pca",
            ("pc1", "pc2"),
            &pts,
            &["a".into(), "b".into(), "c".into()],
        )
        .unwrap();
        let (w, h, px) = decode(&s);
        assert_eq!((w, h), (900, 760));
        assert_drawn(&px, w, h);
        // The legend shows each class in its own colour.
        assert!((0..3).all(|k| has_colour(&px, k)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
