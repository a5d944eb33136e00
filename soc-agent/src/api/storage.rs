//! `dpu.v1.StorageService`: volumes, subsystems and their namespaces and listeners, as persisted intent.
//! Namespaces and listeners are stored inside their subsystem; every change here is one store write.

use std::collections::BTreeSet;
use std::sync::Arc;

use dpu_crypto::keys::{KeyAlgorithm, KeySpec};
use dpu_intent::reconcile::{ObjectKey, StatusBoard};
use dpu_intent::{Meta, Resource, Store, Stored};
use dpu_proto::v1 as pb;
use dpu_storage::model::{
    Backend, EncryptedSpec, Engine, ListenerSpec, NamespaceSpec, SpdkBdevSpec, SpdkCreate, SubsystemSpec, VolumeSpec,
    format_uuid, random_uuid,
};
use dpu_storage::target::StatsSource;
use tokio::sync::Mutex;
use tonic::{Request, Response, Status};

use super::agent::{object_status, resource_status};
use super::crypto::{crypto_status, placement_message, policy_from};
use super::{generation, intent_status, invalid, page, parse_name};

/// Status-board name of the storage reconciler.
pub const STORAGE_SUBSYSTEM: &str = "storage";

/// Implementation of `StorageService`.
#[derive(Debug)]
pub struct StorageApi {
    store: Store,
    status: StatusBoard,
    stats: StatsSource,
    /// Serializes read-modify-write of subsystems (children are stored inside their parent); shared with the
    /// image API, which exports layers as namespaces.
    writes: Arc<Mutex<()>>,
    /// Why SPDK volumes and subsystems are refused; `None` when the agent runs SPDK.
    no_spdk: Option<String>,
}

impl StorageApi {
    /// `no_spdk`: why this agent cannot serve SPDK volumes and subsystems (`None`: it runs SPDK).
    pub fn new(store: Store, status: StatusBoard, stats: StatsSource, no_spdk: Option<String>) -> Self {
        Self { store, status, stats, writes: Arc::default(), no_spdk }
    }

    /// FAILED_PRECONDITION naming why, when this agent has no SPDK.
    fn require_spdk(&self, field: &str) -> Result<(), Status> {
        match &self.no_spdk {
            None => Ok(()),
            Some(reason) => Err(Status::failed_precondition(format!("{field}: {reason}"))),
        }
    }

    /// The lock every read-modify-write of a subsystem takes.
    pub fn subsystem_writes(&self) -> Arc<Mutex<()>> {
        self.writes.clone()
    }

    fn status_of(&self, kind: &str, id: &str, meta: &Meta) -> pb::ResourceStatus {
        let key = ObjectKey { kind: kind.into(), id: id.into() };
        object_status(self.status.get(STORAGE_SUBSYSTEM, &key), meta)
    }

    /// The status of an object kept inside `parent` (a namespace or listener of a subsystem).
    fn child_status(&self, kind: &str, id: &str, parent: &Meta) -> pb::ResourceStatus {
        let key = ObjectKey { kind: kind.into(), id: id.into() };
        resource_status(self.status.get(STORAGE_SUBSYSTEM, &key), parent.generation)
    }

    fn volume_message(&self, stored: Stored<VolumeSpec>) -> pb::Volume {
        let backend = match &stored.spec.backend {
            Backend::Malloc => pb::volume::Backend::Malloc(pb::MallocBackend {}),
            Backend::File { path } => pb::volume::Backend::File(pb::FileBackend { path: path.display().to_string() }),
            Backend::Null => pb::volume::Backend::Null(pb::NullBackend {}),
            Backend::Spdk(b) => pb::volume::Backend::Spdk(pb::SpdkBackend {
                bdev: b.bdev.clone(),
                create: b.create.as_ref().map(|c| match c {
                    SpdkCreate::Malloc => pb::spdk_backend::Create::Malloc(pb::SpdkMalloc {}),
                    SpdkCreate::Aio { path } => {
                        pb::spdk_backend::Create::Aio(pb::SpdkAio { path: path.display().to_string() })
                    }
                    SpdkCreate::Nvme { traddr } => {
                        pb::spdk_backend::Create::Nvme(pb::SpdkNvme { traddr: traddr.clone() })
                    }
                }),
            }),
            Backend::Encrypted(e) => pb::volume::Backend::Encrypted(pb::EncryptedBackend {
                base: format!("volumes/{}", e.base),
                key: format!("{}/{}", KeySpec::KIND, e.key),
                data_unit_size: e.data_unit,
                policy: super::crypto::policy_message(e.policy) as i32,
            }),
        };
        let crypto = match &stored.spec.backend {
            Backend::Encrypted(e) => Some(match dpu_storage::bdev::encryption_placement(e.policy) {
                Ok(p) => placement_message(e.policy, &p),
                Err(err) => pb::CryptoPlacement {
                    policy: super::crypto::policy_message(e.policy) as i32,
                    reason: err.to_string(),
                    ..Default::default()
                },
            }),
            _ => None,
        };
        pb::Volume {
            name: format!("volumes/{}", stored.id),
            block_size: stored.spec.block_size,
            size_bytes: stored.spec.size_bytes,
            backend: Some(backend),
            generation: generation(stored.meta.generation),
            status: Some(self.status_of(VolumeSpec::KIND, &stored.id, &stored.meta)),
            crypto,
        }
    }

    fn subsystem_message(&self, stored: &Stored<SubsystemSpec>) -> pb::Subsystem {
        let s = &stored.spec;
        pb::Subsystem {
            name: format!("subsystems/{}", stored.id),
            nqn: s.nqn.clone(),
            serial: s.serial.clone(),
            model: s.model.clone(),
            allow_any_host: s.allow_any_host,
            allowed_hosts: s.allowed_hosts.iter().cloned().collect(),
            engine: s.engine.as_str().into(),
            generation: generation(stored.meta.generation),
            status: Some(self.status_of(SubsystemSpec::KIND, &stored.id, &stored.meta)),
        }
    }

    fn namespace_message(&self, parent: &Stored<SubsystemSpec>, id: &str, ns: &NamespaceSpec) -> pb::Namespace {
        let child = format!("{}/{id}", parent.id);
        pb::Namespace {
            name: format!("subsystems/{}/namespaces/{id}", parent.id),
            nsid: ns.nsid,
            volume: match &ns.layer {
                None => format!("volumes/{}", ns.volume),
                Some(layer) => format!("layers/{}", layer.source),
            },
            uuid: format_uuid(&ns.uuid),
            generation: generation(parent.meta.generation),
            status: Some(self.child_status("namespaces", &child, &parent.meta)),
        }
    }

    fn listener_message(&self, parent: &Stored<SubsystemSpec>, id: &str, l: &ListenerSpec) -> pb::Listener {
        let child = format!("{}/{id}", parent.id);
        pb::Listener {
            name: format!("subsystems/{}/listeners/{id}", parent.id),
            address: l.address.to_string(),
            generation: generation(parent.meta.generation),
            status: Some(self.child_status("listeners", &child, &parent.meta)),
        }
    }

    fn subsystem(&self, id: &str) -> Result<Stored<SubsystemSpec>, Status> {
        self.store.get::<SubsystemSpec>(id).map_err(intent_status)
    }

    /// Applies `change` to a subsystem and writes it, refusing results that do not validate.
    fn modify_subsystem(
        &self,
        id: &str,
        change: impl FnOnce(&mut SubsystemSpec) -> Result<(), Status>,
    ) -> Result<Stored<SubsystemSpec>, Status> {
        let current = self.subsystem(id)?;
        let mut spec = current.spec.clone();
        change(&mut spec)?;
        spec.validate().map_err(invalid)?;
        self.store.update(id, spec, Some(current.meta.generation)).map_err(intent_status)
    }
}

impl StorageApi {
    /// Deletes the child `name` (`subsystems/{s}/{child}/{id}`) with `remove`, which reports whether it existed.
    async fn delete_child(
        &self,
        name: &str,
        child: &str,
        allow_missing: bool,
        remove: impl Fn(&mut SubsystemSpec, &str) -> bool,
    ) -> Result<(), Status> {
        let (s, id) = parse_child(name, child)?;
        let _guard = self.writes.lock().await;
        let exists = match self.store.get::<SubsystemSpec>(s) {
            Ok(mut parent) => remove(&mut parent.spec, id),
            Err(dpu_intent::Error::NotFound { .. }) => false,
            Err(e) => return Err(intent_status(e)),
        };
        match (exists, allow_missing) {
            (true, _) => self
                .modify_subsystem(s, |spec| {
                    remove(spec, id);
                    Ok(())
                })
                .map(drop),
            (false, true) => Ok(()),
            (false, false) => Err(Status::not_found(format!("{name} does not exist"))),
        }
    }
}

/// Parses `subsystems/{s}/{child}/{id}` into (s, id).
fn parse_child<'a>(name: &'a str, child: &str) -> Result<(&'a str, &'a str), Status> {
    let parts: Vec<&str> = name.split('/').collect();
    match parts.as_slice() {
        ["subsystems", s, c, id] if *c == child => {
            for part in [s, id] {
                dpu_intent::validate_id(part).map_err(|e| Status::invalid_argument(format!("name: {e}")))?;
            }
            Ok((s, id))
        }
        _ => Err(Status::invalid_argument(format!("name: {name:?} is not subsystems/{{subsystem}}/{child}/{{id}}"))),
    }
}

fn parse_uuid(text: &str) -> Result<[u8; 16], Status> {
    dpu_storage::model::parse_uuid(text)
        .ok_or_else(|| Status::invalid_argument(format!("namespace.uuid: {text:?} is not a UUID")))
}

/// Validates an incoming volume into the domain type. An encrypted volume takes its geometry from its base and
/// needs an existing AES-256-XTS key, and a policy this machine can satisfy.
fn volume_from(store: &Store, v: pb::Volume) -> Result<VolumeSpec, Status> {
    let mut block_size = v.block_size;
    let mut size_bytes = v.size_bytes;
    let backend = match v.backend {
        Some(pb::volume::Backend::Malloc(_)) => Backend::Malloc,
        Some(pb::volume::Backend::File(f)) => Backend::File { path: f.path.into() },
        Some(pb::volume::Backend::Null(_)) => Backend::Null,
        Some(pb::volume::Backend::Spdk(b)) => Backend::Spdk(SpdkBdevSpec {
            bdev: b.bdev,
            create: b.create.map(|c| match c {
                pb::spdk_backend::Create::Malloc(_) => SpdkCreate::Malloc,
                pb::spdk_backend::Create::Aio(a) => SpdkCreate::Aio { path: a.path.into() },
                pb::spdk_backend::Create::Nvme(n) => SpdkCreate::Nvme { traddr: n.traddr },
            }),
        }),
        Some(pb::volume::Backend::Encrypted(e)) => {
            let base = parse_name(&e.base, VolumeSpec::KIND, "volume.encrypted.base")?.to_owned();
            let key = parse_name(&e.key, KeySpec::KIND, "volume.encrypted.key")?.to_owned();
            let policy = policy_from(e.policy, "volume.encrypted.policy")?;
            let base_spec = store.get::<VolumeSpec>(&base).map_err(|err| match err {
                dpu_intent::Error::NotFound { .. } => {
                    Status::failed_precondition(format!("volume.encrypted.base: volumes/{base} does not exist"))
                }
                other => intent_status(other),
            })?;
            if matches!(base_spec.spec.backend, Backend::Encrypted(_)) {
                return Err(Status::invalid_argument(format!(
                    "volume.encrypted.base: volumes/{base} is encrypted itself; encrypt its base instead"
                )));
            }
            let differs = |field: &str, given: u64, base_value: u64| {
                Status::invalid_argument(format!(
                    "{field}: {given} differs from volumes/{base}'s {base_value} (0 takes the base's)"
                ))
            };
            match block_size {
                0 => block_size = base_spec.spec.block_size,
                b if b != base_spec.spec.block_size => {
                    return Err(differs("volume.block_size", b.into(), base_spec.spec.block_size.into()));
                }
                _ => {}
            }
            match size_bytes {
                0 => size_bytes = base_spec.spec.size_bytes,
                b if b != base_spec.spec.size_bytes => {
                    return Err(differs("volume.size_bytes", b, base_spec.spec.size_bytes));
                }
                _ => {}
            }
            match store.get::<KeySpec>(&key) {
                Ok(k) if k.spec.algorithm == KeyAlgorithm::Aes256Xts => {}
                Ok(k) => {
                    return Err(Status::failed_precondition(format!(
                        "volume.encrypted.key: cryptoKeys/{key} is an {} key; encrypted volumes need aes-256-xts",
                        k.spec.algorithm
                    )));
                }
                Err(dpu_intent::Error::NotFound { .. }) => {
                    return Err(Status::failed_precondition(format!(
                        "volume.encrypted.key: cryptoKeys/{key} does not exist"
                    )));
                }
                Err(other) => return Err(intent_status(other)),
            }
            dpu_storage::bdev::encryption_placement(policy).map_err(|e| crypto_status("volume.encrypted.policy", e))?;
            let data_unit = if e.data_unit_size == 0 { block_size } else { e.data_unit_size };
            Backend::Encrypted(EncryptedSpec { base, key, data_unit, policy })
        }
        None => {
            return Err(Status::invalid_argument(
                "volume.backend: one of malloc, file, null, encrypted, spdk is required",
            ));
        }
    };
    let spec = VolumeSpec { block_size: if block_size == 0 { 512 } else { block_size }, size_bytes, backend };
    spec.validate().map_err(invalid)?;
    Ok(spec)
}

fn subsystem_from(id: &str, s: pb::Subsystem) -> Result<SubsystemSpec, Status> {
    let spec = SubsystemSpec {
        nqn: s.nqn,
        serial: if s.serial.is_empty() { id.chars().take(20).collect() } else { s.serial },
        model: if s.model.is_empty() { "dpu-agent".into() } else { s.model },
        allow_any_host: s.allow_any_host,
        allowed_hosts: s.allowed_hosts.into_iter().collect::<BTreeSet<_>>(),
        engine: s.engine.parse::<Engine>().map_err(|e| Status::invalid_argument(format!("subsystem.engine: {e}")))?,
        namespaces: Default::default(),
        listeners: Default::default(),
    };
    spec.validate().map_err(invalid)?;
    Ok(spec)
}

#[tonic::async_trait]
impl pb::storage_service_server::StorageService for StorageApi {
    async fn create_volume(&self, r: Request<pb::CreateVolumeRequest>) -> Result<Response<pb::Volume>, Status> {
        let r = r.into_inner();
        let _guard = self.writes.lock().await;
        let spec = volume_from(&self.store, r.volume.ok_or_else(|| Status::invalid_argument("volume: required"))?)?;
        if matches!(spec.backend, Backend::Spdk(_)) {
            self.require_spdk("volume.spdk")?;
        }
        let created = self.store.create(&r.volume_id, spec).map_err(intent_status)?;
        Ok(Response::new(self.volume_message(created.into_stored())))
    }

    async fn get_volume(&self, r: Request<pb::GetVolumeRequest>) -> Result<Response<pb::Volume>, Status> {
        let id = parse_name(&r.get_ref().name, "volumes", "name")?;
        Ok(Response::new(self.volume_message(self.store.get::<VolumeSpec>(id).map_err(intent_status)?)))
    }

    async fn list_volumes(
        &self,
        r: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let r = r.into_inner();
        let (size, token) = page(r.page_size, &r.page_token)?;
        let page = self.store.list::<VolumeSpec>(size, token).map_err(intent_status)?;
        Ok(Response::new(pb::ListVolumesResponse {
            volumes: page.items.into_iter().map(|v| self.volume_message(v)).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn delete_volume(&self, r: Request<pb::DeleteVolumeRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        let r = r.into_inner();
        let id = parse_name(&r.name, "volumes", "name")?;
        let _guard = self.writes.lock().await;
        for volume in self.store.list_all::<VolumeSpec>().map_err(intent_status)? {
            if let Backend::Encrypted(e) = &volume.spec.backend
                && e.base == id
            {
                return Err(Status::failed_precondition(format!(
                    "volumes/{id} is the base of the encrypted volumes/{}; delete that first",
                    volume.id
                )));
            }
        }
        for subsystem in self.store.list_all::<SubsystemSpec>().map_err(intent_status)? {
            if let Some((ns, _)) = subsystem.spec.namespaces.iter().find(|(_, ns)| ns.volume == id) {
                return Err(Status::failed_precondition(format!(
                    "volumes/{id} is exported as subsystems/{}/namespaces/{ns}; delete the namespace first",
                    subsystem.id
                )));
            }
        }
        self.store.delete::<VolumeSpec>(id, r.allow_missing).map_err(intent_status)?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn create_subsystem(
        &self,
        r: Request<pb::CreateSubsystemRequest>,
    ) -> Result<Response<pb::Subsystem>, Status> {
        let r = r.into_inner();
        let spec = subsystem_from(
            &r.subsystem_id,
            r.subsystem.ok_or_else(|| Status::invalid_argument("subsystem: required"))?,
        )?;
        if spec.engine == Engine::Spdk {
            self.require_spdk("subsystem.engine")?;
        }
        let _guard = self.writes.lock().await;
        for other in self.store.list_all::<SubsystemSpec>().map_err(intent_status)? {
            if other.spec.nqn == spec.nqn && other.id != r.subsystem_id {
                return Err(Status::already_exists(format!("NQN {} is used by subsystems/{}", spec.nqn, other.id)));
            }
        }
        // Re-creating an existing subsystem compares only its own fields, not its children.
        if let Ok(existing) = self.store.get::<SubsystemSpec>(&r.subsystem_id) {
            let mut same = existing.spec.clone();
            same.namespaces.clear();
            same.listeners.clear();
            return if same == spec {
                Ok(Response::new(self.subsystem_message(&existing)))
            } else {
                Err(Status::already_exists(format!("subsystems/{} exists with a different spec", r.subsystem_id)))
            };
        }
        let created = self.store.create(&r.subsystem_id, spec).map_err(intent_status)?;
        Ok(Response::new(self.subsystem_message(&created.into_stored())))
    }

    async fn get_subsystem(&self, r: Request<pb::GetSubsystemRequest>) -> Result<Response<pb::Subsystem>, Status> {
        let id = parse_name(&r.get_ref().name, "subsystems", "name")?;
        Ok(Response::new(self.subsystem_message(&self.subsystem(id)?)))
    }

    async fn list_subsystems(
        &self,
        r: Request<pb::ListSubsystemsRequest>,
    ) -> Result<Response<pb::ListSubsystemsResponse>, Status> {
        let r = r.into_inner();
        let (size, token) = page(r.page_size, &r.page_token)?;
        let page = self.store.list::<SubsystemSpec>(size, token).map_err(intent_status)?;
        Ok(Response::new(pb::ListSubsystemsResponse {
            subsystems: page.items.iter().map(|s| self.subsystem_message(s)).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn delete_subsystem(
        &self,
        r: Request<pb::DeleteSubsystemRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let r = r.into_inner();
        let id = parse_name(&r.name, "subsystems", "name")?;
        let _guard = self.writes.lock().await;
        self.store.delete::<SubsystemSpec>(id, r.allow_missing).map_err(intent_status)?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn create_namespace(
        &self,
        r: Request<pb::CreateNamespaceRequest>,
    ) -> Result<Response<pb::Namespace>, Status> {
        let r = r.into_inner();
        let parent = parse_name(&r.parent, "subsystems", "parent")?;
        dpu_intent::validate_id(&r.namespace_id).map_err(|e| Status::invalid_argument(format!("namespace_id: {e}")))?;
        let ns = r.namespace.ok_or_else(|| Status::invalid_argument("namespace: required"))?;
        let volume = parse_name(&ns.volume, "volumes", "namespace.volume")?.to_owned();
        let uuid = if ns.uuid.is_empty() { None } else { Some(parse_uuid(&ns.uuid)?) };
        let _guard = self.writes.lock().await;
        self.store.get::<VolumeSpec>(&volume).map_err(|e| match e {
            dpu_intent::Error::NotFound { .. } => {
                Status::failed_precondition(format!("namespace.volume: volumes/{volume} does not exist"))
            }
            e => intent_status(e),
        })?;
        let current = self.subsystem(parent)?;
        if let Some(existing) = current.spec.namespaces.get(&r.namespace_id) {
            let same = existing.volume == volume
                && (ns.nsid == 0 || ns.nsid == existing.nsid)
                && uuid.is_none_or(|u| u == existing.uuid);
            return if same {
                Ok(Response::new(self.namespace_message(&current, &r.namespace_id, existing)))
            } else {
                Err(Status::already_exists(format!(
                    "{}/namespaces/{} exists with a different spec",
                    r.parent, r.namespace_id
                )))
            };
        }
        let mut users = Vec::new();
        for s in self.store.list_all::<SubsystemSpec>().map_err(intent_status)? {
            users.extend(
                s.spec
                    .namespaces
                    .iter()
                    .filter(|(_, n)| n.volume == volume)
                    .map(|(n, _)| format!("subsystems/{}/namespaces/{n}", s.id)),
            );
        }
        if let Some(user) = users.first() {
            return Err(Status::failed_precondition(format!("volumes/{volume} is already exported as {user}")));
        }
        let namespace_id = r.namespace_id.clone();
        let stored = self.modify_subsystem(parent, |spec| {
            let nsid = match ns.nsid {
                0 => spec.free_nsid().ok_or_else(|| Status::resource_exhausted("no free namespace id"))?,
                n => n,
            };
            if let Some((other, _)) = spec.namespaces.iter().find(|(_, n)| n.nsid == nsid) {
                return Err(Status::already_exists(format!("nsid {nsid} is used by namespace {other}")));
            }
            spec.namespaces.insert(
                namespace_id.clone(),
                NamespaceSpec { nsid, volume, uuid: uuid.unwrap_or_else(random_uuid), layer: None },
            );
            Ok(())
        })?;
        let ns = &stored.spec.namespaces[&namespace_id];
        Ok(Response::new(self.namespace_message(&stored, &namespace_id, ns)))
    }

    async fn get_namespace(&self, r: Request<pb::GetNamespaceRequest>) -> Result<Response<pb::Namespace>, Status> {
        let (s, id) = parse_child(&r.get_ref().name, "namespaces")?;
        let parent = self.subsystem(s)?;
        let ns = parent
            .spec
            .namespaces
            .get(id)
            .ok_or_else(|| Status::not_found(format!("{} does not exist", r.get_ref().name)))?;
        Ok(Response::new(self.namespace_message(&parent, id, ns)))
    }

    async fn list_namespaces(
        &self,
        r: Request<pb::ListNamespacesRequest>,
    ) -> Result<Response<pb::ListNamespacesResponse>, Status> {
        let parent = self.subsystem(parse_name(&r.get_ref().parent, "subsystems", "parent")?)?;
        Ok(Response::new(pb::ListNamespacesResponse {
            namespaces: parent.spec.namespaces.iter().map(|(id, ns)| self.namespace_message(&parent, id, ns)).collect(),
            next_page_token: String::new(),
        }))
    }

    async fn delete_namespace(
        &self,
        r: Request<pb::DeleteNamespaceRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let r = r.into_inner();
        self.delete_child(&r.name, "namespaces", r.allow_missing, |spec, id| spec.namespaces.remove(id).is_some())
            .await?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn create_listener(&self, r: Request<pb::CreateListenerRequest>) -> Result<Response<pb::Listener>, Status> {
        let r = r.into_inner();
        let parent = parse_name(&r.parent, "subsystems", "parent")?;
        dpu_intent::validate_id(&r.listener_id).map_err(|e| Status::invalid_argument(format!("listener_id: {e}")))?;
        let l = r.listener.ok_or_else(|| Status::invalid_argument("listener: required"))?;
        let address = l
            .address
            .parse()
            .map_err(|e| Status::invalid_argument(format!("listener.address: {:?} is not IP:PORT: {e}", l.address)))?;
        let spec = ListenerSpec { address };
        let _guard = self.writes.lock().await;
        let current = self.subsystem(parent)?;
        if let Some(existing) = current.spec.listeners.get(&r.listener_id) {
            return if *existing == spec {
                Ok(Response::new(self.listener_message(&current, &r.listener_id, existing)))
            } else {
                Err(Status::already_exists(format!(
                    "{}/listeners/{} exists with a different spec",
                    r.parent, r.listener_id
                )))
            };
        }
        let listener_id = r.listener_id.clone();
        let stored = self.modify_subsystem(parent, |s| {
            s.listeners.insert(listener_id.clone(), spec);
            Ok(())
        })?;
        let l = &stored.spec.listeners[&r.listener_id];
        Ok(Response::new(self.listener_message(&stored, &r.listener_id, l)))
    }

    async fn get_listener(&self, r: Request<pb::GetListenerRequest>) -> Result<Response<pb::Listener>, Status> {
        let (s, id) = parse_child(&r.get_ref().name, "listeners")?;
        let parent = self.subsystem(s)?;
        let l = parent
            .spec
            .listeners
            .get(id)
            .ok_or_else(|| Status::not_found(format!("{} does not exist", r.get_ref().name)))?;
        Ok(Response::new(self.listener_message(&parent, id, l)))
    }

    async fn list_listeners(
        &self,
        r: Request<pb::ListListenersRequest>,
    ) -> Result<Response<pb::ListListenersResponse>, Status> {
        let parent = self.subsystem(parse_name(&r.get_ref().parent, "subsystems", "parent")?)?;
        Ok(Response::new(pb::ListListenersResponse {
            listeners: parent.spec.listeners.iter().map(|(id, l)| self.listener_message(&parent, id, l)).collect(),
            next_page_token: String::new(),
        }))
    }

    async fn delete_listener(
        &self,
        r: Request<pb::DeleteListenerRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let r = r.into_inner();
        self.delete_child(&r.name, "listeners", r.allow_missing, |spec, id| spec.listeners.remove(id).is_some())
            .await?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn get_storage_stats(
        &self,
        _: Request<pb::GetStorageStatsRequest>,
    ) -> Result<Response<pb::StorageStats>, Status> {
        use std::sync::atomic::Ordering::Relaxed;
        let volumes = self
            .stats
            .snapshot()
            .into_iter()
            .map(|(id, s)| pb::VolumeStats {
                volume: format!("volumes/{id}"),
                reads: s.reads.load(Relaxed),
                writes: s.writes.load(Relaxed),
                read_bytes: s.read_bytes.load(Relaxed),
                written_bytes: s.written_bytes.load(Relaxed),
                flushes: s.flushes.load(Relaxed),
                discards: s.discards.load(Relaxed),
                errors: s.errors.load(Relaxed),
                latency_us_buckets: s.latency_us.iter().map(|b| b.load(Relaxed)).collect(),
            })
            .collect();
        Ok(Response::new(pb::StorageStats { volumes }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(parse_name("volumes/vol-1", "volumes", "name").unwrap(), "vol-1");
        assert_eq!(parse_name("vol-1", "volumes", "name").unwrap(), "vol-1");
        assert_eq!(parse_name("volumes/Vol", "volumes", "name").unwrap_err().code(), tonic::Code::InvalidArgument);
        assert_eq!(parse_child("subsystems/s1/namespaces/n1", "namespaces").unwrap(), ("s1", "n1"));
        assert!(parse_child("subsystems/s1/listeners/n1", "namespaces").is_err());
    }

    #[test]
    fn uuid_field() {
        assert_eq!(parse_uuid("xyz").unwrap_err().code(), tonic::Code::InvalidArgument);
        assert_eq!(parse_uuid(&format_uuid(&[9; 16])).unwrap(), [9; 16]);
    }
}
