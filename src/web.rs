//! The pages a node serves, compiled into the binary (no build step, nothing downloaded):
//! the demo chat at `/demo/` (only with `demo = true`, which `warbler dev` sets: it mints a
//! token for anyone who asks) and the operator console at `/console/` (its data needs an ops
//! token). docs/web.md describes both.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use warbler_client::http::NodeHttp;

use crate::auth::{Claims, Scope};
use crate::http::{claims, ApiError, AppState};

const SDK_JS: &str = include_str!("../sdk/js/warbler.js");
const DEMO_HTML: &str = include_str!("../web/demo/index.html");
const DEMO_JS: &str = include_str!("../web/demo/demo.js");
const CONSOLE_HTML: &str = include_str!("../web/console/index.html");
const CONSOLE_JS: &str = include_str!("../web/console/console.js");

/// How long a demo token lasts.
const DEMO_TOKEN_SECS: u64 = 12 * 3600;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/demo", get(|| async { Redirect::permanent("/demo/") }))
        .route("/demo/", get(demo_page))
        .route("/demo/demo.js", get(demo_js))
        .route("/demo/warbler.js", get(demo_sdk))
        .route("/demo/token", post(demo_token))
        .route(
            "/console",
            get(|| async { Redirect::permanent("/console/") }),
        )
        .route(
            "/console/",
            get(|| async { page("text/html", CONSOLE_HTML) }),
        )
        .route(
            "/console/console.js",
            get(|| async { page("text/javascript", CONSOLE_JS) }),
        )
        .route("/console/stats", get(console_stats))
}

fn page(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

fn demo_on(state: &AppState) -> Result<(), ApiError> {
    if state.demo {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "the demo chat is off: it runs under `warbler dev` (or with demo = true, for development only)",
    ))
}

async fn demo_page(State(state): State<AppState>) -> Result<Response, ApiError> {
    demo_on(&state)?;
    Ok(page("text/html", DEMO_HTML))
}

async fn demo_js(State(state): State<AppState>) -> Result<Response, ApiError> {
    demo_on(&state)?;
    Ok(page("text/javascript", DEMO_JS))
}

async fn demo_sdk(State(state): State<AppState>) -> Result<Response, ApiError> {
    demo_on(&state)?;
    Ok(page("text/javascript", SDK_JS))
}

#[derive(Deserialize)]
struct DemoTokenReq {
    user: String,
}

/// `POST /demo/token {"user"}`: a device and publish token for that user (demo only).
async fn demo_token(
    State(state): State<AppState>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    demo_on(&state)?;
    let req: DemoTokenReq = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("expected {{\"user\": \"NAME\"}}: {e}"),
        )
    })?;
    let user = req.user.trim();
    let valid = (1..=64).contains(&user.len())
        && user
            .chars()
            .all(|c| c.is_alphanumeric() || "-_.@".contains(c));
    if !valid {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "a demo user name is 1 to 64 letters, digits, '-', '_', '.' or '@'",
        ));
    }
    let token = state
        .gw
        .auth
        .mint(&Claims::new(user, "device publish", DEMO_TOKEN_SECS));
    Ok(Json(serde_json::json!({ "user": user, "token": token })))
}

/// What the console draws per member, read from the member's own `/metrics`.
#[derive(Debug, Default, Serialize, PartialEq)]
pub struct NodeStats {
    /// Devices connected (every transport).
    pub connections: Option<f64>,
    /// Publishes accepted since the node started (the page derives the rate).
    pub publishes_total: Option<f64>,
    /// Partitions it leads.
    pub leads: Option<f64>,
    /// Why the figures are missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Sums the samples of `name` (any labels) in a Prometheus text exposition.
fn metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let value = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let Some(v) = value {
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

/// A node's figures from its `/metrics` text. Counters and gauges appear once first used:
/// a missing one is zero.
pub fn node_stats(text: &str) -> NodeStats {
    NodeStats {
        connections: metric(text, "warbler_connections").or(Some(0.0)),
        publishes_total: metric(text, "warbler_publishes_total").or(Some(0.0)),
        leads: metric(text, "warbler_partitions_led").or(Some(0.0)),
        error: None,
    }
}

/// `GET /console/stats` (ops): each member's connections, publishes and leaderships, read
/// from its `/metrics` by this node (the page cannot reach other nodes' ports itself).
async fn console_stats(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<BTreeMap<String, NodeStats>>, ApiError> {
    claims(&state, &headers, Scope::Ops)?;
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let status = state.view.status();
    let mut asks = tokio::task::JoinSet::new();
    for m in status.members {
        let (Some(http), true) = (m.http_addr.clone(), m.alive) else {
            continue;
        };
        let token = token.clone();
        asks.spawn(async move {
            let client = NodeHttp::with_timeout(http, std::time::Duration::from_secs(2));
            let stats = match client
                .send("GET", "/metrics", token.as_deref(), Vec::new())
                .await
            {
                Ok(a) if a.status == 200 => node_stats(&a.body),
                Ok(a) => NodeStats {
                    error: Some(format!("/metrics answered {}", a.status)),
                    ..NodeStats::default()
                },
                Err(e) => NodeStats {
                    error: Some(e.to_string()),
                    ..NodeStats::default()
                },
            };
            (m.node, stats)
        });
    }
    let mut out = BTreeMap::new();
    while let Some(Ok((node, stats))) = asks.join_next().await {
        out.insert(node, stats);
    }
    Ok(Json(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_sum_labelled_samples_and_skip_lookalikes() {
        let text = "# TYPE warbler_connections gauge\n\
            warbler_connections{transport=\"tcp\"} 3\n\
            warbler_connections{transport=\"ws\"} 2\n\
            warbler_connections_total{transport=\"tcp\"} 40\n\
            warbler_publishes_total 1234\n\
            warbler_partitions_led 21\n";
        let s = node_stats(text);
        assert_eq!(s.connections, Some(5.0));
        assert_eq!(s.publishes_total, Some(1234.0));
        assert_eq!(s.leads, Some(21.0));
        assert_eq!(node_stats("").connections, Some(0.0));
    }
}
