//! The HTTP API (JSON), the WebSocket device endpoint and the operational endpoints.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use base64::Engine;
use futures::future::BoxFuture;
use futures::{SinkExt, StreamExt};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_bytes::ByteBuf;
use serde_json::{json, Value};
use warbler_actors::MailboxError;
use warbler_client::api::{
    ClusterStatus, Decommissioned, ErrorBody, MemberState, MemberStatus, PartitionStatus, Routes,
    UserPlacement,
};
use warbler_client::codec::CodecError;
use warbler_client::{DecodeError, Frame};
use warbler_cluster::control::NotReady;
use warbler_cluster::{ClusterNode, Leader, RpcCode, RpcError};
use warbler_storage::{LocalLog, PartitionLog, Store};

use crate::auth::{AuthError, Claims, Scope};
use crate::gateway::conn::check_id;
use crate::gateway::tcp::HELLO_FRAME_BYTES_MAX;
use crate::gateway::Gateway;
use crate::listener::ReadBudget;
use crate::rate::RateError;

/// Largest `limit` of a history read.
const HISTORY_LIMIT_MAX: usize = 1000;
/// Default `limit` of a history read.
const HISTORY_LIMIT_DEFAULT: usize = 100;
/// Fan-out publishes in flight at once for one request.
const FANOUT_CONCURRENCY: usize = 64;

#[derive(Clone)]
pub struct AppState {
    pub gw: Arc<Gateway>,
    pub store: Store,
    pub view: Arc<dyn NodeView>,
    /// The log writes go through (restores write through it too).
    pub log: Arc<dyn PartitionLog>,
    pub metrics: PrometheusHandle,
    /// `/metrics` needs an `ops` token (`auth.metrics_require_token`).
    pub metrics_need_token: bool,
    /// Serve the demo chat and mint its tokens (`demo`; `warbler dev`).
    pub demo: bool,
}

#[derive(Clone, Copy)]
pub struct NodeAddrs {
    pub client: SocketAddr,
    pub http: SocketAddr,
    pub cluster: SocketAddr,
}

/// An API error: a status and a JSON body `{"error": {"code", "message"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// For a 429: how long to wait (the overload default when unset).
    retry_after: Option<std::time::Duration>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(ErrorBody::new(self.code, self.message));
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            // Whole seconds only: the shortest wait the header can say.
            let wait_ms = self
                .retry_after
                .map_or(warbler_actors::OVERLOAD_RETRY_MS, |d| d.as_millis() as u64);
            let retry_after_secs = wait_ms.div_ceil(1000).max(1).to_string();
            return (self.status, [("retry-after", retry_after_secs)], body).into_response();
        }
        (self.status, body).into_response()
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let (status, code) = match e {
            AuthError::Forbidden { .. } => (StatusCode::FORBIDDEN, "forbidden"),
            _ => (StatusCode::UNAUTHORIZED, "unauthorized"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl From<RateError> for ApiError {
    fn from(e: RateError) -> Self {
        match e.retry_after() {
            Some(wait) => ApiError {
                retry_after: Some(wait),
                ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", e.to_string())
            },
            None => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "rate_limited", e.to_string()),
        }
    }
}

impl From<MailboxError> for ApiError {
    fn from(e: MailboxError) -> Self {
        metrics::counter!("warbler_publish_errors_total").increment(1);
        let (status, code) = mailbox_error_status(&e);
        ApiError::new(status, code, e.to_string())
    }
}

fn mailbox_error_status(e: &MailboxError) -> (StatusCode, &'static str) {
    match e {
        MailboxError::Overloaded(_) => (StatusCode::TOO_MANY_REQUESTS, "overloaded"),
        MailboxError::Full(_) => (StatusCode::INSUFFICIENT_STORAGE, "mailbox_full"),
        MailboxError::StorageFull(_) => (StatusCode::SERVICE_UNAVAILABLE, "storage_full"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
    }
}

impl From<warbler_storage::StorageError> for ApiError {
    fn from(e: warbler_storage::StorageError) -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        )
    }
}

pub(crate) type ApiResult = Result<Response, ApiError>;

/// What `/v1/cluster`, `/readyz` and the fault switch see of the node: a single node, or
/// a member of a cluster.
pub trait NodeView: Send + Sync + 'static {
    /// Members, partitions with replicas and leaders.
    fn status(&self) -> ClusterStatus;
    /// Each partition's leader's client address (`GET /v1/routes`).
    fn routes(&self) -> Routes {
        Routes::from_status(&self.status())
    }
    /// `Err(why)` while the node should not get traffic.
    fn ready(&self) -> Result<(), NotReady>;
    /// Testing only: cut the node off from peers at these cluster addresses (`None`: this
    /// node has no fault switch).
    fn set_faults(&self, blocked: Vec<SocketAddr>) -> Option<()>;
    /// Waits until this node's copy of `partition` holds every write acknowledged before
    /// the call (a follower may trail its leader by a heartbeat): reads from the local
    /// store come after it.
    fn read_fence(&self, _partition: u16) -> BoxFuture<'_, Result<(), RpcError>> {
        Box::pin(async { Ok(()) })
    }
    /// Removes a node from the cluster (its partitions move to the others).
    fn decommission(&self, _node: String) -> BoxFuture<'_, Result<Decommissioned, RpcError>> {
        Box::pin(async {
            Err(RpcError::new(RpcCode::Refused, "this node runs alone (a cluster of one): there is no other node to hand its partitions to"))
        })
    }
}

/// A node on its own: it leads every partition.
pub struct SingleNode {
    pub log: LocalLog,
    pub node_id: String,
    pub addrs: NodeAddrs,
    pub partitions: u16,
}

impl NodeView for SingleNode {
    fn status(&self) -> ClusterStatus {
        let node = &self.node_id;
        let partitions = (0..self.partitions)
            .map(|p| PartitionStatus {
                partition: p,
                replicas: vec![node.clone()],
                placement: vec![node.clone()],
                leader: Some(node.clone()),
                term: None,
                applied: None,
            })
            .collect();
        ClusterStatus {
            node: node.clone(),
            members: vec![MemberStatus {
                node: node.clone(),
                alive: true,
                member: true,
                state: MemberState::Serving,
                client_addr: Some(self.addrs.client.to_string()),
                http_addr: Some(self.addrs.http.to_string()),
                cluster_addr: Some(self.addrs.cluster.to_string()),
                zone: None,
            }],
            member_list_epoch: None,
            member_list_leader: None,
            decommissioned: false,
            replicas_held: None,
            replication_factor: Some(1),
            partition_count: self.partitions,
            partitions,
            faults_blocked: Vec::new(),
            mailboxes_active: 0,
            user: None,
            cluster_id: None,
        }
    }

    fn ready(&self) -> Result<(), NotReady> {
        // The local log is writable for every partition or for none.
        if self.log.writable(0) {
            Ok(())
        } else {
            Err(NotReady::StorageFailed)
        }
    }

    fn set_faults(&self, _blocked: Vec<SocketAddr>) -> Option<()> {
        None
    }
}

impl NodeView for ClusterNode {
    fn status(&self) -> ClusterStatus {
        ClusterNode::status(self)
    }

    /// The router's leaders: from consensus where this node holds a replica, else its best
    /// guess (corrected by every redirect), so a node without a replica routes too.
    fn routes(&self) -> Routes {
        let status = ClusterNode::status(self);
        let client_of = |node: &str| status.member(node).and_then(|m| m.client_addr.clone());
        let leaders = if status.partitions.is_empty() {
            Vec::new()
        } else {
            (0..status.partition_count)
                .map(|p| match warbler_cluster::Router::leader(self, p) {
                    Leader::Local => client_of(&status.node),
                    Leader::Remote { node, .. } => client_of(&node),
                    Leader::Unknown(_) => None,
                })
                .collect()
        };
        Routes {
            node: status.node.clone(),
            partition_count: status.partition_count,
            leaders,
        }
    }

    fn ready(&self) -> Result<(), NotReady> {
        ClusterNode::ready(self)
    }

    fn set_faults(&self, blocked: Vec<SocketAddr>) -> Option<()> {
        ClusterNode::set_faults(self, blocked)
    }

    fn read_fence(&self, partition: u16) -> BoxFuture<'_, Result<(), RpcError>> {
        Box::pin(ClusterNode::read_fence(self, partition))
    }

    fn decommission(&self, node: String) -> BoxFuture<'_, Result<Decommissioned, RpcError>> {
        Box::pin(async move {
            let list = ClusterNode::decommission(self, node.clone(), false).await?;
            Ok(Decommissioned {
                next: format!("partitions move off {node} in the background; `warbler cluster status --http <{node}'s HTTP address>` shows replicas_held 0 when it can be stopped"),
                decommissioned: node,
                members: list.names,
                member_list_epoch: list.epoch,
            })
        })
    }
}

pub fn router(state: AppState) -> Router {
    // Base64 grows a body by 4/3; JSON adds a little.
    let body_limit = state.gw.limits.max_body_bytes * 4 / 3 + 64 * 1024;
    Router::new()
        .route("/v1/users/{user}/messages", post(publish).get(history))
        .route("/v1/messages", post(fanout))
        .route("/v1/users/{user}/devices", get(devices))
        .route("/v1/cluster", get(cluster))
        .route("/v1/routes", get(routes))
        .route("/v1/cluster/decommission", post(decommission))
        .route(
            "/v1/admin/partitions/{partition}/backup",
            get(crate::backup::backup_partition),
        )
        .route(
            "/v1/admin/partitions/{partition}/restore",
            post(crate::backup::restore_partition)
                .layer(DefaultBodyLimit::max(crate::backup::RESTORE_BODY_MAX)),
        )
        .route("/v1/debug/faults", post(faults))
        .route("/v1/ws", get(websocket))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .merge(crate::web::routes())
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint; see docs/protocol.md",
            )
        })
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

pub(crate) fn claims(
    state: &AppState,
    headers: &HeaderMap,
    scope: Scope,
) -> Result<Claims, ApiError> {
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    Ok(state.gw.auth.require(token, scope)?)
}

/// Admins see every user; a device token sees its own user only.
fn may_read(state: &AppState, headers: &HeaderMap, user: &str) -> Result<(), ApiError> {
    let c = claims(state, headers, Scope::Device)?;
    if c.sub == user || c.allows(Scope::Admin) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!(
            "a token for {:?} cannot read {user:?}; use that user's token or an admin token",
            c.sub
        ),
    ))
}

fn json_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "request body is too large; see limits.max_body_bytes",
            )
        } else {
            ApiError::bad_request(format!("cannot read the request body: {e}"))
        }
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("request body is not the expected JSON: {e}")))
}

#[derive(Deserialize)]
struct PublishBody {
    id: String,
    body: Option<String>,
    body_b64: Option<String>,
    from: Option<String>,
}

#[derive(Deserialize)]
struct FanoutBody {
    to: Vec<String>,
    id: String,
    body: Option<String>,
    body_b64: Option<String>,
    from: Option<String>,
}

fn message_body(
    state: &AppState,
    body: Option<String>,
    body_b64: Option<String>,
) -> Result<ByteBuf, ApiError> {
    let bytes = match (body, body_b64) {
        (Some(text), None) => text.into_bytes(),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map_err(|e| ApiError::bad_request(format!("body_b64 is not valid base64: {e}")))?,
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of \"body\" (text) or \"body_b64\" (base64)",
            ))
        }
    };
    let max = state.gw.limits.max_body_bytes;
    if bytes.len() > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!(
                "body of {} bytes exceeds the limit of {max} bytes",
                bytes.len()
            ),
        ));
    }
    Ok(ByteBuf::from(bytes))
}

async fn publish(
    State(state): State<AppState>,
    Path(user): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let publisher = claims(&state, &headers, Scope::Publish)?;
    let req: PublishBody = json_body(body)?;
    check_id("user", &user).map_err(|e| ApiError::bad_request(e.to_string()))?;
    check_id("id", &req.id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let body = message_body(&state, req.body, req.body_b64)?;
    disk_has_room(&state)?;
    state.gw.rates.check(&publisher.sub, 1, body.len())?;
    let seq = state
        .gw
        .mailboxes
        .publish(&user, &req.id, body, req.from)
        .await?;
    Ok(Json(json!({"user": user, "id": req.id, "seq": seq})).into_response())
}

async fn fanout(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let publisher = claims(&state, &headers, Scope::Publish)?;
    let req: FanoutBody = json_body(body)?;
    check_id("id", &req.id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let max = state.gw.limits.fanout_max;
    if req.to.is_empty() || req.to.len() > max {
        return Err(ApiError::bad_request(format!(
            "\"to\" must list 1..={max} users, got {}",
            req.to.len()
        )));
    }
    for u in &req.to {
        check_id("each user in \"to\"", u).map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    let body = message_body(&state, req.body, req.body_b64)?;
    disk_has_room(&state)?;
    let recipients = u32::try_from(req.to.len()).unwrap_or(u32::MAX);
    state.gw.rates.check(
        &publisher.sub,
        recipients,
        body.len().saturating_mul(req.to.len()),
    )?;
    let results = fanout_publish(&state, req.to, &req.id, body, req.from).await;
    let all_failed = results.iter().all(|r| r.get("error").is_some());
    let status = if all_failed {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    Ok((status, Json(json!({"id": req.id, "results": results}))).into_response())
}

/// The positions in `to` of one partition's users, and their answers.
type ShareAnswer = (Vec<usize>, Vec<Result<u64, MailboxError>>);

/// One message to many users: each partition's share goes to its leader as one request
/// (their appends share log entries there), partitions in parallel. A user refused with a
/// transient error (a leader moved mid-way), or whose leader runs an older release, is
/// published again on its own, with retries.
/// Results come back in the order of `to`.
async fn fanout_publish(
    state: &AppState,
    to: Vec<String>,
    id: &str,
    body: ByteBuf,
    from: Option<String>,
) -> Vec<Value> {
    let mb = &state.gw.mailboxes;
    let mut shares: BTreeMap<u16, (Vec<usize>, Vec<String>)> = BTreeMap::new();
    for (i, user) in to.iter().enumerate() {
        let share = shares.entry(mb.partition_of(user)).or_default();
        share.0.push(i);
        share.1.push(user.clone());
    }
    let mut results: Vec<Option<Result<u64, MailboxError>>> = vec![None; to.len()];
    let answers: Vec<ShareAnswer> = futures::stream::iter(shares)
        .map(|(partition, (indexes, users))| {
            let (body, from) = (body.clone(), from.clone());
            async move {
                let each = mb.publish_many(partition, users, id, body, from).await;
                (indexes, each)
            }
        })
        .buffer_unordered(FANOUT_CONCURRENCY)
        .collect()
        .await;
    for (indexes, each) in answers {
        for (i, r) in indexes.into_iter().zip(each) {
            results[i] = Some(r);
        }
    }
    let again = futures::stream::iter(results.into_iter().zip(to.clone()))
        .map(|(r, user)| {
            let (body, from) = (body.clone(), from.clone());
            async move {
                match r {
                    // A leader of an older release does not take a partition's share.
                    Some(Err(e))
                        if e.is_transient() || matches!(e, MailboxError::Unsupported(_)) =>
                    {
                        mb.publish(&user, id, body, from).await
                    }
                    Some(r) => r,
                    None => Err(MailboxError::Unavailable("no answer for this user".into())),
                }
            }
        })
        .buffered(FANOUT_CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    again
        .into_iter()
        .zip(to)
        .map(|(r, user)| match r {
            Ok(seq) => json!({"user": user, "seq": seq}),
            Err(e) => {
                let (_, code) = mailbox_error_status(&e);
                json!({"user": user, "error": {"code": code, "message": e.to_string()}})
            }
        })
        .collect()
}

#[derive(Deserialize)]
struct HistoryQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

async fn history(
    State(state): State<AppState>,
    Path(user): Path<String>,
    headers: HeaderMap,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    may_read(&state, &headers, &user)?;
    check_id("user", &user).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let Query(q) = query
        .map_err(|e| ApiError::bad_request(format!("bad query: {e}; use ?after=SEQ&limit=N")))?;
    let limit = q.limit.unwrap_or(HISTORY_LIMIT_DEFAULT);
    if limit == 0 || limit > HISTORY_LIMIT_MAX {
        return Err(ApiError::bad_request(format!(
            "limit must be 1..={HISTORY_LIMIT_MAX}, got {limit}"
        )));
    }
    let partition = state.gw.mailboxes.partition_of(&user);
    // Read your writes: a publish acknowledged before this request is in the page.
    state.view.read_fence(partition).await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        )
    })?;
    let store = state.store.clone();
    let (u, after) = (user.clone(), q.after.unwrap_or(0));
    let (rows, last_seq) =
        tokio::task::spawn_blocking(move || -> Result<_, warbler_storage::StorageError> {
            Ok((
                store.read_range(partition, &u, after, limit)?,
                store.last_seq(partition, &u)?,
            ))
        })
        .await
        .map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })??;
    let messages: Vec<Value> = rows
        .into_iter()
        .map(|(seq, m)| {
            json!({
                "seq": seq, "id": m.id, "ts": m.ts, "from": m.from,
                "body": std::str::from_utf8(&m.body).ok(),
                "body_b64": base64::engine::general_purpose::STANDARD.encode(&m.body),
            })
        })
        .collect();
    Ok(Json(json!({"user": user, "last_seq": last_seq, "messages": messages})).into_response())
}

async fn devices(
    State(state): State<AppState>,
    Path(user): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    may_read(&state, &headers, &user)?;
    check_id("user", &user).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let list = state.gw.mailboxes.devices(&user).await?;
    let devices: Vec<Value> = list
        .into_iter()
        .map(|d| json!({"device": d.device, "acked": d.acked, "online": d.online}))
        .collect();
    Ok(Json(json!({"user": user, "devices": devices})).into_response())
}

#[derive(serde::Deserialize)]
struct ClusterQuery {
    /// Also say where this user's partition lives.
    user: Option<String>,
}

async fn cluster(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<ClusterQuery>,
) -> Result<Json<ClusterStatus>, ApiError> {
    // Where every leader is, and every member's address: for operators only.
    claims(&state, &headers, Scope::Ops)?;
    let mut status = state.view.status();
    status.mailboxes_active = state.gw.mailboxes.active_count().await;
    if let Some(user) = q.user {
        let partition = warbler_cluster::partition_of(&user, crate::node::PARTITIONS);
        let place = status.partitions.get(partition as usize);
        status.user = Some(UserPlacement {
            leader: place.and_then(|p| p.leader.clone()),
            replicas: place.map(|p| p.replicas.clone()).unwrap_or_default(),
            user,
            partition,
        });
    }
    Ok(Json(status))
}

/// Each partition's leader's client address, for publishers that route by leader.
async fn routes(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Routes>, ApiError> {
    claims(&state, &headers, Scope::Publish)?;
    Ok(Json(state.view.routes()))
}

/// Refuses a publish while the data directory's disk is below its watermark.
fn disk_has_room(state: &AppState) -> Result<(), ApiError> {
    state.gw.disk.check().map_err(|why| {
        metrics::counter!("warbler_publish_errors_total").increment(1);
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage_full", why)
    })
}

async fn readyz(State(state): State<AppState>) -> Response {
    if let Err(why) = state.gw.disk.check() {
        let message = format!("this node is not ready: {why}");
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage_full", message)
            .into_response();
    }
    let ready = if state.gw.shutdown.is_cancelled() {
        Err(NotReady::ShuttingDown)
    } else {
        state.view.ready()
    };
    match ready {
        Ok(()) => Json(json!({"status": "ready"})).into_response(),
        Err(why) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("this node is not ready: {why}"),
        )
        .into_response(),
    }
}

#[derive(serde::Deserialize)]
struct DecommissionBody {
    node: String,
}

/// Removes a member from the cluster; its partitions move to the other nodes.
async fn decommission(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<DecommissionBody>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    claims(&state, &headers, Scope::Ops)?;
    let Json(body) = body.map_err(|e| {
        ApiError::bad_request(format!(
            "{e}; send {{\"node\": \"NAME\"}} with the member's name"
        ))
    })?;
    match state.view.decommission(body.node).await {
        Ok(v) => Ok(Json(v).into_response()),
        Err(why) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_decommissioned",
            why.message,
        )),
    }
}

#[derive(serde::Deserialize)]
struct FaultsBody {
    /// Cluster addresses of the peers to cut off; empty heals.
    block: Vec<SocketAddr>,
}

/// Testing only (`cluster.fault_injection = true`): cut this node off from some peers.
async fn faults(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<FaultsBody>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    claims(&state, &headers, Scope::Admin)?;
    let Json(body) = body.map_err(|e| {
        ApiError::bad_request(format!(
            "{e}; send {{\"block\": [\"HOST:PORT\", ...]}} with peers' cluster addresses"
        ))
    })?;
    match state.view.set_faults(body.block.clone()) {
        Some(()) => Ok(Json(json!({"blocked": body.block})).into_response()),
        None => Err(ApiError::bad_request(
            "fault injection is off: it exists for tests only, on cluster nodes started with cluster.fault_injection = true",
        )),
    }
}

async fn metrics_text(State(state): State<AppState>, headers: HeaderMap) -> ApiResult {
    if state.metrics_need_token {
        claims(&state, &headers, Scope::Ops)?;
    }
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render(),
    )
        .into_response())
}

/// Bytes of WebSocket framing allowed around the first message on top of its payload.
const WS_FRAMING_SLACK: usize = 1024;

async fn websocket(
    State(state): State<AppState>,
    budget: Option<Extension<ReadBudget>>,
    ws: WebSocketUpgrade,
) -> Response {
    let max = state.gw.limits.max_frame_bytes;
    // Until the first message (the hello) is in, the socket may send no more than a hello's
    // worth: it cannot make the node buffer a full frame before it says who it is.
    let hello_max = HELLO_FRAME_BYTES_MAX.min(max);
    let budget = budget.map(|Extension(b)| b).unwrap_or_default();
    budget.limit(hello_max + WS_FRAMING_SLACK);
    // Accept up to twice the frame limit so an oversized frame still gets an error frame.
    ws.max_message_size(max * 2)
        .max_frame_size(max * 2)
        .on_upgrade(move |socket| serve_ws(socket, state.gw.clone(), budget, hello_max))
}

/// How a WebSocket client speaks, set by its first message: binary MessagePack or text JSON.
/// The server answers in the same encoding.
#[derive(Clone, Default)]
struct WsEncoding(Arc<std::sync::OnceLock<bool>>);

impl WsEncoding {
    fn note(&self, message: &Message) {
        match message {
            Message::Binary(_) => drop(self.0.set(false)),
            Message::Text(_) => drop(self.0.set(true)),
            _ => {}
        }
    }

    fn message(&self, frame: &Frame) -> Message {
        if self.0.get() == Some(&true) {
            Message::Text(frame.encode_json().into())
        } else {
            Message::Binary(frame.encode().into())
        }
    }
}

async fn serve_ws(socket: WebSocket, gw: Arc<Gateway>, budget: ReadBudget, hello_max: usize) {
    let (mut sink, stream) = socket.split();
    let max = gw.limits.max_frame_bytes;
    let encoding = WsEncoding::default();
    let spoke = encoding.clone();
    let frames = stream.filter_map(move |m| {
        let budget = budget.clone();
        let spoke = spoke.clone();
        async move {
            if let Ok(message) = &m {
                spoke.note(message);
            }
            if matches!(m, Ok(Message::Binary(_) | Message::Text(_))) {
                budget.lift();
            }
            match m {
                Err(_) if budget.exceeded() => {
                    Some(Err(CodecError::Decode(DecodeError::TooLarge {
                        len: hello_max + 1,
                        max: hello_max,
                    })))
                }
                Err(e) => Some(Err(CodecError::Io(std::io::Error::other(e)))),
                Ok(Message::Binary(b)) if b.len() > max => {
                    Some(Err(CodecError::Decode(DecodeError::TooLarge {
                        len: b.len(),
                        max,
                    })))
                }
                Ok(Message::Binary(b)) => Some(Frame::decode(&b).map_err(CodecError::Decode)),
                Ok(Message::Text(t)) if t.as_str().len() > max => {
                    Some(Err(CodecError::Decode(DecodeError::TooLarge {
                        len: t.as_str().len(),
                        max,
                    })))
                }
                Ok(Message::Text(t)) => {
                    Some(Frame::decode_json(t.as_str()).map_err(CodecError::Decode))
                }
                Ok(Message::Close(_)) => None,
                // WebSocket-level ping/pong are answered by the library; not frames.
                Ok(_) => None,
            }
        }
    });
    let (tx, mut rx) = warbler_actors::Outbox::channel(gw.writer_queue());
    let deferral = rx.wake_deferral();
    let stall = std::time::Duration::from_millis(gw.limits.slow_consumer_timeout_ms);
    // Reading and writing share the connection's one task (see the plain TCP connection).
    let writer = async move {
        while let Some(out) = rx.recv().await {
            let written = tokio::time::timeout(stall, async {
                sink.feed(encoding.message(&out.into_frame())).await?;
                while let Some(out) = rx.try_recv() {
                    sink.feed(encoding.message(&out.into_frame())).await?;
                }
                sink.flush().await
            })
            .await;
            match written {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return,
                Err(_) => return crate::gateway::tcp::slow_consumer(stall),
            }
        }
        let _ = sink.close().await;
    };
    crate::gateway::tcp::one_task(gw.run(Box::pin(frames), tx, "ws", None), writer, deferral).await;
}
