//! The per-request path: host → route → page or upstream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, Scheme, Uri};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{HttpConnector, capture_connection};
use hyper_util::rt::TokioIo;
use stagely_api::route::RouteStatus;

use crate::headers::{self, MAX_REQUEST_HEAD, TransferCodings};
use crate::metrics::{Path, ProxyMetrics};
use crate::pages;
use crate::routes::{Lookup, ResolvedRoute, RouteTable};

/// What the proxy answers with: the upstream's streamed body, or one of its own pages.
pub type Body = Either<Incoming, Full<Bytes>>;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_STAGELY_PROJECT: HeaderName = HeaderName::from_static("x-stagely-project");
static X_STAGELY_PR: HeaderName = HeaderName::from_static("x-stagely-pr");
static X_STAGELY_ENVIRONMENT: HeaderName = HeaderName::from_static("x-stagely-environment");

/// Who a request comes from: worked out once per connection.
#[derive(Clone, Debug)]
pub struct Client {
    /// `X-Forwarded-For`: the peer's address.
    pub(crate) forwarded_for: HeaderValue,
    /// `X-Forwarded-Proto`.
    pub(crate) forwarded_proto: HeaderValue,
}

impl Client {
    /// A client connected from `peer` over `scheme`.
    pub fn new(peer: SocketAddr, scheme: Scheme) -> Self {
        Self {
            forwarded_for: HeaderValue::from_str(&peer.ip().to_string())
                .expect("an IP address is a valid header value"),
            forwarded_proto: HeaderValue::from_static(if scheme == Scheme::HTTPS { "https" } else { "http" }),
        }
    }
}

/// The proxy: routing, pages and forwarding.
pub struct Proxy {
    pub(crate) domain: String,
    pub(crate) routes: Arc<RouteTable>,
    client: hyper_util::client::legacy::Client<HttpConnector, Incoming>,
    /// This worker's idle upstream connections for the HTTP/1.1 fast path.
    pub(crate) upstreams: crate::fast::Pool,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) metrics: ProxyMetrics,
}

impl Proxy {
    /// A proxy serving `<hash>.<domain>` from `routes`.
    pub fn new(
        domain: &str,
        routes: Arc<RouteTable>,
        connect_timeout: Duration,
        request_timeout: Duration,
        metrics: ProxyMetrics,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(connector);
        Self {
            domain: domain.trim_end_matches('.').to_ascii_lowercase(),
            routes,
            client,
            upstreams: crate::fast::Pool::default(),
            connect_timeout,
            request_timeout,
            metrics,
        }
    }

    /// Answers one request from `client`.
    pub async fn handle(&self, req: Request<Incoming>, client: &Client) -> Response<Body> {
        let start = Instant::now();
        let response = self.route(req, client).await;
        self.metrics.observe(Path::Hyper, response.status().as_u16(), start.elapsed());
        response
    }

    async fn route(&self, req: Request<Incoming>, client: &Client) -> Response<Body> {
        // hyper's own limit, its read buffer, only stops a head that arrives in pieces.
        if head_len(&req) > MAX_REQUEST_HEAD {
            let mut page = pages::head_too_large();
            if req.version() < Version::HTTP_2 {
                page.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            return page.map(Either::Right);
        }
        let Some(hash) = request_host(&req).and_then(|host| subdomain(host, &self.domain)) else {
            return pages::plain_not_found().map(Either::Right);
        };
        let route = match self.routes.lookup(&hash).await {
            Lookup::Found(route) => route,
            Lookup::Unknown => return pages::not_found().map(Either::Right),
            Lookup::Unavailable => return pages::unavailable().map(Either::Right),
        };
        match (route.route.status, &route.backend) {
            (RouteStatus::Ready, Some(backend)) => {
                if !route.limiter.allow() {
                    return pages::too_many_requests().map(Either::Right);
                }
                let backend = backend.clone();
                self.forward(req, &route, backend, client).await
            }
            _ => pages::building(&route.route).map(Either::Right),
        }
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        route: &ResolvedRoute,
        backend: Authority,
        client: &Client,
    ) -> Response<Body> {
        let upgrade = upgrade_protocol(req.headers());
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();

        let host = parts
            .headers
            .get(header::HOST)
            .cloned()
            .or_else(|| parts.uri.authority().and_then(|authority| HeaderValue::from_str(authority.as_str()).ok()));
        let path = parts.uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        parts.uri = match Uri::builder().scheme(Scheme::HTTP).authority(backend).path_and_query(path).build() {
            Ok(uri) => uri,
            Err(_) => return pages::bad_gateway(&route.route).map(Either::Right),
        };
        // Clients may speak HTTP/2; apps are reached over HTTP/1.1.
        parts.version = Version::HTTP_11;

        let headers = &mut parts.headers;
        strip_hop_by_hop(headers);
        if let Some(protocol) = upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, protocol);
        }
        if let Some(host) = &host {
            headers.insert(header::HOST, host.clone());
            headers.insert(X_FORWARDED_HOST.clone(), host.clone());
        }
        // The edge is the first hop Stagely trusts: whatever the client claims is replaced.
        headers.insert(X_FORWARDED_FOR.clone(), client.forwarded_for.clone());
        headers.insert(X_FORWARDED_PROTO.clone(), client.forwarded_proto.clone());
        headers.insert(X_STAGELY_PROJECT.clone(), route.project.clone());
        headers.insert(X_STAGELY_PR.clone(), route.pr.clone());
        headers.insert(X_STAGELY_ENVIRONMENT.clone(), route.environment.clone());

        let mut req = Request::from_parts(parts, body);
        let connection = capture_connection(&mut req);
        let sent = tokio::time::timeout(self.request_timeout, self.client.request(req)).await;
        let mut response = match sent {
            Ok(Ok(response)) => response,
            Ok(Err(err)) => {
                tracing::debug!(%err, environment = %route.route.environment, "upstream failed");
                return pages::bad_gateway(&route.route).map(Either::Right);
            }
            Err(_) => {
                tracing::debug!(environment = %route.route.environment, "upstream timed out");
                return pages::bad_gateway(&route.route).map(Either::Right);
            }
        };

        if response.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = client_upgrade
        {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(async move {
                match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((client, upstream)) => {
                        let _ =
                            tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut TokioIo::new(upstream)).await;
                    }
                    Err(err) => tracing::debug!(%err, "upgrade failed"),
                }
            });
            let (parts, _) = response.into_parts();
            return Response::from_parts(parts, Either::Right(Full::new(Bytes::new())));
        }
        if let Some(reason) = unsound_framing(response.headers()) {
            // hyper's client would otherwise pool the connection once the body is read, and
            // the app's next answer on it may start anywhere.
            if let Some(connected) = connection.connection_metadata().as_ref() {
                connected.poison();
            }
            tracing::debug!(reason, environment = %route.route.environment, "upstream response refused");
            return pages::bad_gateway(&route.route).map(Either::Right);
        }
        strip_hop_by_hop(response.headers_mut());
        response.map(Either::Left)
    }
}

/// The request's host, from the URI (HTTP/2) or the Host header, without a port.
fn request_host<B>(req: &Request<B>) -> Option<&str> {
    let host = match req.uri().host() {
        Some(host) => host,
        None => req.headers().get(header::HOST)?.to_str().ok()?,
    };
    Some(without_port(host))
}

/// About how long `req`'s head is in HTTP/1.1: its request line and header lines.
fn head_len<B>(req: &Request<B>) -> usize {
    let uri = req.uri();
    let target = uri.path_and_query().map_or(1, |target| target.as_str().len())
        + uri.authority().map_or(0, |authority| "http://".len() + authority.as_str().len());
    let line = req.method().as_str().len() + 1 + target + " HTTP/1.1\r\n".len();
    line + req.headers().iter().map(|(name, value)| name.as_str().len() + ": \r\n".len() + value.len()).sum::<usize>()
}

/// `host` without its `:port`, if any.
pub(crate) fn without_port(host: &str) -> &str {
    if host.starts_with('[') {
        // An IPv6 literal: never a preview address, so its port does not matter.
        return host;
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// The subdomain hash of `host` under `domain`, if `host` is exactly `<hash>.<domain>`.
pub(crate) fn subdomain<'a>(host: &'a str, domain: &str) -> Option<std::borrow::Cow<'a, str>> {
    let host = host.strip_suffix('.').unwrap_or(host);
    let split = host.len().checked_sub(domain.len() + 1)?;
    if !host.is_char_boundary(split)
        || host.as_bytes()[split] != b'.'
        || !host[split + 1..].eq_ignore_ascii_case(domain)
    {
        return None;
    }
    let label = &host[..split];
    if label.is_empty() || label.len() > 63 || !label.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    Some(if label.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(label.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(label)
    })
}

/// The protocol a request asks to upgrade to (`Connection: upgrade` + `Upgrade: …`).
fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let wants_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|value| headers::tokens(value.as_bytes()))
        .any(|token| token.eq_ignore_ascii_case(b"upgrade"));
    if wants_upgrade { headers.get(header::UPGRADE).cloned() } else { None }
}

/// Removes hop-by-hop headers, including those the Connection header names.
fn strip_hop_by_hop(map: &mut HeaderMap) {
    let named: Vec<HeaderName> = map
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|value| headers::tokens(value.as_bytes()))
        .filter_map(|token| HeaderName::from_bytes(token).ok())
        .collect();
    for name in &named {
        map.remove(name);
    }
    for name in headers::HOP_BY_HOP {
        map.remove(name);
    }
}

/// Why the app's response cannot reach the client with one framing, if it cannot.
fn unsound_framing(map: &HeaderMap) -> Option<&'static str> {
    let mut codings = TransferCodings::default();
    for value in map.get_all(header::TRANSFER_ENCODING) {
        codings.add(value.as_bytes());
    }
    codings.chunked(map.contains_key(header::CONTENT_LENGTH)).err()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_single_label_under_the_domain_is_a_preview() {
        let domain = "preview.example.com";
        assert_eq!(subdomain("abc123.preview.example.com", domain).as_deref(), Some("abc123"));
        assert_eq!(subdomain("ABC123.Preview.Example.com.", domain).as_deref(), Some("abc123"));
        for host in [
            "preview.example.com",
            "a.b.preview.example.com",
            ".preview.example.com",
            "abc.example.com",
            "203.0.113.7",
            "x-y.preview.example.com",
            "abcpreview.example.com",
        ] {
            assert_eq!(subdomain(host, domain), None, "{host}");
        }
    }

    #[test]
    fn hosts_lose_their_port() {
        let host = |value: &str| {
            let req = Request::builder().uri("/").header(header::HOST, value).body(()).unwrap();
            request_host(&req).map(str::to_owned)
        };
        assert_eq!(host("abc.preview.example.com:8443").as_deref(), Some("abc.preview.example.com"));
        assert_eq!(host("abc.preview.example.com").as_deref(), Some("abc.preview.example.com"));
        assert_eq!(host("[::1]:80").as_deref(), Some("[::1]:80"));
        let h2 = Request::builder().uri("https://abc.preview.example.com:443/x").body(()).unwrap();
        assert_eq!(request_host(&h2), Some("abc.preview.example.com"));
    }

    #[test]
    fn hop_by_hop_headers_go_including_those_connection_names() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret-hop"));
        headers.insert("x-secret-hop", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.keys().map(HeaderName::as_str).collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn upgrades_need_both_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert_eq!(upgrade_protocol(&headers), None);
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        assert_eq!(upgrade_protocol(&headers), Some(HeaderValue::from_static("websocket")));
    }
}
