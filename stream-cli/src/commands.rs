//! What each command does, on the library's `Streams`, `admin` and `dlq` APIs.

use std::io::BufRead;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use stream_core::admin::{Admin, ReadFrom};
use stream_core::dlq::Redrive;
use stream_core::{Error, ErrorKind, Result, Streams};

use crate::show::{self, Table};
use crate::{Cli, Command, DlqCommand, From};

/// Runs the command of `cli`.
pub async fn run(cli: Cli) -> Result<()> {
    let streams = load(cli.config.as_deref())?;
    let outcome = match cli.command {
        Command::Bindings => bindings(&streams),
        Command::Inspect { binding } => inspect(&streams, &binding).await,
        Command::Tail {
            binding,
            from,
            count,
            follow,
            format,
        } => tail(&streams, &binding, from, count, follow, format).await,
        Command::Publish {
            binding,
            key,
            headers,
            file,
            json,
        } => publish(&streams, &binding, key, &headers, file, json).await,
        Command::Dlq { command } => dlq(&streams, command).await,
        Command::Relay {
            postgres,
            table,
            batch_size,
        } => relay(&streams, &postgres, &table, batch_size).await,
    };
    // Sends made by the command are accepted already; closing releases the connections.
    let closed = streams.close().await;
    outcome.and(closed)
}

async fn relay(streams: &Streams, postgres: &str, table: &str, batch_size: usize) -> Result<()> {
    let outbox = stream_outbox::Outbox::with_table(table)?;
    let relay = stream_outbox::Relay::new(outbox.reader(postgres)?, streams.clone())
        .with_config(stream_outbox::RelayConfig {
            batch_size,
            ..Default::default()
        })
        .spawn();
    eprintln!("relaying outbox table {table}; Ctrl-C or SIGTERM stops");
    stopped().await;
    eprintln!("stopping: finishing the batch in hand");
    relay.shutdown().await
}

/// Ctrl-C or SIGTERM (what a container runtime sends on stop).
async fn stopped() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn load(path: Option<&std::path::Path>) -> Result<Streams> {
    let Some(path) = path else {
        return Err(Error::new(
            ErrorKind::Config,
            "no configuration file: pass --config FILE or set STREAM_CONFIG",
        ));
    };
    Streams::builder()
        .register(binder_memory::register)
        .register(binder_redis::register)
        .register(binder_kafka::register)
        .load_file(path)
}

fn bindings(streams: &Streams) -> Result<()> {
    let config = streams.config();
    let mut table = Table::new([
        "BINDING",
        "BINDER",
        "DESTINATION",
        "GROUP",
        "CONCURRENCY",
        "PREFETCH",
        "ATTEMPTS",
        "DEAD-LETTER",
    ]);
    for (name, binding) in &config.bindings {
        let binder = binding
            .binder
            .clone()
            .or_else(|| config.default_binder.clone())
            .unwrap_or_default();
        let kind = config.binders.get(&binder).map_or("", |b| b.kind.as_str());
        table.row([
            name.clone(),
            format!("{binder} ({kind})"),
            binding.destination.clone(),
            binding.group.clone().unwrap_or_else(|| "-".into()),
            binding.concurrency.to_string(),
            binding.prefetch.to_string(),
            binding.retry.max_attempts.to_string(),
            binding.dead_letter_destination(),
        ]);
    }
    table.print();
    Ok(())
}

/// The binding's admin access, with the binding named in any error.
async fn admin(streams: &Streams, binding: &str) -> Result<(std::sync::Arc<dyn Admin>, String)> {
    let channel = streams.channel(binding)?;
    let admin = channel
        .binder()
        .admin()
        .await
        .map_err(|e| named(binding, e))?;
    Ok((admin, channel.config().destination.clone()))
}

fn named(binding: &str, e: Error) -> Error {
    Error::new(e.kind(), format!("binding `{binding}`: {}", e.message())).with_source(e)
}

async fn inspect(streams: &Streams, binding: &str) -> Result<()> {
    let (admin, destination) = admin(streams, binding).await?;
    // The groups of every binding on this destination: Kafka reports only those and the
    // groups with live members, not every group of its cluster.
    let known: Vec<String> = streams
        .config()
        .bindings
        .values()
        .filter(|b| b.destination == destination)
        .filter_map(|b| b.group.clone())
        .collect();
    let report = admin
        .inspect(&destination, &known)
        .await
        .map_err(|e| named(binding, e))?;
    let dlq = streams.channel(binding)?.config().dead_letter_destination();
    let dead = admin
        .inspect(&dlq, &[])
        .await
        .map_err(|e| named(binding, e))?;
    show::report(binding, &destination, &report, &dlq, &dead);
    Ok(())
}

async fn tail(
    streams: &Streams,
    binding: &str,
    from: From,
    count: Option<usize>,
    follow: bool,
    format: show::Format,
) -> Result<()> {
    let (admin, destination) = admin(streams, binding).await?;
    let mut position = match from {
        From::Earliest => ReadFrom::Earliest,
        From::Latest => ReadFrom::Latest,
    };
    let limit = count.unwrap_or(usize::MAX);
    let mut shown = 0;
    let mut interrupted = std::pin::pin!(tokio::signal::ctrl_c());
    while shown < limit {
        let read = admin
            .read(&destination, &position, (limit - shown).min(100))
            .await
            .map_err(|e| named(binding, e))?;
        let empty = read.messages.is_empty();
        for stored in &read.messages {
            show::message(stored, format);
        }
        shown += read.messages.len();
        position = ReadFrom::Cursor(read.next);
        if empty {
            if !follow {
                break;
            }
            tokio::select! {
                _ = &mut interrupted => break,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }
    Ok(())
}

async fn publish(
    streams: &Streams,
    binding: &str,
    key: Option<String>,
    headers: &[String],
    file: Option<std::path::PathBuf>,
    json: Option<String>,
) -> Result<()> {
    let headers = headers
        .iter()
        .map(|pair| {
            pair.split_once('=').ok_or_else(|| {
                Error::new(
                    ErrorKind::Config,
                    format!("header `{pair}` is not NAME=VALUE"),
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let source = streams
        .source::<Value>(binding)
        .await
        .map_err(|e| named(binding, e))?;
    let send = |value: Value| {
        let source = &source;
        let key = key.clone();
        let headers = &headers;
        async move {
            let mut message = source.encode(&value)?;
            if let Some(key) = key {
                message = message.with_key(key);
            }
            for (name, value) in headers {
                message = message.with_header(*name, *value);
            }
            source.send_message(message).await
        }
    };
    let lines: Box<dyn Iterator<Item = std::io::Result<String>>> = match (file, json.as_deref()) {
        (Some(path), _) => {
            let file = std::fs::File::open(&path).map_err(|e| {
                Error::new(ErrorKind::Config, format!("cannot read {}", path.display()))
                    .with_source(e)
            })?;
            Box::new(std::io::BufReader::new(file).lines())
        }
        (None, Some("-")) => Box::new(std::io::stdin().lock().lines()),
        (None, Some(json)) => {
            let value = parse(json, None)?;
            let id = send(value).await.map_err(|e| named(binding, e))?;
            println!("published {id}");
            return Ok(());
        }
        (None, None) => {
            return Err(Error::new(
                ErrorKind::Config,
                "nothing to publish: give the JSON, --file FILE, or - for stdin",
            ))
        }
    };
    let bar = ProgressBar::new_spinner().with_style(
        ProgressStyle::with_template("{spinner} {pos} published ({per_sec})")
            .expect("a valid template"),
    );
    let mut published = 0u64;
    for (number, line) in lines.enumerate() {
        let line = line
            .map_err(|e| Error::new(ErrorKind::Config, "cannot read the input").with_source(e))?;
        if line.trim().is_empty() {
            continue;
        }
        let value = parse(&line, Some(number + 1))?;
        send(value).await.map_err(|e| {
            named(
                binding,
                Error::new(e.kind(), format!("line {}: {}", number + 1, e.message())),
            )
        })?;
        published += 1;
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!("published {published} messages to `{binding}`");
    Ok(())
}

fn parse(text: &str, line: Option<usize>) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| {
        let at = line.map(|n| format!("line {n}: ")).unwrap_or_default();
        Error::new(ErrorKind::Codec, format!("{at}not JSON: {e}"))
    })
}

async fn dlq(streams: &Streams, command: DlqCommand) -> Result<()> {
    match command {
        DlqCommand::List { binding, count } => {
            let dead = streams
                .dead_letters(&binding)
                .await
                .map_err(|e| named(&binding, e))?;
            let letters = dead.list(count).await.map_err(|e| named(&binding, e))?;
            show::dead_letters(dead.destination(), &letters);
        }
        DlqCommand::Redrive {
            binding,
            filter,
            limit,
            dry_run,
        } => {
            let filter = match filter {
                Some(pair) => Some(
                    pair.split_once('=')
                        .map(|(n, v)| (n.to_owned(), v.to_owned()))
                        .ok_or_else(|| {
                            Error::new(
                                ErrorKind::Config,
                                format!("filter `{pair}` is not HEADER=VALUE"),
                            )
                        })?,
                ),
                None => None,
            };
            let dead = streams
                .dead_letters(&binding)
                .await
                .map_err(|e| named(&binding, e))?;
            let bar = ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template("{spinner} {pos} sent back ({per_sec})")
                    .expect("a valid template"),
            );
            let options = Redrive {
                filter,
                limit,
                dry_run,
            };
            let summary = dead
                .redrive(&options, |letter| {
                    if dry_run {
                        bar.suspend(|| println!("would send back {}", letter.stored.position));
                    }
                    bar.inc(1);
                })
                .await
                .map_err(|e| named(&binding, e))?;
            bar.finish_and_clear();
            let verb = if dry_run {
                "would send back"
            } else {
                "sent back"
            };
            println!(
                "{verb} {} dead letters of `{binding}` ({} left by the filter)",
                summary.redriven, summary.skipped
            );
        }
        DlqCommand::Purge {
            binding,
            older_than,
            yes,
        } => {
            if !yes {
                return Err(Error::new(
                    ErrorKind::Config,
                    "purging removes dead letters for good: add --yes to confirm",
                ));
            }
            let dead = streams
                .dead_letters(&binding)
                .await
                .map_err(|e| named(&binding, e))?;
            let removed = dead
                .purge(older_than.unwrap_or(Duration::ZERO))
                .await
                .map_err(|e| named(&binding, e))?;
            match removed {
                Some(n) => println!("removed {n} dead letters from `{}`", dead.destination()),
                None => println!("removed the dead letters from `{}`", dead.destination()),
            }
        }
    }
    Ok(())
}
