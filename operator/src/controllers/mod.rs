//! The kube-rs controllers.

pub mod cloudprovider;
