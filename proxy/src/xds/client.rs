//! The ADS client: one `StreamAggregatedResources` stream (state of the world) to the control plane.
//!
//! Subscriptions follow Envoy's order: wildcard CDS; EDS for the service names of the accepted clusters and SDS
//! for the secrets their TLS contexts name; wildcard LDS once the first CDS response has been handled; then RDS
//! for the route configurations the accepted listeners name (and SDS for their secrets). Each response is converted and assembled together with everything accepted before; if any
//! resource is refused, or the proxy refuses the result, the response is NACKed (`INVALID_ARGUMENT`, naming the
//! resource and field) and the last accepted resources of that type stay in force. Otherwise the complete
//! [`MeshSpecs`] is handed to the caller and the response is ACKed.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::rpc::Status;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{ClientTlsConfig, Endpoint};
use tracing::{Instrument, debug, info, info_span, warn};

use super::convert::{self, CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, SECRET_TYPE, XdsResources};
use crate::model::MeshSpecs;

/// gRPC status code `INVALID_ARGUMENT`, sent in a NACK's `error_detail`.
const INVALID_ARGUMENT: i32 = 3;
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long the first CDS response may take before LDS is subscribed regardless (Envoy's default).
const INITIAL_FETCH_TIMEOUT: Duration = Duration::from_secs(15);
/// Every type this client subscribes to, in Envoy's order.
const TYPES: [&str; 5] = [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, SECRET_TYPE];

/// Where the control plane is and who we are to it.
#[derive(Debug, Clone)]
pub struct XdsConfig {
    /// `http://host:port` (plaintext) or `https://host:port` (with `tls`).
    pub server: http::Uri,
    /// `node.id` sent to the control plane (Istio: `sidecar~IP~POD.NAMESPACE~NAMESPACE.svc.cluster.local`).
    pub node_id: String,
    /// `node.cluster`.
    pub node_cluster: String,
    pub tls: Option<ClientTlsConfig>,
}

/// Why [`run`] gave up. Transport failures are not errors: the client reconnects until shut down.
#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("the xDS server address {uri} cannot be used")]
    Endpoint {
        uri: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// What the client has accepted, for the config dump and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct XdsStatus {
    /// Whether the ADS stream is up.
    pub connected: bool,
    /// Per type URL.
    pub types: BTreeMap<String, TypeStatus>,
    /// Objects held back until what they name arrives (`listener/NAME`, `route_table/NAME`, `cluster/NAME`).
    pub warming: Vec<String>,
    /// The most recent NACK of any type.
    pub last_nack: Option<String>,
    /// Accepted configurations handed to the proxy.
    pub applied: u64,
}

/// The state of one resource type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TypeStatus {
    /// `version_info` of the last accepted response; empty before the first.
    pub version: String,
    /// Resources accepted.
    pub resources: usize,
    /// The message of the last NACK of this type, cleared by the next accepted response.
    pub last_nack: Option<String>,
}

/// Runs the ADS client until `shutdown` resolves. `apply` receives the complete [`MeshSpecs`] after each accepted
/// update and returns `Err(message)` if the proxy refused it (then the update is NACKed with that message).
pub async fn run<F, Fut>(config: XdsConfig, apply: F, shutdown: impl Future<Output = ()>) -> Result<(), XdsError>
where
    F: FnMut(MeshSpecs) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let (status, _) = watch::channel(XdsStatus::default());
    run_with_status(config, apply, shutdown, status).await
}

/// [`run`], publishing the client's [`XdsStatus`] on `status` after every change.
pub async fn run_with_status<F, Fut>(
    config: XdsConfig,
    mut apply: F,
    shutdown: impl Future<Output = ()>,
    status: watch::Sender<XdsStatus>,
) -> Result<(), XdsError>
where
    F: FnMut(MeshSpecs) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let uri = config.server.to_string();
    let mut endpoint = Endpoint::from(config.server.clone())
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    if let Some(tls) = config.tls.clone() {
        endpoint = endpoint.tls_config(tls).map_err(|source| XdsError::Endpoint { uri: uri.clone(), source })?;
    }
    let node = Node { id: config.node_id.clone(), cluster: config.node_cluster.clone(), ..Node::default() };
    let mut state = State::default();
    let mut backoff = BACKOFF_START;
    tokio::pin!(shutdown);
    loop {
        let span = info_span!("xds", server = %uri, node = %config.node_id);
        let session = Session { endpoint: &endpoint, node: &node, state: &mut state, status: &status };
        let outcome = tokio::select! {
            () = &mut shutdown => return Ok(()),
            outcome = session.run(&mut apply).instrument(span) => outcome,
        };
        status.send_modify(|s| s.connected = false);
        let SessionError { message, progressed } = match outcome {
            Ok(never) => match never {},
            Err(e) => e,
        };
        if progressed {
            backoff = BACKOFF_START;
        }
        let delay = backoff;
        backoff = (backoff * 2).min(BACKOFF_MAX);
        warn!(server = %uri, error = %message, retry_in_ms = delay.as_millis() as u64, "xDS stream ended");
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// The accepted resources, the versions they came with, and the names subscribed to on the current stream.
#[derive(Debug, Default)]
struct State {
    accepted: XdsResources,
    versions: BTreeMap<&'static str, String>,
    /// Per stream: names last requested and nonce last received, per type.
    subscribed: BTreeMap<&'static str, BTreeSet<String>>,
    nonces: BTreeMap<&'static str, String>,
    /// Per stream: a CDS response has been handled, so LDS may start.
    clusters_answered: bool,
}

#[derive(Debug)]
struct SessionError {
    message: String,
    /// The stream delivered at least one response, so the next attempt starts from the shortest backoff.
    progressed: bool,
}

struct Session<'a> {
    endpoint: &'a Endpoint,
    node: &'a Node,
    state: &'a mut State,
    status: &'a watch::Sender<XdsStatus>,
}

impl Session<'_> {
    /// Runs one stream until it fails; it never ends otherwise.
    async fn run<F, Fut>(self, apply: &mut F) -> Result<Infallible, SessionError>
    where
        F: FnMut(MeshSpecs) -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        let fail =
            |progressed: bool| move |e: &dyn std::fmt::Display| SessionError { message: e.to_string(), progressed };
        let channel = self.endpoint.connect().await.map_err(|e| fail(false)(&e))?;
        let mut client = AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
        let (tx, rx) = mpsc::channel(16);
        let state = self.state;
        state.subscribed.clear();
        state.nonces.clear();
        state.clusters_answered = false;
        // Wildcard CDS, then what the accepted clusters already name (EDS, SDS), each with the version last
        // accepted so the server can skip what we have. LDS follows the first CDS response, as in Envoy.
        let mut cds = request(state, CLUSTER_TYPE, BTreeSet::new(), None);
        cds.node = Some(self.node.clone());
        state.subscribed.insert(CLUSTER_TYPE, BTreeSet::new());
        let mut initial = vec![cds];
        initial.extend(subscriptions(state));
        for req in initial {
            // The receiver lives until the call below takes it, and the queue holds them all.
            tx.send(req).await.map_err(|e| fail(false)(&e))?;
        }
        let mut responses = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .map_err(|e| fail(false)(&e))?
            .into_inner();
        self.status.send_modify(|s| s.connected = true);
        info!("xDS stream established");
        let mut progressed = false;
        // Like Envoy's initial_fetch_timeout: a control plane that never answers CDS does not block LDS forever.
        let cds_wait = tokio::time::sleep(INITIAL_FETCH_TIMEOUT);
        tokio::pin!(cds_wait);
        loop {
            let message = tokio::select! {
                message = responses.message() => message,
                () = &mut cds_wait, if !state.clusters_answered => {
                    warn!(timeout_s = INITIAL_FETCH_TIMEOUT.as_secs(), "no CDS response; subscribing to listeners");
                    state.clusters_answered = true;
                    for req in subscriptions(state) {
                        if tx.send(req).await.is_err() {
                            return Err(SessionError { message: "the request stream closed".into(), progressed });
                        }
                    }
                    continue;
                }
            };
            let response = match message {
                Ok(Some(r)) => r,
                Ok(None) => return Err(SessionError { message: "the server closed the stream".into(), progressed }),
                Err(e) => return Err(fail(progressed)(&e)),
            };
            progressed = true;
            let span = info_span!(
                "xds_response",
                type_url = %response.type_url,
                version = %response.version_info,
                nonce = %response.nonce
            );
            let out = handle(state, response, apply, self.status).instrument(span).await;
            for req in out {
                if tx.send(req).await.is_err() {
                    return Err(SessionError { message: "the request stream closed".into(), progressed });
                }
            }
        }
    }
}

/// Processes one response; returns the requests to send (new subscriptions, then the ACK or NACK).
async fn handle<F, Fut>(
    state: &mut State,
    resp: DiscoveryResponse,
    apply: &mut F,
    status: &watch::Sender<XdsStatus>,
) -> Vec<DiscoveryRequest>
where
    F: FnMut(MeshSpecs) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let Some(type_url) = TYPES.iter().copied().find(|t| *t == resp.type_url) else {
        warn!("response of a type never requested");
        let error = format!("type {:?} is not supported", resp.type_url);
        return vec![DiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            error_detail: Some(Status { code: INVALID_ARGUMENT, message: error, details: Vec::new() }),
            ..DiscoveryRequest::default()
        }];
    };
    state.nonces.insert(type_url, resp.nonce.clone());
    let outcome = match candidate(&state.accepted, type_url, &resp) {
        Ok(next) => match convert::assemble(&next) {
            Ok(assembled) => apply(assembled.specs).await.map(|()| (next, assembled.warming)),
            Err(e) => Err(e.to_string()),
        },
        Err(e) => Err(e),
    };
    match outcome {
        Err(message) => {
            warn!(error = %message, "NACK");
            status.send_modify(|s| {
                let t = s.types.entry(type_url.to_string()).or_default();
                t.last_nack = Some(message.clone());
                s.last_nack = Some(format!("{type_url} version {:?}: {message}", resp.version_info));
            });
            let names = state.subscribed.get(type_url).cloned().unwrap_or_default();
            let mut nack = request(state, type_url, names, Some(&resp.nonce));
            nack.error_detail = Some(Status { code: INVALID_ARGUMENT, message, details: Vec::new() });
            state.clusters_answered |= type_url == CLUSTER_TYPE;
            let mut out = subscriptions(state);
            out.push(nack);
            out
        }
        Ok((next, warming)) => {
            state.accepted = next;
            state.versions.insert(type_url, resp.version_info.clone());
            if !warming.is_empty() {
                info!(warming = ?warming, "objects wait for resources they name");
            }
            info!("ACK");
            // New subscriptions before the ACK, as Envoy does, so the server learns what the update references.
            state.clusters_answered |= type_url == CLUSTER_TYPE;
            let mut out = subscriptions(state);
            let names = state.subscribed.get(type_url).cloned().unwrap_or_default();
            out.push(request(state, type_url, names, Some(&resp.nonce)));
            status.send_modify(|s| {
                s.warming = warming;
                s.applied += 1;
                for t in TYPES {
                    let entry = s.types.entry(t.to_string()).or_default();
                    entry.version = state.versions.get(t).cloned().unwrap_or_default();
                    entry.resources = count(&state.accepted, t);
                }
                if let Some(t) = s.types.get_mut(type_url) {
                    t.last_nack = None;
                }
            });
            out
        }
    }
}

/// Requests for the subscriptions that changed: EDS and SDS for what the accepted clusters and listeners name,
/// and, once the first CDS response has been handled on this stream, wildcard LDS and then RDS.
fn subscriptions(state: &mut State) -> Vec<DiscoveryRequest> {
    let mut out = Vec::new();
    for type_url in [ENDPOINT_TYPE, SECRET_TYPE, LISTENER_TYPE, ROUTE_TYPE] {
        if matches!(type_url, LISTENER_TYPE | ROUTE_TYPE) && !state.clusters_answered {
            continue;
        }
        let current = state.subscribed.get(type_url);
        let names = if type_url == LISTENER_TYPE {
            if current.is_some() {
                continue;
            }
            BTreeSet::new()
        } else {
            let names = wanted(&state.accepted, type_url);
            // An empty list unsubscribes, so it is only sent to drop an earlier subscription.
            if current == Some(&names) || (current.is_none() && names.is_empty()) {
                continue;
            }
            prune(&mut state.accepted, type_url, &names);
            names
        };
        debug!(type_url, names = ?names, "subscribing");
        let nonce = state.nonces.get(type_url).cloned();
        out.push(request(state, type_url, names.clone(), nonce.as_deref()));
        state.subscribed.insert(type_url, names);
    }
    out
}

fn request(state: &State, type_url: &str, names: BTreeSet<String>, nonce: Option<&str>) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: state.versions.get(type_url).cloned().unwrap_or_default(),
        resource_names: names.into_iter().collect(),
        type_url: type_url.to_string(),
        response_nonce: nonce.unwrap_or_default().to_string(),
        ..DiscoveryRequest::default()
    }
}

/// The names of `type_url` resources the accepted clusters and listeners reference.
fn wanted(res: &XdsResources, type_url: &str) -> BTreeSet<String> {
    match type_url {
        ENDPOINT_TYPE => res.clusters.values().filter_map(|c| c.eds_service.clone()).collect(),
        ROUTE_TYPE => res.listeners.values().flat_map(|l| l.rds.iter().cloned()).collect(),
        SECRET_TYPE => res
            .clusters
            .values()
            .filter_map(|c| c.tls.as_ref())
            .chain(res.listeners.values().filter_map(|l| l.tls.as_ref()))
            .flat_map(|t| [t.certificate.clone(), t.validation.clone()])
            .collect(),
        _ => BTreeSet::new(),
    }
}

/// Forgets accepted resources that are no longer subscribed to.
fn prune(res: &mut XdsResources, type_url: &str, names: &BTreeSet<String>) {
    match type_url {
        ENDPOINT_TYPE => res.endpoints.retain(|k, _| names.contains(k)),
        ROUTE_TYPE => res.route_tables.retain(|k, _| names.contains(k)),
        SECRET_TYPE => res.secrets.retain(|k, _| names.contains(k)),
        _ => {}
    }
}

fn count(res: &XdsResources, type_url: &str) -> usize {
    match type_url {
        CLUSTER_TYPE => res.clusters.len(),
        ENDPOINT_TYPE => res.endpoints.len(),
        LISTENER_TYPE => res.listeners.len(),
        ROUTE_TYPE => res.route_tables.len(),
        SECRET_TYPE => res.secrets.len(),
        _ => 0,
    }
}

/// The accepted resources with `resp` applied: CDS and LDS responses carry the whole set, so they replace it; EDS,
/// RDS and SDS responses carry the resources they name, which replace those of the same name.
fn candidate(
    accepted: &XdsResources,
    type_url: &'static str,
    resp: &DiscoveryResponse,
) -> Result<XdsResources, String> {
    let mut next = accepted.clone();
    let mut seen = BTreeSet::new();
    match type_url {
        CLUSTER_TYPE => next.clusters.clear(),
        LISTENER_TYPE => next.listeners.clear(),
        _ => {}
    }
    for (i, any) in resp.resources.iter().enumerate() {
        let field = format!("resources[{i}]");
        if any.type_url != type_url {
            return Err(format!("{field}: holds {:?} in a {type_url} response", any.type_url));
        }
        let converted = convert::resource(type_url, &any.value, &field).map_err(|e| e.to_string())?;
        let name = converted.name().to_string();
        next.insert(converted);
        if !seen.insert(name.clone()) {
            return Err(format!("{field}: resource {name:?} appears twice in the response"));
        }
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::convert::{TlsSecrets, XdsCluster, XdsListener};

    fn state_with(eds: &[&str], rds: &[&str]) -> State {
        let mut state = State::default();
        let example_cluster = |service: &str| XdsCluster {
            spec: crate::model::ClusterSpec {
                protocol: crate::model::UpstreamProtocol::Http1,
                endpoints: vec![],
                lb: crate::model::LbPolicy::RoundRobin,
                connect_timeout_ms: 1000,
                idle_timeout_ms: 0,
                circuit_breaker: Default::default(),
                health_check: None,
                outlier_detection: None,
                tls: None,
            },
            eds_service: Some(service.into()),
            tls: Some(TlsSecrets { certificate: "default".into(), validation: "ROOTCA".into() }),
        };
        for s in eds {
            state.accepted.clusters.insert((*s).into(), example_cluster(s));
        }
        for r in rds {
            let spec = crate::model::ListenerSpec {
                address: "127.0.0.1:80".parse().unwrap(),
                transparent: false,
                destinations: vec![],
                default: crate::model::Handler::Reject,
                tls: None,
                policies: vec![],
                timeouts: Default::default(),
                max_request_headers_bytes: 8192,
            };
            let l = XdsListener {
                spec,
                rds: BTreeSet::from([(*r).to_string()]),
                inline_routes: BTreeMap::new(),
                tls: None,
            };
            state.accepted.listeners.insert(format!("l-{r}"), l);
        }
        state
    }

    fn summary(reqs: &[DiscoveryRequest]) -> Vec<(String, Vec<String>, String)> {
        reqs.iter()
            .map(|r| {
                let short = r.type_url.rsplit('.').next().unwrap_or_default().to_string();
                (short, r.resource_names.clone(), r.version_info.clone())
            })
            .collect()
    }

    #[test]
    fn listeners_and_routes_wait_for_the_first_cds_answer() {
        let mut state = state_with(&["a", "b"], &["r1"]);
        state.versions.insert(ENDPOINT_TYPE, "7".into());
        let reqs = subscriptions(&mut state);
        assert_eq!(
            summary(&reqs),
            vec![
                ("ClusterLoadAssignment".into(), vec!["a".into(), "b".into()], "7".into()),
                ("Secret".into(), vec!["ROOTCA".into(), "default".into()], String::new()),
            ]
        );
        assert!(subscriptions(&mut state).is_empty(), "nothing changed");
        state.clusters_answered = true;
        let reqs = subscriptions(&mut state);
        assert_eq!(
            summary(&reqs),
            vec![
                ("Listener".into(), vec![], String::new()),
                ("RouteConfiguration".into(), vec!["r1".into()], String::new())
            ]
        );
        assert!(subscriptions(&mut state).is_empty(), "LDS is subscribed once per stream");
    }

    #[test]
    fn dropped_references_unsubscribe_and_forget() {
        let mut state = state_with(&["a"], &[]);
        state.clusters_answered = true;
        subscriptions(&mut state);
        state.accepted.endpoints.insert("a".into(), vec![]);
        state.nonces.insert(ENDPOINT_TYPE, "n5".into());
        state.accepted.clusters.clear();
        let reqs = subscriptions(&mut state);
        assert_eq!(summary(&reqs)[0], ("ClusterLoadAssignment".into(), vec![], String::new()));
        assert_eq!(reqs[0].response_nonce, "n5");
        assert!(state.accepted.endpoints.is_empty());
    }
}
