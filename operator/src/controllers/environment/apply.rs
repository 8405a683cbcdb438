//! How the Environment controller carries out a [`Plan`](super::plan::Plan)'s actions: BuildJobs
//! created (one that exists already is left as it is, so a retry is harmless), deleted or
//! cancelled; image indexes
//! merged in the registry; the route written to Redis. What an action finds out (an index
//! digest, a Redis outage) lands in the status about to be written.

use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use stagely_api::keys;
use stagely_api::v1alpha1::{BuildJob, Environment, EnvironmentPhase, EnvironmentStatus};

use super::plan::{Action, BUILDS_SUCCEEDED};
use super::{Context, Error};
use crate::controllers::conditions::set_condition;

/// Condition: the route record is written (True once the proxy can serve the app).
pub const ROUTED: &str = "Routed";

/// What applying found that the reconcile must know.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Something transient failed: look again soon.
    pub retry: bool,
}

/// Deletes the BuildJob `name`; one already gone is success.
pub async fn delete_job(api: &Api<BuildJob>, name: &str) -> Result<(), kube::Error> {
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(err) => Err(err),
    }
}

/// Carries out `actions` for `env`, recording what they found in `status`.
pub async fn apply(
    env: &Environment,
    actions: &[Action],
    status: &mut EnvironmentStatus,
    ctx: &Context,
) -> Result<Outcome, Error> {
    let namespace = env.namespace().unwrap_or_default();
    let name = env.name_any();
    let kube_error = |action: &'static str| {
        let (namespace, name) = (namespace.clone(), name.clone());
        move |source| Error::Kube { action, namespace, name, source }
    };
    let jobs: Api<BuildJob> = Api::namespaced(ctx.client.clone(), &namespace);
    let now = k8s_openapi::jiff::Timestamp::now();
    let generation = env.metadata.generation;
    let mut outcome = Outcome::default();
    for action in actions {
        match action {
            Action::CreateBuildJob(job) => {
                let job_name = job.name_any();
                // A create, not an apply: a job this controller's cache has not seen yet (or no
                // longer sees) may have settled since, and an apply would put back the finalizer
                // its controller took off when it settled it.
                let params =
                    PostParams { field_manager: Some(keys::MANAGER_OPERATOR.to_owned()), ..PostParams::default() };
                match jobs.create(&params, job).await {
                    Ok(_) => tracing::info!(%namespace, environment = %name, build_job = %job_name, "created BuildJob"),
                    Err(kube::Error::Api(status)) if status.code == 409 => {}
                    Err(err) => return Err(kube_error("create a BuildJob")(err)),
                }
            }
            Action::DeleteBuildJob(job_name) => {
                delete_job(&jobs, job_name).await.map_err(kube_error("delete a superseded BuildJob"))?;
                tracing::info!(%namespace, environment = %name, build_job = %job_name, "deleted superseded BuildJob");
            }
            Action::CancelBuildJob { name: job_name, reason } => {
                let patch = json!({ "metadata": { "annotations": { keys::CANCEL: reason } } });
                match jobs.patch(job_name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(status)) if status.code == 404 => {}
                    Err(err) => return Err(kube_error("cancel a BuildJob")(err)),
                }
                tracing::info!(%namespace, environment = %name, build_job = %job_name, "cancelled BuildJob");
            }
            Action::MergeIndex { service, repository, tag, manifests } => {
                let Some(registry) = &ctx.registry else { continue };
                match registry.merge_index(repository, tag, manifests).await {
                    Ok(digest) => {
                        let image = format!("{}/{repository}@{digest}", registry.host());
                        if let Some(run) = status.run.as_mut() {
                            run.images.insert(service.clone(), image);
                        }
                    }
                    Err(err) => {
                        set_condition(
                            &mut status.conditions,
                            BUILDS_SUCCEEDED,
                            false,
                            "ImageIndexFailed",
                            &format!(
                                "the images of {service} were built but merging them into one image index failed: {err}"
                            ),
                            generation,
                            now,
                        );
                        status.phase = Some(EnvironmentPhase::Building);
                        outcome.retry = true;
                    }
                }
            }
            Action::WriteRoute(route) => {
                if ctx.routes.is_some() && !super::preview::record_route(env, status, ctx, route).await {
                    outcome.retry = true;
                }
            }
        }
    }
    Ok(outcome)
}
