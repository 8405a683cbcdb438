//! TEST: end-to-end test commands run against a preview. Each command runs in order, in a fresh
//! container of the test image on the host network (so the preview's published ports answer on
//! loopback), as `sh -c <command>` with `STAGELY_PREVIEW_URL` set. The first command that fails
//! fails the job, and its message names the command and carries its output's last lines. The
//! job's timeout covers the login, the pull and every command; when it runs out, the running
//! command's container is removed.

use std::ffi::OsString;
use std::time::Duration;

use stagely_api::protocol::{PREVIEW_URL_ENV, TestRun};
use tokio::time::Instant;

use crate::config::Engine;
use crate::executor::{Context, JobError, JobLog, Outcome, check_name, execute, registry_of, run, with_tail};

/// Runs `test`'s commands against its preview.
pub async fn test(ctx: &mut Context, log: &JobLog, test: &TestRun) -> Result<Outcome, JobError> {
    check_name("job id", &test.job_id)?;
    if test.image.trim().is_empty() || test.image.starts_with('-') {
        return Err(JobError::Invalid(format!("test image `{}` is not usable", test.image)));
    }
    if test.commands.is_empty() {
        return Err(JobError::Invalid("a TEST needs at least one command".into()));
    }
    let limit = test.timeout_seconds.max(1);
    let deadline = Instant::now() + Duration::from_secs(limit);
    let timed_out =
        |doing: &str| JobError::Step { message: format!("timed out after {limit} seconds {doing}"), code: None };

    let mut servers: Vec<String> = registry_of(&test.image).into_iter().collect();
    servers.extend(test.registry_auth.iter().map(|a| a.server.clone()));
    ctx.allow_insecure(&servers)?;
    if let Some(auth) = &test.registry_auth {
        tokio::time::timeout_at(deadline, crate::build::login(ctx, log, auth))
            .await
            .map_err(|_| timed_out("logging in to the registry"))??;
    }
    let mut pull = ctx.engine_command();
    pull.arg("pull").arg(&test.image);
    tokio::time::timeout_at(deadline, run(log, "pull the test image", pull, None))
        .await
        .map_err(|_| timed_out("pulling the test image"))??;

    for (index, command) in test.commands.iter().enumerate() {
        let number = index + 1;
        let name = container_name(&test.job_id, number);
        log.system(&format!("test command {number} of {}: {command}", test.commands.len()));
        let mut engine = ctx.engine_command();
        engine.args(run_args(&name, &test.preview_url, &test.image, command));
        match tokio::time::timeout_at(deadline, execute(log, engine, None)).await {
            Ok(finished) => {
                let finished = finished?;
                if !finished.status.success() {
                    let headline =
                        format!("test command {number} `{command}` failed with exit code {}", finished.code());
                    return Err(JobError::Step {
                        message: with_tail(&headline, "its output", &finished.tail),
                        code: Some(finished.code()),
                    });
                }
            }
            Err(_) => {
                // The engine's client was killed with the future; the container lives on
                // without it until removed.
                remove_container(ctx, log, &name).await;
                return Err(timed_out(&format!("while test command {number} `{command}` ran; it was killed")));
            }
        }
    }
    let count = test.commands.len();
    Ok(Outcome {
        message: Some(format!("{count} test command{} passed", if count == 1 { "" } else { "s" })),
        ..Outcome::default()
    })
}

/// The container of the `number`th command of `job_id` (job ids are plain names).
pub fn container_name(job_id: &str, number: usize) -> String {
    format!("stagely-test-{job_id}-{number}")
}

/// The engine's arguments that run one test command.
pub fn run_args(name: &str, preview_url: &str, image: &str, command: &str) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["run".into(), "--rm".into(), "--name".into(), name.into()];
    // Pulled already; a tag moving mid-run must not change the image between commands.
    args.push("--pull=never".into());
    args.extend(["--network".into(), "host".into()]);
    args.extend(["-e".into(), format!("{PREVIEW_URL_ENV}={preview_url}").into()]);
    args.extend([image.into(), "sh".into(), "-c".into(), command.into()]);
    args
}

async fn remove_container(ctx: &Context, log: &JobLog, name: &str) {
    let mut remove = ctx.engine_command();
    remove.args(remove_args(ctx.engine, name));
    match tokio::time::timeout(Duration::from_secs(60), execute(log, remove, None)).await {
        Ok(Ok(finished)) if finished.status.success() => {}
        _ => log.system(&format!("failed to remove the test container {name}; it may still be running")),
    }
}

/// The engine's arguments that kill and remove a container at once. Docker's `rm -f` kills;
/// podman's stops with the container's grace period unless given none (`-t 0`), which docker's
/// `rm` does not take.
pub fn remove_args(engine: Engine, name: &str) -> Vec<&str> {
    match engine {
        Engine::Docker => vec!["rm", "-f", name],
        Engine::Podman => vec!["rm", "-f", "-t", "0", name],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_command_runs_in_its_own_container_on_the_host_network() {
        let args: Vec<String> = run_args(
            &container_name("test-1", 2),
            "http://127.0.0.1:8080",
            "registry:5000/e2e:1",
            "curl -f $STAGELY_PREVIEW_URL/health",
        )
        .into_iter()
        .map(|a| a.into_string().unwrap())
        .collect();
        assert_eq!(
            args,
            [
                "run",
                "--rm",
                "--name",
                "stagely-test-test-1-2",
                "--pull=never",
                "--network",
                "host",
                "-e",
                "STAGELY_PREVIEW_URL=http://127.0.0.1:8080",
                "registry:5000/e2e:1",
                "sh",
                "-c",
                "curl -f $STAGELY_PREVIEW_URL/health",
            ]
        );
    }

    #[test]
    fn a_container_is_killed_and_removed_in_each_engines_words() {
        assert_eq!(remove_args(Engine::Docker, "c"), ["rm", "-f", "c"]);
        assert_eq!(remove_args(Engine::Podman, "c"), ["rm", "-f", "-t", "0", "c"]);
    }
}
