//! Compiled route tables: virtual host selection by Host / `:authority`, then the first route whose path and header
//! matchers hold. Compilation happens once per snapshot; selection is allocation-free on the hot path except for
//! regex matching.

use std::collections::HashMap;

use dpu_intent::Invalid;
use http::request::Parts;
use regex::Regex;

use crate::model::{
    Forward, HeaderMatch, HeaderValue, PathMatch, Redirect, RouteAction, RouteTableSpec, StringMatch, WeightedCluster,
};

/// Compiled regexes are bounded so a hostile pattern cannot exhaust memory.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// A compiled `meshRouteTables/{id}`.
#[derive(Debug)]
pub struct RouteTable {
    id: String,
    virtual_hosts: Vec<CompiledVirtualHost>,
    exact: HashMap<String, usize>,
    /// `*.suffix` domains as `.suffix`, longest first.
    suffixes: Vec<(String, usize)>,
    /// `prefix.*` domains as `prefix.`, longest first.
    prefixes: Vec<(String, usize)>,
    any: Option<usize>,
}

#[derive(Debug)]
struct CompiledVirtualHost {
    routes: Vec<CompiledRoute>,
}

/// One route, ready to match and act.
#[derive(Debug)]
pub struct CompiledRoute {
    pub name: String,
    /// Name of the virtual host that holds the route.
    pub virtual_host: String,
    path: PathMatcher,
    headers: Vec<HeaderMatcher>,
    pub action: RouteAction,
    pub request_headers_to_add: Vec<(http::HeaderName, http::HeaderValue, bool)>,
    pub request_headers_to_remove: Vec<http::HeaderName>,
    pub response_headers_to_add: Vec<(http::HeaderName, http::HeaderValue, bool)>,
    pub response_headers_to_remove: Vec<http::HeaderName>,
}

#[derive(Debug)]
enum PathMatcher {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
struct HeaderMatcher {
    name: String,
    value: ValueMatcher,
    invert: bool,
}

#[derive(Debug)]
enum ValueMatcher {
    Exact(String),
    Prefix(String),
    Regex(Regex),
    Present,
}

impl RouteTable {
    /// Compiles a validated spec. Errors name the field, as `validate` does.
    pub fn compile(id: &str, spec: &RouteTableSpec) -> Result<RouteTable, Invalid> {
        let mut table = RouteTable {
            id: id.to_string(),
            virtual_hosts: Vec::with_capacity(spec.virtual_hosts.len()),
            exact: HashMap::new(),
            suffixes: Vec::new(),
            prefixes: Vec::new(),
            any: None,
        };
        for (v, vh) in spec.virtual_hosts.iter().enumerate() {
            for domain in &vh.domains {
                let domain = domain.to_ascii_lowercase();
                if domain == "*" {
                    table.any = Some(v);
                } else if let Some(suffix) = domain.strip_prefix('*') {
                    table.suffixes.push((suffix.to_string(), v));
                } else if let Some(prefix) = domain.strip_suffix('*') {
                    table.prefixes.push((prefix.to_string(), v));
                } else {
                    table.exact.insert(domain, v);
                }
            }
            let mut routes = Vec::with_capacity(vh.routes.len());
            for (r, route) in vh.routes.iter().enumerate() {
                let field = format!("route_table.virtual_hosts[{v}].routes[{r}]");
                let path = match &route.matcher.path {
                    PathMatch::Exact(p) => PathMatcher::Exact(p.clone()),
                    PathMatch::Prefix(p) => PathMatcher::Prefix(p.clone()),
                    PathMatch::Regex(re) => PathMatcher::Regex(anchored(&format!("{field}.match.path"), re)?),
                };
                let headers = route
                    .matcher
                    .headers
                    .iter()
                    .enumerate()
                    .map(|(h, m)| HeaderMatcher::compile(&format!("{field}.match.headers[{h}].value"), m))
                    .collect::<Result<Vec<_>, _>>()?;
                routes.push(CompiledRoute {
                    name: route.name.clone(),
                    virtual_host: vh.name.clone(),
                    path,
                    headers,
                    action: route.action.clone(),
                    request_headers_to_add: header_values(
                        &format!("{field}.request_headers_to_add"),
                        &route.request_headers_to_add,
                    )?,
                    request_headers_to_remove: header_names(
                        &format!("{field}.request_headers_to_remove"),
                        &route.request_headers_to_remove,
                    )?,
                    response_headers_to_add: header_values(
                        &format!("{field}.response_headers_to_add"),
                        &route.response_headers_to_add,
                    )?,
                    response_headers_to_remove: header_names(
                        &format!("{field}.response_headers_to_remove"),
                        &route.response_headers_to_remove,
                    )?,
                });
            }
            table.virtual_hosts.push(CompiledVirtualHost { routes });
        }
        table.suffixes.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        table.prefixes.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
        Ok(table)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Every cluster id a forward action names, with the field that names it (for reference checks).
    pub fn cluster_refs(&self) -> Vec<(String, &str)> {
        let mut refs = Vec::new();
        for (v, vh) in self.virtual_hosts.iter().enumerate() {
            for (r, route) in vh.routes.iter().enumerate() {
                if let RouteAction::Forward(fwd) = &route.action {
                    for (c, wc) in fwd.clusters.iter().enumerate() {
                        refs.push((
                            format!("route_table.virtual_hosts[{v}].routes[{r}].action.clusters[{c}].cluster"),
                            wc.cluster.as_str(),
                        ));
                    }
                }
            }
        }
        refs
    }

    /// The route for a request: virtual host by host (port stripped, case-insensitive), then the first route
    /// whose matchers hold. `scheme` is the downstream scheme (`http` / `https`).
    pub fn select(&self, parts: &Parts, scheme: &str) -> Option<&CompiledRoute> {
        let host = request_host(parts).map(|h| strip_port(h).to_ascii_lowercase()).unwrap_or_default();
        let vh = self.virtual_host(&host)?;
        self.virtual_hosts[vh].routes.iter().find(|route| route.matches(parts, scheme))
    }

    fn virtual_host(&self, host: &str) -> Option<usize> {
        if let Some(v) = self.exact.get(host) {
            return Some(*v);
        }
        if let Some((_, v)) =
            self.suffixes.iter().find(|(suffix, _)| host.len() > suffix.len() && host.ends_with(suffix))
        {
            return Some(*v);
        }
        if let Some((_, v)) =
            self.prefixes.iter().find(|(prefix, _)| host.len() > prefix.len() && host.starts_with(prefix))
        {
            return Some(*v);
        }
        self.any
    }
}

impl CompiledRoute {
    fn matches(&self, parts: &Parts, scheme: &str) -> bool {
        let path = parts.uri.path();
        let path_ok = match &self.path {
            PathMatcher::Exact(p) => path == p,
            PathMatcher::Prefix(p) => path.starts_with(p.as_str()),
            PathMatcher::Regex(re) => re.is_match(path),
        };
        path_ok && self.headers.iter().all(|m| m.matches(parts, scheme))
    }

    /// The matched path prefix, for `prefix_rewrite`.
    pub fn path_prefix(&self) -> Option<&str> {
        match &self.path {
            PathMatcher::Prefix(p) => Some(p),
            _ => None,
        }
    }

    pub fn forward(&self) -> Option<&Forward> {
        match &self.action {
            RouteAction::Forward(f) => Some(f),
            _ => None,
        }
    }

    pub fn redirect(&self) -> Option<&Redirect> {
        match &self.action {
            RouteAction::Redirect(r) => Some(r),
            _ => None,
        }
    }
}

impl HeaderMatcher {
    fn compile(field: &str, m: &HeaderMatch) -> Result<HeaderMatcher, Invalid> {
        let value = match &m.value {
            StringMatch::Exact(v) => ValueMatcher::Exact(v.clone()),
            StringMatch::Prefix(v) => ValueMatcher::Prefix(v.clone()),
            StringMatch::Regex(re) => ValueMatcher::Regex(anchored(field, re)?),
            StringMatch::Present => ValueMatcher::Present,
        };
        Ok(HeaderMatcher { name: m.name.clone(), value, invert: m.invert })
    }

    fn matches(&self, parts: &Parts, scheme: &str) -> bool {
        let path_and_query;
        let value: Option<&str> = match self.name.as_str() {
            ":method" => Some(parts.method.as_str()),
            ":authority" => request_host(parts),
            ":scheme" => Some(parts.uri.scheme_str().unwrap_or(scheme)),
            ":path" => {
                path_and_query = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
                Some(path_and_query)
            }
            name => parts.headers.get(name).and_then(|v| v.to_str().ok()),
        };
        let matched = match (&self.value, value) {
            (_, None) => false,
            (ValueMatcher::Present, Some(_)) => true,
            (ValueMatcher::Exact(want), Some(v)) => v == want,
            (ValueMatcher::Prefix(want), Some(v)) => v.starts_with(want.as_str()),
            (ValueMatcher::Regex(re), Some(v)) => re.is_match(v),
        };
        matched != self.invert
    }
}

/// The request's host: the URI authority (HTTP/2 `:authority`, absolute-form HTTP/1.1), else the Host header.
pub fn request_host(parts: &Parts) -> Option<&str> {
    parts.uri.authority().map(|a| a.as_str()).or_else(|| parts.headers.get(http::header::HOST)?.to_str().ok())
}

/// `host:port` → `host`, `[v6]:port` → `[v6]`.
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// Weighted pick among a forward action's clusters (`fastrand`); a single cluster is returned as is.
pub fn pick_cluster(clusters: &[WeightedCluster]) -> &WeightedCluster {
    if clusters.len() == 1 {
        return &clusters[0];
    }
    let total: u64 = clusters.iter().map(|c| u64::from(c.weight)).sum();
    if total == 0 {
        return &clusters[0];
    }
    let mut point = fastrand::u64(0..total);
    for c in clusters {
        let w = u64::from(c.weight);
        if point < w {
            return c;
        }
        point -= w;
    }
    &clusters[clusters.len() - 1]
}

fn anchored(field: &str, re: &str) -> Result<Regex, Invalid> {
    regex::RegexBuilder::new(&format!("^(?:{re})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| Invalid { field: field.into(), message: format!("bad regex: {e}") })
}

fn header_values(
    field: &str,
    list: &[HeaderValue],
) -> Result<Vec<(http::HeaderName, http::HeaderValue, bool)>, Invalid> {
    list.iter()
        .enumerate()
        .map(|(i, hv)| {
            let name = http::HeaderName::from_bytes(hv.name.as_bytes())
                .map_err(|e| Invalid { field: format!("{field}[{i}].name"), message: e.to_string() })?;
            let value = http::HeaderValue::from_str(&hv.value)
                .map_err(|e| Invalid { field: format!("{field}[{i}].value"), message: e.to_string() })?;
            Ok((name, value, hv.append))
        })
        .collect()
}

fn header_names(field: &str, list: &[String]) -> Result<Vec<http::HeaderName>, Invalid> {
    list.iter()
        .enumerate()
        .map(|(i, n)| {
            http::HeaderName::from_bytes(n.as_bytes())
                .map_err(|e| Invalid { field: format!("{field}[{i}]"), message: e.to_string() })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Route, RouteMatch, VirtualHost};

    fn direct(name: &str, path: PathMatch, headers: Vec<HeaderMatch>) -> Route {
        Route {
            name: name.into(),
            matcher: RouteMatch { path, headers },
            action: RouteAction::DirectResponse { status: 200, body: name.into() },
            request_headers_to_add: vec![],
            request_headers_to_remove: vec![],
            response_headers_to_add: vec![],
            response_headers_to_remove: vec![],
        }
    }

    fn vhost(name: &str, domains: &[&str]) -> VirtualHost {
        VirtualHost {
            name: name.into(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            routes: vec![direct(name, PathMatch::Prefix("/".into()), vec![])],
        }
    }

    fn parts(method: &str, uri: &str, host: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(method).uri(uri).header("host", host);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn virtual_hosts_rank_exact_suffix_prefix_any() {
        let spec = RouteTableSpec {
            virtual_hosts: vec![
                vhost("any", &["*"]),
                vhost("short-suffix", &["*.example"]),
                vhost("long-suffix", &["*.api.example"]),
                vhost("prefix", &["api.*"]),
                vhost("exact", &["api.example"]),
            ],
        };
        spec.validate().unwrap();
        let table = RouteTable::compile("t", &spec).unwrap();
        let vh = |host: &str| table.select(&parts("GET", "/", host, &[]), "http").unwrap().virtual_host.clone();
        assert_eq!(vh("api.example:8080"), "exact");
        assert_eq!(vh("API.Example"), "exact");
        assert_eq!(vh("v1.api.example"), "long-suffix");
        assert_eq!(vh("web.example"), "short-suffix");
        assert_eq!(vh("api.other"), "prefix");
        assert_eq!(vh("elsewhere"), "any");
    }

    #[test]
    fn first_route_whose_path_and_headers_hold_wins() {
        let spec = RouteTableSpec {
            virtual_hosts: vec![VirtualHost {
                name: "web".into(),
                domains: vec!["*".into()],
                routes: vec![
                    direct(
                        "post-only",
                        PathMatch::Exact("/submit".into()),
                        vec![HeaderMatch {
                            name: ":method".into(),
                            value: StringMatch::Exact("POST".into()),
                            invert: false,
                        }],
                    ),
                    direct(
                        "not-canary",
                        PathMatch::Regex("/items/[0-9]+".into()),
                        vec![HeaderMatch { name: "x-canary".into(), value: StringMatch::Present, invert: true }],
                    ),
                    direct("api", PathMatch::Prefix("/api".into()), vec![]),
                    direct("fallback", PathMatch::Prefix("/".into()), vec![]),
                ],
            }],
        };
        spec.validate().unwrap();
        let table = RouteTable::compile("t", &spec).unwrap();
        let route =
            |m: &str, uri: &str, h: &[(&str, &str)]| table.select(&parts(m, uri, "x", h), "http").unwrap().name.clone();
        assert_eq!(route("POST", "/submit?x=1", &[]), "post-only");
        assert_eq!(route("GET", "/submit", &[]), "fallback");
        assert_eq!(route("GET", "/items/42?q", &[]), "not-canary");
        assert_eq!(route("GET", "/items/42", &[("x-canary", "1")]), "fallback");
        assert_eq!(route("GET", "/items/42x", &[]), "fallback");
        assert_eq!(route("GET", "/api/v1", &[]), "api");
    }

    #[test]
    fn weighted_pick_follows_weights() {
        let clusters = vec![
            WeightedCluster { cluster: "a".into(), weight: 90 },
            WeightedCluster { cluster: "b".into(), weight: 10 },
        ];
        let n = 20_000;
        let a = (0..n).filter(|_| pick_cluster(&clusters).cluster == "a").count();
        let share = a as f64 / n as f64;
        assert!((0.87..0.93).contains(&share), "share of a: {share}");
    }

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("a.example:80"), "a.example");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("a.example"), "a.example");
    }
}
