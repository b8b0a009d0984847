//! Files through `object_store`: a local directory by default (instances on
//! one host share it), or any S3-compatible store — never an instance's own
//! path. Object names are built by the shop from numeric ids,
//! never from request input, so no name can walk out of the store.

use std::sync::Arc;

use bytes::Bytes;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::error::AppError;

/// The largest avatar accepted.
pub const MAX_AVATAR_BYTES: usize = 1024 * 1024;

/// Where the shop keeps files.
#[derive(Debug, Clone)]
pub struct Objects {
    store: Arc<dyn ObjectStore>,
    describe: String,
}

impl Objects {
    /// Opens `url`:
    /// - `file:///ABSOLUTE/DIR` or a plain directory path (created if
    ///   missing): one host's instances share it;
    /// - `s3://BUCKET[/PREFIX][?key=value&...]`: any S3-compatible store.
    ///   Credentials and settings come from the usual `AWS_*` environment
    ///   variables; the query sets object_store's S3 options by name (e.g.
    ///   `aws_endpoint=http://127.0.0.1:9000&aws_allow_http=true&aws_region=us-east-1`),
    ///   so a local S3-compatible server needs no environment at all.
    pub fn open(url: &str) -> Result<Objects, AppError> {
        if let Some(rest) = url.strip_prefix("s3://") {
            return Self::open_s3(url, rest);
        }
        let dir = url.strip_prefix("file://").unwrap_or(url);
        if dir.contains("://") {
            return Err(AppError::BadRequest(format!(
                "object store {url:?}: expected a directory, file:///DIR or s3://BUCKET"
            )));
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| AppError::internal(&format!("creating the object directory {dir}"), e))?;
        let store = LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| AppError::internal(&format!("object store at {dir}"), e))?;
        Ok(Objects {
            store: Arc::new(store),
            describe: format!("file://{dir}"),
        })
    }

    fn open_s3(url: &str, rest: &str) -> Result<Objects, AppError> {
        let bad = |why: String| AppError::BadRequest(format!("object store {url:?}: {why}"));
        let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket".into()));
        }
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| bad(format!("{pair:?} is not key=value")))?;
            let key: AmazonS3ConfigKey = key
                .parse()
                .map_err(|e| bad(format!("unknown S3 option {key:?}: {e}")))?;
            builder = builder.with_config(key, value);
        }
        let store = builder.build().map_err(|e| bad(e.to_string()))?;
        let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
            Arc::new(store)
        } else {
            Arc::new(PrefixStore::new(store, prefix))
        };
        Ok(Objects {
            store,
            describe: format!("s3://{location}"),
        })
    }

    pub fn describe(&self) -> &str {
        &self.describe
    }

    fn avatar_path(user_id: i64) -> ObjectPath {
        ObjectPath::from(format!("avatars/{user_id}"))
    }

    /// Stores a user's avatar (already checked for size and type).
    pub async fn put_avatar(&self, user_id: i64, image: Bytes) -> Result<(), AppError> {
        self.store
            .put(&Self::avatar_path(user_id), PutPayload::from(image))
            .await
            .map(|_| ())
            .map_err(|e| AppError::Unavailable(format!("storing the avatar: {e}")))
    }

    /// A user's avatar, if they uploaded one.
    pub async fn avatar(&self, user_id: i64) -> Result<Option<Bytes>, AppError> {
        match self.store.get(&Self::avatar_path(user_id)).await {
            Ok(result) => result
                .bytes()
                .await
                .map(Some)
                .map_err(|e| AppError::Unavailable(format!("reading the avatar: {e}"))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(AppError::Unavailable(format!("reading the avatar: {e}"))),
        }
    }
}

/// The image type of `bytes` by its magic number, if it is one the shop
/// accepts.
pub fn image_type(bytes: &[u8]) -> Option<&'static str> {
    const SIGNATURES: [(&[u8], &str); 4] = [
        (b"\x89PNG\r\n\x1a\n", "image/png"),
        (b"\xff\xd8\xff", "image/jpeg"),
        (b"GIF8", "image/gif"),
        (b"RIFF", "image/webp"),
    ];
    SIGNATURES
        .iter()
        .find(|(magic, _)| bytes.starts_with(magic))
        .map(|(_, mime)| *mime)
}
