//! Conformance cases of administrative access ([`crate::admin`]) and the dead-letter
//! operations built on it ([`crate::dlq`]), for binders that offer it.

use std::collections::HashMap;
use std::sync::Arc;

use super::cases::Event;
use super::{
    ack_all, channel, raw_consumer, receive_at_least, skip, test_binding, unique, Harness,
};
use crate::admin::{Admin, ReadFrom, Removal};
use crate::{header, Binder, ErrorKind, Message, Streams};

fn ev(n: u64) -> Event {
    Event { n }
}

fn number(message: &Message) -> u64 {
    serde_json::from_slice::<Event>(message.payload())
        .expect("an event")
        .n
}

/// The binder's admin access, or `None` (with a visible skip) where it has none.
async fn admin_of(binder: &Arc<dyn Binder>, case: &str) -> Option<Arc<dyn Admin>> {
    match binder.admin().await {
        Ok(admin) => Some(admin),
        Err(e) if e.kind() == ErrorKind::Unsupported => {
            skip(&format!(
                "{case}: the {} binder has no admin access: {e}",
                binder.kind()
            ));
            None
        }
        Err(e) => panic!("admin access: {e}"),
    }
}

async fn read_all(admin: &dyn Admin, destination: &str, page: usize) -> Vec<Message> {
    let mut all = Vec::new();
    let mut from = ReadFrom::Earliest;
    loop {
        let read = admin.read(destination, &from, page).await.expect("read");
        assert!(
            read.messages.len() <= page,
            "a read returns at most what was asked"
        );
        if read.messages.is_empty() {
            return all;
        }
        all.extend(read.messages.into_iter().map(|stored| stored.message));
        from = ReadFrom::Cursor(read.next);
    }
}

/// Reading through admin access neither joins a group nor acknowledges: every message comes
/// back once, in order per key, with key and headers, in pages that follow a cursor; a group
/// reading afterwards still gets them all; `inspect` counts them and names the group.
pub async fn admin_reads_without_joining_a_group(h: &dyn Harness) {
    let caps = h.capabilities();
    let binder = h.binder().await;
    let Some(admin) = admin_of(&binder, "admin_reads_without_joining_a_group").await else {
        return;
    };
    let dest = unique("admin-read");
    let config = test_binding(&dest, &caps);
    let source = channel(&binder, config).source::<Event>().await.unwrap();
    for n in 0..12 {
        source
            .send_keyed(format!("k{}", n % 3), &ev(n))
            .await
            .unwrap();
    }
    let read = read_all(&*admin, &dest, 5).await;
    assert_eq!(read.len(), 12, "each message once");
    let mut last: HashMap<String, u64> = HashMap::new();
    for message in &read {
        let n = number(message);
        let key = message.key().expect("the key is kept").to_owned();
        assert_eq!(key, format!("k{}", n % 3));
        assert_eq!(
            message.headers().get(header::CONTENT_TYPE),
            Some("application/json")
        );
        if let Some(before) = last.insert(key, n) {
            assert!(before < n, "in order per key");
        }
    }
    let empty = admin.read(&dest, &ReadFrom::Latest, 10).await.unwrap();
    assert!(empty.messages.is_empty(), "nothing after the newest");
    source.send_keyed("k0", &ev(99)).await.unwrap();
    let after = admin
        .read(&dest, &ReadFrom::Cursor(empty.next), 10)
        .await
        .unwrap();
    assert_eq!(
        after
            .messages
            .iter()
            .map(|s| number(&s.message))
            .collect::<Vec<_>>(),
        vec![99],
        "reading on from `latest` gives only what came after"
    );

    let group = unique("g");
    let consumer = raw_consumer(&binder, &dest, &group, &caps).await;
    let got = receive_at_least(&*consumer, 13, caps.patience).await;
    assert_eq!(got.len(), 13, "the group still gets everything");
    ack_all(&*consumer, &got[..5]).await;
    let report = admin
        .inspect(&dest, std::slice::from_ref(&group))
        .await
        .unwrap();
    consumer.close().await.unwrap();
    assert!(report.exists);
    assert_eq!(report.length, 13);
    let seen = report
        .groups
        .iter()
        .find(|g| g.name == group)
        .unwrap_or_else(|| panic!("the group is listed: {report:?}"));
    if let Some(lag) = seen.lag {
        assert!(
            (8..=13).contains(&lag),
            "lag counts what the group did not acknowledge: {lag}"
        );
    }
    let missing = admin.inspect(&unique("admin-none"), &[]).await.unwrap();
    assert!(!missing.exists && missing.length == 0);
}

/// Dead letters through [`Streams::dead_letters`]: listed with what their headers say, sent
/// back to their origin (key kept, attempts from 1, the redrive recorded) and removed, the
/// dead-letter destination empty afterwards.
pub async fn dead_letters_are_listed_and_sent_back(h: &dyn Harness) {
    let caps = h.capabilities();
    let binder = h.binder().await;
    let Some(admin) = admin_of(&binder, "dead_letters_are_listed_and_sent_back").await else {
        return;
    };
    let dest = unique("redrive");
    let config = test_binding(&dest, &caps).group(unique("g"));
    let dlq = config.dead_letter_destination();
    let streams = Streams::builder()
        .binder("b", binder.clone())
        .env(Vec::<(String, String)>::new())
        .load_str(&format!(
            "default-binder = \"b\"\n[bindings.in]\ndestination = \"{dest}\"\ngroup = \"g\"\n"
        ))
        .unwrap();
    let producer = binder.dead_letter_producer(&dlq).await.unwrap();
    for n in 0..5 {
        let letter = Message::new(serde_json::to_vec(&ev(n)).unwrap())
            .with_key(format!("k{n}"))
            .with_header(header::CONTENT_TYPE, "application/json")
            .with_header(header::ORIGINAL_DESTINATION, dest.as_str())
            .with_header(header::ORIGINAL_GROUP, "g")
            .with_header(header::ATTEMPTS, "3")
            .with_header(header::ERROR, format!("failure {n}"))
            .with_header(
                header::ERROR_KIND,
                if n == 0 { "rejected" } else { "handler" },
            );
        producer.send(letter).await.unwrap();
    }
    let dead = streams.dead_letters("in").await.unwrap();
    let listed = dead.list(10).await.unwrap();
    assert_eq!(listed.len(), 5);
    // In order per partition; Kafka spreads the keys over its partitions.
    let letter = |n: u64| {
        listed
            .iter()
            .find(|l| number(&l.stored.message) == n)
            .unwrap_or_else(|| panic!("dead letter {n} is listed"))
    };
    assert_eq!(letter(0).reason.as_deref(), Some("rejected"));
    assert_eq!(letter(0).attempts, Some(3));
    assert_eq!(
        letter(0).original_destination.as_deref(),
        Some(dest.as_str())
    );
    assert_eq!(letter(1).reason.as_deref(), Some("handler"));
    assert_eq!(letter(1).error.as_deref(), Some("failure 1"));

    let filtered = dead
        .redrive(
            &crate::dlq::Redrive {
                filter: Some((header::ERROR_KIND.into(), "rejected".into())),
                ..Default::default()
            },
            |_| {},
        )
        .await;
    match admin.removal() {
        Removal::Individual => {
            assert_eq!(filtered.unwrap().redriven, 1);
        }
        _ => assert_eq!(filtered.unwrap_err().kind(), ErrorKind::Unsupported),
    }
    let summary = dead.redrive(&Default::default(), |_| {}).await.unwrap();
    let sent_back = read_all(&*admin, &dest, 100).await;
    assert_eq!(
        summary.redriven + usize::from(admin.removal() == Removal::Individual),
        5
    );
    assert!(
        read_all(&*admin, &dlq, 100).await.is_empty(),
        "the DLQ is empty"
    );
    let mut numbers: Vec<u64> = sent_back.iter().map(number).collect();
    numbers.sort_unstable();
    assert_eq!(numbers, vec![0, 1, 2, 3, 4], "each sent back once");
    for message in &sent_back {
        let n = number(message);
        assert_eq!(message.key(), Some(format!("k{n}").as_str()));
        assert_eq!(message.headers().get(crate::dlq::REDRIVE_COUNT), Some("1"));
        assert!(message.headers().get(header::ERROR).is_none());
        assert!(message.headers().get(header::ATTEMPTS).is_none());
    }
    streams.close().await.unwrap();
}
