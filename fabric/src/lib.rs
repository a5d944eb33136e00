//! The fabric data path: the agent owns the eSwitch's VF representor ports and forwards pod traffic between them
//! with tc flower rules it installs over rtnetlink (offloaded to the eSwitch when the port has `hw-tc-offload`).
//!
//! Layers, in the order a request flows through them:
//! - [`model`]: validated fabric intent (attachments of VFs to pod networks, the fabric's uplink and proxy
//!   capture port), as stored in the intent store;
//! - [`ports`]: the representor inventory, identified by (controller, pf, vf/sf), never by netdev name;
//! - [`rules`]: compiles the intent against the inventory into the flower rules each port needs;
//! - [`switch`]: the [`switch::Switch`] trait with the netlink implementation and the simulated twin;
//! - [`netlink`]: rtnetlink framing plus the flower / action attribute encoders and decoders;
//! - [`ipsec`]: IPsec tunnels as xfrm states and policies, with their own reconciler;
//! - [`reconcile`]: [`reconcile::FabricReconciler`], which converges the kernel towards the intent and repairs
//!   drift, writing nothing when nothing differs.

pub mod ipsec;
pub mod model;
pub mod netlink;
pub mod ports;
pub mod reconcile;
pub mod rules;
pub mod switch;

mod error;

pub use error::FabricError;
