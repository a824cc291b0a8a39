//! Metric history: every point of a metric (`kiln metrics RUN NAME…`: a sparkline per name,
//! or the points as JSON or CSV) and `kiln compare RUN RUN…` (final and extreme values of
//! each metric side by side, and the settings in which the runs differ).

use std::collections::{BTreeMap, BTreeSet};

use kiln_proto::v1;
use serde_json::{Value, json};

use crate::output::{self, number, outln, sanitize};

/// Width of a sparkline, in characters: longer series are averaged into this many buckets.
const SPARK_WIDTH: usize = 60;
const SPARKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// What a series comes to: its extremes and ends.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesStats {
    pub count: usize,
    pub first: f64,
    pub last: f64,
    pub last_step: Option<i64>,
    /// The lowest value and the step it was logged at (the first such point).
    pub min: (f64, Option<i64>),
    pub max: (f64, Option<i64>),
}

impl SeriesStats {
    pub fn of(points: &[v1::MetricPoint]) -> Option<SeriesStats> {
        let (first, last) = (points.first()?, points.last()?);
        let mut stats = SeriesStats {
            count: points.len(),
            first: first.value,
            last: last.value,
            last_step: last.step,
            min: (first.value, first.step),
            max: (first.value, first.step),
        };
        for point in points {
            if point.value < stats.min.0 {
                stats.min = (point.value, point.step);
            }
            if point.value > stats.max.0 {
                stats.max = (point.value, point.step);
            }
        }
        Some(stats)
    }
}

/// `values` as one line of block characters, lowest to highest; more values than `width`
/// are averaged in equal buckets. Non-finite values draw as spaces.
pub fn sparkline(values: &[f64], width: usize) -> String {
    if values.is_empty() || width == 0 {
        return String::new();
    }
    let buckets: Vec<f64> = if values.len() <= width {
        values.to_vec()
    } else {
        (0..width)
            .map(|i| {
                let (start, end) = (i * values.len() / width, (i + 1) * values.len() / width);
                let bucket = &values[start..end.max(start + 1)];
                bucket.iter().sum::<f64>() / bucket.len() as f64
            })
            .collect()
    };
    let finite = buckets.iter().copied().filter(|v| v.is_finite());
    let low = finite.clone().fold(f64::INFINITY, f64::min);
    let high = finite.fold(f64::NEG_INFINITY, f64::max);
    buckets
        .iter()
        .map(|&value| {
            if !value.is_finite() {
                ' '
            } else if high <= low {
                SPARKS[SPARKS.len() / 2]
            } else {
                let level = ((value - low) / (high - low) * (SPARKS.len() - 1) as f64).round();
                SPARKS[level as usize]
            }
        })
        .collect()
}

fn step_text(step: Option<i64>) -> String {
    step.map(|s| format!(" (step {s})")).unwrap_or_default()
}

/// How `kiln metrics RUN NAME…` prints the series it fetched.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SeriesFormat {
    Chart,
    Json,
    Csv,
}

/// Prints each named series: a sparkline with its first/last/min/max, or every point.
pub fn print_series(run_id: i64, series: &[(String, Vec<v1::MetricPoint>)], format: SeriesFormat) {
    match format {
        SeriesFormat::Json => {
            let values = series
                .iter()
                .map(|(name, points)| {
                    json!({
                        "name": name,
                        "points": points.iter().map(|p| json!({
                            "step": p.step,
                            "value": p.value,
                            "time": output::time(p.time_unix_ms),
                            "time_unix_ms": p.time_unix_ms,
                            "rank": p.rank,
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            output::print_json(&Value::Array(values));
        }
        SeriesFormat::Csv => {
            outln!("name,step,value,time_unix_ms,rank");
            for (name, points) in series {
                let name = csv_field(&sanitize(name));
                for p in points {
                    let step = p.step.map(|s| s.to_string()).unwrap_or_default();
                    let rank = p.rank.map(|r| r.to_string()).unwrap_or_default();
                    outln!("{name},{step},{},{},{rank}", p.value, p.time_unix_ms);
                }
            }
        }
        SeriesFormat::Chart => {
            for (name, points) in series {
                let name = sanitize(name);
                let Some(stats) = SeriesStats::of(points) else {
                    outln!("{name}: run {run_id} has no points of this metric");
                    continue;
                };
                let values: Vec<f64> = points.iter().map(|p| p.value).collect();
                outln!(
                    "{name}  {} points{}",
                    stats.count,
                    match (points.first().and_then(|p| p.step), stats.last_step) {
                        (Some(a), Some(b)) => format!(", steps {a}–{b}"),
                        _ => String::new(),
                    }
                );
                outln!("  {}", sparkline(&values, SPARK_WIDTH));
                outln!(
                    "  first {}  last {}{}  min {}{}  max {}{}",
                    number(stats.first),
                    number(stats.last),
                    step_text(stats.last_step),
                    number(stats.min.0),
                    step_text(stats.min.1),
                    number(stats.max.0),
                    step_text(stats.max.1),
                );
            }
        }
    }
}

/// A CSV field: quoted when it holds a comma, quote or line break (RFC 4180).
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

/// One run as `kiln compare` sees it: the run and each of its metrics' series stats.
pub struct Compared {
    pub run: v1::Run,
    pub metrics: BTreeMap<String, SeriesStats>,
}

/// The settings `kiln compare` lines up: (label, value) for one run.
fn settings(run: &v1::Run) -> Vec<(String, String)> {
    let mut rows = vec![
        ("target".to_string(), run.target.clone()),
        (
            "script".to_string(),
            format!("{} {}", run.script, run.args.join(" "))
                .trim_end()
                .to_string(),
        ),
        (
            "environment".to_string(),
            output::environment_text(run.environment.as_ref()),
        ),
        (
            "resources".to_string(),
            output::resources_text(run.resources.as_ref()),
        ),
        (
            "nodes".to_string(),
            format!("{} x {}", run.nodes.max(1), run.procs_per_node.max(1)),
        ),
        ("snapshot".to_string(), run.snapshot_digest.clone()),
        ("max retries".to_string(), run.max_retries.to_string()),
        ("timeout".to_string(), format!("{}s", run.timeout_s)),
    ];
    for (key, value) in &run.env {
        rows.push((format!("env {key}"), value.clone()));
    }
    rows
}

/// Prints runs side by side: how each ended, the settings in which they differ (an env
/// variable one run lacks shows as `-`), and each metric's last, min and max.
pub fn print_compare(runs: &[Compared], as_json: bool) {
    let per_run: Vec<BTreeMap<String, String>> = runs
        .iter()
        .map(|c| settings(&c.run).into_iter().collect())
        .collect();
    let labels: BTreeSet<&String> = per_run.iter().flat_map(|s| s.keys()).collect();
    let differing: Vec<&String> = labels
        .into_iter()
        .filter(|label| {
            let values: BTreeSet<Option<&String>> = per_run.iter().map(|s| s.get(*label)).collect();
            values.len() > 1
        })
        .collect();
    let names: BTreeSet<&String> = runs.iter().flat_map(|c| c.metrics.keys()).collect();
    if as_json {
        let value = json!({
            "runs": runs.iter().map(|c| output::run_json(&c.run)).collect::<Vec<_>>(),
            "differences": differing.iter().map(|label| {
                json!({
                    "setting": label,
                    "values": per_run.iter().map(|s| s.get(*label)).collect::<Vec<_>>(),
                })
            }).collect::<Vec<_>>(),
            "metrics": names.iter().map(|name| {
                json!({
                    "name": name,
                    "runs": runs.iter().map(|c| c.metrics.get(*name).map(|m| json!({
                        "count": m.count,
                        "last": m.last,
                        "last_step": m.last_step,
                        "min": m.min.0,
                        "max": m.max.0,
                    }))).collect::<Vec<_>>(),
                })
            }).collect::<Vec<_>>(),
        });
        output::print_json(&value);
        return;
    }
    let mut header = vec![String::new()];
    header.extend(runs.iter().map(|c| format!("run {}", c.run.id)));
    let mut rows = vec![
        row("name", runs, |c| c.run.name.clone()),
        row("status", runs, |c| {
            c.run.status().domain().as_str().to_string()
        }),
        row("duration", runs, |c| {
            output::total_duration_s(&c.run)
                .or_else(|| output::duration_s(&c.run))
                .map(|s| format!("{s:.1}s"))
                .unwrap_or_else(|| "-".into())
        }),
    ];
    for label in &differing {
        let mut cells = vec![(*label).clone()];
        cells.extend(
            per_run
                .iter()
                .map(|s| s.get(*label).cloned().unwrap_or_else(|| "-".into())),
        );
        rows.push(cells);
    }
    for name in names {
        for (what, pick) in [
            (
                "last",
                (|m: &SeriesStats| m.last) as fn(&SeriesStats) -> f64,
            ),
            ("min", |m| m.min.0),
            ("max", |m| m.max.0),
        ] {
            let mut cells = vec![format!("{name} ({what})")];
            cells.extend(
                runs.iter()
                    .map(|c| c.metrics.get(name).map_or("-".into(), |m| number(pick(m)))),
            );
            rows.push(cells);
        }
    }
    output::table(&header, rows);
    if differing.is_empty() {
        outln!("(the runs' settings are the same)");
    }
}

fn row(label: &str, runs: &[Compared], cell: impl Fn(&Compared) -> String) -> Vec<String> {
    let mut cells = vec![label.to_string()];
    cells.extend(runs.iter().map(cell));
    cells
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(values: &[f64]) -> Vec<v1::MetricPoint> {
        values
            .iter()
            .enumerate()
            .map(|(i, &value)| v1::MetricPoint {
                value,
                step: Some(i as i64),
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn a_sparkline_runs_from_the_lowest_block_to_the_highest() {
        assert_eq!(
            sparkline(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], 60),
            "▁▂▃▄▅▆▇█"
        );
        assert_eq!(sparkline(&[3.0, 3.0], 60), "▅▅");
        assert_eq!(sparkline(&[1.0, f64::NAN, 2.0], 60), "▁ █");
        assert_eq!(sparkline(&[], 60), "");
        // 1,000 falling values in 10 buckets: 10 characters, falling.
        let falling: Vec<f64> = (0..1000).rev().map(f64::from).collect();
        let line = sparkline(&falling, 10);
        assert_eq!(line.chars().count(), 10);
        assert!(line.starts_with('█') && line.ends_with('▁'), "{line}");
    }

    #[test]
    fn series_stats_name_the_steps_of_the_extremes() {
        let stats = SeriesStats::of(&points(&[2.5, 0.5, 3.0, 0.5, 1.0])).unwrap();
        assert_eq!(stats.count, 5);
        assert_eq!(
            (stats.first, stats.last, stats.last_step),
            (2.5, 1.0, Some(4))
        );
        assert_eq!(stats.min, (0.5, Some(1)));
        assert_eq!(stats.max, (3.0, Some(2)));
        assert_eq!(SeriesStats::of(&[]), None);
    }

    #[test]
    fn csv_fields_are_quoted_only_when_they_must_be() {
        assert_eq!(csv_field("loss"), "loss");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
