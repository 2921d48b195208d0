//! A real HTTP server for modules: per-path bodies, scripted failures and delays, request counts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Router;
use futures::StreamExt;

#[derive(Clone, Default)]
pub struct Route {
    pub body: Vec<u8>,
    /// Answer this many requests with `fail_status` first.
    pub fail_first: usize,
    pub fail_status: u16,
    pub delay: Duration,
    /// Send the body in 64 KiB pieces with this pause between them (a slow download).
    pub trickle: Duration,
    /// Answer only once this turns `true` (a download held open until the test says so).
    pub gate: Option<tokio::sync::watch::Receiver<bool>>,
    /// With `trickle`: after this many pieces, wait until the receiver turns `true` (a body
    /// held open half-sent).
    pub hold_after: Option<(usize, tokio::sync::watch::Receiver<bool>)>,
}

#[derive(Default)]
struct Inner {
    routes: HashMap<String, Route>,
    hits: HashMap<String, usize>,
}

#[derive(Clone)]
pub struct ModuleServer {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
}

async fn serve(State(inner): State<Arc<Mutex<Inner>>>, Path(path): Path<String>) -> Response {
    let (route, n) = {
        let mut g = inner.lock().unwrap();
        let n = {
            let h = g.hits.entry(path.clone()).or_default();
            *h += 1;
            *h
        };
        (g.routes.get(&path).cloned(), n)
    };
    let Some(route) = route else {
        return Response::builder()
            .status(404)
            .body(Body::from("not found"))
            .unwrap();
    };
    if !route.delay.is_zero() {
        tokio::time::sleep(route.delay).await;
    }
    if let Some(mut gate) = route.gate.clone() {
        let _ = gate.wait_for(|open| *open).await;
    }
    if n <= route.fail_first {
        return Response::builder()
            .status(StatusCode::from_u16(route.fail_status).unwrap())
            .body(Body::from("scripted failure"))
            .unwrap();
    }
    if !route.trickle.is_zero() {
        let pause = route.trickle;
        let len = route.body.len();
        let pieces: Vec<Vec<u8>> = route.body.chunks(64 << 10).map(<[u8]>::to_vec).collect();
        let hold = route.hold_after.clone();
        let stream = futures::stream::iter(pieces.into_iter().enumerate()).then(move |(i, p)| {
            let hold = hold.clone();
            async move {
                if let Some((_, mut open)) = hold.filter(|(at, _)| *at == i) {
                    let _ = open.wait_for(|o| *o).await;
                }
                tokio::time::sleep(pause).await;
                Ok::<_, std::io::Error>(p)
            }
        });
        return Response::builder()
            .status(200)
            .header("content-length", len)
            .body(Body::from_stream(stream))
            .unwrap();
    }
    Response::builder()
        .status(200)
        .body(Body::from(route.body))
        .unwrap()
}

impl ModuleServer {
    pub async fn start() -> Self {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = Router::new()
            .route("/{*path}", axum::routing::get(serve))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, inner }
    }

    pub fn set(&self, path: &str, route: Route) {
        let mut g = self.inner.lock().unwrap();
        g.routes
            .insert(path.trim_start_matches('/').to_owned(), route);
    }

    pub fn put(&self, path: &str, body: Vec<u8>) {
        self.set(
            path,
            Route {
                body,
                ..Default::default()
            },
        );
    }

    pub fn hits(&self, path: &str) -> usize {
        self.inner
            .lock()
            .unwrap()
            .hits
            .get(path.trim_start_matches('/'))
            .copied()
            .unwrap_or(0)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_start_matches('/'))
    }
}
