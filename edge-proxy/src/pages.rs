//! The pages the proxy answers with itself: "Building…", 404, 502, 429.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use stagely_api::route::{Route, RouteStatus};

/// Seconds after which the "Building…" page reloads itself.
pub const REFRESH_SECS: u32 = 5;

fn page(status: StatusCode, title: &str, body: &str, refresh: bool) -> Response<Full<Bytes>> {
    let refresh =
        if refresh { format!("<meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">") } else { String::new() };
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\">{refresh}<title>{title}</title>\
         <style>body{{font-family:system-ui,sans-serif;max-width:40rem;margin:4rem auto;padding:0 1rem;color:#222}}\
         h1{{font-size:1.5rem}}dt{{font-weight:600}}</style></head><body>{body}</body></html>"
    );
    let mut response = Response::new(Full::new(Bytes::from(html)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Text safe to place in HTML.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn phase(status: RouteStatus) -> &'static str {
    match status {
        RouteStatus::Building => "Building images",
        RouteStatus::Deploying => "Deploying",
        RouteStatus::Ready => "Starting",
        RouteStatus::Failed => "Failed",
    }
}

/// "Building your environment…": refreshes itself and says where the environment is.
pub fn building(route: &Route) -> Response<Full<Bytes>> {
    let (title, lead) = match route.status {
        RouteStatus::Failed => {
            ("Preview failed", "The latest run of this environment failed; it will retry on the next push.")
        }
        _ => ("Building your environment…", "This preview is on its way. This page reloads by itself."),
    };
    let body = format!(
        "<h1>{title}</h1><p>{lead}</p><dl><dt>Project</dt><dd>{}</dd><dt>Pull request</dt><dd>#{}</dd>\
         <dt>Phase</dt><dd>{}</dd></dl>",
        escape(&route.project),
        route.pr,
        phase(route.status),
    );
    page(StatusCode::SERVICE_UNAVAILABLE, title, &body, true)
}

/// No environment has this address.
pub fn not_found() -> Response<Full<Bytes>> {
    page(
        StatusCode::NOT_FOUND,
        "No preview here",
        "<h1>No preview here</h1><p>No environment has this address. It may have been torn down when its pull request closed.</p>",
        false,
    )
}

/// The environment's app refused the connection or did not answer in time.
pub fn bad_gateway(route: &Route) -> Response<Full<Bytes>> {
    let body = format!(
        "<h1>The preview is not answering</h1><p>Environment <b>{}</b> (project {}, pull request #{}) did not answer. \
         Its app may be starting or may have crashed.</p>",
        escape(&route.environment),
        escape(&route.project),
        route.pr
    );
    page(StatusCode::BAD_GATEWAY, "The preview is not answering", &body, false)
}

/// The route table cannot be read and nothing is cached for this address.
pub fn unavailable() -> Response<Full<Bytes>> {
    let mut response = page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Temporarily unavailable",
        "<h1>Temporarily unavailable</h1><p>The preview router cannot look up this address right now. Try again shortly.</p>",
        true,
    );
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    response
}

/// The environment is over its request rate.
pub fn too_many_requests() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(b"too many requests for this preview\n")));
    *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// A request head longer than the proxy takes.
pub fn head_too_large() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(b"request header fields too large\n")));
    *response.status_mut() = StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// A host that is not a preview address (the bare domain, an IP, another name).
pub fn plain_not_found() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(b"404 page not found\n")));
    *response.status_mut() = StatusCode::NOT_FOUND;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_escaped() {
        assert_eq!(escape(r#"<script>"a"&'b'</script>"#), "&lt;script&gt;&quot;a&quot;&amp;&#39;b&#39;&lt;/script&gt;");
    }
}
