//! `stagely.dev/v1alpha1`: Project, CloudProvider, Environment and BuildJob.

// `#[kube(printcolumn(...))]` is meant to be repeated, once per column.
#![allow(clippy::duplicated_attributes)]

mod buildjob;
mod cloudprovider;
mod environment;
mod project;

pub use buildjob::*;
pub use cloudprovider::*;
pub use environment::*;
pub use project::*;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A machine size, mapped by each cloud provider to one of its instance types.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    /// About 2 vCPU and 2-4 GiB of memory.
    Small,
    /// About 2-4 vCPU and 4-8 GiB of memory.
    #[default]
    Medium,
    /// About 4-8 vCPU and 8-16 GiB of memory.
    Large,
}

impl Size {
    /// Every size, smallest first.
    pub const ALL: [Size; 3] = [Size::Small, Size::Medium, Size::Large];

    /// The name used in manifests and stagely.yaml.
    pub fn as_str(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Medium => "medium",
            Size::Large => "large",
        }
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Size::ALL
            .into_iter()
            .find(|size| size.as_str() == s)
            .ok_or_else(|| format!("unknown size {s:?} (expected small, medium or large)"))
    }
}

/// A container image platform that Stagely can build for.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Platform {
    /// x86-64.
    #[default]
    #[serde(rename = "linux/amd64")]
    LinuxAmd64,
    /// 64-bit ARM (AWS Graviton, Hetzner CAX).
    #[serde(rename = "linux/arm64")]
    LinuxArm64,
}

impl Platform {
    /// Every supported platform.
    pub const ALL: [Platform; 2] = [Platform::LinuxAmd64, Platform::LinuxArm64];

    /// The OCI platform string, e.g. `linux/amd64`.
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::LinuxAmd64 => "linux/amd64",
            Platform::LinuxArm64 => "linux/arm64",
        }
    }

    /// The CPU architecture, as a cloud provider names it (`amd64` or `arm64`).
    pub fn arch(self) -> &'static str {
        match self {
            Platform::LinuxAmd64 => "amd64",
            Platform::LinuxArm64 => "arm64",
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Platform {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Platform::ALL
            .into_iter()
            .find(|platform| platform.as_str() == s)
            .ok_or_else(|| format!("unknown platform {s:?} (expected linux/amd64 or linux/arm64)"))
    }
}

/// A reference to another object in the same namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalObjectRef {
    /// Name of the object, in the namespace of the referring object.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

impl LocalObjectRef {
    /// A reference to the object called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }
}

/// A virtual machine that Stagely started in a cloud account.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VmStatus {
    /// The provider's id for the instance (EC2 instance id, droplet id, Hetzner server id, or the
    /// local agent's process id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_id: Option<String>,
    /// Public IP address of the instance, once it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// The provider's state for the instance, e.g. `pending`, `running`, `terminated`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Machine size the instance was started with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Size>,
}

/// The pattern every duration field accepts: one or more `<digits><unit>` groups, unit one of
/// s, m, h or d (e.g. `90s`, `30m`, `24h`, `1h30m`, `7d`).
pub const DURATION_PATTERN: &str = "^([0-9]+[smhd])+$";

/// CEL rule shared by duration fields: a positive duration in Stagely's format.
pub(crate) const DURATION_RULE: &str = "self.matches('^([0-9]+[smhd])+$') && !self.matches('^(0+[smhd])+$')";

/// Parses a duration in Stagely's format (see [`DURATION_PATTERN`]) into seconds.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let invalid = || format!("invalid duration {text:?} (expected a positive duration such as 90s, 30m, 24h or 7d)");
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(invalid()),
        };
        let n: u64 = digits.parse().map_err(|_| invalid())?;
        total = n.checked_mul(unit).and_then(|secs| total.checked_add(secs)).ok_or_else(invalid)?;
        digits.clear();
    }
    if !digits.is_empty() || total == 0 {
        return Err(invalid());
    }
    Ok(std::time::Duration::from_secs(total))
}

/// Returns the condition of type `type_`, if present.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of type `type_` is present with status `True`.
pub fn is_condition_true(conditions: &[Condition], type_: &str) -> bool {
    find_condition(conditions, type_).is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90s").unwrap().as_secs(), 90);
        assert_eq!(parse_duration("1h30m").unwrap().as_secs(), 5400);
        assert_eq!(parse_duration("7d").unwrap().as_secs(), 7 * 86_400);
        for bad in ["", "-1h", "0h", "1x", "h", "10", "1.5h", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    /// Every example manifest reads into its typed object, writing that object back keeps every
    /// field of the manifest (defaults may be added, nothing is lost or renamed), and reading
    /// that gives the same object.
    #[test]
    fn examples_round_trip_through_the_typed_objects() {
        fn contains(outer: &serde_json::Value, inner: &serde_json::Value) -> bool {
            match (outer, inner) {
                (serde_json::Value::Object(o), serde_json::Value::Object(i)) => {
                    i.iter().all(|(k, v)| o.get(k).is_some_and(|ov| contains(ov, v)))
                }
                (serde_json::Value::Array(o), serde_json::Value::Array(i)) => {
                    o.len() == i.len() && o.iter().zip(i).all(|(ov, iv)| contains(ov, iv))
                }
                _ => outer == inner,
            }
        }
        fn check<K: serde::de::DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(doc: &serde_json::Value) {
            let typed: K = serde_json::from_value(doc.clone()).unwrap();
            let written = serde_json::to_value(&typed).unwrap();
            assert!(contains(&written, doc), "lost a field:\n{doc}\n{written}");
            assert_eq!(serde_json::from_value::<K>(written).unwrap(), typed);
        }
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
        let mut kinds = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|ext| ext != "yaml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let doc: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
                match doc["kind"].as_str().unwrap() {
                    "Project" => check::<Project>(&doc),
                    "CloudProvider" => check::<CloudProvider>(&doc),
                    "Environment" => check::<Environment>(&doc),
                    "BuildJob" => check::<BuildJob>(&doc),
                    _ => continue,
                }
                kinds.push(doc["kind"].as_str().unwrap().to_owned());
            }
        }
        kinds.sort();
        assert_eq!(kinds, ["BuildJob", "CloudProvider", "CloudProvider", "Environment", "Project"]);
    }

    #[test]
    fn omitted_fields_take_their_defaults() {
        let project: ProjectSpec = serde_json::from_value(serde_json::json!({
            "repository": "acme/shop", "cloudProviderRef": {"name": "local"},
            "previewDomain": "preview.example.com", "github": {"credentialsSecretRef": {"name": "gh"}},
        }))
        .unwrap();
        assert_eq!(
            (project.ttl.as_str(), project.preview_size, &project.trigger),
            ("24h", Size::Medium, &Trigger { mode: TriggerMode::All, label: None, drafts: true, forks: false })
        );
        let trigger: Trigger =
            serde_json::from_value(serde_json::json!({"mode": "label", "label": "preview"})).unwrap();
        assert!(trigger.drafts && !trigger.forks, "drafts are previewed and forks are not unless the Project says so");
        let provider: CloudProviderSpec = serde_json::from_value(serde_json::json!({"type": "local"})).unwrap();
        assert_eq!(provider.max_instances, 10);
        let job: BuildJobSpec = serde_json::from_value(serde_json::json!({
            "service": "web", "platform": "linux/amd64", "repository": "acme/shop", "commit": "0".repeat(40),
        }))
        .unwrap();
        assert_eq!((job.context.as_str(), job.dockerfile.as_str(), job.timeout.as_str()), (".", "Dockerfile", "30m"));
    }

    #[test]
    fn sizes_and_platforms_round_trip_through_strings() {
        for size in Size::ALL {
            assert_eq!(size.as_str().parse::<Size>().unwrap(), size);
            assert_eq!(serde_json::to_value(size).unwrap(), size.as_str());
        }
        for platform in Platform::ALL {
            assert_eq!(platform.as_str().parse::<Platform>().unwrap(), platform);
            assert_eq!(serde_json::to_value(platform).unwrap(), platform.as_str());
        }
        assert_eq!(
            "linux/s390".parse::<Platform>().unwrap_err(),
            r#"unknown platform "linux/s390" (expected linux/amd64 or linux/arm64)"#
        );
    }
}
