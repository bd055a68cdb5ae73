//! Where Services and EndpointSlices come from. Every source produces a
//! [`Snapshot`] of validated objects that the model turns into map contents.
pub mod kube;
pub mod manifests;
pub mod state;

use std::collections::BTreeMap;

use crate::model::objects::{EndpointSliceInfo, NodeInfo, ObjectName, ServiceInfo};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub services: BTreeMap<ObjectName, ServiceInfo>,
    pub slices: BTreeMap<ObjectName, EndpointSliceInfo>,
    /// Nodes by name (a manifest directory may describe this node too).
    pub nodes: BTreeMap<String, NodeInfo>,
}

#[cfg(test)]
mod state_tests;
#[cfg(test)]
mod tests;
