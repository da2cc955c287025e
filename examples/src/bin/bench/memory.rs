//! The memory binder against the same encode + tokio channel + decode.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use binder_memory::MemoryBinder;
use stream_core::{Binder, BindingConfig, Channel, Codec, Json};

use crate::report::{
    latency_through, now_micros, percentiles, throughput, Payload, Report, Row, Sample, Settings,
    Stamped, BATCH,
};

pub async fn run(settings: &Settings, report: &mut Report) {
    for &size in &settings.sizes {
        // Memory is fast: more messages per run keep start-up out of the figure.
        let n = settings.messages * 4;
        let value = Payload::of_size(size);
        let ours = throughput(settings.runs, || end_to_end(n, &value)).await;
        let raw = throughput(settings.runs, || raw_end_to_end(n, &value)).await;
        report.add(Row::ratio("memory", "end-to-end", size, ours, raw));
    }
    latency(settings, report).await;
}

fn channel(destination: &str) -> Channel {
    let binder: Arc<dyn Binder> = Arc::new(MemoryBinder::new());
    Channel::new("bench", binder, BindingConfig::new(destination).group("g"))
}

/// Publishes `n` through a Source while a Sink handler consumes them.
async fn end_to_end(n: usize, value: &Payload) -> usize {
    let channel = channel("bench");
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
    let batch: Vec<Payload> = vec![value.clone(); BATCH];
    let mut sent = 0;
    while sent < n {
        let k = (n - sent).min(BATCH);
        source.send_batch(&batch[..k]).await.unwrap();
        sent += k;
    }
    finished.notified().await;
    sub.shutdown().await.unwrap();
    n
}

/// The same work by hand: encode, a bounded tokio channel, decode.
async fn raw_end_to_end(n: usize, value: &Payload) -> usize {
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
        tx.send(codec.encode(value).unwrap()).await.unwrap();
    }
    drop(tx);
    consumer.await.unwrap()
}

/// p50/p99 end-to-end latency at a fixed rate; one sample per run.
async fn latency(settings: &Settings, report: &mut Report) {
    let size = 64;
    let (mut ours, mut raw) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
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
        report.add(Row::latency(
            "memory",
            metric,
            size,
            Sample { values: o },
            Sample { values: r },
        ));
    }
}

async fn latency_ours(settings: &Settings, size: usize) -> (f64, f64) {
    latency_through(&channel("latency"), settings, size).await
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
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / settings.latency_rate));
    for _ in 0..n {
        tick.tick().await;
        tx.send(codec.encode(&Stamped::now(size)).unwrap())
            .await
            .unwrap();
    }
    drop(tx);
    percentiles(consumer.await.unwrap())
}
