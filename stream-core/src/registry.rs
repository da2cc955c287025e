//! Binder types known to a [`Streams`](crate::Streams), keyed by the `type` of the config file.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::binder::Binder;
use crate::config::deserialize_value;
use crate::Result;

type Factory = dyn Fn(BinderSettings) -> Result<Arc<dyn Binder>> + Send + Sync;

/// Maps binder types to the factories that build them. Binder crates add themselves with a
/// `register` function: `registry.register("redis", |settings| ...)`.
#[derive(Default, Clone)]
pub struct Registry {
    factories: BTreeMap<String, Arc<Factory>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// Registers `factory` for binders whose `type` is `kind`, replacing an earlier one.
    ///
    /// The factory checks its settings and builds the binder without network I/O; binders
    /// connect when the first producer or consumer is made.
    pub fn register<F>(&mut self, kind: &str, factory: F)
    where
        F: Fn(BinderSettings) -> Result<Arc<dyn Binder>> + Send + Sync + 'static,
    {
        self.factories.insert(kind.to_owned(), Arc::new(factory));
    }

    /// The registered types, sorted.
    pub fn kinds(&self) -> Vec<&str> {
        self.factories.keys().map(String::as_str).collect()
    }

    pub(crate) fn get(&self, kind: &str) -> Option<&Arc<Factory>> {
        self.factories.get(kind)
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("kinds", &self.kinds())
            .finish()
    }
}

/// The settings of one `[binders.NAME]` table, handed to that binder's factory.
#[derive(Clone)]
pub struct BinderSettings {
    name: String,
    origin: String,
    table: toml::Table,
}

impl BinderSettings {
    /// Settings for the binder `name`, read from `origin` (a file name, for errors).
    pub fn new(name: impl Into<String>, origin: impl Into<String>, table: toml::Table) -> Self {
        BinderSettings {
            name: name.into(),
            origin: origin.into(),
            table,
        }
    }

    /// The binder's name in the file.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Deserializes the settings into the binder's config type. Unknown keys are reported
    /// with the nearest valid name when the type uses `deny_unknown_fields`.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T> {
        deserialize_value(
            toml::Value::Table(self.table.clone()),
            &self.origin,
            &format!("binders.{}", self.name),
        )
    }
}

// Settings may hold secrets; only key names are shown.
impl fmt::Debug for BinderSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BinderSettings")
            .field("name", &self.name)
            .field("keys", &self.table.keys().collect::<Vec<_>>())
            .finish()
    }
}
