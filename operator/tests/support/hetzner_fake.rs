//! A hand-written, in-memory fake of the Hetzner Cloud API v1 parts Stagely calls, because the
//! real API cannot be reached here. It always runs behind Prism (see `prism.rs`), which checks
//! both directions against the published OpenAPI description of Hetzner Cloud: the provider's
//! requests and this fake's answers.
//!
//! Each bearer token is its own project, so tests sharing one fake see only their servers.
//! Tokens starting with `bad` are refused, as Hetzner refuses unknown tokens.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

/// The server types the fake offers: (id, name, cores, memory GB, architecture, deprecated,
/// hourly gross EUR in fsn1). Names as Hetzner has them now, with a retired one among them.
pub const SERVER_TYPES: [(u64, &str, u32, f64, &str, bool, f64); 8] = [
    (104, "cx22", 2, 4.0, "x86", true, 0.0050),
    (108, "cx23", 2, 4.0, "x86", false, 0.0060),
    (109, "cpx22", 2, 4.0, "x86", false, 0.0090),
    (110, "cx33", 4, 8.0, "x86", false, 0.0100),
    (112, "cx53", 16, 32.0, "x86", false, 0.0300),
    (45, "cax11", 2, 4.0, "arm", false, 0.0062),
    (93, "cax21", 4, 8.0, "arm", false, 0.0104),
    (94, "cax31", 8, 16.0, "arm", false, 0.0192),
];

/// A server as the fake keeps it.
#[derive(Clone, Debug)]
pub struct Server {
    /// Its id.
    pub id: u64,
    /// Its name.
    pub name: String,
    /// Server type asked for.
    pub server_type: String,
    /// Location asked for.
    pub location: String,
    /// Image asked for.
    pub image: String,
    /// Labels asked for.
    pub labels: BTreeMap<String, String>,
    /// User data asked for.
    pub user_data: String,
    /// `initializing` until first read, then `running`.
    pub status: &'static str,
    /// When it was created (RFC 3339).
    pub created: String,
}

/// Now, to the second, as the API writes times: what a new resource reports as its creation
/// time (a fixed date would make every VM look long launched to whoever measures its age).
fn now_rfc3339() -> String {
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    k8s_openapi::jiff::Timestamp::from_second(now).unwrap().to_string()
}

#[derive(Default)]
struct Project {
    servers: BTreeMap<u64, Server>,
    creates: usize,
    throttle: u32,
    lose_next_create_answer: bool,
}

#[derive(Default)]
struct Inner {
    projects: HashMap<String, Project>,
    next_id: u64,
    server_type_reads: usize,
}

/// The fake; clones share state.
#[derive(Clone, Default)]
pub struct HetznerFake {
    inner: Arc<Mutex<Inner>>,
}

impl HetznerFake {
    /// The next `times` calls of `token`'s project answer 429 `rate_limit_exceeded`, with the
    /// `RateLimit-Reset` header Hetzner sends (it sends no `Retry-After`).
    pub fn throttle(&self, token: &str, times: u32) {
        self.inner.lock().unwrap().projects.entry(token.to_owned()).or_default().throttle = times;
    }

    /// The next create of `token`'s project makes the server, then answers 500: the caller never
    /// learns the id, as when the operator dies between the call and the status write.
    pub fn lose_next_create_answer(&self, token: &str) {
        self.inner.lock().unwrap().projects.entry(token.to_owned()).or_default().lose_next_create_answer = true;
    }

    /// Puts a server that Stagely did not create into `token`'s project.
    pub fn add_foreign_server(&self, token: &str, name: &str) {
        let mut inner = self.inner.lock().unwrap();
        inner.next_id += 1;
        let server = Server {
            id: 40_000_000 + inner.next_id,
            name: name.to_owned(),
            server_type: "cx23".into(),
            location: "fsn1".into(),
            image: "debian-12".into(),
            labels: BTreeMap::new(),
            user_data: String::new(),
            status: "running",
            created: now_rfc3339(),
        };
        inner.projects.entry(token.to_owned()).or_default().servers.insert(server.id, server);
    }

    /// `token`'s servers.
    pub fn servers(&self, token: &str) -> Vec<Server> {
        let inner = self.inner.lock().unwrap();
        inner.projects.get(token).map(|p| p.servers.values().cloned().collect()).unwrap_or_default()
    }

    /// How many servers `token`'s project has created.
    pub fn creates(&self, token: &str) -> usize {
        self.inner.lock().unwrap().projects.get(token).map_or(0, |p| p.creates)
    }

    /// How many times `/server_types` was read, by anyone.
    pub fn server_type_reads(&self) -> usize {
        self.inner.lock().unwrap().server_type_reads
    }

    /// The API's routes (Hetzner's paths carry no `/v1`: it is part of the server URL).
    pub fn router(&self) -> Router {
        Router::new()
            .route("/server_types", get(server_types))
            .route("/pricing", get(pricing))
            .route("/servers", get(list).post(create))
            .route("/servers/{id}", get(read).delete(destroy))
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
            return Err(Box::new(error(StatusCode::UNAUTHORIZED, "unauthorized", "unable to authenticate")));
        }
        let mut inner = self.inner.lock().unwrap();
        let project = inner.projects.entry(token.clone()).or_default();
        if project.throttle > 0 {
            project.throttle -= 1;
            let reset = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 1;
            let mut response =
                error(StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded", "limit of 3600 requests per hour reached");
            let headers = response.headers_mut();
            headers.insert("ratelimit-limit", 3600.into());
            headers.insert("ratelimit-remaining", 0.into());
            headers.insert("ratelimit-reset", reset.into());
            return Err(Box::new(response));
        }
        Ok(token)
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({ "error": { "code": code, "message": message, "details": {} } }))).into_response()
}

fn money(value: f64) -> Value {
    json!({ "net": format!("{:.10}", value / 1.19), "gross": format!("{value:.10}") })
}

fn prices(hourly: f64) -> Value {
    json!([
        { "location": "fsn1", "price_hourly": money(hourly), "price_monthly": money(hourly * 720.0), "included_traffic": 21_990_232_555_520_u64, "price_per_tb_traffic": money(1.19) },
        { "location": "hel1", "price_hourly": money(hourly * 1.1), "price_monthly": money(hourly * 792.0), "included_traffic": 21_990_232_555_520_u64, "price_per_tb_traffic": money(1.19) },
    ])
}

fn server_type_json(name: &str) -> Value {
    let (id, name, cores, memory, architecture, deprecated, hourly) =
        SERVER_TYPES.iter().find(|t| t.1 == name).copied().unwrap_or(SERVER_TYPES[1]);
    let deprecation =
        deprecated.then(|| json!({ "announced": "2025-09-01T00:00:00Z", "unavailable_after": "2025-12-31T00:00:00Z" }));
    json!({
        "id": id, "name": name, "description": name.to_uppercase(), "category": "regular_purpose",
        "cores": cores, "memory": memory, "disk": 40 * cores, "architecture": architecture,
        "cpu_type": "shared", "storage_type": "local", "deprecated": deprecated, "deprecation": deprecation,
        "locations": [
            { "id": 1, "name": "fsn1", "deprecation": null },
            { "id": 3, "name": "hel1", "deprecation": null },
        ],
        "prices": prices(hourly),
    })
}

fn location_json(name: &str) -> Value {
    json!({ "id": 1, "name": name, "description": "Falkenstein DC Park 1", "country": "DE", "city": "Falkenstein", "latitude": 50.47612, "longitude": 12.370071, "network_zone": "eu-central" })
}

fn action_json(id: u64, command: &str, server: u64) -> Value {
    json!({ "id": id, "command": command, "status": "running", "progress": 0, "started": "2026-01-02T03:04:05Z", "finished": null, "resources": [{ "id": server, "type": "server" }], "error": null })
}

fn server_json(s: &Server) -> Value {
    json!({
        "id": s.id,
        "name": s.name,
        "status": s.status,
        "created": s.created,
        "public_net": {
            "ipv4": { "id": s.id + 1, "ip": format!("198.51.100.{}", s.id % 250 + 1), "blocked": false, "dns_ptr": "static.example.com" },
            "ipv6": null,
            "floating_ips": [],
            "firewalls": [],
        },
        "private_net": [],
        "server_type": server_type_json(&s.server_type),
        "datacenter": {
            "id": 4, "name": format!("{}-dc14", s.location), "description": "Falkenstein 1 virtual DC 14",
            "location": location_json(&s.location),
            "server_types": { "supported": [108, 110], "available": [108, 110], "available_for_migration": [108] },
        },
        "location": location_json(&s.location),
        "image": null,
        "iso": null,
        "rescue_enabled": false,
        "locked": false,
        "backup_window": null,
        "outgoing_traffic": 0,
        "ingoing_traffic": 0,
        "included_traffic": 21_990_232_555_520_u64,
        "protection": { "delete": false, "rebuild": false },
        "labels": s.labels,
        "volumes": [],
        "load_balancers": [],
        "primary_disk_size": 40,
    })
}

fn pagination(total: usize) -> Value {
    json!({ "pagination": { "page": 1, "per_page": 50, "previous_page": null, "next_page": null, "last_page": 1, "total_entries": total } })
}

/// Whether `labels` match a label selector: `k=v`, `k==v`, `k!=v`, `k` and `!k`, comma-joined.
fn selects(selector: &str, labels: &BTreeMap<String, String>) -> bool {
    selector.split(',').map(str::trim).filter(|t| !t.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            labels.get(k).is_none_or(|have| have != v)
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            labels.get(k).is_some_and(|have| have == v)
        } else if let Some(k) = term.strip_prefix('!') {
            !labels.contains_key(k)
        } else {
            labels.contains_key(term)
        }
    })
}

async fn server_types(State(fake): State<HetznerFake>, headers: HeaderMap) -> Response {
    if let Err(response) = fake.gate(&headers) {
        return *response;
    }
    fake.inner.lock().unwrap().server_type_reads += 1;
    let types: Vec<Value> = SERVER_TYPES.iter().map(|t| server_type_json(t.1)).collect();
    Json(json!({ "server_types": types, "meta": pagination(types.len()) })).into_response()
}

async fn pricing(State(fake): State<HetznerFake>, headers: HeaderMap) -> Response {
    if let Err(response) = fake.gate(&headers) {
        return *response;
    }
    let types: Vec<Value> =
        SERVER_TYPES.iter().map(|t| json!({ "id": t.0, "name": t.1, "prices": prices(t.6) })).collect();
    Json(json!({ "pricing": {
        "currency": "EUR",
        "vat_rate": "19.00",
        "image": { "price_per_gb_month": money(0.0119) },
        "floating_ip": { "price_monthly": money(3.57) },
        "floating_ips": [],
        "primary_ips": [],
        "load_balancer_types": [],
        "server_backup": { "percentage": "20.00" },
        "volume": { "price_per_gb_month": money(0.0524) },
        "server_types": types,
    }}))
    .into_response()
}

async fn list(
    State(fake): State<HetznerFake>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let token = match fake.gate(&headers) {
        Ok(token) => token,
        Err(response) => return *response,
    };
    let servers: Vec<Value> = fake
        .servers(&token)
        .iter()
        .filter(|s| query.get("label_selector").is_none_or(|sel| selects(sel, &s.labels)))
        .filter(|s| query.get("name").is_none_or(|n| &s.name == n))
        .map(server_json)
        .collect();
    Json(json!({ "servers": servers, "meta": pagination(servers.len()) })).into_response()
}

async fn create(State(fake): State<HetznerFake>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    let token = match fake.gate(&headers) {
        Ok(token) => token,
        Err(response) => return *response,
    };
    let text = |key: &str| body.get(key).and_then(Value::as_str).unwrap_or_default().to_owned();
    if !SERVER_TYPES.iter().any(|t| t.1 == text("server_type") && !t.5) {
        return error(StatusCode::BAD_REQUEST, "invalid_input", "invalid input in field 'server_type'");
    }
    let mut inner = fake.inner.lock().unwrap();
    inner.next_id += 1;
    let id = 40_000_000 + inner.next_id;
    let project = inner.projects.entry(token).or_default();
    if project.servers.values().any(|s| s.name == text("name")) {
        return error(StatusCode::CONFLICT, "uniqueness_error", "server name is already used");
    }
    let server = Server {
        id,
        name: text("name"),
        server_type: text("server_type"),
        location: text("location"),
        image: text("image"),
        labels: serde_json::from_value(body["labels"].clone()).unwrap_or_default(),
        user_data: text("user_data"),
        status: "initializing",
        created: now_rfc3339(),
    };
    project.creates += 1;
    project.servers.insert(id, server.clone());
    if std::mem::take(&mut project.lose_next_create_answer) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "an internal error occurred");
    }
    let answer = json!({
        "server": server_json(&server),
        "action": action_json(id + 1, "create_server", id),
        "next_actions": [action_json(id + 2, "start_server", id)],
        "root_password": null,
    });
    (StatusCode::CREATED, Json(answer)).into_response()
}

async fn read(State(fake): State<HetznerFake>, headers: HeaderMap, Path(id): Path<u64>) -> Response {
    let token = match fake.gate(&headers) {
        Ok(token) => token,
        Err(response) => return *response,
    };
    let found = {
        let mut inner = fake.inner.lock().unwrap();
        // A server boots between its creation and the first look at it.
        inner.projects.entry(token).or_default().servers.get_mut(&id).map(|s| {
            s.status = "running";
            s.clone()
        })
    };
    match found {
        Some(s) => Json(json!({ "server": server_json(&s) })).into_response(),
        None => not_found(id),
    }
}

async fn destroy(State(fake): State<HetznerFake>, headers: HeaderMap, Path(id): Path<u64>) -> Response {
    let token = match fake.gate(&headers) {
        Ok(token) => token,
        Err(response) => return *response,
    };
    let removed = fake.inner.lock().unwrap().projects.entry(token).or_default().servers.remove(&id);
    match removed {
        Some(_) => Json(json!({ "action": action_json(id + 3, "delete_server", id) })).into_response(),
        None => not_found(id),
    }
}

fn not_found(id: u64) -> Response {
    error(StatusCode::NOT_FOUND, "not_found", &format!("server with ID '{id}' not found"))
}
