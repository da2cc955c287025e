//! Which configuration file the services load: `--config FILE`, else `STREAM_CONFIG`, else
//! the built-in in-memory one; and where they serve `/metrics` and `/healthz`: `--http ADDR`,
//! else `SERVICE_HTTP_ADDR`, else nowhere.
//!
//! A file may have a `[postgres]` table of the services' own (`url = "postgres://..."`,
//! overridden by `DATABASE_URL`): the order service then keeps its orders there and
//! publishes through the transactional outbox, and bindings may name `dedup = { store =
//! "postgres" }`. Without it, both live in memory.

use std::path::{Path, PathBuf};

use stream_core::{Error, ErrorKind, Result, Streams};

/// The configuration used when neither `--config` nor `STREAM_CONFIG` names a file.
pub const BUILT_IN: &str = include_str!("../config/memory.toml");

/// Environment variable naming the configuration file.
pub const CONFIG_ENV: &str = "STREAM_CONFIG";

/// Environment variable naming the address of the `/metrics` and `/healthz` endpoints.
pub const HTTP_ADDR_ENV: &str = "SERVICE_HTTP_ADDR";

/// Registers every binder type the examples can run on.
pub fn builder() -> stream_core::StreamsBuilder {
    Streams::builder()
        .register(binder_memory::register)
        .register(binder_redis::register)
        .register(binder_kafka::register)
}

/// Loads `path`, else the file named by `STREAM_CONFIG`, else [`BUILT_IN`].
pub fn load(path: Option<&Path>) -> Result<Streams> {
    let from_env = std::env::var_os(CONFIG_ENV).map(PathBuf::from);
    match path.map(Path::to_path_buf).or(from_env) {
        Some(path) => builder().load_file(path),
        None => builder().load_str(BUILT_IN),
    }
}

/// The environment variable that overrides `[postgres] url`.
pub const DATABASE_URL_ENV: &str = "DATABASE_URL";

/// What the services run on: the streams, and the database when the file names one.
pub struct Services {
    /// The bindings.
    pub streams: Streams,
    /// The `[postgres]` URL (or `DATABASE_URL`), if the file has that table.
    pub database: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Postgres {
    url: String,
}

/// Like [`load`], and a file's `[postgres]` table: its URL, and its `postgres` dedup store
/// registered for the bindings.
pub async fn open(path: Option<&Path>) -> Result<Services> {
    let from_env = std::env::var_os(CONFIG_ENV).map(PathBuf::from);
    match path.map(Path::to_path_buf).or(from_env) {
        Some(path) => open_file(&path, std::env::vars().collect()).await,
        None => Ok(Services {
            streams: builder().load_str(BUILT_IN)?,
            database: None,
        }),
    }
}

/// Loads `path` with `env` in place of the process environment (the `STREAM_*` overrides
/// and `DATABASE_URL`).
pub async fn open_file(path: &Path, env: Vec<(String, String)>) -> Result<Services> {
    let invalid = |e: &dyn std::fmt::Display| {
        Error::new(ErrorKind::Config, format!("{}: {e}", path.display()))
    };
    let text = std::fs::read_to_string(path).map_err(|e| invalid(&e))?;
    let mut table: toml::Table = toml::from_str(&text).map_err(|e| invalid(&e))?;
    let Some(postgres) = table.remove("postgres") else {
        return Ok(Services {
            streams: builder().env(env).load_file(path)?,
            database: None,
        });
    };
    let postgres: Postgres = postgres
        .try_into()
        .map_err(|e| invalid(&format_args!("[postgres]: {e}")))?;
    let url = env
        .iter()
        .find(|(name, _)| name == DATABASE_URL_ENV)
        .map_or(postgres.url, |(_, url)| url.clone());
    let dedup = stream_outbox::PgDedup::connect(&url).await?;
    let rest = toml::to_string(&table).map_err(|e| invalid(&e))?;
    Ok(Services {
        streams: builder()
            .env(env)
            .dedup_store("postgres", dedup)
            .load_str(&rest)?,
        database: Some(url),
    })
}

/// Reads `--config FILE` and `--NAME VALUE` options from the command line.
pub struct Args {
    pairs: Vec<(String, String)>,
}

impl Args {
    /// Parses `std::env::args`, exiting with a usage message on anything else.
    pub fn parse(usage: &str) -> Args {
        let mut pairs = Vec::new();
        let mut args = std::env::args().skip(1);
        while let Some(flag) = args.next() {
            let (Some(name), Some(value)) = (flag.strip_prefix("--"), args.next()) else {
                eprintln!("usage: {usage}");
                std::process::exit(2);
            };
            pairs.push((name.to_owned(), value));
        }
        Args { pairs }
    }

    /// The value of `--name`, if given.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The value of `--name` as a number, or `default`.
    pub fn number(&self, name: &str, default: u64) -> u64 {
        self.get(name).map_or(default, |v| {
            v.parse().unwrap_or_else(|_| {
                eprintln!("--{name} takes a number, got `{v}`");
                std::process::exit(2)
            })
        })
    }

    /// The configuration file named by `--config`.
    pub fn config(&self) -> Option<PathBuf> {
        self.get("config").map(PathBuf::from)
    }

    /// Where to serve `/metrics` and `/healthz`: `--http ADDR`, else [`HTTP_ADDR_ENV`];
    /// `None` (no endpoints) when neither is set or the value is empty. Port 0 picks a free
    /// port, which the service prints.
    pub fn http_addr(&self) -> Option<String> {
        let addr = match self.get("http") {
            Some(addr) => addr.to_owned(),
            None => std::env::var(HTTP_ADDR_ENV).ok()?,
        };
        let addr = addr.trim();
        (!addr.is_empty()).then(|| addr.to_owned())
    }
}
