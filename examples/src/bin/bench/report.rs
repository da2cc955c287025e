//! What every benchmark shares: payloads, repetition, medians, RSS, the output table.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use stream_core::Channel;

/// Messages per publish batch and per raw read.
pub const BATCH: usize = 500;

/// Sizes and counts for one run. Counts differ per binder and per side so that every timed
/// run lasts a few hundred milliseconds in full mode: a run of a few milliseconds measures
/// the scheduler, not the binder.
pub struct Settings {
    pub quick: bool,
    /// What to measure: `publish`, `consume`, `latency`, `rss`; None for everything.
    pub metrics: Option<Vec<String>>,
    pub sizes: Vec<usize>,
    pub runs: usize,
    /// Messages per memory end-to-end run.
    pub memory_messages: usize,
    /// Messages per Redis publish and consume run.
    pub redis_messages: usize,
    /// Messages per Kafka publish run.
    pub kafka_publish_messages: usize,
    /// Messages per Kafka publish run with many sends in flight.
    pub kafka_pipelined_messages: usize,
    /// Messages per Kafka consume run (Kafka consumes several times faster than it accepts).
    pub kafka_consume_messages: usize,
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
        let pick = |quick_value, full_value| if quick { quick_value } else { full_value };
        Settings {
            quick,
            metrics: None,
            sizes: vec![16, 64, 256, 1024],
            runs: pick(3, 5),
            memory_messages: pick(200_000, 1_000_000),
            redis_messages: pick(20_000, 100_000),
            kafka_publish_messages: pick(20_000, 100_000),
            kafka_consume_messages: pick(50_000, 300_000),
            kafka_pipelined_messages: pick(200_000, 500_000),
            latency_rate: 1_000,
            latency_messages: pick(500, 3_000),
            backlog: pick(100_000, 1_000_000),
            backlog_consumed: pick(50_000, 300_000),
        }
    }
}

impl Settings {
    /// Whether `metric` is to be measured.
    pub fn wants(&self, metric: &str) -> bool {
        self.metrics
            .as_ref()
            .is_none_or(|m| m.iter().any(|x| x == metric))
    }
}

/// Milliseconds since the epoch as text, for the send-time header of raw sides' records:
/// one for a whole raw run, cheaper than ours, which reads the clock per send.
pub fn sent_at_text() -> String {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string()
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
    /// Sent before timing starts, until one comes through; not a sample.
    #[serde(default)]
    pub warm_up: bool,
    data: String,
}

impl Stamped {
    pub fn now(size: usize) -> Self {
        // `{"sent_micros":1763790000000000,"warm_up":false,"data":""}` is 58 bytes.
        Stamped {
            sent_micros: now_micros(),
            warm_up: false,
            data: "x".repeat(size.saturating_sub(58)),
        }
    }

    fn warm_up(size: usize) -> Self {
        Stamped {
            warm_up: true,
            ..Stamped::now(size)
        }
    }
}

/// The receiving side of a latency run: one sample per stamped message.
pub struct Samples {
    expected: usize,
    micros: Mutex<Vec<f64>>,
    /// A warm-up message came through: the path is set up end to end.
    ready: tokio::sync::Notify,
    done: tokio::sync::Notify,
}

impl Samples {
    pub fn new(expected: usize) -> Arc<Samples> {
        Arc::new(Samples {
            expected,
            micros: Mutex::new(Vec::with_capacity(expected)),
            ready: tokio::sync::Notify::new(),
            done: tokio::sync::Notify::new(),
        })
    }

    pub fn record(&self, message: &Stamped) {
        if message.warm_up {
            self.ready.notify_one();
            return;
        }
        let mut micros = self.micros.lock().unwrap();
        micros.push(now_micros().saturating_sub(message.sent_micros) as f64);
        if micros.len() == self.expected {
            self.done.notify_one();
        }
    }

    /// p50 and p99 once every expected sample is in.
    pub async fn percentiles(&self) -> (f64, f64) {
        self.done.notified().await;
        percentiles(self.micros.lock().unwrap().clone())
    }
}

/// Sends through `send` what a latency run measures: warm-up messages until one came through
/// (a new Kafka topic's first send waits for a metadata refresh, a new member for its group
/// join: up to a second each, which is set-up, not latency), then the settings' count of
/// stamped messages at their fixed rate. A send is not awaited before the next tick: waiting
/// for each confirmation (5 ms of Kafka linger) would lower the rate below the one reported.
pub async fn paced<F, Fut>(settings: &Settings, size: usize, samples: &Samples, mut send: F)
where
    F: FnMut(Stamped) -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        send(Stamped::warm_up(size)).await;
        let ready = tokio::time::timeout(Duration::from_millis(10), samples.ready.notified());
        if ready.await.is_ok() {
            break;
        }
    }
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / settings.latency_rate));
    for _ in 0..settings.latency_messages {
        loop {
            tokio::select! {
                biased;
                _ = tick.tick() => break,
                Some(()) = futures::StreamExt::next(&mut in_flight), if !in_flight.is_empty() => {}
            }
        }
        in_flight.push(send(Stamped::now(size)));
    }
    while futures::StreamExt::next(&mut in_flight).await.is_some() {}
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

/// Set by `--prefetch N`: the consume rows' prefetch instead of the binding default.
pub static PREFETCH: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// The binding a consume row subscribes with: defaults, unless `--prefetch` says otherwise.
pub fn consume_binding(destination: &str, group: &str) -> stream_core::BindingConfig {
    let binding = stream_core::BindingConfig::new(destination).group(group);
    match PREFETCH.get() {
        Some(&prefetch) => binding.prefetch(prefetch),
        None => binding,
    }
}

/// Set by `--side ours|raw`: only that side of the throughput rows runs (for a profiler).
pub static ONLY_SIDE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Runs `ours` and `raw` alternately, `runs` times each; every run reports how many messages
/// it moved and how long the timed part took. Alternating puts drift in the machine (a
/// background AOF rewrite, page cache, frequency scaling) on both sides alike.
pub async fn compare_timed<A, FA, B, FB>(runs: usize, mut ours: A, mut raw: B) -> (Sample, Sample)
where
    A: FnMut() -> FA,
    FA: Future<Output = (usize, Duration)>,
    B: FnMut() -> FB,
    FB: Future<Output = (usize, Duration)>,
{
    let show_cpu = std::env::var_os("BENCH_CPU").is_some();
    let rate = |side: &str, cpu_before: f64, (moved, elapsed): (usize, Duration)| {
        if show_cpu {
            let cpu = cpu_seconds() - cpu_before;
            eprintln!(
                "    {side}: {moved} in {elapsed:.2?}, process CPU {cpu:.2} s ({:.0}% of one core)",
                100.0 * cpu / elapsed.as_secs_f64()
            );
        }
        moved as f64 / elapsed.as_secs_f64()
    };
    let (mut o, mut r) = (Vec::new(), Vec::new());
    let side = ONLY_SIDE.get().map(String::as_str);
    for _ in 0..runs {
        if side != Some("raw") {
            let cpu = cpu_seconds();
            o.push(rate("ours", cpu, ours().await));
        }
        if side != Some("ours") {
            let cpu = cpu_seconds();
            r.push(rate("raw", cpu, raw().await));
        }
    }
    (Sample { values: o }, Sample { values: r })
}

/// Like [`compare_timed`], timing the whole of each run.
pub async fn compare<A, FA, B, FB>(runs: usize, mut ours: A, mut raw: B) -> (Sample, Sample)
where
    A: FnMut() -> FA,
    FA: Future<Output = usize>,
    B: FnMut() -> FB,
    FB: Future<Output = usize>,
{
    async fn timed(fut: impl Future<Output = usize>) -> (usize, Duration) {
        let start = Instant::now();
        let moved = fut.await;
        (moved, start.elapsed())
    }
    compare_timed(runs, || timed(ours()), || timed(raw())).await
}

/// Latency p50 and p99 rows from `runs` alternating runs of each side.
pub async fn compare_latency<A, FA, B, FB>(
    report: &mut Report,
    binder: &'static str,
    size: usize,
    runs: usize,
    mut ours: A,
    mut raw: B,
) where
    A: FnMut() -> FA,
    FA: Future<Output = (f64, f64)>,
    B: FnMut() -> FB,
    FB: Future<Output = (f64, f64)>,
{
    let (mut o, mut r) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
    for _ in 0..runs {
        let (p50, p99) = ours().await;
        o.0.push(p50);
        o.1.push(p99);
        let (p50, p99) = raw().await;
        r.0.push(p50);
        r.1.push(p99);
    }
    for (metric, o, r) in [("latency p50", o.0, r.0), ("latency p99", o.1, r.1)] {
        report.add(Row::latency(
            binder,
            metric,
            size,
            Sample { values: o },
            Sample { values: r },
        ));
    }
}

/// p50/p99 latency through `channel`'s Source and Sink at the settings' fixed rate.
pub async fn latency_through(channel: &Channel, settings: &Settings, size: usize) -> (f64, f64) {
    let samples = Samples::new(settings.latency_messages);
    let s = samples.clone();
    let sub = channel
        .sink::<Stamped>()
        .subscribe(move |m: Stamped| {
            s.record(&m);
            async { Ok::<(), String>(()) }
        })
        .await
        .unwrap();
    let source = channel.source::<Stamped>().await.unwrap();
    let source = &source;
    paced(settings, size, &samples, |m| async move {
        source.send(&m).await.unwrap();
    })
    .await;
    let result = samples.percentiles().await;
    sub.shutdown().await.unwrap();
    result
}

/// Subscribes a no-op handler of [`Payload`]s to `channel`. `each` gets the running count of
/// handled messages; the returned `Notify` fires at the `n`th.
pub async fn subscribe_counting(
    channel: &Channel,
    n: usize,
    each: impl Fn(usize) + Send + Sync + 'static,
) -> (stream_core::Subscription, Arc<tokio::sync::Notify>) {
    let handled = std::sync::atomic::AtomicUsize::new(0);
    let done = Arc::new(tokio::sync::Notify::new());
    let d = done.clone();
    let sub = channel
        .sink::<Payload>()
        .subscribe(move |_p: Payload| {
            let count = handled.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            each(count);
            if count == n {
                d.notify_one();
            }
            async { Ok::<(), String>(()) }
        })
        .await
        .unwrap();
    (sub, done)
}

/// Latencies in microseconds, as p50 and p99.
pub fn percentiles(mut micros: Vec<f64>) -> (f64, f64) {
    micros.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |q: f64| micros[((micros.len() as f64 - 1.0) * q).round() as usize];
    (at(0.50), at(0.99))
}

/// User and system CPU time of this process so far, in seconds (`BENCH_CPU=1` prints it per
/// run; it includes set-up that the timed part leaves out).
pub fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    ticks / 100.0
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

/// The flag that turns this program into the lagging consumer of [`lagging_consumer_rss`].
pub const LAGGING_CONSUMER: &str = "--lagging-consumer";

/// RSS of the lagging consumer's process, in KiB.
#[derive(Clone, Copy)]
pub struct Rss {
    /// Before it subscribed.
    pub before: u64,
    /// Once it had handled a tenth of its messages: connections, buffers and the prefetch
    /// window are all in use by then.
    pub settled: u64,
    /// The highest seen, sampled every 20 ms.
    pub peak: u64,
}

/// RSS of a consumer working through `count` messages of the backlog in `destination`. It
/// runs in a process of its own, started from this program: in this one, memory the
/// allocator kept from earlier rows would absorb a consumer that buffered far ahead without
/// RSS moving.
pub async fn lagging_consumer_rss(binder: &str, destination: &str, count: usize) -> Rss {
    let args = [
        LAGGING_CONSUMER.to_owned(),
        binder.to_owned(),
        destination.to_owned(),
        count.to_string(),
    ];
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(std::env::current_exe().expect("own path"))
            .args(args)
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("lagging consumer starts")
    })
    .await
    .unwrap();
    assert!(output.status.success(), "lagging consumer failed");
    let text = String::from_utf8_lossy(&output.stdout);
    let mut numbers = text
        .split_whitespace()
        .map(|n| n.parse().expect("RSS in KiB"));
    let mut next = || numbers.next().expect("three RSS figures");
    Rss {
        before: next(),
        settled: next(),
        peak: next(),
    }
}

/// The lagging consumer's side: a durable group with a no-op handler that handles `count`
/// messages of `destination`, its RSS sampled all along; prints "before settled peak" in KiB.
pub async fn run_lagging_consumer(
    binder: Arc<dyn stream_core::Binder>,
    destination: &str,
    count: usize,
) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let settled = Arc::new(AtomicU64::new(0));
    let settled_at = settled.clone();
    let (before, peak) = rss_while(async {
        let channel = Channel::new(
            "bench",
            binder,
            stream_core::BindingConfig::new(destination).group("lagging"),
        );
        let (sub, done) = subscribe_counting(&channel, count, move |handled| {
            if handled == count.div_ceil(10) {
                settled_at.store(rss_kib(), Ordering::Relaxed);
            }
        })
        .await;
        done.notified().await;
        sub.shutdown().await.unwrap();
    })
    .await;
    println!("{before} {} {peak}", settled.load(Ordering::Relaxed));
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
    rss: Vec<(String, usize, usize, Rss)>,
    header: String,
}

impl Report {
    pub fn new(settings: &Settings) -> Self {
        Report {
            rows: Vec::new(),
            rss: Vec::new(),
            header: format!(
                "{} mode; messages per run: memory {}, redis {}, kafka publish {}, kafka consume {}; \
                 {} alternating runs of each side; latency at {} msgs/s over {} messages; \
                 values are medians, spread = (max-min)/median",
                if settings.quick { "quick" } else { "full" },
                settings.memory_messages,
                settings.redis_messages,
                settings.kafka_publish_messages,
                settings.kafka_consume_messages,
                settings.runs,
                settings.latency_rate,
                settings.latency_messages
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

    pub fn rss(&mut self, binder: &str, backlog: usize, consumed: usize, rss: Rss) {
        eprintln!(
            "  {binder} backlog {backlog}: RSS {} KiB before, {} KiB after a tenth, {} KiB peak while consuming {consumed}",
            rss.before, rss.settled, rss.peak
        );
        self.rss.push((binder.to_owned(), backlog, consumed, rss));
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
            println!(
                "\n| binder | backlog | consumed | RSS before subscribing (MiB) | after a tenth (MiB) | peak (MiB) | growth after a tenth (MiB) |"
            );
            println!("|---|---|---|---|---|---|---|");
            let mib = |kib: u64| kib as f64 / 1024.0;
            for (binder, backlog, consumed, rss) in &self.rss {
                println!(
                    "| {binder} | {backlog} | {consumed} | {:.1} | {:.1} | {:.1} | {:.1} |",
                    mib(rss.before),
                    mib(rss.settled),
                    mib(rss.peak),
                    mib(rss.peak) - mib(rss.settled)
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
            .map(|(binder, backlog, consumed, rss)| {
                serde_json::json!({ "binder": binder, "backlog": backlog, "consumed": consumed, "rss_before_kib": rss.before, "rss_after_a_tenth_kib": rss.settled, "rss_peak_kib": rss.peak })
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
