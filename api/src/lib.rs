//! The stagely.dev API, shared by every Stagely component: the CRD types, the `stagely.yaml`
//! model and parser, the agent wire protocol, the Redis route record, the label,
//! annotation and finalizer keys, and the mechanisms two binaries share (the secret masker,
//! the retry backoff, derived names).
//!
//! Apart from the `ops` module (feature `ops`, the binaries' shared operations endpoints) and
//! the `tls` module (feature `tls`, a certificate served from files and reloaded), this crate
//! does no I/O. It re-exports the `kube` and `k8s-openapi` versions it was built
//! against, so components agree on one version of each.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod config;
pub mod keys;
pub mod mask;
pub mod names;
#[cfg(feature = "ops")]
pub mod ops;
pub mod protocol;
pub mod pull_request;
pub mod route;
#[cfg(feature = "tls")]
pub mod tls;
pub mod v1alpha1;
pub mod webhook_secrets;

pub use k8s_openapi;
pub use kube;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group of every Stagely resource.
pub const GROUP: &str = "stagely.dev";

/// Every CustomResourceDefinition Stagely installs, in the order `crds/` lists them.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        v1alpha1::Project::crd(),
        v1alpha1::CloudProvider::crd(),
        v1alpha1::Environment::crd(),
        v1alpha1::BuildJob::crd(),
    ]
}
