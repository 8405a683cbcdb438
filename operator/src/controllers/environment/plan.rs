//! What the Environment controller decides, as one pure function: from the Environment, its
//! Project and CloudProvider, its stagely.yaml and its BuildJobs as observed, to the actions to
//! take and the status to write. Nothing here touches the cluster, Redis or the registry, so the
//! whole decision table is tested below without them.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};
use stagely_api::config::StagelyConfig;
use stagely_api::keys;
use stagely_api::names::{MAX_NAME, fit, label_value};
use stagely_api::route::{Route, RouteStatus};
use stagely_api::v1alpha1::{
    BuildJob, BuildJobPhase, BuildJobSpec, CloudProvider, Environment, EnvironmentPhase, EnvironmentStatus, Project,
    RunBuild, RunStatus,
};

use crate::controllers::buildjob::plan::human;
use crate::controllers::conditions::set_condition;

/// Condition: stagely.yaml was read and is valid at the run's commit.
pub const CONFIG_VALID: &str = "ConfigValid";
/// Condition: every build of the run succeeded.
pub const BUILDS_SUCCEEDED: &str = "BuildsSucceeded";
/// `BuildsSucceeded` reason: the run outlasted its builds' timeouts (see [`BUILD_STUCK_MARGIN`]).
pub const BUILD_STUCK: &str = "BuildStuck";
/// Condition, only while an Environment is being deleted: what its teardown still waits for.
pub const CLEANED_UP: &str = "CleanedUp";

/// How much longer than its longest build timeout a run may stay Building (waiting in the
/// CloudProvider's queue, starting builder VMs, agents connecting) before it fails as stuck.
pub const BUILD_STUCK_MARGIN: Duration = Duration::from_secs(30 * 60);

/// Registry tags remembered for teardown; the oldest beyond this are left to the registry's
/// garbage collection.
const MAX_REGISTRY_TAGS: usize = 200;

/// Lines of a failed build's message carried into the Environment's condition.
const LOG_TAIL_LINES: usize = 20;

/// The stagely.yaml of the run's commit, as far as the controller got reading it.
#[derive(Clone, Copy, Debug)]
pub enum ConfigState<'a> {
    /// Read and valid.
    Loaded(&'a StagelyConfig),
    /// Could not be used; `permanent` problems wait for a new commit, others are retried.
    Problem {
        /// The condition reason, e.g. `ConfigInvalid`.
        reason: &'a str,
        /// What the user reads.
        message: &'a str,
        /// Whether only a new commit can fix it.
        permanent: bool,
    },
}

/// What the controller observed for one Environment.
#[derive(Clone, Copy, Debug)]
pub struct Observed<'a> {
    /// The Environment.
    pub environment: &'a Environment,
    /// Its Project, if it exists.
    pub project: Option<&'a Project>,
    /// The Project's CloudProvider, if it exists.
    pub provider: Option<&'a CloudProvider>,
    /// stagely.yaml at the head commit; `None` before the Project is known.
    pub config: Option<ConfigState<'a>>,
    /// The BuildJobs the Environment owns.
    pub jobs: &'a [BuildJob],
    /// The registry host images are pushed to, if the operator has one.
    pub registry: Option<&'a str>,
    /// A fresh subdomain hash, used only if the Environment has none yet.
    pub new_hash: &'a str,
    /// Now.
    pub now: Timestamp,
}

/// Something the reconcile must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Create this BuildJob (server-side apply: creating it twice is harmless).
    CreateBuildJob(Box<BuildJob>),
    /// Delete the BuildJob of that name (a superseded run's); its finalizer stops its VM.
    DeleteBuildJob(String),
    /// Stop the BuildJob of that name, with this reason (a sibling failed).
    CancelBuildJob {
        /// The BuildJob.
        name: String,
        /// Shown in its status.
        reason: String,
    },
    /// Tag the run's per-platform images of `service` as one image index; its digest becomes
    /// the service's image.
    MergeIndex {
        /// The service.
        service: String,
        /// Registry repository, `<namespace>/<project>/<service>`.
        repository: String,
        /// Tag of the index: the commit.
        tag: String,
        /// The per-platform manifests, by digest.
        manifests: Vec<(stagely_api::v1alpha1::Platform, String)>,
    },
    /// Write the route record (and publish it).
    WriteRoute(Route),
}

/// The decision: what to do, and the status to write once it is done.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// What to do, in order.
    pub actions: Vec<Action>,
    /// The status to write.
    pub status: EnvironmentStatus,
    /// Whether to look again later without a watch event (a transient problem).
    pub retry: bool,
}

/// Decides what to do for the Environment in `observed`.
pub fn plan(observed: &Observed<'_>) -> Plan {
    let env = observed.environment;
    let generation = env.metadata.generation;
    let now = observed.now;
    let sha = env.spec.pull_request.head_sha.as_str();
    let mut status = env.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    let mut actions = Vec::new();
    let retry = false;

    // The subdomain hash is chosen once and kept for the Environment's life.
    let hash = status.subdomain_hash.clone().unwrap_or_else(|| observed.new_hash.to_owned());
    status.subdomain_hash = Some(hash.clone());

    // A new head commit starts a new run: nothing of the old run stays in status, and its
    // BuildJobs (with their builder VMs) go.
    if status.run.as_ref().is_none_or(|run| run.sha != sha) {
        status.run = Some(RunStatus { sha: sha.to_owned(), started_at: Some(Time(now)), ..RunStatus::default() });
        status.conditions.retain(|c| c.type_ != BUILDS_SUCCEEDED && c.type_ != CONFIG_VALID);
    }
    // The reaper tears an environment down a TTL after its last activity: creation or a commit.
    if let Some(project) = observed.project {
        let ttl = env.spec.overrides.as_ref().and_then(|o| o.ttl.clone()).unwrap_or_else(|| project.spec.ttl.clone());
        let started = status.run.as_ref().and_then(|run| run.started_at.clone()).map_or(now, |t| t.0);
        if let Ok(ttl) = stagely_api::v1alpha1::parse_duration(&ttl)
            && let Ok(span) = k8s_openapi::jiff::SignedDuration::try_from(ttl)
            && let Ok(expires) = started.checked_add(span)
        {
            status.expires_at = Some(Time(expires));
        }
    }
    for job in observed.jobs {
        if job.spec.commit != sha && job.metadata.deletion_timestamp.is_none() {
            actions.push(Action::DeleteBuildJob(job.name_any()));
        }
    }
    let jobs: Vec<&BuildJob> = observed.jobs.iter().filter(|job| job.spec.commit == sha).collect();

    let Some(project) = observed.project else {
        let name = &env.spec.project_ref.name;
        let namespace = env.namespace().unwrap_or_default();
        set_condition(
            &mut status.conditions,
            CONFIG_VALID,
            false,
            "ProjectNotFound",
            &format!("Project {name} not found in namespace {namespace}; create it or fix spec.projectRef"),
            generation,
            now,
        );
        status.phase = Some(EnvironmentPhase::Pending);
        return Plan { actions, status, retry };
    };
    status.url = Some(format!("https://{hash}.{}", project.spec.preview_domain));
    let route = |route_status: RouteStatus| Route {
        status: route_status,
        ip: None,
        port: None,
        project: project.name_any(),
        namespace: env.namespace().unwrap_or_default(),
        environment: env.name_any(),
        pr: u64::try_from(env.spec.pull_request.number).unwrap_or_default(),
    };

    let short = short_sha(sha);
    let config = match observed.config {
        None => {
            status.phase = Some(EnvironmentPhase::Pending);
            actions.push(Action::WriteRoute(route(RouteStatus::Building)));
            return Plan { actions, status, retry };
        }
        Some(ConfigState::Problem { reason, message, permanent }) => {
            set_condition(&mut status.conditions, CONFIG_VALID, false, reason, message, generation, now);
            set_condition(
                &mut status.conditions,
                BUILDS_SUCCEEDED,
                false,
                "ConfigNotValid",
                &format!("nothing is built until stagely.yaml at {short} can be used"),
                generation,
                now,
            );
            status.phase = Some(if permanent { EnvironmentPhase::Failed } else { EnvironmentPhase::Pending });
            actions.push(Action::WriteRoute(route(if permanent {
                RouteStatus::Failed
            } else {
                RouteStatus::Building
            })));
            return Plan { actions, status, retry: !permanent };
        }
        Some(ConfigState::Loaded(config)) => config,
    };
    let targets = config.builds.values().map(|b| b.platforms.len()).sum::<usize>();
    set_condition(
        &mut status.conditions,
        CONFIG_VALID,
        true,
        "Valid",
        &format!("stagely.yaml at {short} is valid: {targets} image build{}", if targets == 1 { "" } else { "s" }),
        generation,
        now,
    );

    let Some(registry) = observed.registry else {
        set_condition(
            &mut status.conditions,
            BUILDS_SUCCEEDED,
            false,
            "NoRegistry",
            "the operator has no image registry configured (--registry): nothing can be built",
            generation,
            now,
        );
        status.phase = Some(EnvironmentPhase::Failed);
        actions.push(Action::WriteRoute(route(RouteStatus::Failed)));
        return Plan { actions, status, retry };
    };

    // Fan-out: one BuildJob per build × platform, named after what it builds.
    let desired = desired_jobs(env, project, observed.provider, config, registry);
    let mut builds = Vec::with_capacity(desired.len());
    let mut failed: Option<&BuildJob> = None;
    let mut waiting: Option<(&BuildJob, String)> = None;
    let mut done = 0;
    for want in &desired {
        let name = want.name_any();
        let found = jobs.iter().copied().find(|job| job.name_any() == name);
        let Some(job) = found else {
            actions.push(Action::CreateBuildJob(Box::new(want.clone())));
            builds.push(RunBuild {
                build_job: name,
                service: want.spec.service.clone(),
                platform: want.spec.platform,
                phase: Some(BuildJobPhase::Queued),
                image: None,
                started_at: None,
                finished_at: None,
            });
            continue;
        };
        let job_status = job.status.clone().unwrap_or_default();
        let phase = job_status.phase.unwrap_or_default();
        let image = match (&job.spec.image, &job_status.image_digest) {
            (Some(image), Some(digest)) if phase == BuildJobPhase::Succeeded => Some(format!("{image}@{digest}")),
            _ => None,
        };
        match phase {
            BuildJobPhase::Succeeded => done += 1,
            BuildJobPhase::Failed if !is_cancelled(job) && failed.is_none() => failed = Some(job),
            BuildJobPhase::Queued if waiting.is_none() => {
                waiting = job_status.message.clone().map(|message| (job, message));
            }
            _ => {}
        }
        builds.push(RunBuild {
            build_job: name,
            service: job.spec.service.clone(),
            platform: job.spec.platform,
            phase: Some(phase),
            image,
            started_at: job_status.started_at.clone(),
            finished_at: job_status.finished_at.clone(),
        });
    }
    let run = status.run.get_or_insert_with(RunStatus::default);
    run.builds = builds;

    if let Some(job) = failed {
        // Fan-in fails at once: the failing build is named, its siblings stopped.
        for sibling in &jobs {
            let sibling_phase = sibling.status.as_ref().and_then(|s| s.phase).unwrap_or_default();
            if !sibling_phase.is_finished() && !is_cancelled(sibling) && sibling.metadata.deletion_timestamp.is_none() {
                actions.push(Action::CancelBuildJob {
                    name: sibling.name_any(),
                    reason: format!("cancelled: build {} ({}) failed", job.spec.service, job.spec.platform),
                });
            }
        }
        let why = job.status.as_ref().and_then(|s| s.message.clone()).unwrap_or_else(|| "no reason given".into());
        set_condition(
            &mut status.conditions,
            BUILDS_SUCCEEDED,
            false,
            "BuildFailed",
            &format!(
                "build {} ({}) failed in BuildJob {}: {}",
                job.spec.service,
                job.spec.platform,
                job.name_any(),
                tail(&why, LOG_TAIL_LINES)
            ),
            generation,
            now,
        );
        status.phase = Some(EnvironmentPhase::Failed);
        actions.push(Action::WriteRoute(route(RouteStatus::Failed)));
        return Plan { actions, status, retry };
    }

    if done < desired.len() {
        let mut message = format!("{done} of {} builds done", desired.len());
        if let Some((job, why)) = waiting {
            message.push_str(&format!("; {} ({}): {why}", job.spec.service, job.spec.platform));
        }
        // A run whose builds outlast every timeout they have is stuck, not slow: it fails and
        // says so rather than hanging (its BuildJobs are stopped).
        let longest = config.builds.values().map(|build| build.timeout).max().unwrap_or_default();
        let limit = longest + BUILD_STUCK_MARGIN;
        let started = status.run.as_ref().and_then(|run| run.started_at.as_ref()).map_or(now, |t| t.0);
        if Duration::try_from(now.duration_since(started)).unwrap_or_default() > limit {
            for job in &jobs {
                let phase = job.status.as_ref().and_then(|s| s.phase).unwrap_or_default();
                if !phase.is_finished() && !is_cancelled(job) && job.metadata.deletion_timestamp.is_none() {
                    actions.push(Action::CancelBuildJob {
                        name: job.name_any(),
                        reason: "cancelled: the run was stuck building".into(),
                    });
                }
            }
            let message = format!(
                "the builds have not finished {} after the run started (the longest build timeout, {}, plus {} \
                 for queueing and starting builders): {message}",
                human(limit),
                human(longest),
                human(BUILD_STUCK_MARGIN)
            );
            set_condition(&mut status.conditions, BUILDS_SUCCEEDED, false, BUILD_STUCK, &message, generation, now);
            status.phase = Some(EnvironmentPhase::Failed);
            actions.push(Action::WriteRoute(route(RouteStatus::Failed)));
            return Plan { actions, status, retry };
        }
        set_condition(&mut status.conditions, BUILDS_SUCCEEDED, false, "Building", &message, generation, now);
        status.phase = Some(EnvironmentPhase::Building);
        actions.push(Action::WriteRoute(route(RouteStatus::Building)));
        return Plan { actions, status, retry };
    }

    // Fan-in: every build succeeded. A service built for one platform runs that image; one
    // built for several runs the index listing them all.
    let run = status.run.get_or_insert_with(RunStatus::default);
    let mut per_service: BTreeMap<&str, Vec<&BuildJob>> = BTreeMap::new();
    for job in &jobs {
        per_service.entry(job.spec.service.as_str()).or_default().push(job);
    }
    let mut pending_index = false;
    let mut tags = Vec::new();
    for (service, service_jobs) in per_service {
        if !config.builds.contains_key(service) || run.images.contains_key(service) {
            continue;
        }
        let digests: Vec<_> = service_jobs
            .iter()
            .filter_map(|job| Some((job.spec.platform, job.status.as_ref()?.image_digest.clone()?)))
            .collect();
        let image = service_jobs[0].spec.image.clone().unwrap_or_default();
        let repository = image.strip_prefix(&format!("{registry}/")).unwrap_or(&image).to_owned();
        for job in &service_jobs {
            tags.push(format!("{repository}:{sha}-{}", job.spec.platform.arch()));
        }
        if let [(_, digest)] = digests.as_slice() {
            run.images.insert(service.to_owned(), format!("{image}@{digest}"));
        } else {
            tags.push(format!("{repository}:{sha}"));
            actions.push(Action::MergeIndex {
                service: service.to_owned(),
                repository,
                tag: sha.to_owned(),
                manifests: digests,
            });
            pending_index = true;
        }
    }
    let images = run.images.len() + usize::from(pending_index);
    for tag in tags {
        if !status.registry_tags.contains(&tag) {
            status.registry_tags.push(tag);
        }
    }
    let excess = status.registry_tags.len().saturating_sub(MAX_REGISTRY_TAGS);
    status.registry_tags.drain(..excess);
    set_condition(
        &mut status.conditions,
        BUILDS_SUCCEEDED,
        true,
        "Built",
        &format!(
            "{} image build{} succeeded for {} service{}",
            desired.len(),
            plural(desired.len()),
            images.max(config.builds.len()),
            plural(config.builds.len())
        ),
        generation,
        now,
    );
    // The preview step takes it from here (the VM, DEPLOY, and the route that follows them).
    status.phase = Some(EnvironmentPhase::Deploying);
    Plan { actions, status, retry }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn is_cancelled(job: &BuildJob) -> bool {
    job.annotations().contains_key(keys::CANCEL)
}

/// The first seven characters of a commit id.
pub fn short_sha(sha: &str) -> &str {
    &sha[..sha.len().min(7)]
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The BuildJobs the run of `env` needs: one per build × platform.
pub fn desired_jobs(
    env: &Environment,
    project: &Project,
    provider: Option<&CloudProvider>,
    config: &StagelyConfig,
    registry: &str,
) -> Vec<BuildJob> {
    let namespace = env.namespace().unwrap_or_default();
    let sha = &env.spec.pull_request.head_sha;
    let mut jobs = Vec::new();
    for (service, build) in &config.builds {
        let repository = crate::registry::Registry::repository(&namespace, &project.name_any(), service);
        let image = format!("{registry}/{repository}");
        for platform in &build.platforms {
            let cache = format!("{image}:cache-{}", platform.arch());
            let mut cache_from = build.cache_from.clone();
            cache_from.push(cache.clone());
            let labels = BTreeMap::from([
                (keys::MANAGED_BY.to_owned(), keys::MANAGED_BY_VALUE.to_owned()),
                (keys::PROJECT.to_owned(), label_value(&project.name_any())),
                (keys::ENVIRONMENT.to_owned(), label_value(&env.name_any())),
                (keys::PULL_REQUEST.to_owned(), env.spec.pull_request.number.to_string()),
                (keys::SERVICE.to_owned(), label_value(service)),
                (keys::ARCH.to_owned(), platform.arch().to_owned()),
                (keys::COMMIT.to_owned(), label_value(sha)),
            ]);
            let machine =
                build.machine.or_else(|| provider.and_then(|p| p.spec.defaults.builder_size)).unwrap_or_default();
            jobs.push(BuildJob {
                metadata: ObjectMeta {
                    name: Some(job_name(&env.name_any(), service, platform.arch(), sha)),
                    namespace: Some(namespace.clone()),
                    labels: Some(labels),
                    owner_references: Some(vec![owner_reference(env)]),
                    // The BuildJob controller's finalizer from the start: it would add it at
                    // its first reconcile anyway, one more write per BuildJob.
                    finalizers: Some(vec![keys::BUILDJOB_FINALIZER.to_owned()]),
                    ..ObjectMeta::default()
                },
                spec: BuildJobSpec {
                    service: service.clone(),
                    platform: *platform,
                    repository: project.spec.repository.clone(),
                    commit: sha.clone(),
                    context: build.context.clone(),
                    dockerfile: build.dockerfile.clone(),
                    machine,
                    build_args: build.build_args.clone(),
                    cache_from,
                    cache_to: Some(cache),
                    timeout: format!("{}s", build.timeout.as_secs().max(1)),
                    image: Some(image.clone()),
                },
                status: None,
            });
        }
    }
    jobs
}

/// The controller owner reference to `env`.
pub fn owner_reference(env: &Environment) -> OwnerReference {
    OwnerReference {
        api_version: Environment::api_version(&()).into_owned(),
        kind: Environment::kind(&()).into_owned(),
        name: env.name_any(),
        uid: env.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// `<environment>-<service>-<arch>-<short sha>`, shortened with a hash when it would not fit
/// a Kubernetes name.
pub fn job_name(environment: &str, service: &str, arch: &str, sha: &str) -> String {
    let name = format!("{environment}-{service}-{arch}-{}", short_sha(sha));
    fit(&name, MAX_NAME)
}

/// A reference to `env` for events.
pub fn object_ref(env: &Environment) -> ObjectReference {
    env.object_ref(&())
}

/// The condition of `type_`, if set.
pub fn condition<'a>(status: &'a EnvironmentStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::SignedDuration;
    use stagely_api::v1alpha1::{
        BuildJobStatus, CloudProviderSpec, EnvironmentSpec, LocalObjectRef, Platform, ProjectSpec, PullRequest,
    };

    const SHA: &str = "9f2c1e0b7a6d5c4b3a29180f7e6d5c4b3a291807";
    const SHA2: &str = "1111111111111111111111111111111111111111";
    const REGISTRY: &str = "registry.test:5000";

    fn environment(sha: &str) -> Environment {
        let mut env = Environment::new(
            "shop-pr-7",
            EnvironmentSpec {
                project_ref: LocalObjectRef::new("shop"),
                pull_request: PullRequest {
                    number: 7,
                    head_sha: sha.into(),
                    head_ref: "feature".into(),
                    base_ref: "main".into(),
                    author: None,
                    url: None,
                },
                overrides: None,
            },
        );
        env.metadata.namespace = Some("team-a".into());
        env.metadata.uid = Some("env-uid".into());
        env.metadata.generation = Some(1);
        env
    }

    fn project() -> Project {
        let spec: ProjectSpec = serde_json::from_value(serde_json::json!({
            "repository": "acme/shop",
            "cloudProviderRef": {"name": "local"},
            "previewDomain": "preview.example.com",
            "github": {"credentialsSecretRef": {"name": "gh"}},
        }))
        .unwrap();
        let mut project = Project::new("shop", spec);
        project.metadata.namespace = Some("team-a".into());
        project
    }

    fn provider() -> CloudProvider {
        let spec: CloudProviderSpec = serde_json::from_value(serde_json::json!({
            "type": "local", "defaults": {"builderSize": "large"},
        }))
        .unwrap();
        CloudProvider::new("local", spec)
    }

    fn config(yaml: &str) -> StagelyConfig {
        stagely_api::config::parse(yaml).unwrap()
    }

    fn two_builds() -> StagelyConfig {
        config(
            "version: 2\nbuilds:\n  web:\n    platforms: [linux/amd64, linux/arm64]\n  worker:\n    context: worker\n    machine: small\n",
        )
    }

    fn observe<'a>(
        env: &'a Environment,
        project: Option<&'a Project>,
        provider: Option<&'a CloudProvider>,
        config: Option<ConfigState<'a>>,
        jobs: &'a [BuildJob],
    ) -> Observed<'a> {
        Observed {
            environment: env,
            project,
            provider,
            config,
            jobs,
            registry: Some(REGISTRY),
            new_hash: "abcdefgh1234",
            now: Timestamp::from_second(1_800_000_000).unwrap(),
        }
    }

    fn with_phase(mut job: BuildJob, phase: BuildJobPhase, digest: Option<&str>, message: Option<&str>) -> BuildJob {
        job.status = Some(BuildJobStatus {
            phase: Some(phase),
            image_digest: digest.map(Into::into),
            message: message.map(Into::into),
            ..BuildJobStatus::default()
        });
        job
    }

    fn created(plan: &Plan) -> Vec<BuildJob> {
        plan.actions
            .iter()
            .filter_map(|a| match a {
                Action::CreateBuildJob(job) => Some((**job).clone()),
                _ => None,
            })
            .collect()
    }

    fn route_status(plan: &Plan) -> Option<RouteStatus> {
        plan.actions.iter().find_map(|a| match a {
            Action::WriteRoute(route) => Some(route.status),
            _ => None,
        })
    }

    fn cond<'a>(plan: &'a Plan, type_: &str) -> &'a Condition {
        condition(&plan.status, type_).unwrap_or_else(|| panic!("no {type_} condition"))
    }

    /// The jobs of a first plan, as the apiserver would hold them after creation.
    fn jobs_of(env: &Environment, config: &StagelyConfig) -> Vec<BuildJob> {
        let p = project();
        let cp = provider();
        created(&plan(&observe(env, Some(&p), Some(&cp), Some(ConfigState::Loaded(config)), &[])))
    }

    #[test]
    fn a_new_environment_gets_a_hash_url_building_route_and_one_job_per_build_and_platform() {
        let env = environment(SHA);
        let (p, cp, cfg) = (project(), provider(), two_builds());
        let plan = plan(&observe(&env, Some(&p), Some(&cp), Some(ConfigState::Loaded(&cfg)), &[]));
        assert_eq!(plan.status.subdomain_hash.as_deref(), Some("abcdefgh1234"));
        assert_eq!(plan.status.url.as_deref(), Some("https://abcdefgh1234.preview.example.com"));
        assert_eq!(plan.status.phase, Some(EnvironmentPhase::Building));
        assert_eq!(route_status(&plan), Some(RouteStatus::Building));
        let jobs = created(&plan);
        let names: Vec<_> = jobs.iter().map(|j| j.name_any()).collect();
        assert_eq!(
            names,
            ["shop-pr-7-web-amd64-9f2c1e0", "shop-pr-7-web-arm64-9f2c1e0", "shop-pr-7-worker-amd64-9f2c1e0"]
        );
        let web = &jobs[1];
        assert_eq!(web.spec.platform, Platform::LinuxArm64);
        assert_eq!(web.spec.commit, SHA);
        assert_eq!(web.spec.repository, "acme/shop");
        assert_eq!(web.spec.image.as_deref(), Some("registry.test:5000/team-a/shop/web"));
        assert_eq!(web.spec.cache_to.as_deref(), Some("registry.test:5000/team-a/shop/web:cache-arm64"));
        assert_eq!(web.spec.machine, stagely_api::v1alpha1::Size::Large, "the provider's builder size");
        assert_eq!(jobs[2].spec.machine, stagely_api::v1alpha1::Size::Small, "stagely.yaml's machine wins");
        assert_eq!(jobs[2].spec.context, "worker");
        assert_eq!(web.spec.timeout, "1800s");
        let labels = web.labels();
        assert_eq!(labels[keys::ENVIRONMENT], "shop-pr-7");
        assert_eq!(labels[keys::PROJECT], "shop");
        assert_eq!(labels[keys::ARCH], "arm64");
        assert_eq!(labels[keys::SERVICE], "web");
        assert_eq!(labels[keys::COMMIT], SHA);
        assert_eq!(labels[keys::PULL_REQUEST], "7");
        let owner = &web.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.uid.as_str(), owner.controller), ("env-uid", Some(true)));
        let run = plan.status.run.as_ref().unwrap();
        assert_eq!(run.sha, SHA);
        assert_eq!(run.builds.len(), 3);
        assert!(run.builds.iter().all(|b| b.phase == Some(BuildJobPhase::Queued)));
        assert_eq!(cond(&plan, CONFIG_VALID).status, "True");
    }

    #[test]
    fn the_hash_is_kept_once_chosen() {
        let mut env = environment(SHA);
        env.status = Some(EnvironmentStatus { subdomain_hash: Some("keptkept0000".into()), ..Default::default() });
        let p = project();
        let plan = plan(&observe(&env, Some(&p), None, None, &[]));
        assert_eq!(plan.status.subdomain_hash.as_deref(), Some("keptkept0000"));
        assert_eq!(plan.status.phase, Some(EnvironmentPhase::Pending));
        assert_eq!(route_status(&plan), Some(RouteStatus::Building), "the Building page shows from the start");
    }

    #[test]
    fn a_missing_project_is_a_condition_not_a_crash() {
        let env = environment(SHA);
        let plan = plan(&observe(&env, None, None, None, &[]));
        let c = cond(&plan, CONFIG_VALID);
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "ProjectNotFound"));
        assert!(c.message.contains("Project shop not found in namespace team-a"), "{}", c.message);
        assert!(plan.actions.is_empty());
    }

    #[test]
    fn an_invalid_config_fails_without_jobs_and_waits_for_a_commit() {
        let env = environment(SHA);
        let p = project();
        let message = "stagely.yaml at 9f2c1e0 is invalid: builds.web.platforms[1]: unknown platform";
        let state = ConfigState::Problem { reason: "ConfigInvalid", message, permanent: true };
        let plan = plan(&observe(&env, Some(&p), None, Some(state), &[]));
        assert!(created(&plan).is_empty());
        assert_eq!(plan.status.phase, Some(EnvironmentPhase::Failed));
        let c = cond(&plan, CONFIG_VALID);
        assert_eq!((c.status.as_str(), c.reason.as_str(), c.message.as_str()), ("False", "ConfigInvalid", message));
        assert!(!plan.retry, "an invalid file is not retried in a loop");
        assert_eq!(route_status(&plan), Some(RouteStatus::Failed));
    }

    #[test]
    fn an_unreachable_repository_is_retried() {
        let env = environment(SHA);
        let p = project();
        let state = ConfigState::Problem { reason: "RepositoryUnreachable", message: "down", permanent: false };
        let plan = plan(&observe(&env, Some(&p), None, Some(state), &[]));
        assert!(plan.retry);
        assert_eq!(plan.status.phase, Some(EnvironmentPhase::Pending));
    }

    #[test]
    fn existing_jobs_are_not_created_again_and_their_phases_are_mirrored() {
        let env = environment(SHA);
        let cfg = two_builds();
        let mut jobs = jobs_of(&env, &cfg);
        jobs[0] = with_phase(jobs[0].clone(), BuildJobPhase::Building, None, None);
        jobs[1] = with_phase(jobs[1].clone(), BuildJobPhase::Succeeded, Some("sha256:bb"), None);
        jobs[2] =
            with_phase(jobs[2].clone(), BuildJobPhase::Queued, None, Some("waiting for an instance: 5 of 5 in use"));
        let (p, cp) = (project(), provider());
        let plan = plan(&observe(&env, Some(&p), Some(&cp), Some(ConfigState::Loaded(&cfg)), &jobs));
        assert!(created(&plan).is_empty());
        let builds = &plan.status.run.as_ref().unwrap().builds;
        let phases: Vec<_> = builds.iter().map(|b| b.phase.unwrap()).collect();
        assert_eq!(phases, [BuildJobPhase::Building, BuildJobPhase::Succeeded, BuildJobPhase::Queued]);
        assert_eq!(builds[1].image.as_deref(), Some("registry.test:5000/team-a/shop/web@sha256:bb"));
        let c = cond(&plan, BUILDS_SUCCEEDED);
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "Building"));
        assert_eq!(c.message, "1 of 3 builds done; worker (linux/amd64): waiting for an instance: 5 of 5 in use");
        assert_eq!(plan.status.phase, Some(EnvironmentPhase::Building));
    }

    #[test]
    fn a_run_building_past_its_longest_timeout_and_the_margin_fails_as_stuck() {
        let cfg = two_builds();
        let (p, cp) = (project(), provider());
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let longest = cfg.builds.values().map(|b| b.timeout).max().unwrap();
        let limit = SignedDuration::try_from(longest + BUILD_STUCK_MARGIN).unwrap();
        for (started_ago, stuck) in
            [(limit - SignedDuration::from_secs(60), false), (limit + SignedDuration::from_secs(60), true)]
        {
            let mut env = environment(SHA);
            let mut jobs = jobs_of(&env, &cfg);
            env.status = Some(EnvironmentStatus {
                run: Some(RunStatus {
                    sha: SHA.into(),
                    started_at: Some(Time(now - started_ago)),
                    ..RunStatus::default()
                }),
                ..EnvironmentStatus::default()
            });
            jobs[0] = with_phase(jobs[0].clone(), BuildJobPhase::Succeeded, Some("sha256:aa"), None);
            jobs[1] = with_phase(jobs[1].clone(), BuildJobPhase::Building, None, None);
            jobs[2] = with_phase(jobs[2].clone(), BuildJobPhase::Queued, None, Some("waiting for an instance"));
            let plan = plan(&observe(&env, Some(&p), Some(&cp), Some(ConfigState::Loaded(&cfg)), &jobs));
            let c = cond(&plan, BUILDS_SUCCEEDED);
            let cancelled = plan.actions.iter().filter(|a| matches!(a, Action::CancelBuildJob { .. })).count();
            if stuck {
                assert_eq!(plan.status.phase, Some(EnvironmentPhase::Failed));
                assert_eq!(c.reason, BUILD_STUCK);
                assert!(
                    c.message.starts_with("the builds have not finished 1h after the run started"),
                    "{}",
                    c.message
                );
                assert!(
                    c.message.ends_with("1 of 3 builds done; worker (linux/amd64): waiting for an instance"),
                    "{}",
                    c.message
                );
                assert_eq!(cancelled, 2, "the unfinished builds stop");
                assert_eq!(route_status(&plan), Some(RouteStatus::Failed));
            } else {
                assert_eq!(
                    (plan.status.phase, c.reason.as_str(), cancelled),
                    (Some(EnvironmentPhase::Building), "Building", 0)
                );
            }
        }
    }

    #[test]
    fn one_failure_fails_the_run_names_the_job_and_cancels_the_others() {
        let env = environment(SHA);
        let cfg = two_builds();
        let mut jobs = jobs_of(&env, &cfg);
        jobs[0] = with_phase(jobs[0].clone(), BuildJobPhase::Building, None, None);
        jobs[1] = with_phase(
            jobs[1].clone(),
            BuildJobPhase::Failed,
            None,
            Some("exit 1\nstep 3: COPY missing\nno such file"),
        );
        jobs[2] = with_phase(jobs[2].clone(), BuildJobPhase::Succeeded, Some("sha256:cc"), None);
        let (p, cp) = (project(), provider());
        let plan = plan(&observe(&env, Some(&p), Some(&cp), Some(ConfigState::Loaded(&cfg)), &jobs));
        assert_eq!(plan.status.phase, Some(EnvironmentPhase::Failed));
        let c = cond(&plan, BUILDS_SUCCEEDED);
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "BuildFailed"));
        assert!(
            c.message.starts_with("build web (linux/arm64) failed in BuildJob shop-pr-7-web-arm64-9f2c1e0: exit 1"),
            "{}",
            c.message
        );
        assert!(c.message.ends_with("no such file"), "{}", c.message);
        let cancelled: Vec<_> = plan
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::CancelBuildJob { name, reason } => Some((name.as_str(), reason.as_str())),
                _ => None,
            })
            .collect();
        assert_eq!(cancelled, [("shop-pr-7-web-amd64-9f2c1e0", "cancelled: build web (linux/arm64) failed")]);
        assert_eq!(route_status(&plan), Some(RouteStatus::Failed));
    }

    #[test]
    fn a_cancelled_sibling_is_not_blamed_nor_cancelled_twice() {
        let env = environment(SHA);
        let cfg = two_builds();
        let mut jobs = jobs_of(&env, &cfg);
        jobs[0] =
            with_phase(jobs[0].clone(), BuildJobPhase::Failed, None, Some("cancelled: build web (linux/arm64) failed"));
        jobs[0].annotations_mut().insert(keys::CANCEL.into(), "cancelled".into());
        jobs[1] = with_phase(jobs[1].clone(), BuildJobPhase::Failed, None, Some("exit 2"));
        jobs[2] = with_phase(jobs[2].clone(), BuildJobPhase::Provisioning, None, None);
        jobs[2].annotations_mut().insert(keys::CANCEL.into(), "cancelled".into());
        let (p, cp) = (project(), provider());
        let plan = plan(&observe(&env, Some(&p), Some(&cp), Some(ConfigState::Loaded(&cfg)), &jobs));
        assert!(cond(&plan, BUILDS_SUCCEEDED).message.contains("BuildJob shop-pr-7-web-arm64-9f2c1e0: exit 2"));
        assert!(!plan.actions.iter().any(|a| matches!(a, Action::CancelBuildJob { .. })));
    }

    #[test]
    fn all_succeeded_merges_multi_platform_images_and_pins_single_ones() {
        let env = environment(SHA);
        let cfg = two_builds();
        let jobs: Vec<_> = jobs_of(&env, &cfg)
            .into_iter()
            .zip(["sha256:aa", "sha256:bb", "sha256:cc"])
            .map(|(job, digest)| with_phase(job, BuildJobPhase::Succeeded, Some(digest), None))
            .collect();
        let (p, cp) = (project(), provider());
        let plan = plan(&observe(&env, Some(&p), Some(&cp), Some(ConfigState::Loaded(&cfg)), &jobs));
        let c = cond(&plan, BUILDS_SUCCEEDED);
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Built"));
        assert_eq!(plan.status.phase, Some(EnvironmentPhase::Deploying));
        let merges: Vec<_> = plan.actions.iter().filter(|a| matches!(a, Action::MergeIndex { .. })).collect();
        assert_eq!(
            merges,
            [&Action::MergeIndex {
                service: "web".into(),
                repository: "team-a/shop/web".into(),
                tag: SHA.into(),
                manifests: vec![(Platform::LinuxAmd64, "sha256:aa".into()), (Platform::LinuxArm64, "sha256:bb".into())],
            }]
        );
        let images = &plan.status.run.as_ref().unwrap().images;
        assert_eq!(images.get("worker").map(String::as_str), Some("registry.test:5000/team-a/shop/worker@sha256:cc"));
        assert!(!images.contains_key("web"), "filled in once the index is pushed");
        assert_eq!(route_status(&plan), None, "the preview step writes the route from here");
        assert_eq!(
            plan.status.registry_tags,
            [
                format!("team-a/shop/web:{SHA}-amd64"),
                format!("team-a/shop/web:{SHA}-arm64"),
                format!("team-a/shop/web:{SHA}"),
                format!("team-a/shop/worker:{SHA}-amd64"),
            ]
        );
        let expires = plan.status.expires_at.as_ref().unwrap().0;
        assert_eq!(expires.as_second() - 1_800_000_000, 24 * 3600, "the Project's TTL from the run's start");
    }

    #[test]
    fn a_merged_index_is_not_merged_again() {
        let mut env = environment(SHA);
        let cfg = two_builds();
        let jobs: Vec<_> = jobs_of(&env, &cfg)
            .into_iter()
            .map(|job| with_phase(job, BuildJobPhase::Succeeded, Some("sha256:aa"), None))
            .collect();
        let mut run = RunStatus { sha: SHA.into(), ..Default::default() };
        run.images.insert("web".into(), "registry.test:5000/team-a/shop/web@sha256:index".into());
        env.status = Some(EnvironmentStatus { run: Some(run), ..Default::default() });
        let (p, cp) = (project(), provider());
        let plan = plan(&observe(&env, Some(&p), Some(&cp), Some(ConfigState::Loaded(&cfg)), &jobs));
        assert!(!plan.actions.iter().any(|a| matches!(a, Action::MergeIndex { .. })));
        assert_eq!(plan.status.run.as_ref().unwrap().images.len(), 2);
    }

    #[test]
    fn a_new_head_sha_starts_a_new_run_and_deletes_the_old_jobs() {
        let old = environment(SHA);
        let cfg = two_builds();
        let old_jobs: Vec<_> =
            jobs_of(&old, &cfg).into_iter().map(|job| with_phase(job, BuildJobPhase::Building, None, None)).collect();
        let (p, cp) = (project(), provider());
        let mut env = environment(SHA2);
        env.status = Some(plan(&observe(&old, Some(&p), Some(&cp), Some(ConfigState::Loaded(&cfg)), &old_jobs)).status);
        let plan = plan(&observe(&env, Some(&p), Some(&cp), Some(ConfigState::Loaded(&cfg)), &old_jobs));
        let deleted: Vec<_> = plan
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::DeleteBuildJob(name) => Some(name.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(
            deleted,
            ["shop-pr-7-web-amd64-9f2c1e0", "shop-pr-7-web-arm64-9f2c1e0", "shop-pr-7-worker-amd64-9f2c1e0"]
        );
        let run = plan.status.run.as_ref().unwrap();
        assert_eq!(run.sha, SHA2);
        assert!(run.builds.iter().all(|b| b.build_job.ends_with("-1111111")), "{:?}", run.builds);
        assert_eq!(created(&plan).len(), 3);
        assert_eq!(plan.status.subdomain_hash, env.status.as_ref().unwrap().subdomain_hash, "same URL");
    }

    #[test]
    fn a_new_commit_after_a_failed_run_proceeds() {
        let old = environment(SHA);
        let p = project();
        let state = ConfigState::Problem { reason: "ConfigInvalid", message: "bad", permanent: true };
        let failed = plan(&observe(&old, Some(&p), None, Some(state), &[]));
        let mut env = environment(SHA2);
        env.status = Some(failed.status);
        let cfg = two_builds();
        let plan = plan(&observe(&env, Some(&p), None, Some(ConfigState::Loaded(&cfg)), &[]));
        assert_eq!(plan.status.phase, Some(EnvironmentPhase::Building));
        assert_eq!(cond(&plan, CONFIG_VALID).status, "True");
        assert_eq!(created(&plan).len(), 3);
    }

    #[test]
    fn without_a_registry_nothing_is_built_and_the_condition_says_why() {
        let env = environment(SHA);
        let (p, cfg) = (project(), two_builds());
        let mut observed = observe(&env, Some(&p), None, Some(ConfigState::Loaded(&cfg)), &[]);
        observed.registry = None;
        let plan = plan(&observed);
        assert!(created(&plan).is_empty());
        assert_eq!(cond(&plan, BUILDS_SUCCEEDED).reason, "NoRegistry");
    }

    #[test]
    fn a_second_plan_over_its_own_result_changes_nothing() {
        let env = environment(SHA);
        let cfg = two_builds();
        let (p, cp) = (project(), provider());
        let jobs = jobs_of(&env, &cfg);
        let first = plan(&observe(&env, Some(&p), Some(&cp), Some(ConfigState::Loaded(&cfg)), &jobs));
        let mut again = env.clone();
        again.status = Some(first.status.clone());
        let second = plan(&observe(&again, Some(&p), Some(&cp), Some(ConfigState::Loaded(&cfg)), &jobs));
        assert_eq!(second.status, first.status, "a reconcile without news writes nothing");
    }

    #[test]
    fn long_names_are_shortened_with_a_hash() {
        let long = "a".repeat(300);
        let name = job_name(&long, "web", "amd64", SHA);
        assert!(name.len() <= 253);
        assert_ne!(job_name(&format!("{long}x"), "web", "amd64", SHA), name);
        assert_eq!(label_value("short"), "short");
        assert!(label_value(&long).len() <= 63);
    }
}
