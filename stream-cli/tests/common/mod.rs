//! The scenarios every broker's test file runs against the built `stream` binary.

#![allow(dead_code)] // each test file uses its broker's part

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use stream_core::admin::ReadFrom;
use stream_core::{header, HandlerError, Message, Streams};

/// A configuration on fresh destinations: `orders-out` publishes, `orders-in` consumes in
/// group `payments` and dead-letters to `<destination>.dlq`.
pub struct Setup {
    file: PathBuf,
    pub destination: String,
}

impl Setup {
    /// `binder` is the body of the binder's table: its `type` and address.
    pub fn new(binder: &str) -> Setup {
        let run = stream_core::unique_suffix();
        let destination = format!("cli-orders-{run}");
        let file = std::env::temp_dir().join(format!("stream-cli-{run}.toml"));
        std::fs::write(
            &file,
            format!(
                r#"
                default-binder = "broker"
                [binders.broker]
                {binder}
                [bindings.orders-out]
                destination = "{destination}"
                [bindings.orders-in]
                destination = "{destination}"
                group = "payments"
                retry = {{ max-attempts = 2, initial-backoff = "10ms", max-backoff = "20ms", multiplier = 2.0 }}
                "#
            ),
        )
        .unwrap();
        Setup { file, destination }
    }

    pub fn streams(&self) -> Streams {
        Streams::builder()
            .register(binder_redis::register)
            .register(binder_kafka::register)
            .env(Vec::<(String, String)>::new())
            .load_file(&self.file)
            .unwrap()
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_stream"));
        command
            .arg("--config")
            .arg(&self.file)
            .args(args)
            .env_remove("STREAM_CONFIG");
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let output = self.command(args).output().expect("stream runs");
        assert!(
            output.status.success(),
            "stream {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    /// Messages the destination holds, read with the library's admin access.
    pub async fn held(&self, streams: &Streams, destination: &str) -> Vec<Message> {
        let admin = streams
            .channel("orders-in")
            .unwrap()
            .binder()
            .admin()
            .await
            .unwrap();
        let mut all = Vec::new();
        let mut from = ReadFrom::Earliest;
        loop {
            let read = admin.read(destination, &from, 500).await.unwrap();
            if read.messages.is_empty() {
                return all;
            }
            all.extend(read.messages.into_iter().map(|stored| stored.message));
            from = ReadFrom::Cursor(read.next);
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn publish_then_tail_shows_the_message(setup: &Setup) {
    let published = setup.run(&[
        "publish",
        "orders-out",
        "--key",
        "o-1",
        "--header",
        "tenant=acme",
        r#"{"order_id":"o-1","amount_cents":500}"#,
    ]);
    assert!(stdout(&published).starts_with("published "));
    let tail = setup.run(&[
        "tail",
        "orders-out",
        "--from",
        "earliest",
        "--count",
        "5",
        "--format",
        "json",
    ]);
    let lines: Vec<Value> = stdout(&tail)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line per message"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let message = &lines[0];
    assert_eq!(message["key"], "o-1");
    assert_eq!(message["headers"]["tenant"], "acme");
    assert_eq!(message["headers"]["content-type"], "application/json");
    assert_eq!(message["payload"]["amount_cents"], 500);
}

pub fn errors_are_one_line_and_name_what_is_wrong(setup: &Setup) {
    let output = setup.command(&["inspect", "nope"]).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let error = String::from_utf8_lossy(&output.stderr);
    assert_eq!(error.lines().count(), 1, "{error}");
    assert!(
        error.contains("no binding `nope`") && error.contains("orders-in"),
        "{error}"
    );

    let output = setup
        .command(&["publish", "orders-out", "{not json"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not JSON"));
}

pub async fn a_dead_letter_is_listed_sent_back_and_handled_once_the_handler_is_fixed(
    setup: &Setup,
) {
    let streams = setup.streams();
    let source = streams.source::<Value>("orders-out").await.unwrap();
    source
        .send_keyed(
            "o-1",
            &serde_json::json!({"order_id": "o-1", "amount_cents": -5}),
        )
        .await
        .unwrap();

    // A handler that cannot take a negative amount rejects the order to the DLQ.
    let sink = streams.sink::<Value>("orders-in").unwrap();
    let broken = sink
        .subscribe(|order: Value| async move {
            match order["amount_cents"].as_i64() {
                Some(cents) if cents < 0 => Err(HandlerError::reject("negative amount")),
                _ => Ok(()),
            }
        })
        .await
        .unwrap();
    let dlq = format!("{}.dlq", &setup.destination);
    wait_until("the order is dead-lettered", || {
        let streams = &streams;
        let dlq = dlq.clone();
        async move { setup.held(streams, &dlq).await.len() == 1 }
    })
    .await;
    broken.shutdown().await.unwrap();

    let listed = stdout(&setup.run(&["dlq", "list", "orders-in"]));
    let row = listed.lines().nth(1).expect("a row under the header");
    assert!(
        row.contains("rejected") && row.contains("negative amount"),
        "{listed}"
    );
    assert!(
        row.contains(&setup.destination) && row.contains("payments"),
        "{listed}"
    );

    let original_id = setup.held(&streams, &dlq).await[0]
        .message_id()
        .map(str::to_owned);
    assert!(
        original_id.is_some(),
        "the dead letter keeps the message id"
    );
    let redriven = stdout(&setup.run(&["dlq", "redrive", "orders-in"]));
    assert!(redriven.contains("sent back 1 dead letters"), "{redriven}");

    // The fixed handler takes it now.
    type Seen = (Option<String>, u32, Option<String>, bool, Option<String>);
    let seen: Arc<std::sync::Mutex<Vec<Seen>>> = Arc::default();
    let s = seen.clone();
    let fixed = sink
        .subscribe_envelope(move |order: stream_core::Envelope<Value>| {
            let headers = order.message().headers();
            s.lock().unwrap().push((
                order.message().key().map(str::to_owned),
                order.attempt(),
                headers.get("x-redrive-count").map(str::to_owned),
                headers.get(header::ERROR).is_some(),
                order.message().message_id().map(str::to_owned),
            ));
            async { Ok::<(), std::io::Error>(()) }
        })
        .await
        .unwrap();
    wait_until("the redriven order is handled", || {
        let seen = seen.clone();
        async move { !seen.lock().unwrap().is_empty() }
    })
    .await;
    fixed.shutdown().await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![(
            Some("o-1".to_owned()),
            1,
            Some("1".to_owned()),
            false,
            original_id
        )],
        "handled once, key and message id kept, attempts from 1, the redrive recorded, the \
         error headers gone"
    );
    let listed = stdout(&setup.run(&["dlq", "list", "orders-in"]));
    assert!(listed.contains("no dead letters"), "{listed}");
    streams.close().await.unwrap();
}

pub async fn a_redrive_killed_half_way_and_run_again_loses_nothing(setup: &Setup) {
    const LETTERS: u64 = 4_000;
    let streams = setup.streams();
    let dlq = format!("{}.dlq", &setup.destination);
    // Dead letters as core writes them.
    let binder = streams.channel("orders-in").unwrap().binder().clone();
    let producer = binder.producer(&dlq).await.unwrap();
    let letters: Vec<Message> = (0..LETTERS)
        .map(|n| {
            Message::new(serde_json::to_vec(&serde_json::json!({ "n": n })).unwrap())
                .with_key(format!("k{}", n % 10))
                .with_header(header::CONTENT_TYPE, "application/json")
                .with_header(header::ORIGINAL_DESTINATION, setup.destination.as_str())
                .with_header(header::ORIGINAL_GROUP, "payments")
                .with_header(header::ATTEMPTS, "2")
                .with_header(header::ERROR, "the database was down")
                .with_header(header::ERROR_KIND, "handler")
        })
        .collect();
    for chunk in letters.chunks(500) {
        producer.send_batch(chunk.to_vec()).await.unwrap();
    }

    let mut redrive = setup
        .command(&["dlq", "redrive", "orders-in"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Killed as soon as part of the work is done: some sent back, some not.
    let mut left_at_kill = LETTERS as usize;
    for _ in 0..20_000 {
        left_at_kill = setup.held(&streams, &dlq).await.len();
        if left_at_kill < LETTERS as usize * 3 / 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    redrive.kill().unwrap(); // SIGKILL
    redrive.wait().unwrap();
    assert!(
        left_at_kill > 0 && left_at_kill < LETTERS as usize,
        "killed half-way: {left_at_kill} of {LETTERS} left"
    );

    setup.run(&["dlq", "redrive", "orders-in"]);
    assert!(
        setup.held(&streams, &dlq).await.is_empty(),
        "the DLQ is empty"
    );
    let mut seen = std::collections::HashMap::<u64, usize>::new();
    for message in setup.held(&streams, &setup.destination).await {
        let n = serde_json::from_slice::<Value>(message.payload()).unwrap()["n"]
            .as_u64()
            .unwrap();
        assert_eq!(message.key(), Some(format!("k{}", n % 10).as_str()));
        *seen.entry(n).or_default() += 1;
    }
    let lost: Vec<u64> = (0..LETTERS).filter(|n| !seen.contains_key(n)).collect();
    let duplicates: usize = seen.values().map(|c| c - 1).sum();
    eprintln!(
        "redrive killed with {left_at_kill} of {LETTERS} left: lost {}, duplicates {duplicates}",
        lost.len()
    );
    assert!(lost.is_empty(), "lost {lost:?}");
    assert!(
        duplicates <= 1,
        "at most the message in flight at the kill is sent twice"
    );
    streams.close().await.unwrap();
}

pub async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
