//! The memory binder against the same encode + tokio channel + decode.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use binder_memory::MemoryBinder;
use serde::{Deserialize, Serialize};
use stream_core::{Binder, BindingConfig, Channel, Codec, Json};

use crate::report::{throughput, Report, Row, Settings};

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
