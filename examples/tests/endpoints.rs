//! The `/metrics` and `/healthz` endpoints in process, on the in-memory binder (and on a
//! Redis address where nothing listens, for a broker that does not answer): what a scraper
//! and a readiness probe get, and what malformed requests get.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use stream_core::Streams;
use stream_examples::http::{self, Endpoints};
use stream_examples::orders::OrderService;
use stream_examples::payments::PaymentService;
use stream_examples::telemetry;

/// The built-in configuration, with destinations of this test's own: the metrics recorder
/// is global to the test process, so tests tell their metrics apart by `destination`.
fn streams(run: &str) -> Streams {
    let mut env = Vec::new();
    for (binding, destination) in [
        ("ORDER_EVENTS_OUT", "order-events"),
        ("ORDER_EVENTS_IN", "order-events"),
        ("PAYMENT_EVENTS_OUT", "payment-events"),
        ("PAYMENT_EVENTS_IN", "payment-events"),
    ] {
        env.push((
            format!("STREAM_BINDINGS__{binding}__DESTINATION"),
            format!("{destination}-{run}"),
        ));
    }
    stream_examples::config::builder()
        .env(env)
        .load_str(stream_examples::config::BUILT_IN)
        .expect("built-in configuration loads")
}

/// The process's Prometheus recorder, installed once for every test of this file.
fn metrics() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| telemetry::install_prometheus().expect("the only recorder"))
        .clone()
}

async fn serve(streams: &Streams) -> SocketAddr {
    let (addr, _server) = http::start("127.0.0.1:0", Endpoints::new(streams.clone(), metrics()))
        .await
        .unwrap();
    addr
}

/// Runs a blocking request off the runtime's threads.
async fn get(addr: SocketAddr, path: &'static str) -> common::Response {
    tokio::task::spawn_blocking(move || common::get(addr, path))
        .await
        .unwrap()
}

async fn raw(addr: SocketAddr, request: &'static [u8]) -> common::Response {
    tokio::task::spawn_blocking(move || common::raw(addr, request))
        .await
        .unwrap()
}

fn json(response: &common::Response) -> Value {
    assert_eq!(response.header("content-type"), Some("application/json"));
    serde_json::from_str(&response.body).expect("a JSON body")
}

fn state_of<'a>(health: &'a Value, binding: &str) -> &'a str {
    health["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["binding"] == binding)
        .unwrap_or_else(|| panic!("{binding} listed in {health}"))["state"]
        .as_str()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_lists_binders_and_subscription_states_and_says_200_while_healthy() {
    metrics();
    let streams = streams(&stream_core::unique_suffix());
    let payments = PaymentService::new(10_000);
    let subscription = payments.start(&streams).await.unwrap();
    let addr = serve(&streams).await;

    let response = get(addr, "/healthz").await;
    assert_eq!(response.status, 200, "{}", response.body);
    let health = json(&response);
    assert_eq!(health["healthy"], true);
    assert_eq!(health["binders"][0]["name"], "memory");
    assert_eq!(health["binders"][0]["type"], "memory");
    assert_eq!(health["binders"][0]["ok"], true);
    assert_eq!(state_of(&health, "order-events-in"), "running");
    assert_eq!(
        health["subscriptions"][0]["group"], "payment-service",
        "{health}"
    );

    // Paused on purpose is not unhealthy: the probe still says 200, and shows the state.
    subscription.pause();
    let response = get(addr, "/healthz").await;
    assert_eq!(response.status, 200);
    assert_eq!(state_of(&json(&response), "order-events-in"), "paused");
    subscription.resume();
    subscription.shutdown().await.unwrap();
}

/// A binder whose broker never answers. (The Redis and Kafka binders answer `ping` with a
/// real round trip; this one fails the same way without needing a broker to be down.)
struct Unreachable;

#[async_trait::async_trait]
impl stream_core::Binder for Unreachable {
    fn kind(&self) -> &'static str {
        "unreachable"
    }
    async fn producer(&self, _: &str) -> stream_core::Result<Box<dyn stream_core::Producer>> {
        Err(refused())
    }
    async fn consumer(
        &self,
        _: &str,
        _: &stream_core::ConsumerOptions,
    ) -> stream_core::Result<Box<dyn stream_core::Consumer>> {
        Err(refused())
    }
    async fn ping(&self) -> stream_core::Result<()> {
        Err(refused())
    }
}

fn refused() -> stream_core::Error {
    stream_core::Error::new(
        stream_core::ErrorKind::Connection,
        "connection refused by 127.0.0.1:1",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_says_503_and_why_when_a_broker_does_not_answer() {
    let streams = stream_examples::config::builder()
        .binder("down", Unreachable)
        .env(Vec::<(String, String)>::new())
        .load_str(stream_examples::config::BUILT_IN)
        .unwrap();
    let addr = serve(&streams).await;

    let response = get(addr, "/healthz").await;
    assert_eq!(response.status, 503, "{}", response.body);
    let health = json(&response);
    assert_eq!(health["healthy"], false);
    let binders = health["binders"].as_array().unwrap();
    let down = binders.iter().find(|b| b["name"] == "down").unwrap();
    assert_eq!(down["ok"], false);
    assert_eq!(down["type"], "unreachable");
    assert!(
        down["error"]
            .as_str()
            .unwrap()
            .contains("connection refused"),
        "{health}"
    );
    let memory = binders.iter().find(|b| b["name"] == "memory").unwrap();
    assert_eq!(memory["ok"], true, "the other binder is listed as fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_prometheus_text_and_count_what_the_services_did() {
    metrics();
    let run = stream_core::unique_suffix();
    let streams = streams(&run);
    let payments = PaymentService::new(10_000);
    let orders = OrderService::new(&streams).await.unwrap();
    let running = [
        payments.start(&streams).await.unwrap(),
        orders.start(&streams).await.unwrap(),
    ];
    let addr = serve(&streams).await;
    for i in 0..5 {
        orders
            .place_order(&format!("o-{i}"), "ada", 100 + i * 5_000)
            .await
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(30), orders.all_settled())
        .await
        .expect("every order settles");
    let order_events = format!("order-events-{run}");
    let payment_events = format!("payment-events-{run}");
    // The order service settles inside its handler, just before core counts it handled.
    let metrics = tokio::task::spawn_blocking(move || {
        common::scrape_until(
            addr,
            Duration::from_secs(10),
            "5 payment events handled",
            |m| {
                m.sum(
                    "stream_handled_total",
                    &[
                        ("binding", "payment-events-in"),
                        ("destination", &payment_events),
                    ],
                ) >= 5.0
            },
        )
    })
    .await
    .unwrap();
    for subscription in running {
        subscription.shutdown().await.unwrap();
    }

    let payment_events = format!("payment-events-{run}");
    for (name, binding, destination) in [
        ("stream_published_total", "order-events-out", &order_events),
        ("stream_received_total", "order-events-in", &order_events),
        ("stream_handled_total", "order-events-in", &order_events),
        (
            "stream_published_total",
            "payment-events-out",
            &payment_events,
        ),
        (
            "stream_received_total",
            "payment-events-in",
            &payment_events,
        ),
        ("stream_handled_total", "payment-events-in", &payment_events),
    ] {
        assert_eq!(
            metrics.sum(name, &[("binding", binding), ("destination", destination)]),
            5.0,
            "{name}{{binding={binding}}}"
        );
    }
    assert!(metrics.has(
        "stream_handler_duration_seconds_bucket",
        &[("binding", "order-events-in"), ("le", "0.001")]
    ));

    let response = get(addr, "/metrics").await;
    assert_eq!(
        response.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_paths_methods_and_malformed_requests_get_4xx_and_head_gets_no_body() {
    let streams = streams(&stream_core::unique_suffix());
    let addr = serve(&streams).await;

    assert_eq!(get(addr, "/").await.status, 404);
    assert_eq!(get(addr, "/metricsx").await.status, 404);

    let post = raw(
        addr,
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));

    let bad = raw(addr, b"GET /metrics\r\n\r\n").await;
    assert_eq!(bad.status, 400);
    assert!(bad.body.starts_with("bad request"), "{}", bad.body);
    assert_eq!(
        raw(addr, b"GET /healthz HTTP/1.1\r\n\r\n").await.status,
        400
    );
    assert_eq!(
        raw(addr, b"\x16\x03\x01\x02\x00\x01\r\n\r\n").await.status,
        400
    );

    // A request line and headers larger than the server reads.
    let mut huge = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    huge.resize(http::MAX_HEAD + 100, b'a');
    huge.extend_from_slice(b"\r\n\r\n");
    let huge: &'static [u8] = huge.leak();
    assert_eq!(raw(addr, huge).await.status, 431);

    let head = raw(addr, b"HEAD /healthz HTTP/1.0\r\n\r\n").await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(head.header("connection"), Some("close"));
    // The health body's latencies vary between calls; a 404's body does not.
    let head = raw(addr, b"HEAD /nowhere HTTP/1.0\r\n\r\n").await;
    assert!(head.body.is_empty());
    let head_length: usize = head.header("content-length").unwrap().parse().unwrap();
    let get_length = get(addr, "/nowhere").await.body.len();
    assert_eq!(
        head_length, get_length,
        "HEAD says how long the GET body is"
    );
}
