//! Kiln's gRPC protocol: the code generated from `kiln/v1/kiln.proto` and the one helper that
//! opens a channel to a coordinator. Every other crate reaches the network through here.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("kiln.v1");
}

pub mod page;
pub mod tls;
pub mod transfer;

use std::path::PathBuf;

use kiln_common::run::RunStatus;
use std::time::Duration;

use anyhow::Context as _;
use tonic::transport::{Channel, Endpoint, Uri};

/// Largest gRPC message either side accepts. Blob chunks are far smaller; this bounds the
/// memory a misbehaving peer can make us allocate.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Size of one blob chunk on the wire.
pub const BLOB_CHUNK_BYTES: usize = 256 * 1024;

/// Where a coordinator listens: `https://HOST:PORT` (TLS), `http://HOST:PORT` (a coordinator
/// started with `--insecure`) or `unix:///path/to/socket`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// The URL, `http://` or `https://`.
    Http(String),
    Unix(PathBuf),
}

impl Address {
    /// Parses a coordinator address as a user writes it. A bare `HOST:PORT` means https.
    pub fn parse(text: &str) -> anyhow::Result<Address> {
        if let Some(path) = text.strip_prefix("unix://") {
            anyhow::ensure!(
                path.starts_with('/'),
                "coordinator address `{text}` is invalid: a unix socket address needs an absolute path, e.g. unix:///run/kiln.sock"
            );
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        let url = if text.starts_with("http://") || text.starts_with("https://") {
            text.to_string()
        } else {
            format!("https://{text}")
        };
        let uri = url.parse::<Uri>().ok().filter(|uri| uri.host().is_some());
        anyhow::ensure!(
            uri.is_some(),
            "coordinator address `{text}` is invalid: expected https://HOST:PORT, \
             http://HOST:PORT or unix:///PATH"
        );
        Ok(Address::Http(url))
    }

    /// Whether connections to this address use TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, Address::Http(url) if url.starts_with("https://"))
    }

    /// The host part of an http(s) address (what the server's certificate must name).
    pub fn host(&self) -> Option<String> {
        match self {
            Address::Http(url) => url.parse::<Uri>().ok()?.host().map(str::to_string),
            Address::Unix(_) => None,
        }
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Http(url) => f.write_str(url),
            Address::Unix(path) => write!(f, "unix://{}", path.display()),
        }
    }
}

/// Opens a plaintext channel to a coordinator (a Unix socket, or an `--insecure` one); an
/// https address needs [`connect_with`] and the client's TLS settings.
pub async fn connect(address: &Address) -> anyhow::Result<Channel> {
    connect_with(address, None).await
}

/// Opens a channel to a coordinator, with connect timeout and HTTP/2 keepalive set, over TLS
/// for an https address. The error names the address that was tried.
pub async fn connect_with(
    address: &Address,
    tls: Option<&tls::ClientTls>,
) -> anyhow::Result<Channel> {
    let result = match address {
        Address::Http(url) if address.is_tls() => {
            let Some(tls) = tls else {
                anyhow::bail!(
                    "{address} is a TLS address, but no CA to trust it with is configured \
                     (agents: `kiln-agent join`; users: `kiln login`)"
                );
            };
            let host = address.host().unwrap_or_default();
            tls.configure(endpoint(url)?, &host)
                .with_context(|| format!("cannot reach the coordinator at {address}"))?
                .connect()
                .await
        }
        Address::Http(url) => endpoint(url)?.connect().await,
        Address::Unix(path) => {
            let path = path.clone();
            // The URI is required by the API but unused: the connector decides where to go.
            endpoint("http://localhost")?
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                    }
                }))
                .await
        }
    };
    result.map_err(|error| {
        // The transport error's own text is generic; its causes say what happened.
        let mut causes = Vec::new();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            causes.push(cause.to_string());
            source = cause.source();
        }
        causes.dedup();
        if causes.is_empty() {
            causes.push(error.to_string());
        }
        anyhow::anyhow!(
            "cannot reach the coordinator at {address}: {}",
            causes.join(": ")
        )
    })
}

fn endpoint(url: &str) -> anyhow::Result<Endpoint> {
    Ok(Endpoint::from_shared(url.to_string())
        .with_context(|| format!("invalid coordinator address {url}"))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true))
}

impl From<RunStatus> for v1::RunStatus {
    fn from(status: RunStatus) -> Self {
        match status {
            RunStatus::Queued => v1::RunStatus::Queued,
            RunStatus::Assigned => v1::RunStatus::Assigned,
            RunStatus::Running => v1::RunStatus::Running,
            RunStatus::Succeeded => v1::RunStatus::Succeeded,
            RunStatus::Failed => v1::RunStatus::Failed,
            RunStatus::Cancelled => v1::RunStatus::Cancelled,
            RunStatus::Lost => v1::RunStatus::Lost,
            RunStatus::EnvFailed => v1::RunStatus::EnvFailed,
            RunStatus::Stopping => v1::RunStatus::Stopping,
        }
    }
}

impl v1::RunStatus {
    /// The domain status; an unset status reads as queued.
    pub fn domain(self) -> RunStatus {
        match self {
            v1::RunStatus::Unspecified | v1::RunStatus::Queued => RunStatus::Queued,
            v1::RunStatus::Assigned => RunStatus::Assigned,
            v1::RunStatus::Running => RunStatus::Running,
            v1::RunStatus::Succeeded => RunStatus::Succeeded,
            v1::RunStatus::Failed => RunStatus::Failed,
            v1::RunStatus::Cancelled => RunStatus::Cancelled,
            v1::RunStatus::Lost => RunStatus::Lost,
            v1::RunStatus::EnvFailed => RunStatus::EnvFailed,
            v1::RunStatus::Stopping => RunStatus::Stopping,
        }
    }
}

/// Streams a file as upload chunks of [`BLOB_CHUNK_BYTES`]; the first names the digest and
/// total size. An empty file is one empty chunk, so the digest is always sent.
pub async fn blob_chunks(
    path: &std::path::Path,
    digest: &str,
    total_size: u64,
) -> anyhow::Result<impl futures::Stream<Item = v1::BlobChunk> + Send + 'static> {
    use tokio_stream::StreamExt as _;
    let file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("open {}", path.display()))?;
    let reader = tokio_util::io::ReaderStream::with_capacity(file, BLOB_CHUNK_BYTES);
    let header = v1::BlobChunk {
        digest: digest.to_string(),
        total_size,
        data: Vec::new(),
    };
    // The header chunk carries no data; the file's bytes follow in their own chunks.
    let data = reader.map_while(|data| {
        data.ok().map(|data| v1::BlobChunk {
            data: data.to_vec(),
            ..Default::default()
        })
    });
    Ok(tokio_stream::iter([header]).chain(data))
}

/// A user's API token, sent as `authorization: Bearer TOKEN` on every call; empty for agents
/// (their certificate speaks for them) and for coordinators without authentication.
#[derive(Clone, Default)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    pub fn new(token: &str) -> anyhow::Result<Bearer> {
        let value = format!("Bearer {}", token.trim())
            .parse()
            .context("the API token holds characters that cannot be sent")?;
        Ok(Bearer(Some(value)))
    }

    pub fn none() -> Bearer {
        Bearer(None)
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel whose calls carry a [`Bearer`] token.
pub type AuthChannel = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

/// Client constructors with Kiln's message size limits applied.
pub mod clients {
    use super::*;
    use crate::v1::{
        agent_api_client::AgentApiClient, blobs_client::BlobsClient,
        enrollment_client::EnrollmentClient, kiln_client::KilnClient,
    };

    pub fn kiln(channel: Channel, bearer: Bearer) -> KilnClient<AuthChannel> {
        KilnClient::with_interceptor(channel, bearer)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
    pub fn agent(channel: Channel) -> AgentApiClient<Channel> {
        AgentApiClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
    pub fn blobs(channel: Channel, bearer: Bearer) -> BlobsClient<AuthChannel> {
        BlobsClient::with_interceptor(channel, bearer)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
    pub fn enrollment(channel: Channel) -> EnrollmentClient<Channel> {
        EnrollmentClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses_as_users_write_them() {
        assert_eq!(
            Address::parse("127.0.0.1:7070").unwrap(),
            Address::Http("https://127.0.0.1:7070".into())
        );
        assert!(Address::parse("127.0.0.1:7070").unwrap().is_tls());
        let plain = Address::parse("http://10.0.0.5:7070").unwrap();
        assert!(!plain.is_tls());
        assert_eq!(plain.host().as_deref(), Some("10.0.0.5"));
        assert_eq!(
            Address::parse("unix:///tmp/k.sock").unwrap(),
            Address::Unix("/tmp/k.sock".into())
        );
        let error = Address::parse("unix://relative").unwrap_err().to_string();
        assert!(error.contains("absolute path"), "{error}");
    }
}
