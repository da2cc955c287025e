//! [`Streams`]: every binder and binding of one configuration file.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde::{de::DeserializeOwned, Serialize};

use crate::binder::Binder;
use crate::channel::Channel;
use crate::config::{nearest, Config};
use crate::dedup::DedupStore;
use crate::health::{BinderHealth, Health, Subscriptions};
use crate::registry::{BinderSettings, Registry};
use crate::sink::Sink;
use crate::source::Source;
use crate::{Error, ErrorKind, Result};

/// The prefix of environment overrides (`STREAM_DEFAULT_BINDER=kafka`).
pub const ENV_PREFIX: &str = "STREAM";

/// The longest [`Streams::health`] waits for one broker to answer.
pub const PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The binders and bindings of a configuration file, ready to hand out sources and sinks.
///
/// Binder crates add their types with `register`; the file picks one per binding:
///
/// ```
/// use stream_core::{ErrorKind, Streams};
///
/// let err = Streams::builder()
///     .env(Vec::<(String, String)>::new())
///     .load_str("[binders.main]\ntype = \"kafak\"\n")
///     .unwrap_err();
/// assert_eq!(err.kind(), ErrorKind::UnknownBinderType);
/// assert!(err.message().contains("unknown type `kafak`"));
/// ```
///
/// The `binder-memory` crate documentation shows a full round trip.
#[derive(Clone)]
pub struct Streams {
    inner: Arc<Inner>,
}

struct Inner {
    origin: String,
    config: Config,
    binders: BTreeMap<String, Arc<dyn Binder>>,
    dedup_stores: BTreeMap<String, Arc<dyn DedupStore>>,
    closed: std::sync::atomic::AtomicBool,
    subscriptions: Arc<Subscriptions>,
}

impl Streams {
    /// Starts building from a configuration.
    pub fn builder() -> StreamsBuilder {
        StreamsBuilder::default()
    }

    /// The named binding. Fails with [`ErrorKind::Closed`] after [`close`](Streams::close).
    pub fn channel(&self, binding: &str) -> Result<Channel> {
        let inner = &*self.inner;
        if inner.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Closed,
                format!(
                    "the streams of {} are closed; binding `{binding}` is not available",
                    inner.origin
                ),
            ));
        }
        let Some(config) = inner.config.bindings.get(binding) else {
            let names: Vec<&str> = inner.config.bindings.keys().map(String::as_str).collect();
            let hint = match nearest(binding, &names) {
                Some(best) => format!("; did you mean `{best}`?"),
                None if names.is_empty() => "; it defines no bindings".to_owned(),
                None => format!("; it defines: {}", names.join(", ")),
            };
            return Err(Error::new(
                ErrorKind::MissingBinding,
                format!("no binding `{binding}` in {}{hint}", inner.origin),
            ));
        };
        let binder_name = binder_of(&inner.config, config.binder.as_deref());
        let binder = binder_name
            .and_then(|name| inner.binders.get(name))
            .cloned()
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Config,
                    format!("bindings.{binding} in {} names no binder", inner.origin),
                )
            })?;
        let mut channel = Channel::new(binding, binder, config.clone());
        channel.subscriptions = Some(inner.subscriptions.clone());
        if let Some(dedup) = &config.dedup {
            let store = dedup_store(&inner.dedup_stores, &inner.binders, &dedup.store)
                .ok_or_else(|| unknown_dedup_store(&inner.origin, binding, &dedup.store))?;
            channel = channel.dedup_store(store);
        }
        Ok(channel)
    }

    /// Whether each binder's broker answers (checked now, at most [`PING_TIMEOUT`] each, all
    /// at once) and what each live subscription made through these streams is doing. Cheap
    /// enough for a readiness probe: one round trip per binder.
    pub async fn health(&self) -> Health {
        let checks = self.inner.binders.iter().map(|(name, binder)| async move {
            let started = std::time::Instant::now();
            let error = match tokio::time::timeout(PING_TIMEOUT, binder.ping()).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!("no answer within {PING_TIMEOUT:?}")),
            };
            BinderHealth {
                name: name.clone(),
                kind: binder.kind(),
                latency: started.elapsed(),
                error,
            }
        });
        Health {
            binders: futures::future::join_all(checks).await,
            subscriptions: self.inner.subscriptions.health(),
        }
    }

    /// A JSON source for the named binding.
    pub async fn source<T>(&self, binding: &str) -> Result<Source<T>>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        self.channel(binding)?.source().await
    }

    /// A JSON sink for the named binding.
    pub fn sink<T>(&self, binding: &str) -> Result<Sink<T>>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
    {
        Ok(self.channel(binding)?.sink())
    }

    /// The binder declared under `name`.
    pub fn binder(&self, name: &str) -> Option<Arc<dyn Binder>> {
        self.inner.binders.get(name).cloned()
    }

    /// The parsed configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Closes every binder. Afterwards no new source, sink or channel can be made: those
    /// calls, and binders' `producer` and `consumer`, fail with [`ErrorKind::Closed`] on
    /// every binder. Sources and subscriptions made before stay usable until they are closed
    /// themselves, so a service closes them (shuts its subscriptions down, flushes its
    /// sources) before or after this, in any order. Every binder is closed even if one
    /// fails; the first failure is returned.
    pub async fn close(&self) -> Result<()> {
        self.inner
            .closed
            .store(true, std::sync::atomic::Ordering::Release);
        let mut first = None;
        for (name, binder) in &self.inner.binders {
            if let Err(e) = binder.close().await {
                tracing::warn!(binder = %name, error = %e, "closing binder failed");
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl fmt::Debug for Streams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Streams")
            .field("origin", &self.inner.origin)
            .field("binders", &self.inner.binders.keys().collect::<Vec<_>>())
            .field(
                "bindings",
                &self.inner.config.bindings.keys().collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn binder_of<'a>(config: &'a Config, named: Option<&'a str>) -> Option<&'a str> {
    named.or(config.default_binder.as_deref()).or_else(|| {
        (config.binders.len() == 1).then(|| config.binders.keys().next().map(String::as_str))?
    })
}

/// Builds a [`Streams`]: registered binder types, optional ready-made binders, then a file.
#[derive(Default)]
pub struct StreamsBuilder {
    registry: Registry,
    instances: BTreeMap<String, Arc<dyn Binder>>,
    dedup_stores: BTreeMap<String, Arc<dyn DedupStore>>,
    env: Option<Vec<(String, String)>>,
}

impl StreamsBuilder {
    /// Runs a binder crate's registration function, such as `binder_redis::register`.
    pub fn register(mut self, register: impl FnOnce(&mut Registry)) -> Self {
        register(&mut self.registry);
        self
    }

    /// Uses `binder` for the binder named `name`, instead of building one from the file.
    /// Tests use this to keep a handle on an in-memory binder.
    pub fn binder(mut self, name: impl Into<String>, binder: impl Binder) -> Self {
        self.instances.insert(name.into(), Arc::new(binder));
        self
    }

    /// Names a store of handled message ids, for the `dedup = { store = "NAME" }` of
    /// bindings: a store that is not a binder's, such as the PostgreSQL one of
    /// `stream-outbox`.
    pub fn dedup_store(mut self, name: impl Into<String>, store: impl DedupStore) -> Self {
        self.dedup_stores.insert(name.into(), Arc::new(store));
        self
    }

    /// Reads overrides from these pairs instead of the process environment.
    pub fn env<I, K, V>(mut self, vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        self.env = Some(
            vars.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        );
        self
    }

    /// Loads a TOML file.
    pub fn load_file(self, path: impl AsRef<Path>) -> Result<Streams> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("cannot read configuration file {}", path.display()),
            )
            .with_source(e)
        })?;
        self.load(&text, &path.display().to_string())
    }

    /// Loads TOML text.
    pub fn load_str(self, text: &str) -> Result<Streams> {
        self.load(text, "<inline config>")
    }

    fn load(self, text: &str, origin: &str) -> Result<Streams> {
        let env = self.env.unwrap_or_else(|| std::env::vars().collect());
        let config = Config::parse(text, origin, ENV_PREFIX, env)?;
        let mut binders = self.instances;
        for (name, declared) in &config.binders {
            if binders.contains_key(name) {
                continue;
            }
            let binder = build(
                &self.registry,
                name,
                &declared.kind,
                &declared.settings,
                origin,
            )?;
            binders.insert(name.clone(), binder);
        }
        // A binding may name a binder type that is not declared: it gets one with defaults.
        let referenced = config
            .bindings
            .iter()
            .map(|(binding, b)| (binding.as_str(), binder_of(&config, b.binder.as_deref())));
        for (binding, name) in referenced {
            let Some(name) = name else {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "{origin}: bindings.{binding} names no binder and there is no \
                         `default-binder`"
                    ),
                ));
            };
            if binders.contains_key(name) {
                continue;
            }
            if self.registry.get(name).is_none() {
                let declared: Vec<&str> = config.binders.keys().map(String::as_str).collect();
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "{origin}: bindings.{binding} uses binder `{name}`, which is neither \
                         declared under [binders] (declared: {}) nor a registered type ({})",
                        list(&declared),
                        list(&self.registry.kinds()),
                    ),
                ));
            }
            let binder = build(&self.registry, name, name, &toml::Table::new(), origin)?;
            binders.insert(name.to_owned(), binder);
        }
        // Each binding is checked against its binder's abilities now, not at first use.
        for (binding, declared) in &config.bindings {
            if let Some(binder) =
                binder_of(&config, declared.binder.as_deref()).and_then(|name| binders.get(name))
            {
                binder
                    .check_binding(binding, declared)
                    .map_err(|e| Error::new(e.kind(), format!("{origin}: {}", e.message())))?;
            }
        }
        for (binding, declared) in &config.bindings {
            if let Some(dedup) = &declared.dedup {
                if dedup_store(&self.dedup_stores, &binders, &dedup.store).is_none() {
                    return Err(unknown_dedup_store(origin, binding, &dedup.store));
                }
            }
        }
        Ok(Streams {
            inner: Arc::new(Inner {
                origin: origin.to_owned(),
                config,
                binders,
                dedup_stores: self.dedup_stores,
                closed: Default::default(),
                subscriptions: Arc::default(),
            }),
        })
    }
}

/// The store a binding's `dedup` names: `memory`, a store given to the builder, or a
/// binder that keeps ids.
fn dedup_store(
    stores: &BTreeMap<String, Arc<dyn DedupStore>>,
    binders: &BTreeMap<String, Arc<dyn Binder>>,
    name: &str,
) -> Option<Arc<dyn DedupStore>> {
    if name == "memory" {
        return Some(crate::dedup::MEMORY.clone());
    }
    stores
        .get(name)
        .cloned()
        .or_else(|| binders.get(name)?.dedup_store())
}

fn unknown_dedup_store(origin: &str, binding: &str, store: &str) -> Error {
    Error::new(
        ErrorKind::Config,
        format!(
            "{origin}: bindings.{binding}: dedup store `{store}` is neither `memory`, a store \
             given to `StreamsBuilder::dedup_store`, nor a binder that keeps message ids (Redis)"
        ),
    )
}

fn list(items: &[&str]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

fn build(
    registry: &Registry,
    name: &str,
    kind: &str,
    settings: &toml::Table,
    origin: &str,
) -> Result<Arc<dyn Binder>> {
    let Some(factory) = registry.get(kind) else {
        let kinds = registry.kinds();
        let hint = nearest(kind, &kinds)
            .map(|best| format!(" (did you mean `{best}`?)"))
            .unwrap_or_default();
        return Err(Error::new(
            ErrorKind::UnknownBinderType,
            format!(
                "{origin}: binders.{name} has unknown type `{kind}`{hint}; registered types: {}",
                list(&kinds)
            ),
        ));
    };
    factory(BinderSettings::new(name, origin, settings.clone()))
}
