//! What the PostgreSQL parts share: connecting, and turning the client's errors into the
//! library's.

use std::str::FromStr;

use stream_core::{Error, ErrorKind, Result};
use tokio_postgres::{Client, NoTls};

/// Parses a `postgres://` URL or a `key=value` connection string.
pub(crate) fn parse_config(url: &str) -> Result<tokio_postgres::Config> {
    tokio_postgres::Config::from_str(url).map_err(|e| {
        // The text may hold a password: the error names the problem, not the string.
        Error::new(ErrorKind::Config, "invalid PostgreSQL connection string").with_source(e)
    })
}

/// Opens one connection and drives it on a task of its own.
pub(crate) async fn connect(config: &tokio_postgres::Config) -> Result<Client> {
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(|e| pg_error("connecting to PostgreSQL", e))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection ended");
        }
    });
    Ok(client)
}

/// The library's error for a failed PostgreSQL call: a dropped connection, a server going
/// down, a serialization conflict or a deadlock are temporary ([`ErrorKind::Connection`]);
/// anything else the server refused is [`ErrorKind::Broker`].
pub(crate) fn pg_error(doing: &str, error: tokio_postgres::Error) -> Error {
    let temporary = error.is_closed()
        || error.as_db_error().is_none()
        || error.code().is_some_and(|code| {
            let code = code.code();
            // 08: connection exceptions; 57P0x: the server shutting down or restarting;
            // 40001/40P01: serialization failure and deadlock, which succeed when retried.
            code.starts_with("08") || code.starts_with("57P0") || code.starts_with("40")
        });
    let kind = if temporary {
        ErrorKind::Connection
    } else {
        ErrorKind::Broker
    };
    Error::new(kind, format!("PostgreSQL: {doing}")).with_source(error)
}

/// A table name checked to be a plain (optionally schema-qualified) SQL identifier, since
/// it is written into statements.
#[derive(Debug, Clone)]
pub(crate) struct TableName(String);

impl TableName {
    pub(crate) fn new(name: &str) -> Result<TableName> {
        let valid = !name.is_empty()
            && name.split('.').count() <= 2
            && name.split('.').all(|part| {
                part.chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            });
        if !valid {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "table name `{name}` must be lowercase letters, digits and `_`, \
                     optionally schema-qualified"
                ),
            ));
        }
        Ok(TableName(name.to_owned()))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// The name without a schema, for the names of indexes and channels derived from it.
    pub(crate) fn bare(&self) -> &str {
        self.0.rsplit('.').next().unwrap_or(&self.0)
    }

    /// A 31-bit number derived from the name: the first key of the advisory locks taken
    /// for this table, so that two outbox tables never wait for each other.
    pub(crate) fn lock_class(&self, role: u32) -> i32 {
        // FNV-1a: stable across builds and platforms, unlike the std hasher.
        let mut hash: u32 = 0x811c_9dc5;
        for byte in self.0.bytes().chain(role.to_le_bytes()) {
            hash ^= u32::from(byte);
            hash = hash.wrapping_mul(0x0100_0193);
        }
        (hash & 0x7fff_ffff) as i32
    }
}
