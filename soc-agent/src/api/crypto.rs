//! `dpu.v1.CryptoService`: the crypto capability registry and the keys (`cryptoKeys/*`) the data paths use.
//! Keys are write-only: material comes in with Create, is checked and wrapped with the key-encryption key
//! before it reaches the intent store, and no answer carries it.

use std::sync::Arc;

use dpu_crypto::CryptoError;
use dpu_crypto::Secret;
use dpu_crypto::keys::{KeyAlgorithm, KeyError, KeySpec, Keys};
use dpu_crypto::policy::{Placement, Policy};
use dpu_intent::{Resource, Store, Stored};
use dpu_proto::v1 as pb;
use dpu_storage::model::{Backend, VolumeSpec};
use tokio::sync::Mutex;
use tonic::{Request, Response, Status};

use super::{generation, intent_status, page, parse_name};
use crate::capabilities;

/// Implementation of `CryptoService`.
#[derive(Debug)]
pub struct CryptoApi {
    store: Store,
    keys: Keys,
    /// The storage API's write lock: a key is not deleted while a volume that uses it is being created.
    writes: Arc<Mutex<()>>,
}

impl CryptoApi {
    pub fn new(store: Store, keys: Keys, writes: Arc<Mutex<()>>) -> Self {
        Self { store, keys, writes }
    }

    /// The resources that refer to `cryptoKeys/{id}`.
    fn users(&self, id: &str) -> Result<Vec<String>, Status> {
        Ok(self
            .store
            .list_all::<VolumeSpec>()
            .map_err(intent_status)?
            .into_iter()
            .filter(|v| matches!(&v.spec.backend, Backend::Encrypted(e) if e.key == id))
            .map(|v| format!("{}/{}", VolumeSpec::KIND, v.id))
            .collect())
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
    }
}

fn algorithm_from(value: i32) -> Result<KeyAlgorithm, Status> {
    match pb::KeyAlgorithm::try_from(value) {
        Ok(pb::KeyAlgorithm::Aes256Xts) => Ok(KeyAlgorithm::Aes256Xts),
        Ok(pb::KeyAlgorithm::Aes128Gcm) => Ok(KeyAlgorithm::Aes128Gcm),
        Ok(pb::KeyAlgorithm::Aes256Gcm) => Ok(KeyAlgorithm::Aes256Gcm),
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

#[tonic::async_trait]
impl pb::crypto_service_server::CryptoService for CryptoApi {
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
