//! The route record: what the operator writes to Redis for each environment and the edge
//! proxy reads to serve `<hash>.<preview-domain>`.
//!
//! The record lives at [`route_key`] as a JSON string. After every write or delete the operator
//! publishes the hash on [`ROUTE_CHANNEL`], so proxies drop their cached copy without polling.
//! The record holds no secret: only where the app is and what to show while it is not.

use serde::{Deserialize, Serialize};

/// Prefix of route keys in Redis.
pub const ROUTE_KEY_PREFIX: &str = "route:";

/// Redis pub/sub channel on which the hash of every changed route is published.
pub const ROUTE_CHANNEL: &str = "stagely:routes";

/// The Redis key of the route for subdomain `hash`.
pub fn route_key(hash: &str) -> String {
    format!("{ROUTE_KEY_PREFIX}{hash}")
}

/// Where a preview is served from, and what to show until it can be.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// What the proxy does with requests for this route.
    pub status: RouteStatus,
    /// Address of the preview VM; set once the VM has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Port the app listens on, on the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Name of the Project.
    pub project: String,
    /// Namespace of the Environment.
    pub namespace: String,
    /// Name of the Environment.
    pub environment: String,
    /// The pull request number.
    pub pr: u64,
}

impl Route {
    /// The `ip:port` to proxy to, if the route is ready and has both.
    pub fn backend(&self) -> Option<String> {
        match (self.status, &self.ip, self.port) {
            (RouteStatus::Ready, Some(ip), Some(port)) if ip.contains(':') => Some(format!("[{ip}]:{port}")),
            (RouteStatus::Ready, Some(ip), Some(port)) => Some(format!("{ip}:{port}")),
            _ => None,
        }
    }
}

/// What the proxy does with requests for a route.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RouteStatus {
    /// Images are building: show the "Building your environment…" page.
    Building,
    /// The preview VM is starting the app: show the same page, with this phase.
    Deploying,
    /// Proxy to `ip:port`.
    Ready,
    /// The current run failed: show the waiting page with this phase.
    Failed,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready() -> Route {
        Route {
            status: RouteStatus::Ready,
            ip: Some("203.0.113.7".into()),
            port: Some(8080),
            project: "shop".into(),
            namespace: "team-a".into(),
            environment: "shop-pr-42".into(),
            pr: 42,
        }
    }

    #[test]
    fn route_round_trips_and_has_a_stable_wire_form() {
        let route = ready();
        let json = serde_json::to_string(&route).unwrap();
        assert_eq!(
            json,
            r#"{"status":"ready","ip":"203.0.113.7","port":8080,"project":"shop","namespace":"team-a","environment":"shop-pr-42","pr":42}"#
        );
        assert_eq!(serde_json::from_str::<Route>(&json).unwrap(), route);

        let building = Route { status: RouteStatus::Building, ip: None, port: None, ..route };
        let json = serde_json::to_string(&building).unwrap();
        assert!(!json.contains("ip") && json.contains(r#""status":"building""#), "{json}");
        assert_eq!(serde_json::from_str::<Route>(&json).unwrap(), building);
    }

    #[test]
    fn backend_only_when_ready_with_an_address() {
        assert_eq!(ready().backend().as_deref(), Some("203.0.113.7:8080"));
        let v6 = Route { ip: Some("2001:db8::1".into()), ..ready() };
        assert_eq!(v6.backend().as_deref(), Some("[2001:db8::1]:8080"));
        assert_eq!(Route { status: RouteStatus::Deploying, ..ready() }.backend(), None);
        assert_eq!(Route { port: None, ..ready() }.backend(), None);
        assert_eq!(route_key("abc123"), "route:abc123");
    }
}
