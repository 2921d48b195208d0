//! The admin HTTP server: health, Prometheus metrics, a human summary and the Wasm debug page.
//! Read-only views of state owned elsewhere; it never changes the proxy or the cache. It runs
//! on its own task, so it answers while downloads are in progress.
//!
//! * `/healthz/ready` — 200 once the Envoy-facing socket is listening, 503 before and on shutdown
//! * `/healthz/live`  — 200 while the process runs
//! * `/stats/prometheus`, `/metrics` — Prometheus text (Istio's `istio_agent_*` names)
//! * `/stats` — the same numbers as plain `name value` lines for humans
//! * `/debug/wasm` — JSON: cached modules, their URLs, digests, users, last errors, next retries

pub mod metrics;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::wasm::Cache;
use crate::xds::RejectionLog;

/// What the admin pages read.
pub struct AdminState {
    pub ready: AtomicBool,
    pub cache: Option<Arc<Cache>>,
    pub rejections: Arc<RejectionLog>,
}

impl AdminState {
    pub fn new(cache: Option<Arc<Cache>>, rejections: Arc<RejectionLog>) -> Arc<Self> {
        Arc::new(Self {
            ready: AtomicBool::new(false),
            cache,
            rejections,
        })
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

async fn stats(State(s): S) -> impl IntoResponse {
    let mut out = String::new();
    for line in metrics::render().lines() {
        if !line.starts_with('#') && !line.is_empty() && !line.contains("_bucket{") {
            out.push_str(line);
            out.push('\n');
        }
    }
    if let Some(cache) = &s.cache {
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
    Router::new()
        .route("/healthz/ready", get(ready))
        .route("/healthz/live", get(|| async { "alive\n" }))
        .route("/stats/prometheus", get(prometheus))
        .route("/metrics", get(prometheus))
        .route("/stats", get(stats))
        .route("/debug/wasm", get(debug_wasm))
        .with_state(state)
}

/// Binds the admin address (errors name the flag).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("--admin {addr}: cannot bind: {e}"))
}

/// Serves the admin pages until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    if let Err(e) = axum::serve(listener, router(state)).await {
        tracing::error!(error = %e, "admin server stopped");
    }
}
