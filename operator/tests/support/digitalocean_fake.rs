//! A hand-written, in-memory fake of the DigitalOcean API v2 parts Stagely calls, because the
//! real API cannot be reached here. It always runs behind Prism (see `prism.rs`), which checks
//! both directions against DigitalOcean's published OpenAPI description: the provider's requests
//! and this fake's answers.
//!
//! Each bearer token is its own account, so tests sharing one fake see only their droplets.
//! Tokens starting with `bad` are refused, as DigitalOcean refuses unknown tokens.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

/// A droplet as the fake keeps it.
#[derive(Clone, Debug)]
pub struct Droplet {
    /// Its id.
    pub id: u64,
    /// Its name.
    pub name: String,
    /// Size slug asked for.
    pub size: String,
    /// Region asked for.
    pub region: String,
    /// Image asked for.
    pub image: String,
    /// Tags asked for.
    pub tags: Vec<String>,
    /// User data asked for.
    pub user_data: String,
    /// `new` until first read, then `active` with addresses.
    pub status: &'static str,
    /// When it was created (RFC 3339).
    pub created_at: String,
}

/// Now, to the second, as the API writes times: what a new resource reports as its creation
/// time (a fixed date would make every VM look long launched to whoever measures its age).
fn now_rfc3339() -> String {
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    k8s_openapi::jiff::Timestamp::from_second(now).unwrap().to_string()
}

#[derive(Default)]
struct Account {
    droplets: BTreeMap<u64, Droplet>,
    creates: usize,
    throttle: u32,
    retry_after: u64,
    lose_next_create_answer: bool,
    break_next_answer: bool,
}

#[derive(Default)]
struct Inner {
    accounts: HashMap<String, Account>,
    next_id: u64,
}

/// The fake; clones share state.
#[derive(Clone, Default)]
pub struct DigitalOceanFake {
    inner: Arc<Mutex<Inner>>,
}

/// The sizes the fake offers: (slug, vCPUs, memory MB, hourly USD).
pub const SIZES: [(&str, u32, u32, f64); 3] =
    [("s-2vcpu-4gb", 2, 4096, 0.03571), ("c-4", 4, 8192, 0.125), ("c-8", 8, 16384, 0.25)];

impl DigitalOceanFake {
    /// The next `times` calls of `token`'s account answer 429 with `Retry-After: retry_after`.
    pub fn throttle(&self, token: &str, times: u32, retry_after: u64) {
        let mut inner = self.inner.lock().unwrap();
        let account = inner.accounts.entry(token.to_owned()).or_default();
        account.throttle = times;
        account.retry_after = retry_after;
    }

    /// The next create of `token`'s account makes the droplet, then answers 500: the caller
    /// never learns the id, as when the operator dies between the call and the status write.
    pub fn lose_next_create_answer(&self, token: &str) {
        self.inner.lock().unwrap().accounts.entry(token.to_owned()).or_default().lose_next_create_answer = true;
    }

    /// The next answer to `token` leaves out a field the spec requires.
    pub fn break_next_answer(&self, token: &str) {
        self.inner.lock().unwrap().accounts.entry(token.to_owned()).or_default().break_next_answer = true;
    }

    /// `token`'s droplets.
    pub fn droplets(&self, token: &str) -> Vec<Droplet> {
        let inner = self.inner.lock().unwrap();
        inner.accounts.get(token).map(|a| a.droplets.values().cloned().collect()).unwrap_or_default()
    }

    /// How many droplets `token`'s account has created.
    pub fn creates(&self, token: &str) -> usize {
        self.inner.lock().unwrap().accounts.get(token).map_or(0, |a| a.creates)
    }

    /// The API's routes.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v2/account", get(account))
            .route("/v2/sizes", get(sizes))
            .route("/v2/droplets", get(list).post(create))
            .route("/v2/droplets/{id}", get(read).delete(destroy))
            .with_state(self.clone())
    }

    /// Checks the token and the throttle; `Ok` holds the token.
    fn gate(&self, headers: &HeaderMap) -> Result<String, Box<Response>> {
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default()
            .to_owned();
        if token.is_empty() || token.starts_with("bad") {
            return Err(Box::new(error(StatusCode::UNAUTHORIZED, "Unauthorized", "Unable to authenticate you")));
        }
        let mut inner = self.inner.lock().unwrap();
        let account = inner.accounts.entry(token.clone()).or_default();
        if account.throttle > 0 {
            account.throttle -= 1;
            let mut response = error(StatusCode::TOO_MANY_REQUESTS, "too_many_requests", "API Rate limit exceeded.");
            let headers = response.headers_mut();
            headers.insert("retry-after", account.retry_after.into());
            headers.insert("ratelimit-limit", 5000.into());
            headers.insert("ratelimit-remaining", 0.into());
            return Err(Box::new(response));
        }
        Ok(token)
    }

    fn take_break(&self, token: &str) -> bool {
        let mut inner = self.inner.lock().unwrap();
        inner.accounts.get_mut(token).is_some_and(|a| std::mem::take(&mut a.break_next_answer))
    }
}

fn error(status: StatusCode, id: &str, message: &str) -> Response {
    (status, Json(json!({ "id": id, "message": message, "request_id": "fake-request" }))).into_response()
}

fn size_json(slug: &str) -> Value {
    let (slug, vcpus, memory, hourly) = SIZES.iter().find(|s| s.0 == slug).copied().unwrap_or(SIZES[0]);
    json!({
        "slug": slug,
        "memory": memory,
        "vcpus": vcpus,
        "disk": 80,
        "transfer": 4.0,
        "price_monthly": (hourly * 672.0_f64).round(),
        "price_hourly": hourly,
        "regions": ["fra1", "ams3", "nyc3"],
        "available": true,
        "description": "Basic",
    })
}

fn droplet_json(d: &Droplet) -> Value {
    let size = size_json(&d.size);
    let v4 = if d.status == "active" {
        json!([
            { "ip_address": format!("203.0.113.{}", d.id % 250 + 1), "netmask": "255.255.240.0", "gateway": "203.0.113.254", "type": "public" },
            { "ip_address": format!("10.110.0.{}", d.id % 250 + 1), "netmask": "255.255.240.0", "gateway": "10.110.0.1", "type": "private" },
        ])
    } else {
        json!([])
    };
    json!({
        "id": d.id,
        "name": d.name,
        "memory": size["memory"],
        "vcpus": size["vcpus"],
        "disk": 80,
        "locked": false,
        "status": d.status,
        "created_at": d.created_at,
        "features": ["monitoring"],
        "backup_ids": [],
        "next_backup_window": null,
        "snapshot_ids": [],
        "image": { "id": 191_457_505, "name": "24.04 (LTS) x64", "type": "base", "distribution": "Ubuntu", "slug": d.image, "public": true, "regions": ["fra1", "ams3", "nyc3"], "min_disk_size": 7, "size_gigabytes": 2.36, "tags": [], "status": "available" },
        "volume_ids": [],
        "size": size,
        "size_slug": d.size,
        "networks": { "v4": v4, "v6": [] },
        "region": { "name": "Frankfurt 1", "slug": d.region, "features": ["metadata"], "available": true, "sizes": SIZES.map(|s| s.0) },
        "tags": d.tags,
    })
}

/// Drops a required field when a broken answer was asked for.
fn maybe_break(fake: &DigitalOceanFake, token: &str, mut droplet: Value) -> Value {
    if fake.take_break(token) {
        droplet.as_object_mut().unwrap().remove("networks");
    }
    droplet
}

async fn account(State(fake): State<DigitalOceanFake>, headers: HeaderMap) -> Response {
    if let Err(response) = fake.gate(&headers) {
        return *response;
    }
    Json(json!({ "account": {
        "droplet_limit": 25, "floating_ip_limit": 3, "email": "team@example.com", "name": "Team",
        "uuid": "b6fr89dbf6d9156cace5f3c78dc9851d957381ef", "email_verified": true, "status": "active",
        "status_message": "",
    }}))
    .into_response()
}

async fn sizes(State(fake): State<DigitalOceanFake>, headers: HeaderMap) -> Response {
    if let Err(response) = fake.gate(&headers) {
        return *response;
    }
    let sizes: Vec<Value> = SIZES.iter().map(|s| size_json(s.0)).collect();
    Json(json!({ "sizes": sizes, "links": {}, "meta": { "total": SIZES.len() } })).into_response()
}

async fn list(
    State(fake): State<DigitalOceanFake>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let token = match fake.gate(&headers) {
        Ok(token) => token,
        Err(response) => return *response,
    };
    let droplets: Vec<Value> = fake
        .droplets(&token)
        .iter()
        .filter(|d| query.get("tag_name").is_none_or(|t| d.tags.contains(t)))
        .filter(|d| query.get("name").is_none_or(|n| &d.name == n))
        .map(|d| maybe_break(&fake, &token, droplet_json(d)))
        .collect();
    Json(json!({ "meta": { "total": droplets.len() }, "droplets": droplets, "links": {} })).into_response()
}

async fn create(State(fake): State<DigitalOceanFake>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    let token = match fake.gate(&headers) {
        Ok(token) => token,
        Err(response) => return *response,
    };
    let text = |key: &str| body.get(key).and_then(Value::as_str).unwrap_or_default().to_owned();
    if !SIZES.iter().any(|s| s.0 == text("size")) {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unprocessable_entity",
            "You specified an invalid size for Droplet creation.",
        );
    }
    let mut inner = fake.inner.lock().unwrap();
    inner.next_id += 1;
    let droplet = Droplet {
        id: 3_000_000 + inner.next_id,
        name: text("name"),
        size: text("size"),
        region: text("region"),
        image: text("image"),
        tags: body["tags"].as_array().into_iter().flatten().filter_map(|t| t.as_str().map(str::to_owned)).collect(),
        user_data: text("user_data"),
        status: "new",
        created_at: now_rfc3339(),
    };
    let account = inner.accounts.entry(token).or_default();
    account.creates += 1;
    account.droplets.insert(droplet.id, droplet.clone());
    if std::mem::take(&mut account.lose_next_create_answer) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "Server was unable to give you a response.");
    }
    let links = json!({ "actions": [{ "id": droplet.id + 7, "rel": "create", "href": format!("https://api.digitalocean.com/v2/actions/{}", droplet.id + 7) }] });
    (StatusCode::ACCEPTED, Json(json!({ "droplet": droplet_json(&droplet), "links": links }))).into_response()
}

async fn read(State(fake): State<DigitalOceanFake>, headers: HeaderMap, Path(id): Path<u64>) -> Response {
    let token = match fake.gate(&headers) {
        Ok(token) => token,
        Err(response) => return *response,
    };
    let found = {
        let mut inner = fake.inner.lock().unwrap();
        // A droplet boots between its creation and the first look at it.
        inner.accounts.entry(token.clone()).or_default().droplets.get_mut(&id).map(|d| {
            d.status = "active";
            d.clone()
        })
    };
    match found {
        Some(d) => Json(json!({ "droplet": maybe_break(&fake, &token, droplet_json(&d)) })).into_response(),
        None => not_found(),
    }
}

async fn destroy(State(fake): State<DigitalOceanFake>, headers: HeaderMap, Path(id): Path<u64>) -> Response {
    let token = match fake.gate(&headers) {
        Ok(token) => token,
        Err(response) => return *response,
    };
    let removed = fake.inner.lock().unwrap().accounts.entry(token).or_default().droplets.remove(&id);
    match removed {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => not_found(),
    }
}

fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not_found", "The resource you were accessing could not be found.")
}
