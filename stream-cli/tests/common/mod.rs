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
                [bindings.audit]
                destination = "{destination}"
                group = "audit"
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

/// The database of the outbox scenarios, from `STREAM_TEST_POSTGRES_URL` (skipped with a
/// message without it; a failure under `CI=true`).
pub fn postgres() -> Option<String> {
    stream_core::testing::service_env("STREAM_TEST_POSTGRES_URL")
}

async fn pg(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Placed {
    key: String,
    n: u64,
}

/// What the audit group saw: deliveries per message id, each key's sequence in arrival order.
#[derive(Default)]
struct Audit {
    by_id: std::collections::HashMap<String, usize>,
    by_key: std::collections::HashMap<String, Vec<u64>>,
}

/// 10,000 events written in transactions while a `stream relay` process publishes them; the
/// relay is killed with SIGKILL part-way and started again. Every committed event arrives
/// (lost 0), each key's in commit order; the copies of the batch in flight at the kill are
/// counted, and a consumer deduplicating on PostgreSQL makes one effect per event.
pub async fn a_relay_killed_mid_run_loses_nothing(setup: &Setup, url: &str) {
    const EVENTS: u64 = 10_000;
    const KEYS: u64 = 50;
    const PER_TRANSACTION: u64 = 100;
    const HEAD_START: u64 = 5_000;
    const BATCH: usize = 1_000;
    let streams = setup.streams();
    let run = stream_core::unique_suffix();
    let table = format!("outbox_{run}");
    let effects = format!("effects_{run}");
    let outbox = stream_outbox::Outbox::with_table(&table).unwrap();
    let mut client = pg(url).await;
    outbox.install(&client).await.unwrap();
    client
        .batch_execute(&format!(
            "CREATE TABLE {effects} (message_id text NOT NULL)"
        ))
        .await
        .unwrap();

    let audit = Arc::new(std::sync::Mutex::new(Audit::default()));
    let recorder = audit.clone();
    let audited = streams
        .sink::<Placed>("audit")
        .unwrap()
        .subscribe_envelope(move |e: stream_core::Envelope<Placed>| {
            let mut audit = recorder.lock().unwrap();
            let id = e.message().message_id().unwrap().to_owned();
            *audit.by_id.entry(id).or_default() += 1;
            let event = e.payload();
            audit
                .by_key
                .entry(event.key.clone())
                .or_default()
                .push(event.n);
            async { Ok::<(), std::io::Error>(()) }
        })
        .await
        .unwrap();
    let dedup = stream_outbox::PgDedup::connect_with(
        url,
        stream_outbox::PgDedupConfig {
            table: format!("dedup_{run}"),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let insert = format!("INSERT INTO {effects} (message_id) VALUES ($1)");
    let payments = dedup
        .subscribe(
            &streams.sink::<Placed>("orders-in").unwrap(),
            Duration::from_secs(3600),
            move |e: stream_core::Envelope<Placed>, tx: stream_outbox::Tx| {
                let insert = insert.clone();
                async move {
                    let id = e.message().message_id().unwrap().to_owned();
                    tx.execute(&insert, &[&id]).await?;
                    Ok::<(), stream_core::BoxError>(())
                }
            },
        )
        .await
        .unwrap();

    let relay = |setup: &Setup| {
        setup
            .command(&[
                "relay",
                "--postgres",
                url,
                "--table",
                &table,
                "--batch-size",
                &BATCH.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    // Part of the run is written before the relay starts, so that it publishes full
    // batches back to back and the kill most likely lands inside one; the rest is written
    // while it runs.
    let (written, mut head) = tokio::sync::mpsc::channel::<()>(1);
    let writer = tokio::spawn(async move {
        let mut next = [0u64; KEYS as usize];
        for t in 0..EVENTS / PER_TRANSACTION {
            let tx = client.transaction().await.unwrap();
            for i in 0..PER_TRANSACTION {
                let k = ((t * PER_TRANSACTION + i) * 7 % KEYS) as usize;
                let event = Placed {
                    key: format!("k{k}"),
                    n: next[k],
                };
                next[k] += 1;
                outbox
                    .send(&tx, "orders-out", &event.key, &event)
                    .await
                    .unwrap();
            }
            tx.commit().await.unwrap();
            if (t + 1) * PER_TRANSACTION == HEAD_START {
                written.send(()).await.unwrap();
            }
        }
        client
    });
    head.recv().await.unwrap();
    let mut first = relay(setup);
    let distinct = |audit: &Arc<std::sync::Mutex<Audit>>| audit.lock().unwrap().by_id.len();
    let patience = tokio::time::Instant::now() + Duration::from_secs(120);
    while distinct(&audit) < EVENTS as usize * 3 / 10 {
        assert!(
            tokio::time::Instant::now() < patience,
            "the relay publishes nothing"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    first.kill().unwrap(); // SIGKILL, mid-run
    first.wait().unwrap();
    let at_kill = distinct(&audit);
    assert!(
        at_kill < EVENTS as usize,
        "killed part-way: {at_kill} of {EVENTS} arrived"
    );
    let client = writer.await.unwrap();

    let second = relay(setup);
    while distinct(&audit) < EVENTS as usize {
        assert!(
            tokio::time::Instant::now() < patience,
            "{} of {EVENTS} events arrived",
            distinct(&audit)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let count = |sql: String| {
        let client = &client;
        async move { client.query_one(&sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    while count(format!("SELECT count(*) FROM {effects}")).await < EVENTS as i64 {
        assert!(
            tokio::time::Instant::now() < patience,
            "the payments lag behind"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A graceful stop of the second relay: SIGTERM, then it exits on its own.
    let stopped = Command::new("kill")
        .arg("-TERM")
        .arg(second.id().to_string())
        .status()
        .unwrap();
    assert!(stopped.success());
    let exit = second.wait_with_output().unwrap();
    assert!(exit.status.success(), "the relay exits cleanly on SIGTERM");
    payments.shutdown().await.unwrap();
    audited.shutdown().await.unwrap();

    let effects_total = count(format!("SELECT count(*) FROM {effects}")).await;
    let effects_distinct = count(format!("SELECT count(DISTINCT message_id) FROM {effects}")).await;
    let unsent = count(format!(
        "SELECT count(*) FROM {table} WHERE sent_at IS NULL"
    ))
    .await;
    let (delivered, duplicates) = {
        let audit = audit.lock().unwrap();
        for (key, ns) in &audit.by_key {
            let mut next = 0;
            for &n in ns {
                assert!(n <= next, "key {key}: {n} arrived before {next}");
                if n == next {
                    next += 1;
                }
            }
        }
        let duplicates: usize = audit.by_id.values().map(|n| n - 1).sum();
        (audit.by_id.len(), duplicates)
    };
    eprintln!(
        "relay killed with {at_kill} of {EVENTS} events delivered: lost {}, duplicates \
         delivered {duplicates}, effects {effects_total} ({effects_distinct} distinct)",
        EVENTS as usize - delivered
    );
    assert_eq!(delivered, EVENTS as usize, "lost events");
    assert!(
        duplicates <= BATCH,
        "at most the batch in flight at the kill is published twice"
    );
    assert_eq!(
        effects_total, EVENTS as i64,
        "one effect per event: duplicates removed"
    );
    assert_eq!(effects_distinct, EVENTS as i64);
    assert_eq!(unsent, 0, "every row is marked sent");
    streams.close().await.unwrap();
}
