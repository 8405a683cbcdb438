//! The token endpoint of the registry's `token` auth: `GET /v1/registry/token?service=…&scope=…`
//! with a credential from [`super::Registry::push_credential`] or
//! [`super::Registry::pull_credential`] as HTTP Basic auth, answered with a registry token for
//! what was asked within what the credential grants.

use axum::extract::{RawQuery, State};
use axum::http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Serialize;

use super::Registry;
use super::token::{Access, CredentialError, parse_scope};

/// The path of the token endpoint.
pub const TOKEN_PATH: &str = "/v1/registry/token";

pub(super) fn router(registry: Registry) -> axum::Router {
    axum::Router::new().route(TOKEN_PATH, get(issue)).with_state(registry)
}

/// The request, as clients send it.
#[derive(Debug, Default, PartialEq)]
struct TokenRequest {
    service: Option<String>,
    scopes: Vec<String>,
}

fn parse_query(query: &str) -> TokenRequest {
    let mut request = TokenRequest::default();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match key.as_ref() {
            "service" => request.service = Some(value.into_owned()),
            // Some clients join several scopes with spaces in one parameter.
            "scope" => request.scopes.extend(value.split_whitespace().map(str::to_owned)),
            // `account` (the user name) and `client_id` say nothing the credential does not.
            _ => {}
        }
    }
    request
}

#[derive(Serialize)]
struct TokenResponse<'a> {
    token: &'a str,
    access_token: &'a str,
    expires_in: u64,
    issued_at: String,
}

async fn issue(State(registry): State<Registry>, RawQuery(query): RawQuery, headers: HeaderMap) -> Response {
    let Some(tokens) = registry.tokens() else {
        return error(StatusCode::NOT_FOUND, "NOT_FOUND", "the registry runs without token auth");
    };
    let Some(password) = basic_password(&headers) else {
        return unauthorized(tokens.service(), "a registry credential is required (HTTP Basic auth)");
    };
    let credential = match tokens.verify_credential(&password) {
        Ok(claims) => claims,
        Err(err) => {
            tracing::info!(reason = %err, "registry token refused");
            let message = match err {
                CredentialError::Expired => "the registry credential has expired",
                CredentialError::Invalid => "the registry credential is not valid",
            };
            return unauthorized(tokens.service(), message);
        }
    };
    let request = parse_query(query.as_deref().unwrap_or(""));
    if request.service.as_deref() != Some(tokens.service()) {
        let message = format!(
            "unknown service {:?}: this endpoint issues tokens for {:?}",
            request.service.as_deref().unwrap_or(""),
            tokens.service()
        );
        return error(StatusCode::BAD_REQUEST, "UNSUPPORTED", &message);
    }
    let mut requested: Vec<Access> = Vec::with_capacity(request.scopes.len());
    for scope in &request.scopes {
        match parse_scope(scope) {
            Some(access) => requested.push(access),
            None => return error(StatusCode::BAD_REQUEST, "UNSUPPORTED", &format!("malformed scope {scope:?}")),
        }
    }
    let access = super::token::intersect(&requested, &credential.grants);
    let issued = match tokens.token(&credential.sub, access.clone(), credential.exp) {
        Ok(issued) => issued,
        Err(err) => {
            tracing::error!(error = %err, "failed to sign a registry token");
            return error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", "failed to sign a registry token");
        }
    };
    let scopes: Vec<String> = access.iter().map(|a| format!("{}:{}:{}", a.kind, a.name, a.actions.join(","))).collect();
    tracing::debug!(subject = %credential.sub, credential = %credential.jti, granted = ?scopes, "registry token issued");
    let issued_at = i64::try_from(issued.issued_at)
        .ok()
        .and_then(|secs| k8s_openapi::jiff::Timestamp::from_second(secs).ok())
        .map(|at| at.to_string())
        .unwrap_or_default();
    let body = TokenResponse {
        token: issued.token.expose(),
        access_token: issued.token.expose(),
        expires_in: issued.expires_at.saturating_sub(issued.issued_at),
        issued_at,
    };
    let body = serde_json::to_string(&body).expect("a token response serializes");
    let headers = [
        (CONTENT_TYPE, HeaderValue::from_static("application/json")),
        (CACHE_CONTROL, HeaderValue::from_static("no-store")),
    ];
    (StatusCode::OK, headers, body).into_response()
}

/// The password of an `Authorization: Basic` header.
fn basic_password(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = STANDARD.decode(encoded.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (_user, password) = decoded.split_once(':')?;
    (!password.is_empty()).then(|| password.to_owned())
}

fn unauthorized(service: &str, message: &str) -> Response {
    let mut response = error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message);
    if let Ok(challenge) = HeaderValue::from_str(&format!("Basic realm={service:?}")) {
        response.headers_mut().insert(WWW_AUTHENTICATE, challenge);
    }
    response
}

/// An error in the registry's own format, which docker and podman print.
fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({"errors": [{"code": code, "message": message}]}).to_string();
    (status, [(CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_parse_with_repeated_and_joined_scopes() {
        let request = parse_query(
            "account=stagely&service=stagely-registry&scope=repository%3Ateam-a%2Fshop%2Fweb%3Apull%2Cpush\
             &scope=repository:a/b:pull+repository:c/d:pull&client_id=podman",
        );
        assert_eq!(
            request,
            TokenRequest {
                service: Some("stagely-registry".into()),
                scopes: vec![
                    "repository:team-a/shop/web:pull,push".into(),
                    "repository:a/b:pull".into(),
                    "repository:c/d:pull".into()
                ],
            }
        );
        assert_eq!(parse_query(""), TokenRequest::default());
    }

    #[test]
    fn basic_auth_yields_the_password() {
        let mut headers = HeaderMap::new();
        assert_eq!(basic_password(&headers), None);
        headers.insert(AUTHORIZATION, HeaderValue::from_str(&format!("Basic {}", STANDARD.encode("u:p:q"))).unwrap());
        assert_eq!(basic_password(&headers).as_deref(), Some("p:q"));
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer abc"));
        assert_eq!(basic_password(&headers), None);
        headers.insert(AUTHORIZATION, HeaderValue::from_static("basic !!!"));
        assert_eq!(basic_password(&headers), None);
        headers.insert(AUTHORIZATION, HeaderValue::from_str(&format!("basic {}", STANDARD.encode("u:"))).unwrap());
        assert_eq!(basic_password(&headers), None);
    }
}
