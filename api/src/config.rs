//! The `stagely.yaml` model and parser: what a repository asks Stagely to build, how its
//! previews are sized and prepared, and which end-to-end tests run against them.
//!
//! [`parse`] turns the file into a [`StagelyConfig`] whose values are normalized (defaults
//! filled in, `platform`/`platforms` folded into one list, the timeout parsed) and checked.
//! Problems come back as [`FieldError`]s naming the field by path, e.g.
//! `builds.web.platforms[1]`, so they can be shown to the author next to the file. A file that
//! does not deserialize (bad YAML, a wrong type, an unknown field, an unknown size or platform)
//! yields that one error; a file that deserializes but breaks rules yields every broken rule.
//!
//! Serializing a [`StagelyConfig`] writes the normalized form, which [`parse`] reads back to an
//! equal value.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::v1alpha1::{Platform, Size, parse_duration};

/// The only `version` of stagely.yaml this crate reads.
pub const SUPPORTED_VERSION: u32 = 2;

/// The compose file a preview runs when `preview.compose_file` is not set.
pub const DEFAULT_COMPOSE_FILE: &str = "docker-compose.yml";

/// How long a build may run when its `timeout` is not set.
pub const DEFAULT_BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The [`FieldError::path`] of a problem with the document as a whole.
pub const ROOT_PATH: &str = ".";

/// A parsed and checked `stagely.yaml`.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct StagelyConfig {
    /// Format version; always [`SUPPORTED_VERSION`] once parsed.
    pub version: u32,
    /// The images to build, by name. A name is the compose service the image is for, and a
    /// DNS label so that it fits in Kubernetes names and label values.
    pub builds: BTreeMap<String, Build>,
    /// How previews are sized and prepared.
    #[serde(skip_serializing_if = "is_default")]
    pub preview: Preview,
    /// End-to-end tests to run against each preview, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test: Option<TestSpec>,
}

/// Reads the same format as [`parse`] and applies the same checks, reporting them as one
/// message (use [`parse`] to get them one by one).
impl<'de> Deserialize<'de> for StagelyConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        RawConfig::deserialize(deserializer)?.check().map_err(de::Error::custom)
    }
}

/// One image to build for each preview.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Build {
    /// Build context, relative to the repository root (default `.`).
    pub context: String,
    /// Dockerfile, relative to the context (default `Dockerfile`).
    pub dockerfile: String,
    /// Platforms to build for, each once (default `[linux/amd64]`). The file may give a single
    /// `platform` instead of the `platforms` list.
    pub platforms: Vec<Platform>,
    /// Size of the builder VM; the cloud provider's builder size when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machine: Option<Size>,
    /// Build arguments (`--build-arg KEY=VALUE`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub build_args: BTreeMap<String, String>,
    /// Images to use as layer caches.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cache_from: Vec<String>,
    /// How long the build may run before it is failed (default [`DEFAULT_BUILD_TIMEOUT`]).
    /// Written in whole seconds, as e.g. `45m` or `1h30m`.
    #[serde(serialize_with = "serialize_duration")]
    pub timeout: Duration,
}

impl Default for Build {
    /// A build with every field at its stagely.yaml default.
    fn default() -> Self {
        Self {
            context: default_context(),
            dockerfile: default_dockerfile(),
            platforms: vec![Platform::LinuxAmd64],
            machine: None,
            build_args: BTreeMap::new(),
            cache_from: Vec::new(),
            timeout: DEFAULT_BUILD_TIMEOUT,
        }
    }
}

/// Reads one entry of `builds` and applies its checks, reporting them as one message with
/// paths relative to the build.
impl<'de> Deserialize<'de> for Build {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut errors = Vec::new();
        let build = RawBuild::deserialize(deserializer)?.check("", &mut errors);
        if errors.is_empty() { Ok(build) } else { Err(de::Error::custom(ConfigError { errors })) }
    }
}

/// How previews are sized, run and prepared.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, expecting = "a mapping with size, compose_file, expose and lifecycle")]
pub struct Preview {
    /// Size of the preview VM; the Project's or cloud provider's preview size when unset.
    #[serde(default, deserialize_with = "deserialize_optional_parsed", skip_serializing_if = "Option::is_none")]
    pub size: Option<Size>,
    /// The compose file that runs the preview, relative to the repository root and without `..`
    /// (default [`DEFAULT_COMPOSE_FILE`]).
    #[serde(default = "default_compose_file")]
    pub compose_file: String,
    /// Which service and port the preview URL serves; unset, Stagely picks the service that
    /// publishes a port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expose: Option<Expose>,
    /// Commands to run at points in the preview's life.
    #[serde(default, skip_serializing_if = "is_default")]
    pub lifecycle: Lifecycle,
}

impl Default for Preview {
    /// A preview with every field at its stagely.yaml default.
    fn default() -> Self {
        Self { size: None, compose_file: default_compose_file(), expose: None, lifecycle: Lifecycle::default() }
    }
}

/// The service and container port behind the preview URL.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, expecting = "a mapping with service and port")]
pub struct Expose {
    /// The compose service.
    pub service: String,
    /// The port the service listens on inside its container (not the published host port).
    #[serde(deserialize_with = "deserialize_port")]
    pub port: u16,
}

/// Commands to run at points in a preview's life.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields, expecting = "a mapping with on_start")]
pub struct Lifecycle {
    /// Run in order once the services are up, e.g. database migrations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_start: Vec<Hook>,
}

/// A command run inside one of the preview's services.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, expecting = "a mapping with service and command")]
pub struct Hook {
    /// The compose service to run the command in. It need not be one of `builds`: services
    /// that use a published image are fine too.
    pub service: String,
    /// The command, run by the service's shell.
    pub command: String,
}

/// End-to-end tests run against a preview once it is up.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, expecting = "a mapping with enabled, image and commands")]
pub struct TestSpec {
    /// Whether to run the tests. Defaults to `true`, so writing a `test` section turns them on.
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
    /// Image the test commands run in; required when enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Commands run in order by the image's shell; at least one is required when enabled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<String>,
}

/// Everything found wrong with a `stagely.yaml`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", join_errors(.errors))]
pub struct ConfigError {
    /// The problems; never empty. Rule violations come in a fixed order: `version`, `builds`
    /// by name, `preview`, `test`.
    pub errors: Vec<FieldError>,
}

impl From<FieldError> for ConfigError {
    fn from(error: FieldError) -> Self {
        Self { errors: vec![error] }
    }
}

/// One problem with one field of a `stagely.yaml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field, e.g. `builds.web.platforms[1]`, or [`ROOT_PATH`] for the whole document.
    pub path: String,
    /// What is wrong, in lowercase prose.
    pub reason: String,
    /// The 1-based line of the problem, when the YAML parser knew it.
    pub line: Option<usize>,
}

impl FieldError {
    fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { path: path.into(), reason: reason.into(), line: None }
    }
}

/// `path: reason`; just the reason for the document as a whole, where `.: ` would only puzzle.
impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path == ROOT_PATH { f.write_str(&self.reason) } else { write!(f, "{}: {}", self.path, self.reason) }
    }
}

impl std::error::Error for FieldError {}

fn join_errors(errors: &[FieldError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// Parses and checks a `stagely.yaml`.
pub fn parse(yaml: &str) -> Result<StagelyConfig, ConfigError> {
    let deserializer = serde_yaml::Deserializer::from_str(yaml);
    // `Option` because serde_yaml reads an empty document (or one holding only comments or
    // `~`) as null, which deserves its own message rather than a list of missing fields.
    let raw: Option<RawConfig> = serde_path_to_error::deserialize(deserializer).map_err(serde_error)?;
    match raw {
        Some(raw) => raw.check(),
        None => Err(FieldError::new(
            ROOT_PATH,
            format!(
                "the file is empty (expected a mapping with at least \
                 version: {SUPPORTED_VERSION} and builds)"
            ),
        )
        .into()),
    }
}

/// Turns a deserialization error into a [`FieldError`] at the failing field.
fn serde_error(error: serde_path_to_error::Error<serde_yaml::Error>) -> ConfigError {
    // A key that is the empty string names no field: `"": 1` at the top is about the document.
    let path = match error.path().to_string() {
        path if path.is_empty() => ROOT_PATH.to_owned(),
        path => path,
    };
    let error = error.into_inner();
    let line = error.location().map(|location| location.line());
    let mut reason = error.to_string();

    // serde_yaml appends " at line L column C" (for libyaml syntax errors, before any context
    // clause); the line has its own field.
    if let Some(location) = error.location() {
        let mark = format!(" at line {} column {}", location.line(), location.column());
        if let Some(start) = reason.find(&mark) {
            reason.replace_range(start..start + mark.len(), "");
        }
    }

    // serde_yaml also prefixes "P: " with its own idea of the path, which is ours or one of
    // its ancestors (for a bad list item it names the list).
    let mut prefix = path.as_str();
    loop {
        if let Some(rest) = reason.strip_prefix(prefix).and_then(|rest| rest.strip_prefix(": ")) {
            reason = rest.to_owned();
            break;
        }
        match prefix.rfind(['.', '[']) {
            Some(end) => prefix = &prefix[..end],
            None => break,
        }
    }

    FieldError { path, reason, line }.into()
}

/// The file as written, before defaults and checks.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with version, builds, preview and test")]
struct RawConfig {
    // Optional so that a missing version is reported by `check` at `version`, not by serde
    // at the root.
    version: Option<u32>,
    #[serde(default, deserialize_with = "deserialize_unique_keys")]
    builds: BTreeMap<String, RawBuild>,
    #[serde(default)]
    preview: Preview,
    test: Option<TestSpec>,
}

/// One entry of `builds` as written.
#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with context, dockerfile, platform or platforms, machine, \
                 build_args, cache_from and timeout"
)]
struct RawBuild {
    #[serde(default = "default_context")]
    context: String,
    #[serde(default = "default_dockerfile")]
    dockerfile: String,
    platform: Option<Parsed<Platform>>,
    platforms: Option<Vec<Parsed<Platform>>>,
    machine: Option<Parsed<Size>>,
    #[serde(default, deserialize_with = "deserialize_unique_keys")]
    build_args: BTreeMap<String, String>,
    #[serde(default)]
    cache_from: Vec<String>,
    // Kept as text: a bad duration is a rule broken, reported with the others.
    timeout: Option<String>,
}

impl RawConfig {
    fn check(self) -> Result<StagelyConfig, ConfigError> {
        let mut errors = Vec::new();

        let version = self.version.unwrap_or(SUPPORTED_VERSION);
        match self.version {
            Some(SUPPORTED_VERSION) => {}
            Some(other) => errors.push(FieldError::new(
                "version",
                format!("unsupported version {other} (this Stagely reads version {SUPPORTED_VERSION})"),
            )),
            None => errors
                .push(FieldError::new("version", format!("missing (this Stagely reads version {SUPPORTED_VERSION})"))),
        }

        if self.builds.is_empty() {
            errors.push(FieldError::new("builds", "at least one build is required"));
        }
        let mut builds = BTreeMap::new();
        for (name, raw) in self.builds {
            let at = format!("builds.{name}");
            if !is_dns_label(&name) {
                errors.push(FieldError::new(
                    &at,
                    format!(
                        "build name {name:?} must be a DNS label: at most 63 lowercase \
                         letters, digits or '-', starting and ending with a letter or digit"
                    ),
                ));
            }
            let build = raw.check(&at, &mut errors);
            builds.insert(name, build);
        }

        check_preview(&self.preview, &mut errors);
        for (i, hook) in self.preview.lifecycle.on_start.iter().enumerate() {
            let at = format!("preview.lifecycle.on_start[{i}]");
            if hook.service.trim().is_empty() {
                errors.push(FieldError::new(format!("{at}.service"), "must not be empty"));
            }
            if hook.command.trim().is_empty() {
                errors.push(FieldError::new(format!("{at}.command"), "must not be empty"));
            }
        }

        if let Some(test) = &self.test {
            check_test(test, &mut errors);
        }

        if errors.is_empty() {
            Ok(StagelyConfig { version, builds, preview: self.preview, test: self.test })
        } else {
            Err(ConfigError { errors })
        }
    }
}

impl RawBuild {
    /// Normalizes the build, adding its problems to `errors` with paths under `at` (empty for a
    /// build read on its own). The result is only meaningful if nothing was added.
    fn check(self, at: &str, errors: &mut Vec<FieldError>) -> Build {
        let field = |name: &str| {
            if at.is_empty() { name.to_owned() } else { format!("{at}.{name}") }
        };

        let context_problem = path_problem(&self.context).or_else(|| {
            leaves_repository(&self.context).then(|| format!("{:?} leads outside the repository", self.context))
        });
        let dockerfile_problem = path_problem(&self.dockerfile).or_else(|| {
            // The dockerfile is relative to the context, so it may climb out of the context,
            // but not out of the repository. A context that is already out is reported once,
            // at the context.
            let combined = format!("{}/{}", self.context, self.dockerfile);
            (context_problem.is_none() && leaves_repository(&combined)).then(|| {
                format!(
                    "{:?} leads outside the repository (it is relative to the context {:?})",
                    self.dockerfile, self.context
                )
            })
        });
        if let Some(reason) = context_problem {
            errors.push(FieldError::new(field("context"), reason));
        }
        if let Some(reason) = dockerfile_problem {
            errors.push(FieldError::new(field("dockerfile"), reason));
        }

        let platforms: Vec<Platform> = match (self.platform, self.platforms) {
            (Some(_), Some(list)) => {
                errors.push(FieldError::new(
                    if at.is_empty() { ROOT_PATH } else { at },
                    "set platform or platforms, not both",
                ));
                list.into_iter().map(|Parsed(platform)| platform).collect()
            }
            (Some(Parsed(platform)), None) => vec![platform],
            (None, Some(list)) => list.into_iter().map(|Parsed(platform)| platform).collect(),
            (None, None) => vec![Platform::LinuxAmd64],
        };
        if platforms.is_empty() {
            errors.push(FieldError::new(field("platforms"), "at least one platform is required"));
        }
        for (i, platform) in platforms.iter().enumerate() {
            if platforms[..i].contains(platform) {
                errors.push(FieldError::new(
                    format!("{}[{i}]", field("platforms")),
                    format!("duplicate platform {platform}"),
                ));
            }
        }

        for (i, image) in self.cache_from.iter().enumerate() {
            if image.trim().is_empty() {
                errors.push(FieldError::new(format!("{}[{i}]", field("cache_from")), "must not be empty"));
            }
        }

        let timeout = match &self.timeout {
            None => DEFAULT_BUILD_TIMEOUT,
            Some(text) => parse_duration(text).unwrap_or_else(|reason| {
                errors.push(FieldError::new(field("timeout"), reason));
                DEFAULT_BUILD_TIMEOUT
            }),
        };

        Build {
            context: self.context,
            dockerfile: self.dockerfile,
            platforms,
            machine: self.machine.map(|Parsed(size)| size),
            build_args: self.build_args,
            cache_from: self.cache_from,
            timeout,
        }
    }
}

fn check_preview(preview: &Preview, errors: &mut Vec<FieldError>) {
    let compose_file = &preview.compose_file;
    let problem = path_problem(compose_file).or_else(|| {
        compose_file
            .split('/')
            .any(|part| part == "..")
            .then(|| format!("{compose_file:?} must not contain '..'; paths are relative to the repository root"))
    });
    if let Some(reason) = problem {
        errors.push(FieldError::new("preview.compose_file", reason));
    }
    if let Some(expose) = &preview.expose {
        if expose.service.trim().is_empty() {
            errors.push(FieldError::new("preview.expose.service", "must not be empty"));
        } else if !is_service_name(&expose.service) {
            errors.push(FieldError::new(
                "preview.expose.service",
                format!("{:?} is not a compose service name (letters, digits, '.', '_' or '-')", expose.service),
            ));
        }
    }
}

/// Whether `name` can name a compose service (the compose specification's `[a-zA-Z0-9._-]+`).
fn is_service_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn check_test(test: &TestSpec, errors: &mut Vec<FieldError>) {
    let image_missing = test.image.as_deref().is_none_or(|image| image.trim().is_empty());
    if test.image.is_some() && image_missing {
        errors.push(FieldError::new("test.image", "must not be empty"));
    } else if test.enabled && image_missing {
        errors.push(FieldError::new("test.image", "required when tests are enabled"));
    }
    if test.enabled && test.commands.is_empty() {
        errors.push(FieldError::new("test.commands", "at least one command is required when tests are enabled"));
    }
    for (i, command) in test.commands.iter().enumerate() {
        if command.trim().is_empty() {
            errors.push(FieldError::new(format!("test.commands[{i}]"), "must not be empty"));
        }
    }
}

/// Why a path in the repository is unusable in any case, if it is.
fn path_problem(path: &str) -> Option<String> {
    if path.trim().is_empty() {
        Some("must not be empty".to_owned())
    } else if path.starts_with('/') {
        Some(format!("{path:?} is absolute; paths are relative to the repository root"))
    } else {
        None
    }
}

/// Whether `path`, relative to the repository root, ends up above it. Only the builder's
/// checkout is there to build from, so a path may wander through `..` but not leave it.
fn leaves_repository(path: &str) -> bool {
    let mut depth: usize = 0;
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => match depth.checked_sub(1) {
                Some(up) => depth = up,
                None => return true,
            },
            _ => depth += 1,
        }
    }
    false
}

/// Whether `name` is an RFC 1123 DNS label, as Kubernetes names and label values need.
fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    let edge_ok = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    name.len() <= 63
        && edge_ok(bytes.first())
        && edge_ok(bytes.last())
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// A string read through `T`'s `FromStr`, so that a bad value is reported in `FromStr`'s
/// words ("unknown platform ...") rather than serde's list of variants.
struct Parsed<T>(T);

impl<'de, T: FromStr<Err = String>> Deserialize<'de> for Parsed<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ParsedVisitor<T>(PhantomData<T>);

        impl<T: FromStr<Err = String>> Visitor<'_> for ParsedVisitor<T> {
            type Value = Parsed<T>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            // Failing inside the visitor, rather than after reading a String, lets serde_yaml
            // give the error the value's own line instead of its parent's.
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
                text.parse().map(Parsed).map_err(E::custom)
            }
        }

        deserializer.deserialize_str(ParsedVisitor(PhantomData))
    }
}

/// Reads a mapping, rejecting a key given twice: YAML parsers keep the last silently, and a
/// build copied and not renamed would otherwise replace the original without a word.
fn deserialize_unique_keys<'de, D, V>(deserializer: D) -> Result<BTreeMap<String, V>, D::Error>
where
    D: Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct UniqueKeys<V>(PhantomData<V>);

    impl<'de, V: Deserialize<'de>> Visitor<'de> for UniqueKeys<V> {
        type Value = BTreeMap<String, V>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a mapping")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut entries = BTreeMap::new();
            while let Some(key) = map.next_key::<String>()? {
                if entries.contains_key(&key) {
                    return Err(de::Error::custom(format!("duplicate key {key:?}")));
                }
                let value = map.next_value()?;
                entries.insert(key, value);
            }
            Ok(entries)
        }
    }

    deserializer.deserialize_map(UniqueKeys(PhantomData))
}

fn deserialize_optional_parsed<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr<Err = String>,
{
    Ok(Option::<Parsed<T>>::deserialize(deserializer)?.map(|Parsed(value)| value))
}

/// Reads a port number, 1 to 65535, failing inside the visitor so the error carries the
/// value's own line.
fn deserialize_port<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u16, D::Error> {
    struct PortVisitor;

    impl Visitor<'_> for PortVisitor {
        type Value = u16;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a port number from 1 to 65535")
        }

        fn visit_u64<E: de::Error>(self, port: u64) -> Result<u16, E> {
            match u16::try_from(port) {
                Ok(port) if port > 0 => Ok(port),
                _ => Err(E::custom(format!("invalid port {port} (expected a port number from 1 to 65535)"))),
            }
        }

        fn visit_i64<E: de::Error>(self, port: i64) -> Result<u16, E> {
            match u64::try_from(port) {
                Ok(port) => self.visit_u64(port),
                Err(_) => Err(E::custom(format!("invalid port {port} (expected a port number from 1 to 65535)"))),
            }
        }
    }

    deserializer.deserialize_any(PortVisitor)
}

/// Writes a duration in the form [`parse_duration`] reads, largest units first (`1h30m`).
fn serialize_duration<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format_duration(*duration))
}

fn format_duration(duration: Duration) -> String {
    let mut seconds = duration.as_secs();
    if seconds == 0 {
        return "0s".to_owned();
    }
    let mut text = String::new();
    for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        if seconds >= size {
            text.push_str(&format!("{}{unit}", seconds / size));
            seconds %= size;
        }
    }
    text
}

fn default_context() -> String {
    ".".to_owned()
}

fn default_compose_file() -> String {
    DEFAULT_COMPOSE_FILE.to_owned()
}

fn default_dockerfile() -> String {
    "Dockerfile".to_owned()
}

fn enabled_by_default() -> bool {
    true
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
version: 2
builds:
  backend:
    context: "./api"
    dockerfile: "Dockerfile"
    platform: "linux/amd64"
    machine: "medium"
  frontend:
    context: "./web"
    platforms: ["linux/amd64", "linux/arm64"]
    machine: "large"
    build_args: { NODE_ENV: production }
    cache_from: ["registry.example.com/web:cache"]
    timeout: "45m"
preview:
  size: "medium"
  lifecycle:
    on_start:
      - service: "backend"
        command: "npm run db:migrate"
test:
  enabled: true
  image: "mcr.microsoft.com/playwright:v1.40.0"
  commands: ["npm ci", "npx playwright test"]
"#;

    /// A valid file with `build` spliced in as the body of `builds.web`.
    fn with_web_build(build: &str) -> String {
        format!("version: 2\nbuilds:\n  web:\n{build}")
    }

    fn errors(yaml: &str) -> Vec<FieldError> {
        parse(yaml).expect_err("the file should be rejected").errors
    }

    /// The single error `yaml` is rejected with, as displayed.
    fn only_error(yaml: &str) -> String {
        let errors = errors(yaml);
        assert_eq!(errors.len(), 1, "expected one error, got {errors:?}");
        errors[0].to_string()
    }

    #[test]
    fn the_design_example_parses_to_normalized_values() {
        let config = parse(EXAMPLE).unwrap();
        let expected = StagelyConfig {
            version: 2,
            builds: BTreeMap::from([
                (
                    "backend".to_owned(),
                    Build { context: "./api".to_owned(), machine: Some(Size::Medium), ..Build::default() },
                ),
                (
                    "frontend".to_owned(),
                    Build {
                        context: "./web".to_owned(),
                        dockerfile: "Dockerfile".to_owned(),
                        platforms: vec![Platform::LinuxAmd64, Platform::LinuxArm64],
                        machine: Some(Size::Large),
                        build_args: BTreeMap::from([("NODE_ENV".to_owned(), "production".to_owned())]),
                        cache_from: vec!["registry.example.com/web:cache".to_owned()],
                        timeout: Duration::from_secs(45 * 60),
                    },
                ),
            ]),
            preview: Preview {
                size: Some(Size::Medium),
                lifecycle: Lifecycle {
                    on_start: vec![Hook { service: "backend".to_owned(), command: "npm run db:migrate".to_owned() }],
                },
                ..Preview::default()
            },
            test: Some(TestSpec {
                enabled: true,
                image: Some("mcr.microsoft.com/playwright:v1.40.0".to_owned()),
                commands: vec!["npm ci".to_owned(), "npx playwright test".to_owned()],
            }),
        };
        assert_eq!(config, expected);
    }

    #[test]
    fn omitted_fields_take_their_defaults() {
        let config = parse("version: 2\nbuilds:\n  web: {}\n").unwrap();
        assert_eq!(config.builds["web"], Build::default());
        assert_eq!(config.builds["web"].context, ".");
        assert_eq!(config.builds["web"].dockerfile, "Dockerfile");
        assert_eq!(config.builds["web"].platforms, [Platform::LinuxAmd64]);
        assert_eq!(config.builds["web"].machine, None);
        assert_eq!(config.builds["web"].timeout, Duration::from_secs(1800));
        assert_eq!(config.preview, Preview::default());
        assert_eq!(config.test, None);
    }

    #[test]
    fn a_single_platform_becomes_a_list() {
        let config = parse(&with_web_build("    platform: linux/arm64\n")).unwrap();
        assert_eq!(config.builds["web"].platforms, [Platform::LinuxArm64]);
    }

    #[test]
    fn a_test_section_is_enabled_unless_it_says_otherwise() {
        let yaml = "version: 2\nbuilds:\n  web: {}\ntest:\n  image: node:22\n  commands: [npm test]\n";
        assert!(parse(yaml).unwrap().test.unwrap().enabled);

        let disabled = parse("version: 2\nbuilds:\n  web: {}\ntest:\n  enabled: false\n").unwrap();
        assert_eq!(disabled.test, Some(TestSpec { enabled: false, image: None, commands: vec![] }));
    }

    #[test]
    fn scalar_build_args_are_read_as_strings() {
        let config = parse(&with_web_build("    build_args: { PORT: 8080, DEBUG: true }\n")).unwrap();
        assert_eq!(config.builds["web"].build_args["PORT"], "8080");
        assert_eq!(config.builds["web"].build_args["DEBUG"], "true");
    }

    #[test]
    fn serialized_config_parses_back_to_the_same_value() {
        let config = parse(EXAMPLE).unwrap();
        let yaml = serde_yaml::to_string(&config).unwrap();
        assert_eq!(parse(&yaml).unwrap(), config, "serialized as:\n{yaml}");
        // The normalized form: a platforms list everywhere and the timeout as text.
        assert!(yaml.contains("timeout: 45m"), "{yaml}");
        assert!(!yaml.contains("platform:"), "{yaml}");

        let minimal = parse("version: 2\nbuilds:\n  web: {}\n").unwrap();
        let yaml = serde_yaml::to_string(&minimal).unwrap();
        assert_eq!(parse(&yaml).unwrap(), minimal, "serialized as:\n{yaml}");
    }

    #[test]
    fn serde_deserialize_applies_the_same_checks() {
        let config: StagelyConfig = serde_yaml::from_str(EXAMPLE).unwrap();
        assert_eq!(config, parse(EXAMPLE).unwrap());

        let error = serde_yaml::from_str::<StagelyConfig>("version: 1\nbuilds: {}\n").unwrap_err();
        assert_eq!(
            error.to_string(),
            "version: unsupported version 1 (this Stagely reads version 2); builds: at least one build is required"
        );

        let error = serde_yaml::from_str::<Build>("platforms: []\ntimeout: soon\n").unwrap_err();
        assert!(
            error.to_string().starts_with("platforms: at least one platform is required; timeout: invalid duration"),
            "{error}"
        );
    }

    #[test]
    fn durations_are_written_largest_unit_first() {
        assert_eq!(format_duration(Duration::from_secs(45 * 60)), "45m");
        assert_eq!(format_duration(Duration::from_secs(5_400)), "1h30m");
        assert_eq!(format_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(format_duration(Duration::from_secs(7 * 86_400 + 1)), "7d1s");
        for seconds in [1, 59, 61, 3_599, 3_601, 86_399, 90_061] {
            let duration = Duration::from_secs(seconds);
            assert_eq!(parse_duration(&format_duration(duration)), Ok(duration));
        }
    }

    #[test]
    fn an_unknown_platform_is_reported_at_its_list_index() {
        let error = &errors(&with_web_build("    platforms: [linux/amd64, linux/s390]\n"))[0];
        assert_eq!(
            error.to_string(),
            r#"builds.web.platforms[1]: unknown platform "linux/s390" (expected linux/amd64 or linux/arm64)"#
        );
        assert_eq!(error.line, Some(4));

        // In a block list the line is the item's own.
        let error = &errors(&with_web_build("    platforms:\n      - linux/amd64\n      - linux/s390\n"))[0];
        assert_eq!(error.path, "builds.web.platforms[1]");
        assert_eq!(error.line, Some(6));
    }

    #[test]
    fn an_unknown_single_platform_is_reported() {
        assert_eq!(
            only_error(&with_web_build("    platform: windows/amd64\n")),
            r#"builds.web.platform: unknown platform "windows/amd64" (expected linux/amd64 or linux/arm64)"#
        );
    }

    #[test]
    fn an_unknown_field_is_reported_at_its_path() {
        let error = &errors(&with_web_build("    dockerfle: web.Dockerfile\n"))[0];
        assert_eq!(
            error.to_string(),
            "builds.web.dockerfle: unknown field `dockerfle`, expected one of `context`, `dockerfile`, \
             `platform`, `platforms`, `machine`, `build_args`, `cache_from`, `timeout`"
        );
        assert_eq!(error.line, Some(4));

        assert_eq!(
            only_error("version: 2\nbuilds:\n  web: {}\npreveiw: {}\n"),
            "preveiw: unknown field `preveiw`, expected one of `version`, `builds`, `preview`, `test`"
        );
    }

    #[test]
    fn a_bad_preview_size_is_reported() {
        let error = &errors("version: 2\nbuilds:\n  web: {}\npreview:\n  size: huge\n")[0];
        assert_eq!(error.to_string(), r#"preview.size: unknown size "huge" (expected small, medium or large)"#);
        assert_eq!(error.line, Some(5));
    }

    #[test]
    fn a_key_given_twice_is_reported() {
        let error = &errors("version: 2\nbuilds:\n  web: {}\n  api: {}\n  web: {}\n")[0];
        assert_eq!(error.to_string(), r#"builds: duplicate key "web""#);
        assert!(error.line.is_some());

        assert_eq!(
            only_error(&with_web_build("    build_args:\n      A: x\n      A: y\n")),
            r#"builds.web.build_args: duplicate key "A""#
        );
    }

    #[test]
    fn a_bad_machine_size_is_reported() {
        assert_eq!(
            only_error(&with_web_build("    machine: xl\n")),
            r#"builds.web.machine: unknown size "xl" (expected small, medium or large)"#
        );
    }

    #[test]
    fn a_wrong_type_is_reported_without_the_position_suffix() {
        let error = &errors("version: two\nbuilds:\n  web: {}\n")[0];
        assert_eq!(error.to_string(), r#"version: invalid type: string "two", expected u32"#);
        assert_eq!(error.line, Some(1));

        assert_eq!(
            only_error("version: 2\nbuilds:\n  web: [a, b]\n"),
            "builds.web: invalid type: sequence, expected a mapping with context, dockerfile, \
             platform or platforms, machine, build_args, cache_from and timeout"
        );
    }

    #[test]
    fn a_missing_version_is_reported_at_version() {
        assert_eq!(only_error("builds:\n  web: {}\n"), "version: missing (this Stagely reads version 2)");
    }

    #[test]
    fn another_version_is_rejected() {
        assert_eq!(
            only_error("version: 1\nbuilds:\n  web: {}\n"),
            "version: unsupported version 1 (this Stagely reads version 2)"
        );
    }

    #[test]
    fn at_least_one_build_is_required() {
        assert_eq!(only_error("version: 2\n"), "builds: at least one build is required");
        assert_eq!(only_error("version: 2\nbuilds: {}\n"), "builds: at least one build is required");
    }

    #[test]
    fn build_names_must_be_dns_labels() {
        for bad in ["Web", "web_app", "-web", "web-", "web.app", &"a".repeat(64)] {
            let yaml = format!("version: 2\nbuilds:\n  {bad}: {{}}\n");
            assert_eq!(
                only_error(&yaml),
                format!(
                    "builds.{bad}: build name {bad:?} must be a DNS label: at most 63 lowercase \
                     letters, digits or '-', starting and ending with a letter or digit"
                )
            );
        }
        for good in ["web", "web-2", "1", &"a".repeat(63)] {
            let yaml = format!("version: 2\nbuilds:\n  {good}: {{}}\n");
            assert!(parse(&yaml).is_ok(), "{good:?} should be accepted");
        }
    }

    #[test]
    fn platform_and_platforms_are_exclusive() {
        assert_eq!(
            only_error(&with_web_build("    platform: linux/amd64\n    platforms: [linux/arm64]\n")),
            "builds.web: set platform or platforms, not both"
        );
    }

    #[test]
    fn a_platform_may_be_listed_once() {
        assert_eq!(
            only_error(&with_web_build("    platforms: [linux/arm64, linux/amd64, linux/arm64]\n")),
            "builds.web.platforms[2]: duplicate platform linux/arm64"
        );
    }

    #[test]
    fn the_platform_list_must_not_be_empty() {
        assert_eq!(
            only_error(&with_web_build("    platforms: []\n")),
            "builds.web.platforms: at least one platform is required"
        );
    }

    #[test]
    fn a_bad_timeout_is_reported_with_the_duration_parsers_message() {
        assert_eq!(
            only_error(&with_web_build("    timeout: 1.5h\n")),
            r#"builds.web.timeout: invalid duration "1.5h" (expected a positive duration such as 90s, 30m, 24h or 7d)"#
        );
    }

    #[test]
    fn context_and_dockerfile_must_not_be_empty() {
        assert_eq!(only_error(&with_web_build("    context: \"\"\n")), "builds.web.context: must not be empty");
        assert_eq!(only_error(&with_web_build("    dockerfile: \"  \"\n")), "builds.web.dockerfile: must not be empty");
    }

    #[test]
    fn paths_must_stay_inside_the_repository() {
        assert_eq!(
            only_error(&with_web_build("    context: /srv/app\n")),
            r#"builds.web.context: "/srv/app" is absolute; paths are relative to the repository root"#
        );
        assert_eq!(
            only_error(&with_web_build("    context: api/../../shared\n")),
            r#"builds.web.context: "api/../../shared" leads outside the repository"#
        );
        assert_eq!(
            only_error(&with_web_build("    context: ./api\n    dockerfile: ../../Dockerfile\n")),
            r#"builds.web.dockerfile: "../../Dockerfile" leads outside the repository (it is relative to the context "./api")"#
        );
        assert_eq!(
            only_error(&with_web_build("    dockerfile: /Dockerfile\n")),
            r#"builds.web.dockerfile: "/Dockerfile" is absolute; paths are relative to the repository root"#
        );
        // `..` that stays inside is fine.
        let config =
            parse(&with_web_build("    context: ./api/../web\n    dockerfile: ../docker/web.Dockerfile\n")).unwrap();
        assert_eq!(config.builds["web"].context, "./api/../web");
    }

    #[test]
    fn cache_images_must_not_be_empty() {
        assert_eq!(
            only_error(&with_web_build("    cache_from: [registry.example.com/web:cache, \"\"]\n")),
            "builds.web.cache_from[1]: must not be empty"
        );
    }

    #[test]
    fn the_preview_names_its_compose_file_and_exposed_port() {
        let yaml = "version: 2\nbuilds:\n  web: {}\npreview:\n  compose_file: deploy/compose.preview.yml\n  \
                    expose: {service: web, port: 8080}\n";
        let preview = parse(yaml).unwrap().preview;
        assert_eq!(preview.compose_file, "deploy/compose.preview.yml");
        assert_eq!(preview.expose, Some(Expose { service: "web".to_owned(), port: 8080 }));

        // Defaults: the usual compose file, nothing chosen to expose.
        let preview = parse("version: 2\nbuilds:\n  web: {}\npreview:\n  size: small\n").unwrap().preview;
        assert_eq!((preview.compose_file.as_str(), preview.expose), (DEFAULT_COMPOSE_FILE, None));
        assert_eq!(Preview::default().compose_file, "docker-compose.yml");
    }

    #[test]
    fn the_exposed_port_is_a_container_port_number() {
        let preview = |expose: &str| format!("version: 2\nbuilds:\n  web: {{}}\npreview:\n  expose:\n{expose}");
        for bad in ["0", "65536", "-1", "100000"] {
            let error = &errors(&preview(&format!("    service: web\n    port: {bad}\n")))[0];
            assert_eq!(
                error.to_string(),
                format!("preview.expose.port: invalid port {bad} (expected a port number from 1 to 65535)")
            );
            assert_eq!(error.line, Some(7), "{bad}");
        }
        assert_eq!(
            only_error(&preview("    service: web\n    port: http\n")),
            r#"preview.expose.port: invalid type: string "http", expected a port number from 1 to 65535"#
        );
        assert!(parse(&preview("    service: web\n    port: 65535\n")).is_ok());
        assert_eq!(only_error(&preview("    service: web\n")), "preview.expose: missing field `port`");
        assert_eq!(
            only_error(&preview("    service: web\n    port: 80\n    host_port: 8080\n")),
            "preview.expose.host_port: unknown field `host_port`, expected `service` or `port`"
        );
        assert_eq!(
            only_error(&preview("    service: \"\"\n    port: 80\n")),
            "preview.expose.service: must not be empty"
        );
        assert_eq!(
            only_error(&preview("    service: web app\n    port: 80\n")),
            r#"preview.expose.service: "web app" is not a compose service name (letters, digits, '.', '_' or '-')"#
        );
        assert_eq!(
            only_error("version: 2\nbuilds:\n  web: {}\npreview:\n  exposes: {}\n"),
            "preview.exposes: unknown field `exposes`, expected one of `size`, `compose_file`, `expose`, `lifecycle`"
        );
    }

    #[test]
    fn the_compose_file_stays_inside_the_repository_without_dot_dot() {
        let with = |file: &str| format!("version: 2\nbuilds:\n  web: {{}}\npreview:\n  compose_file: {file}\n");
        assert_eq!(only_error(&with("\"\"")), "preview.compose_file: must not be empty");
        assert_eq!(
            only_error(&with("/srv/compose.yml")),
            r#"preview.compose_file: "/srv/compose.yml" is absolute; paths are relative to the repository root"#
        );
        for climbing in ["../compose.yml", "deploy/../compose.yml", "deploy/.."] {
            assert_eq!(
                only_error(&with(climbing)),
                format!(
                    "preview.compose_file: {climbing:?} must not contain '..'; paths are relative to the repository root"
                )
            );
        }
        assert_eq!(parse(&with("./deploy/compose.yml")).unwrap().preview.compose_file, "./deploy/compose.yml");
    }

    #[test]
    fn the_preview_section_round_trips_with_its_defaults_written() {
        let yaml = "version: 2\nbuilds:\n  web: {}\npreview:\n  expose: {service: web, port: 3000}\n";
        let config = parse(yaml).unwrap();
        let written = serde_yaml::to_string(&config).unwrap();
        assert!(written.contains("compose_file: docker-compose.yml"), "{written}");
        assert!(written.contains("port: 3000"), "{written}");
        assert_eq!(parse(&written).unwrap(), config, "serialized as:\n{written}");

        // An all-default preview is left out, and comes back as the default.
        let minimal = parse("version: 2\nbuilds:\n  web: {}\npreview: {}\n").unwrap();
        let written = serde_yaml::to_string(&minimal).unwrap();
        assert!(!written.contains("preview"), "{written}");
        assert_eq!(parse(&written).unwrap().preview, Preview::default());
    }

    #[test]
    fn start_hooks_need_a_service_and_a_command() {
        let yaml = "version: 2\nbuilds:\n  web: {}\npreview:\n  lifecycle:\n    on_start:\n      \
                    - service: db\n        command: migrate\n      \
                    - service: \"\"\n        command: \" \"\n";
        let errors: Vec<String> = errors(yaml).iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            [
                "preview.lifecycle.on_start[1].service: must not be empty",
                "preview.lifecycle.on_start[1].command: must not be empty",
            ]
        );
        // A hook may name a service that is not built (e.g. a published database image).
        let yaml = "version: 2\nbuilds:\n  web: {}\npreview:\n  lifecycle:\n    on_start:\n      \
                    - service: postgres\n        command: psql -c 'select 1'\n";
        assert!(parse(yaml).is_ok());
    }

    #[test]
    fn enabled_tests_need_an_image_and_commands() {
        let errors: Vec<String> = errors("version: 2\nbuilds:\n  web: {}\ntest:\n  enabled: true\n")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            errors,
            [
                "test.image: required when tests are enabled",
                "test.commands: at least one command is required when tests are enabled",
            ]
        );
        assert_eq!(
            only_error("version: 2\nbuilds:\n  web: {}\ntest:\n  image: node:22\n  commands: [npm ci, \"\"]\n"),
            "test.commands[1]: must not be empty"
        );
    }

    #[test]
    fn every_broken_rule_is_reported_at_once() {
        let yaml = "version: 3
builds:
  Web:
    context: ../outside
    platforms: [linux/amd64, linux/amd64]
    timeout: soon
  api:
    platform: linux/arm64
    platforms: [linux/arm64]
test:
  enabled: true
";
        let error = parse(yaml).unwrap_err();
        let paths: Vec<&str> = error.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "version",
                "builds.Web",
                "builds.Web.context",
                "builds.Web.platforms[1]",
                "builds.Web.timeout",
                "builds.api",
                "test.image",
                "test.commands",
            ]
        );
        assert!(error.errors.iter().all(|e| e.line.is_none()));
        assert_eq!(
            error.to_string(),
            "version: unsupported version 3 (this Stagely reads version 2); \
             builds.Web: build name \"Web\" must be a DNS label: at most 63 lowercase letters, digits or '-', starting and ending with a letter or digit; \
             builds.Web.context: \"../outside\" leads outside the repository; \
             builds.Web.platforms[1]: duplicate platform linux/amd64; \
             builds.Web.timeout: invalid duration \"soon\" (expected a positive duration such as 90s, 30m, 24h or 7d); \
             builds.api: set platform or platforms, not both; \
             test.image: required when tests are enabled; \
             test.commands: at least one command is required when tests are enabled"
        );
    }

    #[test]
    fn an_empty_document_is_reported_at_the_root() {
        for empty in ["", "\n", "# just a comment\n", "~\n", "---\n"] {
            let error = &errors(empty)[0];
            assert_eq!(error.path, ROOT_PATH, "{empty:?}");
            assert_eq!(error.line, None);
            // At the root the path would add nothing but noise.
            assert_eq!(error.to_string(), "the file is empty (expected a mapping with at least version: 2 and builds)");
        }
    }

    #[test]
    fn a_document_that_is_not_a_mapping_is_reported_at_the_root() {
        for (yaml, found) in [("- web\n- api\n", "sequence"), ("hello\n", "string \"hello\"")] {
            let error = &errors(yaml)[0];
            assert_eq!(error.path, ROOT_PATH);
            assert_eq!(
                error.reason,
                format!("invalid type: {found}, expected a mapping with version, builds, preview and test")
            );
            assert_eq!(error.to_string(), error.reason);
        }
    }

    #[test]
    fn a_yaml_syntax_error_carries_its_line() {
        let error = &errors("version: 2\nbuilds:\n  web:\n    context: \"./api\n")[0];
        assert_eq!(error.line, Some(5));
        assert!(!error.reason.contains("at line 5"), "{}", error.reason);
        assert!(error.reason.starts_with("found unexpected end of stream"), "{}", error.reason);
    }

    #[test]
    fn an_empty_key_still_yields_a_field_path() {
        // Found by the `stagely_yaml` fuzz target: serde_path_to_error names a top-level `""`
        // key with an empty path.
        for yaml in ["\"\": 1", "? \"\"\n: x", "version: 2\n\"\": x"] {
            let err = parse(yaml).unwrap_err();
            assert!(err.errors.iter().all(|e| !e.path.is_empty()), "{yaml:?}: {err:?}");
        }
    }
}
