//! `stream`: operations on the bindings a configuration file names. It reads the same file
//! the services read (`--config FILE` or `STREAM_CONFIG`, with the same `STREAM_*`
//! environment overrides), so an operator names bindings, not broker addresses.
//!
//! The work is done by the library (`stream_core::admin`, `stream_core::dlq`); this binary
//! parses arguments and prints.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod commands;
mod show;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Inspect, tail, publish to and redrive the dead letters of the bindings of a
/// configuration file, on Redis and Kafka.
#[derive(Debug, Parser)]
#[command(
    name = "stream",
    version,
    after_help = "Example:\n  stream --config streams.toml inspect payments-in"
)]
struct Cli {
    /// The configuration file the services use.
    #[arg(long, global = true, env = "STREAM_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every binding with its binder, destination, group and policies.
    #[command(after_help = "Example:\n  stream --config streams.toml bindings")]
    Bindings,

    /// A binding's destination: length, retained range, groups with lag and pending work,
    /// their consumers, and the size of its dead-letter destination.
    #[command(after_help = "Example:\n  stream inspect payments-in")]
    Inspect {
        /// The binding.
        binding: String,
    },

    /// Reads a binding's destination without joining its group and without acknowledging
    /// anything: key, headers and payload of each message.
    #[command(
        after_help = "Example:\n  stream tail payments-in --from earliest --count 20 --format pretty"
    )]
    Tail {
        /// The binding.
        binding: String,
        /// Where to start.
        #[arg(long, value_enum, default_value_t = From::Latest)]
        from: From,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<usize>,
        /// Keep reading as messages arrive (until Ctrl-C or `--count`).
        #[arg(long)]
        follow: bool,
        /// How to print each message.
        #[arg(long, value_enum, default_value_t = show::Format::Pretty)]
        format: show::Format,
    },

    /// Publishes one JSON message, or newline-delimited JSON from a file or stdin, to a
    /// binding, with the content-type header the library sets.
    #[command(
        after_help = "Examples:\n  stream publish orders-out --key o-1 '{\"order_id\":\"o-1\",\"amount_cents\":500}'\n  stream publish orders-out --file orders.ndjson\n  cat orders.ndjson | stream publish orders-out -"
    )]
    Publish {
        /// The binding.
        binding: String,
        /// The message key; with a file or stdin, every message gets it.
        #[arg(long)]
        key: Option<String>,
        /// A header `name=value`; repeat for more.
        #[arg(long = "header", value_name = "NAME=VALUE")]
        headers: Vec<String>,
        /// Newline-delimited JSON to publish, one message per line.
        #[arg(long, value_name = "FILE", conflicts_with = "json")]
        file: Option<PathBuf>,
        /// The JSON payload, or `-` for newline-delimited JSON on stdin.
        json: Option<String>,
    },

    /// Publishes the events of a PostgreSQL transactional outbox (`stream-outbox`) through
    /// the bindings they name, until Ctrl-C or SIGTERM; the batch in hand is finished first.
    /// Several relays may run on one table.
    #[command(
        after_help = "Example:\n  stream --config streams.toml relay --postgres postgres://app@db/orders"
    )]
    Relay {
        /// The database (`postgres://user:password@host:port/db`).
        #[arg(
            long,
            env = "STREAM_OUTBOX_POSTGRES",
            value_name = "URL",
            hide_env_values = true
        )]
        postgres: String,
        /// The outbox table.
        #[arg(long, default_value = stream_outbox::DEFAULT_TABLE)]
        table: String,
        /// Events claimed per batch.
        #[arg(long, default_value_t = 500)]
        batch_size: usize,
    },

    /// Dead letters: list, send back, purge.
    #[command(after_help = "Example:\n  stream dlq list payments-in")]
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// Dead letters of a binding with their reason, attempts, origin and time.
    #[command(after_help = "Example:\n  stream dlq list payments-in --count 20")]
    List {
        /// The binding whose dead letters to list.
        binding: String,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        count: usize,
    },

    /// Sends dead letters back to their original destination (attempts start again from 1,
    /// key and headers kept, the redrive recorded in `x-redrive-count` and `x-redriven-at`),
    /// removing each from the dead-letter destination only after the broker accepted it.
    #[command(
        after_help = "Examples:\n  stream dlq redrive payments-in --dry-run\n  stream dlq redrive payments-in --filter x-error-kind=handler --limit 100"
    )]
    Redrive {
        /// The binding whose dead letters to send back.
        binding: String,
        /// Only dead letters with this header value.
        #[arg(long, value_name = "HEADER=VALUE")]
        filter: Option<String>,
        /// At most this many.
        #[arg(long)]
        limit: Option<usize>,
        /// Show what would be sent back; send and remove nothing.
        #[arg(long)]
        dry_run: bool,
    },

    /// Removes dead letters older than a duration.
    #[command(after_help = "Example:\n  stream dlq purge payments-in --older-than 7d --yes")]
    Purge {
        /// The binding whose dead letters to remove.
        binding: String,
        /// Only those older than this (`30m`, `7d`); default: all.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        older_than: Option<std::time::Duration>,
        /// Confirms the removal.
        #[arg(long)]
        yes: bool,
    },
}

/// Where `tail` starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum From {
    /// The oldest message held.
    Earliest,
    /// Only messages published from now on.
    Latest,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", show::one_line(&e));
            ExitCode::FAILURE
        }
    }
}
