//! Checking a repository out at one commit. A token travels in an HTTP header set through
//! git's environment (`GIT_CONFIG_*`), never in the URL or the argument list, which are logged.

use std::path::Path;

use base64::Engine as _;
use stagely_api::protocol::Sensitive;

use crate::executor::{Context, JobError, JobLog, run};

/// Fails unless `commit` is a hexadecimal object name (so it cannot be read as an option).
pub fn check_commit(commit: &str) -> Result<(), JobError> {
    if (7..=64).contains(&commit.len()) && commit.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(JobError::Invalid(format!("commit `{commit}` is not a hexadecimal object name")))
    }
}

/// The `http.extraHeader` value carrying `token` as GitHub expects it.
pub fn auth_header(token: &Sensitive) -> String {
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{}", token.expose()));
    format!("Authorization: Basic {basic}")
}

/// Fetches `commit` from `url` into a fresh `dir` and checks it out.
pub async fn checkout(
    ctx: &Context,
    log: &JobLog,
    url: &str,
    token: Option<&Sensitive>,
    commit: &str,
    dir: &Path,
) -> Result<(), JobError> {
    check_commit(commit)?;
    if url.is_empty() || url.starts_with('-') {
        return Err(JobError::Invalid(format!("clone URL `{url}` is not usable")));
    }
    if let Some(token) = token {
        // The header's encoded form is what git would print when tracing.
        ctx.masker.add(&auth_header(token));
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(JobError::io("remove", dir))?;
    }
    std::fs::create_dir_all(dir).map_err(JobError::io("create", dir))?;
    let git = |args: &[&str]| {
        let mut command = ctx.command("git");
        command.arg("-C").arg(dir).args(args).env("GIT_TERMINAL_PROMPT", "0");
        if let Some(token) = token {
            command
                .env("GIT_CONFIG_COUNT", "1")
                .env("GIT_CONFIG_KEY_0", "http.extraHeader")
                .env("GIT_CONFIG_VALUE_0", auth_header(token));
        }
        command
    };
    run(log, "initialise the clone", git(&["init", "-q"]), None).await?;
    let shallow =
        run(log, "fetch the commit", git(&["fetch", "-q", "--depth", "1", "--no-tags", "--", url, commit]), None).await;
    if shallow.is_err() {
        // Servers that refuse to serve an unadvertised commit: fetch the branches instead.
        log.system("fetching the commit alone failed; fetching every branch");
        run(
            log,
            "fetch the repository",
            git(&["fetch", "-q", "--no-tags", "--", url, "+refs/heads/*:refs/remotes/origin/*"]),
            None,
        )
        .await?;
    }
    run(
        log,
        "check out the commit",
        git(&["-c", "advice.detachedHead=false", "checkout", "-q", "--detach", commit]),
        None,
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_must_be_object_names() {
        assert!(check_commit(&"a".repeat(40)).is_ok());
        assert!(check_commit("--upload-pack=x").is_err());
        assert!(check_commit("main").is_err());
    }

    #[test]
    fn the_header_encodes_the_token() {
        let header = auth_header(&"ghs_abc".into());
        assert!(!header.contains("ghs_abc"));
        assert_eq!(header, "Authorization: Basic eC1hY2Nlc3MtdG9rZW46Z2hzX2FiYw==");
    }
}
