//! BUILD: clone the repository at the commit, build the image for the requested platform with
//! the container engine, push it, and report its digest.

use stagely_api::protocol::{Build, RegistryAuth};

use crate::config::Engine;
use crate::executor::{Context, JobError, JobLog, Outcome, check_name, registry_of, relative, run};

/// Builds and pushes `build.image`.
pub async fn build(ctx: &mut Context, log: &JobLog, build: &Build) -> Result<Outcome, JobError> {
    check_name("job id", &build.job_id)?;
    let context = relative("context", &build.context)?;
    let dockerfile = relative("dockerfile", &build.dockerfile)?;
    if build.image.is_empty() || build.image.starts_with('-') {
        return Err(JobError::Invalid(format!("image `{}` is not usable", build.image)));
    }
    let mut servers: Vec<String> = registry_of(&build.image).into_iter().collect();
    servers.extend(build.registry_auth.iter().map(|a| a.server.clone()));
    servers.extend(build.cache_from.iter().filter_map(|c| registry_of(c)));
    ctx.allow_insecure(&servers)?;

    let job_dir = ctx.work_dir.join("builds").join(&build.job_id);
    let src = job_dir.join("src");
    crate::git::checkout(ctx, log, &build.clone_url, build.git_token.as_ref(), &build.commit, &src).await?;
    if let Some(auth) = &build.registry_auth {
        login(ctx, log, auth).await?;
    }

    let context_dir = src.join(&context);
    let mut command = ctx.engine_command();
    command.arg("build").arg("--platform").arg(build.platform.as_str());
    command.arg("-f").arg(context_dir.join(&dockerfile)).arg("-t").arg(&build.image);
    for (key, value) in &build.build_args {
        command.arg("--build-arg").arg(format!("{key}={value}"));
    }
    for cache in &build.cache_from {
        command.arg("--cache-from").arg(cache);
    }
    command.arg(&context_dir);
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
    let _ = std::fs::remove_dir_all(&src);
    log.system(&format!("pushed {}@{digest}", build.image));
    Ok(Outcome { message: Some(format!("pushed {}", build.image)), image_digest: Some(digest), services: Vec::new() })
}

/// Logs the engine in to a registry, the password on standard input.
pub async fn login(ctx: &Context, log: &JobLog, auth: &RegistryAuth) -> Result<(), JobError> {
    ctx.masker.add(auth.password.expose());
    let mut command = ctx.engine_command();
    command.arg("login").arg("--username").arg(&auth.username).arg("--password-stdin").arg(&auth.server);
    run(log, "log in to the registry", command, Some(auth.password.expose())).await?;
    Ok(())
}

/// `docker push` prints `<tag>: digest: sha256:… size: …` last.
pub fn digest_from_push_output(output: &str) -> Option<String> {
    output.lines().rev().find_map(|line| {
        let rest = &line[line.find("digest: ")? + "digest: ".len()..];
        Some(rest.split_whitespace().next()?.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_from_docker_push() {
        let output = "The push refers to repository [r/a]\n5f70bf18a086: Pushed\n1: digest: sha256:abc size: 528\n";
        assert_eq!(digest_from_push_output(output).as_deref(), Some("sha256:abc"));
        assert_eq!(digest_from_push_output("nothing"), None);
    }
}
