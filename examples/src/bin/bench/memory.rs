//! The memory binder against the same encode + tokio channel + decode.

use std::sync::Arc;

use binder_memory::MemoryBinder;
use stream_core::{Binder, BindingConfig, Channel, Codec, Json};

use crate::report::{
    compare, compare_latency, latency_through, paced, subscribe_counting, Payload, Report, Row,
    Samples, Settings, Stamped, BATCH,
};

pub async fn run(settings: &Settings, report: &mut Report) {
    let sizes = if settings.wants("publish") || settings.wants("consume") {
        &settings.sizes[..]
    } else {
        &[]
    };
    for &size in sizes {
        let n = settings.memory_messages;
        let value = Payload::of_size(size);
        let (ours, raw) = compare(
            settings.runs,
            || end_to_end(n, &value),
            || raw_end_to_end(n, &value),
        )
        .await;
        report.add(Row::ratio("memory", "end-to-end", size, ours, raw));
    }
    if !settings.wants("latency") {
        return;
    }
    compare_latency(
        report,
        "memory",
        64,
        settings.runs,
        || latency_through_channel(settings, 64),
        || latency_raw(settings, 64),
    )
    .await;
}

fn channel(destination: &str) -> Channel {
    let binder: Arc<dyn Binder> = Arc::new(MemoryBinder::new());
    Channel::new("bench", binder, BindingConfig::new(destination).group("g"))
}

/// Publishes `n` through a Source while a Sink handler consumes them.
async fn end_to_end(n: usize, value: &Payload) -> usize {
    let channel = channel("bench");
    let (sub, finished) = subscribe_counting(&channel, n, |_| {}).await;
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

async fn latency_through_channel(settings: &Settings, size: usize) -> (f64, f64) {
    latency_through(&channel("latency"), settings, size).await
}

async fn latency_raw(settings: &Settings, size: usize) -> (f64, f64) {
    let samples = Samples::new(settings.latency_messages);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(256);
    let s = samples.clone();
    let consumer = tokio::spawn(async move {
        let codec = Json::<Stamped>::new();
        while let Some(b) = rx.recv().await {
            s.record(&codec.decode(&b).unwrap());
        }
    });
    let codec = Json::<Stamped>::new();
    paced(settings, size, &samples, |m| {
        let (tx, bytes) = (tx.clone(), codec.encode(&m).unwrap());
        async move { tx.send(bytes).await.unwrap() }
    })
    .await;
    let result = samples.percentiles().await;
    drop(tx);
    consumer.await.unwrap();
    result
}
