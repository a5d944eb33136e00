//! `dpu.v1.CryptoService`: the crypto capability registry and the keys (`cryptoKeys/*`) the data paths use.
//! Keys are write-only: material comes in with Create, is checked and wrapped with the key-encryption key
//! before it reaches the intent store, and no answer carries it.

use std::sync::Arc;

use dpu_crypto::CryptoError;
use dpu_crypto::Secret;
use dpu_crypto::keys::{KeyAlgorithm, KeyError, KeySpec, Keys};
use dpu_crypto::policy::{Placement, Policy};
use dpu_fabric::ipsec::{TunnelSpec, Tunnels};
use dpu_intent::reconcile::{ObjectKey, StatusBoard};
use dpu_intent::{Resource, Store, Stored};
use dpu_proto::v1 as pb;
use dpu_storage::model::{Backend, VolumeSpec};
use tokio::sync::Mutex;
use tonic::{Request, Response, Status};

use super::agent::object_status;
use super::{generation, intent_status, invalid, page, parse_name};
use crate::capabilities;

/// Implementation of `CryptoService`.
#[derive(Debug)]
pub struct CryptoApi {
    store: Store,
    keys: Keys,
    /// The storage API's write lock: a key is not deleted while a volume that uses it is being created.
    writes: Arc<Mutex<()>>,
    status: StatusBoard,
    tunnels: Tunnels,
}

impl CryptoApi {
    pub fn new(store: Store, keys: Keys, writes: Arc<Mutex<()>>, status: StatusBoard, tunnels: Tunnels) -> Self {
        Self { store, keys, writes, status, tunnels }
    }

    /// The resources that refer to `cryptoKeys/{id}`.
    fn users(&self, id: &str) -> Result<Vec<String>, Status> {
        let volumes = self
            .store
            .list_all::<VolumeSpec>()
            .map_err(intent_status)?
            .into_iter()
            .filter(|v| matches!(&v.spec.backend, Backend::Encrypted(e) if e.key == id))
            .map(|v| format!("{}/{}", VolumeSpec::KIND, v.id));
        let tunnels = self
            .store
            .list_all::<TunnelSpec>()
            .map_err(intent_status)?
            .into_iter()
            .filter(|t| t.spec.key_out == id || t.spec.key_in == id)
            .map(|t| format!("{}/{}", TunnelSpec::KIND, t.id));
        Ok(volumes.chain(tunnels).collect())
    }

    fn tunnel_message(&self, stored: &Stored<TunnelSpec>) -> pb::IpsecTunnel {
        let t = &stored.spec;
        let key = ObjectKey { kind: TunnelSpec::KIND.into(), id: stored.id.clone() };
        let state = self.tunnels.get(&stored.id);
        pb::IpsecTunnel {
            name: format!("{}/{}", TunnelSpec::KIND, stored.id),
            local_address: t.local.to_string(),
            remote_address: t.remote.to_string(),
            local_subnet: t.local_subnet.to_string(),
            remote_subnet: t.remote_subnet.to_string(),
            spi_out: t.spi_out,
            spi_in: t.spi_in,
            key_out: t.key_out.clone(),
            key_in: t.key_in.clone(),
            policy: policy_message(t.policy) as i32,
            device: t.device.clone(),
            rekey_overlap_seconds: t.rekey_overlap_seconds,
            generation: generation(stored.meta.generation),
            status: Some(object_status(self.status.get(IPSEC_SUBSYSTEM, &key), &stored.meta)),
            crypto: state.as_ref().map(|s| placement_message(t.policy, &s.placement)),
            request_id: dpu_fabric::ipsec::reqid(&stored.id),
        }
    }

    /// Checks a tunnel's keys (present, ESP algorithms) and, for require-hardware, its device's offload, so a
    /// tunnel that cannot work is refused rather than stored.
    fn check_tunnel(&self, t: &TunnelSpec) -> Result<(), Status> {
        for (field, id) in [("tunnel.key_out", &t.key_out), ("tunnel.key_in", &t.key_in)] {
            let key = match self.store.get::<KeySpec>(id) {
                Ok(k) => k.spec,
                Err(dpu_intent::Error::NotFound { .. }) => {
                    return Err(Status::failed_precondition(format!("{field}: cryptoKeys/{id} does not exist")));
                }
                Err(e) => return Err(intent_status(e)),
            };
            if !dpu_fabric::ipsec::KEY_ALGORITHMS.contains(&key.algorithm) {
                return Err(Status::failed_precondition(format!(
                    "{field}: cryptoKeys/{id} is an {} key; ESP takes aes-128-gcm-esp or aes-256-gcm-esp",
                    key.algorithm
                )));
            }
        }
        if t.policy == Policy::RequireHardware {
            match capabilities::netdev_feature(&t.device, "esp-hw-offload") {
                Ok(true) => {}
                Ok(false) => {
                    return Err(Status::failed_precondition(format!(
                        "tunnel.policy: require-hardware: {} has no esp-hw-offload (off, or not offered by its driver)",
                        t.device
                    )));
                }
                Err(e) => return Err(Status::failed_precondition(format!("tunnel.device: {e}"))),
            }
        }
        Ok(())
    }

    fn key_message(&self, stored: Stored<KeySpec>) -> Result<pb::CryptoKey, Status> {
        Ok(pb::CryptoKey {
            name: format!("{}/{}", KeySpec::KIND, stored.id),
            algorithm: algorithm_message(stored.spec.algorithm) as i32,
            size_bits: u32::try_from(stored.spec.algorithm.key_len() * 8).unwrap_or(u32::MAX),
            kek_id: stored.spec.kek.clone(),
            users: self.users(&stored.id)?,
            generation: generation(stored.meta.generation),
            ..Default::default()
        })
    }
}

fn algorithm_message(a: KeyAlgorithm) -> pb::KeyAlgorithm {
    match a {
        KeyAlgorithm::Aes256Xts => pb::KeyAlgorithm::Aes256Xts,
        KeyAlgorithm::Aes128Gcm => pb::KeyAlgorithm::Aes128Gcm,
        KeyAlgorithm::Aes256Gcm => pb::KeyAlgorithm::Aes256Gcm,
        KeyAlgorithm::Aes128GcmEsp => pb::KeyAlgorithm::Aes128GcmEsp,
        KeyAlgorithm::Aes256GcmEsp => pb::KeyAlgorithm::Aes256GcmEsp,
    }
}

fn algorithm_from(value: i32) -> Result<KeyAlgorithm, Status> {
    match pb::KeyAlgorithm::try_from(value) {
        Ok(pb::KeyAlgorithm::Aes256Xts) => Ok(KeyAlgorithm::Aes256Xts),
        Ok(pb::KeyAlgorithm::Aes128Gcm) => Ok(KeyAlgorithm::Aes128Gcm),
        Ok(pb::KeyAlgorithm::Aes256Gcm) => Ok(KeyAlgorithm::Aes256Gcm),
        Ok(pb::KeyAlgorithm::Aes128GcmEsp) => Ok(KeyAlgorithm::Aes128GcmEsp),
        Ok(pb::KeyAlgorithm::Aes256GcmEsp) => Ok(KeyAlgorithm::Aes256GcmEsp),
        Ok(pb::KeyAlgorithm::Unspecified) => Err(Status::invalid_argument("key.algorithm: required")),
        Err(_) => Err(Status::invalid_argument(format!("key.algorithm: unknown value {value}"))),
    }
}

/// A request's crypto policy; unspecified means prefer hardware.
pub fn policy_from(value: i32, field: &str) -> Result<Policy, Status> {
    dpu_proto::mesh::crypto_policy(field, value).map_err(|e| Status::invalid_argument(e.to_string()))
}

pub use dpu_proto::mesh::crypto_policy_message as policy_message;

pub fn placement_message(policy: Policy, p: &Placement) -> pb::CryptoPlacement {
    pb::CryptoPlacement {
        policy: policy_message(policy) as i32,
        hardware: p.hardware,
        engine: p.engine.clone(),
        reason: p.reason.clone(),
    }
}

/// A placement the machine cannot satisfy is a precondition failure naming the field and what is missing.
pub fn crypto_status(field: &str, e: CryptoError) -> Status {
    match e {
        CryptoError::HardwareRequired(_) => Status::failed_precondition(format!("{field}: {e}")),
        other => Status::invalid_argument(format!("{field}: {other}")),
    }
}

fn key_status(e: KeyError) -> Status {
    match e {
        KeyError::Store(e) => intent_status(e),
        KeyError::Crypto(e) => {
            // Only the RNG or the key-encryption key can fail here: the agent's fault, not the request's.
            tracing::error!(error = %e, "sealing a key failed");
            Status::internal(format!("sealing the key failed: {e}"))
        }
        e @ (KeyError::NoKek(_) | KeyError::WrongKek { .. }) => Status::failed_precondition(e.to_string()),
        other => Status::invalid_argument(format!("key.material: {other}")),
    }
}

fn state_message(s: capabilities::State) -> pb::CapabilityState {
    match s {
        capabilities::State::Available => pb::CapabilityState::Available,
        capabilities::State::Unavailable => pb::CapabilityState::Unavailable,
        capabilities::State::Loadable => pb::CapabilityState::Loadable,
    }
}

/// Status-board name of the IPsec reconciler.
pub const IPSEC_SUBSYSTEM: &str = dpu_fabric::ipsec::SUBSYSTEM;

fn tunnel_from(t: pb::IpsecTunnel) -> Result<TunnelSpec, Status> {
    let parse = |field: &str, v: &str, what: &str| -> Result<String, Status> {
        if v.is_empty() {
            Err(Status::invalid_argument(format!("{field}: required ({what})")))
        } else {
            Ok(v.to_owned())
        }
    };
    let ip = |field: &str, v: &str| -> Result<std::net::IpAddr, Status> {
        parse(field, v, "an IP address")?
            .parse()
            .map_err(|_| Status::invalid_argument(format!("{field}: {v:?} is not an IP address")))
    };
    let net = |field: &str, v: &str| -> Result<dpu_fabric::model::IpNet, Status> {
        parse(field, v, "a prefix such as 10.1.0.0/24")?
            .parse()
            .map_err(|e: String| Status::invalid_argument(format!("{field}: {e}")))
    };
    let spec = TunnelSpec {
        local: ip("tunnel.local_address", &t.local_address)?,
        remote: ip("tunnel.remote_address", &t.remote_address)?,
        local_subnet: net("tunnel.local_subnet", &t.local_subnet)?,
        remote_subnet: net("tunnel.remote_subnet", &t.remote_subnet)?,
        spi_out: t.spi_out,
        spi_in: t.spi_in,
        key_out: t.key_out,
        key_in: t.key_in,
        policy: policy_from(t.policy, "tunnel.policy")?,
        device: t.device,
        rekey_overlap_seconds: match t.rekey_overlap_seconds {
            0 => dpu_fabric::ipsec::DEFAULT_REKEY_OVERLAP_SECONDS,
            s => s,
        },
    };
    spec.validate().map_err(invalid)?;
    Ok(spec)
}

#[tonic::async_trait]
impl pb::crypto_service_server::CryptoService for CryptoApi {
    async fn create_ipsec_tunnel(
        &self,
        r: Request<pb::CreateIpsecTunnelRequest>,
    ) -> Result<Response<pb::IpsecTunnel>, Status> {
        let r = r.into_inner();
        let spec = tunnel_from(r.tunnel.ok_or_else(|| Status::invalid_argument("tunnel: required"))?)?;
        let _guard = self.writes.lock().await;
        self.check_tunnel(&spec)?;
        let created = self.store.create(&r.tunnel_id, spec).map_err(intent_status)?;
        Ok(Response::new(self.tunnel_message(&created.into_stored())))
    }

    async fn update_ipsec_tunnel(
        &self,
        r: Request<pb::UpdateIpsecTunnelRequest>,
    ) -> Result<Response<pb::IpsecTunnel>, Status> {
        let r = r.into_inner();
        let t = r.tunnel.ok_or_else(|| Status::invalid_argument("tunnel: required"))?;
        let id = parse_name(&t.name, TunnelSpec::KIND, "tunnel.name")?.to_owned();
        let spec = tunnel_from(t)?;
        let expected = match r.expected_generation {
            0 => None,
            g => Some(u64::try_from(g).map_err(|_| Status::invalid_argument("expected_generation: negative"))?),
        };
        let _guard = self.writes.lock().await;
        self.check_tunnel(&spec)?;
        let updated = self.store.update(&id, spec, expected).map_err(intent_status)?;
        Ok(Response::new(self.tunnel_message(&updated)))
    }

    async fn get_ipsec_tunnel(
        &self,
        r: Request<pb::GetIpsecTunnelRequest>,
    ) -> Result<Response<pb::IpsecTunnel>, Status> {
        let id = parse_name(&r.get_ref().name, TunnelSpec::KIND, "name")?;
        let stored = self.store.get::<TunnelSpec>(id).map_err(intent_status)?;
        Ok(Response::new(self.tunnel_message(&stored)))
    }

    async fn list_ipsec_tunnels(
        &self,
        r: Request<pb::ListIpsecTunnelsRequest>,
    ) -> Result<Response<pb::ListIpsecTunnelsResponse>, Status> {
        let r = r.into_inner();
        let (size, token) = page(r.page_size, &r.page_token)?;
        let page = self.store.list::<TunnelSpec>(size, token).map_err(intent_status)?;
        Ok(Response::new(pb::ListIpsecTunnelsResponse {
            tunnels: page.items.iter().map(|t| self.tunnel_message(t)).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn delete_ipsec_tunnel(
        &self,
        r: Request<pb::DeleteIpsecTunnelRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let r = r.into_inner();
        let id = parse_name(&r.name, TunnelSpec::KIND, "name")?;
        self.store.delete::<TunnelSpec>(id, r.allow_missing).map_err(intent_status)?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn get_crypto_capabilities(
        &self,
        _: Request<pb::GetCryptoCapabilitiesRequest>,
    ) -> Result<Response<pb::CryptoCapabilities>, Status> {
        let found = tokio::task::spawn_blocking(capabilities::crypto_registry)
            .await
            .map_err(|e| Status::internal(format!("the capability probe failed: {e}")))?;
        Ok(Response::new(pb::CryptoCapabilities {
            capabilities: found
                .into_iter()
                .map(|c| pb::CryptoCapability {
                    subject: c.subject,
                    feature: c.feature.to_owned(),
                    state: state_message(c.state) as i32,
                    hardware: c.hardware,
                    detail: c.detail,
                })
                .collect(),
        }))
    }

    async fn create_crypto_key(
        &self,
        r: Request<pb::CreateCryptoKeyRequest>,
    ) -> Result<Response<pb::CryptoKey>, Status> {
        let r = r.into_inner();
        let mut key = r.key.ok_or_else(|| Status::invalid_argument("key: required"))?;
        // Taken out of the request at once, so the only copy left is the zeroizing one.
        let material = Secret::new(std::mem::take(&mut key.material));
        let algorithm = algorithm_from(key.algorithm)?;
        let spec = match (material.is_empty(), key.generate) {
            (false, false) => self.keys.seal(algorithm, &material).map_err(key_status)?,
            (true, true) => self.keys.generate(algorithm).map_err(key_status)?,
            (false, true) => return Err(Status::invalid_argument("key: material and generate exclude each other")),
            (true, false) => return Err(Status::invalid_argument("key.material: required unless generate is set")),
        };
        drop(material);
        let created = self.store.create(&r.key_id, spec).map_err(intent_status)?;
        tracing::info!(key = %r.key_id, algorithm = %algorithm, generated = key.generate, "crypto key stored");
        Ok(Response::new(self.key_message(created.into_stored())?))
    }

    async fn get_crypto_key(&self, r: Request<pb::GetCryptoKeyRequest>) -> Result<Response<pb::CryptoKey>, Status> {
        let id = parse_name(&r.get_ref().name, KeySpec::KIND, "name")?;
        let stored = self.store.get::<KeySpec>(id).map_err(intent_status)?;
        Ok(Response::new(self.key_message(stored)?))
    }

    async fn list_crypto_keys(
        &self,
        r: Request<pb::ListCryptoKeysRequest>,
    ) -> Result<Response<pb::ListCryptoKeysResponse>, Status> {
        let r = r.into_inner();
        let (size, token) = page(r.page_size, &r.page_token)?;
        let page = self.store.list::<KeySpec>(size, token).map_err(intent_status)?;
        Ok(Response::new(pb::ListCryptoKeysResponse {
            keys: page.items.into_iter().map(|k| self.key_message(k)).collect::<Result<_, _>>()?,
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn delete_crypto_key(
        &self,
        r: Request<pb::DeleteCryptoKeyRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let r = r.into_inner();
        let id = parse_name(&r.name, KeySpec::KIND, "name")?;
        let _guard = self.writes.lock().await;
        let users = self.users(id)?;
        if !users.is_empty() {
            return Err(Status::failed_precondition(format!(
                "{}/{id} is used by {}; delete those first",
                KeySpec::KIND,
                users.join(", ")
            )));
        }
        self.store.delete::<KeySpec>(id, r.allow_missing).map_err(intent_status)?;
        Ok(Response::new(pb::DeleteResponse {}))
    }
}
