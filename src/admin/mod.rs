//! The admin HTTP server: health, Prometheus metrics, a human summary and the Wasm debug page.
//! Read-only views of state owned elsewhere; it never changes the proxy or the cache. It runs
//! on its own task, so it answers while downloads are in progress.
//!
//! * `/healthz/ready` — 200 once the Envoy-facing socket is listening, 503 before and on shutdown
//! * `/healthz/live`  — 200 while the process runs
//! * `/stats/prometheus`, `/metrics` — Prometheus text (Istio's `istio_agent_*` names)
//! * `/stats` — the same numbers as plain `name value` lines for humans, plus (for clients
//!   `/debug/*` answers) the cache's modules and failures
//! * `/debug/wasm` — JSON: cached modules, their URLs, digests, users, last errors, next retries
//!
//! Exposure: `/debug/*`, and the detail part of `/stats`, answer only clients whose address is in `--admin-debug-cidrs`
//! (loopback by default), so binding the admin port to 0.0.0.0 for Prometheus does not publish
//! the debug pages. Every connection has a 5 s header deadline (no slowloris), every request a
//! 10 s deadline, and at most 64 connections are served at once.

/// The metric names and the recorder (a leaf module every layer uses).
pub use crate::metrics;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use tokio::net::TcpListener;

use crate::wasm::guard::Cidr;
use crate::wasm::Cache;
use crate::xds::RejectionLog;

const HEADER_DEADLINE: Duration = Duration::from_secs(5);
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
const CONNECTION_DEADLINE: Duration = Duration::from_secs(300);
const MAX_CONNECTIONS: usize = 64;

/// The admin server's own settings.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Clients allowed on `/debug/*`.
    pub debug_cidrs: Vec<Cidr>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            debug_cidrs: ["127.0.0.0/8", "::1/128"]
                .iter()
                .filter_map(|c| c.parse().ok())
                .collect(),
        }
    }
}

/// What the admin pages read.
pub struct AdminState {
    pub ready: AtomicBool,
    pub cache: Option<Arc<Cache>>,
    pub rejections: Arc<RejectionLog>,
    pub config: AdminConfig,
}

impl AdminState {
    pub fn new(
        cache: Option<Arc<Cache>>,
        rejections: Arc<RejectionLog>,
        config: AdminConfig,
    ) -> Arc<Self> {
        Arc::new(Self {
            ready: AtomicBool::new(false),
            cache,
            rejections,
            config,
        })
    }
}

/// The client's address, attached to each request by [`serve`].
#[derive(Debug, Clone, Copy)]
struct Peer(SocketAddr);

/// Whether `peer` may see URLs, resource names and error text (`--admin-debug-cidrs`).
fn may_debug(s: &AdminState, peer: &Option<Extension<Peer>>) -> bool {
    peer.as_ref()
        .is_some_and(|Extension(Peer(p))| s.config.debug_cidrs.iter().any(|c| c.contains(p.ip())))
}

/// `/debug/*` for allowed clients only.
async fn debug_guard(
    State(s): S,
    peer: Option<Extension<Peer>>,
    req: Request,
    next: Next,
) -> Response {
    if !may_debug(&s, &peer) {
        return (
            StatusCode::FORBIDDEN,
            "ecds-agent: /debug/* answers only clients in --admin-debug-cidrs (loopback by default)\n",
        )
            .into_response();
    }
    next.run(req).await
}

/// Every request within [`REQUEST_DEADLINE`].
async fn deadline(req: Request, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_DEADLINE, next.run(req)).await {
        Ok(r) => r,
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "ecds-agent: request timed out\n",
        )
            .into_response(),
    }
}

type S = State<Arc<AdminState>>;

async fn ready(State(s): S) -> impl IntoResponse {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn prometheus() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics::render(),
    )
}

/// Metric lines for everyone; the cache's details (URLs, resource names, error text) only for
/// clients `/debug/*` answers.
async fn stats(State(s): S, peer: Option<Extension<Peer>>) -> impl IntoResponse {
    let detail = may_debug(&s, &peer);
    let mut out = String::new();
    for line in metrics::render().lines() {
        if !line.starts_with('#') && !line.is_empty() && !line.contains("_bucket{") {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !detail {
        out.push_str(
            "# cache details (URLs, resources, errors) answer only clients in --admin-debug-cidrs\n",
        );
    }
    if let Some(cache) = s.cache.as_ref().filter(|_| detail) {
        let v = cache.view();
        out.push_str(&format!(
            "cache_dir {}\ncache_modules {}\ncache_bytes {}\n",
            v.cache_dir.display(),
            v.modules.len(),
            v.total_bytes
        ));
        for m in &v.modules {
            out.push_str(&format!(
                "module {} {} bytes used_by={:?} urls={:?}\n",
                m.sha256, m.size, m.used_by, m.urls
            ));
        }
        for (url, f) in &v.failures {
            out.push_str(&format!("failing {url}: {}\n", f.error));
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], out)
}

async fn debug_wasm(State(s): S) -> impl IntoResponse {
    let mut body = match &s.cache {
        Some(c) => serde_json::to_value(c.view()).unwrap_or_default(),
        None => serde_json::json!({"conversion": "disabled"}),
    };
    if let Some(obj) = body.as_object_mut() {
        obj.insert(
            "envoy_rejections".into(),
            serde_json::to_value(s.rejections.snapshot()).unwrap_or_default(),
        );
    }
    axum::Json(body)
}

pub fn router(state: Arc<AdminState>) -> Router {
    let debug = Router::new()
        .route("/debug/wasm", get(debug_wasm))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            debug_guard,
        ));
    Router::new()
        .route("/healthz/ready", get(ready))
        .route("/healthz/live", get(|| async { "alive\n" }))
        .route("/stats/prometheus", get(prometheus))
        .route("/metrics", get(prometheus))
        .route("/stats", get(stats))
        .merge(debug)
        .layer(axum::middleware::from_fn(deadline))
        .with_state(state)
}

/// Binds the admin address (errors name the flag).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("--admin {addr}: cannot bind: {e}"))
}

/// Serves the admin pages until the task is dropped: bounded connections, each with a header
/// deadline and an overall lifetime, each request tagged with its client's address.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let app = router(state);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "admin: cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "admin: too many connections; closing this one");
            continue;
        };
        let svc =
            hyper_util::service::TowerToHyperService::new(app.clone().layer(Extension(Peer(peer))));
        tokio::spawn(async move {
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_DEADLINE);
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(CONNECTION_DEADLINE, conn).await;
            drop(slot);
        });
    }
}
