//! The immutable, compiled view of every configuration source that connections and requests read. A snapshot is
//! built per apply from validated specs plus the runtime objects that persist across snapshots (clusters with
//! their pools, health and outlier state; certificate stores), then swapped in atomically.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use dpu_intent::{Invalid, Resource};

use crate::authz::{Authorizer, Policy};
use crate::cluster::Cluster;
use crate::model::{
    CertificateSpec, ClusterSpec, Handler, HttpCodec, ListenerSpec, MeshSpecs, PolicySpec, RouteTableSpec,
    UpstreamProtocol, WorkloadSpec,
};
use crate::proxy::ObjectError;
use crate::route::RouteTable;
use crate::tls::TlsStore;

/// A workload (tenant) the proxy carries traffic for.
#[derive(Debug)]
pub struct Workload {
    pub id: String,
    pub source: String,
    pub spec: WorkloadSpec,
}

impl Workload {
    /// The workload name used in metrics (`source_workload`): its service account.
    pub fn name(&self) -> &str {
        self.spec.identity.service_account()
    }
    pub fn namespace(&self) -> &str {
        self.spec.identity.namespace()
    }
    /// Key of the workload's admission state: ids are unique within a source only.
    pub fn admission_key(&self) -> String {
        format!("{}/{}", self.source, self.id)
    }
}

/// A listener as connections see it: its spec and its compiled authorization.
#[derive(Debug)]
pub struct ListenerConfig {
    pub id: String,
    pub source: String,
    pub spec: ListenerSpec,
    pub authorizer: Authorizer,
    /// Server TLS when the listener terminates TLS; it reads the live certificate, so rotation needs no rebuild.
    pub server_tls: Option<Arc<rustls::ServerConfig>>,
}

/// One source's compiled objects. References resolve only within a source.
#[derive(Debug)]
pub struct SourceSnapshot {
    pub name: String,
    /// The specs as given (the config dump redacts certificates).
    pub specs: MeshSpecs,
    pub listeners: BTreeMap<String, Arc<ListenerConfig>>,
    pub route_tables: HashMap<String, Arc<RouteTable>>,
    pub clusters: BTreeMap<String, Arc<Cluster>>,
    pub workloads: BTreeMap<String, Arc<Workload>>,
    pub tls: Arc<TlsStore>,
}

/// Everything the data path reads, across sources.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub sources: BTreeMap<String, Arc<SourceSnapshot>>,
    /// Workload by source address, across sources.
    pub workloads_by_address: HashMap<IpAddr, Arc<Workload>>,
}

impl Snapshot {
    pub fn listener(&self, source: &str, id: &str) -> Option<&Arc<ListenerConfig>> {
        self.sources.get(source)?.listeners.get(id)
    }

    /// Every live cluster as `(source, id, cluster)`.
    pub fn clusters(&self) -> impl Iterator<Item = (&str, &str, &Arc<Cluster>)> {
        self.sources.iter().flat_map(|(s, src)| src.clusters.iter().map(move |(id, c)| (s.as_str(), id.as_str(), c)))
    }

    /// Builds the merged snapshot from per-source snapshots: the address index, first source (by name) wins on a
    /// duplicate — duplicates are refused when a source is applied, so this only matters across restarts.
    pub fn merge(sources: BTreeMap<String, Arc<SourceSnapshot>>) -> Snapshot {
        let mut workloads_by_address = HashMap::new();
        for src in sources.values() {
            for w in src.workloads.values() {
                for a in &w.spec.addresses {
                    workloads_by_address.entry(*a).or_insert_with(|| w.clone());
                }
            }
        }
        Snapshot { sources, workloads_by_address }
    }
}

/// What other sources already hold, so this source's duplicates are refused.
#[derive(Debug, Default)]
pub struct Taken {
    pub addresses: HashMap<IpAddr, String>,
    pub listener_addresses: HashMap<SocketAddr, String>,
}

impl Taken {
    pub fn from_other_sources(snapshot: &Snapshot, except: &str) -> Taken {
        let mut taken = Taken::default();
        for (name, src) in snapshot.sources.iter().filter(|(n, _)| n.as_str() != except) {
            for w in src.workloads.values() {
                for a in &w.spec.addresses {
                    taken.addresses.insert(*a, format!("{name}/{}", w.id));
                }
            }
            for l in src.listeners.values() {
                taken.listener_addresses.insert(l.spec.address, format!("{name}/{}", l.id));
            }
        }
        taken
    }
}

/// Collects per-object errors of one apply.
#[derive(Debug, Default)]
pub struct Errors {
    pub errors: Vec<ObjectError>,
}

impl Errors {
    pub fn push(&mut self, kind: &'static str, id: &str, field: impl Into<String>, message: impl Into<String>) {
        let (field, message) = (field.into(), message.into());
        tracing::warn!(kind, id, field = %field, message = %message, "mesh object left out of the configuration");
        self.errors.push(ObjectError { kind, id: id.to_string(), field, message });
    }
    fn invalid(&mut self, kind: &'static str, id: &str, e: Invalid) {
        self.push(kind, id, e.field, e.message);
    }
}

/// Compiles one source. `clusters` holds the source's live clusters from the previous snapshot (updated in place,
/// or created); `tls` the source's certificate store. Objects with an error, and objects referencing them, are
/// left out and reported in `errors`.
pub fn build_source(
    source: &str,
    specs: MeshSpecs,
    previous_clusters: &BTreeMap<String, Arc<Cluster>>,
    tls: Arc<TlsStore>,
    taken: &Taken,
    errors: &mut Errors,
) -> SourceSnapshot {
    // Certificates: shape first, then the store parses and rotates. An id whose new spec is bad keeps its previous
    // good identity in the store and stays usable.
    let mut good_certs = BTreeMap::new();
    for (id, spec) in &specs.certificates {
        match spec.validate() {
            Ok(()) => {
                good_certs.insert(id.clone(), spec.clone());
            }
            Err(e) => errors.invalid(CertificateSpec::KIND, id, e),
        }
    }
    for (id, e) in tls.apply(&good_certs) {
        errors.invalid(CertificateSpec::KIND, &id, e);
    }
    let cert_usable = |id: &str| specs.certificates.contains_key(id) && tls.identity(id).is_some();

    // Policies.
    let mut policies: HashMap<String, Arc<Policy>> = HashMap::new();
    for (id, spec) in &specs.policies {
        match spec.validate().and_then(|()| Policy::compile(id, spec)) {
            Ok(p) => {
                policies.insert(id.clone(), Arc::new(p));
            }
            Err(e) => errors.invalid(PolicySpec::KIND, id, e),
        }
    }

    // Clusters: runtime objects persist; a changed spec is applied in place.
    let mut clusters = BTreeMap::new();
    for (id, spec) in &specs.clusters {
        if let Err(e) = spec.validate() {
            errors.invalid(ClusterSpec::KIND, id, e);
            continue;
        }
        let client_tls = match &spec.tls {
            None => None,
            Some(t) if !cert_usable(&t.certificate) => {
                errors.push(
                    ClusterSpec::KIND,
                    id,
                    "cluster.tls.certificate",
                    format!("certificate {:?} does not exist or is not usable", t.certificate),
                );
                continue;
            }
            Some(t) => {
                let alpn: &[&[u8]] = match spec.protocol {
                    UpstreamProtocol::Http2 => &[b"h2"],
                    UpstreamProtocol::Http1 => &[b"http/1.1"],
                    UpstreamProtocol::Tcp => &[],
                };
                match tls.client_config(&t.certificate, &t.server_identities, alpn, t.kernel_tls.is_some()) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        errors.push(ClusterSpec::KIND, id, "cluster.tls.certificate", e.to_string());
                        continue;
                    }
                }
            }
        };
        let cluster = match previous_clusters.get(id) {
            Some(existing) => {
                existing.update(spec, client_tls);
                existing.clone()
            }
            None => Cluster::new(id, spec, client_tls),
        };
        clusters.insert(id.clone(), cluster);
    }

    // Route tables: every forward target must be a live HTTP cluster.
    let mut route_tables = HashMap::new();
    'tables: for (id, spec) in &specs.route_tables {
        let table = match spec.validate().and_then(|()| RouteTable::compile(id, spec)) {
            Ok(t) => t,
            Err(e) => {
                errors.invalid(RouteTableSpec::KIND, id, e);
                continue;
            }
        };
        for (field, cluster) in table.cluster_refs() {
            match clusters.get(cluster) {
                None => {
                    errors.push(
                        RouteTableSpec::KIND,
                        id,
                        field,
                        format!("cluster {cluster:?} does not exist or has errors"),
                    );
                    continue 'tables;
                }
                Some(c) if c.protocol() == UpstreamProtocol::Tcp => {
                    errors.push(RouteTableSpec::KIND, id, field, format!("cluster {cluster:?} is a TCP cluster"));
                    continue 'tables;
                }
                Some(_) => {}
            }
        }
        route_tables.insert(id.clone(), Arc::new(table));
    }

    // Workloads: unique addresses across all sources.
    let mut workloads = BTreeMap::new();
    let mut addresses: HashMap<IpAddr, String> = HashMap::new();
    'workloads: for (id, spec) in &specs.workloads {
        if let Err(e) = spec.validate() {
            errors.invalid(WorkloadSpec::KIND, id, e);
            continue;
        }
        if !spec.certificate.is_empty() && !cert_usable(&spec.certificate) {
            errors.push(
                WorkloadSpec::KIND,
                id,
                "workload.certificate",
                format!("certificate {:?} does not exist or is not usable", spec.certificate),
            );
            continue;
        }
        for (i, a) in spec.addresses.iter().enumerate() {
            if let Some(owner) = taken.addresses.get(a).or_else(|| addresses.get(a)) {
                errors.push(
                    WorkloadSpec::KIND,
                    id,
                    format!("workload.addresses[{i}]"),
                    format!("{a} already belongs to workload {owner}"),
                );
                continue 'workloads;
            }
        }
        for a in &spec.addresses {
            addresses.insert(*a, format!("{source}/{id}"));
        }
        workloads
            .insert(id.clone(), Arc::new(Workload { id: id.clone(), source: source.to_string(), spec: spec.clone() }));
    }

    // Listeners.
    let mut listeners = BTreeMap::new();
    let mut sockets: HashMap<SocketAddr, String> = HashMap::new();
    for (id, spec) in &specs.listeners {
        if let Err(e) = spec.validate() {
            errors.invalid(ListenerSpec::KIND, id, e);
            continue;
        }
        if let Err((field, message)) = check_listener_refs(spec, &clusters, &route_tables, &policies, &cert_usable) {
            errors.push(ListenerSpec::KIND, id, field, message);
            continue;
        }
        if let Some(owner) = taken.listener_addresses.get(&spec.address).or_else(|| sockets.get(&spec.address)) {
            errors.push(
                ListenerSpec::KIND,
                id,
                "listener.address",
                format!("{} is already used by listener {owner}", spec.address),
            );
            continue;
        }
        let server_tls = match &spec.tls {
            None => None,
            Some(t) => {
                let alpn = listener_alpn(spec);
                match tls.server_config(&t.certificate, t.require_client_certificate, &alpn, t.kernel_tls.is_some()) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        errors.push(ListenerSpec::KIND, id, "listener.tls.certificate", e.to_string());
                        continue;
                    }
                }
            }
        };
        sockets.insert(spec.address, format!("{source}/{id}"));
        let authorizer = Authorizer::new(spec.policies.iter().map(|p| policies[p].clone()).collect());
        listeners.insert(
            id.clone(),
            Arc::new(ListenerConfig {
                id: id.clone(),
                source: source.to_string(),
                spec: spec.clone(),
                authorizer,
                server_tls,
            }),
        );
    }

    SourceSnapshot { name: source.to_string(), specs, listeners, route_tables, clusters, workloads, tls }
}

/// ALPN protocols a TLS listener offers: those its HTTP handlers' codecs speak (none for TCP-only listeners).
fn listener_alpn(spec: &ListenerSpec) -> Vec<&'static [u8]> {
    let (mut h2, mut h1) = (false, false);
    for handler in spec.destinations.iter().map(|d| &d.handler).chain(std::iter::once(&spec.default)) {
        if let Handler::Http { codec, .. } = handler {
            h2 |= matches!(codec, HttpCodec::Http2 | HttpCodec::Auto);
            h1 |= matches!(codec, HttpCodec::Http1 | HttpCodec::Auto);
        }
    }
    let mut alpn: Vec<&'static [u8]> = Vec::new();
    if h2 {
        alpn.push(b"h2");
    }
    if h1 {
        alpn.push(b"http/1.1");
    }
    alpn
}

fn check_listener_refs(
    spec: &ListenerSpec,
    clusters: &BTreeMap<String, Arc<Cluster>>,
    route_tables: &HashMap<String, Arc<RouteTable>>,
    policies: &HashMap<String, Arc<Policy>>,
    cert_usable: &dyn Fn(&str) -> bool,
) -> Result<(), (String, String)> {
    if let Some(tls) = &spec.tls
        && !cert_usable(&tls.certificate)
    {
        return Err((
            "listener.tls.certificate".into(),
            format!("certificate {:?} does not exist or is not usable", tls.certificate),
        ));
    }
    for (i, p) in spec.policies.iter().enumerate() {
        if !policies.contains_key(p) {
            return Err((format!("listener.policies[{i}]"), format!("policy {p:?} does not exist or has errors")));
        }
    }
    let handlers = spec
        .destinations
        .iter()
        .enumerate()
        .map(|(i, d)| (format!("listener.destinations[{i}].handler"), &d.handler))
        .chain(std::iter::once(("listener.default".to_string(), &spec.default)));
    for (field, handler) in handlers {
        match handler {
            Handler::Tcp { cluster } if !clusters.contains_key(cluster) => {
                return Err((format!("{field}.cluster"), format!("cluster {cluster:?} does not exist or has errors")));
            }
            Handler::Http { route_table, .. } if !route_tables.contains_key(route_table) => {
                return Err((
                    format!("{field}.route_table"),
                    format!("route table {route_table:?} does not exist or has errors"),
                ));
            }
            _ => {}
        }
    }
    Ok(())
}
