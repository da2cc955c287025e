//! How subscriptions, streams and `Streams` end: what a service sees at shutdown and when
//! something underneath fails.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use binder_memory::MemoryBinder;
use futures::StreamExt;
use stream_core::testing::CountingBinder;
use stream_core::{
    Binder, BindingConfig, Channel, Consumer, ConsumerOptions, DeliveryTag, Error, ErrorKind,
    Producer, Received, Streams,
};

const PATIENCE: Duration = Duration::from_secs(10);

/// After `Streams::close`, no new source or sink can be made, through `Streams` or through a
/// channel taken before the close; what was made before still works until closed.
#[tokio::test]
async fn streams_close_refuses_new_sources_and_keeps_existing_ones() {
    let streams = Streams::builder()
        .register(binder_memory::register)
        .env(Vec::<(String, String)>::new())
        .load_str(
            "[binders.mem]\ntype = \"memory\"\n[bindings.out]\ndestination = \"d\"\n\
             [bindings.in]\ndestination = \"d\"\ngroup = \"g\"\n",
        )
        .unwrap();
    let earlier = streams.source::<u32>("out").await.unwrap();
    let channel = streams.channel("out").unwrap();
    streams.close().await.unwrap();
    let err = streams.source::<u32>("out").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed, "{err}");
    let err = channel.source::<u32>().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed, "{err}");
    let err = streams.sink::<u32>("in").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed, "{err}");
    earlier
        .send(&7)
        .await
        .expect("a source made before close still sends");
}

/// A binder whose consumers fail every receive for good and fail to close.
struct Broken {
    inner: MemoryBinder,
}

struct BrokenConsumer {
    inner: Box<dyn Consumer>,
}

#[async_trait]
impl Binder for Broken {
    fn kind(&self) -> &'static str {
        "broken"
    }

    async fn producer(&self, destination: &str) -> stream_core::Result<Box<dyn Producer>> {
        self.inner.producer(destination).await
    }

    async fn consumer(
        &self,
        destination: &str,
        options: &ConsumerOptions,
    ) -> stream_core::Result<Box<dyn Consumer>> {
        Ok(Box::new(BrokenConsumer {
            inner: self.inner.consumer(destination, options).await?,
        }))
    }
}

#[async_trait]
impl Consumer for BrokenConsumer {
    async fn receive(&self, _max: usize) -> stream_core::Result<Vec<Received>> {
        Err(Error::new(ErrorKind::Broker, "the group was deleted"))
    }

    async fn ack(&self, tags: &[DeliveryTag]) -> stream_core::Result<()> {
        self.inner.ack(tags).await
    }

    async fn close(&self) -> stream_core::Result<()> {
        self.inner.close().await?;
        Err(Error::new(
            ErrorKind::Connection,
            "leaving the group failed",
        ))
    }
}

/// When the consumer fails for good and closing it fails too, the subscription reports the
/// failure that stopped it, not the one that followed.
#[tokio::test]
async fn a_failed_consumer_reports_why_it_stopped_even_when_closing_fails_too() {
    let binder: Arc<dyn Binder> = Arc::new(Broken {
        inner: MemoryBinder::new(),
    });
    let channel = Channel::new("broken", binder, BindingConfig::new("d").group("g"));
    let mut sub = channel
        .sink::<u32>()
        .subscribe(|_: u32| async { Ok::<(), String>(()) })
        .await
        .unwrap();
    let err = tokio::time::timeout(PATIENCE, sub.wait())
        .await
        .expect("the subscription ends")
        .expect_err("with an error");
    assert_eq!(err.kind(), ErrorKind::Broker, "{err}");
    assert!(err.message().contains("the group was deleted"), "{err}");
}

/// Dropping the future of `Deliveries::close` half-way does not leave the consumer open.
#[tokio::test]
async fn a_dropped_stream_close_still_closes_the_consumer() {
    let counting = CountingBinder::new(Arc::new(MemoryBinder::new()));
    let binder: Arc<dyn Binder> = Arc::new(counting.clone());
    let channel = Channel::new("s", binder, BindingConfig::new("d").group("g"));
    let source = channel.source::<u32>().await.unwrap();
    let mut stream = channel.sink::<u32>().stream().await.unwrap();
    source.send(&1).await.unwrap();
    let delivery = tokio::time::timeout(PATIENCE, stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let close = async move {
        let result = stream.close().await;
        d.store(true, Ordering::SeqCst);
        result
    };
    // The close waits for the delivery still out; the "other branch" wins and drops it.
    tokio::select! {
        _ = close => panic!("close returned while a delivery was still out"),
        _ = tokio::task::yield_now() => {}
    }
    assert!(!done.load(Ordering::SeqCst));
    delivery.ack();
    tokio::time::timeout(PATIENCE, async {
        while counting.closed() < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the consumer was closed although the close future was dropped");
    assert_eq!(counting.acked(), 1);
}
