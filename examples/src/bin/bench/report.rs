//! Repetition, medians and the output table.

use std::future::Future;
use std::time::Instant;

/// Sizes and counts for one run.
pub struct Settings {
    pub sizes: Vec<usize>,
    pub messages: usize,
    pub runs: usize,
    /// Messages per second while measuring latency.
    pub latency_rate: u64,
    pub latency_messages: usize,
}

impl Settings {
    pub fn new(quick: bool) -> Self {
        Settings {
            sizes: vec![16, 64, 256, 1024],
            messages: if quick { 20_000 } else { 100_000 },
            runs: if quick { 3 } else { 5 },
            latency_rate: 2_000,
            latency_messages: if quick { 2_000 } else { 6_000 },
        }
    }
}

/// One measured quantity: its runs, median and spread.
#[derive(Clone)]
pub struct Sample {
    pub values: Vec<f64>,
}

impl Sample {
    pub fn median(&self) -> f64 {
        let mut v = self.values.clone();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let n = v.len();
        if n == 0 {
            return f64::NAN;
        }
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }

    /// (max - min) / median, as a percentage.
    pub fn spread_pct(&self) -> f64 {
        let min = self.values.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = self
            .values
            .iter()
            .cloned()
            .fold(f64::NEG_INFINITY, f64::max);
        100.0 * (max - min) / self.median()
    }
}

/// Runs `op` (which returns how many messages it moved) `runs` times; msgs/s per run.
pub async fn throughput<F, Fut>(runs: usize, mut op: F) -> Sample
where
    F: FnMut() -> Fut,
    Fut: Future<Output = usize>,
{
    let mut values = Vec::new();
    for _ in 0..runs {
        let start = Instant::now();
        let moved = op().await;
        values.push(moved as f64 / start.elapsed().as_secs_f64());
    }
    Sample { values }
}

/// Latencies in microseconds, reported as p50 and p99.
pub fn percentiles(mut micros: Vec<f64>) -> (f64, f64) {
    micros.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |q: f64| micros[((micros.len() as f64 - 1.0) * q).round() as usize];
    (at(0.50), at(0.99))
}

/// Microseconds since the Unix epoch, carried in payloads to measure latency.
pub fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

pub struct Row {
    pub binder: &'static str,
    pub metric: &'static str,
    pub size: usize,
    pub ours: Sample,
    pub raw: Option<Sample>,
    pub unit: &'static str,
}

pub struct Report {
    rows: Vec<Row>,
    header: String,
}

impl Report {
    pub fn new(settings: &Settings) -> Self {
        Report {
            rows: Vec::new(),
            header: format!(
                "{} messages per run, {} runs, median (spread = (max-min)/median)",
                settings.messages, settings.runs
            ),
        }
    }

    pub fn add(&mut self, row: Row) {
        let ratio = row
            .raw
            .as_ref()
            .map(|raw| format!("{:.2}", row.ours.median() / raw.median()))
            .unwrap_or_else(|| "-".into());
        eprintln!(
            "  {} {} {}B: {:.0} {} (raw {}) ratio {}",
            row.binder,
            row.metric,
            row.size,
            row.ours.median(),
            row.unit,
            row.raw
                .as_ref()
                .map(|r| format!("{:.0}", r.median()))
                .unwrap_or_else(|| "-".into()),
            ratio
        );
        self.rows.push(row);
    }

    pub fn print(&self) {
        println!("{}", self.header);
        println!(
            "| binder | metric | size | ours | spread | raw | spread | ratio ours/raw |\n|---|---|---|---|---|---|---|---|"
        );
        for r in &self.rows {
            let (raw, raw_spread, ratio) = match &r.raw {
                Some(raw) => (
                    format!("{:.0}", raw.median()),
                    format!("{:.0}%", raw.spread_pct()),
                    format!("{:.2}", r.ours.median() / raw.median()),
                ),
                None => ("-".into(), "-".into(), "-".into()),
            };
            println!(
                "| {} | {} ({}) | {} B | {:.0} | {:.0}% | {} | {} | {} |",
                r.binder,
                r.metric,
                r.unit,
                r.size,
                r.ours.median(),
                r.ours.spread_pct(),
                raw,
                raw_spread,
                ratio
            );
        }
    }

    pub fn write_json(&self, path: &str) -> std::io::Result<()> {
        let sample = |s: &Sample| {
            serde_json::json!({
                "runs": s.values,
                "median": s.median(),
                "spread_pct": s.spread_pct(),
            })
        };
        let rows: Vec<serde_json::Value> = self
            .rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "binder": r.binder,
                    "metric": r.metric,
                    "unit": r.unit,
                    "size_bytes": r.size,
                    "ours": sample(&r.ours),
                    "raw": r.raw.as_ref().map(sample),
                    "ratio": r.raw.as_ref().map(|raw| r.ours.median() / raw.median()),
                })
            })
            .collect();
        let text = serde_json::to_string_pretty(&serde_json::json!({
            "settings": self.header,
            "rows": rows,
        }))
        .expect("results serialize");
        std::fs::write(path, text)
    }
}
