//! The GitHub contents-API source: reads a file at a commit with one call, no clone, using the
//! Project's GitHub credentials. A repository that is not on GitHub, or a Project whose Secret
//! holds no credentials (only a webhook secret), is read through the fallback (git).

use std::sync::Arc;
use std::time::Duration;

use super::{BoxFuture, Repo, RepositorySource, SourceError};
use crate::github::auth::read_credentials;
use crate::github::{FileAnswer, GitHub, Repository};

/// See the module documentation.
pub struct GitHubSource {
    github: Arc<GitHub>,
    client: kube::Client,
    fallback: Arc<dyn RepositorySource>,
    timeout: Duration,
}

impl GitHubSource {
    /// Reads through `github` with the credentials it finds through `client`; repositories it
    /// cannot read that way go to `fallback`. A read longer than `timeout` is abandoned.
    pub fn new(
        github: Arc<GitHub>,
        client: kube::Client,
        fallback: Arc<dyn RepositorySource>,
        timeout: Duration,
    ) -> Self {
        Self { github, client, fallback, timeout }
    }

    async fn read(&self, repo: &Repo, commit: &str, path: &str, max_bytes: u64) -> Result<Vec<u8>, SourceError> {
        let Some(on_github) = &repo.github else {
            return self.fallback.read_file(repo, commit, path, max_bytes).await;
        };
        let unreachable = |detail: String| SourceError::Unreachable { url: repo.clone_url.clone(), detail };
        let credentials = read_credentials(&self.client, &on_github.namespace, &on_github.secret)
            .await
            .map_err(|err| unreachable(err.to_string()))?;
        let Some(credentials) = credentials else {
            return self.fallback.read_file(repo, commit, path, max_bytes).await;
        };
        let answer = self
            .github
            .file(&credentials, Repository(&on_github.repository), commit, path, max_bytes)
            .await
            .map_err(|err| unreachable(err.to_string()))?;
        match answer {
            FileAnswer::File(bytes) => Ok(bytes),
            FileAnswer::NotAFile(kind) => Err(SourceError::NotAFile { path: path.into(), commit: commit.into(), kind }),
            FileAnswer::TooLarge(size) => {
                Err(SourceError::TooLarge { path: path.into(), commit: commit.into(), size, max: max_bytes })
            }
            // GitHub answers 404 alike for a missing file and for a repository the credentials
            // do not reach (the App not installed on it): only the first is the commit's
            // problem, for good; the second is retried, and the Project's Ready says why.
            FileAnswer::FileNotFound => {
                match self.github.can_read(&credentials, Repository(&on_github.repository)).await {
                    Ok(true) => Err(SourceError::FileNotFound { path: path.into(), commit: commit.into() }),
                    Ok(false) => Err(unreachable(format!(
                        "GitHub shows {} to none of the Project's credentials (is the GitHub App installed on it?)",
                        on_github.repository
                    ))),
                    Err(err) => Err(unreachable(err.to_string())),
                }
            }
            FileAnswer::CommitNotFound => {
                Err(SourceError::CommitNotFound { url: repo.clone_url.clone(), commit: commit.into() })
            }
        }
    }
}

impl RepositorySource for GitHubSource {
    fn read_file<'a>(
        &'a self,
        repo: &'a Repo,
        commit: &'a str,
        path: &'a str,
        max_bytes: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>, SourceError>> {
        let url = repo.clone_url.clone();
        Box::pin(super::within(self.timeout, url, commit, path, self.read(repo, commit, path, max_bytes)))
    }
}
