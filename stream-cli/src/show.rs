//! How the commands print: aligned tables, messages in three formats, one-line errors.

use std::time::SystemTime;

use clap::ValueEnum;
use serde_json::{json, Value};
use stream_core::admin::{DestinationReport, Stored};
use stream_core::dlq::DeadLetter;

/// How `tail` prints a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// One JSON object per line: position, time, id, key, headers, payload.
    Json,
    /// The payload bytes alone, one message per line.
    Raw,
    /// A header line with position, key and headers, then the payload (JSON indented).
    Pretty,
}

/// A table printed with aligned columns.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new<const N: usize>(header: [&str; N]) -> Self {
        Table {
            rows: vec![header.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    pub fn row<const N: usize>(&mut self, cells: [String; N]) {
        self.rows.push(cells.into());
    }

    pub fn print(&self) {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .map(|r| r.get(c).map_or(0, |cell| cell.chars().count()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for row in &self.rows {
            let line: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect();
            println!("{}", line.join("  ").trim_end());
        }
    }
}

/// An error and its sources on one line, without repeating what a message already says.
pub fn one_line(error: &stream_core::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text.replace('\n', " ")
}

fn time(at: Option<SystemTime>) -> String {
    at.map_or_else(
        || "-".to_owned(),
        |t| humantime::format_rfc3339_millis(t).to_string(),
    )
}

/// What `inspect` prints.
pub fn report(
    binding: &str,
    destination: &str,
    report: &DestinationReport,
    dlq: &str,
    dead: &DestinationReport,
) {
    println!("binding      {binding}");
    println!("destination  {destination}");
    if !report.exists {
        println!("             (does not exist yet: nothing was published to it)");
    } else {
        println!("length       {}", report.length);
        if let Some((first, last)) = &report.range {
            println!("range        {first} .. {last}");
        }
        if !report.partitions.is_empty() {
            let mut table = Table::new(["PARTITION", "LOW", "HIGH"]);
            for (partition, low, high) in &report.partitions {
                table.row([partition.to_string(), low.to_string(), high.to_string()]);
            }
            table.print();
        }
    }
    println!(
        "dead letters {} in `{dlq}`",
        if dead.exists { dead.length } else { 0 }
    );
    if report.groups.is_empty() {
        println!("groups       none");
        return;
    }
    let mut table = Table::new(["GROUP", "LAG", "PENDING", "CONSUMER", "HELD", "IDLE"]);
    let or_dash = |n: Option<u64>| n.map_or_else(|| "-".to_owned(), |n| n.to_string());
    for group in &report.groups {
        let first = group.consumers.first();
        let consumer = |c: Option<&stream_core::admin::ConsumerReport>| {
            c.map_or(["-".to_owned(), "-".to_owned(), "-".to_owned()], |c| {
                [
                    c.name.clone(),
                    or_dash(c.held),
                    c.idle.map_or_else(
                        || "-".to_owned(),
                        |d| humantime::format_duration(round(d)).to_string(),
                    ),
                ]
            })
        };
        let [name, held, idle] = consumer(first);
        table.row([
            group.name.clone(),
            or_dash(group.lag),
            or_dash(group.pending),
            name,
            held,
            idle,
        ]);
        for other in group.consumers.iter().skip(1) {
            let [name, held, idle] = consumer(Some(other));
            table.row([
                String::new(),
                String::new(),
                String::new(),
                name,
                held,
                idle,
            ]);
        }
    }
    table.print();
}

fn round(duration: std::time::Duration) -> std::time::Duration {
    std::time::Duration::from_millis(duration.as_millis() as u64 / 100 * 100)
}

/// One message as `tail` prints it.
pub fn message(stored: &Stored, format: Format) {
    let message = &stored.message;
    let payload = String::from_utf8_lossy(message.payload());
    match format {
        Format::Raw => println!("{payload}"),
        Format::Json => {
            let headers: serde_json::Map<String, Value> = message
                .headers()
                .iter()
                .map(|(n, v)| (n.to_owned(), Value::String(v.to_owned())))
                .collect();
            let payload = serde_json::from_slice::<Value>(message.payload())
                .unwrap_or_else(|_| Value::String(payload.into_owned()));
            println!(
                "{}",
                json!({
                    "position": stored.position.to_string(),
                    "time": time(stored.stored_at),
                    "id": message.id(),
                    "key": message.key(),
                    "headers": headers,
                    "payload": payload,
                })
            );
        }
        Format::Pretty => {
            println!(
                "--- {} at {}  key={}",
                stored.position,
                time(stored.stored_at),
                message.key().unwrap_or("-")
            );
            for (name, value) in message.headers().iter() {
                println!("    {name}: {value}");
            }
            match serde_json::from_slice::<Value>(message.payload()) {
                Ok(value) => println!(
                    "{}",
                    serde_json::to_string_pretty(&value).unwrap_or_else(|_| payload.into_owned())
                ),
                Err(_) => println!("{payload}"),
            }
        }
    }
}

/// What `dlq list` prints.
pub fn dead_letters(destination: &str, letters: &[DeadLetter]) {
    if letters.is_empty() {
        println!("no dead letters in `{destination}`");
        return;
    }
    let mut table = Table::new([
        "POSITION", "TIME", "REASON", "ATTEMPTS", "FROM", "KEY", "ERROR",
    ]);
    for letter in letters {
        let error = letter.error.clone().unwrap_or_default();
        let error: String = error.chars().take(80).collect();
        table.row([
            letter.stored.position.to_string(),
            time(letter.stored.stored_at),
            letter.reason.clone().unwrap_or_else(|| "-".into()),
            letter
                .attempts
                .map_or_else(|| "-".to_owned(), |a| a.to_string()),
            format!(
                "{} ({})",
                letter.original_destination.as_deref().unwrap_or("-"),
                letter.original_group.as_deref().unwrap_or("-")
            ),
            letter.stored.message.key().unwrap_or("-").to_owned(),
            error.replace('\n', " "),
        ]);
    }
    table.print();
}
