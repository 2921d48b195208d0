//! Cached modules served over HTTP by their sha256 (`GET /ecds-agent.modules/<sha256>`), on
//! the agent's own xDS listener, so that a client that already reaches the agent (Envoy, over
//! its ADS cluster) can fetch a module the agent verified with its own remote fetch.
//!
//! Only modules this process has in use (pinned by a live resource, or handed out moments ago)
//! are served: the endpoint is not a way around the signature policy or a registry's
//! credentials for anything else in a shared cache. The file is streamed in chunks (memory per
//! request is one chunk) with its length; a read error ends the body early, so a client never
//! sees a short body as complete. The client checks the sha256 (Envoy's `remote.sha256`).
//!
//! A module still being downloaded ([`crate::wasm::growing`]) is served as its bytes arrive,
//! so Envoy's fetch overlaps the agent's download; the last byte and the end of the body
//! (HTTP/2 `END_STREAM`) follow only once the agent verified the module, and a download that
//! ends any other way resets the stream: no client holds a complete body the agent did not
//! verify.
//!
//! Owns the HTTP side of serving; which modules are in use is the cache's.

use std::convert::Infallible;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;
use metrics::counter;
use tonic::server::NamedService;

use super::cache::Served;
use super::growing::Growing;
use super::Cache;
use crate::metrics as m;

/// The authority of the URLs handed out (any works: the client's cluster picks the socket).
const AUTHORITY: &str = "ecds-agent";
/// Bytes read and sent at a time.
const CHUNK: usize = 256 << 10;

/// The URL a module is served at; with `token`, the download of that name while it lasts
/// ([`crate::wasm::growing::Growing::token`]).
pub fn url_for(sha256: &str, token: Option<&str>) -> String {
    match token {
        Some(t) => format!("http://{AUTHORITY}/{}/{sha256}/{t}", ModuleService::NAME),
        None => format!("http://{AUTHORITY}/{}/{sha256}", ModuleService::NAME),
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The sha256 and download token named by a request path, if it is one of ours and well
/// formed.
fn requested(path: &str) -> Option<(&str, Option<&str>)> {
    let rest = path
        .strip_prefix('/')?
        .strip_prefix(ModuleService::NAME)?
        .strip_prefix('/')?;
    let (sha, token) = match rest.split_once('/') {
        Some((sha, token)) if is_hex(token, 32) => (sha, Some(token)),
        Some(_) => return None,
        None => (rest, None),
    };
    is_hex(sha, 64).then_some((sha, token))
}

/// The service; clone per connection.
#[derive(Clone)]
pub struct ModuleService {
    cache: Arc<Cache>,
}

impl ModuleService {
    pub fn new(cache: Arc<Cache>) -> Self {
        Self { cache }
    }
}

impl NamedService for ModuleService {
    const NAME: &'static str = "ecds-agent.modules";
}

type Response = http::Response<tonic::body::Body>;

fn status(code: http::StatusCode, why: &'static str) -> Response {
    let mut r = http::Response::new(tonic::body::Body::new(http_body_util::Full::new(
        Bytes::from_static(why.as_bytes()),
    )));
    *r.status_mut() = code;
    r
}

impl tower::Service<http::Request<tonic::body::Body>> for ModuleService {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let cache = self.cache.clone();
        let method = req.method().clone();
        let asked = requested(req.uri().path()).map(|(s, t)| (s.to_owned(), t.map(str::to_owned)));
        Box::pin(async move {
            let asked = asked.as_ref().map(|(s, t)| (s.as_str(), t.as_deref()));
            let (resp, result) = serve(&cache, &method, asked).await;
            counter!(m::MODULE_SERVES, "result" => result).increment(1);
            Ok(resp)
        })
    }
}

/// The response, and the `result` label: `served` (a file), `streamed` (a download under
/// way), `refused`.
async fn serve(
    cache: &Cache,
    method: &http::Method,
    asked: Option<(&str, Option<&str>)>,
) -> (Response, &'static str) {
    if method != http::Method::GET && method != http::Method::HEAD {
        return (
            status(http::StatusCode::METHOD_NOT_ALLOWED, "GET only\n"),
            "refused",
        );
    }
    let Some((sha, token)) = asked else {
        return (
            status(http::StatusCode::NOT_FOUND, "no such module\n"),
            "refused",
        );
    };
    match cache.served(sha, token) {
        Some(Served::File(path)) => {
            let r = serve_file(sha, method, path).await;
            let label = if r.status().is_success() {
                "served"
            } else {
                "refused"
            };
            (r, label)
        }
        Some(Served::Growing(g)) => {
            tracing::debug!(sha256 = %sha, bytes = g.size, "serving a module as it downloads");
            let body = if method == http::Method::HEAD {
                tonic::body::Body::empty()
            } else {
                tonic::body::Body::new(http_body_util::StreamBody::new(growing_chunks(g.clone())))
            };
            (with_length(body, g.size), "streamed")
        }
        None => {
            tracing::debug!(sha256 = %sha, "module asked for is not in use here; not served");
            (
                status(http::StatusCode::NOT_FOUND, "module not in use here\n"),
                "refused",
            )
        }
    }
}

fn with_length(body: tonic::body::Body, len: u64) -> Response {
    let mut r = http::Response::new(body);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/wasm"),
    );
    r.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    r
}

/// A module's bytes as they can be read (a growing one: as they arrive); the stream ends only
/// once it is verified and whole, and fails (a reset) otherwise.
fn growing_chunks(
    g: Arc<Growing>,
) -> impl futures::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send {
    futures::stream::unfold(Some((g, 0u64)), |state| async move {
        let (g, offset) = state?;
        match g.read(offset, CHUNK).await {
            Ok(Some(bytes)) => {
                let next = offset + bytes.len() as u64;
                Some((Ok(Frame::data(bytes)), Some((g, next))))
            }
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(sha256 = %g.sha256, error = %e, "stream of a growing module reset");
                Some((Err(e), None))
            }
        }
    })
}

async fn serve_file(sha: &str, method: &http::Method, path: PathBuf) -> Response {
    let opened = tokio::task::spawn_blocking(move || {
        let f = std::fs::File::open(&path)?;
        let len = f.metadata()?.len();
        Ok::<_, std::io::Error>((f, len))
    })
    .await
    .map_err(std::io::Error::other)
    .and_then(|r| r);
    let (file, len) = match opened {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(sha256 = %sha, error = %e, "cannot open a module to serve it");
            return status(http::StatusCode::NOT_FOUND, "module not in use here\n");
        }
    };
    tracing::debug!(sha256 = %sha, bytes = len, "serving a module");
    // A file that shrank while being served ends the stream with an error (a reset), never
    // short.
    let body = if method == http::Method::HEAD {
        tonic::body::Body::empty()
    } else {
        tonic::body::Body::new(http_body_util::StreamBody::new(growing_chunks(
            Growing::complete(sha, file, len),
        )))
    };
    with_length(body, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let sha = "ab".repeat(32);
        let token = "0f".repeat(16);
        assert_eq!(
            requested(&format!("/ecds-agent.modules/{sha}")),
            Some((sha.as_str(), None))
        );
        assert_eq!(
            requested(&format!("/ecds-agent.modules/{sha}/{token}")),
            Some((sha.as_str(), Some(token.as_str())))
        );
        assert_eq!(
            url_for(&sha, None),
            format!("http://ecds-agent/ecds-agent.modules/{sha}")
        );
        assert_eq!(
            url_for(&sha, Some(&token)),
            format!("http://ecds-agent/ecds-agent.modules/{sha}/{token}")
        );
        for bad in [
            format!("/ecds-agent.modules/{sha}/{}", "0f".repeat(15)),
            format!("/ecds-agent.modules/{sha}/{token}/x"),
            format!("/ecds-agent.modules/{sha}/"),
            format!("/ecds-agent.modules/{}", "AB".repeat(32)),
            format!("/ecds-agent.modules/{}", "ab".repeat(31)),
            format!("/ecds-agent.modules/../{sha}"),
            format!("/ecds-agent.modules/{sha}/x"),
            format!("/other/{sha}"),
            "/ecds-agent.modules/".to_owned(),
        ] {
            assert_eq!(requested(&bad), None, "{bad}");
        }
    }
}
