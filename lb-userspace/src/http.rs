//! The small HTTP/1 servers of the agent (metrics and its health endpoints, kube-proxy's two
//! health servers): a listener, and a function from method and path to the reply.

use std::{sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{Method, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{debug, warn};

/// A reply: status, content type, body and more headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The status.
    pub status: StatusCode,
    /// The Content-Type.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
    /// More headers.
    pub headers: Vec<(&'static str, &'static str)>,
}

impl Reply {
    /// A reply with no more headers.
    pub fn new(status: StatusCode, content_type: &'static str, body: impl Into<String>) -> Self {
        Reply {
            status,
            content_type,
            body: body.into(),
            headers: Vec::new(),
        }
    }

    fn response(self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::from(self.body)));
        *response.status_mut() = self.status;
        let headers = std::iter::once(("content-type", self.content_type)).chain(self.headers);
        for (name, value) in headers {
            if let Ok(value) = value.parse() {
                response.headers_mut().insert(name, value);
            }
        }
        response
    }
}

/// What a server answers to a method and path.
pub type Respond = Arc<dyn Fn(&Method, &str) -> Reply + Send + Sync>;

/// Serves `respond` on `listener` (each connection on a task of its own) until the returned
/// task is aborted, which closes the listener; `what` names the server in the log.
pub fn spawn(listener: TcpListener, what: &'static str, respond: Respond) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!("{what}: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let respond = respond.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let response = respond(req.method(), req.uri().path()).response();
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    debug!("{what}: connection: {e}");
                }
            });
        }
    })
}
