//! What a pull request should be told about its Environment, as pure functions of the
//! Environment: the GitHub Deployment state of the current run ([`deployment`]) and the sticky
//! comment's text ([`comment`]).

use sha2::{Digest, Sha256};
use stagely_api::v1alpha1::{BuildJobPhase, Environment, EnvironmentPhase};

use crate::github::DeploymentState;

/// The hidden first line that marks Stagely's comment on a pull request, followed by the
/// Environment's `namespace/name` (two Projects may preview the same repository).
pub const MARKER: &str = "<!-- stagely:preview";

/// The conditions whose failure explains a failed run, in the order the pipeline meets them.
const STEPS: [&str; 7] =
    ["ConfigValid", "BuildsSucceeded", "VMReady", "AgentConnected", "Deployed", "Routed", "Tested"];

/// The GitHub environment previews of pull request `number` deploy to.
pub fn environment_name(number: i64) -> String {
    format!("preview/pr-{number}")
}

/// The Deployment status the current run should show: its state, the URL when serving, and a
/// description (GitHub keeps 140 characters). `None` before a run has a commit.
pub fn deployment(env: &Environment) -> Option<(DeploymentState, Option<String>, String)> {
    let status = env.status.as_ref()?;
    let sha = &status.run.as_ref()?.sha;
    let short = &sha[..sha.len().min(7)];
    if env.metadata.deletion_timestamp.is_some() || status.phase == Some(EnvironmentPhase::Terminating) {
        let description = match reaped(env) {
            Some(why) => format!("The preview was torn down: {why}"),
            None => "The preview was torn down".into(),
        };
        return Some((DeploymentState::Inactive, None, description));
    }
    Some(match status.phase.unwrap_or_default() {
        EnvironmentPhase::Ready => {
            (DeploymentState::Success, status.url.clone(), format!("Preview of {short} is ready"))
        }
        EnvironmentPhase::Failed => {
            (DeploymentState::Failure, None, failing_step(env).unwrap_or_else(|| "The run failed".into()))
        }
        EnvironmentPhase::Deploying => (DeploymentState::InProgress, None, format!("Deploying {short}")),
        _ => (DeploymentState::InProgress, None, format!("Building {short}")),
    })
}

/// Why the reaper deleted the Environment (`Expired: ...`, `HeartbeatLost: ...`), if it did.
pub fn reaped(env: &Environment) -> Option<&str> {
    env.metadata.annotations.as_ref()?.get(stagely_api::keys::REAPED).map(String::as_str)
}

/// `Type: message` of the first pipeline condition that is False with a failure.
pub fn failing_step(env: &Environment) -> Option<String> {
    let conditions = &env.status.as_ref()?.conditions;
    STEPS.iter().find_map(|step| {
        conditions
            .iter()
            .find(|c| c.type_ == *step && c.status == "False")
            .map(|c| format!("{}: {}", c.type_, c.message))
    })
}

/// The sticky comment's Markdown: the marker, the phase, the URL, the commit, a table of the
/// run's builds, and the failing step when the run failed; once the Environment is going, that
/// the preview was torn down.
pub fn comment(env: &Environment) -> String {
    let namespace = env.metadata.namespace.as_deref().unwrap_or_default();
    let name = env.metadata.name.as_deref().unwrap_or_default();
    let status = env.status.clone().unwrap_or_default();
    let deleting = env.metadata.deletion_timestamp.is_some() || status.phase == Some(EnvironmentPhase::Terminating);
    let phase = status.phase.unwrap_or_default();
    let mut text = format!("{MARKER} {namespace}/{name} -->\n");
    let headline = match (deleting, phase) {
        (true, _) => "🗑️ **Preview torn down**",
        (false, EnvironmentPhase::Ready) => "✅ **Preview ready**",
        (false, EnvironmentPhase::Failed) => "❌ **Preview failed**",
        (false, EnvironmentPhase::Deploying) => "🚀 **Deploying the preview**",
        (false, _) => "🔨 **Building the preview**",
    };
    text.push_str(&format!("### Stagely: {headline}\n\n"));
    if deleting && let Some(why) = reaped(env) {
        text.push_str(&format!("**Why:** {}\n\n", escape(why)));
    }
    match (&status.url, deleting) {
        (Some(url), false) if phase == EnvironmentPhase::Ready => text.push_str(&format!("**URL:** {url}\n\n")),
        (Some(url), false) => text.push_str(&format!("**URL (once ready):** {url}\n\n")),
        _ => {}
    }
    if let Some(run) = &status.run {
        text.push_str(&format!("**Commit:** `{}`  \n", &run.sha[..run.sha.len().min(12)]));
    }
    text.push_str(&format!("**Environment:** `{namespace}/{name}` (phase {phase:?})\n"));
    let builds = status.run.as_ref().map(|run| run.builds.as_slice()).unwrap_or_default();
    if !builds.is_empty() {
        text.push_str("\n| Build | Platform | Duration | Result |\n|---|---|---|---|\n");
        for build in builds {
            let duration = match (&build.started_at, &build.finished_at) {
                (Some(start), Some(end)) => seconds(end.0.as_second() - start.0.as_second()),
                // No running time: the text would change on every look, and every change is an edit.
                _ => "–".into(),
            };
            let result = match build.phase.unwrap_or_default() {
                BuildJobPhase::Succeeded => "✅ succeeded",
                BuildJobPhase::Failed => "❌ failed",
                BuildJobPhase::Building => "building",
                BuildJobPhase::Provisioning => "starting a builder",
                BuildJobPhase::Queued => "queued",
            };
            let platform = serde_json::to_value(build.platform).ok().and_then(|v| v.as_str().map(str::to_owned));
            text.push_str(&format!(
                "| `{}` | {} | {duration} | {result} |\n",
                escape(&build.service),
                platform.unwrap_or_default()
            ));
        }
    }
    if phase == EnvironmentPhase::Failed
        && !deleting
        && let Some(step) = failing_step(env)
    {
        text.push_str(&format!("\n**Failed step:**\n```\n{}\n```\n", step.replace("```", "ˋˋˋ")));
    }
    text
}

/// A digest of a comment's text, to tell whether it needs editing.
pub fn digest(text: &str) -> String {
    Sha256::digest(text.as_bytes())[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `body` is the comment of Environment `namespace/name`.
pub fn is_ours(body: &str, namespace: &str, name: &str) -> bool {
    body.lines().next().is_some_and(|first| first.trim() == format!("{MARKER} {namespace}/{name} -->"))
}

fn seconds(total: i64) -> String {
    let total = total.max(0);
    if total >= 60 { format!("{}m {:02}s", total / 60, total % 60) } else { format!("{total}s") }
}

/// A table cell's text: pipes and newlines would break the table.
fn escape(text: &str) -> String {
    text.replace('|', "\\|").replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(status: serde_json::Value, deleting: bool) -> Environment {
        let mut value = serde_json::json!({
            "apiVersion": "stagely.dev/v1alpha1", "kind": "Environment",
            "metadata": {"name": "shop-pr-7", "namespace": "team"},
            "spec": {"projectRef": {"name": "shop"}, "pullRequest": {"number": 7, "headSha": "a".repeat(40), "headRef": "f", "baseRef": "main"}},
            "status": status,
        });
        if deleting {
            value["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z".into();
        }
        serde_json::from_value(value).unwrap()
    }

    fn run(phase: &str) -> serde_json::Value {
        serde_json::json!({
            "phase": phase, "url": "https://abc123xy.preview.example.com",
            "run": {"sha": "b".repeat(40), "builds": [
                {"buildJob": "j1", "service": "api", "platform": "linux/amd64", "phase": "Succeeded",
                 "startedAt": "2026-01-01T00:00:00Z", "finishedAt": "2026-01-01T00:01:12Z"},
                {"buildJob": "j2", "service": "web|x", "platform": "linux/arm64", "phase": "Building",
                 "startedAt": "2026-01-01T00:00:00Z"},
            ]},
            "conditions": [
                {"type": "ConfigValid", "status": "True", "reason": "Valid", "message": "ok", "lastTransitionTime": "2026-01-01T00:00:00Z"},
                {"type": "BuildsSucceeded", "status": "False", "reason": "BuildFailed", "message": "build api failed: exit 1", "lastTransitionTime": "2026-01-01T00:00:00Z"},
            ],
        })
    }

    #[test]
    fn the_deployment_follows_the_phase() {
        assert_eq!(deployment(&env(serde_json::json!({"phase": "Pending"}), false)), None, "no run, no deployment");
        let (state, url, description) = deployment(&env(run("Building"), false)).unwrap();
        assert_eq!((state, url, description.as_str()), (DeploymentState::InProgress, None, "Building bbbbbbb"));
        let (state, url, _) = deployment(&env(run("Ready"), false)).unwrap();
        assert_eq!((state, url.as_deref()), (DeploymentState::Success, Some("https://abc123xy.preview.example.com")));
        let (state, _, description) = deployment(&env(run("Failed"), false)).unwrap();
        assert_eq!(
            (state, description.as_str()),
            (DeploymentState::Failure, "BuildsSucceeded: build api failed: exit 1")
        );
        let (state, _, _) = deployment(&env(run("Ready"), true)).unwrap();
        assert_eq!(state, DeploymentState::Inactive);
    }

    #[test]
    fn the_comment_is_marked_and_tells_phase_url_commit_builds_and_failure() {
        let ready = comment(&env(run("Ready"), false));
        assert!(is_ours(&ready, "team", "shop-pr-7"), "{ready}");
        assert!(!is_ours(&ready, "team", "shop-pr-8"));
        assert!(ready.contains("✅ **Preview ready**"), "{ready}");
        assert!(ready.contains("**URL:** https://abc123xy.preview.example.com"), "{ready}");
        assert!(ready.contains("`bbbbbbbbbbbb`"), "{ready}");
        assert!(ready.contains("| `api` | linux/amd64 | 1m 12s | ✅ succeeded |"), "{ready}");
        assert!(ready.contains("| `web\\|x` | linux/arm64 | – | building |"), "{ready}");
        assert!(!ready.contains("Failed step"), "{ready}");

        let failed = comment(&env(run("Failed"), false));
        assert!(failed.contains("❌ **Preview failed**"), "{failed}");
        assert!(failed.contains("**Failed step:**\n```\nBuildsSucceeded: build api failed: exit 1\n```"), "{failed}");
        assert!(!failed.contains("**URL:**"), "{failed}");

        let gone = comment(&env(run("Ready"), true));
        assert!(gone.contains("Preview torn down") && !gone.contains("URL") && !gone.contains("Why"), "{gone}");
        let mut expired = env(run("Ready"), true);
        let why = "Expired: its TTL (72h after its last commit) ran out";
        expired.metadata.annotations = Some([(stagely_api::keys::REAPED.to_owned(), why.to_owned())].into());
        assert!(comment(&expired).contains(&format!("**Why:** {why}\n")), "{}", comment(&expired));
        let (state, _, description) = deployment(&expired).unwrap();
        assert_eq!(
            (state, description.as_str()),
            (DeploymentState::Inactive, &*format!("The preview was torn down: {why}"))
        );
        assert_ne!(digest(&ready), digest(&failed));
        assert_eq!(digest(&ready), digest(&comment(&env(run("Ready"), false))));
    }
}
