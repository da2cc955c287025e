//! The services as processes on Redis, watched from outside the way an operator would:
//! scraping `/metrics`, probing `/healthz`, and (with the `opentelemetry` feature) reading
//! the spans both processes write to follow one trace across them.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{config_file, get, isolated_env, scrape_until, Metrics};
use serde_json::Value;
use stream_core::testing::service_env;

const PATIENCE: Duration = Duration::from_secs(60);

/// A service process, killed if the test ends before it exits.
struct Service {
    name: &'static str,
    child: Child,
    stdout: std::io::Lines<BufReader<ChildStdout>>,
    /// Everything the process wrote to stderr so far, read by a thread so that the pipe
    /// never fills and blocks the service.
    stderr: Arc<Mutex<Vec<String>>>,
    stderr_reader: Option<std::thread::JoinHandle<()>>,
    /// The address it serves `/metrics` and `/healthz` on, once it said so.
    http: Option<SocketAddr>,
}

impl Service {
    fn start(name: &'static str, env: &[(String, String)], args: &[&str]) -> Service {
        let binary = match name {
            "payment-service" => env!("CARGO_BIN_EXE_payment-service"),
            "order-service" => env!("CARGO_BIN_EXE_order-service"),
            _ => unreachable!(),
        };
        let mut child = Command::new(binary)
            .arg("--config")
            .arg(config_file("redis.toml"))
            .args(args)
            .envs(env.iter().cloned())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{name} starts: {e}"));
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let lines = stderr.clone();
        let pipe = child.stderr.take().unwrap();
        let stderr_reader = std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        Service {
            name,
            child,
            stdout,
            stderr,
            stderr_reader: Some(stderr_reader),
            http: None,
        }
    }

    /// Reads stdout up to the line `until`, noting the endpoints' address on the way.
    fn read_until(&mut self, until: &str) -> Vec<String> {
        let mut seen = Vec::new();
        for line in self.stdout.by_ref() {
            let line = line.unwrap();
            if let Some(addr) = line.strip_prefix(&format!("{}: http on ", self.name)) {
                self.http = Some(addr.parse().expect("a socket address"));
            }
            let done = line.starts_with(until);
            seen.push(line);
            if done {
                return seen;
            }
        }
        panic!(
            "{} ended before printing `{until}`; stdout: {seen:?}; stderr: {:?}",
            self.name,
            self.stderr.lock().unwrap()
        );
    }

    fn http(&self) -> SocketAddr {
        self.http.expect("the service printed its http address")
    }

    /// Sends SIGTERM and waits for a clean exit.
    fn stop(&mut self) {
        let stopped = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(stopped.success());
        self.wait_success();
    }

    /// Waits for the process to exit by itself, successfully; returns its remaining stdout.
    fn wait_success(&mut self) -> Vec<String> {
        let status = self.child.wait().unwrap();
        let rest: Vec<String> = self.stdout.by_ref().map_while(Result::ok).collect();
        if let Some(reader) = self.stderr_reader.take() {
            reader.join().unwrap();
        }
        assert!(
            status.success(),
            "{} exited with {status}; stdout: {rest:?}; stderr: {:?}",
            self.name,
            self.stderr.lock().unwrap()
        );
        rest
    }

    #[cfg_attr(not(feature = "opentelemetry"), allow(dead_code))]
    fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // A failed assertion must not leave the service running after the test.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn health(addr: SocketAddr) -> (u16, Value) {
    let response = get(addr, "/healthz");
    let body = serde_json::from_str(&response.body)
        .unwrap_or_else(|e| panic!("JSON from /healthz ({e}): {}", response.body));
    (response.status, body)
}

fn subscription_state<'a>(health: &'a Value, binding: &str) -> Option<&'a str> {
    health["subscriptions"]
        .as_array()?
        .iter()
        .find(|s| s["binding"] == binding)?["state"]
        .as_str()
}

fn count(metrics: &Metrics, name: &str, binding: &str) -> f64 {
    metrics.sum(name, &[("binding", binding)])
}

#[test]
fn payment_service_metrics_move_as_orders_flow_and_healthz_says_running_on_redis() {
    let Some(url) = service_env("STREAM_TEST_REDIS_URL") else {
        return;
    };
    let env = isolated_env("redis", "URL", &url);
    let mut payments = Service::start("payment-service", &env, &["--http", "127.0.0.1:0"]);
    payments.read_until("payment-service: running");
    let addr = payments.http();

    let (status, body) = health(addr);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["healthy"], true);
    assert_eq!(body["binders"][0]["type"], "redis");
    assert_eq!(body["binders"][0]["ok"], true, "{body}");
    assert_eq!(
        subscription_state(&body, "order-events-in"),
        Some("running"),
        "{body}"
    );

    let before = Metrics::parse(&get(addr, "/metrics").body);
    for (name, binding) in [
        ("stream_received_total", "order-events-in"),
        ("stream_handled_total", "order-events-in"),
        ("stream_published_total", "payment-events-out"),
    ] {
        assert_eq!(
            count(&before, name, binding),
            0.0,
            "{name} before any order"
        );
    }

    let mut orders = Service::start(
        "order-service",
        &env,
        &["--orders", "12", "--timeout", "60"],
    );
    let report = orders.wait_success();
    assert!(
        report.iter().any(|line| line.ends_with(" 0 pending")),
        "order-service said {report:?}"
    );

    // Every order settled, so the payment service published every outcome; core counts a
    // delivery handled just after its handler returns, so wait for the last one.
    let after = scrape_until(addr, PATIENCE, "12 orders handled", |m| {
        count(m, "stream_handled_total", "order-events-in") >= 12.0
    });
    assert_eq!(
        count(&after, "stream_received_total", "order-events-in"),
        12.0
    );
    assert_eq!(
        count(&after, "stream_handled_total", "order-events-in"),
        12.0
    );
    assert_eq!(
        count(&after, "stream_published_total", "payment-events-out"),
        12.0
    );
    assert_eq!(
        count(&after, "stream_handler_errors_total", "order-events-in"),
        0.0
    );
    assert!(
        after.has(
            "stream_handler_duration_seconds_count",
            &[("binding", "order-events-in")]
        ),
        "the handler duration histogram is exported"
    );

    let (status, body) = health(addr);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        subscription_state(&body, "order-events-in"),
        Some("running")
    );
    payments.stop();
}

#[test]
fn order_service_serves_metrics_and_health_while_its_orders_wait_on_redis() {
    let Some(url) = service_env("STREAM_TEST_REDIS_URL") else {
        return;
    };
    let env = isolated_env("redis", "URL", &url);
    // No payment service yet: the orders stay pending and the order service stays up.
    let mut orders = Service::start(
        "order-service",
        &env,
        &["--orders", "6", "--timeout", "60", "--http", "127.0.0.1:0"],
    );
    orders.read_until("order-service: http on");
    let addr = orders.http();

    let metrics = scrape_until(addr, PATIENCE, "6 orders published", |m| {
        count(m, "stream_published_total", "order-events-out") >= 6.0
    });
    assert_eq!(
        count(&metrics, "stream_published_total", "order-events-out"),
        6.0
    );
    assert_eq!(
        count(&metrics, "stream_received_total", "payment-events-in"),
        0.0
    );
    let (status, body) = health(addr);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        subscription_state(&body, "payment-events-in"),
        Some("running"),
        "{body}"
    );

    let mut payments = Service::start("payment-service", &env, &[]);
    payments.read_until("payment-service: running");
    let report = orders.wait_success();
    assert!(
        report
            .iter()
            .any(|line| line.starts_with("order-service: 6 placed") && line.ends_with(" 0 pending")),
        "order-service said {report:?}"
    );
    payments.stop();
}

/// One exported span, from a `span trace_id=… span_id=… parent_id=… …` line.
#[cfg(feature = "opentelemetry")]
#[derive(Debug, Clone)]
struct Span {
    fields: std::collections::HashMap<String, String>,
}

#[cfg(feature = "opentelemetry")]
impl Span {
    fn parse(lines: &[String]) -> Vec<Span> {
        let prefix = stream_examples::telemetry::SPAN_LINE_PREFIX;
        lines
            .iter()
            .filter_map(|line| line.strip_prefix(prefix))
            .map(|rest| Span {
                // Quoted values (with spaces) come last and are not needed here.
                fields: rest
                    .split(' ')
                    .filter_map(|pair| pair.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
            })
            .collect()
    }

    fn get(&self, field: &str) -> &str {
        self.fields.get(field).map_or("", String::as_str)
    }

    fn is(&self, name: &str, binding: Option<&str>) -> bool {
        self.get("name") == name && binding.is_none_or(|b| self.get("binding") == b)
    }
}

/// The only span of `spans` that `matches`, or a panic that shows them.
#[cfg(feature = "opentelemetry")]
fn one<'a>(spans: &'a [Span], what: &str, matches: impl Fn(&Span) -> bool) -> &'a Span {
    let found: Vec<&Span> = spans.iter().filter(|s| matches(s)).collect();
    assert_eq!(found.len(), 1, "one {what}, found {found:?}");
    found[0]
}

#[cfg(feature = "opentelemetry")]
#[test]
fn one_trace_crosses_both_services_on_redis() {
    let Some(url) = service_env("STREAM_TEST_REDIS_URL") else {
        return;
    };
    let env = isolated_env("redis", "URL", &url);
    let mut payments = Service::start("payment-service", &env, &[]);
    payments.read_until("payment-service: running");
    let mut orders = Service::start("order-service", &env, &["--orders", "3", "--timeout", "60"]);
    orders.wait_success();
    payments.stop();
    let order_spans = Span::parse(&orders.stderr());
    let payment_spans = Span::parse(&payments.stderr());

    let placed: Vec<&Span> = order_spans
        .iter()
        .filter(|s| s.is("place_order", None))
        .collect();
    assert_eq!(placed.len(), 3, "{order_spans:?}");
    let mut traces = std::collections::HashSet::new();
    for place in placed {
        let trace = place.get("trace_id");
        assert_eq!(place.get("parent_id"), "-", "place_order starts the trace");
        assert!(traces.insert(trace), "each order has its own trace");
        let in_trace = |s: &Span| s.get("trace_id") == trace;
        let child_of = |parent: &Span| {
            let id = parent.get("span_id").to_owned();
            move |s: &Span| s.get("parent_id") == id
        };

        // order-service: place_order -> stream.outbox, the write of OrderCreated in the
        // order's transaction (the relay publishes it later, keeping this context)
        let order_created = one(&order_spans, "outbox write of OrderCreated", |s| {
            in_trace(s) && s.is("stream.outbox", Some("order-events-out")) && child_of(place)(s)
        });
        assert_eq!(order_created.get("message.key"), place.get("order_id"));
        // payment-service: stream.handle, whose parent is that send, in the other process
        let charge = one(&payment_spans, "handling of OrderCreated", |s| {
            in_trace(s) && s.is("stream.handle", Some("order-events-in"))
        });
        assert_eq!(charge.get("parent_id"), order_created.get("span_id"));
        assert_eq!(charge.get("parent_remote"), "true");
        assert_eq!(charge.get("outcome"), "ok");
        // -> on_order, then the processor's stream.send of the payment event, both in it
        one(&payment_spans, "on_order", |s| {
            in_trace(s) && s.is("on_order", None) && child_of(charge)(s)
        });
        let payment_event = one(&payment_spans, "send of the payment event", |s| {
            in_trace(s) && s.is("stream.send", Some("payment-events-out")) && child_of(charge)(s)
        });
        // order-service again: stream.handle of the payment event, parent in the payment
        // service, then on_payment inside it.
        let settle = one(&order_spans, "handling of the payment event", |s| {
            in_trace(s) && s.is("stream.handle", Some("payment-events-in"))
        });
        assert_eq!(settle.get("parent_id"), payment_event.get("span_id"));
        assert_eq!(settle.get("parent_remote"), "true");
        one(&order_spans, "on_payment", |s| {
            in_trace(s) && s.is("on_payment", None) && child_of(settle)(s)
        });
    }
}

#[cfg(not(feature = "opentelemetry"))]
#[test]
fn one_trace_crosses_both_services_on_redis() {
    stream_core::testing::skip(
        "one_trace_crosses_both_services_on_redis needs the `opentelemetry` feature \
         (cargo test -p stream-examples --all-features)",
    );
}
