//! [`Channel`]: one named binding, from which sources and sinks are made.

use std::fmt;
use std::sync::Arc;

use serde::{de::DeserializeOwned, Serialize};

use crate::binder::{Binder, Producer};
use crate::codec::{Codec, Json};
use crate::config::BindingConfig;
use crate::health::Subscriptions;
use crate::partition::Partitioned;
use crate::sink::Sink;
use crate::source::Source;
use crate::Result;

/// One binding: a destination on a binder, with its group and policies.
#[derive(Clone)]
pub struct Channel {
    pub(crate) name: Arc<str>,
    pub(crate) binder: Arc<dyn Binder>,
    pub(crate) config: Arc<BindingConfig>,
    /// Where subscriptions register for [`Streams::health`](crate::Streams::health); none for
    /// a channel built in code.
    pub(crate) subscriptions: Option<Arc<Subscriptions>>,
    /// The binding's `dedup` store, once resolved.
    pub(crate) dedup: Option<Arc<dyn crate::dedup::DedupStore>>,
}

impl Channel {
    /// A binding without a configuration file, for code and tests that build their own.
    pub fn new(name: &str, binder: Arc<dyn Binder>, config: BindingConfig) -> Channel {
        let dedup = match &config.dedup {
            Some(dedup) if dedup.store == "memory" => {
                Some(crate::dedup::MEMORY.clone() as Arc<dyn crate::dedup::DedupStore>)
            }
            _ => None,
        };
        Channel {
            name: name.into(),
            binder,
            config: Arc::new(config),
            subscriptions: None,
            dedup,
        }
    }

    /// Uses `store` for the binding's `dedup` (the store a configuration file names is set
    /// by [`Streams`](crate::Streams); a channel built in code sets its own).
    pub fn dedup_store(mut self, store: Arc<dyn crate::dedup::DedupStore>) -> Self {
        self.dedup = Some(store);
        self
    }

    /// The binding's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The binding's settings.
    pub fn config(&self) -> &BindingConfig {
        &self.config
    }

    /// The binder behind the binding.
    pub fn binder(&self) -> &Arc<dyn Binder> {
        &self.binder
    }

    /// A source that publishes JSON.
    pub async fn source<T>(&self) -> Result<Source<T>>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        self.source_with(Json::new()).await
    }

    /// A source with another codec.
    pub async fn source_with<T: 'static>(&self, codec: impl Codec<T>) -> Result<Source<T>> {
        // A binding built in code has not been through the file's checks.
        self.config.validate(&self.name)?;
        self.binder.check_binding(&self.name, &self.config)?;
        let producer: Arc<dyn Producer> = match self.config.partitions {
            Some(partitions) => Arc::new(
                Partitioned::open(&*self.binder, &self.config.destination, partitions).await?,
            ),
            None => self.binder.producer(&self.config.destination).await?.into(),
        };
        Ok(Source::new(
            producer,
            Arc::new(codec),
            &self.name,
            &self.config.destination,
            self.config.max_payload_bytes,
        ))
    }

    /// A sink that reads JSON. Nothing connects until it is subscribed or streamed.
    pub fn sink<T>(&self) -> Sink<T>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
    {
        self.sink_with(Json::new())
    }

    /// A sink with another codec.
    pub fn sink_with<T: Send + 'static>(&self, codec: impl Codec<T>) -> Sink<T> {
        Sink::new(self.clone(), Arc::new(codec))
    }
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("name", &self.name)
            .field("binder", &self.binder.kind())
            .field("config", &self.config)
            .finish()
    }
}
