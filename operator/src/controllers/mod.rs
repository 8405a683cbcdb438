//! The kube-rs controllers.

pub mod buildjob;
pub mod capacity;
pub mod cloudprovider;
pub mod conditions;
pub mod environment;
pub mod events;
pub mod follow;
pub mod project;
pub mod vm;
