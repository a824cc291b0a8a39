//! gRPC adapters: decode and validate requests, call the [`Coordinator`], map errors to
//! `tonic::Status`. No run logic lives here.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use kiln_common::target::TargetName;
use kiln_proto::page::{fill, page_bytes};
use kiln_proto::v1::{self, agent_api_server::AgentApi, blobs_server::Blobs, kiln_server::Kiln};
use kiln_proto::{BLOB_CHUNK_BYTES, MAX_MESSAGE_BYTES};
use tokio::io::AsyncReadExt as _;
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument as _, info, info_span, warn};

use crate::blobs::BlobError;
use crate::store::{GangSpec, NewRun, TransitionError, is_gang};
use crate::{Coordinator, now_ms};

/// Where the coordinator listens.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, PathBuf),
}

impl Listener {
    /// Binds `listen`: HOST:PORT, or unix:///PATH (a stale socket file is replaced).
    pub async fn bind(listen: &str) -> anyhow::Result<Listener> {
        use anyhow::Context as _;
        if let Some(path) = listen.strip_prefix("unix://") {
            let path = PathBuf::from(path);
            let _ = std::fs::remove_file(&path);
            let listener = tokio::net::UnixListener::bind(&path)
                .with_context(|| format!("listen on {listen}"))?;
            return Ok(Listener::Unix(listener, path));
        }
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listen on {listen}"))?;
        Ok(Listener::Tcp(listener))
    }

    /// The address clients use to reach this listener (https when it serves TLS).
    pub fn address(&self, tls: bool) -> String {
        let scheme = if tls { "https" } else { "http" };
        match self {
            Listener::Tcp(listener) => listener
                .local_addr()
                .map(|a| format!("{scheme}://{a}"))
                .unwrap_or_default(),
            Listener::Unix(_, path) => format!("unix://{}", path.display()),
        }
    }
}

/// Serves the coordinator's gRPC API on `listener` until `shutdown` is cancelled, then
/// stops accepting, lets open calls end (streams end on the same token) and returns.
pub async fn serve(
    coordinator: Arc<Coordinator>,
    listener: Listener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let enrollment = crate::join::enrollment_service(coordinator.clone());
    let limits = crate::conns::ConnectionLimits::new(
        coordinator.config.max_connections,
        coordinator.config.max_connections_per_ip,
    );
    let mut builder = tonic::transport::Server::builder();
    if let Some(pki) = &coordinator.config.pki {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        let (chain, key) = pki.server_identity();
        // Client certificates are optional at the handshake (users present API tokens
        // instead), but one that is presented must be signed by the CA and valid; which
        // calls need one is decided per call (`auth.rs`).
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(chain, key))
            .client_ca_root(Certificate::from_pem(pki.ca_pem()))
            .client_auth_optional(true)
            .timeout(std::time::Duration::from_secs(10));
        builder = builder
            .tls_config(tls)
            .map_err(|error| anyhow::anyhow!("configure TLS: {error}"))?;
    }
    let api = Api(coordinator);
    let router = builder
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(20)))
        .add_service(
            v1::kiln_server::KilnServer::new(api.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            v1::agent_api_server::AgentApiServer::new(api.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            // Clients send chunks of BLOB_CHUNK_BYTES: a larger cap on what one message may
            // be only lets a stalled upload hold more memory while it waits.
            v1::blobs_server::BlobsServer::new(api)
                .max_decoding_message_size(MAX_UPLOAD_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(enrollment);
    match listener {
        Listener::Tcp(listener) => {
            // Options on the builder do not reach connections from a custom incoming stream:
            // without TCP_NODELAY each small log frame waits for a delayed ACK (~40 ms).
            let incoming = tonic::transport::server::TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .with_keepalive(Some(std::time::Duration::from_secs(60)));
            let incoming = crate::conns::limit(incoming, limits);
            router
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
                .await?
        }
        Listener::Unix(listener, path) => {
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let result = router
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
                .await;
            let _ = std::fs::remove_file(path);
            result?
        }
    }
    Ok(())
}

/// Most bytes one message of an upload may have: 4 chunks' worth.
const MAX_UPLOAD_MESSAGE_BYTES: usize = 4 * BLOB_CHUNK_BYTES;

/// The next chunk of an upload; a stream that sends nothing for `stall` is an error.
async fn next_chunk(
    chunks: &mut Streaming<v1::BlobChunk>,
    stall: std::time::Duration,
) -> Result<Option<v1::BlobChunk>, Status> {
    match tokio::time::timeout(stall, chunks.next()).await {
        Ok(next) => next.transpose(),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "upload stalled: nothing arrived for {} s; the partial upload was dropped, try again",
            stall.as_secs()
        ))),
    }
}

#[derive(Clone)]
struct Api(Arc<Coordinator>);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

pub(crate) fn internal(error: anyhow::Error) -> Status {
    warn!(error = %format!("{error:#}"), "Request failed.");
    Status::internal(format!("{error:#}"))
}

impl From<TransitionError> for Status {
    fn from(error: TransitionError) -> Status {
        match error {
            TransitionError::NoSuchRun(id) => Status::not_found(format!("run {id} does not exist")),
            TransitionError::Invalid(e) => Status::failed_precondition(e.to_string()),
            TransitionError::Db(e) => internal(e),
        }
    }
}

impl From<BlobError> for Status {
    fn from(error: BlobError) -> Status {
        match error {
            BlobError::BadDigest(_) | BlobError::DigestMismatch { .. } => {
                Status::invalid_argument(error.to_string())
            }
            BlobError::NotFound(_) => Status::not_found(error.to_string()),
            BlobError::TooLarge { .. } => Status::resource_exhausted(error.to_string()),
            BlobError::Io(e) => internal(e),
        }
    }
}

/// The lists a page token continues. A token is opaque to clients; here it is a letter
/// naming the list and the position of the last item sent (a run id, a metric name, an
/// agent's `target/id`), so a stale token resumes at the right place and never repeats or
/// skips an item that still exists.
#[derive(Clone, Copy)]
enum PageToken {
    Runs,
    Metrics,
    MetricPoints,
    Agents,
}

impl PageToken {
    fn tag(self) -> &'static str {
        match self {
            PageToken::Runs => "r",
            PageToken::Metrics => "m",
            PageToken::MetricPoints => "p",
            PageToken::Agents => "a",
        }
    }

    fn encode(self, position: &str) -> String {
        format!("{}{position}", self.tag())
    }

    /// The position a request's token names; `None` for the first page.
    fn decode(self, token: &str) -> Result<Option<&str>, Status> {
        if token.is_empty() {
            return Ok(None);
        }
        token
            .strip_prefix(self.tag())
            .map(Some)
            .ok_or_else(|| self.invalid())
    }

    fn invalid(self) -> Status {
        let call = match self {
            PageToken::Runs => "ListRuns",
            PageToken::Metrics => "ListMetrics",
            PageToken::MetricPoints => "GetMetricSeries",
            PageToken::Agents => "ListAgents",
        };
        Status::invalid_argument(format!(
            "page_token is not one a {call} reply gave: pass the previous reply's next_page_token, or none for the first page"
        ))
    }
}

/// Checks a script path from a submission: relative, inside the snapshot.
fn validate_script(script: &str) -> Result<(), Status> {
    let path = std::path::Path::new(script);
    let escapes = path.components().any(|c| {
        !matches!(
            c,
            std::path::Component::Normal(_) | std::path::Component::CurDir
        )
    });
    if script.is_empty() || escapes {
        return Err(Status::invalid_argument(format!(
            "script `{script}` is invalid: give a path relative to the submitted directory, e.g. train.py or src/train.py"
        )));
    }
    Ok(())
}

/// Checks the run configuration's environment: spec files must be relative paths inside the
/// snapshot, variable names must be usable.
fn validate_environment(
    environment: Option<&v1::Environment>,
    env: &std::collections::HashMap<String, String>,
) -> Result<(), Status> {
    use v1::environment::Kind;
    let relative = |what: &str, path: &str, required: bool| -> Result<(), Status> {
        if path.is_empty() && !required {
            return Ok(());
        }
        let inside = !path.is_empty()
            && std::path::Path::new(path).components().all(|c| {
                matches!(
                    c,
                    std::path::Component::Normal(_) | std::path::Component::CurDir
                )
            });
        if inside {
            Ok(())
        } else {
            Err(Status::invalid_argument(format!(
                "{what} `{path}` must be a path inside the submitted directory"
            )))
        }
    };
    match environment.and_then(|e| e.kind.as_ref()) {
        Some(Kind::Conda(conda)) => relative("environment.conda.file", &conda.file, true)?,
        Some(Kind::Venv(venv)) => {
            relative("environment.venv.requirements", &venv.requirements, true)?
        }
        Some(Kind::Docker(docker)) => relative("environment.docker.conda", &docker.conda, false)?,
        Some(Kind::User(_)) | None => {}
    }
    for (key, value) in env {
        // Sizes were checked before (`limits::check_submission`).
        let valid = !key.is_empty()
            && !key.starts_with(|c: char| c.is_ascii_digit())
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid || value.contains('\0') {
            return Err(Status::invalid_argument(format!(
                "environment variable `{key}` is invalid: names are letters, digits and _ (not starting with a digit); values have no NUL"
            )));
        }
    }
    Ok(())
}

/// Secrets are variables like `env`'s (names of letters, digits and _, values without NUL;
/// sizes were checked with `env`'s), and none is also in `env`: a value would else be
/// stored in the clear beside its sealed copy.
fn validate_secrets(
    secrets: &std::collections::HashMap<String, String>,
    env: &std::collections::HashMap<String, String>,
) -> Result<(), Status> {
    for (name, value) in secrets {
        let valid = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid || value.contains('\0') {
            return Err(Status::invalid_argument(format!(
                "secret `{name}` is invalid: names are letters, digits and _ (not starting with a digit); values have no NUL"
            )));
        }
        if env.contains_key(name) {
            return Err(Status::invalid_argument(format!(
                "`{name}` is both a secret and an --env variable: give it once, as a secret"
            )));
        }
    }
    Ok(())
}

/// Refuses a run that no set of the target's agents could ever hold: more nodes than agents,
/// or a per-node request (CPUs, memory, GPUs) larger than every agent. The message names the
/// largest agent's capacity. Targets do not autoscale, so such a run would wait forever.
async fn refuse_if_never_placeable(
    coordinator: &Coordinator,
    request: &v1::SubmitRunRequest,
    target: &TargetName,
    nodes: u32,
) -> Result<(), Status> {
    let run = v1::Run {
        resources: request.resources,
        gpus_per_node: request.gpus_per_node,
        ..Default::default()
    };
    let need = crate::need_of(&run);
    if nodes <= 1 && need == crate::scheduler::Need::default() {
        return Ok(());
    }
    let name = target.to_string();
    let hosts: Vec<v1::HostInfo> = coordinator
        .db
        .call(move |s| s.list_agents())
        .await
        .map_err(internal)?
        .into_iter()
        .filter(|agent| agent.target == name)
        .map(|agent| agent.host)
        .collect();
    let fitting = hosts.iter().filter(|host| need.fits_host(host)).count();
    if fitting >= nodes as usize {
        return Ok(());
    }
    let mut wants = Vec::new();
    if need.cpus > 0 {
        wants.push(format!("{} CPUs", need.cpus));
    }
    if need.memory_bytes > 0 {
        wants.push(format!("{} memory", human_bytes(need.memory_bytes)));
    }
    if need.gpus > 0 {
        wants.push(format!("{} GPUs", need.gpus));
    }
    let each = if wants.is_empty() {
        String::new()
    } else {
        format!(" with {} each", wants.join(", "))
    };
    let nodes_text = if nodes == 1 {
        "1 node".to_string()
    } else {
        format!("{nodes} nodes")
    };
    let have = if wants.is_empty() {
        format!("it has {} agents", hosts.len())
    } else {
        format!("{fitting} of its {} agents can hold that", hosts.len())
    };
    let largest = hosts
        .iter()
        .max_by_key(|h| (h.gpus.len(), h.cpus, h.memory_bytes))
        .map(|h| {
            format!(
                "; the largest agent has {} CPUs, {} memory and {} GPUs",
                h.cpus,
                human_bytes(h.memory_bytes),
                h.gpus.len()
            )
        })
        .unwrap_or_default();
    Err(Status::failed_precondition(format!(
        "target `{target}` can never run this: the run needs {nodes_text}{each} but {have}{largest} (targets do not autoscale yet: add agents with `kiln-agent --target {target}`)"
    )))
}

fn human_bytes(bytes: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    if bytes as f64 >= GIB {
        format!("{:.1} GiB", bytes as f64 / GIB)
    } else {
        format!("{:.0} MiB", bytes as f64 / MIB)
    }
}

/// Checks what an agent says about itself: sizes a real host never exceeds.
fn validate_host(host: Option<&v1::HostInfo>, slots: u32) -> Result<(), Status> {
    let invalid = |what: String| Err(Status::invalid_argument(format!("hello: {what}")));
    if slots > 4096 {
        return invalid(format!("{slots} slots is more than 4096"));
    }
    let Some(host) = host else { return Ok(()) };
    let texts = [
        ("hostname", &host.hostname),
        ("os", &host.os),
        ("agent_version", &host.agent_version),
        ("cuda_driver_version", &host.cuda_driver_version),
        ("gpu_probe_error", &host.gpu_probe_error),
        ("advertise_address", &host.advertise_address),
    ];
    for (name, text) in texts {
        if text.len() > 1024 {
            return invalid(format!("{name} is longer than 1024 bytes"));
        }
    }
    if !host.advertise_address.is_empty()
        && host.advertise_address.parse::<std::net::IpAddr>().is_err()
    {
        return invalid(format!(
            "advertise_address `{}` is not an IP address",
            host.advertise_address
        ));
    }
    if host.gpus.len() > 256 {
        return invalid(format!("{} GPUs is more than 256", host.gpus.len()));
    }
    if host
        .gpus
        .iter()
        .any(|gpu| gpu.name.len() > 256 || gpu.uuid.len() > 256)
    {
        return invalid("a GPU name or UUID is longer than 256 bytes".to_string());
    }
    Ok(())
}

/// Most nodes and processes per node a run may ask for.
const MAX_NODES: u32 = 1024;
const MAX_PROCS_PER_NODE: u32 = 256;

fn validate_gang(request: &v1::SubmitRunRequest) -> Result<GangSpec, Status> {
    let nodes = request.nodes.max(1);
    let procs_per_node = request.procs_per_node.max(1);
    if nodes > MAX_NODES {
        return Err(Status::invalid_argument(format!(
            "--nodes {nodes} is too many (at most {MAX_NODES})"
        )));
    }
    if procs_per_node > MAX_PROCS_PER_NODE {
        return Err(Status::invalid_argument(format!(
            "--procs-per-node {procs_per_node} is too many (at most {MAX_PROCS_PER_NODE})"
        )));
    }
    let launcher = match request.launcher.as_str() {
        "" | "kiln" => "kiln",
        "none" => "none",
        other => {
            return Err(Status::invalid_argument(format!(
                "unknown launcher `{other}`: use `kiln` (Kiln starts --procs-per-node processes) or `none` (one process per node launches its own workers)"
            )));
        }
    };
    if request.max_restarts > 0 && nodes == 1 && procs_per_node == 1 {
        return Err(Status::invalid_argument(
            "--max-restarts is for multi-node or multi-process runs; a single-process run uses --max-retries",
        ));
    }
    Ok(GangSpec {
        nodes,
        procs_per_node,
        gpus_per_node: request.gpus_per_node,
        launcher: launcher.to_string(),
        max_restarts: request.max_restarts,
    })
}

#[tonic::async_trait]
impl Kiln for Api {
    async fn version(
        &self,
        request: Request<v1::VersionRequest>,
    ) -> Result<Response<v1::VersionReply>, Status> {
        self.0.authenticate(&request).await?.user()?;
        Ok(Response::new(v1::VersionReply {
            version: kiln_common::VERSION.to_string(),
        }))
    }

    async fn submit_run(
        &self,
        request: Request<v1::SubmitRunRequest>,
    ) -> Result<Response<v1::Run>, Status> {
        let caller = self.0.authenticate(&request).await?;
        let user = caller.clone().user()?;
        let request = request.into_inner();
        // Sizes first: the checks below may repeat a field in their messages.
        crate::limits::check_submission(&request).map_err(Status::invalid_argument)?;
        let target = TargetName::new(&request.target)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        validate_script(&request.script)?;
        // Someone else's snapshot is answered as a missing one: a run on it would let its
        // submitter read it (`Store::blob_readable`).
        let stored = self.0.blobs.size(&request.snapshot_digest).await?.is_some();
        if !stored
            || !self
                .0
                .may_read_blob(&caller, &request.snapshot_digest)
                .await
                .map_err(internal)?
        {
            return Err(Status::failed_precondition(format!(
                "snapshot {} has not been uploaded to the coordinator",
                request.snapshot_digest
            )));
        }
        let known = self
            .0
            .db
            .call(|s| s.target_names())
            .await
            .map_err(internal)?;
        if !known.iter().any(|name| name == target.as_str()) {
            let known = if known.is_empty() {
                "none yet: start a kiln-agent with --target NAME".to_string()
            } else {
                known.join(", ")
            };
            return Err(Status::not_found(format!(
                "target `{target}` does not exist (known targets: {known})"
            )));
        }
        let gang = validate_gang(&request)?;
        validate_environment(request.environment.as_ref(), &request.env)?;
        validate_secrets(&request.secrets, &request.env)?;
        refuse_if_never_placeable(&self.0, &request, &target, gang.nodes).await?;
        let name = if request.name.is_empty() {
            std::path::Path::new(&request.script)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "run".into())
        } else {
            request.name
        };
        let mut secret_names: Vec<String> = request.secrets.keys().cloned().collect();
        secret_names.sort();
        // Only sealed bytes reach the database (see `secrets.rs`).
        let sealed_secrets = self.0.secrets.seal(&request.secrets).map_err(internal)?;
        let default_cap = self.0.config.max_queued_per_user;
        let run = self
            .0
            .db
            .call(move |s| {
                // Counted and inserted in one call: concurrent submissions cannot both slip
                // under the cap. An admin may have given this user a cap of their own.
                let cap = match s.user_max_queued(&user.name)? {
                    Some(own) => (own, true),
                    None => (default_cap, false),
                };
                let queued = s.queued_runs_of(&user.name)?;
                if queued >= u64::from(cap.0) {
                    return Ok(Err((queued, cap)));
                }
                s.insert_run(&NewRun {
                    name: &name,
                    target: target.as_str(),
                    snapshot_digest: &request.snapshot_digest,
                    script: &request.script,
                    args: &request.args,
                    max_retries: request.max_retries,
                    checkpoint_interval_s: request.checkpoint_interval_s,
                    gang,
                    environment: request.environment.as_ref(),
                    resources: request.resources.as_ref(),
                    env: &request.env,
                    secret_names: &secret_names,
                    sealed_secrets: sealed_secrets.as_deref(),
                    timeout_s: request.timeout_s,
                    owner: &user.name,
                    now_ms: now_ms(),
                })
                .map(Ok)
            })
            .await
            .map_err(internal)?
            .map_err(|(queued, (cap, own))| {
                let limit = if own {
                    format!("your own limit, {cap}, set by an admin")
                } else {
                    format!("max_queued_per_user = {cap}")
                };
                Status::resource_exhausted(format!(
                    "you have {queued} runs queued, the most you may have ({limit}): wait for \
                     some to start, or cancel some (`kiln runs`, `kiln cancel RUN`)"
                ))
            })?;
        info!(run_id = run.id, target = %run.target, snapshot = %run.snapshot_digest, owner = %run.owner, "Run submitted.");
        self.0.run_changed(run.id);
        self.0.kick_scheduler();
        Ok(Response::new(run))
    }

    async fn get_run(
        &self,
        request: Request<v1::GetRunRequest>,
    ) -> Result<Response<v1::Run>, Status> {
        let user = self.0.authenticate(&request).await?.user()?;
        let mut run = self
            .accessible_run(&user, request.into_inner().run_id)
            .await?;
        self.0
            .explain_waiting(std::slice::from_mut(&mut run))
            .await
            .map_err(internal)?;
        Ok(Response::new(run))
    }

    async fn list_runs(
        &self,
        request: Request<v1::ListRunsRequest>,
    ) -> Result<Response<v1::ListRunsReply>, Status> {
        let user = self.0.authenticate(&request).await?.user()?;
        // Members see their own runs only.
        let owner = (!user.admin).then_some(user.name);
        let request = request.into_inner();
        let limit = if request.limit == 0 {
            100
        } else {
            request.limit
        };
        let before_id = PageToken::Runs.decode(&request.page_token)?;
        let before_id = match before_id.map(str::parse::<i64>) {
            None => None,
            Some(Ok(id)) => Some(id),
            Some(Err(_)) => return Err(PageToken::Runs.invalid()),
        };
        let max_bytes = page_bytes(request.max_page_bytes);
        let target = (!request.target.is_empty()).then_some(request.target);
        let page = self
            .0
            .db
            .call(move |s| {
                s.list_runs(
                    target.as_deref(),
                    owner.as_deref(),
                    before_id,
                    max_bytes,
                    limit,
                )
            })
            .await
            .map_err(internal)?;
        let next_page_token = match page.items.last() {
            Some(last) if page.more => PageToken::Runs.encode(&last.id.to_string()),
            _ => String::new(),
        };
        // A short sentence per queued run, on top of the page's byte budget.
        let mut runs = page.items;
        self.0.explain_waiting(&mut runs).await.map_err(internal)?;
        Ok(Response::new(v1::ListRunsReply {
            runs,
            next_page_token,
        }))
    }

    async fn cancel_run(
        &self,
        request: Request<v1::CancelRunRequest>,
    ) -> Result<Response<v1::Run>, Status> {
        let user = self.0.authenticate(&request).await?.user()?;
        let run = self
            .accessible_run(&user, request.into_inner().run_id)
            .await?;
        info!(run_id = run.id, by = %user.name, "Cancel requested.");
        let run = self.0.cancel(run.id).await?;
        Ok(Response::new(run))
    }

    type StreamLogsStream = BoxStream<v1::LogStreamItem>;

    async fn stream_logs(
        &self,
        request: Request<v1::StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        let user = self.0.authenticate(&request).await?.user()?;
        let request = request.into_inner();
        let run_id = request.run_id;
        let run = self.accessible_run(&user, run_id).await?;
        if let Some(pruned) = run.pruned_unix_ms {
            let days = (pruned - run.finished_unix_ms.unwrap_or(pruned)) / 86_400_000;
            return Err(Status::failed_precondition(format!(
                "run {run_id}'s logs were removed by housekeeping {days} days after it ended \
                 (the coordinator's run_retention); `kiln show {run_id}` still has its record"
            )));
        }
        // Each item holds up to a page of bytes: buffer two, not more.
        let (tx, rx) = mpsc::channel(2);
        let coordinator = self.0.clone();
        tokio::spawn(
            follow_logs(coordinator, request, tx).instrument(info_span!("stream_logs", run_id)),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_metrics(
        &self,
        request: Request<v1::ListMetricsRequest>,
    ) -> Result<Response<v1::ListMetricsReply>, Status> {
        let user = self.0.authenticate(&request).await?.user()?;
        let request = request.into_inner();
        let run_id = request.run_id;
        let run = self.accessible_run(&user, run_id).await?;
        // A gang's metrics are per rank: rank 0's unless another is asked for.
        let rank = request.rank.or(is_gang(&run).then_some(0));
        let after_name = PageToken::Metrics
            .decode(&request.page_token)?
            .map(str::to_string);
        let max_bytes = page_bytes(request.max_page_bytes);
        let page = self
            .0
            .db
            .call(move |s| s.metric_summaries_page(run_id, rank, after_name.as_deref(), max_bytes))
            .await
            .map_err(internal)?;
        let next_page_token = match page.items.last() {
            Some(last) if page.more => PageToken::Metrics.encode(&last.name),
            _ => String::new(),
        };
        Ok(Response::new(v1::ListMetricsReply {
            metrics: page.items,
            next_page_token,
        }))
    }

    async fn get_metric_series(
        &self,
        request: Request<v1::GetMetricSeriesRequest>,
    ) -> Result<Response<v1::GetMetricSeriesReply>, Status> {
        let user = self.0.authenticate(&request).await?.user()?;
        let request = request.into_inner();
        let run_id = request.run_id;
        let run = self.accessible_run(&user, run_id).await?;
        let rank = request.rank.or(is_gang(&run).then_some(0));
        let after_id: i64 = match PageToken::MetricPoints.decode(&request.page_token)? {
            None => 0,
            Some(position) => position
                .parse()
                .map_err(|_| PageToken::MetricPoints.invalid())?,
        };
        let max_bytes = page_bytes(request.max_page_bytes);
        let name = request.name;
        let page = self
            .0
            .db
            .call(move |s| s.metric_points_page(run_id, &name, rank, after_id, max_bytes))
            .await
            .map_err(internal)?;
        let next_page_token = match page.items.last() {
            Some(last) if page.more => PageToken::MetricPoints.encode(&last.cursor.to_string()),
            _ => String::new(),
        };
        Ok(Response::new(v1::GetMetricSeriesReply {
            points: page.items,
            next_page_token,
        }))
    }

    async fn list_targets(
        &self,
        request: Request<v1::ListTargetsRequest>,
    ) -> Result<Response<v1::ListTargetsReply>, Status> {
        self.0.authenticate(&request).await?.user()?;
        let targets = self
            .0
            .db
            .call(|s| s.list_targets())
            .await
            .map_err(internal)?;
        Ok(Response::new(v1::ListTargetsReply { targets }))
    }

    async fn list_agents(
        &self,
        request: Request<v1::ListAgentsRequest>,
    ) -> Result<Response<v1::ListAgentsReply>, Status> {
        self.0.authenticate(&request).await?.user()?;
        let request = request.into_inner();
        // Agents are listed by (target, id); the token names the last one sent.
        let after = match PageToken::Agents.decode(&request.page_token)? {
            None => None,
            Some(after) => Some(
                after
                    .split_once('/')
                    .ok_or_else(|| PageToken::Agents.invalid())?,
            ),
        };
        let (rows, active) = self
            .0
            .db
            .call(|s| anyhow::Ok((s.list_agents()?, s.active_runs_per_agent()?)))
            .await
            .map_err(internal)?;
        let agents = rows
            .into_iter()
            .filter(|row| after.is_none_or(|after| (row.target.as_str(), row.id.as_str()) > after))
            .map(|row| v1::Agent {
                runs_active: active.get(&row.id).copied().unwrap_or(0),
                id: row.id,
                target: row.target,
                host: Some(row.host),
                slots: row.slots,
                state: row.state,
                last_heartbeat_unix_ms: row.last_heartbeat_ms,
                environments: row.environments,
                conflict: row.conflict,
                conflict_unix_ms: row.conflict_ms,
            })
            .map(Ok::<_, std::convert::Infallible>);
        let Ok(page) = fill(agents, page_bytes(request.max_page_bytes), usize::MAX);
        let next_page_token = match page.items.last() {
            Some(last) if page.more => {
                PageToken::Agents.encode(&format!("{}/{}", last.target, last.id))
            }
            _ => String::new(),
        };
        Ok(Response::new(v1::ListAgentsReply {
            agents: page.items,
            next_page_token,
        }))
    }

    async fn who_am_i(
        &self,
        request: Request<v1::WhoAmIRequest>,
    ) -> Result<Response<v1::WhoAmIReply>, Status> {
        let user = self.0.authenticate(&request).await?.user()?;
        Ok(Response::new(v1::WhoAmIReply {
            authenticated: self.0.config.pki.is_some(),
            role: if user.admin { "admin" } else { "member" }.to_string(),
            user: user.name,
        }))
    }

    async fn revoke_agent(
        &self,
        request: Request<v1::RevokeAgentRequest>,
    ) -> Result<Response<v1::Agent>, Status> {
        let user = self
            .0
            .authenticate(&request)
            .await?
            .admin("revoke agents")?;
        let agent = request.into_inner().agent;
        info!(agent = %agent, by = %user.name, "Agent revocation requested.");
        Ok(Response::new(self.0.revoke_agent(&agent).await?))
    }

    async fn forget_agent(
        &self,
        request: Request<v1::ForgetAgentRequest>,
    ) -> Result<Response<v1::Agent>, Status> {
        let user = self
            .0
            .authenticate(&request)
            .await?
            .admin("forget agents")?;
        let agent = request.into_inner().agent;
        info!(agent = %agent, by = %user.name, "Agent forget requested.");
        Ok(Response::new(self.0.forget_agent(&agent).await?))
    }

    async fn delete_target(
        &self,
        request: Request<v1::DeleteTargetRequest>,
    ) -> Result<Response<v1::DeleteTargetReply>, Status> {
        let user = self
            .0
            .authenticate(&request)
            .await?
            .admin("delete targets")?;
        let name = request.into_inner().name;
        info!(target_name = %name, by = %user.name, "Target deletion requested.");
        self.0.delete_target(&name).await?;
        Ok(Response::new(v1::DeleteTargetReply {}))
    }
}

impl Api {
    /// The run, if `user` may see it: admins see every run, members their own.
    async fn accessible_run(
        &self,
        user: &crate::auth::User,
        run_id: i64,
    ) -> Result<v1::Run, Status> {
        let run = self
            .0
            .db
            .call(move |s| s.get_run(run_id))
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("run {run_id} does not exist")))?;
        if !user.may_access(&run.owner) {
            return Err(Status::permission_denied(format!(
                "run {run_id} belongs to `{}`: members may only see and cancel their own runs",
                run.owner
            )));
        }
        Ok(run)
    }
}

/// Sends a run's log lines after the request's cursor; when following, waits for more until
/// the run has ended and every stored line was sent.
async fn follow_logs(
    coordinator: Arc<Coordinator>,
    request: v1::StreamLogsRequest,
    tx: mpsc::Sender<Result<v1::LogStreamItem, Status>>,
) {
    // Lines per item, besides the byte cap: a follower gets a first item quickly.
    const PAGE_LINES: usize = 2000;
    let run_id = request.run_id;
    let max_bytes = page_bytes(request.max_page_bytes);
    // Subscribe before the first read so that no change between read and wait is missed.
    let mut changes = coordinator.run_changes.subscribe();
    let mut cursor = request.after_cursor;
    loop {
        // The status is read before the lines: if the run had ended by then, every line it
        // will ever have is already stored and the read below sees it.
        let page = coordinator
            .db
            .call(move |s| {
                anyhow::Ok((
                    s.get_run(run_id)?,
                    s.read_logs_page(run_id, cursor, request.rank, max_bytes, PAGE_LINES)?,
                ))
            })
            .await;
        let (run, page) = match page {
            Ok((Some(run), page)) => (run, page),
            Ok((None, _)) => return,
            Err(error) => {
                let _ = tx.send(Err(internal(error))).await;
                return;
            }
        };
        if let Some(last) = page.items.last() {
            cursor = last.cursor;
            let item = v1::LogStreamItem {
                lines: page.items,
                finished: None,
            };
            if tx.send(Ok(item)).await.is_err() {
                return;
            }
        }
        if page.more {
            continue;
        }
        if !request.follow {
            return;
        }
        if run.status().domain().is_terminal() {
            let _ = tx
                .send(Ok(v1::LogStreamItem {
                    lines: Vec::new(),
                    finished: Some(run),
                }))
                .await;
            return;
        }
        loop {
            tokio::select! {
                _ = coordinator.shutdown.cancelled() => return,
                _ = tx.closed() => return,
                change = changes.recv() => match change {
                    Ok(id) if id == run_id => break,
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }
}

#[tonic::async_trait]
impl AgentApi for Api {
    type SessionStream = BoxStream<v1::CoordinatorMessage>;

    async fn session(
        &self,
        request: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let identity = self.0.authenticate(&request).await?.agent()?;
        let peer = request.remote_addr().map(|addr| addr.ip());
        let mut inbound = request.into_inner();
        let hello = match inbound.next().await {
            Some(Ok(v1::AgentMessage {
                kind: Some(v1::agent_message::Kind::Hello(hello)),
            })) => hello,
            Some(Err(status)) => return Err(status),
            _ => {
                return Err(Status::invalid_argument(
                    "an agent session must start with hello",
                ));
            }
        };
        TargetName::new(&hello.target).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if hello.agent_id.is_empty() || hello.agent_id.len() > 64 {
            return Err(Status::invalid_argument(
                "agent id must be 1 to 64 characters",
            ));
        }
        validate_host(hello.host.as_ref(), hello.slots)?;
        if hello.instance.len() > 128 || hello.boot_id.len() > 128 {
            return Err(Status::invalid_argument(
                "hello: instance and boot_id are at most 128 bytes",
            ));
        }
        // An authenticated agent is who its certificate says, in the target it joined.
        if let Some((id, target)) = &identity {
            if &hello.agent_id != id {
                warn!(certificate = %id, hello = %hello.agent_id, "Agent hello names another agent.");
                return Err(Status::permission_denied(format!(
                    "this certificate belongs to agent {id}, not to {}",
                    hello.agent_id
                )));
            }
            if &hello.target != target {
                return Err(Status::permission_denied(format!(
                    "agent {id} joined target `{target}`, not `{}`: join again to change targets",
                    hello.target
                )));
            }
        }
        let id = hello.agent_id.clone();
        let revoked = self
            .0
            .db
            .call(move |s| s.agent_identity(&id))
            .await
            .map_err(internal)?
            .is_some_and(|identity| identity.revoked_ms.is_some());
        if revoked {
            return Err(Status::permission_denied(format!(
                "agent {} was revoked: join again with a new token",
                hello.agent_id
            )));
        }
        let (tx, rx) = mpsc::channel(1024);
        tx.try_send(Ok(v1::CoordinatorMessage {
            kind: Some(v1::coordinator_message::Kind::Welcome(v1::Welcome {
                coordinator_version: kiln_common::VERSION.to_string(),
                heartbeat_ttl_ms: self.0.config.heartbeat_ttl.as_millis() as u64,
                disconnect_grace_ms: self.0.config.disconnect_grace.as_millis() as u64,
            })),
        }))
        .expect("a new channel has room");
        let agent_id = hello.agent_id.clone();
        let coordinator = self.0.clone();
        let closed = CancellationToken::new();
        let session_id = coordinator
            .agent_connected(hello, peer, tx.clone(), closed.clone())
            .await
            .map_err(|error| match error {
                crate::HelloError::LiveSession(message) => Status::already_exists(message),
                crate::HelloError::Failed(error) => internal(error),
            })?;
        let span = info_span!("agent_session", agent_id = %agent_id);
        tokio::spawn(
            async move {
                loop {
                    let message = tokio::select! {
                        _ = coordinator.shutdown.cancelled() => break,
                        _ = closed.cancelled() => {
                            let _ = tx
                                .send(Err(Status::unavailable(
                                    "this session was closed (the agent was declared lost or connected again): reconnect",
                                )))
                                .await;
                            break;
                        }
                        message = inbound.next() => message,
                    };
                    let kind = match message {
                        Some(Ok(v1::AgentMessage { kind: Some(kind) })) => kind,
                        Some(Ok(_)) => continue,
                        Some(Err(status)) => {
                            info!(error = %status.message(), "Agent stream broke.");
                            break;
                        }
                        None => break,
                    };
                    match coordinator.agent_message(&agent_id, kind).await {
                        Ok(Some(reply)) => {
                            if tx.send(Ok(reply)).await.is_err() {
                                break;
                            }
                        }
                        Ok(None) => {}
                        Err(error) => {
                            warn!(error = %format!("{error:#}"), "Agent message failed; closing the session.");
                            let _ = tx.send(Err(Status::internal(format!("{error:#}")))).await;
                            break;
                        }
                    }
                }
                coordinator.agent_disconnected(&agent_id, session_id).await;
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl Blobs for Api {
    async fn has_blob(
        &self,
        request: Request<v1::HasBlobRequest>,
    ) -> Result<Response<v1::HasBlobReply>, Status> {
        let caller = self.0.authenticate(&request).await?;
        let digest = request.into_inner().digest;
        // A blob the caller may not read is answered as missing: no existence oracle. An
        // uploader of the same bytes becomes an owner by uploading them (`upload_blob`).
        let mut size = self.0.blobs.size(&digest).await?;
        if size.is_some()
            && !self
                .0
                .may_read_blob(&caller, &digest)
                .await
                .map_err(internal)?
        {
            size = None;
        }
        if size.is_some() {
            // The caller may submit a run on it next: the blob sweep's grace starts again.
            self.0.blobs.touch(&digest).await;
        }
        Ok(Response::new(v1::HasBlobReply {
            present: size.is_some(),
            size: size.unwrap_or(0),
        }))
    }

    async fn upload_blob(
        &self,
        request: Request<Streaming<v1::BlobChunk>>,
    ) -> Result<Response<v1::UploadBlobReply>, Status> {
        let caller = self.0.authenticate(&request).await?;
        let mut chunks = request.into_inner();
        let stall = self.0.config.upload_stall_timeout;
        let first = next_chunk(&mut chunks, stall)
            .await?
            .ok_or_else(|| Status::invalid_argument("empty upload"))?;
        let digest = first.digest.clone();
        let mut writer = self.0.blobs.writer(&digest).await?;
        let mut chunk = Some(first);
        while let Some(current) = chunk.take() {
            if let Err(error) = writer.write(&current.data).await {
                self.0.blobs.abort(writer).await;
                return Err(error.into());
            }
            match next_chunk(&mut chunks, stall).await {
                Ok(Some(next)) => chunk = Some(next),
                Err(status) => {
                    self.0.blobs.abort(writer).await;
                    return Err(status);
                }
                Ok(None) => {}
            }
        }
        let size = self.0.blobs.commit(writer).await?;
        // The bytes hashed to the digest: the caller holds them, stored before or not.
        self.0
            .blob_uploaded(&caller, &digest)
            .await
            .map_err(internal)?;
        info!(digest = %digest, size, "Blob stored.");
        Ok(Response::new(v1::UploadBlobReply { digest, size }))
    }

    type DownloadBlobStream = BoxStream<v1::BlobChunk>;

    async fn download_blob(
        &self,
        request: Request<v1::DownloadBlobRequest>,
    ) -> Result<Response<Self::DownloadBlobStream>, Status> {
        let caller = self.0.authenticate(&request).await?;
        let digest = request.into_inner().digest;
        self.0.blobs.path(&digest)?;
        if !self
            .0
            .may_read_blob(&caller, &digest)
            .await
            .map_err(internal)?
        {
            // The very answer a missing blob gets.
            return Err(BlobError::NotFound(digest).into());
        }
        let mut file = self.0.blobs.open_read(&digest).await?;
        let total_size = file.metadata().await.map(|m| m.len()).unwrap_or(0);
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut first = true;
            loop {
                let mut data = vec![0u8; BLOB_CHUNK_BYTES];
                let n = match file.read(&mut data).await {
                    Ok(n) => n,
                    Err(error) => {
                        let _ = tx
                            .send(Err(Status::internal(format!("read blob: {error}"))))
                            .await;
                        return;
                    }
                };
                if n == 0 && !first {
                    return;
                }
                data.truncate(n);
                let chunk = v1::BlobChunk {
                    digest: if first { digest.clone() } else { String::new() },
                    total_size: if first { total_size } else { 0 },
                    data,
                };
                first = false;
                if tx.send(Ok(chunk)).await.is_err() || n == 0 {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
