//! `dpu.v1.MeshService`: the shared proxy's workloads, certificates, clusters, route tables, listeners and
//! policies as persisted intent. Every kind has the same five verbs, so they share one generic implementation;
//! the conversions (with field-named validation) live in `dpu_proto::mesh`.

use dpu_intent::reconcile::{ObjectKey, StatusBoard};
use dpu_intent::{Invalid, Resource, Store, Stored};
use dpu_mesh::{
    CertificateSpec, ClusterSpec, ListenerSpec, MeshSpecs, Policy, PolicySpec, RouteTableSpec, WorkloadSpec,
};
use dpu_proto::v1 as pb;
use dpu_proxy::Proxy;
use tokio::sync::Mutex;
use tonic::{Request, Response, Status};

use super::agent::object_status;
use super::{generation, intent_status, invalid, page, parse_name};

/// Status-board name of the mesh reconciler.
pub const MESH_SUBSYSTEM: &str = dpu_proxy::reconcile::SUBSYSTEM;

/// A mesh resource kind: its protobuf message and the conversions both ways.
trait Kind: Resource + Sized {
    type Pb: Send + 'static;
    /// Field name of the message in requests ("cluster").
    const FIELD: &'static str;
    fn from_pb(pb: Self::Pb) -> Result<Self, Invalid>;
    fn name_of(pb: &Self::Pb) -> &str;
    fn message(&self, name: String, generation: i64, status: pb::ResourceStatus) -> Self::Pb;
    /// The kernel TLS policy of the object's TLS settings, with its field name.
    fn kernel_tls(&self) -> Option<(Policy, &'static str)> {
        None
    }
}

macro_rules! kind {
    ($spec:ty, $pb:ty, $field:literal $(, $kernel_tls:expr)?) => {
        impl Kind for $spec {
            type Pb = $pb;
            const FIELD: &'static str = $field;
            fn from_pb(pb: $pb) -> Result<Self, Invalid> {
                <$spec>::try_from(pb)
            }
            fn name_of(pb: &$pb) -> &str {
                &pb.name
            }
            fn message(&self, name: String, generation: i64, status: pb::ResourceStatus) -> $pb {
                let mut pb = <$pb>::from(self);
                pb.name = name;
                pb.generation = generation;
                pb.status = Some(status);
                pb
            }
            $(fn kernel_tls(&self) -> Option<(Policy, &'static str)> {
                ($kernel_tls)(self)
            })?
        }
    };
}

kind!(WorkloadSpec, pb::MeshWorkload, "workload");
kind!(CertificateSpec, pb::MeshCertificate, "certificate");
kind!(ClusterSpec, pb::MeshCluster, "cluster", |c: &ClusterSpec| {
    c.tls.as_ref().and_then(|t| t.kernel_tls).map(|p| (p, "cluster.tls.kernel_tls"))
});
kind!(RouteTableSpec, pb::MeshRouteTable, "route_table");
kind!(ListenerSpec, pb::MeshListener, "listener", |l: &ListenerSpec| {
    l.tls.as_ref().and_then(|t| t.kernel_tls).map(|p| (p, "listener.tls.kernel_tls"))
});
kind!(PolicySpec, pb::MeshPolicy, "policy");

/// Implementation of `MeshService`.
#[derive(Debug)]
pub struct MeshApi {
    store: Store,
    status: StatusBoard,
    proxy: Proxy,
    /// Serializes deletes with their reference checks.
    writes: Mutex<()>,
}

impl MeshApi {
    pub fn new(store: Store, status: StatusBoard, proxy: Proxy) -> Self {
        Self { store, status, proxy, writes: Mutex::new(()) }
    }

    fn message<T: Kind>(&self, stored: &Stored<T>) -> T::Pb {
        let key = ObjectKey { kind: T::KIND.into(), id: stored.id.clone() };
        let status = object_status(self.status.get(MESH_SUBSYSTEM, &key), &stored.meta);
        stored.spec.message(format!("{}/{}", T::KIND, stored.id), generation(stored.meta.generation), status)
    }

    fn create<T: Kind>(&self, id: &str, pb: Option<T::Pb>) -> Result<Response<T::Pb>, Status> {
        let pb = pb.ok_or_else(|| Status::invalid_argument(format!("{}: required", T::FIELD)))?;
        let spec = T::from_pb(pb).map_err(invalid)?;
        check_kernel_tls(&spec)?;
        let created = self.store.create(id, spec).map_err(intent_status)?;
        Ok(Response::new(self.message(&created.into_stored())))
    }

    fn get<T: Kind>(&self, name: &str) -> Result<Response<T::Pb>, Status> {
        let id = parse_name(name, T::KIND, "name")?;
        Ok(Response::new(self.message(&self.store.get::<T>(id).map_err(intent_status)?)))
    }

    fn list<T: Kind>(&self, r: &pb::ListMeshResourcesRequest) -> Result<(Vec<T::Pb>, String), Status> {
        let (size, token) = page(r.page_size, &r.page_token)?;
        let page = self.store.list::<T>(size, token).map_err(intent_status)?;
        Ok((page.items.iter().map(|s| self.message(s)).collect(), page.next_page_token.unwrap_or_default()))
    }

    fn update<T: Kind>(&self, pb: Option<T::Pb>, expected_generation: i64) -> Result<Response<T::Pb>, Status> {
        let pb = pb.ok_or_else(|| Status::invalid_argument(format!("{}: required", T::FIELD)))?;
        let id = parse_name(T::name_of(&pb), T::KIND, &format!("{}.name", T::FIELD))?.to_owned();
        let spec = T::from_pb(pb).map_err(invalid)?;
        check_kernel_tls(&spec)?;
        let expected = match expected_generation {
            0 => None,
            g => Some(u64::try_from(g).map_err(|_| Status::invalid_argument("expected_generation: negative"))?),
        };
        let updated = self.store.update(&id, spec, expected).map_err(intent_status)?;
        Ok(Response::new(self.message(&updated)))
    }

    /// Deletes unless another object still refers to this one (FailedPrecondition naming the referrer).
    async fn delete<T: Kind>(&self, r: pb::DeleteMeshResourceRequest) -> Result<Response<pb::DeleteResponse>, Status> {
        let id = parse_name(&r.name, T::KIND, "name")?;
        let _guard = self.writes.lock().await;
        let specs = dpu_proxy::reconcile::load_specs(&self.store).map_err(intent_status)?;
        if let Some(r) = referrer(&specs, T::KIND, id) {
            return Err(Status::failed_precondition(format!(
                "{}/{id} is used by {}/{} ({}); change that first",
                T::KIND,
                r.from.0,
                r.from.1,
                r.field
            )));
        }
        self.store.delete::<T>(id, r.allow_missing).map_err(intent_status)?;
        Ok(Response::new(pb::DeleteResponse {}))
    }
}

/// `require-hardware` kernel TLS is refused up front where no device can offload it (each connection is checked
/// again against what the kernel actually did).
fn check_kernel_tls<T: Kind>(spec: &T) -> Result<(), Status> {
    match spec.kernel_tls() {
        Some((Policy::RequireHardware, field)) => crate::capabilities::kernel_tls_hardware()
            .map(drop)
            .map_err(|missing| Status::failed_precondition(format!("{field}: require-hardware: {missing}"))),
        _ => Ok(()),
    }
}

fn referrer(specs: &MeshSpecs, kind: &str, id: &str) -> Option<dpu_mesh::Reference> {
    specs.references().into_iter().find(|r| r.to.0 == kind && r.to.1 == id)
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl pb::mesh_service_server::MeshService for MeshApi {
    async fn create_mesh_workload(&self, r: Request<pb::CreateMeshWorkloadRequest>) -> Reply<pb::MeshWorkload> {
        let r = r.into_inner();
        self.create::<WorkloadSpec>(&r.workload_id, r.workload)
    }
    async fn get_mesh_workload(&self, r: Request<pb::GetMeshResourceRequest>) -> Reply<pb::MeshWorkload> {
        self.get::<WorkloadSpec>(&r.get_ref().name)
    }
    async fn list_mesh_workloads(
        &self,
        r: Request<pb::ListMeshResourcesRequest>,
    ) -> Reply<pb::ListMeshWorkloadsResponse> {
        let (workloads, next_page_token) = self.list::<WorkloadSpec>(r.get_ref())?;
        Ok(Response::new(pb::ListMeshWorkloadsResponse { workloads, next_page_token }))
    }
    async fn update_mesh_workload(&self, r: Request<pb::UpdateMeshWorkloadRequest>) -> Reply<pb::MeshWorkload> {
        let r = r.into_inner();
        self.update::<WorkloadSpec>(r.workload, r.expected_generation)
    }
    async fn delete_mesh_workload(&self, r: Request<pb::DeleteMeshResourceRequest>) -> Reply<pb::DeleteResponse> {
        self.delete::<WorkloadSpec>(r.into_inner()).await
    }

    async fn create_mesh_certificate(
        &self,
        r: Request<pb::CreateMeshCertificateRequest>,
    ) -> Reply<pb::MeshCertificate> {
        let r = r.into_inner();
        self.create::<CertificateSpec>(&r.certificate_id, r.certificate)
    }
    async fn get_mesh_certificate(&self, r: Request<pb::GetMeshResourceRequest>) -> Reply<pb::MeshCertificate> {
        self.get::<CertificateSpec>(&r.get_ref().name)
    }
    async fn list_mesh_certificates(
        &self,
        r: Request<pb::ListMeshResourcesRequest>,
    ) -> Reply<pb::ListMeshCertificatesResponse> {
        let (certificates, next_page_token) = self.list::<CertificateSpec>(r.get_ref())?;
        Ok(Response::new(pb::ListMeshCertificatesResponse { certificates, next_page_token }))
    }
    async fn update_mesh_certificate(
        &self,
        r: Request<pb::UpdateMeshCertificateRequest>,
    ) -> Reply<pb::MeshCertificate> {
        let r = r.into_inner();
        self.update::<CertificateSpec>(r.certificate, r.expected_generation)
    }
    async fn delete_mesh_certificate(&self, r: Request<pb::DeleteMeshResourceRequest>) -> Reply<pb::DeleteResponse> {
        self.delete::<CertificateSpec>(r.into_inner()).await
    }

    async fn create_mesh_cluster(&self, r: Request<pb::CreateMeshClusterRequest>) -> Reply<pb::MeshCluster> {
        let r = r.into_inner();
        self.create::<ClusterSpec>(&r.cluster_id, r.cluster)
    }
    async fn get_mesh_cluster(&self, r: Request<pb::GetMeshResourceRequest>) -> Reply<pb::MeshCluster> {
        self.get::<ClusterSpec>(&r.get_ref().name)
    }
    async fn list_mesh_clusters(
        &self,
        r: Request<pb::ListMeshResourcesRequest>,
    ) -> Reply<pb::ListMeshClustersResponse> {
        let (clusters, next_page_token) = self.list::<ClusterSpec>(r.get_ref())?;
        Ok(Response::new(pb::ListMeshClustersResponse { clusters, next_page_token }))
    }
    async fn update_mesh_cluster(&self, r: Request<pb::UpdateMeshClusterRequest>) -> Reply<pb::MeshCluster> {
        let r = r.into_inner();
        self.update::<ClusterSpec>(r.cluster, r.expected_generation)
    }
    async fn delete_mesh_cluster(&self, r: Request<pb::DeleteMeshResourceRequest>) -> Reply<pb::DeleteResponse> {
        self.delete::<ClusterSpec>(r.into_inner()).await
    }

    async fn create_mesh_route_table(&self, r: Request<pb::CreateMeshRouteTableRequest>) -> Reply<pb::MeshRouteTable> {
        let r = r.into_inner();
        self.create::<RouteTableSpec>(&r.route_table_id, r.route_table)
    }
    async fn get_mesh_route_table(&self, r: Request<pb::GetMeshResourceRequest>) -> Reply<pb::MeshRouteTable> {
        self.get::<RouteTableSpec>(&r.get_ref().name)
    }
    async fn list_mesh_route_tables(
        &self,
        r: Request<pb::ListMeshResourcesRequest>,
    ) -> Reply<pb::ListMeshRouteTablesResponse> {
        let (route_tables, next_page_token) = self.list::<RouteTableSpec>(r.get_ref())?;
        Ok(Response::new(pb::ListMeshRouteTablesResponse { route_tables, next_page_token }))
    }
    async fn update_mesh_route_table(&self, r: Request<pb::UpdateMeshRouteTableRequest>) -> Reply<pb::MeshRouteTable> {
        let r = r.into_inner();
        self.update::<RouteTableSpec>(r.route_table, r.expected_generation)
    }
    async fn delete_mesh_route_table(&self, r: Request<pb::DeleteMeshResourceRequest>) -> Reply<pb::DeleteResponse> {
        self.delete::<RouteTableSpec>(r.into_inner()).await
    }

    async fn create_mesh_listener(&self, r: Request<pb::CreateMeshListenerRequest>) -> Reply<pb::MeshListener> {
        let r = r.into_inner();
        self.create::<ListenerSpec>(&r.listener_id, r.listener)
    }
    async fn get_mesh_listener(&self, r: Request<pb::GetMeshResourceRequest>) -> Reply<pb::MeshListener> {
        self.get::<ListenerSpec>(&r.get_ref().name)
    }
    async fn list_mesh_listeners(
        &self,
        r: Request<pb::ListMeshResourcesRequest>,
    ) -> Reply<pb::ListMeshListenersResponse> {
        let (listeners, next_page_token) = self.list::<ListenerSpec>(r.get_ref())?;
        Ok(Response::new(pb::ListMeshListenersResponse { listeners, next_page_token }))
    }
    async fn update_mesh_listener(&self, r: Request<pb::UpdateMeshListenerRequest>) -> Reply<pb::MeshListener> {
        let r = r.into_inner();
        self.update::<ListenerSpec>(r.listener, r.expected_generation)
    }
    async fn delete_mesh_listener(&self, r: Request<pb::DeleteMeshResourceRequest>) -> Reply<pb::DeleteResponse> {
        self.delete::<ListenerSpec>(r.into_inner()).await
    }

    async fn create_mesh_policy(&self, r: Request<pb::CreateMeshPolicyRequest>) -> Reply<pb::MeshPolicy> {
        let r = r.into_inner();
        self.create::<PolicySpec>(&r.policy_id, r.policy)
    }
    async fn get_mesh_policy(&self, r: Request<pb::GetMeshResourceRequest>) -> Reply<pb::MeshPolicy> {
        self.get::<PolicySpec>(&r.get_ref().name)
    }
    async fn list_mesh_policies(
        &self,
        r: Request<pb::ListMeshResourcesRequest>,
    ) -> Reply<pb::ListMeshPoliciesResponse> {
        let (policies, next_page_token) = self.list::<PolicySpec>(r.get_ref())?;
        Ok(Response::new(pb::ListMeshPoliciesResponse { policies, next_page_token }))
    }
    async fn update_mesh_policy(&self, r: Request<pb::UpdateMeshPolicyRequest>) -> Reply<pb::MeshPolicy> {
        let r = r.into_inner();
        self.update::<PolicySpec>(r.policy, r.expected_generation)
    }
    async fn delete_mesh_policy(&self, r: Request<pb::DeleteMeshResourceRequest>) -> Reply<pb::DeleteResponse> {
        self.delete::<PolicySpec>(r.into_inner()).await
    }

    async fn get_mesh_config_dump(&self, _r: Request<pb::GetMeshConfigDumpRequest>) -> Reply<pb::MeshConfigDump> {
        let json = serde_json::to_string_pretty(&self.proxy.config_dump())
            .map_err(|e| Status::internal(format!("encoding the config dump: {e}")))?;
        Ok(Response::new(pb::MeshConfigDump { json }))
    }
}
