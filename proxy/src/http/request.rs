//! One downstream request: route against the current snapshot, admit, authorize, then answer locally or forward
//! to a cluster with timeouts and retries.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use http_body::{Body as _, Frame};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use tracing::Instrument;

use super::body::{Counted, Record, Recorded, ReplayCopy, Teed};
use super::local;
use super::{HttpConn, upgrade};
use crate::access_log::Entry;
use crate::cluster::{Cluster, LbContext, UpstreamError};
use crate::listener::InFlight;
use crate::metrics::RequestLabels;
use crate::model::{Forward, Redirect, RetryOn, RetryPolicy, is_hop_by_hop};
use crate::route::{CompiledRoute, RouteTable, pick_cluster, request_host};
use crate::{Body, BoxError};

/// Request bodies up to this size are buffered so the request can be retried.
const MAX_REPLAY_BODY: u64 = 64 * 1024;
/// First retry back-off; doubles per retry, jittered.
const RETRY_BACKOFF: Duration = Duration::from_millis(25);
const MAX_RETRY_BACKOFF: Duration = Duration::from_millis(250);

pub(super) async fn handle(conn: Arc<HttpConn>, req: Request<Incoming>) -> Response<Body> {
    let upgrade = is_upgrade(&req);
    let http1 = req.version() < Version::HTTP_2;
    let (parts, body) = req.into_parts();
    let grpc = local::is_grpc(&parts.headers);
    let request_id = parts
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(new_request_id);
    let mut record = new_record(&conn, &parts, grpc, &request_id);
    let span =
        tracing::debug_span!("request", method = %parts.method, path = parts.uri.path(), request_id = %request_id);
    let mut resp =
        route_and_forward(&conn, parts, body, upgrade, grpc, &request_id, &mut record).instrument(span).await;
    // A draining HTTP/1.1 connection answers the requests that reach it and closes after the answer: a request the
    // client sent as draining began is served, not lost with the connection.
    if http1 && conn.ctx.graceful.is_cancelled() && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    finish(resp, record)
}

async fn route_and_forward(
    conn: &HttpConn,
    mut parts: Parts,
    body: Incoming,
    upgrade: bool,
    grpc: bool,
    request_id: &str,
    record: &mut Record,
) -> Response<Body> {
    let ctx = &conn.ctx;
    let max_head = ctx.listener.spec.max_request_headers_bytes as usize;
    if head_size(&parts) > max_head {
        let mut r = local::error(
            false,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request_headers_too_large",
            "request headers too large",
        );
        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        return r;
    }

    // Route against the current snapshot; a listener being drained falls back to what it was accepted with.
    let snapshot = ctx.runtime.snapshot.load_full();
    let live_source = snapshot.sources.get(&ctx.listener.source);
    let table: Option<Arc<RouteTable>> = live_source
        .and_then(|s| s.route_tables.get(&conn.route_table))
        .or_else(|| ctx.source.route_tables.get(&conn.route_table))
        .cloned();
    let Some(table) = table else {
        record.set_flag("NR");
        return local::error(grpc, StatusCode::NOT_FOUND, "no_route", "no route table");
    };
    let Some(route) = table.select(&parts, conn.scheme) else {
        record.set_flag("NR");
        return local::error(grpc, StatusCode::NOT_FOUND, "no_route", "no route matched");
    };
    record.entry.route = route.name.clone();

    // Limits and policies as currently configured: a change reaches open keep-alive connections too.
    let workload = ctx.workload.as_ref().map(|accepted| {
        snapshot
            .workloads_by_address
            .get(&ctx.peer.ip())
            .filter(|live| live.id == accepted.id && live.source == accepted.source)
            .unwrap_or(accepted)
    });
    let authorizer = &live_source.and_then(|s| s.listeners.get(&ctx.listener.id)).unwrap_or(&ctx.listener).authorizer;
    if let Some(w) = workload
        && let Err(rejection) = ctx.runtime.fairness.admit_request(&w.admission_key(), &w.spec.limits)
    {
        ctx.runtime.metrics.rejected(&w.id, rejection.reason());
        record.set_flag("RL");
        return local::error(grpc, StatusCode::TOO_MANY_REQUESTS, rejection.reason(), "request rate limit exceeded");
    }
    if let Err(denied) = authorizer.check_request(&ctx.peer_info(), &parts) {
        tracing::info!(policy = %denied.policy, reason = %denied.reason, "request denied by policy");
        return local::error(grpc, StatusCode::FORBIDDEN, "rbac_access_denied", "RBAC: access denied");
    }

    if let Some(redirect) = route.redirect() {
        let mut r = redirect_response(redirect, &parts, conn.scheme);
        apply_response_headers(route, r.headers_mut());
        return r;
    }
    let Some(fwd) = route.forward() else {
        return match &route.action {
            crate::model::RouteAction::DirectResponse { status, body } => {
                let mut r = Response::new(local::full(body.clone()));
                *r.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
                if !body.is_empty() {
                    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
                }
                apply_response_headers(route, r.headers_mut());
                r
            }
            _ => local::error(grpc, StatusCode::NOT_FOUND, "no_route", "route has no action"),
        };
    };

    let weighted = pick_cluster(&fwd.clusters);
    let cluster: Option<Arc<Cluster>> = live_source
        .and_then(|s| s.clusters.get(&weighted.cluster))
        .or_else(|| ctx.source.clusters.get(&weighted.cluster))
        .cloned();
    drop(snapshot);
    let Some(cluster) = cluster else {
        record.set_flag("NC");
        return local::error(grpc, StatusCode::SERVICE_UNAVAILABLE, "no_cluster", "cluster not found");
    };
    record.entry.cluster = cluster.id().to_string();
    record.labels.destination_service = cluster.id().to_string();

    prepare_upstream_head(&mut parts, route, fwd, conn.scheme, request_id, upgrade);
    let received = record.received.clone();
    let lb_headers = parts.headers.clone();
    let lb = LbContext { source: ctx.peer.ip(), headers: Some(&lb_headers) };

    if upgrade {
        let req = Request::from_parts(parts, Counted::new(body, received).map_err(BoxError::from).boxed_unsync());
        return match upgrade::forward(conn, &cluster, &lb, req).await {
            Ok(mut resp) => {
                if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                    strip_hop_by_hop(resp.headers_mut(), false);
                }
                apply_response_headers(route, resp.headers_mut());
                resp
            }
            Err((status, reason, message, flag)) => {
                record.set_flag(flag);
                local::error(false, status, reason, &message)
            }
        };
    }

    let started = Instant::now();
    let mut deadline = (fwd.timeout_ms > 0).then(|| started + Duration::from_millis(fwd.timeout_ms.into()));
    if let Some(t) = grpc.then(|| grpc_timeout(&parts.headers)).flatten() {
        let d = started + t;
        deadline = Some(deadline.map_or(d, |cur| cur.min(d)));
    }
    let mut body = match RequestBody::prepare(body, received, deadline).await {
        Ok(b) => b,
        Err(e) => {
            record.set_flag("DPE");
            tracing::debug!(error = %e, "request body could not be read");
            return local::error(grpc, StatusCode::BAD_REQUEST, "downstream_body", "request body could not be read");
        }
    };

    match send_with_retries(&cluster, fwd, &parts, &mut body, &lb, deadline).await {
        Outcome::Response(mut resp) => {
            if let Some(ep) = resp.extensions().get::<crate::cluster::UpstreamEndpoint>() {
                record.entry.upstream_endpoint = ep.0.to_string();
            }
            strip_hop_by_hop(resp.headers_mut(), false);
            apply_response_headers(route, resp.headers_mut());
            if let Some(status) = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()) {
                record.set_grpc_status(status);
            }
            resp
        }
        Outcome::Failed(e) => {
            tracing::info!(error = %e, cluster = cluster.id(), "upstream request failed");
            record.set_flag(e.response_flag());
            if let Some(ep) = e.endpoint() {
                record.entry.upstream_endpoint = ep.to_string();
            }
            local::error(grpc, StatusCode::SERVICE_UNAVAILABLE, upstream_reason(&e), &e.to_string())
        }
        Outcome::TimedOut { per_try } => {
            record.set_flag("UT");
            let reason = if per_try { "upstream_per_try_timeout" } else { "upstream_timeout" };
            local::error(grpc, StatusCode::GATEWAY_TIMEOUT, reason, "upstream request timeout")
        }
    }
}

/// Sets the status on the record and wraps the body so the record is emitted when the response ends.
fn finish(resp: Response<Body>, mut record: Record) -> Response<Body> {
    record.set_status(resp.status().as_u16());
    if record.labels.request_protocol == "grpc"
        && record.labels.grpc_response_status.is_empty()
        && let Some(s) = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok())
    {
        record.set_grpc_status(s);
    }
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, Recorded::new(body, record).boxed_unsync())
}

fn new_record(conn: &HttpConn, parts: &Parts, grpc: bool, request_id: &str) -> Record {
    let ctx = &conn.ctx;
    let protocol = match parts.version {
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    };
    let (source_workload, source_namespace) = ctx.source_workload();
    let principal = ctx.principal().map_or_else(|| "unknown".to_string(), ToString::to_string);
    // The access log line is filled in only when the access log is on.
    let entry = if Entry::enabled() {
        let mut entry = Entry::new(protocol, SystemTime::now(), ctx.peer, ctx.local);
        entry.method = parts.method.to_string();
        entry.path = parts.uri.path_and_query().map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
        entry.listener = ctx.listener.id.clone();
        entry.source_workload = source_workload.clone();
        entry.source_principal = principal.clone();
        entry.destination_workload = ctx.destination_workload_name();
        entry.destination_principal =
            ctx.destination_workload.as_ref().map_or_else(|| "unknown".to_string(), |w| w.spec.identity.to_string());
        entry.request_id = request_id.to_string();
        entry
    } else {
        Entry { protocol, ..Entry::default() }
    };
    Record {
        metrics: ctx.runtime.metrics.clone(),
        _in_flight: InFlight::start(&conn.activity),
        started: Instant::now(),
        entry,
        labels: RequestLabels {
            reporter: ctx.reporter(),
            source_workload,
            source_workload_namespace: source_namespace,
            source_principal: principal,
            destination_service: "unknown".into(),
            destination_workload: ctx.destination_workload_name(),
            request_protocol: if grpc { "grpc" } else { "http" },
            response_code: 0,
            grpc_response_status: String::new(),
            response_flags: String::new(),
            connection_security_policy: ctx.security_policy(),
        },
        received: Arc::new(AtomicU64::new(0)),
    }
}

/// An HTTP/1.1 request asking to switch protocols.
fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && header_has_token(req.headers(), header::CONNECTION, "upgrade")
}

fn header_has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Request line plus header lines, as they would appear on the wire.
fn head_size(parts: &Parts) -> usize {
    let target = parts.uri.path_and_query().map_or(1, |p| p.as_str().len())
        + parts.uri.authority().map_or(0, |a| a.as_str().len() + 8);
    let line = parts.method.as_str().len() + target + 12;
    parts.headers.iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum::<usize>() + line + 2
}

/// Rewrites path and host, strips hop-by-hop headers and applies the route's request header changes.
fn prepare_upstream_head(
    parts: &mut Parts,
    route: &CompiledRoute,
    fwd: &Forward,
    scheme: &str,
    request_id: &str,
    upgrade: bool,
) {
    let host = fwd.host_rewrite.clone().or_else(|| request_host(parts).map(str::to_string));
    let mut path_and_query = parts.uri.path_and_query().map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
    if let (Some(new_prefix), Some(prefix)) = (&fwd.prefix_rewrite, route.path_prefix())
        && let Some(rest) = path_and_query.strip_prefix(prefix)
    {
        path_and_query = format!("{new_prefix}{rest}");
    }
    match Uri::builder().path_and_query(path_and_query.as_str()).build() {
        Ok(uri) => parts.uri = uri,
        Err(e) => tracing::debug!(error = %e, "rewritten path is not a valid URI, keeping the original"),
    }
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if let Some(host) = host
        && let Ok(v) = HeaderValue::from_str(&host)
    {
        parts.headers.insert(header::HOST, v);
    }
    for name in &route.request_headers_to_remove {
        parts.headers.remove(name);
    }
    add_headers(&mut parts.headers, &route.request_headers_to_add);
    parts
        .headers
        .insert("x-forwarded-proto", HeaderValue::from_static(if scheme == "https" { "https" } else { "http" }));
    if !parts.headers.contains_key("x-request-id")
        && let Ok(v) = HeaderValue::from_str(request_id)
    {
        parts.headers.insert("x-request-id", v);
    }
    parts.version = Version::HTTP_11;
}

/// Removes connection-scoped headers (and those the `Connection` header names). `TE: trailers` survives (gRPC);
/// an upgrade keeps `Connection: upgrade` and `Upgrade`.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(upgrade && n == header::UPGRADE))
        .collect();
    for n in named {
        headers.remove(n);
    }
    let te_trailers = header_has_token(headers, header::TE, "trailers");
    let upgrade_to = if upgrade { headers.get(header::UPGRADE).cloned() } else { None };
    let hop: Vec<HeaderName> = headers.keys().filter(|k| is_hop_by_hop(k.as_str())).cloned().collect();
    for n in hop {
        headers.remove(n);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(protocol) = upgrade_to {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
    }
}

fn add_headers(headers: &mut HeaderMap, add: &[(HeaderName, HeaderValue, bool)]) {
    for (name, value, append) in add {
        if *append {
            headers.append(name.clone(), value.clone());
        } else {
            headers.insert(name.clone(), value.clone());
        }
    }
}

fn apply_response_headers(route: &CompiledRoute, headers: &mut HeaderMap) {
    for name in &route.response_headers_to_remove {
        headers.remove(name);
    }
    add_headers(headers, &route.response_headers_to_add);
}

fn redirect_response(r: &Redirect, parts: &Parts, scheme: &str) -> Response<Body> {
    let scheme = r.scheme.as_deref().unwrap_or(scheme);
    let host = r.host.as_deref().or_else(|| request_host(parts)).unwrap_or("");
    let path = match &r.path {
        Some(p) if p.contains('?') => p.clone(),
        Some(p) => match parts.uri.query() {
            Some(q) => format!("{p}?{q}"),
            None => p.clone(),
        },
        None => parts.uri.path_and_query().map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
    };
    let mut resp = Response::new(local::empty());
    *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    match HeaderValue::from_str(&format!("{scheme}://{host}{path}")) {
        Ok(v) => {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        Err(_) => {
            return local::error(false, StatusCode::BAD_REQUEST, "bad_redirect", "redirect location is not valid");
        }
    }
    resp
}

/// The `grpc-timeout` header: up to 8 digits and a unit (H, M, S, m, u, n).
fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A reason for `x-dpu-proxy-error`.
pub(super) fn upstream_reason(e: &UpstreamError) -> &'static str {
    match e {
        UpstreamError::Overflow { .. } => "overflow",
        UpstreamError::NoHealthyEndpoint => "no_healthy_endpoint",
        UpstreamError::ConnectFailure { .. } => "connect_failure",
        UpstreamError::ConnectTimeout { .. } => "connect_timeout",
        UpstreamError::Tls { .. } => "upstream_tls",
        UpstreamError::Reset { .. } => "upstream_reset",
    }
}

/// A request body, kept for replay on a retry when it is at most [`MAX_REPLAY_BODY`].
enum RequestBody {
    /// Buffered before the first try (its size was known and small).
    Replayable { data: Bytes, trailers: Option<HeaderMap> },
    /// Streamed to the first try (`first`) while a copy is kept; replayable once the copy is complete.
    Teed { first: Option<Body>, copy: Arc<Mutex<ReplayCopy>> },
}

impl RequestBody {
    /// Buffers bodies whose size is known and at most [`MAX_REPLAY_BODY`]. Anything else streams to the first try
    /// with a bounded copy on the side: waiting for a body of unknown length would stall streaming protocols
    /// whose client waits for the response.
    async fn prepare(
        body: Incoming,
        received: Arc<AtomicU64>,
        deadline: Option<Instant>,
    ) -> Result<RequestBody, BoxError> {
        let counted = Counted::new(body, received);
        let small = counted.is_end_stream() || counted.size_hint().exact().is_some_and(|n| n <= MAX_REPLAY_BODY);
        if !small {
            let copy = Arc::new(Mutex::new(ReplayCopy::default()));
            let teed = Teed::new(counted, copy.clone(), MAX_REPLAY_BODY as usize);
            return Ok(RequestBody::Teed { first: Some(teed.map_err(BoxError::from).boxed_unsync()), copy });
        }
        let collect = counted.collect();
        let collected = match deadline {
            Some(d) => tokio::time::timeout_at(d.into(), collect).await.map_err(|_| "request body timed out")??,
            None => collect.await?,
        };
        let trailers = collected.trailers().cloned();
        Ok(RequestBody::Replayable { data: collected.to_bytes(), trailers })
    }

    /// Whether another try can send the whole body again.
    fn replayable(&self) -> bool {
        match self {
            RequestBody::Replayable { .. } => true,
            RequestBody::Teed { first: Some(_), .. } => true,
            RequestBody::Teed { first: None, copy } => {
                let copy = copy.lock().unwrap_or_else(|e| e.into_inner());
                copy.complete && !copy.overflow
            }
        }
    }

    fn take(&mut self) -> Body {
        let (data, trailers) = match self {
            RequestBody::Replayable { data, trailers } => (data.clone(), trailers.clone()),
            RequestBody::Teed { first, copy } => {
                if let Some(body) = first.take() {
                    return body;
                }
                let copy = copy.lock().unwrap_or_else(|e| e.into_inner());
                (Bytes::copy_from_slice(&copy.data), copy.trailers.clone())
            }
        };
        match trailers {
            None => local::full(data),
            Some(t) => {
                let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![Ok(Frame::data(data)), Ok(Frame::trailers(t))];
                StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
            }
        }
    }
}

enum Outcome {
    Response(Response<Body>),
    Failed(UpstreamError),
    TimedOut { per_try: bool },
}

async fn send_with_retries(
    cluster: &Cluster,
    fwd: &Forward,
    parts: &Parts,
    body: &mut RequestBody,
    lb: &LbContext<'_>,
    deadline: Option<Instant>,
) -> Outcome {
    let policy = fwd.retry.as_ref();
    let attempts = 1 + policy.map_or(0, |p| p.attempts);
    let per_try =
        policy.and_then(|p| (p.per_try_timeout_ms > 0).then(|| Duration::from_millis(p.per_try_timeout_ms.into())));
    let mut _permit = None;
    let mut attempt = 1;
    loop {
        let req = build_request(parts, body.take());
        let now = Instant::now();
        let remaining = deadline.map(|d| d.saturating_duration_since(now));
        let (limit, is_per_try) = match (per_try, remaining) {
            (Some(p), Some(r)) if p < r => (Some(p), true),
            (Some(p), None) => (Some(p), true),
            (_, r) => (r, false),
        };
        let outcome = match limit {
            Some(l) => match tokio::time::timeout(l, cluster.send(req, lb)).await {
                Ok(Ok(resp)) => Outcome::Response(resp),
                Ok(Err(e)) => Outcome::Failed(e),
                Err(_) => Outcome::TimedOut { per_try: is_per_try },
            },
            None => match cluster.send(req, lb).await {
                Ok(resp) => Outcome::Response(resp),
                Err(e) => Outcome::Failed(e),
            },
        };
        let Some(policy) = policy else { return outcome };
        if attempt >= attempts || !body.replayable() || !should_retry(policy, &outcome) {
            return outcome;
        }
        let Some(permit) = cluster.admit_retry(policy) else {
            tracing::debug!(cluster = cluster.id(), "retry refused by the retry budget or circuit breaker");
            return outcome;
        };
        _permit = Some(permit);
        drop(outcome);
        let backoff = RETRY_BACKOFF.saturating_mul(1 << (attempt - 1).min(4)).min(MAX_RETRY_BACKOFF);
        let backoff = backoff.mul_f64(0.5 + fastrand::f64() / 2.0);
        if let Some(d) = deadline
            && Instant::now() + backoff >= d
        {
            return Outcome::TimedOut { per_try: false };
        }
        tokio::time::sleep(backoff).await;
        attempt += 1;
        tracing::debug!(attempt, cluster = cluster.id(), "retrying request");
    }
}

fn build_request(parts: &Parts, body: Body) -> Request<Body> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req
}

fn should_retry(policy: &RetryPolicy, outcome: &Outcome) -> bool {
    let on = |c: RetryOn| policy.retry_on.contains(&c);
    match outcome {
        Outcome::Response(resp) => {
            let status = resp.status().as_u16();
            (on(RetryOn::FiveXx) && status >= 500)
                || (on(RetryOn::GatewayError) && matches!(status, 502..=504))
                || (on(RetryOn::Unavailable)
                    && resp.headers().get("grpc-status").is_some_and(|v| v.as_bytes() == b"14"))
        }
        Outcome::Failed(e) => {
            let transport = matches!(
                e,
                UpstreamError::ConnectFailure { .. }
                    | UpstreamError::ConnectTimeout { .. }
                    | UpstreamError::Tls { .. }
                    | UpstreamError::Reset { .. }
            );
            (on(RetryOn::ConnectFailure) && e.is_connect_failure())
                || (on(RetryOn::Reset) && matches!(e, UpstreamError::Reset { .. }))
                || ((on(RetryOn::FiveXx) || on(RetryOn::GatewayError)) && transport)
        }
        Outcome::TimedOut { per_try } => *per_try && (on(RetryOn::FiveXx) || on(RetryOn::GatewayError)),
    }
}

/// A random version-4 UUID.
fn new_request_id() -> String {
    let hi = fastrand::u64(..);
    let lo = fastrand::u64(..);
    let hi = (hi & 0xffff_ffff_ffff_0fff) | 0x0000_0000_0000_4000;
    let lo = (lo & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xffff,
        hi & 0xffff,
        lo >> 48,
        lo & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        let mut h = HeaderMap::new();
        h.insert("grpc-timeout", HeaderValue::from_static("250m"));
        assert_eq!(grpc_timeout(&h), Some(Duration::from_millis(250)));
        h.insert("grpc-timeout", HeaderValue::from_static("2S"));
        assert_eq!(grpc_timeout(&h), Some(Duration::from_secs(2)));
        h.insert("grpc-timeout", HeaderValue::from_static("123456789S"));
        assert_eq!(grpc_timeout(&h), None);
        h.insert("grpc-timeout", HeaderValue::from_static("5x"));
        assert_eq!(grpc_timeout(&h), None);
    }

    #[test]
    fn hop_by_hop_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key("x-private") && !h.contains_key("keep-alive") && !h.contains_key("connection"));
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["x-kept"], "1");
    }

    #[test]
    fn request_ids_are_uuids() {
        let id = new_request_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert_ne!(id, new_request_id());
    }
}
