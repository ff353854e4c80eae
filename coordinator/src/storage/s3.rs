//! The S3-compatible backend (AWS S3, MinIO, B2, R2, Wasabi, ...).
//!
//! Writes are multipart uploads built from bounded parts: at most
//! `parts_in_flight` parts are being sent while the next one fills, so memory
//! per upload is about `(parts_in_flight + 1) × part_size` whatever the size of
//! the database. An object smaller than one part is sent with a single
//! PutObject at commit. Nothing is visible under the key before commit; an
//! aborted or dropped writer aborts its multipart upload.
//!
//! Transient failures (5xx, throttling, connection errors) are retried by the
//! SDK with exponential backoff; a download interrupted mid-body resumes with
//! a ranged GET pinned to the object's ETag. Credential and permission errors
//! are never retried and say which setting to check.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream as SdkByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier,
    ServerSideEncryption, StorageClass,
};
use bytes::{Bytes, BytesMut};
use tokio::task::JoinSet;

use super::{
    check_key, ByteStream, ErrorKind, KeyFilter, ObjectInfo, ObjectWriter, Storage, StorageError,
};

/// Smallest part S3 accepts (except for the last one).
pub const MIN_PART_SIZE: usize = 5 * 1024 * 1024;
/// Largest part S3 accepts.
pub const MAX_PART_SIZE: usize = 5 * 1024 * 1024 * 1024;
/// S3's limit on the number of parts of one upload.
const MAX_PARTS: i32 = 10_000;
/// Parts per size step: the part size doubles every this many parts, so an
/// upload never runs out of part numbers (16 MiB parts reach ~1 TiB) while
/// ordinary databases keep the configured size.
const PARTS_PER_STEP: i32 = 2_000;
/// Size of the chunks a download yields (the gRPC message size of a restore).
const READ_CHUNK: usize = datasaver_common::CHUNK_SIZE;
/// How often a broken download is resumed before giving up.
const READ_RESUMES: u32 = 5;
/// Key prefix of the start-up probe objects.
pub const PROBE_PREFIX: &str = ".datasaver-probe-";

/// Server-side encryption asked of S3 on every upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sse {
    Aes256,
    Kms { key_id: Option<String> },
}

/// Settings of the S3 backend, already validated.
#[derive(Clone)]
pub struct S3Settings {
    pub bucket: String,
    pub endpoint: Option<String>,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
    /// Normalised: empty or ending in `/`.
    pub prefix: String,
    pub force_path_style: bool,
    pub part_size: usize,
    pub parts_in_flight: usize,
    pub max_attempts: u32,
    pub sse: Option<Sse>,
    pub storage_class: Option<String>,
    /// Extra CA certificate (PEM) for a server with a private CA.
    pub ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for S3Settings {
    // Hand-written so the secret key can never reach a log through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("prefix", &self.prefix)
            .field("force_path_style", &self.force_path_style)
            .field("part_size", &self.part_size)
            .field("parts_in_flight", &self.parts_in_flight)
            .field("max_attempts", &self.max_attempts)
            .field("sse", &self.sse)
            .field("storage_class", &self.storage_class)
            .finish_non_exhaustive()
    }
}

/// What every request needs: the client and where things go.
#[derive(Clone)]
struct Ctx {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    endpoint: String,
    force_path_style: bool,
    sse: Option<Sse>,
}

pub struct S3Storage {
    ctx: Ctx,
    part_size: usize,
    parts_in_flight: usize,
    storage_class: Option<String>,
}

impl S3Storage {
    pub fn new(s: S3Settings) -> Result<Self, StorageError> {
        let mut tls = aws_smithy_http_client::tls::TrustStore::default();
        if let Some(pem) = &s.ca_pem {
            tls = tls.with_pem_certificate(pem.clone());
        }
        let tls_context = aws_smithy_http_client::tls::TlsContext::builder()
            .with_trust_store(tls)
            .build()
            .map_err(|e| {
                StorageError::new(
                    ErrorKind::Other,
                    "configure",
                    "",
                    format!("S3 TLS settings: {e}"),
                )
            })?;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .tls_context(tls_context)
            .build_https();
        let mut b = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(s.region.clone()))
            .credentials_provider(Credentials::new(
                s.access_key.clone(),
                s.secret_key.clone(),
                None,
                None,
                "datasaver",
            ))
            .force_path_style(s.force_path_style)
            .http_client(http)
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(s.max_attempts)
                    .with_initial_backoff(Duration::from_millis(500))
                    .with_max_backoff(Duration::from_secs(20)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .read_timeout(Duration::from_secs(120))
                    .build(),
            );
        if let Some(e) = &s.endpoint {
            b = b.endpoint_url(e.clone());
        }
        let client = aws_sdk_s3::Client::from_conf(b.build());
        Ok(Self {
            ctx: Ctx {
                client,
                bucket: s.bucket,
                prefix: s.prefix,
                endpoint: s
                    .endpoint
                    .unwrap_or_else(|| format!("AWS S3 ({})", s.region)),
                force_path_style: s.force_path_style,
                sse: s.sse,
            },
            part_size: s.part_size,
            parts_in_flight: s.parts_in_flight.max(1),
            storage_class: s.storage_class,
        })
    }

    /// Proves that the coordinator can write, read, list and delete under its
    /// prefix, so a wrong key, bucket or endpoint stops it at start-up rather
    /// than at the first backup.
    pub async fn probe(&self) -> Result<(), StorageError> {
        // The bucket first, with a request whose error has a body (HEAD's
        // has none, so it cannot tell a wrong key from a missing bucket);
        // some servers would create a missing bucket on the first PutObject.
        if let Err(mut e) = self.list(PROBE_PREFIX).await {
            if e.kind == ErrorKind::NotFound {
                e.message = format!(
                    "bucket {:?} does not exist at {} (HTTP 404); create it or correct DATASAVER_S3_BUCKET",
                    self.ctx.bucket, self.ctx.endpoint
                );
            }
            return Err(e);
        }
        let key = format!("{PROBE_PREFIX}{:016x}", rand::random::<u64>());
        let body = Bytes::from(format!("datasaver storage check {key}\n"));
        self.put(&key, body.clone()).await?;
        let result = async {
            let read: Vec<u8> = {
                use futures::TryStreamExt;
                let chunks: Vec<Bytes> = self.get(&key).await?.try_collect().await?;
                chunks.concat()
            };
            if read != body {
                return Err(StorageError::new(
                    ErrorKind::Other,
                    "read",
                    &key,
                    "the probe object read back differs from what was written",
                ));
            }
            let listed = self.list(PROBE_PREFIX).await?;
            if !listed.iter().any(|o| o.key == key) {
                return Err(StorageError::new(
                    ErrorKind::Other,
                    "list",
                    &key,
                    "the probe object is missing from the bucket listing",
                ));
            }
            Ok(())
        }
        .await;
        let deleted = self.delete(std::slice::from_ref(&key)).await;
        result?;
        deleted?;
        if self.head(&key).await?.is_some() {
            return Err(StorageError::new(
                ErrorKind::Other,
                "delete",
                &key,
                "the probe object is still there after deleting it",
            ));
        }
        Ok(())
    }
}

impl Ctx {
    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Turns an SDK failure into a one-line error that says what to check.
    fn error<E>(&self, op: &'static str, key: &str, e: SdkError<E>) -> StorageError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let status = e.raw_response().map(|r| r.status().as_u16());
        let code = e.code().unwrap_or("").to_string();
        let bucket = &self.bucket;
        let endpoint = &self.endpoint;
        let (kind, message) = match &e {
            SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => {
                let mut m = format!(
                    "cannot reach the S3 endpoint {endpoint}: {}; check DATASAVER_S3_ENDPOINT and that the server is up",
                    datasaver_common::error_chain(&e)
                );
                if !self.force_path_style && endpoint.starts_with("http") {
                    m.push_str(
                        " (MinIO-like servers also need DATASAVER_S3_FORCE_PATH_STYLE=true)",
                    );
                }
                (ErrorKind::Transient, m)
            }
            SdkError::ServiceError(_) | SdkError::ResponseError(_) => match code.as_str() {
                "NoSuchBucket" => (
                    ErrorKind::Other,
                    format!(
                        "bucket {bucket:?} does not exist at {endpoint} (NoSuchBucket); create it or correct DATASAVER_S3_BUCKET"
                    ),
                ),
                "NoSuchKey" | "NotFound" => (ErrorKind::NotFound, "no such object".to_string()),
                "SignatureDoesNotMatch" => (
                    ErrorKind::PermissionDenied,
                    format!(
                        "{endpoint} rejected the request signature (SignatureDoesNotMatch): the secret key is wrong; check DATASAVER_S3_SECRET_KEY"
                    ),
                ),
                "InvalidAccessKeyId" | "NotSignedUp" => (
                    ErrorKind::PermissionDenied,
                    format!(
                        "{endpoint} does not know the access key ({code}); check DATASAVER_S3_ACCESS_KEY"
                    ),
                ),
                "AccessDenied" | "AllAccessDisabled" | "AccountProblem" => (
                    ErrorKind::PermissionDenied,
                    format!(
                        "access denied ({code}): the key may not {op} in bucket {bucket:?}; grant s3:PutObject, GetObject, ListBucket, DeleteObject and AbortMultipartUpload"
                    ),
                ),
                "KMS.NotFoundException" | "KMS.DisabledException" | "KMSKeyNotFound" => (
                    ErrorKind::Other,
                    format!("{code}: check DATASAVER_S3_SSE_KMS_KEY_ID"),
                ),
                "InvalidObjectState" => (
                    ErrorKind::Other,
                    "the object is archived (InvalidObjectState): restore it from Glacier first"
                        .to_string(),
                ),
                "SlowDown" | "Throttling" | "ThrottlingException" | "RequestTimeout"
                | "InternalError" | "ServiceUnavailable" => (
                    ErrorKind::Transient,
                    format!("{code}: {}", e.message().unwrap_or("retry later")),
                ),
                _ => match status {
                    Some(404) => (
                        ErrorKind::NotFound,
                        "not found (HTTP 404)".to_string(),
                    ),
                    Some(401 | 403) => (
                        ErrorKind::PermissionDenied,
                        format!(
                            "HTTP {} from {endpoint}: check DATASAVER_S3_ACCESS_KEY and DATASAVER_S3_SECRET_KEY",
                            status.unwrap_or_default()
                        ),
                    ),
                    Some(s) if s >= 500 || s == 429 => (
                        ErrorKind::Transient,
                        format!("HTTP {s} from {endpoint}: {}", DisplayErrorContext(&e)),
                    ),
                    _ => (
                        ErrorKind::Other,
                        format!(
                            "{} {}",
                            if code.is_empty() { "error" } else { code.as_str() },
                            DisplayErrorContext(&e)
                        ),
                    ),
                },
            },
            _ => (ErrorKind::Other, DisplayErrorContext(&e).to_string()),
        };
        StorageError::new(kind, op, key, message)
    }

    fn build_error(op: &'static str, key: &str, e: impl std::fmt::Display) -> StorageError {
        StorageError::new(
            ErrorKind::Other,
            op,
            key,
            format!("building the request: {e}"),
        )
    }

    async fn put_object(
        &self,
        key: &str,
        data: Bytes,
        storage_class: Option<&str>,
    ) -> Result<(), StorageError> {
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .content_length(data.len() as i64)
            .body(SdkByteStream::from(data));
        req = match &self.sse {
            None => req,
            Some(Sse::Aes256) => req.server_side_encryption(ServerSideEncryption::Aes256),
            Some(Sse::Kms { key_id }) => req
                .server_side_encryption(ServerSideEncryption::AwsKms)
                .set_ssekms_key_id(key_id.clone()),
        };
        if let Some(c) = storage_class {
            req = req.storage_class(StorageClass::from(c));
        }
        req.send().await.map_err(|e| self.error("write", key, e))?;
        Ok(())
    }

    async fn abort_upload(&self, key: &str, upload_id: &str) -> Result<(), StorageError> {
        self.client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .upload_id(upload_id)
            .send()
            .await
            .map_err(|e| self.error("abort", key, e))?;
        Ok(())
    }

    /// Keeps trying to abort an upload the server could not be told about
    /// (it was down, say), so its parts do not stay stored and billed. Parts
    /// still in flight are let finish first (see [`settle_parts`]).
    fn abort_in_background(
        &self,
        key: String,
        upload_id: String,
        parts: Option<JoinSet<PartResult>>,
    ) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let ctx = self.clone();
        rt.spawn(async move {
            if let Some(parts) = parts {
                settle_parts(parts).await;
            }
            let mut wait = Duration::from_secs(1);
            for _ in 0..40 {
                match ctx.abort_upload(&key, &upload_id).await {
                    Ok(()) => {
                        tracing::info!(key = %key, "aborted an unfinished multipart upload");
                        return;
                    }
                    Err(e) if e.kind == ErrorKind::NotFound => return,
                    Err(e) => {
                        tracing::warn!(key = %key, error = %e, "could not abort an unfinished multipart upload yet; retrying");
                    }
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(60));
            }
            tracing::error!(key = %key, upload_id = %upload_id, "gave up aborting a multipart upload; a bucket lifecycle rule for incomplete uploads will remove it");
        });
    }

    /// One ranged GET. `end` is inclusive, as in the Range header.
    async fn open(
        &self,
        key: &str,
        from: u64,
        end: Option<u64>,
        etag: Option<&str>,
    ) -> Result<(SdkByteStream, Option<String>), StorageError> {
        let range = match (from, end) {
            (0, None) => None,
            (f, None) => Some(format!("bytes={f}-")),
            (f, Some(e)) => Some(format!("bytes={f}-{e}")),
        };
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .set_range(range)
            .set_if_match(etag.map(str::to_string))
            .send()
            .await
            .map_err(|e| self.error("read", key, e))?;
        Ok((out.body, out.e_tag))
    }
}

/// State of a download stream: resumes after a broken body.
struct Reader {
    ctx: Ctx,
    key: String,
    body: Option<SdkByteStream>,
    etag: Option<String>,
    /// Next offset to read.
    pos: u64,
    /// Inclusive end, if a range was asked for.
    end: Option<u64>,
    resumes: u32,
    buf: BytesMut,
    done: bool,
}

impl Reader {
    async fn next_chunk(&mut self) -> Option<Result<Bytes, StorageError>> {
        loop {
            if self.done {
                return None;
            }
            let body = self.body.as_mut()?;
            match body.next().await {
                Some(Ok(data)) => {
                    self.pos += data.len() as u64;
                    self.buf.extend_from_slice(&data);
                    if self.buf.len() >= READ_CHUNK {
                        return Some(Ok(self.buf.split().freeze()));
                    }
                }
                None => {
                    self.done = true;
                    if let Some(end) = self.end {
                        if self.pos <= end {
                            return Some(Err(StorageError::new(
                                ErrorKind::Other,
                                "read",
                                &self.key,
                                format!("object ended at byte {} before byte {end}", self.pos),
                            )));
                        }
                    }
                    if self.buf.is_empty() {
                        return None;
                    }
                    return Some(Ok(self.buf.split().freeze()));
                }
                Some(Err(e)) => {
                    // The body broke mid-way (connection reset, server
                    // restart): continue from where it stopped, pinned to the
                    // same object version by its ETag.
                    self.resumes += 1;
                    if self.resumes > READ_RESUMES {
                        self.done = true;
                        return Some(Err(StorageError::new(
                            ErrorKind::Transient,
                            "read",
                            &self.key,
                            format!(
                                "download broke {} times, last at byte {}: {}",
                                self.resumes - 1,
                                self.pos,
                                datasaver_common::error_chain(&e)
                            ),
                        )));
                    }
                    tracing::warn!(key = %self.key, at = self.pos, error = %datasaver_common::error_chain(&e), "S3 download interrupted; resuming");
                    tokio::time::sleep(Duration::from_millis(250 << self.resumes.min(6))).await;
                    match self
                        .ctx
                        .open(&self.key, self.pos, self.end, self.etag.as_deref())
                        .await
                    {
                        Ok((b, _)) => self.body = Some(b),
                        Err(e) => {
                            self.done = true;
                            return Some(Err(e));
                        }
                    }
                }
            }
        }
    }
}

#[async_trait]
impl Storage for S3Storage {
    fn describe(&self) -> String {
        format!(
            "s3://{}/{} at {}",
            self.ctx.bucket, self.ctx.prefix, self.ctx.endpoint
        )
    }

    async fn create(&self, key: &str) -> Result<Box<dyn ObjectWriter>, StorageError> {
        check_key(key)?;
        Ok(Box::new(S3Writer {
            ctx: self.ctx.clone(),
            key: key.to_string(),
            part_size: self.part_size,
            parts_in_flight: self.parts_in_flight,
            storage_class: self.storage_class.clone(),
            buf: BytesMut::new(),
            upload_id: None,
            next_part: 1,
            in_flight: JoinSet::new(),
            done_parts: Vec::new(),
            size: 0,
        }))
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
        check_key(key)?;
        // Meta files and probes stay in the default class: they must remain
        // readable at once for a catalog rebuild.
        self.ctx.put_object(key, data, None).await
    }

    async fn get_range(
        &self,
        key: &str,
        offset: u64,
        len: Option<u64>,
    ) -> Result<ByteStream, StorageError> {
        check_key(key)?;
        if len == Some(0) {
            return Ok(Box::pin(futures::stream::empty()));
        }
        let end = len.map(|l| offset + l - 1);
        let (body, etag) = self.ctx.open(key, offset, end, None).await?;
        let reader = Reader {
            ctx: self.ctx.clone(),
            key: key.to_string(),
            body: Some(body),
            etag,
            pos: offset,
            end,
            resumes: 0,
            buf: BytesMut::new(),
            done: false,
        };
        Ok(Box::pin(futures::stream::unfold(
            reader,
            |mut r| async move {
                let item = r.next_chunk().await?;
                Some((item, r))
            },
        )))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        check_key(key)?;
        match self
            .ctx
            .client
            .head_object()
            .bucket(&self.ctx.bucket)
            .key(self.ctx.full_key(key))
            .send()
            .await
        {
            Ok(o) => Ok(Some(ObjectInfo {
                key: key.to_string(),
                size: o.content_length.unwrap_or(0).max(0) as u64,
            })),
            Err(e) => {
                let e = self.ctx.error("head", key, e);
                if e.kind == ErrorKind::NotFound {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        let full = self.ctx.full_key(prefix);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .ctx
                .client
                .list_objects_v2()
                .bucket(&self.ctx.bucket)
                .prefix(&full)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| self.ctx.error("list", prefix, e))?;
            for o in page.contents() {
                let Some(k) = o.key() else { continue };
                let Some(rel) = k.strip_prefix(&self.ctx.prefix) else {
                    continue;
                };
                out.push(ObjectInfo {
                    key: rel.to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                });
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => break,
            }
        }
        Ok(out)
    }

    async fn delete(&self, keys: &[String]) -> Result<(), StorageError> {
        for batch in keys.chunks(1000) {
            let first = batch.first().map(String::as_str).unwrap_or("");
            let mut ids = Vec::with_capacity(batch.len());
            for k in batch {
                check_key(k)?;
                ids.push(
                    ObjectIdentifier::builder()
                        .key(self.ctx.full_key(k))
                        .build()
                        .map_err(|e| Ctx::build_error("delete", k, e))?,
                );
            }
            let delete = Delete::builder()
                .set_objects(Some(ids))
                .quiet(true)
                .build()
                .map_err(|e| Ctx::build_error("delete", first, e))?;
            let out = self
                .ctx
                .client
                .delete_objects()
                .bucket(&self.ctx.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|e| self.ctx.error("delete", first, e))?;
            if let Some(err) = out.errors().iter().find(|e| e.code() != Some("NoSuchKey")) {
                let key = err.key().unwrap_or(first);
                return Err(StorageError::new(
                    match err.code() {
                        Some("AccessDenied") => ErrorKind::PermissionDenied,
                        Some("InternalError" | "SlowDown") => ErrorKind::Transient,
                        _ => ErrorKind::Other,
                    },
                    "delete",
                    key,
                    format!(
                        "{}: {}",
                        err.code().unwrap_or("error"),
                        err.message().unwrap_or("")
                    ),
                ));
            }
        }
        Ok(())
    }

    async fn cleanup_incomplete(&self, ours: &KeyFilter) -> Result<usize, StorageError> {
        // Uploads left by a coordinator that died mid-backup are invisible
        // but billed; abort those under our prefix whose key is one of ours
        // (only one coordinator writes under a prefix, and at start-up none
        // of ours is running). The bucket, even the prefix, may be shared:
        // another application's upload in progress is never touched.
        let mut removed = 0;
        let mut key_marker: Option<String> = None;
        let mut id_marker: Option<String> = None;
        loop {
            let page = match self
                .ctx
                .client
                .list_multipart_uploads()
                .bucket(&self.ctx.bucket)
                .prefix(&self.ctx.prefix)
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(id_marker.take())
                .send()
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    let code = e.code().unwrap_or("").to_string();
                    let status = e.raw_response().map(|r| r.status().as_u16());
                    if code == "NotImplemented" || status == Some(501) {
                        tracing::info!("this S3 server cannot list multipart uploads; stale uploads are left to a bucket lifecycle rule");
                        return Ok(removed);
                    }
                    return Err(self.ctx.error("list uploads", &self.ctx.prefix, e));
                }
            };
            for u in page.uploads() {
                let (Some(k), Some(id)) = (u.key(), u.upload_id()) else {
                    continue;
                };
                match k.strip_prefix(&self.ctx.prefix) {
                    Some(rel) if ours(rel) => {
                        self.ctx.abort_upload(rel, id).await?;
                        removed += 1;
                    }
                    _ => {
                        tracing::debug!(key = %k, "left a multipart upload that is not datasaver's")
                    }
                }
            }
            if page.is_truncated() == Some(true) {
                key_marker = page.next_key_marker().map(str::to_string);
                id_marker = page.next_upload_id_marker().map(str::to_string);
                if key_marker.is_none() {
                    break;
                }
            } else {
                break;
            }
        }
        Ok(removed)
    }
}

/// A part sent or being sent.
type PartResult = Result<CompletedPart, StorageError>;

/// How long an abandoned upload waits for its in-flight parts before
/// cancelling them.
const PART_SETTLE: Duration = Duration::from_secs(10);

/// Waits for the parts still being sent, cancelling them after
/// [`PART_SETTLE`]. An abort must come after them: a part whose body the
/// server already has is stored even when the abort lands first, and S3 then
/// keeps (and bills) it with no upload left to abort.
async fn settle_parts(mut parts: JoinSet<PartResult>) {
    let drained = tokio::time::timeout(PART_SETTLE, async {
        while parts.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        parts.abort_all();
        while parts.join_next().await.is_some() {}
    }
}

struct S3Writer {
    ctx: Ctx,
    key: String,
    part_size: usize,
    parts_in_flight: usize,
    storage_class: Option<String>,
    buf: BytesMut,
    upload_id: Option<String>,
    next_part: i32,
    in_flight: JoinSet<PartResult>,
    done_parts: Vec<CompletedPart>,
    size: u64,
}

impl S3Writer {
    fn current_part_size(&self) -> usize {
        let step = ((self.next_part - 1) / PARTS_PER_STEP).min(8) as u32;
        (self.part_size << step).min(MAX_PART_SIZE)
    }

    async fn start_upload(&mut self) -> Result<String, StorageError> {
        if let Some(id) = &self.upload_id {
            return Ok(id.clone());
        }
        let mut req = self
            .ctx
            .client
            .create_multipart_upload()
            .bucket(&self.ctx.bucket)
            .key(self.ctx.full_key(&self.key))
            .checksum_algorithm(ChecksumAlgorithm::Crc32);
        req = match &self.ctx.sse {
            None => req,
            Some(Sse::Aes256) => req.server_side_encryption(ServerSideEncryption::Aes256),
            Some(Sse::Kms { key_id }) => req
                .server_side_encryption(ServerSideEncryption::AwsKms)
                .set_ssekms_key_id(key_id.clone()),
        };
        if let Some(c) = &self.storage_class {
            req = req.storage_class(StorageClass::from(c.as_str()));
        }
        let out = req
            .send()
            .await
            .map_err(|e| self.ctx.error("write", &self.key, e))?;
        let id = out.upload_id().map(str::to_string).ok_or_else(|| {
            StorageError::new(
                ErrorKind::Other,
                "write",
                &self.key,
                "the server started a multipart upload without an upload id",
            )
        })?;
        self.upload_id = Some(id.clone());
        Ok(id)
    }

    /// Waits for one in-flight part.
    async fn reap_one(&mut self) -> Result<(), StorageError> {
        if let Some(r) = self.in_flight.join_next().await {
            let part = r.map_err(|e| {
                StorageError::new(
                    ErrorKind::Other,
                    "write",
                    &self.key,
                    format!("part upload task failed: {e}"),
                )
            })??;
            self.done_parts.push(part);
        }
        Ok(())
    }

    /// Sends the buffered bytes as the next part, waiting first if too many
    /// parts are already in flight (this is the backpressure towards the agent).
    async fn send_part(&mut self) -> Result<(), StorageError> {
        let upload_id = self.start_upload().await?;
        while self.in_flight.len() >= self.parts_in_flight {
            self.reap_one().await?;
        }
        if self.next_part > MAX_PARTS {
            return Err(StorageError::new(
                ErrorKind::Other,
                "write",
                &self.key,
                "object needs more than 10000 parts; raise DATASAVER_S3_PART_SIZE",
            ));
        }
        let data = self.buf.split().freeze();
        let number = self.next_part;
        self.next_part += 1;
        let ctx = self.ctx.clone();
        let key = self.key.clone();
        self.in_flight.spawn(async move {
            let out = ctx
                .client
                .upload_part()
                .bucket(&ctx.bucket)
                .key(ctx.full_key(&key))
                .upload_id(upload_id)
                .part_number(number)
                .content_length(data.len() as i64)
                .checksum_algorithm(ChecksumAlgorithm::Crc32)
                .body(SdkByteStream::from(data))
                .send()
                .await
                .map_err(|e| ctx.error("write", &key, e))?;
            Ok(CompletedPart::builder()
                .part_number(number)
                .set_e_tag(out.e_tag().map(str::to_string))
                .set_checksum_crc32(out.checksum_crc32().map(str::to_string))
                .build())
        });
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), StorageError> {
        let Some(upload_id) = self.upload_id.clone() else {
            // Smaller than one part: one PutObject.
            let data = self.buf.split().freeze();
            return self
                .ctx
                .put_object(&self.key, data, self.storage_class.as_deref())
                .await;
        };
        if !self.buf.is_empty() {
            self.send_part().await?;
        }
        while !self.in_flight.is_empty() {
            self.reap_one().await?;
        }
        let mut parts = std::mem::take(&mut self.done_parts);
        parts.sort_by_key(|p| p.part_number());
        self.ctx
            .client
            .complete_multipart_upload()
            .bucket(&self.ctx.bucket)
            .key(self.ctx.full_key(&self.key))
            .upload_id(&upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.ctx.error("write", &self.key, e))?;
        self.upload_id = None;
        Ok(())
    }

    async fn discard(&mut self) -> Result<(), StorageError> {
        settle_parts(std::mem::take(&mut self.in_flight)).await;
        self.buf.clear();
        match self.upload_id.take() {
            Some(id) => match self.ctx.abort_upload(&self.key, &id).await {
                Ok(()) => Ok(()),
                Err(e) => {
                    self.ctx.abort_in_background(self.key.clone(), id, None);
                    Err(e)
                }
            },
            None => Ok(()),
        }
    }
}

#[async_trait]
impl ObjectWriter for S3Writer {
    async fn write(&mut self, data: Bytes) -> Result<(), StorageError> {
        self.size += data.len() as u64;
        let mut rest = data;
        while !rest.is_empty() {
            let target = self.current_part_size();
            if self.buf.is_empty() {
                // One allocation per part instead of repeated doubling.
                self.buf.reserve(target);
            }
            let take = (target - self.buf.len()).min(rest.len());
            self.buf.extend_from_slice(&rest.split_to(take));
            if self.buf.len() >= target {
                if let Err(e) = self.send_part().await {
                    let _ = self.discard().await;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<ObjectInfo, StorageError> {
        if let Err(e) = self.finish().await {
            let _ = self.discard().await;
            return Err(e);
        }
        Ok(ObjectInfo {
            key: self.key.clone(),
            size: self.size,
        })
    }

    async fn abort(mut self: Box<Self>) -> Result<(), StorageError> {
        self.discard().await
    }
}

impl Drop for S3Writer {
    fn drop(&mut self) {
        // Dropped without commit or abort (a cancelled upload): abort the
        // multipart upload in the background so nothing stays behind.
        let parts = std::mem::take(&mut self.in_flight);
        match self.upload_id.take() {
            Some(id) => self
                .ctx
                .abort_in_background(self.key.clone(), id, Some(parts)),
            None => drop(parts),
        }
    }
}

#[cfg(test)]
mod tests {
    //! Against a real s3s-fs server (SigV4 on), started per test.
    use super::*;
    use datasaver_tests::S3Server;
    use futures::TryStreamExt;

    fn settings(srv: &S3Server, prefix: &str) -> S3Settings {
        S3Settings {
            bucket: srv.bucket.clone(),
            endpoint: Some(srv.endpoint()),
            region: "us-east-1".into(),
            access_key: srv.access_key.clone(),
            secret_key: srv.secret_key.clone(),
            prefix: prefix.into(),
            force_path_style: true,
            part_size: MIN_PART_SIZE,
            parts_in_flight: 2,
            max_attempts: 3,
            sse: None,
            storage_class: None,
            ca_pem: None,
        }
    }

    fn pattern(len: usize, seed: u32) -> Vec<u8> {
        // Not compressible by accident, not all zeros: parts in the wrong order would show.
        let mut x = seed.wrapping_mul(2_654_435_761).max(1);
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    async fn read_all(s: &dyn Storage, key: &str) -> Vec<u8> {
        let chunks: Vec<Bytes> = s.get(key).await.unwrap().try_collect().await.unwrap();
        chunks.concat()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_with_and_without_prefix() {
        let srv = S3Server::start();
        for prefix in ["", "site-a/datasaver/"] {
            let s = S3Storage::new(settings(&srv, prefix)).unwrap();
            s.probe().await.unwrap();
            crate::storage::conformance::run(&s).await;
            // Only the keys the suite left, under the prefix; no probe left over.
            let expected: Vec<String> = ["t1/logical/a.meta.json", "t2/logical/x.meta.json"]
                .iter()
                .map(|k| format!("{prefix}{k}"))
                .collect();
            let mut found: Vec<String> = srv
                .objects()
                .into_iter()
                .filter(|k| {
                    if prefix.is_empty() {
                        !k.starts_with("site-a/")
                    } else {
                        k.starts_with(prefix)
                    }
                })
                .collect();
            found.sort();
            assert_eq!(found, expected, "prefix {prefix:?}");
            s.delete(
                &expected
                    .iter()
                    .map(|k| k[prefix.len()..].to_string())
                    .collect::<Vec<_>>(),
            )
            .await
            .unwrap();
        }
        assert!(srv.objects().is_empty(), "{:?}", srv.objects());
        assert!(srv.pending_upload_parts().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn multipart_upload_round_trips_and_abort_leaves_nothing() {
        let srv = S3Server::start();
        let s = S3Storage::new(settings(&srv, "p/")).unwrap();

        // 4 parts of 5 MiB (the last one short), written in uneven chunks.
        let data = pattern(3 * MIN_PART_SIZE + 1_234_567, 7);
        let mut w = s.create("t/logical/big.dump.zst").await.unwrap();
        for chunk in data.chunks(777_777) {
            w.write(Bytes::copy_from_slice(chunk)).await.unwrap();
        }
        assert!(s.head("t/logical/big.dump.zst").await.unwrap().is_none());
        let info = w.commit().await.unwrap();
        assert_eq!(info.size, data.len() as u64);
        assert_eq!(
            s.head("t/logical/big.dump.zst")
                .await
                .unwrap()
                .unwrap()
                .size,
            data.len() as u64
        );
        let back = read_all(&s, "t/logical/big.dump.zst").await;
        assert!(
            back == data,
            "multipart object differs from what was written"
        );
        assert!(srv.pending_upload_parts().is_empty());

        // A range across a part boundary.
        let from = MIN_PART_SIZE as u64 - 10;
        let got: Vec<Bytes> = s
            .get_range("t/logical/big.dump.zst", from, Some(20))
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(
            got.concat(),
            data[from as usize..from as usize + 20].to_vec()
        );

        // Abort after two parts went out: no object, no parts.
        let mut w = s.create("t/logical/aborted.dump.zst").await.unwrap();
        w.write(Bytes::from(pattern(2 * MIN_PART_SIZE + 10, 3)))
            .await
            .unwrap();
        w.abort().await.unwrap();
        assert!(s
            .head("t/logical/aborted.dump.zst")
            .await
            .unwrap()
            .is_none());
        assert!(
            srv.pending_upload_parts().is_empty(),
            "{:?}",
            srv.pending_upload_parts()
        );

        // Dropped mid-upload (the upload stream was cancelled): aborted in the background.
        let mut w = s.create("t/logical/dropped.dump.zst").await.unwrap();
        w.write(Bytes::from(pattern(2 * MIN_PART_SIZE + 10, 4)))
            .await
            .unwrap();
        drop(w);
        let mut clean = false;
        for _ in 0..100 {
            if srv.pending_upload_parts().is_empty() {
                clean = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            clean,
            "dropped upload left {:?}",
            srv.pending_upload_parts()
        );
        assert_eq!(srv.objects(), vec!["p/t/logical/big.dump.zst".to_string()]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn download_resumes_after_the_server_restarts() {
        let mut srv = S3Server::start();
        let s = S3Storage::new(settings(&srv, "")).unwrap();
        let data = pattern(48 << 20, 11);
        s.put("t/logical/r.dump", Bytes::from(data.clone()))
            .await
            .unwrap();
        let mut stream = s.get("t/logical/r.dump").await.unwrap();
        let mut back: Vec<u8> = stream.try_next().await.unwrap().unwrap().to_vec();
        // The server dies while most of the body is still to come, then comes back.
        srv.kill();
        srv.restart();
        while let Some(chunk) = stream.try_next().await.unwrap() {
            back.extend_from_slice(&chunk);
        }
        assert_eq!(back.len(), data.len());
        assert!(back == data, "resumed download differs");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn listing_paginates_and_deletes_in_batches() {
        let srv = S3Server::start();
        let s = std::sync::Arc::new(S3Storage::new(settings(&srv, "x/")).unwrap());
        let keys: Vec<String> = (0..1005)
            .map(|i| format!("t/logical/o{i:04}.meta.json"))
            .collect();
        for batch in keys.chunks(32) {
            let puts = batch.iter().map(|k| {
                let s = s.clone();
                let k = k.clone();
                async move { s.put(&k, Bytes::from(k.clone())).await }
            });
            for r in futures::future::join_all(puts).await {
                r.unwrap();
            }
        }
        s.put("u/logical/other.meta.json", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        // More than one page of ListObjectsV2 (1000 keys per page).
        let mut listed: Vec<String> = s
            .list("t/")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        listed.sort();
        assert_eq!(listed, keys);
        // More than one DeleteObjects batch (1000 keys per request).
        s.delete(&keys).await.unwrap();
        let left: Vec<String> = s
            .list("")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(left, vec!["u/logical/other.meta.json".to_string()]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uploads_ride_out_a_short_server_outage() {
        let mut srv = S3Server::start();
        let mut cfg = settings(&srv, "");
        cfg.max_attempts = 8;
        let s = S3Storage::new(cfg).unwrap();
        let data = pattern(4 * MIN_PART_SIZE + 99, 5);
        let (first, rest) = data.split_at(2 * MIN_PART_SIZE + 10);
        let mut w = s.create("t/logical/outage.dump").await.unwrap();
        w.write(Bytes::copy_from_slice(first)).await.unwrap();
        // The server goes away for a second while parts are still to be sent; the SDK's
        // retries with backoff must carry the upload through.
        srv.kill();
        let back = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(1));
            srv.restart();
            srv
        });
        w.write(Bytes::copy_from_slice(rest)).await.unwrap();
        w.commit().await.unwrap();
        let srv = back.join().unwrap();
        assert!(read_all(&s, "t/logical/outage.dump").await == data);
        assert!(srv.pending_upload_parts().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sse_and_storage_class_are_sent_with_every_upload() {
        let srv = S3Server::start();
        let proxy = datasaver_tests::s3::RecordingProxy::start(srv.port());
        let mut cfg = settings(&srv, "");
        cfg.endpoint = Some(proxy.endpoint());
        cfg.sse = Some(Sse::Aes256);
        cfg.storage_class = Some("REDUCED_REDUNDANCY".into());
        let s = S3Storage::new(cfg).unwrap();
        // one object small enough for PutObject, one multipart, one meta file
        let mut w = s.create("t/logical/small.dump.zst").await.unwrap();
        w.write(Bytes::from_static(b"small")).await.unwrap();
        w.commit().await.unwrap();
        let mut w = s.create("t/logical/big.dump.zst").await.unwrap();
        w.write(Bytes::from(pattern(MIN_PART_SIZE + 5, 9)))
            .await
            .unwrap();
        w.commit().await.unwrap();
        s.put("t/logical/big.meta.json", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        assert_eq!(read_all(&s, "t/logical/small.dump.zst").await, b"small");

        let header = |h: &[(String, String)], name: &str| {
            h.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        };
        let mut uploads = Vec::new();
        for (line, h) in proxy.requests() {
            let starts_object = (line.starts_with("PUT ") && !line.contains("partNumber="))
                || (line.starts_with("POST ") && line.contains("?uploads"));
            if !starts_object {
                continue;
            }
            assert_eq!(
                header(&h, "x-amz-server-side-encryption").as_deref(),
                Some("AES256"),
                "{line}"
            );
            let class = header(&h, "x-amz-storage-class");
            if line.contains(".dump.zst") {
                assert_eq!(class.as_deref(), Some("REDUCED_REDUNDANCY"), "{line}");
            } else {
                // meta files must stay readable at once for a catalog rebuild
                assert_eq!(class, None, "{line}");
            }
            uploads.push(line);
        }
        let path = |k: &str| uploads.iter().any(|l| l.contains(k));
        assert!(
            uploads.len() == 3
                && path("small.dump.zst")
                && path("big.dump.zst?uploads")
                && path("big.meta.json"),
            "{uploads:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn probe_errors_name_the_cause() {
        let srv = S3Server::start();
        let mut bad = settings(&srv, "");
        bad.secret_key = "wrong".into();
        let e = S3Storage::new(bad).unwrap().probe().await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::PermissionDenied, "{e}");
        assert!(e.to_string().contains("SignatureDoesNotMatch"), "{e}");
        assert!(e.to_string().contains("DATASAVER_S3_SECRET_KEY"), "{e}");

        let mut bad = settings(&srv, "");
        bad.access_key = "AKNOBODY".into();
        let e = S3Storage::new(bad).unwrap().probe().await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::PermissionDenied, "{e}");
        assert!(
            e.to_string().contains("does not know the access key"),
            "{e}"
        );
        assert!(!e.to_string().contains("SECRET"), "{e}");

        let mut bad = settings(&srv, "");
        bad.bucket = "no-such-bucket".into();
        let e = S3Storage::new(bad).unwrap().probe().await.unwrap_err();
        assert!(
            e.to_string().contains("\"no-such-bucket\" does not exist"),
            "{e}"
        );

        let mut bad = settings(&srv, "");
        bad.endpoint = Some(format!("http://127.0.0.1:{}", datasaver_tests::free_port()));
        let e = S3Storage::new(bad).unwrap().probe().await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Transient, "{e}");
        assert!(
            e.to_string().contains("cannot reach the S3 endpoint"),
            "{e}"
        );
    }

    /// A stand-in for a server that lists multipart uploads (s3s-fs answers
    /// 501): it lists datasaver's and other applications' uploads under the
    /// prefix, and records which ones it is asked to abort.
    async fn listing_server(
        uploads: Vec<&'static str>,
    ) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        use http_body_util::Full;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let aborted = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = aborted.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (uploads, seen) = (uploads.clone(), seen.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let (uploads, seen) = (uploads.clone(), seen.clone());
                            async move {
                                let query = req.uri().query().unwrap_or("").to_string();
                                let (status, body) = if req.method() == hyper::Method::GET
                                    && query.contains("uploads")
                                {
                                    let items: String = uploads
                                    .iter()
                                    .enumerate()
                                    .map(|(n, k)| format!("<Upload><Key>{k}</Key><UploadId>u{n}</UploadId></Upload>"))
                                    .collect();
                                    (200, format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?><ListMultipartUploadsResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Bucket>b</Bucket><MaxUploads>1000</MaxUploads><IsTruncated>false</IsTruncated>{items}</ListMultipartUploadsResult>"))
                                } else if req.method() == hyper::Method::DELETE
                                    && query.contains("uploadId=")
                                {
                                    seen.lock().unwrap().push(req.uri().path().to_string());
                                    (204, String::new())
                                } else {
                                    (404, String::new())
                                };
                                let mut r = hyper::Response::new(Full::new(Bytes::from(body)));
                                *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                                Ok::<_, std::convert::Infallible>(r)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (format!("http://{addr}"), aborted)
    }

    #[tokio::test]
    async fn startup_cleanup_aborts_only_datasavers_own_uploads() {
        let (endpoint, aborted) = listing_server(vec![
            "shared/ds/app/logical/app_20240101_000000.dump.zst",
            "shared/ds/app/logical/app_20240101_000000.meta.json",
            // another application's upload in progress, under the same prefix
            "shared/ds/videos/raw/upload.mp4",
            "shared/ds/app/logical/export.csv",
        ])
        .await;
        let s = S3Storage::new(S3Settings {
            bucket: "b".into(),
            endpoint: Some(endpoint),
            region: "us-east-1".into(),
            access_key: "k".into(),
            secret_key: "s".into(),
            prefix: "shared/ds/".into(),
            force_path_style: true,
            part_size: MIN_PART_SIZE,
            parts_in_flight: 2,
            max_attempts: 1,
            sse: None,
            storage_class: None,
            ca_pem: None,
        })
        .unwrap();
        let n = s
            .cleanup_incomplete(&crate::repo::keys::is_own_key)
            .await
            .unwrap();
        assert_eq!(n, 2);
        let mut got = aborted.lock().unwrap().clone();
        got.sort();
        assert_eq!(
            got,
            vec![
                "/b/shared/ds/app/logical/app_20240101_000000.dump.zst",
                "/b/shared/ds/app/logical/app_20240101_000000.meta.json",
            ]
        );
    }

    #[tokio::test]
    async fn startup_cleanup_on_a_server_without_upload_listing_is_skipped() {
        let srv = S3Server::start();
        let s = S3Storage::new(settings(&srv, "p/")).unwrap();
        assert_eq!(s.cleanup_incomplete(&|_: &str| true).await.unwrap(), 0);
    }
}
