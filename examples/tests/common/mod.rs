//! Helpers for the tests of the services' endpoints: a blocking HTTP client and a reader of
//! Prometheus text.

#![allow(dead_code)] // each test binary uses a part of this

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// A response: status code, headers (names lower-cased) and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `request` as is and reads the response until the server closes the connection.
pub fn raw(addr: SocketAddr, request: &[u8]) -> Response {
    let mut stream = TcpStream::connect(addr).expect("connects to the endpoint");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut bytes = Vec::new();
    stream
        .read_to_end(&mut bytes)
        .expect("the server answers and closes");
    let text = String::from_utf8(bytes).expect("a UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("a status line, got `{status_line}`"));
    let headers = lines
        .map(|line| {
            let (name, value) = line.split_once(':').expect("a header line");
            (name.to_ascii_lowercase(), value.trim().to_owned())
        })
        .collect();
    Response {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// `GET path`.
pub fn get(addr: SocketAddr, path: &str) -> Response {
    raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: test\r\n\r\n").as_bytes(),
    )
}

/// Scrapes `/metrics` until `done` holds for the scrape, or panics after `patience` with
/// `what` and the last scrape.
pub fn scrape_until(
    addr: SocketAddr,
    patience: Duration,
    what: &str,
    done: impl Fn(&Metrics) -> bool,
) -> Metrics {
    let deadline = Instant::now() + patience;
    loop {
        let response = get(addr, "/metrics");
        assert_eq!(response.status, 200, "{}", response.body);
        let metrics = Metrics::parse(&response.body);
        if done(&metrics) {
            return metrics;
        }
        assert!(
            Instant::now() < deadline,
            "{what} within {patience:?}; last scrape:\n{}",
            response.body
        );
        // Polling a remote process: there is nothing to await but its next answer.
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Samples of a Prometheus text scrape.
#[derive(Debug, Default)]
pub struct Metrics {
    samples: Vec<Sample>,
}

#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl Metrics {
    /// Parses the text format (the subset the exporter writes: no escapes in label values
    /// other than `\"`, `\\` and `\n`, no timestamps).
    pub fn parse(text: &str) -> Metrics {
        let mut samples = Vec::new();
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("`series value`");
            let value: f64 = value.parse().expect("a number");
            let (name, labels) = match series.split_once('{') {
                None => (series.to_owned(), Vec::new()),
                Some((name, rest)) => {
                    let rest = rest.strip_suffix('}').expect("labels end with }");
                    (name.to_owned(), parse_labels(rest))
                }
            };
            samples.push(Sample {
                name,
                labels,
                value,
            });
        }
        Metrics { samples }
    }

    /// The sum of the samples called `name` whose labels include `labels` (0 when none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|s| s.value)
            .sum()
    }

    /// Whether any sample is called `name` with labels that include `labels`.
    pub fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.samples.iter().any(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
    }
}

fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if name.is_empty() {
            break;
        }
        assert_eq!(chars.next(), Some('"'), "a quoted label value");
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => break,
                },
                c => value.push(c),
            }
        }
        labels.push((name.trim_start_matches(',').to_owned(), value));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    labels
}

/// Environment overrides that point one test at its own broker address and destinations, so
/// that tests sharing a broker do not consume each other's events.
pub fn isolated_env(binder: &str, address_key: &str, address: &str) -> Vec<(String, String)> {
    let run = stream_core::unique_suffix();
    let mut env = vec![(
        format!("STREAM_BINDERS__{}__{address_key}", binder.to_uppercase()),
        address.to_owned(),
    )];
    for (binding, destination) in [
        ("ORDER_EVENTS_OUT", "order-events"),
        ("ORDER_EVENTS_IN", "order-events"),
        ("PAYMENT_EVENTS_OUT", "payment-events"),
        ("PAYMENT_EVENTS_IN", "payment-events"),
        ("ORDER_EVENTS_DLQ", "order-events.dlq"),
        ("PAYMENT_EVENTS_DLQ", "payment-events.dlq"),
    ] {
        env.push((
            format!("STREAM_BINDINGS__{binding}__DESTINATION"),
            format!("{destination}-{run}"),
        ));
    }
    for binding in ["ORDER_EVENTS_IN", "PAYMENT_EVENTS_IN"] {
        let dead_letter = if binding.starts_with("ORDER") {
            "order-events"
        } else {
            "payment-events"
        };
        env.push((
            format!("STREAM_BINDINGS__{binding}__DEAD_LETTER"),
            format!("{dead_letter}.dlq-{run}"),
        ));
    }
    env
}

/// A configuration file of the examples.
pub fn config_file(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config")
        .join(name)
}

/// A schema of its own in the database at `url`, and the URL that makes it the connection's
/// search path: the services' tables (orders, outbox, handled ids) of one test are not
/// another's, so one test's relay never publishes another's events.
pub async fn isolated_database(url: &str) -> String {
    let schema = format!("saga_{}", stream_core::unique_suffix());
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("the test database answers");
    tokio::spawn(connection);
    client
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .unwrap();
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}options=-c%20search_path%3D{schema}")
}
