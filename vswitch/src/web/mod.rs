//! The HTTP side of the metrics address: `/metrics`, and the live web view.
//!
//! Owns serving HTTP/1.1 (hyper, on one thread with its own current-thread
//! runtime): Prometheus text on `/metrics` always; with `web = true`, a
//! read-only page (`/`, plain HTML, CSS and JS embedded in the binary, no
//! external resources) and the JSON it polls (`/api/...`, see [`api`]). Only
//! GET and HEAD; at most [`MAX_CONNECTIONS`] connections at once, each with a
//! header timeout; nothing served changes the switch.

mod api;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::realiser::Realiser;
use crate::recent::Recent;

pub use api::MAX_MATRIX_PODS;

/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 64;

/// What the web view reads.
#[derive(Debug, Clone)]
pub struct Web {
    pub realiser: Arc<Realiser>,
    pub recent: Arc<Recent>,
    pub node: String,
    pub ready: Arc<std::sync::atomic::AtomicBool>,
}

struct App {
    metrics: PrometheusHandle,
    web: Option<Web>,
}

type Answer = Response<Full<Bytes>>;

/// Binds `address` now (so a bad address fails start-up, named) and serves
/// it on its own thread.
///
/// Fails when the address cannot be bound.
pub fn serve(
    address: SocketAddr,
    metrics: PrometheusHandle,
    web: Option<Web>,
) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind(address)
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on {address}: {e}"))?;
    listener.set_nonblocking(true)?;
    let app = Arc::new(App { metrics, web });
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the HTTP runtime: no metrics");
                    return;
                }
            };
            rt.block_on(accept(listener, app));
        })?;
    Ok(())
}

async fn accept(listener: std::net::TcpListener, app: Arc<App>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for HTTP: no metrics");
            return;
        }
    };
    let open = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        // A free slot first: beyond the limit, connections wait in the backlog.
        let Ok(slot) = open.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let app = app.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(app.answer(&req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            drop(slot);
        });
    }
}

impl App {
    fn answer(&self, req: &Request<Incoming>) -> Answer {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "read only: GET and HEAD\n".into(),
            );
        }
        let path = req.uri().path();
        let query = req.uri().query().unwrap_or("");
        if path == "/metrics" {
            return with_type(
                Response::new(Full::new(Bytes::from(self.metrics.render()))),
                "text/plain; version=0.0.4",
            );
        }
        let Some(web) = &self.web else {
            return text(
                StatusCode::NOT_FOUND,
                "not found: this address serves /metrics (the web view is off: web = true in the config)\n".into(),
            );
        };
        match path {
            "/" | "/index.html" => asset(include_str!("page.html"), "text/html; charset=utf-8"),
            "/app.js" => asset(include_str!("app.js"), "text/javascript; charset=utf-8"),
            "/style.css" => asset(include_str!("style.css"), "text/css; charset=utf-8"),
            "/api/summary" => json(&api::summary(web)),
            "/api/feed" => json(&api::feed(web, query)),
            "/api/reachability" => match api::reachability(web, query) {
                Ok(v) => json(&v),
                Err(e) => bad_request(&e),
            },
            "/api/trace" => match api::trace(web, query) {
                Ok(v) => json(&v),
                Err(e) => bad_request(&e),
            },
            _ => text(StatusCode::NOT_FOUND, format!("not found: {path}\n")),
        }
    }
}

fn with_type(mut r: Answer, content_type: &'static str) -> Answer {
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn text(status: StatusCode, body: String) -> Answer {
    let mut r = with_type(
        Response::new(Full::new(Bytes::from(body))),
        "text/plain; charset=utf-8",
    );
    *r.status_mut() = status;
    r
}

fn asset(body: &'static str, content_type: &'static str) -> Answer {
    let mut r = with_type(
        Response::new(Full::new(Bytes::from_static(body.as_bytes()))),
        content_type,
    );
    // Scripts and styles only from here: nothing inline, nothing remote.
    r.headers_mut().insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    );
    r
}

fn json<T: serde::Serialize>(v: &T) -> Answer {
    let body = serde_json::to_vec(v).unwrap_or_else(|_| b"null".to_vec());
    let mut r = with_type(
        Response::new(Full::new(Bytes::from(body))),
        "application/json",
    );
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn bad_request(message: &str) -> Answer {
    let mut r = json(&serde_json::json!({ "error": message }));
    *r.status_mut() = StatusCode::BAD_REQUEST;
    r
}
