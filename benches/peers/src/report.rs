//! Rows of runs, their medians and spreads, as a markdown table and as JSON.

use crate::common::Timed;

/// One peer's runs of one row.
pub struct Row {
    pub peer: &'static str,
    pub broker: &'static str,
    pub metric: String,
    pub size: usize,
    /// msgs/s of every run that completed.
    pub runs: Vec<f64>,
    /// Why the row stopped, if a run failed.
    pub error: Option<String>,
}

impl Row {
    pub fn median(&self) -> f64 {
        let mut v = self.runs.clone();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let n = v.len();
        if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }

    /// (max - min) / median, as a percentage.
    pub fn spread_pct(&self) -> f64 {
        let min = self.runs.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = self.runs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        100.0 * (max - min) / self.median()
    }
}

/// A row a peer does not offer, and why.
pub struct Skipped {
    pub peer: &'static str,
    pub broker: &'static str,
    pub metric: String,
    pub reason: String,
}

pub struct Report {
    pub header: String,
    pub rows: Vec<Row>,
    pub skipped: Vec<Skipped>,
    /// How each peer is configured where that differs from the project's bench.
    pub notes: Vec<&'static str>,
}

impl Report {
    pub fn new(header: String) -> Report {
        Report {
            header,
            rows: Vec::new(),
            skipped: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// The row of (`peer`, `broker`, `metric`, `size`), created on first use.
    pub fn row(
        &mut self,
        peer: &'static str,
        broker: &'static str,
        metric: &str,
        size: usize,
    ) -> &mut Row {
        let at = self.rows.iter().position(|r| {
            r.peer == peer && r.broker == broker && r.metric == metric && r.size == size
        });
        let at = match at {
            Some(at) => at,
            None => {
                self.rows.push(Row {
                    peer,
                    broker,
                    metric: metric.to_owned(),
                    size,
                    runs: Vec::new(),
                    error: None,
                });
                self.rows.len() - 1
            }
        };
        &mut self.rows[at]
    }

    /// Whether the row has failed already (its later runs are not attempted).
    pub fn failed(
        &mut self,
        peer: &'static str,
        broker: &'static str,
        metric: &str,
        size: usize,
    ) -> bool {
        self.row(peer, broker, metric, size).error.is_some()
    }

    /// Records one run's outcome.
    pub fn record(
        &mut self,
        peer: &'static str,
        broker: &'static str,
        metric: &str,
        size: usize,
        outcome: Timed,
    ) {
        let row = self.row(peer, broker, metric, size);
        match outcome {
            Ok((moved, elapsed)) => {
                let rate = moved as f64 / elapsed.as_secs_f64();
                eprintln!(
                    "    {peer} {broker} {metric} {size} B: {moved} in {elapsed:.2?} = {rate:.0} msgs/s"
                );
                row.runs.push(rate);
            }
            Err(e) => {
                eprintln!("    {peer} {broker} {metric} {size} B: FAILED: {e}");
                row.error = Some(e);
            }
        }
    }

    /// Marks every size of a row as failed with `error` (its set-up failed).
    pub fn fail(
        &mut self,
        peer: &'static str,
        broker: &'static str,
        metric: &str,
        size: usize,
        error: String,
    ) {
        eprintln!("    {peer} {broker} {metric} {size} B: FAILED: {error}");
        let row = self.row(peer, broker, metric, size);
        row.error.get_or_insert(error);
    }

    pub fn skip(&mut self, peer: &'static str, broker: &'static str, metric: &str, reason: &str) {
        if self
            .skipped
            .iter()
            .any(|s| s.peer == peer && s.broker == broker && s.metric == metric)
        {
            return;
        }
        eprintln!("  SKIPPED {peer} {broker} {metric}: {reason}");
        self.skipped.push(Skipped {
            peer,
            broker,
            metric: metric.to_owned(),
            reason: reason.to_owned(),
        });
    }

    pub fn print(&self) {
        println!("{}\n", self.header);
        println!("| peer | broker | metric | size | median (msgs/s) | spread | runs (msgs/s) |");
        println!("|---|---|---|---|---|---|---|");
        for r in &self.rows {
            let runs = r
                .runs
                .iter()
                .map(|v| format!("{v:.0}"))
                .collect::<Vec<_>>()
                .join(", ");
            let (median, spread) = if r.runs.is_empty() {
                ("-".to_owned(), "-".to_owned())
            } else {
                (
                    format!("{:.0}", r.median()),
                    format!("{:.0}%", r.spread_pct()),
                )
            };
            let runs = match &r.error {
                Some(e) => format!(
                    "{runs}{}FAILED: {e}",
                    if runs.is_empty() { "" } else { "; " }
                ),
                None => runs,
            };
            println!(
                "| {} | {} | {} | {} B | {} | {} | {} |",
                r.peer, r.broker, r.metric, r.size, median, spread, runs
            );
        }
        if !self.skipped.is_empty() {
            println!("\nNot measured:\n");
            for s in &self.skipped {
                println!("- {} {} {}: {}", s.peer, s.broker, s.metric, s.reason);
            }
        }
        if !self.notes.is_empty() {
            println!("\nNotes:\n");
            for note in &self.notes {
                println!("- {note}");
            }
        }
    }

    pub fn write_json(&self, path: &str) -> std::io::Result<()> {
        let rows: Vec<serde_json::Value> = self
            .rows
            .iter()
            .map(|r| {
                let finite = |v: f64| if v.is_finite() { Some(v) } else { None };
                serde_json::json!({
                    "peer": r.peer,
                    "broker": r.broker,
                    "metric": r.metric,
                    "unit": "msgs/s",
                    "size_bytes": r.size,
                    "runs": r.runs,
                    "median": finite(r.median()),
                    "spread_pct": finite(r.spread_pct()),
                    "error": r.error,
                })
            })
            .collect();
        let skipped: Vec<serde_json::Value> = self
            .skipped
            .iter()
            .map(|s| {
                serde_json::json!({
                    "peer": s.peer, "broker": s.broker, "metric": s.metric, "reason": s.reason,
                })
            })
            .collect();
        let text = serde_json::to_string_pretty(&serde_json::json!({
            "settings": self.header,
            "rows": rows,
            "skipped": skipped,
            "notes": self.notes,
        }))
        .expect("results serialize");
        std::fs::write(path, text)
    }
}
