//! `dpuctl mesh`: the shared proxy's configuration. `apply -f FILE` makes the agent's mesh objects match a JSON
//! file (the `MeshSpecs` shape: `{"clusters": {"id": {...}}, "listeners": {...}, ...}`); `get`, `list` and
//! `delete` address single objects; `dump` shows what the proxy runs.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Subcommand, ValueEnum};
use dpu_mesh::MeshSpecs;
use dpu_proto::v1 as pb;
use dpu_proto::v1::mesh_service_client::MeshServiceClient;
use serde_json::{Value, json};
use tonic::Code;
use tonic::transport::Channel;

use crate::resource_state;

#[derive(Debug, Subcommand)]
pub enum MeshCommand {
    /// Create or update every object in FILE (JSON, the MeshSpecs shape); with --prune also delete objects the
    /// file does not name. Dependencies are applied first (certificates, policies, clusters, route tables,
    /// workloads, listeners) and pruned last.
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[arg(long)]
        prune: bool,
    },
    Get {
        kind: MeshKind,
        id: String,
    },
    List {
        kind: MeshKind,
    },
    Delete {
        kind: MeshKind,
        id: String,
        #[arg(long)]
        allow_missing: bool,
    },
    /// What the proxy runs: every source's objects (keys redacted), listeners and live cluster statistics.
    Dump,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MeshKind {
    Certificate,
    Policy,
    Cluster,
    RouteTable,
    Workload,
    Listener,
}

/// Dependency order: what others refer to comes first.
const APPLY_ORDER: [MeshKind; 6] = [
    MeshKind::Certificate,
    MeshKind::Policy,
    MeshKind::Cluster,
    MeshKind::RouteTable,
    MeshKind::Workload,
    MeshKind::Listener,
];

type Client = MeshServiceClient<Channel>;

/// Outcome counts of `apply`.
#[derive(Debug, Default)]
struct Applied {
    created: Vec<String>,
    updated: Vec<String>,
    unchanged: Vec<String>,
    deleted: Vec<String>,
}

/// Per-kind calls, written once by a macro over the generated client.
macro_rules! kinds {
    ($( $kind:ident => $spec:ty, $pb:ty, $coll:literal, $idf:ident, $field:ident,
        $create:ident, $createreq:ident, $get:ident, $list:ident, $listfield:ident, $update:ident, $updatereq:ident,
        $delete:ident; )*) => {
        /// Ids and messages of every object of `kind`, across pages.
        async fn list_all(client: &mut Client, kind: MeshKind) -> anyhow::Result<Vec<(String, Value)>> {
            let mut out = Vec::new();
            let mut token = String::new();
            loop {
                let req = pb::ListMeshResourcesRequest { page_size: 0, page_token: token.clone() };
                let (items, next): (Vec<(String, Value)>, String) = match kind {
                    $( MeshKind::$kind => {
                        let r = client.$list(req).await?.into_inner();
                        (r.$listfield.into_iter().map(|m| (id_of(&m.name), message_json(&m.name, m.generation, m.status.as_ref(), spec_json::<$spec, $pb>(m.clone())))).collect(), r.next_page_token)
                    } )*
                };
                out.extend(items);
                if next.is_empty() {
                    return Ok(out);
                }
                token = next;
            }
        }

        async fn get(client: &mut Client, kind: MeshKind, id: &str) -> anyhow::Result<Value> {
            let name = format!("{}/{id}", collection(kind));
            Ok(match kind {
                $( MeshKind::$kind => {
                    let m = client.$get(pb::GetMeshResourceRequest { name }).await?.into_inner();
                    message_json(&m.name, m.generation, m.status.as_ref(), spec_json::<$spec, $pb>(m.clone()))
                } )*
            })
        }

        async fn delete(client: &mut Client, kind: MeshKind, id: &str, allow_missing: bool) -> anyhow::Result<()> {
            let req = pb::DeleteMeshResourceRequest { name: format!("{}/{id}", collection(kind)), allow_missing };
            match kind {
                $( MeshKind::$kind => { client.$delete(req).await?; } )*
            }
            Ok(())
        }

        fn collection(kind: MeshKind) -> &'static str {
            match kind {
                $( MeshKind::$kind => $coll, )*
            }
        }

        /// Creates or updates every object of `kind` in `specs`.
        async fn apply_kind(client: &mut Client, kind: MeshKind, specs: &MeshSpecs, applied: &mut Applied) -> anyhow::Result<()> {
            match kind {
                $( MeshKind::$kind => {
                    for (id, spec) in &specs.$field {
                        let name = format!("{}/{id}", $coll);
                        let wanted = <$pb as FromSpec<$spec>>::from_spec(spec);
                        match client.$get(pb::GetMeshResourceRequest { name: name.clone() }).await {
                            Ok(current) => {
                                let current = current.into_inner();
                                if same::<$pb>(&wanted, &current, |m| { m.name.clear(); m.generation = 0; m.status = None; redact(m); }) {
                                    applied.unchanged.push(name);
                                } else {
                                    let mut message = wanted;
                                    message.name = name.clone();
                                    client.$update(pb::$updatereq { $idf: Some(message), expected_generation: current.generation })
                                        .await.with_context(|| format!("updating {name}"))?;
                                    applied.updated.push(name);
                                }
                            }
                            Err(status) if status.code() == Code::NotFound => {
                                client.$create(pb::$createreq { $idf: Some(wanted), ..Default::default() }.with_id(id))
                                    .await.with_context(|| format!("creating {name}"))?;
                                applied.created.push(name);
                            }
                            Err(status) => return Err(status).with_context(|| format!("reading {name}")),
                        }
                    }
                } )*
            }
            Ok(())
        }

        /// Ids of `kind` in `specs`.
        fn ids(kind: MeshKind, specs: &MeshSpecs) -> Vec<String> {
            match kind {
                $( MeshKind::$kind => specs.$field.keys().cloned().collect(), )*
            }
        }
    };
}

/// Sets the id field of a create request.
trait WithId {
    fn with_id(self, id: &str) -> Self;
}

macro_rules! with_id {
    ($($req:ty => $field:ident;)*) => {
        $( impl WithId for $req {
            fn with_id(mut self, id: &str) -> Self {
                self.$field = id.to_owned();
                self
            }
        } )*
    };
}

with_id! {
    pb::CreateMeshCertificateRequest => certificate_id;
    pb::CreateMeshPolicyRequest => policy_id;
    pb::CreateMeshClusterRequest => cluster_id;
    pb::CreateMeshRouteTableRequest => route_table_id;
    pb::CreateMeshWorkloadRequest => workload_id;
    pb::CreateMeshListenerRequest => listener_id;
}

/// The request message for a spec. Replies never carry private keys, so the conversion shared with the agent
/// leaves them out; a request must send them.
trait FromSpec<S> {
    fn from_spec(spec: &S) -> Self;
}

impl FromSpec<dpu_mesh::CertificateSpec> for pb::MeshCertificate {
    fn from_spec(spec: &dpu_mesh::CertificateSpec) -> Self {
        pb::MeshCertificate { private_key_pem: spec.private_key_pem.clone(), ..pb::MeshCertificate::from(spec) }
    }
}

macro_rules! from_spec {
    ($($spec:ty => $pb:ty;)*) => {
        $( impl FromSpec<$spec> for $pb {
            fn from_spec(spec: &$spec) -> Self {
                <$pb>::from(spec)
            }
        } )*
    };
}

from_spec! {
    dpu_mesh::PolicySpec => pb::MeshPolicy;
    dpu_mesh::ClusterSpec => pb::MeshCluster;
    dpu_mesh::RouteTableSpec => pb::MeshRouteTable;
    dpu_mesh::WorkloadSpec => pb::MeshWorkload;
    dpu_mesh::ListenerSpec => pb::MeshListener;
}

/// Private keys never come back from the agent, so they take no part in comparisons.
trait Redact {
    fn redact(&mut self) {}
}
impl Redact for pb::MeshCertificate {
    fn redact(&mut self) {
        self.private_key_pem.clear();
    }
}
impl Redact for pb::MeshPolicy {}
impl Redact for pb::MeshCluster {}
impl Redact for pb::MeshRouteTable {}
impl Redact for pb::MeshWorkload {}
impl Redact for pb::MeshListener {}

fn redact<M: Redact>(m: &mut M) {
    m.redact();
}

fn same<M: Clone + PartialEq>(a: &M, b: &M, normalize: impl Fn(&mut M)) -> bool {
    let (mut a, mut b) = (a.clone(), b.clone());
    normalize(&mut a);
    normalize(&mut b);
    a == b
}

kinds! {
    Certificate => dpu_mesh::CertificateSpec, pb::MeshCertificate, "meshCertificates", certificate, certificates,
        create_mesh_certificate, CreateMeshCertificateRequest, get_mesh_certificate, list_mesh_certificates,
        certificates, update_mesh_certificate, UpdateMeshCertificateRequest, delete_mesh_certificate;
    Policy => dpu_mesh::PolicySpec, pb::MeshPolicy, "meshPolicies", policy, policies,
        create_mesh_policy, CreateMeshPolicyRequest, get_mesh_policy, list_mesh_policies,
        policies, update_mesh_policy, UpdateMeshPolicyRequest, delete_mesh_policy;
    Cluster => dpu_mesh::ClusterSpec, pb::MeshCluster, "meshClusters", cluster, clusters,
        create_mesh_cluster, CreateMeshClusterRequest, get_mesh_cluster, list_mesh_clusters,
        clusters, update_mesh_cluster, UpdateMeshClusterRequest, delete_mesh_cluster;
    RouteTable => dpu_mesh::RouteTableSpec, pb::MeshRouteTable, "meshRouteTables", route_table, route_tables,
        create_mesh_route_table, CreateMeshRouteTableRequest, get_mesh_route_table, list_mesh_route_tables,
        route_tables, update_mesh_route_table, UpdateMeshRouteTableRequest, delete_mesh_route_table;
    Workload => dpu_mesh::WorkloadSpec, pb::MeshWorkload, "meshWorkloads", workload, workloads,
        create_mesh_workload, CreateMeshWorkloadRequest, get_mesh_workload, list_mesh_workloads,
        workloads, update_mesh_workload, UpdateMeshWorkloadRequest, delete_mesh_workload;
    Listener => dpu_mesh::ListenerSpec, pb::MeshListener, "meshListeners", listener, listeners,
        create_mesh_listener, CreateMeshListenerRequest, get_mesh_listener, list_mesh_listeners,
        listeners, update_mesh_listener, UpdateMeshListenerRequest, delete_mesh_listener;
}

fn id_of(name: &str) -> String {
    name.rsplit('/').next().unwrap_or(name).to_owned()
}

/// The spec in the model's JSON shape (the same shape `apply` reads). Certificates come back without their key,
/// so they are shown by their PEM fields as the agent returns them.
fn spec_json<S, M>(message: M) -> Value
where
    S: TryFrom<M, Error = dpu_intent::Invalid> + serde::Serialize,
    M: Clone + std::fmt::Debug,
{
    match S::try_from(message.clone()) {
        Ok(spec) => serde_json::to_value(spec).unwrap_or(Value::Null),
        Err(_) => json!({ "message": format!("{message:?}") }),
    }
}

fn message_json(name: &str, generation: i64, status: Option<&pb::ResourceStatus>, spec: Value) -> Value {
    json!({ "name": name, "generation": generation, "status": resource_state(status), "spec": spec })
}

pub async fn mesh(channel: Channel, command: &MeshCommand) -> anyhow::Result<Value> {
    let mut client = MeshServiceClient::new(channel);
    Ok(match command {
        MeshCommand::Apply { file, prune } => {
            let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
            let specs: MeshSpecs =
                serde_json::from_str(&text).with_context(|| format!("{} is not a mesh spec file", file.display()))?;
            let mut applied = Applied::default();
            for kind in APPLY_ORDER {
                apply_kind(&mut client, kind, &specs, &mut applied).await?;
            }
            if *prune {
                for kind in APPLY_ORDER.iter().rev() {
                    let keep = ids(*kind, &specs);
                    for (id, _) in list_all(&mut client, *kind).await? {
                        if !keep.contains(&id) {
                            delete(&mut client, *kind, &id, true).await?;
                            applied.deleted.push(format!("{}/{id}", collection(*kind)));
                        }
                    }
                }
            }
            json!({ "created": applied.created, "updated": applied.updated, "unchanged": applied.unchanged,
                    "deleted": applied.deleted })
        }
        MeshCommand::Get { kind, id } => get(&mut client, *kind, id).await?,
        MeshCommand::List { kind } => {
            Value::Array(list_all(&mut client, *kind).await?.into_iter().map(|(_, v)| v).collect())
        }
        MeshCommand::Delete { kind, id, allow_missing } => {
            delete(&mut client, *kind, id, *allow_missing).await?;
            json!({ "deleted": format!("{}/{id}", collection(*kind)) })
        }
        MeshCommand::Dump => {
            let dump = client.get_mesh_config_dump(pb::GetMeshConfigDumpRequest {}).await?.into_inner();
            serde_json::from_str(&dump.json).context("the agent's config dump is not JSON")?
        }
    })
}
