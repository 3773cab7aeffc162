//! The rollout page's charts, drawn on the server as SVG with plotters (the Rust plotting library of the
//! field): canaryctl ships one binary with no JavaScript to build, and the browser gets a picture it shows as
//! an image (no script in it runs). Pure: a rollout's chart points in, SVG text out.
//!
//! Rates are differences of the points' totals over a trailing window (at least [`WINDOW_S`] seconds), so a
//! second with few requests does not draw a spike. Steps are marked where the canary's percentage changed.

use plotters::prelude::*;

use crate::rollout::{duration_text, ChartPoint, Rollout};

/// The charts the page shows.
pub const CHARTS: [&str; 4] = ["traffic", "errors", "latency", "evidence"];

/// Rates are taken over at least this many seconds.
pub const WINDOW_S: u64 = 10;

const WIDTH: u32 = 760;
const HEIGHT: u32 = 230;
const STABLE: RGBColor = RGBColor(31, 119, 180);
const CANARY: RGBColor = RGBColor(214, 39, 40);
const STEP: RGBColor = RGBColor(190, 190, 190);
/// The tests' colours on the evidence chart: errors, latency checks, findings.
const TESTS: [RGBColor; 5] = [
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(44, 160, 44),
];

/// One line of a chart: its name, colour, dashed or not, and its (seconds since the start, value) points.
struct Line {
    name: String,
    color: RGBColor,
    dashed: bool,
    points: Vec<(f64, f64)>,
}

/// Chart `which` of rollout `r` as SVG; an error names an unknown chart.
pub fn render(r: &Rollout, which: &str) -> Result<String, String> {
    let points = &r.chart;
    let start = r.started_unix;
    let x = |p: &ChartPoint| p.at_unix.saturating_sub(start) as f64;
    let (title, y_name, log, lines) = match which {
        "traffic" => (
            "Requests a second".to_string(),
            "requests/s",
            false,
            vec![
                rate_line(points, start, &r.plan.stable, STABLE, false, |p| {
                    (p.errors[0] as f64, None)
                }),
                rate_line(points, start, &r.plan.canary, CANARY, false, |p| {
                    (p.errors[2] as f64, None)
                }),
            ],
        ),
        "errors" => (
            "Error rate (5xx, resets, timeouts: as Envoy counts them)".to_string(),
            "% of requests",
            false,
            vec![
                rate_line(points, start, &r.plan.stable, STABLE, false, |p| {
                    (p.errors[1] as f64 * 100.0, Some(p.errors[0] as f64))
                }),
                rate_line(points, start, &r.plan.canary, CANARY, false, |p| {
                    (p.errors[3] as f64 * 100.0, Some(p.errors[2] as f64))
                }),
            ],
        ),
        "latency" => {
            let mut lines = Vec::new();
            for (i, check) in r.latency.iter().enumerate() {
                let bound = duration_text(check.bound_us);
                let dashed = i > 0;
                let of = move |p: &ChartPoint, k: usize| {
                    p.latency
                        .get(i)
                        .and_then(|t| t.get(k))
                        .copied()
                        .unwrap_or(0) as f64
                };
                lines.push(rate_line(
                    points,
                    start,
                    &format!("{} > {bound}", r.plan.stable),
                    STABLE,
                    dashed,
                    move |p| (of(p, 1) * 100.0, Some(of(p, 0))),
                ));
                lines.push(rate_line(
                    points,
                    start,
                    &format!("{} > {bound}", r.plan.canary),
                    CANARY,
                    dashed,
                    move |p| (of(p, 3) * 100.0, Some(of(p, 2))),
                ));
            }
            (
                if r.latency.is_empty() {
                    "Latency: no bounds chosen yet (they come from stable's distribution)"
                        .to_string()
                } else {
                    "Latency: share of requests slower than each bound".to_string()
                },
                "% of requests",
                false,
                lines,
            )
        }
        "evidence" => {
            let mut names = vec!["errors".to_string()];
            names.extend(
                r.latency
                    .iter()
                    .map(|c| format!("latency > {}", duration_text(c.bound_us))),
            );
            names.extend(r.plan.metrics.iter().map(|m| format!("metric {}", m.name)));
            names.push("strongest error signature".to_string());
            let last = names.len() - 1;
            let lines = names
                .into_iter()
                .enumerate()
                .map(|(i, name)| Line {
                    // The findings' value is the last of each point, whatever the number of latency checks.
                    points: points
                        .iter()
                        .filter_map(|p| {
                            let value = if i == last {
                                p.evidence.last()
                            } else {
                                p.evidence.get(i).filter(|_| i + 1 < p.evidence.len())
                            };
                            // Nothing to draw on a log scale for a test with no evidence either way
                            // (no signature yet).
                            value.filter(|v| **v > 0.0).map(|v| (x(p), v.max(1e-6)))
                        })
                        .collect(),
                    name,
                    color: TESTS
                        .get(if i == last { TESTS.len() - 1 } else { i.min(3) })
                        .copied()
                        .unwrap_or(BLACK),
                    dashed: false,
                })
                .collect();
            (
                "Evidence against the canary, over its threshold (rolls back at 1)".to_string(),
                "evidence ÷ threshold",
                true,
                lines,
            )
        }
        other => {
            return Err(format!(
                "chart: {} is not one of {}",
                canary_router::text::quote(other),
                CHARTS.join(", ")
            ))
        }
    };
    let steps: Vec<f64> = points
        .windows(2)
        .filter_map(|w| match w {
            [a, b] if a.percent != b.percent => Some(x(b)),
            _ => None,
        })
        .collect();
    draw(&title, y_name, log, &lines, &steps, points.last().map(x))
        .map_err(|err| format!("chart {which}: {err}"))
}

/// A rate over the trailing window: at each point, (numerator, denominator) totals' differences with the
/// first point at least [`WINDOW_S`] before it (no denominator: a rate a second).
fn rate_line(
    points: &[ChartPoint],
    start: u64,
    name: &str,
    color: RGBColor,
    dashed: bool,
    totals: impl Fn(&ChartPoint) -> (f64, Option<f64>),
) -> Line {
    let mut out = Vec::new();
    let mut from = 0;
    for (i, p) in points.iter().enumerate() {
        while points
            .get(from + 1)
            .is_some_and(|q| from + 1 < i && p.at_unix.saturating_sub(q.at_unix) >= WINDOW_S)
        {
            from += 1;
        }
        let Some(base) = points.get(from).filter(|_| from < i) else {
            continue;
        };
        let (n1, d1) = totals(p);
        let (n0, d0) = totals(base);
        let seconds = p.at_unix.saturating_sub(base.at_unix) as f64;
        let value = match (d1, d0) {
            (None, _) | (_, None) => (n1 - n0).max(0.0) / seconds.max(1.0),
            (Some(d1), Some(d0)) if d1 > d0 => (n1 - n0).max(0.0) / (d1 - d0),
            _ => continue,
        };
        out.push((p.at_unix.saturating_sub(start) as f64, value));
    }
    Line {
        name: name.to_string(),
        color,
        dashed,
        points: out,
    }
}

fn draw(
    title: &str,
    y_name: &str,
    log: bool,
    lines: &[Line],
    steps: &[f64],
    last_x: Option<f64>,
) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let x_max = last_x.unwrap_or(0.0).max(10.0);
        let values = lines.iter().flat_map(|l| l.points.iter().map(|p| p.1));
        let mut builder = ChartBuilder::on(&root);
        builder
            .caption(title, ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(32)
            .y_label_area_size(58);
        if log {
            let (low, high) = values
                .filter(|v| *v > 0.0)
                .fold((1e-2f64, 10.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
            let range = (low.max(1e-6) / 2.0)..(high * 2.0);
            let mut chart = builder
                .build_cartesian_2d(0.0..x_max, range.log_scale())
                .map_err(|e| e.to_string())?;
            chart
                .configure_mesh()
                .x_desc("seconds since the start")
                .y_desc(y_name)
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_label_formatter(&|y| {
                    if *y >= 1.0 {
                        format!("{y:.0}")
                    } else {
                        format!("{y:.0e}")
                    }
                })
                .light_line_style(WHITE)
                .draw()
                .map_err(|e| e.to_string())?;
            plot(&mut chart, lines, steps, (1e-6, high * 2.0))?;
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(0.0, 1.0), (x_max, 1.0)],
                    BLACK.stroke_width(1),
                )))
                .map_err(|e| e.to_string())?;
            legend(&mut chart)?;
        } else {
            let high = values.fold(0.0f64, f64::max);
            let top = if high > 0.0 { high * 1.15 } else { 1.0 };
            let mut chart = builder
                .build_cartesian_2d(0.0..x_max, 0.0..top)
                .map_err(|e| e.to_string())?;
            let digits = if top >= 10.0 { 0 } else { 2 };
            chart
                .configure_mesh()
                .x_desc("seconds since the start")
                .y_desc(y_name)
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_label_formatter(&|y| format!("{y:.digits$}"))
                .light_line_style(WHITE)
                .draw()
                .map_err(|e| e.to_string())?;
            plot(&mut chart, lines, steps, (0.0, top))?;
            legend(&mut chart)?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

type Chart<'a, Y> =
    ChartContext<'a, SVGBackend<'a>, Cartesian2d<plotters::coord::types::RangedCoordf64, Y>>;

fn plot<'a, Y>(
    chart: &mut Chart<'a, Y>,
    lines: &[Line],
    steps: &[f64],
    (y_low, y_high): (f64, f64),
) -> Result<(), String>
where
    Y: Ranged<ValueType = f64>,
{
    chart
        .draw_series(
            steps
                .iter()
                .map(|&x| PathElement::new(vec![(x, y_low), (x, y_high)], STEP.stroke_width(1))),
        )
        .map_err(|e| e.to_string())?;
    for line in lines {
        let color = line.color;
        let style = color.stroke_width(2);
        if line.dashed {
            chart
                .draw_series(DashedLineSeries::new(
                    line.points.iter().copied(),
                    6,
                    4,
                    style,
                ))
                .map_err(|e| e.to_string())?
                .label(line.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        } else {
            chart
                .draw_series(LineSeries::new(line.points.iter().copied(), style))
                .map_err(|e| e.to_string())?
                .label(line.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
    }
    Ok(())
}

fn legend<'a, Y>(chart: &mut Chart<'a, Y>) -> Result<(), String>
where
    Y: Ranged<ValueType = f64>,
{
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::tests::plan;

    fn point(at: u64, stable: [u64; 2], canary: [u64; 2], evidence: f64) -> ChartPoint {
        ChartPoint {
            at_unix: at,
            percent: "20".parse().unwrap(),
            errors: [stable[0], stable[1], canary[0], canary[1]],
            latency: Vec::new(),
            evidence: vec![evidence, 0.0],
        }
    }

    #[test]
    fn rates_are_taken_over_the_trailing_window_from_the_totals() {
        // 100 stable and 20 canary requests a second; the canary fails 5 %, stable 1 %.
        let points: Vec<ChartPoint> = (0..=30)
            .map(|s| point(1_000 + s, [100 * s, s], [20 * s, s], 0.01 * s as f64))
            .collect();
        let traffic = rate_line(&points, 1_000, "v1", STABLE, false, |p| {
            (p.errors[0] as f64, None)
        });
        assert_eq!(traffic.points.first(), Some(&(1.0, 100.0)));
        assert!(
            traffic
                .points
                .iter()
                .all(|&(_, v)| (v - 100.0).abs() < 1e-9),
            "{:?}",
            traffic.points
        );
        let errors = rate_line(&points, 1_000, "v2", CANARY, false, |p| {
            (p.errors[3] as f64 * 100.0, Some(p.errors[2] as f64))
        });
        assert!(
            errors.points.iter().all(|&(_, v)| (v - 5.0).abs() < 1e-9),
            "{:?}",
            errors.points
        );
        // The window: at 30 s, the rate is over 10 s or more, never over fewer than 10 (once 10 have passed).
        assert_eq!(errors.points.len(), 30);
    }

    #[test]
    fn each_chart_is_svg_naming_its_versions_and_an_unknown_chart_is_refused() {
        let (mut r, _) = Rollout::start(plan("20,50,100"), 1_000, Default::default()).unwrap();
        for s in 0..=40 {
            r.chart
                .push(point(1_000 + s, [100 * s, s], [20 * s, s], 0.05 * s as f64));
        }
        if let Some(p) = r.chart.last_mut() {
            p.percent = "50".parse().unwrap();
        }
        for which in CHARTS {
            let svg = render(&r, which).unwrap();
            assert!(
                svg.starts_with("<svg") && svg.ends_with("</svg>\n"),
                "{which}: {svg}"
            );
            assert!(!svg.contains("<script"), "{which}");
        }
        let traffic = render(&r, "traffic").unwrap();
        assert!(
            traffic.contains("Requests a second")
                && traffic.contains(">\nv1\n<")
                && traffic.contains(">\nv2\n<")
        );
        let evidence = render(&r, "evidence").unwrap();
        assert!(evidence.contains("strongest error signature") && evidence.contains("errors"));
        let err = render(&r, "pie").unwrap_err();
        assert_eq!(
            err,
            "chart: \"pie\" is not one of traffic, errors, latency, evidence"
        );
        // An empty rollout draws empty charts, never fails.
        r.chart.clear();
        for which in CHARTS {
            render(&r, which).unwrap();
        }
    }

    #[test]
    fn points_are_thinned_to_keep_the_whole_rollout_and_stay_finite() {
        let (mut r, _) = Rollout::start(plan("20,50,100"), 0, Default::default()).unwrap();
        for now in 0..20_000 {
            r.errors.stable_requests += 1_000;
            r.note_chart(now);
        }
        assert!(r
            .chart
            .iter()
            .all(|p| p.evidence.iter().all(|e| e.is_finite())));
        assert!(r.chart.len() <= crate::rollout::CHART_POINTS);
        assert_eq!(r.chart.first().map(|p| p.at_unix), Some(0));
        let last = r.chart.last().map_or(0, |p| p.at_unix);
        assert!(last >= 19_900, "{last}");
        let json = serde_json::to_string(&r.chart).unwrap();
        let back: Vec<ChartPoint> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r.chart);
        // A full chart of a rollout with three latency bounds, realistic totals: what it adds to the state.
        let full = ChartPoint {
            at_unix: 1_765_100_000,
            percent: "12.5".parse().unwrap(),
            errors: [12_345_678, 12_345, 1_234_567, 1_234],
            latency: vec![[12_345_678, 1_234_567, 1_234_567, 123_456]; 3],
            evidence: vec![0.0123, 1.23e-5, 4.56e-3, 0.789, 12.3],
        };
        let bytes = serde_json::to_string(&vec![full; crate::rollout::CHART_POINTS])
            .unwrap()
            .len();
        eprintln!("a full chart: {bytes} bytes");
        assert!(bytes < 128 * 1024, "{bytes} bytes");
    }
}
