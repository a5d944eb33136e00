//! xDS resources as a control plane sends them: protobuf bytes of a `Listener`, `Cluster`, `RouteConfiguration`,
//! `ClusterLoadAssignment` or `Secret`, decoded, converted to the mesh model and assembled. Every input must end
//! in a value or an `Invalid` naming a field, never a panic.
#![no_main]

use dpu_proxy::xds::convert::{
    self, CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, SECRET_TYPE, XdsResources,
};
use libfuzzer_sys::fuzz_target;

const TYPES: [&str; 5] = [LISTENER_TYPE, CLUSTER_TYPE, ROUTE_TYPE, ENDPOINT_TYPE, SECRET_TYPE];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let type_url = TYPES[usize::from(selector) % TYPES.len()];
    if let Ok(converted) = convert::resource(type_url, bytes, "resources[0]") {
        assert!(!converted.name().is_empty(), "a converted resource always has a name");
        let mut resources = XdsResources::default();
        resources.insert(converted);
        let _ = convert::assemble(&resources);
    }
});
