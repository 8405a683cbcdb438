//! The preview half of an Environment's run, once every image is built: its preview VM (one for
//! the Environment's life, holding a slot of the CloudProvider's capacity), DEPLOY to its agent
//! (images by digest, the Project's secrets read when the command is sent, `on_start` hooks, a
//! pull-only registry credential), the route that follows, and the redeploy a Secret change
//! asks for. Teardown of the same, in [`teardown`].
//!
//! The choices are pure functions at the top ([`deploy_job_id`], [`exposed_port`],
//! [`preview_size`], …), tested below; the steps that carry them out follow.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use stagely_api::config::StagelyConfig;
use stagely_api::protocol::{
    self, GLOBAL_SCOPE, JobState, Message, Scope, ScopeKind, SecretKind, SecretValue, Sensitive, ServiceStatus,
};
use stagely_api::route::{Route, RouteStatus};
use stagely_api::v1alpha1::{
    CloudProvider as CloudProviderObject, DeploymentStatus, Environment, EnvironmentPhase, EnvironmentStatus, Platform,
    Project, SecretInjection, Size,
};

use super::{Context, Error};
use crate::controllers::capacity::Grant;
use crate::controllers::conditions::set_condition;
use crate::controllers::vm;
use crate::providers::account;
use crate::providers::{InstanceState, Role};

/// Condition: the preview VM runs and has an address.
pub const VM_READY: &str = "VMReady";
/// Condition: the preview VM's agent is connected.
pub const AGENT_CONNECTED: &str = "AgentConnected";
/// Condition: the app is deployed and healthy.
pub const DEPLOYED: &str = "Deployed";
/// Condition: the route serves the app.
pub const ROUTED: &str = super::apply::ROUTED;

/// Condition: the test stage passed against the current deployment.
pub const TESTED: &str = "Tested";
/// How long the whole test stage may take.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Secret edits closer together than this are deployed once, with the last values.
pub const SECRET_SETTLE: Duration = Duration::from_secs(2);
/// How long a deployment may run before the Environment fails as stuck.
pub const DEPLOY_STUCK: Duration = Duration::from_secs(30 * 60);
/// `Deployed` reason: the deployment outlasted [`DEPLOY_STUCK`].
pub const DEPLOY_STUCK_REASON: &str = "DeployStuck";
/// How long teardown waits for the agent to stop the app.
pub const TERMINATE_WAIT: Duration = Duration::from_secs(30);
/// Lifetime of the pull credential DEPLOY carries (the registry caps it at one hour).
const PULL_CREDENTIAL_TTL: Duration = Duration::from_secs(3600);

// ---- Decisions ----------------------------------------------------------------------------

/// The preview VM's size: stagely.yaml's `preview.size`, else the Environment's override, else
/// the Project's.
pub fn preview_size(config: &StagelyConfig, env: &Environment, project: &Project) -> Size {
    config
        .preview
        .size
        .or_else(|| env.spec.overrides.as_ref().and_then(|o| o.preview_size))
        .unwrap_or(project.spec.preview_size)
}

/// The preview VM's platform: amd64 when every built service has an amd64 image, else arm64.
pub fn preview_platform(status: &EnvironmentStatus) -> Platform {
    let builds = status.run.as_ref().map(|run| run.builds.as_slice()).unwrap_or_default();
    let services: std::collections::BTreeSet<&str> = builds.iter().map(|b| b.service.as_str()).collect();
    let amd64_everywhere = services
        .iter()
        .all(|service| builds.iter().any(|b| b.service == *service && b.platform == Platform::LinuxAmd64));
    if amd64_everywhere { Platform::LinuxAmd64 } else { Platform::LinuxArm64 }
}

/// The DEPLOY job of `uid` at `commit` with secrets `digest`: the same inputs give the same job
/// (which an agent answers from its record), new ones a new deployment.
pub fn deploy_job_id(uid: &str, commit: &str, digest: &str) -> String {
    format!("deploy-{uid}-{}-{}", &commit[..commit.len().min(12)], &digest[..digest.len().min(12)])
}

/// A digest of the secret values to deploy, keyed by `mac` (the operator's secret, see
/// [`TokenKeys::secrets_mac`](crate::gateway::token::TokenKeys::secrets_mac)): it changes when
/// any value, key or placement does, and reveals nothing testable about them.
pub fn secrets_digest(secrets: &[SecretValue], mut hasher: hmac::Hmac<sha2::Sha256>) -> String {
    use hmac::Mac;
    for secret in secrets {
        for part in [
            secret.key.as_str(),
            secret.value.expose(),
            secret.scope.as_str(),
            match secret.kind {
                SecretKind::Env => "env",
                SecretKind::File => "file",
            },
            secret.path.as_deref().unwrap_or(""),
        ] {
            hasher.update(&(part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
        hasher.update(&secret.mode.unwrap_or(0).to_le_bytes());
    }
    hasher.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// The secret values of the Project's `secretRefs`, from `secrets` by name; `Err` names the
/// missing Secrets.
pub fn secret_values(project: &Project, secrets: &BTreeMap<String, Secret>) -> Result<Vec<SecretValue>, Vec<String>> {
    let mut values = Vec::new();
    let mut missing = Vec::new();
    for reference in &project.spec.secret_refs {
        let Some(secret) = secrets.get(&reference.name) else {
            missing.push(reference.name.clone());
            continue;
        };
        let mut data: BTreeMap<String, String> = secret
            .data
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
            .collect();
        data.extend(secret.string_data.clone().unwrap_or_default());
        for (key, value) in data {
            values.push(SecretValue {
                key,
                value: Sensitive(value),
                scope: reference.service.clone().unwrap_or_else(|| GLOBAL_SCOPE.to_owned()),
                kind: match reference.type_ {
                    SecretInjection::Env => SecretKind::Env,
                    SecretInjection::File => SecretKind::File,
                },
                path: reference.path.clone(),
                mode: reference.mode.and_then(|m| u32::try_from(m).ok()),
            });
        }
    }
    if missing.is_empty() { Ok(values) } else { Err(missing) }
}

/// Which published port the URL serves: `expose` (service, container port) when stagely.yaml
/// names one, else the only port any service publishes. `Err` is a message naming the field.
pub fn exposed_port(expose: Option<(&str, u16)>, services: &[ServiceStatus]) -> Result<(String, u16), String> {
    if let Some((service, port)) = expose {
        let found = services.iter().find(|s| s.name == service);
        let Some(found) = found else {
            return Err(format!("preview.expose.service: {service} is not a service of the deployment"));
        };
        return found
            .ports
            .iter()
            .find(|p| p.container_port == port)
            .map(|p| (service.to_owned(), p.published_port))
            .ok_or_else(|| format!("preview.expose.port: service {service} does not publish container port {port}"));
    }
    let published: Vec<(&str, u16, u16)> = services
        .iter()
        .flat_map(|s| s.ports.iter().map(move |p| (s.name.as_str(), p.container_port, p.published_port)))
        .collect();
    match published.as_slice() {
        [(service, _, port)] => Ok(((*service).to_owned(), *port)),
        [] => Err("preview.expose: no service publishes a port; publish one in the compose file or set \
                   preview.expose"
            .to_owned()),
        many => Err(format!(
            "preview.expose: several ports are published ({}); say which one the URL serves with \
             preview.expose {{service, port}}",
            many.iter().map(|(s, c, _)| format!("{s}:{c}")).collect::<Vec<_>>().join(", ")
        )),
    }
}

/// The compose file DEPLOY runs.
pub fn compose_file(config: &StagelyConfig) -> String {
    config.preview.compose_file.clone()
}

/// stagely.yaml's `preview.expose`: (service, container port).
pub fn expose(config: &StagelyConfig) -> Option<(&str, u16)> {
    config.preview.expose.as_ref().map(|e| (e.service.as_str(), e.port))
}

/// The compose project of an Environment on its VM: `<namespace>-<name>`, so that previews of
/// two namespaces sharing one host (the `local` provider's) never share containers.
pub fn compose_project(env: &Environment) -> String {
    format!("{}-{}", env.namespace().unwrap_or_default(), env.name_any())
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c.to_ascii_lowercase() } else { '-' })
        .collect()
}

/// The gateway scope of an Environment's preview agent.
pub fn scope(env: &Environment) -> Scope {
    Scope {
        kind: ScopeKind::Environment,
        namespace: env.namespace().unwrap_or_default(),
        name: env.name_any(),
        uid: env.uid().unwrap_or_default(),
    }
}

// ---- Steps --------------------------------------------------------------------------------

/// What the preview step asks of the reconcile.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Look again after this long, without waiting for an event.
    pub requeue: Option<Duration>,
}

impl Outcome {
    fn after(duration: Duration) -> Self {
        Self { requeue: Some(duration) }
    }
}

/// What the preview step reads besides the Environment.
pub struct Inputs<'a> {
    /// The Project.
    pub project: &'a Project,
    /// Its CloudProvider.
    pub provider: Option<&'a CloudProviderObject>,
    /// stagely.yaml at the run's commit.
    pub config: &'a StagelyConfig,
}

async fn write_route(
    env: &Environment,
    status: &mut EnvironmentStatus,
    ctx: &Context,
    route_status: RouteStatus,
    backend: Option<(String, u16)>,
    project: &Project,
) -> bool {
    let route = Route {
        status: route_status,
        ip: backend.as_ref().map(|(ip, _)| ip.clone()),
        port: backend.as_ref().map(|(_, port)| *port),
        project: project.name_any(),
        namespace: env.namespace().unwrap_or_default(),
        environment: env.name_any(),
        pr: u64::try_from(env.spec.pull_request.number).unwrap_or_default(),
    };
    record_route(env, status, ctx, &route).await
}

/// Writes `route` to Redis and says so on the `Routed` condition; `false` when it could not be
/// written (or there is no Redis), so the Environment does not go Ready without it.
pub(super) async fn record_route(
    env: &Environment,
    status: &mut EnvironmentStatus,
    ctx: &Context,
    route: &Route,
) -> bool {
    let (Some(routes), Some(hash)) = (&ctx.routes, status.subdomain_hash.clone()) else { return false };
    let route_status = route.status;
    let url = status.url.clone().unwrap_or_default();
    let now = Timestamp::now();
    match routes.write(&hash, route).await {
        Ok(()) if route_status == RouteStatus::Ready => {
            set_condition(
                &mut status.conditions,
                ROUTED,
                true,
                "Serving",
                &format!("{url} serves the app"),
                env.metadata.generation,
                now,
            );
            true
        }
        Ok(()) => {
            set_condition(
                &mut status.conditions,
                ROUTED,
                false,
                "NotServing",
                &format!("{url} shows the {route_status:?} page until the preview is ready"),
                env.metadata.generation,
                now,
            );
            true
        }
        Err(err) => {
            set_condition(
                &mut status.conditions,
                ROUTED,
                false,
                "RedisUnavailable",
                &format!("the route of {url} could not be written; retrying: {err}"),
                env.metadata.generation,
                now,
            );
            false
        }
    }
}

/// Advances the preview: VM, agent, DEPLOY, route. Writes what it finds into `status`.
pub async fn advance(
    env: &Environment,
    status: &mut EnvironmentStatus,
    inputs: &Inputs<'_>,
    ctx: &Context,
) -> Result<Outcome, Error> {
    let Some(preview) = &ctx.preview else { return Ok(Outcome::default()) };
    let namespace = env.namespace().unwrap_or_default();
    let name = env.name_any();
    let generation = env.metadata.generation;
    let now = Timestamp::now();
    let uid = env.uid().unwrap_or_default();
    let project = inputs.project;
    let fail = |status: &mut EnvironmentStatus, type_: &str, reason: &str, message: &str| {
        set_condition(&mut status.conditions, type_, false, reason, message, generation, now);
    };

    // The CloudProvider, connected.
    let Some(provider_object) = inputs.provider else {
        let message = format!("CloudProvider {} not found in {namespace}", project.spec.cloud_provider_ref.name);
        fail(status, VM_READY, "CloudProviderNotFound", &message);
        return Ok(Outcome::after(Duration::from_secs(15)));
    };
    let key = format!("{namespace}/{}", provider_object.name_any());
    let cloud = match account::connect(&ctx.client, provider_object, &preview.endpoints).await {
        Ok(cloud) => cloud,
        Err(err) => {
            fail(status, VM_READY, err.reason(), &format!("CloudProvider {key} cannot be used: {err}"));
            return Ok(Outcome::after(Duration::from_secs(15)));
        }
    };

    // The preview VM: one for the Environment's life, behind the provider's capacity.
    let size = preview_size(inputs.config, env, project);
    let instance_id = status.vm.as_ref().and_then(|vm| vm.provider_id.clone());
    if instance_id.is_none() && provider_object.metadata.deletion_timestamp.is_some() {
        let message = format!("CloudProvider {key} is being deleted: no new VM is started through it");
        fail(status, VM_READY, "CloudProviderDeleting", &message);
        return Ok(Outcome::after(Duration::from_secs(60)));
    }
    let instance = match instance_id {
        None => {
            let max = usize::try_from(provider_object.spec.max_instances.max(1)).unwrap_or(1);
            let since = env.metadata.creation_timestamp.as_ref().map_or(now, |t| t.0);
            if let Grant::Waiting { in_use, max, ahead } = preview.capacity.acquire(&key, &uid, since, max) {
                let mut message = format!("waiting for an instance: {in_use} of {max} in use");
                if ahead > 0 {
                    message.push_str(&format!(", {ahead} ahead"));
                }
                fail(status, VM_READY, "WaitingForCapacity", &message);
                write_route(env, status, ctx, RouteStatus::Deploying, None, project).await;
                return Ok(Outcome::default());
            }
            let spec = vm::instance_spec(
                &preview.gateway,
                &preview.agents,
                provider_object,
                Role::Preview,
                &scope(env),
                size,
                preview_platform(status),
            );
            let spec = match spec {
                Ok(spec) => spec,
                Err(err) => {
                    fail(status, VM_READY, "VMRequestInvalid", &err.to_string());
                    return Ok(Outcome::after(Duration::from_secs(60)));
                }
            };
            match cloud.create(&spec).await {
                Ok(instance) => {
                    tracing::info!(%namespace, %name, instance = %instance.id, "created the preview VM");
                    status.vm = Some(vm::vm_status(&instance, size));
                    super::event(ctx, env, false, "VMCreated", format!("preview VM {} created ({size})", instance.id))
                        .await;
                    instance
                }
                Err(err) => {
                    fail(
                        status,
                        VM_READY,
                        account::provider_reason(&err),
                        &format!("failed to create the preview VM: {err}"),
                    );
                    return Ok(Outcome::after(Duration::from_secs(15)));
                }
            }
        }
        Some(id) => {
            preview.capacity.hold(&key, &uid);
            match cloud.get(&id).await {
                Ok(Some(instance)) => instance,
                Ok(None) => {
                    return Ok(vm_lost(env, status, ctx, project, &format!("preview VM {id} is gone")).await);
                }
                Err(err) => {
                    fail(
                        status,
                        VM_READY,
                        account::provider_reason(&err),
                        &format!("failed to look at preview VM {id}: {err}"),
                    );
                    return Ok(Outcome::after(Duration::from_secs(15)));
                }
            }
        }
    };
    match instance.state {
        InstanceState::Terminated | InstanceState::Stopping => {
            let message =
                format!("preview VM {} stopped unexpectedly (state {})", instance.id, vm::state_name(&instance.state));
            status.vm = Some(vm::vm_status(&instance, size));
            return Ok(vm_lost(env, status, ctx, project, &message).await);
        }
        _ if !instance.ready() => {
            status.vm = Some(vm::vm_status(&instance, size));
            fail(status, VM_READY, "Booting", &format!("preview VM {} is starting", instance.id));
            write_route(env, status, ctx, RouteStatus::Deploying, None, project).await;
            return Ok(Outcome::after(Duration::from_secs(2)));
        }
        _ => {}
    }
    status.vm = Some(vm::vm_status(&instance, size));
    let ip = instance.public_ip.map(|ip| ip.to_string()).unwrap_or_default();
    set_condition(
        &mut status.conditions,
        VM_READY,
        true,
        "Running",
        &format!("preview VM {} runs at {ip}", instance.id),
        generation,
        now,
    );
    let agent_scope = scope(env);
    let connected = preview.gateway.is_connected(&agent_scope);
    if connected {
        set_condition(
            &mut status.conditions,
            AGENT_CONNECTED,
            true,
            "Connected",
            "the preview agent is connected",
            generation,
            now,
        );
    } else {
        let launched = instance.launched_at.and_then(|t| t.elapsed().ok()).unwrap_or_default();
        if status.deployment.is_none() && launched > preview.agent_connect {
            let message = format!(
                "the agent on preview VM {} did not connect within {}s",
                instance.id,
                preview.agent_connect.as_secs()
            );
            fail(status, AGENT_CONNECTED, "AgentNeverConnected", &message);
            fail(status, DEPLOYED, "AgentNeverConnected", &message);
            status.phase = Some(EnvironmentPhase::Failed);
            write_route(env, status, ctx, RouteStatus::Failed, None, project).await;
            return Ok(Outcome::default());
        }
        fail(
            status,
            AGENT_CONNECTED,
            "Waiting",
            &format!("waiting for the agent on preview VM {} to connect", instance.id),
        );
    }

    // The secrets, read now: a changed value deploys again.
    let secrets_api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut secrets = BTreeMap::new();
    for reference in &project.spec.secret_refs {
        if secrets.contains_key(&reference.name) {
            continue;
        }
        let found = secrets_api.get_opt(&reference.name).await.map_err(|source| Error::Kube {
            action: "read a Secret of the Project",
            namespace: namespace.clone(),
            name: name.clone(),
            source,
        })?;
        if let Some(secret) = found {
            secrets.insert(reference.name.clone(), secret);
        }
    }
    let values = match secret_values(project, &secrets) {
        Ok(values) => values,
        Err(missing) => {
            let message = format!(
                "Secret{} {} of Project {} not found in {namespace}",
                if missing.len() == 1 { "" } else { "s" },
                missing.join(", "),
                project.name_any()
            );
            fail(status, DEPLOYED, "SecretNotFound", &message);
            if status.deployment.is_none() {
                write_route(env, status, ctx, RouteStatus::Deploying, None, project).await;
            }
            return Ok(Outcome::after(Duration::from_secs(30)));
        }
    };
    let digest = secrets_digest(&values, preview.gateway.tokens().secrets_mac());
    let commit = status.run.as_ref().map(|run| run.sha.clone()).unwrap_or_default();
    let job_id = deploy_job_id(&uid, &commit, &digest);

    let current = status.deployment.clone();
    let new_deployment = current.as_ref().is_none_or(|d| d.job_id != job_id);
    // A deployment whose end is written in the status needs no follower any more (one per
    // Environment would otherwise be kept, with its last STATUS, for the preview's whole life).
    if let Some(recorded) = &current
        && matches!(recorded.state.as_deref(), Some("succeeded" | "failed"))
    {
        preview.followers.stop(&recorded.job_id);
    }
    // After an operator restart nothing follows the job: DEPLOY again with the same id, which the
    // agent answers from its record (or runs, if it never got it).
    let lost_track = !new_deployment
        && current.as_ref().is_some_and(|d| d.state.as_deref() == Some("running"))
        && !preview.followers.following(&job_id);
    if new_deployment && let Some(previous) = &current {
        // Wait for a deployment in flight to end, and for secret edits to settle.
        let in_flight = previous.state.as_deref() == Some("running")
            && preview.followers.following(&previous.job_id)
            && preview.followers.latest(&previous.job_id).is_none_or(|s| !s.state.is_final());
        if in_flight {
            return Ok(Outcome::after(Duration::from_secs(5)));
        }
        if previous.commit == commit
            && let Some(wait) = preview.settle(&uid, &digest)
        {
            return Ok(Outcome::after(wait));
        }
    }
    if new_deployment || lost_track {
        let images = status.run.as_ref().map(|run| run.images.clone()).unwrap_or_default();
        let registry_auth = match &ctx.registry {
            Some(registry) => {
                let repositories: Vec<String> = images
                    .values()
                    .filter_map(|image| {
                        let path = image.strip_prefix(&format!("{}/", registry.host()))?;
                        Some(path.split('@').next()?.to_owned())
                    })
                    .collect();
                registry.pull_credential(&repositories, PULL_CREDENTIAL_TTL).unwrap_or_else(|err| {
                    tracing::warn!(%namespace, %name, error = %err, "cannot mint the pull credential");
                    None
                })
            }
            None => None,
        };
        let git_token = match crate::controllers::clone_token(&ctx.client, project, ctx.github.as_deref()).await {
            Ok(token) => token,
            Err(err) => {
                // The agent fetches the compose file with it: wait for GitHub rather than fail.
                tracing::warn!(%namespace, %name, error = %err, "no GitHub clone token for DEPLOY; retrying");
                return Ok(Outcome::after(err.retry_after().unwrap_or(Duration::from_secs(30))));
            }
        };
        let deploy = Message::Deploy(protocol::Deploy {
            job_id: job_id.clone(),
            project: compose_project(env),
            clone_url: project.spec.clone_url(),
            git_token,
            commit: commit.clone(),
            compose_file: compose_file(inputs.config),
            images,
            secrets: values,
            lifecycle: protocol::Lifecycle {
                on_start: inputs
                    .config
                    .preview
                    .lifecycle
                    .on_start
                    .iter()
                    .map(|hook| protocol::Hook { service: hook.service.clone(), command: hook.command.clone() })
                    .collect(),
            },
            registry_auth,
        });
        let job = preview.gateway.send(&agent_scope, deploy).map_err(|err| Error::Gateway {
            namespace: namespace.clone(),
            name: name.clone(),
            message: err.to_string(),
        })?;
        preview.followers.follow(ObjectRef::from_obj(env), job);
        if new_deployment {
            status.deployment = Some(DeploymentStatus {
                job_id: job_id.clone(),
                commit: commit.clone(),
                secrets_digest: digest,
                state: Some("running".into()),
                service: None,
                port: None,
                started_at: Some(Time(now)),
                tests: None,
            });
            let what = match &current {
                Some(previous) if previous.commit == commit => "redeploying with changed secrets",
                Some(_) => "deploying a new commit",
                None => "deploying",
            };
            super::event(ctx, env, false, "DeploySent", format!("{what} ({job_id})")).await;
        }
    }

    // Follow the deployment.
    let mut deployment = status.deployment.clone().unwrap_or_default();
    let latest = match deployment.state.as_deref() {
        Some("running") => preview.followers.latest(&job_id),
        _ => None,
    };
    if let Some(latest) = &latest
        && latest.state.is_final()
    {
        deployment.state = Some(if latest.state == JobState::Succeeded { "succeeded" } else { "failed" }.into());
        if latest.state == JobState::Succeeded {
            match exposed_port(expose(inputs.config), &latest.services) {
                Ok((service, port)) => {
                    deployment.service = Some(service);
                    deployment.port = Some(i32::from(port));
                }
                Err(message) => {
                    deployment.state = Some("failed".into());
                    fail(status, super::plan::CONFIG_VALID, "ExposeInvalid", &message);
                    fail(status, DEPLOYED, "ExposeInvalid", &message);
                }
            }
        } else {
            let message = latest.message.clone().unwrap_or_else(|| "the deployment failed".into());
            fail(status, DEPLOYED, "DeployFailed", &message);
        }
        status.deployment = Some(deployment.clone());
    }
    match deployment.state.as_deref() {
        Some("succeeded") => {
            let port = deployment.port.and_then(|p| u16::try_from(p).ok()).unwrap_or_default();
            let service = deployment.service.clone().unwrap_or_default();
            set_condition(
                &mut status.conditions,
                DEPLOYED,
                true,
                "Healthy",
                &format!(
                    "{} deployed at {}; the URL serves {service} on port {port}",
                    &commit[..commit.len().min(7)],
                    ip
                ),
                generation,
                now,
            );
            if !write_route(env, status, ctx, RouteStatus::Ready, Some((ip, port)), project).await {
                return Ok(Outcome::after(Duration::from_secs(5)));
            }
            status.phase = Some(EnvironmentPhase::Ready);
            if let Some(run) = &mut status.run
                && run.ready_at.is_none()
            {
                run.ready_at = Some(Time(now));
            }
            match inputs.config.test.as_ref().filter(|t| t.enabled) {
                Some(tests) => Ok(run_tests(env, status, tests, port, ctx).await),
                None => {
                    status.conditions.retain(|c| c.type_ != TESTED);
                    Ok(Outcome::default())
                }
            }
        }
        Some("failed") => {
            status.phase = Some(EnvironmentPhase::Failed);
            write_route(env, status, ctx, RouteStatus::Failed, None, project).await;
            Ok(Outcome::default())
        }
        _ => {
            let detail = latest.and_then(|s| s.message).map(|m| format!(": {m}")).unwrap_or_default();
            // A deployment that outlasts any reasonable `compose up` is stuck, not slow: the run
            // fails and says so rather than hanging. A late success still makes it Ready.
            let running_for = deployment
                .started_at
                .as_ref()
                .and_then(|t| Duration::try_from(now.duration_since(t.0)).ok())
                .unwrap_or_default();
            if running_for > DEPLOY_STUCK {
                let message = format!(
                    "deployment {} has not finished after {}{detail}",
                    deployment.job_id,
                    crate::controllers::buildjob::plan::human(DEPLOY_STUCK)
                );
                fail(status, DEPLOYED, DEPLOY_STUCK_REASON, &message);
                status.phase = Some(EnvironmentPhase::Failed);
                write_route(env, status, ctx, RouteStatus::Failed, None, project).await;
                return Ok(Outcome::default());
            }
            fail(status, DEPLOYED, "Deploying", &format!("deploying {}{detail}", deployment.job_id));
            write_route(env, status, ctx, RouteStatus::Deploying, None, project).await;
            Ok(Outcome::default())
        }
    }
}

/// The test stage: once per deployment, TEST to the preview agent with `STAGELY_PREVIEW_URL`
/// where the app answers on the VM; the result is the `Tested` condition. A failing test leaves
/// the preview up.
async fn run_tests(
    env: &Environment,
    status: &mut EnvironmentStatus,
    tests: &stagely_api::config::TestSpec,
    port: u16,
    ctx: &Context,
) -> Outcome {
    let Some(preview) = &ctx.preview else { return Outcome::default() };
    let Some(mut deployment) = status.deployment.clone() else { return Outcome::default() };
    let generation = env.metadata.generation;
    let now = Timestamp::now();
    let job_id = format!("test-{}", deployment.job_id.trim_start_matches("deploy-"));
    let agent_scope = scope(env);
    let set = |status: &mut EnvironmentStatus, ok: bool, reason: &str, message: &str| {
        set_condition(&mut status.conditions, TESTED, ok, reason, message, generation, now);
    };
    let state = deployment.tests.clone();
    if matches!(state.as_deref(), Some("succeeded" | "failed")) {
        preview.followers.stop(&job_id);
    }
    let lost_track = state.as_deref() == Some("running") && !preview.followers.following(&job_id);
    if state.is_none() || lost_track {
        // An agent older than the TEST command would never answer it: say so instead.
        match preview.gateway.capabilities(&agent_scope) {
            None => {
                set(status, false, "Waiting", "waiting for the preview agent to connect to run the tests");
                return Outcome::after(Duration::from_secs(5));
            }
            Some(capabilities) if !capabilities.iter().any(|c| c == protocol::CAPABILITY_TEST) => {
                deployment.tests = Some("failed".into());
                status.deployment = Some(deployment);
                set(
                    status,
                    false,
                    "AgentTooOld",
                    "the preview VM's agent cannot run tests (it predates the TEST command);                      a new preview VM gets a current agent",
                );
                return Outcome::default();
            }
            Some(_) => {}
        }
        let run = Message::Test(protocol::TestRun {
            job_id: job_id.clone(),
            image: tests.image.clone().unwrap_or_default(),
            commands: tests.commands.clone(),
            preview_url: format!("http://127.0.0.1:{port}"),
            timeout_seconds: TEST_TIMEOUT.as_secs(),
            registry_auth: test_credential(tests.image.as_deref().unwrap_or_default(), ctx),
        });
        match preview.gateway.send(&agent_scope, run) {
            Ok(job) => preview.followers.follow(ObjectRef::from_obj(env), job),
            Err(err) => {
                set(status, false, "TestNotSent", &format!("the tests could not be sent to the preview agent: {err}"));
                return Outcome::after(Duration::from_secs(15));
            }
        }
        deployment.tests = Some("running".into());
        status.deployment = Some(deployment.clone());
        set(status, false, "Running", &format!("running {} test command(s) against the preview", tests.commands.len()));
        return Outcome::default();
    }
    if state.as_deref() == Some("running")
        && let Some(latest) = preview.followers.latest(&job_id).filter(|s| s.state.is_final())
    {
        if latest.state == JobState::Succeeded {
            deployment.tests = Some("succeeded".into());
            set(status, true, "Passed", &format!("{} test command(s) passed", tests.commands.len()));
        } else {
            deployment.tests = Some("failed".into());
            let message = latest.message.unwrap_or_else(|| "the tests failed".into());
            set(status, false, "TestFailed", &message);
        }
        status.deployment = Some(deployment);
    }
    Outcome::default()
}

/// A pull credential for a test image kept in Stagely's own registry.
fn test_credential(image: &str, ctx: &Context) -> Option<protocol::RegistryAuth> {
    let registry = ctx.registry.as_ref()?;
    let path = image.strip_prefix(&format!("{}/", registry.host()))?;
    let repository = path.split(['@']).next()?.rsplit_once(':').map_or(path, |(name, _)| name);
    registry.pull_credential(&[repository.to_owned()], PULL_CREDENTIAL_TTL).ok().flatten()
}

async fn vm_lost(
    env: &Environment,
    status: &mut EnvironmentStatus,
    ctx: &Context,
    project: &Project,
    message: &str,
) -> Outcome {
    let now = Timestamp::now();
    set_condition(&mut status.conditions, VM_READY, false, "VMStopped", message, env.metadata.generation, now);
    status.phase = Some(EnvironmentPhase::Failed);
    write_route(env, status, ctx, RouteStatus::Failed, None, project).await;
    Outcome::default()
}

/// Tears the preview down: TERMINATE to its agent (bounded; an agent that is gone does not
/// block), the VM terminated (by id and by tag), its capacity slot released, the
/// environment's registry tags deleted. Returns what could not be cleaned up.
pub async fn teardown(env: &Environment, ctx: &Context, provider: Option<&CloudProviderObject>) -> Vec<String> {
    let mut leftovers = Vec::new();
    let namespace = env.namespace().unwrap_or_default();
    let name = env.name_any();
    let uid = env.uid().unwrap_or_default();
    let status = env.status.clone().unwrap_or_default();
    if let Some(preview) = &ctx.preview {
        let agent_scope = scope(env);
        if status.vm.is_some() && preview.gateway.is_connected(&agent_scope) {
            let terminate = Message::Terminate(protocol::Terminate {
                job_id: format!("terminate-{uid}"),
                reason: "environment deleted".into(),
                grace_period_seconds: 10,
            });
            match tokio::time::timeout(TERMINATE_WAIT, preview.gateway.command(&agent_scope, terminate)).await {
                Ok(Ok(result)) if result.state == JobState::Succeeded => {}
                Ok(Ok(result)) => {
                    tracing::warn!(%namespace, %name, message = ?result.message, "TERMINATE failed; stopping the VM anyway")
                }
                Ok(Err(err)) => {
                    tracing::warn!(%namespace, %name, error = %err, "TERMINATE failed; stopping the VM anyway")
                }
                Err(_) => {
                    tracing::warn!(%namespace, %name, "the agent did not stop the app in time; stopping the VM anyway")
                }
            }
        }
        preview.gateway.forget(&agent_scope);
        preview.followers.stop_prefix(&format!("deploy-{uid}"));
        preview.followers.stop_prefix(&format!("test-{uid}"));
        match provider {
            Some(object) => match account::connect(&ctx.client, object, &preview.endpoints).await {
                Ok(cloud) => {
                    let id = status.vm.as_ref().and_then(|vm| vm.provider_id.clone());
                    let by_id = match &id {
                        Some(id) => match cloud.terminate(id).await {
                            Ok(()) => {
                                let note = format!("preview VM {id} terminated");
                                super::event(ctx, env, false, "VMTerminated", note).await;
                                None
                            }
                            Err(err) => Some(format!("preview VM {id}: {err}")),
                        },
                        None => None,
                    };
                    leftovers.extend(by_id);
                    if let Err(err) = vm::terminate_all(cloud.as_ref(), &uid).await {
                        leftovers.push(format!("VMs tagged with {uid}: {err}"));
                    }
                    if leftovers.is_empty() {
                        preview.capacity.release(&format!("{namespace}/{}", object.name_any()), &uid);
                    }
                }
                Err(err) => leftovers.push(format!("CloudProvider {}: {err}", object.name_any())),
            },
            None if status.vm.is_some() => {
                leftovers.push("the preview VM: its CloudProvider is gone (left to the orphan sweep)".into());
            }
            None => {}
        }
    }
    if let Some(registry) = &ctx.registry {
        for tag in &status.registry_tags {
            let Some((repository, reference)) = tag.rsplit_once(':') else { continue };
            if let Err(err) = registry.delete(repository, reference).await {
                leftovers.push(format!("registry tag {tag}: {err}"));
            }
        }
    }
    leftovers
}

/// Secret-change settling: remembers when each environment first saw a secrets digest.
#[derive(Default)]
pub struct Settling(std::sync::Mutex<std::collections::HashMap<String, (String, Instant)>>);

impl Settling {
    /// `None` once `digest` has been seen for [`SECRET_SETTLE`]; else how long to wait.
    pub fn check(&self, uid: &str, digest: &str) -> Option<Duration> {
        let mut seen = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let entry = seen.entry(uid.to_owned()).or_insert_with(|| (digest.to_owned(), Instant::now()));
        if entry.0 != digest {
            *entry = (digest.to_owned(), Instant::now());
        }
        let waited = entry.1.elapsed();
        if waited >= SECRET_SETTLE {
            seen.remove(uid);
            None
        } else {
            Some(SECRET_SETTLE - waited)
        }
    }
}

/// What the preview step needs that builds do not.
pub struct Preview {
    /// The agent gateway.
    pub gateway: crate::gateway::Gateway,
    /// Where the clouds are.
    pub endpoints: account::Endpoints,
    /// How VMs find the gateway and their agent.
    pub agents: vm::AgentSettings,
    /// VM capacity shared with the BuildJob controller.
    pub capacity: Arc<crate::controllers::capacity::Capacity>,
    /// How long a new preview VM's agent has to connect.
    pub agent_connect: Duration,
    pub(super) followers: crate::controllers::follow::Followers<Environment>,
    settling: Settling,
}

impl Preview {
    /// The preview machinery; DEPLOY updates wake reconciles through `wake`; `followed` counts
    /// the jobs followed.
    pub fn new(
        gateway: crate::gateway::Gateway,
        endpoints: account::Endpoints,
        agents: vm::AgentSettings,
        capacity: Arc<crate::controllers::capacity::Capacity>,
        agent_connect: Duration,
        wake: tokio::sync::mpsc::UnboundedSender<ObjectRef<Environment>>,
        followed: prometheus_client::metrics::gauge::Gauge,
    ) -> Self {
        Self {
            gateway,
            endpoints,
            agents,
            capacity,
            agent_connect,
            followers: crate::controllers::follow::Followers::new(wake, followed),
            settling: Settling::default(),
        }
    }

    fn settle(&self, uid: &str, digest: &str) -> Option<Duration> {
        self.settling.check(uid, digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compose_projects_differ_across_namespaces_and_are_valid_names() {
        let env = |namespace: &str, name: &str| {
            let mut env = Environment::new(
                name,
                serde_json::from_value(serde_json::json!({
                    "projectRef": {"name": "shop"},
                    "pullRequest": {"number": 1, "headSha": "abc", "headRef": "f", "baseRef": "main"},
                }))
                .unwrap(),
            );
            env.metadata.namespace = Some(namespace.into());
            env
        };
        assert_eq!(compose_project(&env("team-a", "shop-pr-1")), "team-a-shop-pr-1");
        assert_ne!(compose_project(&env("team-a", "shop-pr-1")), compose_project(&env("team-b", "shop-pr-1")));
        assert_eq!(compose_project(&env("team-a", "Shop.PR.1")), "team-a-shop-pr-1");
    }
    use stagely_api::protocol::PortMapping;

    fn service(name: &str, ports: &[(u16, u16)]) -> ServiceStatus {
        ServiceStatus {
            name: name.into(),
            state: "running".into(),
            health: None,
            ports: ports
                .iter()
                .map(|(c, p)| PortMapping { container_port: *c, published_port: *p, protocol: "tcp".into() })
                .collect(),
        }
    }

    #[test]
    fn the_only_published_port_is_served() {
        let services = [service("web", &[(8080, 32001)]), service("worker", &[])];
        assert_eq!(exposed_port(None, &services), Ok(("web".into(), 32001)));
    }

    #[test]
    fn several_or_no_ports_need_preview_expose() {
        let services = [service("web", &[(8080, 32001)]), service("admin", &[(9000, 32002)])];
        let err = exposed_port(None, &services).unwrap_err();
        assert!(err.starts_with("preview.expose: several ports are published (web:8080, admin:9000)"), "{err}");
        assert_eq!(exposed_port(Some(("admin", 9000)), &services), Ok(("admin".into(), 32002)));
        let err = exposed_port(None, &[service("worker", &[])]).unwrap_err();
        assert!(err.starts_with("preview.expose: no service publishes a port"), "{err}");
        let err = exposed_port(Some(("web", 9999)), &services).unwrap_err();
        assert!(err.starts_with("preview.expose.port:"), "{err}");
        let err = exposed_port(Some(("api", 80)), &services).unwrap_err();
        assert!(err.starts_with("preview.expose.service:"), "{err}");
    }

    #[test]
    fn deploy_jobs_change_with_the_commit_and_the_secrets_only() {
        let secret = |value: &str| SecretValue {
            key: "DATABASE_URL".into(),
            value: Sensitive(value.into()),
            scope: GLOBAL_SCOPE.into(),
            kind: SecretKind::Env,
            path: None,
            mode: None,
        };
        let keys = crate::gateway::token::TokenKeys::new(
            &crate::gateway::token::SigningKey::generate().unwrap(),
            std::time::Duration::ZERO,
        );
        let digest = |secrets: &[SecretValue]| secrets_digest(secrets, keys.secrets_mac());
        let a = digest(&[secret("one")]);
        assert_eq!(a, digest(&[secret("one")]));
        assert_ne!(a, digest(&[secret("two")]));
        assert!(!a.contains("one"));
        // Keyed: the plain SHA-256 of the same input, which anyone could compute from a guess,
        // is not what is shown; another operator key gives another digest.
        let other = crate::gateway::token::TokenKeys::new(
            &crate::gateway::token::SigningKey::generate().unwrap(),
            std::time::Duration::ZERO,
        );
        assert_ne!(a, secrets_digest(&[secret("one")], other.secrets_mac()));
        let sha = "9f2c1e0b7a6d5c4b3a29180f7e6d5c4b3a291807";
        assert_eq!(deploy_job_id("uid", sha, &a), deploy_job_id("uid", sha, &a));
        assert_ne!(deploy_job_id("uid", sha, &a), deploy_job_id("uid", sha, &digest(&[secret("two")])));
        assert_ne!(deploy_job_id("uid", sha, &a), deploy_job_id("uid", &"1".repeat(40), &a));
    }

    #[test]
    fn secret_edits_settle_before_a_redeploy() {
        let settling = Settling::default();
        assert!(settling.check("env", "a").is_some(), "a new digest waits");
        assert!(settling.check("env", "b").is_some(), "another edit starts the wait again");
    }

    #[test]
    fn previews_run_on_amd64_unless_a_service_lacks_it() {
        use stagely_api::v1alpha1::{RunBuild, RunStatus};
        let build = |service: &str, platform| RunBuild {
            build_job: String::new(),
            service: service.into(),
            platform,
            phase: None,
            image: None,
            started_at: None,
            finished_at: None,
        };
        let mut status = EnvironmentStatus {
            run: Some(RunStatus {
                builds: vec![build("web", Platform::LinuxAmd64), build("web", Platform::LinuxArm64)],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(preview_platform(&status), Platform::LinuxAmd64);
        status.run.as_mut().unwrap().builds.push(build("api", Platform::LinuxArm64));
        assert_eq!(preview_platform(&status), Platform::LinuxArm64);
    }
}
