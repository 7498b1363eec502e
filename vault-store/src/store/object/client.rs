//! Opening an [`ObjectStoreCopy`]: the client a store URL names (its
//! credentials from the environment), the I/O runtime, and sub-prefixes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use object_store::ObjectStore;

use super::reason::short_reason;
use super::window::WindowCache;
use super::{ObjectStoreCopy, Shared0};
use crate::error::{Result, StoreError};
use crate::format::remote::{Service, StoreUrl};

impl ObjectStoreCopy {
    /// Opens the store a URL names. Credentials come from each service's
    /// usual environment variables, as the `object_store` builders read
    /// them (`AZURE_STORAGE_ACCOUNT_KEY`, `AZURE_STORAGE_USE_EMULATOR`
    /// with `AZURITE_BLOB_STORAGE_URL`; `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`, …).
    pub fn open(url: &str) -> Result<ObjectStoreCopy> {
        let parsed = StoreUrl::parse(url).map_err(|reason| StoreError::InvalidSetting {
            field: "store URL",
            reason,
        })?;
        let fail = |e: object_store::Error| StoreError::Object {
            url: url.to_string(),
            op: "configure",
            reason: short_reason(&e.to_string()),
        };
        let inner: Arc<dyn ObjectStore> = match parsed.service {
            Service::Azure => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_account(&parsed.account)
                    .with_container_name(&parsed.container)
                    .build()
                    .map_err(fail)?,
            ),
            Service::S3 => Arc::new(
                object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(&parsed.container)
                    .build()
                    .map_err(fail)?,
            ),
            Service::Memory => Arc::new(object_store::memory::InMemory::new()),
        };
        Self::with_inner(&parsed.to_url(), inner, &parsed.prefix)
    }

    /// A store over any `object_store` implementation, under `prefix`.
    pub fn with_inner(url: &str, inner: Arc<dyn ObjectStore>, prefix: &str) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("coffre-objstore")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Object {
                url: url.to_string(),
                op: "start the I/O runtime",
                reason: e.to_string(),
            })?;
        Ok(ObjectStoreCopy {
            s: Arc::new(Shared0 {
                url: url.to_string(),
                inner,
                prefix: prefix.trim_matches('/').to_string(),
                rt,
                parts: Mutex::new(HashMap::new()),
                cache: Mutex::new(WindowCache::default()),
            }),
        })
    }

    /// The same bucket or container, rooted at `sub` below this prefix.
    pub fn sub(&self, sub: &str) -> Result<ObjectStoreCopy> {
        Self::with_inner(
            &crate::store::join(&self.s.url, sub),
            self.s.inner.clone(),
            &crate::store::join(&self.s.prefix, sub),
        )
    }
}
