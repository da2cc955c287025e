//! What every benchmark shares: payloads, repetition, medians, RSS, the output table.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use stream_core::Channel;

/// Messages per publish batch and per raw read.
pub const BATCH: usize = 500;

/// Sizes and counts for one run.
pub struct Settings {
    pub sizes: Vec<usize>,
    pub messages: usize,
    pub runs: usize,
    /// Messages per second while measuring latency.
    pub latency_rate: u64,
    pub latency_messages: usize,
    /// Messages waiting when the lagging consumer starts.
    pub backlog: usize,
    /// How many of them it works through while RSS is sampled.
    pub backlog_consumed: usize,
}

impl Settings {
    pub fn new(quick: bool) -> Self {
        Settings {
            sizes: vec![16, 64, 256, 1024],
            messages: if quick { 10_000 } else { 50_000 },
            runs: if quick { 3 } else { 5 },
            latency_rate: 1_000,
            latency_messages: if quick { 1_000 } else { 3_000 },
            backlog: if quick { 100_000 } else { 1_000_000 },
            backlog_consumed: if quick { 50_000 } else { 200_000 },
        }
    }
}

/// A JSON payload of about `size` bytes.
#[derive(Clone, Serialize, Deserialize)]
pub struct Payload {
    data: String,
}

impl Payload {
    pub fn of_size(size: usize) -> Self {
        // `{"data":""}` is 11 bytes.
        Payload {
            data: "x".repeat(size.saturating_sub(11)),
        }
    }
}

/// A payload that carries its send time, for latency.
#[derive(Clone, Serialize, Deserialize)]
pub struct Stamped {
    pub sent_micros: u64,
    data: String,
}

impl Stamped {
    pub fn now(size: usize) -> Self {
        Stamped {
            sent_micros: now_micros(),
            data: "x".repeat(size.saturating_sub(40)),
        }
    }
}

/// Microseconds since the Unix epoch.
pub fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
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

/// Runs `op` `runs` times; each run reports how many messages it moved and how long the
/// timed part took. Returns msgs/s per run.
pub async fn throughput_timed<F, Fut>(runs: usize, mut op: F) -> Sample
where
    F: FnMut() -> Fut,
    Fut: Future<Output = (usize, Duration)>,
{
    let mut values = Vec::new();
    for _ in 0..runs {
        let (moved, elapsed) = op().await;
        values.push(moved as f64 / elapsed.as_secs_f64());
    }
    Sample { values }
}

/// Like [`throughput_timed`], timing the whole of `op`.
pub async fn throughput<F, Fut>(runs: usize, mut op: F) -> Sample
where
    F: FnMut() -> Fut,
    Fut: Future<Output = usize>,
{
    throughput_timed(runs, || {
        let fut = op();
        async move {
            let start = Instant::now();
            let moved = fut.await;
            (moved, start.elapsed())
        }
    })
    .await
}

/// p50/p99 latency through `channel`'s Source and Sink at the settings' fixed rate.
pub async fn latency_through(channel: &Channel, settings: &Settings, size: usize) -> (f64, f64) {
    let n = settings.latency_messages;
    let samples = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let done = Arc::new(tokio::sync::Notify::new());
    let (s, d) = (samples.clone(), done.clone());
    let sub = channel
        .sink::<Stamped>()
        .subscribe(move |m: Stamped| {
            let mut s = s.lock().unwrap();
            s.push(now_micros().saturating_sub(m.sent_micros) as f64);
            if s.len() == n {
                d.notify_one();
            }
            async { Ok::<(), String>(()) }
        })
        .await
        .unwrap();
    let source = channel.source::<Stamped>().await.unwrap();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / settings.latency_rate));
    for _ in 0..n {
        tick.tick().await;
        source.send(&Stamped::now(size)).await.unwrap();
    }
    done.notified().await;
    sub.shutdown().await.unwrap();
    let samples = samples.lock().unwrap().clone();
    percentiles(samples)
}

/// Latencies in microseconds, as p50 and p99.
pub fn percentiles(mut micros: Vec<f64>) -> (f64, f64) {
    micros.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |q: f64| micros[((micros.len() as f64 - 1.0) * q).round() as usize];
    (at(0.50), at(0.99))
}

/// This process's resident set size in KiB.
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Runs `work`, sampling RSS every 20 ms: (RSS before, highest RSS seen).
pub async fn rss_while(work: impl Future<Output = ()>) -> (u64, u64) {
    let before = rss_kib();
    let mut peak = before;
    tokio::pin!(work);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tokio::select! {
            _ = &mut work => break,
            _ = tick.tick() => peak = peak.max(rss_kib()),
        }
    }
    (before, peak.max(rss_kib()))
}

pub struct Row {
    pub binder: &'static str,
    pub metric: &'static str,
    pub size: usize,
    pub ours: Sample,
    pub raw: Option<Sample>,
    pub unit: &'static str,
}

impl Row {
    pub fn ratio(
        binder: &'static str,
        metric: &'static str,
        size: usize,
        ours: Sample,
        raw: Sample,
    ) -> Row {
        Row {
            binder,
            metric,
            size,
            ours,
            raw: Some(raw),
            unit: "msgs/s",
        }
    }

    pub fn latency(
        binder: &'static str,
        metric: &'static str,
        size: usize,
        ours: Sample,
        raw: Sample,
    ) -> Row {
        Row {
            binder,
            metric,
            size,
            ours,
            raw: Some(raw),
            unit: "µs",
        }
    }
}

pub struct Report {
    rows: Vec<Row>,
    rss: Vec<(String, usize, usize, u64, u64)>,
    header: String,
}

impl Report {
    pub fn new(settings: &Settings) -> Self {
        Report {
            rows: Vec::new(),
            rss: Vec::new(),
            header: format!(
                "{} messages per throughput run, {} runs each; latency at {} msgs/s over {} messages; \
                 values are medians, spread = (max-min)/median",
                settings.messages, settings.runs, settings.latency_rate, settings.latency_messages
            ),
        }
    }

    pub fn add(&mut self, row: Row) {
        eprintln!(
            "  {} {} {} B: ours {:.0} {}, raw {}, ratio {}",
            row.binder,
            row.metric,
            row.size,
            row.ours.median(),
            row.unit,
            row.raw
                .as_ref()
                .map_or("-".into(), |r| format!("{:.0}", r.median())),
            row.raw.as_ref().map_or("-".into(), |r| format!(
                "{:.2}",
                row.ours.median() / r.median()
            )),
        );
        self.rows.push(row);
    }

    pub fn rss(&mut self, binder: &str, backlog: usize, consumed: usize, before: u64, peak: u64) {
        eprintln!("  {binder} backlog {backlog}: RSS {} KiB before, {} KiB peak while consuming {consumed}", before, peak);
        self.rss
            .push((binder.to_owned(), backlog, consumed, before, peak));
    }

    pub fn print(&self) {
        println!("{}\n", self.header);
        println!("| binder | metric | size | ours | spread | raw | spread | ours/raw |");
        println!("|---|---|---|---|---|---|---|---|");
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
        if !self.rss.is_empty() {
            println!("\n| binder | backlog | consumed | RSS before (MiB) | peak RSS (MiB) | growth (MiB) |");
            println!("|---|---|---|---|---|---|");
            for (binder, backlog, consumed, before, peak) in &self.rss {
                println!(
                    "| {binder} | {backlog} | {consumed} | {:.1} | {:.1} | {:.1} |",
                    *before as f64 / 1024.0,
                    *peak as f64 / 1024.0,
                    (*peak as f64 - *before as f64) / 1024.0
                );
            }
        }
    }

    pub fn write_json(&self, path: &str) -> std::io::Result<()> {
        let sample = |s: &Sample| serde_json::json!({ "runs": s.values, "median": s.median(), "spread_pct": s.spread_pct() });
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
        let rss: Vec<serde_json::Value> = self
            .rss
            .iter()
            .map(|(binder, backlog, consumed, before, peak)| {
                serde_json::json!({ "binder": binder, "backlog": backlog, "consumed": consumed, "rss_before_kib": before, "rss_peak_kib": peak })
            })
            .collect();
        let text = serde_json::to_string_pretty(&serde_json::json!({
            "settings": self.header,
            "rows": rows,
            "rss": rss,
        }))
        .expect("results serialize");
        std::fs::write(path, text)
    }
}
