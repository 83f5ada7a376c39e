//! The one HTTP client of Warbler's tools (the CLI, the chaos harness, the tests): a thin
//! layer over `reqwest` that speaks to one node's HTTP API and reads its typed answers.

use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::api::{ClusterStatus, ErrorBody, Routes};

/// How long one request may take unless the caller says otherwise: the API answers in
/// milliseconds, and a node that takes seconds is as good as down to an operator's tool.
pub const HTTP_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);

/// Why a request to a node failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot reach {addr}: {message}; is a node's HTTP API there? (check the address)")]
    Unreachable { addr: String, message: String },
    #[error("{addr} answered {status}: {message}")]
    Status {
        addr: String,
        status: u16,
        /// The error body's code, when the answer had one.
        code: Option<String>,
        message: String,
    },
    #[error("{addr} sent a body this version cannot read ({message}); is it a Warbler node of the same release?")]
    Decode { addr: String, message: String },
}

/// An answer: its status and body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Answer {
    /// The body as JSON (`Value::String` of the text when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::String(self.body.clone()))
    }
}

/// A client for the node whose HTTP API listens at `addr`: `HOST:PORT` (plain HTTP), or a
/// URL base `http://HOST:PORT` / `https://HOST:PORT`.
#[derive(Clone)]
pub struct NodeHttp {
    addr: String,
    /// `http://HOST:PORT` or `https://HOST:PORT`, without a trailing slash.
    base: String,
    timeout: Duration,
    client: reqwest::Client,
    /// Sent with `get` (an `ops` token reads `/v1/cluster`).
    token: Option<String>,
}

fn client_builder(timeout: Duration) -> reqwest::ClientBuilder {
    // Nodes are reached directly, never through a proxy from the environment.
    reqwest::Client::builder().no_proxy().timeout(timeout)
}

impl NodeHttp {
    pub fn new(addr: impl Into<String>) -> NodeHttp {
        NodeHttp::with_timeout(addr, HTTP_TIMEOUT_DEFAULT)
    }

    pub fn with_timeout(addr: impl Into<String>, timeout: Duration) -> NodeHttp {
        let addr = addr.into();
        let base = if addr.starts_with("http://") || addr.starts_with("https://") {
            addr.trim_end_matches('/').to_string()
        } else {
            format!("http://{addr}")
        };
        NodeHttp {
            addr,
            base,
            timeout,
            client: client_builder(timeout)
                .build()
                .expect("an HTTP client with default settings builds"),
            token: None,
        }
    }

    /// Trusts the certificate authority in `ca_pem` (PEM) for `https://` addresses.
    pub fn with_ca_pem(mut self, ca_pem: &[u8]) -> Result<NodeHttp, HttpError> {
        let bad = |message: String| HttpError::Unreachable {
            addr: self.addr.clone(),
            message,
        };
        let ca = reqwest::Certificate::from_pem(ca_pem)
            .map_err(|e| bad(format!("the CA file is not a PEM certificate: {e}")))?;
        self.client = client_builder(self.timeout)
            .add_root_certificate(ca)
            .build()
            .map_err(|e| bad(format!("cannot set up TLS: {e}")))?;
        Ok(self)
    }

    /// Sends `token` with every `get` (`/v1/cluster` needs the `ops` scope).
    pub fn with_token(mut self, token: impl Into<String>) -> NodeHttp {
        self.token = Some(token.into());
        self
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends `method path` with an optional bearer token and a JSON (or any) body; any
    /// status is an answer.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: impl Into<Vec<u8>>,
    ) -> Result<Answer, HttpError> {
        let method =
            reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| HttpError::Unreachable {
                addr: self.addr.clone(),
                message: format!("bad method: {e}"),
            })?;
        let body = body.into();
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if !body.is_empty() {
            req = req.header("content-type", "application/json").body(body);
        }
        let unreachable = |e: reqwest::Error| HttpError::Unreachable {
            addr: self.addr.clone(),
            message: e.to_string(),
        };
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status().as_u16();
        let body = resp.text().await.map_err(unreachable)?;
        Ok(Answer { status, body })
    }

    /// `method path` with this client's token and a MessagePack body (possibly empty): the
    /// status and the raw body (for bulk transfers such as backups).
    pub async fn send_bytes(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Vec<u8>), HttpError> {
        let unreachable = |message: String| HttpError::Unreachable {
            addr: self.addr.clone(),
            message,
        };
        let method = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|e| unreachable(format!("bad method: {e}")))?;
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if !body.is_empty() {
            req = req.header("content-type", "application/msgpack").body(body);
        }
        let resp = req.send().await.map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map_err(|e| unreachable(e.to_string()))?;
        Ok((status, body.to_vec()))
    }

    /// `GET path`, read as `T` from a 200 answer; any other status is an error carrying the
    /// node's error body.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, HttpError> {
        let answer = self
            .send("GET", path, self.token.as_deref(), Vec::new())
            .await?;
        self.read(answer)
    }

    /// `POST path` with a bearer token and a JSON body, read as `T` from a 200 answer.
    pub async fn post<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        token: &str,
        body: &B,
    ) -> Result<T, HttpError> {
        let body = serde_json::to_vec(body).expect("request bodies serialize");
        let answer = self.send("POST", path, Some(token), body).await?;
        self.read(answer)
    }

    /// `GET /v1/cluster` (with an `ops` token: see [`NodeHttp::with_token`]).
    pub async fn cluster_status(&self) -> Result<ClusterStatus, HttpError> {
        self.get("/v1/cluster").await
    }

    /// `GET /v1/routes` (with a `publish` token): each partition's leader's client address.
    pub async fn routes(&self) -> Result<Routes, HttpError> {
        self.get("/v1/routes").await
    }

    fn read<T: DeserializeOwned>(&self, answer: Answer) -> Result<T, HttpError> {
        if answer.status != 200 {
            let error = serde_json::from_str::<ErrorBody>(&answer.body).ok();
            return Err(HttpError::Status {
                addr: self.addr.clone(),
                status: answer.status,
                code: error.as_ref().map(|e| e.error.code.clone()),
                message: error.map(|e| e.error.message).unwrap_or(answer.body),
            });
        }
        serde_json::from_str(&answer.body).map_err(|e| HttpError::Decode {
            addr: self.addr.clone(),
            message: e.to_string(),
        })
    }
}
