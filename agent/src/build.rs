//! BUILD: clone the repository at the commit, build the image for the requested platform with
//! the container engine, push it, and report its digest.
//!
//! Layer caches: with podman, `--layers` plus `--cache-from`/`--cache-to`, which name a
//! repository (no tag: podman tags each cached layer itself). With docker, `--cache-from <ref>`
//! and an inline cache (`BUILDKIT_INLINE_CACHE=1`) in the image, which is then pushed again as
//! `cache_to`. A cache is an optimisation: a missing one (the first build) or one that cannot be
//! pushed never fails the build.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use stagely_api::backoff::Backoff;
use stagely_api::protocol::{Build, RegistryAuth};

use crate::config::Engine;
use crate::executor::{Context, JobError, JobLog, Outcome, check_name, registry_of, relative, resolve_inside, run};

/// Builds and pushes `build.image`.
pub async fn build(ctx: &mut Context, log: &JobLog, build: &Build) -> Result<Outcome, JobError> {
    check_name("job id", &build.job_id)?;
    let context = relative("context", &build.context)?;
    let dockerfile = relative("dockerfile", &build.dockerfile)?;
    if build.image.is_empty() || build.image.starts_with('-') {
        return Err(JobError::Invalid(format!("image `{}` is not usable", build.image)));
    }
    for cache in build.cache_from.iter().chain(&build.cache_to) {
        if cache.is_empty() || cache.starts_with('-') {
            return Err(JobError::Invalid(format!("cache image `{cache}` is not usable")));
        }
    }
    let mut servers: Vec<String> = registry_of(&build.image).into_iter().collect();
    servers.extend(build.registry_auth.iter().map(|a| a.server.clone()));
    // podman pushes and pulls cache layers with the build's TLS settings: a plain-HTTP cache
    // registry must be in the registries.conf that marks it insecure, or every cache push fails.
    servers.extend(build.cache_from.iter().chain(&build.cache_to).filter_map(|c| registry_of(c)));
    ctx.allow_insecure(&servers)?;

    let job_dir = ctx.work_dir.join("builds").join(&build.job_id);
    let src = job_dir.join("src");
    crate::git::checkout(ctx, log, &build.clone_url, build.git_token.as_ref(), &build.commit, &src).await?;
    if let Some(auth) = &build.registry_auth {
        login(ctx, log, auth).await?;
    }

    // The repository decides what these paths lead to: they must stay in the clone.
    let context_dir = resolve_inside("context", &src, &src.join(&context))?;
    let dockerfile = resolve_inside("dockerfile", &src, &src.join(&context).join(&dockerfile))?;
    if !dockerfile.is_file() {
        return Err(JobError::Invalid(format!("dockerfile `{}` is not a file", build.dockerfile)));
    }
    let mut command = ctx.engine_command();
    command.args(build_args(ctx.engine, build, &dockerfile, &context_dir));
    run(log, "build the image", command, None).await?;

    let digest_file = job_dir.join("digest");
    let mut command = ctx.engine_command();
    command.arg("push");
    if ctx.engine == Engine::Podman {
        command.arg("--digestfile").arg(&digest_file);
    }
    command.arg(&build.image);
    run(log, "push the image", command, None).await?;
    // The digest comes from what the engine recorded of the push, not from its progress output.
    let digest = match ctx.engine {
        Engine::Podman => std::fs::read_to_string(&digest_file).map_err(JobError::io("read", &digest_file))?,
        Engine::Docker => {
            let mut command = ctx.engine_command();
            command.args(["image", "inspect", "--format", "{{json .RepoDigests}}", &build.image]);
            let repo_digests = run(log, "read the pushed image's digest", command, None).await?;
            pushed_digest(&repo_digests, &build.image)?
        }
    };
    let digest = digest.trim().to_owned();
    if !digest.starts_with("sha256:") {
        return Err(JobError::Invalid(format!("the push of {} reported no digest", build.image)));
    }
    if let (Engine::Docker, Some(cache_to)) = (ctx.engine, &build.cache_to) {
        push_inline_cache(ctx, log, &build.image, cache_to).await;
    }
    let _ = std::fs::remove_dir_all(&src);
    log.system(&format!("pushed {}@{digest}", build.image));
    Ok(Outcome { message: Some(format!("pushed {}", build.image)), image_digest: Some(digest), services: Vec::new() })
}

/// The engine's `build` arguments.
pub fn build_args(engine: Engine, build: &Build, dockerfile: &Path, context_dir: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["build".into(), "--platform".into(), build.platform.as_str().into()];
    args.extend(["-f".into(), dockerfile.as_os_str().to_owned(), "-t".into(), build.image.clone().into()]);
    for (key, value) in &build.build_args {
        args.extend(["--build-arg".into(), format!("{key}={value}").into()]);
    }
    match engine {
        Engine::Podman => {
            // Buildah's layer cache reuses a `COPY` layer whose files changed when the image
            // starts `FROM scratch` (containers/buildah#6106): a new commit would ship the old
            // files. A stale image is worse than a slow build, so podman builds without any
            // layer cache, local or remote; `cache_from`/`cache_to` serve docker builders.
            args.push("--layers=false".into());
        }
        Engine::Docker => {
            for cache in &build.cache_from {
                args.extend(["--cache-from".into(), cache.into()]);
            }
            if build.cache_to.is_some() {
                // The cache travels inside the image; `cache_to` is the same image under the
                // cache's name.
                args.extend(["--build-arg".into(), "BUILDKIT_INLINE_CACHE=1".into()]);
            }
        }
    }
    args.push(context_dir.as_os_str().to_owned());
    args
}

/// Pushes the built image (which carries its inline cache) as `cache_to`; a failure is logged.
async fn push_inline_cache(ctx: &Context, log: &JobLog, image: &str, cache_to: &str) {
    let mut command = ctx.engine_command();
    command.arg("tag").arg(image).arg(cache_to);
    let mut result = run(log, "tag the layer cache", command, None).await.map(drop);
    if result.is_ok() {
        let mut command = ctx.engine_command();
        command.arg("push").arg(cache_to);
        result = run(log, "push the layer cache", command, None).await.map(drop);
    }
    if let Err(err) = result {
        log.system(&format!("the layer cache was not pushed ({err}); the next build starts without it"));
    }
}

/// Logs the engine in to a registry, the password on standard input.
///
/// The registry's token endpoint is served by the operator; while it restarts (or a new leader
/// takes over) a login is refused, so a failed login is tried again with backoff for about a
/// minute before the job fails.
pub async fn login(ctx: &Context, log: &JobLog, auth: &RegistryAuth) -> Result<(), JobError> {
    ctx.masker.add(auth.password.expose());
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
    loop {
        let mut command = ctx.engine_command();
        command.arg("login").arg("--username").arg(&auth.username).arg("--password-stdin").arg(&auth.server);
        match run(log, "log in to the registry", command, Some(auth.password.expose())).await {
            Ok(_) => return Ok(()),
            Err(err) if backoff.attempts() < LOGIN_ATTEMPTS => {
                let delay = backoff.next_delay();
                log.system(&format!("logging in to the registry failed; trying again in {:.1}s", delay.as_secs_f32()));
                tracing::debug!(error = %err, attempts = backoff.attempts(), "registry login failed");
                tokio::time::sleep(delay).await;
            }
            Err(err) => return Err(err),
        }
    }
}

/// Logins tried again after the first fails (about a minute with the backoff).
const LOGIN_ATTEMPTS: u32 = 8;

/// The digest docker recorded when it pushed `image`: its entry in the image's `RepoDigests`
/// (`repo_digests`, as JSON) for `image`'s repository. Fails unless there is exactly one: with
/// several (the same image pushed to that repository before as another manifest) there is no
/// telling which this push wrote.
pub fn pushed_digest(repo_digests: &str, image: &str) -> Result<String, JobError> {
    let entries: Option<Vec<String>> = serde_json::from_str(repo_digests.trim()).map_err(|err| {
        JobError::Invalid(format!("failed to parse the RepoDigests of {image} ({err}): {}", repo_digests.trim()))
    })?;
    let repository = familiar(repository_of(image));
    let mut digests: Vec<&str> = entries
        .iter()
        .flatten()
        .filter_map(|entry| entry.split_once('@'))
        .filter(|(name, _)| familiar(name) == repository)
        .map(|(_, digest)| digest)
        .collect();
    digests.sort_unstable();
    digests.dedup();
    match digests[..] {
        [digest] => Ok(digest.to_owned()),
        [] => Err(JobError::Invalid(format!("docker recorded no digest of {image} for {repository} after the push"))),
        _ => Err(JobError::Invalid(format!(
            "docker knows several digests of {image} in {repository} ({}): cannot tell which the push wrote",
            digests.join(", ")
        ))),
    }
}

/// `image` without its tag and digest.
fn repository_of(image: &str) -> &str {
    let name = image.split_once('@').map_or(image, |(name, _)| name);
    match name.rsplit_once(':') {
        // A colon before the last slash is a registry's port, not a tag.
        Some((repository, tag)) if !tag.contains('/') => repository,
        _ => name,
    }
}

/// A repository as docker shows it: Docker Hub's `docker.io/` and `library/` left out.
fn familiar(repository: &str) -> &str {
    let repository = repository.strip_prefix("docker.io/").unwrap_or(repository);
    repository.strip_prefix("library/").unwrap_or(repository)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use stagely_api::v1alpha1::Platform;

    use super::*;

    #[test]
    fn the_pushed_digest_is_the_repositorys_entry_in_repo_digests() {
        let digests = r#"["127.0.0.1:5000/shop/web-cache@sha256:ccc","127.0.0.1:5000/shop/web@sha256:abc"]"#;
        for image in ["127.0.0.1:5000/shop/web:pr-1", "127.0.0.1:5000/shop/web", "127.0.0.1:5000/shop/web:1@sha256:0"] {
            assert_eq!(pushed_digest(digests, image).unwrap(), "sha256:abc", "{image}");
        }
        assert_eq!(pushed_digest(r#"["team/app@sha256:abc"]"#, "docker.io/team/app:1").unwrap(), "sha256:abc");
        assert_eq!(pushed_digest(r#"["busybox@sha256:abc"]"#, "docker.io/library/busybox:1").unwrap(), "sha256:abc");

        let err = pushed_digest(digests, "127.0.0.1:5000/shop/api:1").unwrap_err().to_string();
        assert!(err.contains("no digest") && err.contains("127.0.0.1:5000/shop/api"), "{err}");
        let two = r#"["r:5000/a@sha256:111","r:5000/a@sha256:222","r:5000/a@sha256:111"]"#;
        let err = pushed_digest(two, "r:5000/a:1").unwrap_err().to_string();
        assert!(err.contains("sha256:111, sha256:222"), "{err}");
        assert!(pushed_digest("[]", "r:5000/a:1").is_err());
        assert!(pushed_digest("null", "r:5000/a:1").is_err());
        assert!(pushed_digest("Error: No such image", "r:5000/a:1").unwrap_err().to_string().contains("parse"));
    }

    fn job(cache_from: &[&str], cache_to: Option<&str>) -> Build {
        Build {
            job_id: "build-1".into(),
            clone_url: "file:///repo".into(),
            git_token: None,
            commit: "a".repeat(40),
            context: ".".into(),
            dockerfile: "Dockerfile".into(),
            platform: Platform::LinuxArm64,
            build_args: BTreeMap::from([("MODE".into(), "prod".into())]),
            cache_from: cache_from.iter().map(|c| (*c).to_owned()).collect(),
            cache_to: cache_to.map(str::to_owned),
            image: "reg:5000/team/shop/web:abc-arm64".into(),
            registry_auth: None,
            timeout_seconds: 60,
        }
    }

    fn args(engine: Engine, build: &Build) -> Vec<String> {
        build_args(engine, build, Path::new("/src/Dockerfile"), Path::new("/src"))
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn podman_never_uses_its_layer_cache() {
        let build = job(&["reg:5000/team/shop/web-cache:latest"], Some("reg:5000/team/shop/web-cache:latest"));
        assert_eq!(
            args(Engine::Podman, &build).join(" "),
            "build --platform linux/arm64 -f /src/Dockerfile -t reg:5000/team/shop/web:abc-arm64 \
             --build-arg MODE=prod --layers=false /src"
        );
    }

    #[test]
    fn docker_reads_cache_images_and_builds_an_inline_cache() {
        let build = job(&["reg:5000/team/shop/web-cache:latest"], Some("reg:5000/team/shop/web-cache:latest"));
        assert_eq!(
            args(Engine::Docker, &build).join(" "),
            "build --platform linux/arm64 -f /src/Dockerfile -t reg:5000/team/shop/web:abc-arm64 \
             --build-arg MODE=prod --cache-from reg:5000/team/shop/web-cache:latest \
             --build-arg BUILDKIT_INLINE_CACHE=1 /src"
        );
    }

    #[test]
    fn no_cache_no_cache_flags() {
        let build = job(&[], None);
        assert_eq!(
            args(Engine::Docker, &build).join(" "),
            "build --platform linux/arm64 -f /src/Dockerfile -t reg:5000/team/shop/web:abc-arm64 \
             --build-arg MODE=prod /src"
        );
    }
}
