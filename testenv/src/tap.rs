//! A Kubernetes client that records the body of every response it receives, with its request's
//! method and URI: how a test sees what reached a controller over the wire (for instance, that
//! no Secret's data did). Watch bodies are recorded as their events arrive.
//!
//! The operator's and the webhook receiver's tests both prove with it that they watch Secrets by
//! their metadata only and read by name just the Secrets they use.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Frame, SizeHint};
use kube::client::Body;

/// One response: its request's method and URI (path and query), and the body so far.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// The request's method.
    pub method: String,
    /// The request's path and query.
    pub uri: String,
    /// The response body received so far.
    pub body: Vec<u8>,
}

/// What a tapped client received; clones share the record.
#[derive(Clone, Default)]
pub struct Tap(Arc<Mutex<Vec<Arc<Mutex<Recorded>>>>>);

impl Tap {
    /// A client sending through `inner` whose responses are recorded here.
    pub fn client(&self, inner: kube::Client) -> kube::Client {
        let namespace = inner.default_namespace().to_owned();
        kube::Client::new(Service { inner, tap: self.clone() }, namespace)
    }

    /// Every response so far.
    pub fn responses(&self) -> Vec<Recorded> {
        let all = self.0.lock().unwrap();
        all.iter().map(|r| r.lock().unwrap().clone()).collect()
    }

    /// Whether a response `which` picks carried `text`, plain or in base64 (as a Secret's
    /// `data` carries its values).
    pub fn carried(&self, which: impl Fn(&Recorded) -> bool, text: &str) -> bool {
        self.responses().iter().any(|r| which(r) && contains(&r.body, text))
    }

    /// Panics if a response other than those `allowed` picks carried `text`, plain or in base64.
    pub fn assert_never_carried(&self, text: &str, allowed: impl Fn(&Recorded) -> bool) {
        for response in self.responses().iter().filter(|r| !allowed(r)) {
            assert!(!contains(&response.body, text), "{} {} carried {text:?}", response.method, response.uri);
        }
    }

    /// Waits (up to a minute) until the Secrets watch has shown a Secret named `unrelated` and the
    /// GET of `namespace/name` has carried `value`; all along, `unrelated_value` (the unrelated
    /// Secret's data) comes in no response and `value` in none but that GET.
    pub async fn wait_watched_and_read(&self, unrelated_value: &str, (namespace, name): (&str, &str), value: &str) {
        let read = |r: &Recorded| secret_read(r, namespace, name);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            self.assert_never_carried(unrelated_value, |_| false);
            self.assert_never_carried(value, read);
            let watched = self.carried(secrets_list_or_watch, "\"name\":\"unrelated\"");
            let used = self.carried(read, value);
            if watched && used {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the unrelated Secret was watched: {watched}; {namespace}/{name} read by name: {used}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

fn contains(body: &[u8], text: &str) -> bool {
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(text);
    [text.as_bytes(), encoded.as_bytes()].iter().any(|form| body.windows(form.len()).any(|w| w == *form))
}

/// A response to a list or watch of every namespace's Secrets.
pub fn secrets_list_or_watch(r: &Recorded) -> bool {
    r.uri.starts_with("/api/v1/secrets?")
}

/// A response to a GET of the Secret `namespace/name`.
pub fn secret_read(r: &Recorded, namespace: &str, name: &str) -> bool {
    r.method == "GET" && r.uri.split('?').next() == Some(&format!("/api/v1/namespaces/{namespace}/secrets/{name}"))
}

struct Service {
    inner: kube::Client,
    tap: Tap,
}

impl tower_service::Service<Request<Body>> for Service {
    type Response = Response<TapBody>;
    type Error = kube::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let record = Arc::new(Mutex::new(Recorded {
            method: request.method().to_string(),
            uri: request.uri().to_string(),
            body: Vec::new(),
        }));
        self.tap.0.lock().unwrap().push(Arc::clone(&record));
        let inner = self.inner.clone();
        Box::pin(async move {
            let response = inner.send(request).await?;
            Ok(response.map(|body| TapBody { inner: body, record }))
        })
    }
}

struct TapBody {
    inner: Body,
    record: Arc<Mutex<Recorded>>,
}

impl http_body::Body for TapBody {
    type Data = Bytes;
    type Error = kube::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, kube::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.record.lock().unwrap().body.extend_from_slice(data);
        }
        polled
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}
