//! When core acknowledges: handled messages must not wait for a later, slower handler.

use std::sync::Arc;
use std::time::Duration;

use binder_memory::MemoryBinder;
use stream_core::{Binder, BindingConfig, Channel};
use tokio::sync::Notify;

/// Core gathers acknowledgements into bursts while handlers finish at once; a handler that
/// waits must not hold the acknowledgements of the messages handled before it (on Redis,
/// entries left pending past `claim-idle` are taken over by another member).
#[tokio::test]
async fn a_waiting_handler_does_not_hold_back_earlier_acknowledgements() {
    let broker = MemoryBinder::new();
    let binder: Arc<dyn Binder> = Arc::new(broker.clone());
    let channel = Channel::new("acks", binder, BindingConfig::new("work").group("g"));
    for n in 1..=3u32 {
        broker.send_json("work", &n);
    }
    let (started, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let (s, r) = (started.clone(), release.clone());
    let subscription = channel
        .sink::<u32>()
        .subscribe(move |n: u32| {
            let (s, r) = (s.clone(), r.clone());
            async move {
                if n == 3 {
                    s.notify_one();
                    r.notified().await;
                }
                Ok::<(), String>(())
            }
        })
        .await
        .unwrap();
    started.notified().await;
    // Messages 1 and 2 are handled; 3 is in its handler. Only 3 may stay un-acknowledged.
    let acknowledged = tokio::time::timeout(Duration::from_secs(5), async {
        while broker.pending("work", "g") != 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let pending = broker.pending("work", "g");
    release.notify_one();
    subscription.shutdown().await.unwrap();
    assert!(
        acknowledged.is_ok(),
        "messages 1 and 2 were handled but {pending} messages are still pending while 3 runs"
    );
    assert_eq!(
        broker.pending("work", "g"),
        0,
        "all acknowledged after shutdown"
    );
}
