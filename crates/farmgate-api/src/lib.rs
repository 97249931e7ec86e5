//! The HTTP face of a gateway: the executor's REST API (seed 001 paths under `/api/v1`)
//! and SALAD's REST API (seed 000, on its own port).
//!
//! This is the only crate that knows HTTP. Each handler parses the request into the
//! typed arguments of an [`Executor`] command, checks credentials, calls it, and maps its
//! [`ExecError`] to a status code with a JSON body `{"error": "..."}`.
//!
//! Who may do what: reading the farm's state is open, like CI-tron; the endpoints a DUT
//! calls while it boots (`boot.ipxe`, registration) need no token, and registration can
//! never set the manual fields (PDU, port), so a machine registering itself cannot take
//! another's port; submitting and cancelling jobs needs the submit token (or the admin
//! token); everything that changes the farm needs the admin token.

mod ui;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Multipart, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use farmgate_console::{MachineInfo, Salad};
use farmgate_executor::{ExecError, Executor};
use farmgate_wire::{
    ApiErrorBody, DiscoverRequest, DutPatch, DutRegistration, EventKind, JobMetadata, JobState,
    PortPatch,
};
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// Largest job description accepted, in bytes.
pub const MAX_JOB_SIZE: usize = 1024 * 1024;

/// Credentials of the API.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    /// Admin bearer token; admin actions are refused when unset.
    pub admin: Option<String>,
    /// Submit bearer token; when unset, only the admin token can submit.
    pub submit: Option<String>,
    /// Networks (address, prefix length) allowed to use the DUT-facing endpoints
    /// (`boot.ipxe`, `/boot/`, job storage, registration) without a token; empty: any.
    /// A boot script carries the job's secrets (its bucket key), so a gateway reachable
    /// from outside its farm should set this (`FARMGATE_DUT_NETWORKS`).
    pub dut_networks: Vec<(std::net::IpAddr, u8)>,
}

/// Whether `ip` is in the network `net`/`prefix` (IPv4-mapped IPv6 counts as IPv4).
pub fn in_network(ip: std::net::IpAddr, net: std::net::IpAddr, prefix: u8) -> bool {
    use std::net::IpAddr;
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let bits = u32::from(prefix.min(32));
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let bits = u32::from(prefix.min(128));
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// DUT-facing endpoints answer machines of the farm's networks, or the admin.
fn authorize_dut(state: &AppState, headers: &HeaderMap, peer: SocketAddr) -> ApiResult<()> {
    let nets = &state.tokens.dut_networks;
    if nets.is_empty() || nets.iter().any(|(n, p)| in_network(peer.ip(), *n, *p)) {
        return Ok(());
    }
    if authorize(state, headers, Role::Admin).is_ok() {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        format!(
            "this endpoint serves the farm's machines: {} is not in FARMGATE_DUT_NETWORKS (or use the admin token)",
            peer.ip()
        ),
    ))
}

#[derive(Clone)]
struct AppState {
    exec: Executor,
    tokens: Tokens,
    extras: Extras,
}

/// The other services of the gateway the executor API reaches: the artifact cache
/// (job `storage.http` URLs are fetched through it), SALAD (the dashboard's consoles)
/// and the registry cache (its statistics in `/metrics`); each is optional.
#[derive(Clone, Default)]
pub struct Extras {
    /// The artifact cache.
    pub cache: Option<farmgate_cache::ArtifactCache>,
    /// The console relay.
    pub salad: Option<Salad>,
    /// The OCI registry cache.
    pub registry: Option<farmgate_registry::RegistryCache>,
    /// Where the dashboard's xterm.js comes from (default: Debian's libjs-xterm).
    pub ui_vendor_dir: Option<std::path::PathBuf>,
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl From<ExecError> for ApiError {
    fn from(e: ExecError) -> Self {
        let status = match &e {
            ExecError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ExecError::NotFound(_) => StatusCode::NOT_FOUND,
            ExecError::NoMatch(_) => StatusCode::NOT_ACCEPTABLE,
            ExecError::Busy(_) | ExecError::Conflict(_) => StatusCode::CONFLICT,
            ExecError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ExecError::Device(_) => StatusCode::BAD_GATEWAY,
        };
        ApiError::new(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!("{}", self.message);
        }
        (
            self.status,
            axum::Json(ApiErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn json<T: serde::Serialize>(value: &T) -> Response {
    axum::Json(value).into_response()
}

/// Parse a JSON body ourselves so the error says which field and where.
fn parse_body<T: DeserializeOwned>(what: &str, body: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("{what}: {e}")))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Submit,
    Admin,
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorize(state: &AppState, headers: &HeaderMap, role: Role) -> ApiResult<()> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(given) = given else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            match role {
                Role::Admin => "this action needs the admin token (Authorization: Bearer <token>)",
                Role::Submit => {
                    "this action needs the submit token (Authorization: Bearer <token>; farmctl reads FARMGATE_TOKEN)"
                }
            },
        ));
    };
    let is = |t: &Option<String>| {
        t.as_deref()
            .is_some_and(|t| constant_time_eq(t.as_bytes(), given.as_bytes()))
    };
    let ok = match role {
        Role::Admin => is(&state.tokens.admin),
        Role::Submit => is(&state.tokens.admin) || is(&state.tokens.submit),
    };
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            match role {
                Role::Admin => "the token given is not the admin token",
                Role::Submit => "the token given may not submit or cancel jobs",
            },
        ))
    }
}

/// The executor's router (seed 001 paths).
pub fn executor_router(exec: Executor, tokens: Tokens, extras: Extras) -> Router {
    let state = AppState {
        exec,
        tokens,
        extras,
    };
    Router::new()
        .route("/", get(ui::index))
        .route("/ui/app.js", get(ui::app_js))
        .route("/ui/style.css", get(ui::style_css))
        .route("/ui/vendor/{file}", get(ui::vendor))
        .route("/api/v1/auth", get(ui::whoami))
        .route("/api/v1/dut/{id}/console/ws", get(ui::console_ws))
        .route("/metrics", get(ui::metrics))
        .route("/api/v1/duts", get(list_duts))
        .route("/api/v1/dut", post(register_dut).put(register_dut))
        .route("/api/v1/dut/", post(register_dut).put(register_dut))
        .route(
            "/api/v1/dut/discover",
            get(get_discover)
                .post(post_discover)
                .delete(delete_discover),
        )
        .route(
            "/api/v1/dut/{id}",
            get(get_dut).patch(patch_dut).delete(delete_dut),
        )
        .route("/api/v1/dut/{id}/boot.ipxe", get(boot_ipxe))
        .route("/api/v1/duts/{id}/boot.ipxe", get(boot_ipxe))
        .route("/boot/{*path}", get(boot_file))
        .route("/api/v1/dut/{id}/storage/{*path}", get(storage_file))
        .route(
            "/api/v1/dut/{id}/quick_check",
            get(get_quick_check).post(post_quick_check),
        )
        .route("/api/v1/dut/{id}/cancel_job", post(cancel_on_dut))
        .route("/api/v1/pdus", get(list_pdus).post(add_pdu))
        .route("/api/v1/pdu-drivers", get(pdu_drivers))
        .route("/api/v1/pdu/{name}", get(get_pdu).delete(delete_pdu))
        .route(
            "/api/v1/pdu/{name}/port/{port}",
            get(get_port).patch(patch_port),
        )
        .route("/api/v1/full-state", get(full_state))
        .route(
            "/api/v1/jobs",
            get(list_jobs)
                .post(submit_job)
                .layer(axum::extract::DefaultBodyLimit::max(
                    MAX_SHARE_SIZE + MAX_JOB_SIZE + (1 << 20),
                )),
        )
        .route("/api/v1/job/{id}/share.tar.gz", get(job_share))
        .route("/api/v1/job/{id}", get(get_job))
        .route("/api/v1/job/{id}/events", get(job_events))
        .route("/api/v1/job/{id}/console.log", get(job_console_log))
        .route("/api/v1/job/{id}/cancel", post(cancel_job))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no such endpoint; see the README for the API",
            )
        })
        .with_state(state)
}

async fn list_duts(State(st): State<AppState>) -> Response {
    json(&st.exec.duts())
}

async fn get_dut(State(st): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    Ok(json(&st.exec.dut(&id)?))
}

async fn patch_dut(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    authorize(&st, &headers, Role::Admin)?;
    let patch: DutPatch = parse_body("PATCH body", &body)?;
    Ok(json(&st.exec.patch_dut(&id, patch)?))
}

async fn delete_dut(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    authorize(&st, &headers, Role::Admin)?;
    st.exec.delete_dut(&id)?;
    Ok(StatusCode::OK.into_response())
}

async fn register_dut(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    authorize_dut(&st, &headers, peer)?;
    let reg: DutRegistration = parse_body("registration body", &body)?;
    Ok(json(&st.exec.register_dut(reg)?))
}

async fn get_discover(State(st): State<AppState>) -> Response {
    json(&st.exec.discovery())
}

async fn post_discover(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    authorize(&st, &headers, Role::Admin)?;
    let req: DiscoverRequest = parse_body("discover body", &body)?;
    Ok(json(&st.exec.start_discovery(req)?))
}

async fn delete_discover(State(st): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    authorize(&st, &headers, Role::Admin)?;
    st.exec.stop_discovery();
    Ok(json(&st.exec.discovery()))
}

/// `GET /boot/<path>`: a file of `BOOTS_TFTP_ROOT` over HTTP (kernels, initramfs, iPXE
/// binaries: the same files TFTP serves). No token: DUTs fetch these while they boot.
/// The path never leaves the root (`..`, NUL and symlinks out are refused).
async fn boot_file(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(path): Path<String>,
) -> ApiResult<Response> {
    authorize_dut(&st, &headers, peer)?;
    let root = st.exec.config().boots_tftp_root.clone();
    let file_path = farmgate_netboot::resolve(&root, &path).map_err(|e| match e {
        farmgate_netboot::PathError::NotFound(_) => {
            ApiError::new(StatusCode::NOT_FOUND, format!("boot file {path}: {e}"))
        }
        other => ApiError::new(StatusCode::FORBIDDEN, format!("boot file {path}: {other}")),
    })?;
    stream_file(
        &file_path,
        "application/octet-stream",
        &format!("boot file {path}"),
    )
    .await
}

/// A file as a streamed response with its length; `what` names it in errors (404).
async fn stream_file(
    path: &std::path::Path,
    content_type: &'static str,
    what: &str,
) -> ApiResult<Response> {
    let not_found =
        |e: std::io::Error| ApiError::new(StatusCode::NOT_FOUND, format!("{what}: {e}"));
    let file = tokio::fs::File::open(path).await.map_err(not_found)?;
    let len = file.metadata().await.map_err(not_found)?.len();
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
        file,
        256 * 1024,
    ));
    Ok((
        [
            (header::CONTENT_TYPE, content_type.to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        body,
    )
        .into_response())
}

/// `GET /api/v1/dut/<id>/storage/<path>`: a file of the running job's
/// `deployment.storage.http`, for the DUT (no token, like `boot.ipxe`). Inline `data`
/// is served as is; a `url` is fetched by the gateway and streamed, so the DUT only
/// needs to reach the gateway.
async fn storage_file(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path((id, path)): Path<(String, String)>,
) -> ApiResult<Response> {
    authorize_dut(&st, &headers, peer)?;
    match st.exec.storage_file(&id, false, &path)? {
        farmgate_executor::storage::StorageContent::Data(bytes) => {
            Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
        }
        farmgate_executor::storage::StorageContent::Url(url) => {
            let range = headers.get(header::RANGE).cloned();
            if let Some(cache) = &st.extras.cache
                && let Some(resp) = cache.fetch(&url, range).await
            {
                return Ok(storage_answer_from_cache(&path, &url, resp).await);
            }
            let bad_gateway = |e: String| {
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    format!("storage file {path}: fetching {url}: {e}"),
                )
            };
            let r = reqwest::get(&url)
                .await
                .map_err(|e| bad_gateway(e.to_string()))?;
            if !r.status().is_success() {
                return Err(bad_gateway(format!("the server answered {}", r.status())));
            }
            let mut headers = vec![(header::CONTENT_TYPE, "application/octet-stream".to_string())];
            if let Some(len) = r.content_length() {
                headers.push((header::CONTENT_LENGTH, len.to_string()));
            }
            let mut resp = Body::from_stream(r.bytes_stream()).into_response();
            for (k, v) in headers {
                if let Ok(v) = v.parse() {
                    resp.headers_mut().insert(k, v);
                }
            }
            Ok(resp)
        }
    }
}

/// A storage file served by the artifact cache: its answer as is (Range and
/// `X-Cache` included), except that a failure names the job's storage path too.
async fn storage_answer_from_cache(path: &str, url: &str, resp: Response) -> Response {
    if resp.status().is_success() || resp.status() == StatusCode::RANGE_NOT_SATISFIABLE {
        return resp;
    }
    let status = resp.status();
    // The cache's error answers are one short line of text.
    let said = axum::body::to_bytes(resp.into_body(), 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let mut msg =
        format!("storage file {path}: fetching {url} through the artifact cache failed ({status})");
    if !said.is_empty() {
        msg.push_str(": ");
        msg.push_str(&said);
    }
    ApiError::new(
        if status.is_server_error() {
            StatusCode::BAD_GATEWAY
        } else {
            status
        },
        msg,
    )
    .into_response()
}

/// Query of `boot.ipxe`: what iPXE reports of itself (`?arch=${buildarch}&platform=${platform}`).
#[derive(Debug, Default, serde::Deserialize)]
struct BootQuery {
    arch: Option<String>,
    platform: Option<String>,
}

async fn boot_ipxe(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<BootQuery>,
) -> ApiResult<Response> {
    authorize_dut(&st, &headers, peer)?;
    let script = st
        .exec
        .boot_script(&id, q.arch.as_deref(), q.platform.as_deref())?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        script,
    )
        .into_response())
}

async fn get_quick_check(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    Ok(json(&st.exec.quick_check_pending(&id)?))
}

async fn post_quick_check(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    authorize(&st, &headers, Role::Admin)?;
    Ok(json(&st.exec.queue_quick_check(&id)?))
}

async fn cancel_on_dut(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    authorize(&st, &headers, Role::Submit)?;
    let job = st.exec.cancel_on_dut(&id)?;
    Ok(json(&serde_json::json!({ "cancelled_job": job })))
}

async fn list_pdus(State(st): State<AppState>) -> Response {
    json(&st.exec.pdus().await)
}

async fn get_pdu(State(st): State<AppState>, Path(name): Path<String>) -> ApiResult<Response> {
    Ok(json(&st.exec.pdu(&name).await?))
}

async fn add_pdu(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    authorize(&st, &headers, Role::Admin)?;
    let reg: farmgate_wire::PduRegistration = parse_body("PDU", &body)?;
    Ok((StatusCode::CREATED, json(&st.exec.add_pdu(reg).await?)).into_response())
}

async fn delete_pdu(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    authorize(&st, &headers, Role::Admin)?;
    st.exec.remove_pdu(&name)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn pdu_drivers() -> Response {
    json(&farmgate_pdu::driver_docs())
}

async fn get_port(
    State(st): State<AppState>,
    Path((name, port)): Path<(String, String)>,
) -> ApiResult<Response> {
    Ok(json(&st.exec.port(&name, &port).await?))
}

async fn patch_port(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path((name, port)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    authorize(&st, &headers, Role::Admin)?;
    let patch: PortPatch = parse_body("PATCH body", &body)?;
    Ok(json(&st.exec.patch_port(&name, &port, patch).await?))
}

async fn full_state(State(st): State<AppState>) -> Response {
    json(&st.exec.full_state().await)
}

#[derive(Deserialize)]
struct JobsQuery {
    state: Option<String>,
    limit: Option<usize>,
}

async fn list_jobs(State(st): State<AppState>, Query(q): Query<JobsQuery>) -> ApiResult<Response> {
    let state = match q.state.as_deref() {
        None => None,
        Some(s) => Some(
            s.parse::<JobState>()
                .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("state: {e}")))?,
        ),
    };
    let jobs = st.exec.jobs(state, q.limit.unwrap_or(100).min(10_000))?;
    Ok(json(&serde_json::json!({ "jobs": jobs })))
}

/// `POST /api/v1/jobs`: multipart with `metadata` (JSON) and `job` (YAML template), as
/// executorctl sends them, and optionally `archive`: the client's share directory as a
/// `.tar.gz` (up to [`MAX_SHARE_SIZE`]), put into the job's bucket when it starts.
async fn submit_job(
    State(st): State<AppState>,
    headers: HeaderMap,
    mut multipart: Multipart,
) -> ApiResult<Response> {
    authorize(&st, &headers, Role::Submit)?;
    let mut metadata: Option<JobMetadata> = None;
    let mut job: Option<String> = None;
    let mut share: Option<bytes::Bytes> = None;
    loop {
        let field = multipart
            .next_field()
            .await
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("multipart body: {e}")))?;
        let Some(field) = field else { break };
        let name = field.name().unwrap_or_default().to_string();
        let data = field.bytes().await.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("multipart part {name}: {e}"),
            )
        })?;
        match name.as_str() {
            "metadata" => metadata = Some(parse_body("metadata part", &data)?),
            "job" => {
                if data.len() > MAX_JOB_SIZE {
                    return Err(ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!(
                            "job part: {} bytes, the limit is {MAX_JOB_SIZE}",
                            data.len()
                        ),
                    ));
                }
                job = Some(String::from_utf8(data.to_vec()).map_err(|e| {
                    ApiError::new(StatusCode::BAD_REQUEST, format!("job part: not UTF-8: {e}"))
                })?);
            }
            "archive" | "share" | "tarball" => share = Some(data),
            other => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("unknown multipart part {other:?}; expected metadata and job"),
                ));
            }
        }
    }
    let job = job.ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "the multipart body has no `job` part (the job description)",
        )
    })?;
    let exec = st.exec.clone();
    let metadata = metadata.unwrap_or_default();
    let accepted = tokio::task::spawn_blocking(move || {
        exec.submit_with_share(&job, metadata, share.as_deref())
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(json(&accepted))
}

/// Largest share-directory archive a submission may carry.
pub const MAX_SHARE_SIZE: usize = 1 << 30;

/// `GET /api/v1/job/<id>/share.tar.gz`: what the job left in its bucket, archived when it
/// ended (submit token: it is the job's output). 404 while the job runs or if it had no
/// bucket.
async fn job_share(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    authorize(&st, &headers, Role::Submit)?;
    let path = st.exec.share_result(&id)?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("job {id} has no share archive (yet): it is written when the job is over"),
        )
    })?;
    stream_file(&path, "application/gzip", &format!("share of job {id}")).await
}

async fn get_job(State(st): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    Ok(json(&st.exec.job(&id)?))
}

async fn cancel_job(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    authorize(&st, &headers, Role::Submit)?;
    st.exec.cancel_job(&id)?;
    Ok(json(&st.exec.job(&id)?))
}

#[derive(Deserialize)]
struct EventsQuery {
    after: Option<i64>,
    follow: Option<bool>,
}

/// Events of a job as JSON lines. With `follow=true` the answer streams until the
/// job's `session_end` event; a client that loses the stream resumes with `after=<seq>`.
/// `GET /api/v1/job/<id>/console.log`: the job's console as text, one line per console
/// line, each prefixed by the time the gateway received it (`[RFC 3339] line`); the
/// gateway's own messages are interleaved as `[time] [farmgate] message`.
async fn job_console_log(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    st.exec.job(&id)?; // 404 for unknown jobs
    let mut body = String::new();
    let mut after = 0;
    loop {
        let events = st.exec.events(&id, after, 10_000)?;
        let Some(last) = events.last() else { break };
        after = last.seq;
        for e in &events {
            match e.msg_type {
                EventKind::JobIo => body.push_str(&format!("[{}] {}\n", e.date, e.payload)),
                EventKind::Ctrl | EventKind::SessionEnd => {
                    body.push_str(&format!("[{}] [farmgate] {}\n", e.date, e.payload))
                }
            }
        }
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response())
}

async fn job_events(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
) -> ApiResult<Response> {
    st.exec.job(&id)?; // 404 for unknown jobs
    let after = q.after.unwrap_or(0);
    if !q.follow.unwrap_or(false) {
        let events = st.exec.events(&id, after, 100_000)?;
        let mut body = String::new();
        for e in events {
            body.push_str(&serde_json::to_string(&e).unwrap_or_default());
            body.push('\n');
        }
        return Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response());
    }
    struct Cursor {
        exec: Executor,
        id: String,
        after: i64,
        done: bool,
    }
    let cursor = Cursor {
        exec: st.exec.clone(),
        id,
        after,
        done: false,
    };
    let stream = futures_util::stream::unfold(cursor, |mut c| async move {
        if c.done {
            return None;
        }
        loop {
            let exec = c.exec.clone();
            let id = c.id.clone();
            let after = c.after;
            let events = tokio::task::spawn_blocking(move || exec.events(&id, after, 1000))
                .await
                .ok()
                .and_then(|r| r.ok())
                .unwrap_or_default();
            if !events.is_empty() {
                let mut chunk = String::new();
                for e in &events {
                    chunk.push_str(&serde_json::to_string(e).unwrap_or_default());
                    chunk.push('\n');
                    if e.msg_type == farmgate_wire::EventKind::SessionEnd {
                        c.done = true;
                    }
                }
                c.after = events.last().map(|e| e.seq).unwrap_or(c.after);
                return Some((Ok::<Bytes, Infallible>(Bytes::from(chunk)), c));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// SALAD's router (seed 000): `GET /api/v1/machine/` and `GET /api/v1/machine/<id>`.
/// Asking for a machine creates its relay port preemptively, as the seed describes.
pub fn salad_router(salad: Salad) -> Router {
    Router::new()
        .route("/api/v1/machine", get(salad_machines))
        .route("/api/v1/machine/", get(salad_machines))
        .route("/api/v1/machine/{id}", get(salad_machine))
        .with_state(salad)
}

async fn salad_machines(State(salad): State<Salad>) -> Response {
    let machines: BTreeMap<String, MachineInfo> = salad.machines();
    json(&machines)
}

async fn salad_machine(State(salad): State<Salad>, Path(id): Path<String>) -> ApiResult<Response> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ":._-".contains(c))
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("machine id {id:?}: use up to 64 letters, digits, ':', '.', '_' or '-'"),
        ));
    }
    salad.machine_port(&id).await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot open a relay port for {id}: {e}"),
        )
    })?;
    let info = salad.machine(&id).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no console for machine {id}"),
        )
    })?;
    Ok(json(&info))
}

#[cfg(test)]
mod tests {
    #[test]
    fn networks_match_by_prefix() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("address");
        assert!(super::in_network(ip("10.42.0.17"), ip("10.42.0.1"), 24));
        assert!(!super::in_network(ip("10.43.0.17"), ip("10.42.0.1"), 24));
        assert!(super::in_network(ip("127.3.2.1"), ip("127.0.0.1"), 8));
        assert!(
            super::in_network(ip("::ffff:10.42.0.9"), ip("10.42.0.0"), 24),
            "v4-mapped"
        );
        assert!(super::in_network(ip("::1"), ip("::1"), 128));
        assert!(!super::in_network(ip("::2"), ip("::1"), 128));
        assert!(super::in_network(ip("1.2.3.4"), ip("0.0.0.0"), 0));
        assert!(
            !super::in_network(ip("10.42.0.1"), ip("::1"), 0),
            "families differ"
        );
    }

    use super::*;

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
