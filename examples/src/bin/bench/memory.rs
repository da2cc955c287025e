//! The memory binder against the same encode + tokio channel + decode.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use binder_memory::MemoryBinder;
use serde::{Deserialize, Serialize};
use stream_core::{Binder, BindingConfig, Channel, Codec, Json};

use crate::report::{now_micros, percentiles, throughput, Report, Row, Settings};

#[derive(Clone, Serialize, Deserialize)]
struct Payload {
    data: String,
}

fn payload(size: usize) -> Payload {
    // JSON overhead ({"data":""}) is 11 bytes; the rest is the string.
    Payload {
        data: "x".repeat(size.saturating_sub(11)),
    }
}

pub async fn run(settings: &Settings, report: &mut Report) {
    for &size in &settings.sizes {
        let n = settings.messages;
        let value = payload(size);
        let ours = throughput(settings.runs, || end_to_end(n, value.clone())).await;
        let raw = throughput(settings.runs, || raw_end_to_end(n, value.clone())).await;
        report.add(Row {
            binder: "memory",
            metric: "end-to-end",
            size,
            ours,
            raw: Some(raw),
            unit: "msgs/s",
        });
    }
}

/// Publishes `n` through a Source while a Sink handler consumes them.
async fn end_to_end(n: usize, value: Payload) -> usize {
    let binder: Arc<dyn Binder> = Arc::new(MemoryBinder::new());
    let config = BindingConfig::new("bench").group("g");
    let channel = Channel::new("bench", binder, config);
    let done = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(tokio::sync::Notify::new());
    let (d, f) = (done.clone(), finished.clone());
    let sub = channel
        .sink::<Payload>()
        .subscribe(move |_p: Payload| {
            if d.fetch_add(1, Ordering::Relaxed) + 1 == n {
                f.notify_one();
            }
            async { Ok::<(), String>(()) }
        })
        .await
        .unwrap();
    let source = channel.source::<Payload>().await.unwrap();
    let batch: Vec<Payload> = (0..500).map(|_| value.clone()).collect();
    let mut sent = 0;
    while sent < n {
        let k = (n - sent).min(batch.len());
        source.send_batch(&batch[..k]).await.unwrap();
        sent += k;
    }
    finished.notified().await;
    sub.shutdown().await.unwrap();
    n
}

/// The same work by hand: encode, a tokio channel, decode.
async fn raw_end_to_end(n: usize, value: Payload) -> usize {
    let codec = Json::<Payload>::new();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(256);
    let consumer = tokio::spawn(async move {
        let codec = Json::<Payload>::new();
        let mut got = 0;
        while let Some(b) = rx.recv().await {
            let _p: Payload = codec.decode(&b).unwrap();
            got += 1;
        }
        got
    });
    for _ in 0..n {
        tx.send(codec.encode(&value).unwrap()).await.unwrap();
    }
    drop(tx);
    consumer.await.unwrap()
}

#[derive(Clone, Serialize, Deserialize)]
struct Stamped {
    sent_micros: u64,
    data: String,
}

/// p50/p99 end-to-end latency at a fixed rate, for ours and raw; one sample per run.
pub async fn latency(settings: &Settings, report: &mut Report) {
    let size = 64;
    let mut ours = (Vec::new(), Vec::new());
    let mut raw = (Vec::new(), Vec::new());
    for _ in 0..settings.runs {
        let (p50, p99) = latency_ours(settings, size).await;
        ours.0.push(p50);
        ours.1.push(p99);
        let (p50, p99) = latency_raw(settings, size).await;
        raw.0.push(p50);
        raw.1.push(p99);
    }
    for (metric, o, r) in [
        ("latency p50", ours.0, raw.0),
        ("latency p99", ours.1, raw.1),
    ] {
        report.add(Row {
            binder: "memory",
            metric,
            size,
            ours: crate::report::Sample { values: o },
            raw: Some(crate::report::Sample { values: r }),
            unit: "µs",
        });
    }
}

async fn latency_ours(settings: &Settings, size: usize) -> (f64, f64) {
    let binder: Arc<dyn Binder> = Arc::new(MemoryBinder::new());
    let channel = Channel::new("bench", binder, BindingConfig::new("latency").group("g"));
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let n = settings.latency_messages;
    let finished = Arc::new(tokio::sync::Notify::new());
    let (s, f) = (samples.clone(), finished.clone());
    let sub = channel
        .sink::<Stamped>()
        .subscribe(move |m: Stamped| {
            let mut s = s.lock().unwrap();
            s.push(now_micros().saturating_sub(m.sent_micros) as f64);
            if s.len() == n {
                f.notify_one();
            }
            async { Ok::<(), String>(()) }
        })
        .await
        .unwrap();
    let source = channel.source::<Stamped>().await.unwrap();
    let data = "x".repeat(size.saturating_sub(30));
    let mut tick = tokio::time::interval(std::time::Duration::from_micros(
        1_000_000 / settings.latency_rate,
    ));
    for _ in 0..n {
        tick.tick().await;
        source
            .send(&Stamped {
                sent_micros: now_micros(),
                data: data.clone(),
            })
            .await
            .unwrap();
    }
    finished.notified().await;
    sub.shutdown().await.unwrap();
    let samples = samples.lock().unwrap().clone();
    percentiles(samples)
}

async fn latency_raw(settings: &Settings, size: usize) -> (f64, f64) {
    let n = settings.latency_messages;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(256);
    let consumer = tokio::spawn(async move {
        let codec = Json::<Stamped>::new();
        let mut samples = Vec::with_capacity(n);
        while let Some(b) = rx.recv().await {
            let m: Stamped = codec.decode(&b).unwrap();
            samples.push(now_micros().saturating_sub(m.sent_micros) as f64);
        }
        samples
    });
    let codec = Json::<Stamped>::new();
    let data = "x".repeat(size.saturating_sub(30));
    let mut tick = tokio::time::interval(std::time::Duration::from_micros(
        1_000_000 / settings.latency_rate,
    ));
    for _ in 0..n {
        tick.tick().await;
        let m = Stamped {
            sent_micros: now_micros(),
            data: data.clone(),
        };
        tx.send(codec.encode(&m).unwrap()).await.unwrap();
    }
    drop(tx);
    percentiles(consumer.await.unwrap())
}
