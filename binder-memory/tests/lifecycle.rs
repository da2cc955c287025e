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
    Producer, Received, Streams, SubscriptionState,
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

/// A consumer whose receives fail with a temporary error while `failing` is set.
struct Flaky {
    inner: MemoryBinder,
    failing: Arc<AtomicBool>,
}

struct FlakyConsumer {
    inner: Box<dyn Consumer>,
    failing: Arc<AtomicBool>,
}

#[async_trait]
impl Binder for Flaky {
    fn kind(&self) -> &'static str {
        "flaky"
    }

    async fn producer(&self, destination: &str) -> stream_core::Result<Box<dyn Producer>> {
        self.inner.producer(destination).await
    }

    async fn consumer(
        &self,
        destination: &str,
        options: &ConsumerOptions,
    ) -> stream_core::Result<Box<dyn Consumer>> {
        Ok(Box::new(FlakyConsumer {
            inner: self.inner.consumer(destination, options).await?,
            failing: self.failing.clone(),
        }))
    }
}

#[async_trait]
impl Consumer for FlakyConsumer {
    async fn receive(&self, max: usize) -> stream_core::Result<Vec<Received>> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(Error::new(ErrorKind::Connection, "the broker went away"));
        }
        self.inner.receive(max).await
    }

    async fn ack(&self, tags: &[DeliveryTag]) -> stream_core::Result<()> {
        self.inner.ack(tags).await
    }

    async fn close(&self) -> stream_core::Result<()> {
        self.inner.close().await
    }
}

async fn state_becomes(
    sub: &stream_core::Subscription,
    what: &str,
    wanted: impl Fn(&SubscriptionState) -> bool,
) -> SubscriptionState {
    tokio::time::timeout(PATIENCE, async {
        loop {
            let state = sub.state();
            if wanted(&state) {
                return state;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the subscription never became {what}: {:?}", sub.state()))
}

/// A subscription whose broker fails temporarily says it is reconnecting, since when and
/// why, and goes back to running when the broker answers again; one whose consumer fails for
/// good says it failed, with the error.
#[tokio::test]
async fn subscription_state_follows_the_broker() {
    let failing = Arc::new(AtomicBool::new(false));
    let binder: Arc<dyn Binder> = Arc::new(Flaky {
        inner: MemoryBinder::new(),
        failing: failing.clone(),
    });
    let channel = Channel::new("flaky", binder, BindingConfig::new("d").group("g"));
    let sub = channel
        .sink::<u32>()
        .subscribe(|_: u32| async { Ok::<(), String>(()) })
        .await
        .unwrap();
    assert_eq!(sub.state(), SubscriptionState::Running);
    failing.store(true, Ordering::SeqCst);
    // A receive already waiting is not interrupted: a message ends it, the next one fails.
    channel
        .source::<u32>()
        .await
        .unwrap()
        .send(&1)
        .await
        .unwrap();
    let state = state_becomes(&sub, "reconnecting", |s| {
        matches!(s, SubscriptionState::Reconnecting { .. })
    })
    .await;
    let SubscriptionState::Reconnecting { reason, .. } = state else {
        unreachable!()
    };
    assert!(reason.contains("the broker went away"), "{reason}");
    failing.store(false, Ordering::SeqCst);
    state_becomes(&sub, "running again", |s| *s == SubscriptionState::Running).await;
    sub.shutdown().await.unwrap();

    let broken: Arc<dyn Binder> = Arc::new(Broken {
        inner: MemoryBinder::new(),
    });
    let mut sub = Channel::new("broken", broken, BindingConfig::new("d").group("g"))
        .sink::<u32>()
        .subscribe(|_: u32| async { Ok::<(), String>(()) })
        .await
        .unwrap();
    let _ = tokio::time::timeout(PATIENCE, sub.wait()).await.unwrap();
    match sub.state() {
        SubscriptionState::Failed { kind, error } => {
            assert_eq!(kind, ErrorKind::Broker);
            assert!(error.contains("the group was deleted"), "{error}");
        }
        other => panic!("a failed subscription says so: {other:?}"),
    }
}
