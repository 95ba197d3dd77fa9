//! Object storage for input and result files: a local directory or any S3-compatible store.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ClientOptions, GetOptions, ObjectStore, ObjectStoreExt};

use sluice_core::config::{DependencySettings, StorageSettings};

/// Builds the configured object store with the default timeouts.
pub fn build(settings: &StorageSettings) -> anyhow::Result<Arc<dyn ObjectStore>> {
    build_with(settings, &DependencySettings::default())
}

/// Builds the configured object store; S3 requests connect within
/// `dependencies.connect_timeout_ms` and end within `dependencies.storage_request_timeout_ms`, so
/// a stalled store fails a request (and its caller retries) instead of hanging it. Read long
/// objects with [`read_chunked`]: one request streaming a whole object at its consumer's pace would
/// outlast that bound.
pub fn build_with(
    settings: &StorageSettings,
    deps: &DependencySettings,
) -> anyhow::Result<Arc<dyn ObjectStore>> {
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
            access_key_id,
            secret_access_key,
        } => {
            // `allow_http` lives in the client options: set on the builder before
            // `with_client_options`, it would be replaced and every `http://` request refused.
            let mut builder = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_client_options(
                    ClientOptions::new()
                        .with_allow_http(*allow_http)
                        .with_connect_timeout(deps.connect_timeout())
                        .with_timeout(Duration::from_millis(deps.storage_request_timeout_ms)),
                );
            if let (Some(id), Some(secret)) = (access_key_id, secret_access_key) {
                builder = builder
                    .with_access_key_id(id)
                    .with_secret_access_key(&secret.0);
            }
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

/// Bytes of one ranged read of [`read_chunked`]; two are in flight per reader.
pub const READ_CHUNK_BYTES: u64 = 2 * 1024 * 1024;

/// An object's size and its bytes as a stream of ranged reads of [`READ_CHUNK_BYTES`], each
/// read whole as soon as it is asked for (the next one ahead).
///
/// One `GET` streaming a whole object is read at its consumer's pace: a client downloading slowly,
/// or a dispatcher waiting for room in its window, keeps it open past the store's request timeout
/// and it fails mid-way (S3). Each ranged read here is short whatever the consumer does, memory
/// stays two chunks per reader, and every read is pinned to the object's first `ETag` so that a
/// replaced object fails the read instead of mixing two versions.
///
/// The first chunk is read before this returns, so an object deleted between the `HEAD` and the
/// first read is an error here (a download answers 404) rather than a stream that breaks after
/// its response began; an object of one chunk is then read whole.
pub async fn read_chunked(
    store: &Arc<dyn ObjectStore>,
    path: &Path,
) -> object_store::Result<(u64, BoxStream<'static, object_store::Result<Bytes>>)> {
    let meta = store.head(path).await?;
    let size = meta.size;
    let store = store.clone();
    let path = path.clone();
    let ranges = (0..size)
        .step_by(READ_CHUNK_BYTES as usize)
        .map(move |start| start..size.min(start + READ_CHUNK_BYTES));
    let mut chunks = futures::stream::iter(ranges)
        .map(move |range| {
            let (store, path) = (store.clone(), path.clone());
            let options = GetOptions {
                range: Some(range.into()),
                if_match: meta.e_tag.clone(),
                ..GetOptions::default()
            };
            async move { store.get_opts(&path, options).await?.bytes().await }
        })
        .buffered(2)
        .try_filter(|chunk| std::future::ready(!chunk.is_empty()))
        .boxed();
    let first = match chunks.next().await {
        Some(first) => first?,
        None => return Ok((size, chunks)),
    };
    Ok((
        size,
        futures::stream::once(async { Ok(first) })
            .chain(chunks)
            .boxed(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    #[tokio::test]
    async fn chunked_reads_give_back_every_byte_in_order_whatever_the_size() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let chunk = READ_CHUNK_BYTES as usize;
        for len in [0, 1, chunk - 1, chunk, chunk + 1, 3 * chunk + 17] {
            let path = Path::from(format!("o/{len}"));
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            store.put(&path, data.clone().into()).await.unwrap();
            let (size, chunks) = read_chunked(&store, &path).await.unwrap();
            assert_eq!(size, len as u64);
            let parts: Vec<Bytes> = chunks.try_collect().await.unwrap();
            assert!(parts.iter().all(|p| p.len() <= chunk));
            assert_eq!(parts.concat(), data, "{len} bytes");
        }
        let missing = read_chunked(&store, &Path::from("nope")).await;
        assert!(matches!(missing, Err(object_store::Error::NotFound { .. })));
    }
}
