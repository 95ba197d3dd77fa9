//! Object storage for input and result files: a local directory or any S3-compatible store.

use std::sync::Arc;

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::prefix::PrefixStore;

use crate::config::StorageSettings;

/// Builds the configured object store.
pub fn build(settings: &StorageSettings) -> anyhow::Result<Arc<dyn ObjectStore>> {
    Ok(match settings {
        StorageSettings::Local { path } => {
            std::fs::create_dir_all(path)?;
            Arc::new(LocalFileSystem::new_with_prefix(path)?)
        }
        StorageSettings::S3 {
            bucket,
            region,
            endpoint,
            allow_http,
            prefix,
        } => {
            let mut builder = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_allow_http(*allow_http);
            if let Some(region) = region {
                builder = builder.with_region(region);
            }
            if let Some(endpoint) = endpoint {
                builder = builder
                    .with_endpoint(endpoint)
                    .with_virtual_hosted_style_request(false);
            }
            let store: Arc<dyn ObjectStore> = Arc::new(builder.build()?);
            match prefix {
                Some(p) => Arc::new(PrefixStore::new(store, p.as_str())),
                None => store,
            }
        }
    })
}

/// Storage path of an uploaded file.
pub fn upload_path(file_id: &str) -> object_store::path::Path {
    object_store::path::Path::from(format!("files/{file_id}.jsonl"))
}

/// Storage path of a batch's result file (`kind` is `output` or `errors`).
pub fn result_path(batch_id: &str, kind: &str) -> object_store::path::Path {
    object_store::path::Path::from(format!("batches/{batch_id}/{kind}.jsonl"))
}
