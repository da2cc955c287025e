//! `rediss://` against a redis-server of its own with TLS and client certificates, using a
//! throwaway CA made with the `openssl` command line.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use binder_redis::RedisConfig;
use stream_core::testing::skip;
use stream_core::{ConsumerOptions, ErrorKind, Message};

/// A TLS-only redis-server, killed (and its files removed) when dropped.
struct TlsRedis {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(dir: &Path, args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", args[0]));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn have(tool: &str, version_arg: &str) -> bool {
    Command::new(tool)
        .arg(version_arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, then the server.
fn start_tls_redis() -> TlsRedis {
    let dir = std::env::temp_dir().join(common::unique("tls"));
    std::fs::create_dir_all(&dir).unwrap();
    let days = "2";
    run(
        &dir,
        &[
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            days,
            "-subj",
            "/CN=stream-rs test CA",
        ],
    );
    for (name, usage, san) in [
        (
            "server",
            "serverAuth",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        ),
        ("client", "clientAuth", ""),
    ] {
        std::fs::write(
            dir.join(format!("{name}.ext")),
            format!("basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n{san}"),
        )
        .unwrap();
        run(
            &dir,
            &[
                "openssl",
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        run(
            &dir,
            &[
                "openssl",
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.crt"),
                "-days",
                days,
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--bind",
            "127.0.0.1",
            "--tls-port",
            &port.to_string(),
        ])
        .args([
            "--tls-cert-file",
            "server.crt",
            "--tls-key-file",
            "server.key",
        ])
        .args(["--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "yes"])
        .args(["--save", "", "--appendonly", "no", "--dir", "."])
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server starts");
    TlsRedis { child, dir, port }
}

/// With the test CA trusted and a client certificate, entries go through `rediss://`; without
/// the client certificate the server refuses, and without the CA the client refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca_and_client_certificate() {
    // The other Redis tests run where this one can: scripts/test.sh installs redis-server.
    if common::redis_url().is_none() {
        return;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if !have("openssl", "version") || !have("redis-server", "--version") {
        assert!(
            !ci,
            "the TLS test needs `openssl` and `redis-server` under CI=true"
        );
        skip("rediss_with_a_private_ca_and_client_certificate: openssl or redis-server missing");
        return;
    }
    let server = start_tls_redis();
    let url = format!("rediss://127.0.0.1:{}", server.port);
    let file = |name: &str| Some(server.dir.join(name));
    let config = |ca: bool, client: bool, attempts: u32| RedisConfig {
        tls_ca_file: if ca { file("ca.crt") } else { None },
        tls_cert_file: if client { file("client.crt") } else { None },
        tls_key_file: if client { file("client.key") } else { None },
        connect_attempts: attempts,
        connect_timeout: Duration::from_secs(2),
        ..RedisConfig::with_url(&url)
    };

    // Enough attempts to cover the server's start-up: the bounded retry is the wait.
    let binder = common::binder_with(config(true, true, 40));
    let stream = common::unique("tls");
    let consumer = binder
        .consumer(&stream, &ConsumerOptions::new("g"))
        .await
        .expect("TLS connection with the private CA and a client certificate");
    let id = binder
        .producer(&stream)
        .await
        .unwrap()
        .send(Message::new("over tls").with_key("k"))
        .await
        .unwrap();
    let got = common::receive_until(&*consumer, Duration::from_secs(10), "the entry", |g| {
        !g.is_empty()
    })
    .await;
    assert_eq!(got[0].message.id(), id);
    assert_eq!(&got[0].message.payload()[..], b"over tls");
    consumer.ack(&[got[0].tag]).await.unwrap();
    consumer.close().await.unwrap();

    let no_client_cert = common::binder_with(config(true, false, 1));
    let err = no_client_cert
        .producer(&stream)
        .await
        .err()
        .expect("mTLS required");
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(err.to_string().contains("ertificate"), "{err}");
    let untrusted = common::binder_with(config(false, true, 1));
    let err = untrusted
        .producer(&stream)
        .await
        .err()
        .expect("CA not trusted");
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(err.to_string().contains("certificate"), "{err}");
    assert!(err.message().contains(&url), "{err}");
}
