//! The services' operations endpoints: `GET /metrics` (Prometheus text) and `GET /healthz`
//! (JSON, 200 when [`Health::is_healthy`], 503 otherwise), over a deliberately tiny
//! HTTP/1.1 server: one request per connection, answered with `Connection: close`.
//!
//! Two read-only routes do not justify a web framework in an example; what a scraper or a
//! probe sends is a short GET, which this reads in full (request line and headers) before
//! answering, and anything malformed gets a 400.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use stream_examples::http::{start, Endpoints};
//!
//! let streams = stream_examples::config::load(None)?;
//! // A recorder that is not installed globally renders nothing, which is enough here.
//! let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
//!     .build_recorder()
//!     .handle();
//! let (addr, server) = start("127.0.0.1:0", Endpoints::new(streams, metrics)).await?;
//! println!("serving on http://{addr}/metrics and http://{addr}/healthz");
//! server.abort();
//! # Ok(())
//! # }
//! ```

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{json, Value};
use stream_core::{Health, Streams, SubscriptionState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The most a request line and its headers may take; scrapers and probes send far less.
pub const MAX_HEAD: usize = 8 * 1024;

/// How long a client has to send its request line and headers. A client that connects and
/// stalls holds a task and a socket until then, no longer.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The Prometheus text exposition format's content type.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the endpoints report on.
#[derive(Clone)]
pub struct Endpoints {
    streams: Streams,
    metrics: PrometheusHandle,
}

impl Endpoints {
    /// `/healthz` asks `streams`; `/metrics` renders `metrics`.
    pub fn new(streams: Streams, metrics: PrometheusHandle) -> Self {
        Endpoints { streams, metrics }
    }
}

/// Binds `addr` (`host:port`; port 0 picks a free one) and serves `endpoints` there on a new
/// task; returns the bound address and the task, which serves until aborted.
pub async fn start(
    addr: &str,
    endpoints: Endpoints,
) -> stream_core::Result<(SocketAddr, JoinHandle<()>)> {
    let bind_failed = |e| {
        stream_core::Error::new(
            stream_core::ErrorKind::Config,
            format!("cannot serve /metrics and /healthz on `{addr}`"),
        )
        .with_source(e)
    };
    let listener = TcpListener::bind(addr).await.map_err(bind_failed)?;
    let bound = listener.local_addr().map_err(bind_failed)?;
    Ok((bound, tokio::spawn(serve(listener, endpoints))))
}

/// Accepts connections on `listener` and answers each on its own task, until the returned
/// future is dropped or aborted.
pub async fn serve(listener: TcpListener, endpoints: Endpoints) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let endpoints = endpoints.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, &endpoints).await {
                        tracing::debug!(error = %e, "http connection failed");
                    }
                });
            }
            Err(e) => {
                // Accept fails when the process is out of file descriptors; retrying at
                // once would spin, so back off a little and let connections close.
                tracing::warn!(error = %e, "http accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads one request, writes one response, closes.
async fn connection(mut stream: TcpStream, endpoints: &Endpoints) -> std::io::Result<()> {
    let response = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Err(_) => return Ok(()), // stalled: nothing worth answering
        Ok(Err(e)) => return Err(e),
        Ok(Ok(Head::Closed)) => return Ok(()),
        Ok(Ok(Head::TooLarge)) => Response::text(431, "request header fields too large\n"),
        Ok(Ok(Head::Complete(bytes))) => match parse_request(&bytes) {
            Ok(request) => route(&request, endpoints).await,
            Err(why) => Response::text(400, &format!("bad request: {why}\n")),
        },
    };
    stream.write_all(&response.to_bytes()).await?;
    stream.shutdown().await?;
    // Closing a socket with unread input (a body we did not read, a pipelined request)
    // makes the kernel send a reset, which can destroy the response before the client read
    // it. Read until the client closes, bounded in time and size.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut sink = [0u8; 1024];
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
    Ok(())
}

/// What the client sent before the end of its headers.
enum Head {
    /// The bytes up to and including the empty line that ends the headers.
    Complete(Vec<u8>),
    /// More than [`MAX_HEAD`] bytes without the end of the headers.
    TooLarge,
    /// The client closed before the end of its headers.
    Closed,
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<Head> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Head::Closed);
        }
        // Search from just before the new bytes: the terminator may straddle two reads.
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&buf, from) {
            if end > MAX_HEAD {
                return Ok(Head::TooLarge);
            }
            buf.truncate(end);
            return Ok(Head::Complete(buf));
        }
        if buf.len() > MAX_HEAD {
            return Ok(Head::TooLarge);
        }
    }
}

/// Where the headers end (after `\r\n\r\n`, or `\n\n`, which RFC 9112 lets a server accept),
/// searching from `from`. Empty lines before the request line do not count: RFC 9112 asks
/// servers to skip them.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = buf
        .iter()
        .position(|b| *b != b'\r' && *b != b'\n')
        .unwrap_or(buf.len());
    let from = from.max(start);
    (from..buf.len()).find_map(|i| {
        let rest = &buf[i..];
        if rest.starts_with(b"\n\r\n") {
            Some(i + 3)
        } else if rest.starts_with(b"\n\n") {
            Some(i + 2)
        } else {
            None
        }
    })
}

/// A parsed request line; the headers were checked and are not needed further.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `HEAD`, ...
    pub method: String,
    /// The path, without the query.
    pub path: String,
}

/// Parses a request head (request line and headers, up to and including the empty line),
/// or says why it is not a valid HTTP/1.x request.
pub fn parse_request(head: &[u8]) -> Result<Request, &'static str> {
    let mut lines = head
        .split(|b| *b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .skip_while(|line| line.is_empty());
    let request_line = lines.next().ok_or("no request line")?;
    let request_line = std::str::from_utf8(request_line).map_err(|_| "request line is not text")?;
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("request line is not `METHOD TARGET VERSION`");
    };
    if method.is_empty() || !method.bytes().all(is_token_byte) {
        return Err("bad method");
    }
    if !target.starts_with('/') || !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("target is not an absolute path");
    }
    let needs_host = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err("not HTTP/1.0 or HTTP/1.1"),
    };
    let mut has_host = false;
    for line in lines.take_while(|line| !line.is_empty()) {
        if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            return Err("folded header line");
        }
        let colon = line
            .iter()
            .position(|b| *b == b':')
            .ok_or("header line without a colon")?;
        let name = &line[..colon];
        if name.is_empty() || !name.iter().copied().all(is_token_byte) {
            return Err("bad header name");
        }
        has_host |= name.eq_ignore_ascii_case(b"host");
    }
    if needs_host && !has_host {
        return Err("HTTP/1.1 request without Host");
    }
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    Ok(Request {
        method: method.to_owned(),
        path: path.to_owned(),
    })
}

/// RFC 9110 `tchar`: what method and header names are made of.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

async fn route(request: &Request, endpoints: &Endpoints) -> Response {
    let head_only = request.method == "HEAD";
    let mut response = match (request.method.as_str(), request.path.as_str()) {
        ("GET" | "HEAD", "/metrics") => Response {
            status: 200,
            content_type: PROMETHEUS_TEXT,
            body: endpoints.metrics.render().into_bytes(),
            allow: false,
            head_only: false,
        },
        ("GET" | "HEAD", "/healthz") => {
            let health = endpoints.streams.health().await;
            let mut body = health_json(&health).to_string();
            body.push('\n');
            Response {
                status: if health.is_healthy() { 200 } else { 503 },
                content_type: "application/json",
                body: body.into_bytes(),
                allow: false,
                head_only: false,
            }
        }
        (_, "/metrics" | "/healthz") => Response {
            allow: true,
            ..Response::text(405, "only GET and HEAD\n")
        },
        _ => Response::text(404, "not found; try /metrics or /healthz\n"),
    };
    // HEAD: the GET response's headers, Content-Length included, without its body.
    response.head_only = head_only;
    response
}

/// The `/healthz` body: every binder and subscription, so that a failing probe says why.
pub fn health_json(health: &Health) -> Value {
    let binders: Vec<Value> = health
        .binders
        .iter()
        .map(|b| {
            let mut binder = json!({
                "name": b.name,
                "type": b.kind,
                "ok": b.error.is_none(),
                "latency_ms": (b.latency.as_secs_f64() * 1e6).round() / 1e3,
            });
            if let Some(error) = &b.error {
                binder["error"] = json!(error);
            }
            binder
        })
        .collect();
    let subscriptions: Vec<Value> = health
        .subscriptions
        .iter()
        .map(|s| {
            let mut subscription = json!({ "binding": s.binding, "group": s.group });
            let fields = match &s.state {
                SubscriptionState::Running => json!({ "state": "running" }),
                SubscriptionState::Paused => json!({ "state": "paused" }),
                SubscriptionState::Stopped => json!({ "state": "stopped" }),
                SubscriptionState::Reconnecting { since, reason } => json!({
                    "state": "reconnecting",
                    "for_s": SystemTime::now()
                        .duration_since(*since)
                        .map_or(0, |d| d.as_secs()),
                    "reason": reason,
                }),
                SubscriptionState::Failed { kind, error } => json!({
                    "state": "failed",
                    "kind": kind.to_string(),
                    "error": error,
                }),
                // A state added to stream-core later still shows up, if less tidily.
                other => json!({ "state": format!("{other:?}") }),
            };
            if let (Value::Object(into), Value::Object(from)) = (&mut subscription, fields) {
                into.extend(from);
            }
            subscription
        })
        .collect();
    json!({
        "healthy": health.is_healthy(),
        "binders": binders,
        "subscriptions": subscriptions,
    })
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    /// Whether to send `Allow` (with a 405).
    allow: bool,
    /// Whether to leave the body out (a HEAD request).
    head_only: bool,
}

impl Response {
    fn text(status: u16, body: &str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.as_bytes().to_vec(),
            allow: false,
            head_only: false,
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let length = self.body.len();
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "",
        };
        let mut out = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {length}\r\n\
             Connection: close\r\n",
            self.status, self.content_type
        );
        if self.allow {
            out.push_str("Allow: GET, HEAD\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str) -> Request {
        Request {
            method: "GET".into(),
            path: path.into(),
        }
    }

    #[test]
    fn parses_a_scrapers_request_and_drops_the_query() {
        let head = b"GET /metrics?name[]=x HTTP/1.1\r\nHost: 127.0.0.1:9464\r\n\
                     Accept: text/plain;version=0.0.4\r\nUser-Agent: Prometheus/2.51\r\n\r\n";
        assert_eq!(parse_request(head), Ok(get("/metrics")));
    }

    #[test]
    fn accepts_bare_newlines_leading_empty_lines_and_http_1_0_without_host() {
        assert_eq!(
            parse_request(b"\r\nGET /healthz HTTP/1.0\n\n"),
            Ok(get("/healthz"))
        );
    }

    #[test]
    fn rejects_malformed_requests() {
        for (head, why) in [
            (&b"\r\n\r\n"[..], "no request line"),
            (
                b"GET /metrics\r\n\r\n",
                "request line is not `METHOD TARGET VERSION`",
            ),
            (
                b"GET  /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
                "request line is not `METHOD TARGET VERSION`",
            ),
            (
                b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n",
                "request line is not text",
            ),
            (
                b"GET metrics HTTP/1.1\r\nHost: x\r\n\r\n",
                "target is not an absolute path",
            ),
            (
                b"GET /metrics HTTP/2.0\r\nHost: x\r\n\r\n",
                "not HTTP/1.0 or HTTP/1.1",
            ),
            (
                b"GET /metrics HTTP/1.1\r\n\r\n",
                "HTTP/1.1 request without Host",
            ),
            (
                b"GET /metrics HTTP/1.1\r\nHost x\r\n\r\n",
                "header line without a colon",
            ),
            (
                b"GET /metrics HTTP/1.1\r\nHost : x\r\n\r\n",
                "bad header name",
            ),
            (
                b"GET /metrics HTTP/1.1\r\nHost: x\r\n y\r\n\r\n",
                "folded header line",
            ),
            (
                b"G\xc3\xa9T /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
                "bad method",
            ),
        ] {
            assert_eq!(
                parse_request(head),
                Err(why),
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn finds_the_end_of_the_headers_across_reads() {
        let head = b"GET / HTTP/1.0\r\n\r\nbody";
        assert_eq!(head_end(head, 0), Some(18));
        // Searching from the start of a later read still finds a terminator it straddles.
        assert_eq!(head_end(head, 15), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.0\r\nHost: x\r\n", 0), None);
        // Empty lines before the request line are not the end of the headers.
        assert_eq!(head_end(b"\r\n\r\nGET", 0), None);
    }
}
