//! The session credential, kept across restarts of the agent. The enrollment token is single
//! use: an agent restarted by systemd that knew its session token only in memory would present
//! the spent enrollment token, be refused forever, and shut its VM down. So every session token
//! the gateway hands out (in each HELLO_ACK, including the renewals on a long connection) is
//! written here, mode 0600, replacing the file atomically, and read back at start.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use stagely_api::protocol::Sensitive;

/// Why the session credential could not be kept.
#[derive(Debug, thiserror::Error)]
#[error("failed to {action} the session credential {path}: {source}")]
pub struct SessionError {
    /// What was attempted.
    action: &'static str,
    /// The file.
    path: PathBuf,
    /// The cause.
    source: std::io::Error,
}

/// The file's contents: the token, and whose it is (a VM image reused with another agent id must
/// not present this agent's token).
#[derive(Serialize, Deserialize)]
struct Stored {
    agent_id: String,
    session_token: Sensitive,
}

/// Where the session credential of one agent is kept.
#[derive(Debug, Clone)]
pub struct SessionStore {
    path: PathBuf,
    agent_id: String,
}

impl SessionStore {
    /// The store at `path` for `agent_id`.
    pub fn new(path: impl Into<PathBuf>, agent_id: &str) -> Self {
        Self { path: path.into(), agent_id: agent_id.to_owned() }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The kept session token, if there is one for this agent. A file that cannot be read or is
    /// another agent's counts as none (the enrollment token is tried instead), with a warning.
    pub fn load(&self) -> Option<Sensitive> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return None,
            Err(err) => {
                tracing::warn!(path = %self.path.display(), %err, "failed to read the session credential");
                return None;
            }
        };
        match serde_json::from_str::<Stored>(&text) {
            Ok(stored) if stored.agent_id == self.agent_id => Some(stored.session_token),
            Ok(_) => {
                tracing::warn!(path = %self.path.display(), "the session credential is another agent's; ignoring it");
                None
            }
            Err(_) => {
                tracing::warn!(path = %self.path.display(), "the session credential is unreadable; ignoring it");
                None
            }
        }
    }

    /// Keeps `token`: written to a new 0600 file beside the old one, synced, then renamed over
    /// it, so a crash leaves the old token or the new one, never half of one.
    pub fn save(&self, token: &Sensitive) -> Result<(), SessionError> {
        let error = |action: &'static str| {
            move |source: std::io::Error| SessionError { action, path: self.path.clone(), source }
        };
        let stored = Stored { agent_id: self.agent_id.clone(), session_token: token.clone() };
        let text = serde_json::to_string(&stored).expect("the session credential serializes");
        let mut temporary = self.path.clone().into_os_string();
        temporary.push(format!(".{}.tmp", std::process::id()));
        let temporary = PathBuf::from(temporary);
        let _ = std::fs::remove_file(&temporary);
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(error("create the directory of"))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(error("write"))?;
        file.write_all(text.as_bytes()).and_then(|()| file.sync_all()).map_err(error("write"))?;
        drop(file);
        std::fs::rename(&temporary, &self.path).map_err(|source| {
            let _ = std::fs::remove_file(&temporary);
            SessionError { action: "replace", path: self.path.clone(), source }
        })
    }

    /// Forgets the kept token (the gateway refused it).
    pub fn clear(&self) {
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => tracing::warn!(path = %self.path.display(), %err, "failed to remove the session credential"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn kept_private_replaced_whole_and_only_for_its_agent() {
        let dir = tempfile::tempdir().unwrap();
        let store = SessionStore::new(dir.path().join("session.json"), "agent-1");
        assert!(store.load().is_none(), "nothing kept yet");
        store.save(&"s-1".into()).unwrap();
        store.save(&"s-2".into()).unwrap();
        assert_eq!(store.load().unwrap().expose(), "s-2");
        let mode = std::fs::metadata(store.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["session.json"], "no temporary file is left");

        assert!(SessionStore::new(store.path(), "agent-2").load().is_none(), "another agent's token");
        std::fs::write(store.path(), "{not json").unwrap();
        assert!(store.load().is_none());
        store.clear();
        store.clear();
        assert!(!store.path().exists());
    }
}
