//! The agent binaries the operator carries (one per platform, in `--agent-bin-dir`), served to
//! VMs over the gateway's address with their SHA-256: cloud-init downloads the one for its VM's
//! platform from there and checks it before it runs, so clusters need no other download host.
//!
//! Files are named `stagely-agent-linux-amd64` and `stagely-agent-linux-arm64`; their digests are
//! computed once at startup (a file replaced later is refused rather than served with a stale
//! digest: the operator image is immutable, a new binary comes with a new operator). Downloads
//! stream from disk, so a burst of booting VMs costs no memory per binary.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};
use stagely_api::v1alpha1::Platform;
use tokio::io::AsyncReadExt;

/// Where the gateway serves the binaries: `/v1/agent/download/linux-amd64` (and `….sha256`).
pub const DOWNLOAD_PATH: &str = "/v1/agent/download";

/// One platform's binary.
#[derive(Clone, Debug)]
pub struct AgentBinary {
    /// Its file.
    pub path: PathBuf,
    /// Its SHA-256, hex.
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
}

/// Why the binaries could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("cannot read agent binary {path}: {source}")]
pub struct AgentBinariesError {
    path: PathBuf,
    source: std::io::Error,
}

/// The binaries found in a directory, by platform.
#[derive(Clone, Debug, Default)]
pub struct AgentBinaries {
    by_platform: BTreeMap<&'static str, AgentBinary>,
}

/// `linux-amd64` for `linux/amd64`: the platform as it appears in file names and URLs.
pub fn platform_slug(platform: Platform) -> String {
    platform.as_str().replace('/', "-")
}

impl AgentBinaries {
    /// The binaries in `dir` (`stagely-agent-<os>-<arch>`), each hashed now; none when the
    /// directory does not exist.
    pub fn load(dir: &Path) -> Result<Self, AgentBinariesError> {
        let mut by_platform = BTreeMap::new();
        for platform in Platform::ALL {
            let path = dir.join(format!("stagely-agent-{}", platform_slug(platform)));
            let error = |source| AgentBinariesError { path: path.clone(), source };
            let mut file = match std::fs::File::open(&path) {
                Ok(file) => file,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => return Err(error(err)),
            };
            let mut hasher = Sha256::new();
            let mut buffer = vec![0u8; 64 * 1024];
            let mut size = 0u64;
            loop {
                let n = std::io::Read::read(&mut file, &mut buffer).map_err(error)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buffer[..n]);
                size += n as u64;
            }
            let sha256 = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
            by_platform.insert(platform.as_str(), AgentBinary { path, sha256, size });
        }
        Ok(Self { by_platform })
    }

    /// The binary for `platform`, if there is one.
    pub fn get(&self, platform: Platform) -> Option<&AgentBinary> {
        self.by_platform.get(platform.as_str())
    }

    /// The platforms there is a binary for.
    pub fn platforms(&self) -> Vec<&'static str> {
        self.by_platform.keys().copied().collect()
    }

    /// `GET /v1/agent/download/<os>-<arch>` (the binary, with `X-Checksum-Sha256`) and
    /// `GET /v1/agent/download/<os>-<arch>.sha256` (`<hex>  stagely-agent`, for `sha256sum -c`).
    pub fn router(self: Arc<Self>) -> Router {
        Router::new().route(&format!("{DOWNLOAD_PATH}/{{file}}"), get(download)).with_state(self)
    }
}

/// The download URL of `platform`'s binary behind the gateway whose agents connect to
/// `gateway_url` (`wss://host[:port]/…` → `https://host[:port]/v1/agent/download/linux-amd64`).
pub fn download_url(gateway_url: &str, platform: Platform) -> Option<String> {
    let (scheme, rest) = gateway_url.split_once("://")?;
    let scheme = match scheme {
        "wss" => "https",
        "ws" => "http",
        _ => return None,
    };
    let authority = rest.split('/').next().filter(|a| !a.is_empty())?;
    Some(format!("{scheme}://{authority}{DOWNLOAD_PATH}/{}", platform_slug(platform)))
}

async fn download(State(binaries): State<Arc<AgentBinaries>>, UrlPath(file): UrlPath<String>) -> Response {
    let (slug, checksum) = match file.strip_suffix(".sha256") {
        Some(slug) => (slug, true),
        None => (file.as_str(), false),
    };
    let Some(binary) =
        Platform::ALL.into_iter().find(|p| platform_slug(*p) == slug).and_then(|platform| binaries.get(platform))
    else {
        let known = binaries.platforms().join(", ");
        return (StatusCode::NOT_FOUND, format!("no agent binary for {slug:?} (this operator carries: {known})\n"))
            .into_response();
    };
    if checksum {
        return format!("{}  stagely-agent\n", binary.sha256).into_response();
    }
    let file = match tokio::fs::File::open(&binary.path).await {
        Ok(file) => file,
        Err(err) => {
            tracing::error!(path = %binary.path.display(), error = %err, "cannot open an agent binary");
            return (StatusCode::INTERNAL_SERVER_ERROR, "the agent binary cannot be read\n").into_response();
        }
    };
    // A file that changed since it was hashed would fail every VM's check: refuse it here.
    match file.metadata().await {
        Ok(meta) if meta.len() == binary.size => {}
        _ => {
            tracing::error!(path = %binary.path.display(), "an agent binary changed since the operator started");
            return (StatusCode::INTERNAL_SERVER_ERROR, "the agent binary changed; restart the operator\n")
                .into_response();
        }
    }
    let chunks = futures_util::stream::unfold(file, |mut file| async move {
        let mut buffer = vec![0u8; 64 * 1024];
        match file.read(&mut buffer).await {
            Ok(0) => None,
            Ok(n) => {
                buffer.truncate(n);
                Some((Ok::<_, std::io::Error>(bytes::Bytes::from(buffer)), file))
            }
            Err(err) => Some((Err(err), file)),
        }
    });
    let mut response = Response::new(Body::from_stream(chunks));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(binary.size));
    if let Ok(value) = HeaderValue::from_str(&binary.sha256) {
        headers.insert("x-checksum-sha256", value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_download_url_is_the_gateways_address_over_https() {
        let url = |gateway: &str, platform| download_url(gateway, platform);
        assert_eq!(
            url("wss://agents.example.com/v1/agent/connect", Platform::LinuxArm64).as_deref(),
            Some("https://agents.example.com/v1/agent/download/linux-arm64")
        );
        assert_eq!(
            url("ws://127.0.0.1:7443/v1/agent/connect", Platform::LinuxAmd64).as_deref(),
            Some("http://127.0.0.1:7443/v1/agent/download/linux-amd64")
        );
        assert_eq!(url("https://x/y", Platform::LinuxAmd64), None);
        assert_eq!(url("wss:///nohost", Platform::LinuxAmd64), None);
    }

    #[tokio::test]
    async fn the_gateway_serves_each_binary_and_its_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("stagely-agent-linux-arm64"), &bytes).unwrap();
        let binaries = Arc::new(AgentBinaries::load(dir.path()).unwrap());
        let sha = binaries.get(Platform::LinuxArm64).unwrap().sha256.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}{DOWNLOAD_PATH}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, Arc::clone(&binaries).router()).await });
        let got = reqwest::get(format!("{base}/linux-arm64")).await.unwrap();
        assert_eq!(got.headers()["x-checksum-sha256"], sha.as_str());
        assert_eq!(got.bytes().await.unwrap().as_ref(), bytes.as_slice(), "streamed whole");
        let sum = reqwest::get(format!("{base}/linux-arm64.sha256")).await.unwrap().text().await.unwrap();
        assert_eq!(sum, format!("{sha}  stagely-agent\n"));
        let missing = reqwest::get(format!("{base}/linux-amd64")).await.unwrap();
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            missing.text().await.unwrap(),
            "no agent binary for \"linux-amd64\" (this operator carries: linux/arm64)\n"
        );
    }

    #[test]
    fn binaries_are_found_by_platform_and_hashed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("stagely-agent-linux-amd64"), b"amd64 agent").unwrap();
        let binaries = AgentBinaries::load(dir.path()).unwrap();
        assert_eq!(binaries.platforms(), ["linux/amd64"]);
        let amd64 = binaries.get(Platform::LinuxAmd64).unwrap();
        let expected: String = Sha256::digest(b"amd64 agent").iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!((amd64.sha256.as_str(), amd64.size), (expected.as_str(), 11));
        assert!(binaries.get(Platform::LinuxArm64).is_none());
        assert!(AgentBinaries::load(&dir.path().join("missing")).unwrap().platforms().is_empty());
    }
}
