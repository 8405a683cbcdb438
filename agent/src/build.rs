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
    let pushed = run(log, "push the image", command, None).await?;
    let digest = match ctx.engine {
        Engine::Podman => std::fs::read_to_string(&digest_file).map_err(JobError::io("read", &digest_file))?,
        Engine::Docker => digest_from_push_output(&pushed).unwrap_or_default(),
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

/// `docker push` prints `<tag>: digest: sha256:… size: …` last.
pub fn digest_from_push_output(output: &str) -> Option<String> {
    output.lines().rev().find_map(|line| {
        let rest = &line[line.find("digest: ")? + "digest: ".len()..];
        Some(rest.split_whitespace().next()?.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use stagely_api::v1alpha1::Platform;

    use super::*;

    #[test]
    fn digest_from_docker_push() {
        let output = "The push refers to repository [r/a]\n5f70bf18a086: Pushed\n1: digest: sha256:abc size: 528\n";
        assert_eq!(digest_from_push_output(output).as_deref(), Some("sha256:abc"));
        assert_eq!(digest_from_push_output("nothing"), None);
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
