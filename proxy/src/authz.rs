//! Authorization with Istio `AuthorizationPolicy` semantics: a connection or request is denied when any `Deny`
//! policy matches; otherwise, when any `Allow` policy exists, one of them must match; otherwise it is allowed.
//!
//! A policy matches when one of its rules matches; a rule matches when every non-empty field matches (one entry
//! of the list). Source fields (`principals`, `namespaces`) never match a source without a verified SPIFFE ID.
//! Opaque TCP connections are decided on L4 fields only: an `Allow` rule with L7 fields (`methods`, `paths`,
//! `headers`) never matches them, and a `Deny` rule with L7 fields matches on its L4 fields alone — the
//! conservative choice Istio makes.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use dpu_intent::Invalid;
use http::HeaderName;
use regex::Regex;

use crate::model::{IpPrefix, PolicyAction, PolicySpec, SpiffeId, StringMatch};

/// The limit on one compiled header regex, as for route matches.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// `exact`, `*`, `prefix*` or `*suffix`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl Pattern {
    fn parse(field: &str, pattern: &str) -> Result<Pattern, Invalid> {
        let stars = pattern.matches('*').count();
        let parsed = if pattern == "*" {
            Pattern::Any
        } else if stars == 0 && !pattern.is_empty() {
            Pattern::Exact(pattern.to_owned())
        } else if stars == 1 && pattern.len() > 1 && pattern.ends_with('*') {
            Pattern::Prefix(pattern[..pattern.len() - 1].to_owned())
        } else if stars == 1 && pattern.len() > 1 && pattern.starts_with('*') {
            Pattern::Suffix(pattern[1..].to_owned())
        } else {
            return Err(Invalid {
                field: field.to_owned(),
                message: format!("{pattern:?} is not exact, *, prefix* or *suffix"),
            });
        };
        Ok(parsed)
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(exact) => value == exact,
            Pattern::Prefix(prefix) => value.starts_with(prefix.as_str()),
            Pattern::Suffix(suffix) => value.ends_with(suffix.as_str()),
        }
    }
}

/// Where a header match reads its value.
#[derive(Debug, Clone)]
enum HeaderSource {
    Method,
    Authority,
    Scheme,
    Path,
    Header(HeaderName),
}

#[derive(Debug, Clone)]
enum ValueMatch {
    Exact(String),
    Prefix(String),
    Regex(Regex),
    Present,
}

#[derive(Debug, Clone)]
struct HeaderRule {
    source: HeaderSource,
    value: ValueMatch,
    invert: bool,
}

impl HeaderRule {
    fn matches(&self, req: &http::request::Parts) -> bool {
        self.value_matches(self.value_of(req).as_deref()) != self.invert
    }

    fn value_matches(&self, value: Option<&str>) -> bool {
        match (&self.value, value) {
            (ValueMatch::Present, value) => value.is_some(),
            (_, None) => false,
            (ValueMatch::Exact(exact), Some(value)) => value == exact,
            (ValueMatch::Prefix(prefix), Some(value)) => value.starts_with(prefix.as_str()),
            (ValueMatch::Regex(re), Some(value)) => re.is_match(value),
        }
    }

    /// The request's value for this source; repeated headers are joined with `,` as Envoy does.
    fn value_of(&self, req: &http::request::Parts) -> Option<String> {
        match &self.source {
            HeaderSource::Method => Some(req.method.as_str().to_owned()),
            HeaderSource::Authority => req
                .uri
                .authority()
                .map(|a| a.as_str().to_owned())
                .or_else(|| header_value(&req.headers, &http::header::HOST)),
            HeaderSource::Scheme => req.uri.scheme_str().map(str::to_owned),
            HeaderSource::Path => req.uri.path_and_query().map(|p| p.as_str().to_owned()),
            HeaderSource::Header(name) => header_value(&req.headers, name),
        }
    }
}

fn header_value(headers: &http::HeaderMap, name: &HeaderName) -> Option<String> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let mut joined = String::from_utf8_lossy(first.as_bytes()).into_owned();
    for value in values {
        joined.push(',');
        joined.push_str(&String::from_utf8_lossy(value.as_bytes()));
    }
    Some(joined)
}

#[derive(Debug, Clone)]
struct Rule {
    principals: Vec<Pattern>,
    namespaces: Vec<Pattern>,
    source_prefixes: Vec<IpPrefix>,
    ports: Vec<u16>,
    methods: Vec<String>,
    paths: Vec<Pattern>,
    headers: Vec<HeaderRule>,
}

impl Rule {
    fn has_l7(&self) -> bool {
        !self.methods.is_empty() || !self.paths.is_empty() || !self.headers.is_empty()
    }

    fn matches_l4(&self, peer: &PeerInfo<'_>) -> bool {
        if !self.principals.is_empty() {
            let Some(principal) = peer.principal else { return false };
            let full = principal.to_string();
            // Istio writes principals without the scheme (`cluster.local/ns/a/sa/b`); accept both spellings.
            let short = full.strip_prefix("spiffe://").unwrap_or(&full);
            if !self.principals.iter().any(|p| p.matches(&full) || p.matches(short)) {
                return false;
            }
        }
        if !self.namespaces.is_empty() {
            let Some(principal) = peer.principal else { return false };
            if !self.namespaces.iter().any(|p| p.matches(principal.namespace())) {
                return false;
            }
        }
        if !self.source_prefixes.is_empty() {
            let source = peer.source.to_canonical();
            if !self.source_prefixes.iter().any(|prefix| prefix.contains(source)) {
                return false;
            }
        }
        self.ports.is_empty() || self.ports.contains(&peer.destination_port)
    }

    fn matches_l7(&self, req: &http::request::Parts) -> bool {
        (self.methods.is_empty() || self.methods.iter().any(|m| m == req.method.as_str()))
            && (self.paths.is_empty() || self.paths.iter().any(|p| p.matches(req.uri.path())))
            && self.headers.iter().all(|h| h.matches(req))
    }
}

/// One compiled `meshPolicies` object.
#[derive(Debug, Clone)]
pub struct Policy {
    id: String,
    action: PolicyAction,
    rules: Vec<Rule>,
}

impl Policy {
    /// Validates `spec` and compiles its patterns and regexes (anchored: a regex matches the whole value).
    pub fn compile(id: &str, spec: &PolicySpec) -> Result<Policy, Invalid> {
        spec.validate()?;
        let mut rules = Vec::with_capacity(spec.rules.len());
        for (r, rule) in spec.rules.iter().enumerate() {
            let field = format!("policy.rules[{r}]");
            let patterns = |name: &str, list: &[String]| -> Result<Vec<Pattern>, Invalid> {
                list.iter().enumerate().map(|(i, p)| Pattern::parse(&format!("{field}.{name}[{i}]"), p)).collect()
            };
            let mut headers = Vec::with_capacity(rule.headers.len());
            for (h, m) in rule.headers.iter().enumerate() {
                headers.push(HeaderRule {
                    source: header_source(&format!("{field}.headers[{h}].name"), &m.name)?,
                    value: value_match(&format!("{field}.headers[{h}].value"), &m.value)?,
                    invert: m.invert,
                });
            }
            rules.push(Rule {
                principals: patterns("principals", &rule.principals)?,
                namespaces: patterns("namespaces", &rule.namespaces)?,
                source_prefixes: rule.source_prefixes.clone(),
                ports: rule.ports.clone(),
                methods: rule.methods.clone(),
                paths: patterns("paths", &rule.paths)?,
                headers,
            });
        }
        Ok(Policy { id: id.to_owned(), action: spec.action, rules })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn action(&self) -> PolicyAction {
        self.action
    }

    /// The index of the first rule matching a TCP connection.
    fn match_connection(&self, peer: &PeerInfo<'_>) -> Option<usize> {
        self.rules.iter().position(|rule| {
            let l4 = rule.matches_l4(peer);
            match self.action {
                PolicyAction::Allow => l4 && !rule.has_l7(),
                PolicyAction::Deny => l4,
            }
        })
    }

    /// The index of the first rule matching an HTTP request.
    fn match_request(&self, peer: &PeerInfo<'_>, req: &http::request::Parts) -> Option<usize> {
        self.rules.iter().position(|rule| rule.matches_l4(peer) && rule.matches_l7(req))
    }
}

fn header_source(field: &str, name: &str) -> Result<HeaderSource, Invalid> {
    Ok(match name {
        ":method" => HeaderSource::Method,
        ":authority" => HeaderSource::Authority,
        ":scheme" => HeaderSource::Scheme,
        ":path" => HeaderSource::Path,
        _ => HeaderSource::Header(
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| Invalid { field: field.to_owned(), message: format!("{name:?} is not a header name") })?,
        ),
    })
}

fn value_match(field: &str, value: &StringMatch) -> Result<ValueMatch, Invalid> {
    Ok(match value {
        StringMatch::Exact(exact) => ValueMatch::Exact(exact.clone()),
        StringMatch::Prefix(prefix) => ValueMatch::Prefix(prefix.clone()),
        StringMatch::Present => ValueMatch::Present,
        StringMatch::Regex(re) => ValueMatch::Regex(
            regex::RegexBuilder::new(&format!("^(?:{re})$"))
                .size_limit(REGEX_SIZE_LIMIT)
                .build()
                .map_err(|e| Invalid { field: field.to_owned(), message: format!("bad regex: {e}") })?,
        ),
    })
}

/// Who is asking: the verified peer identity (mTLS), the source address and the destination port.
#[derive(Debug, Clone, Copy)]
pub struct PeerInfo<'a> {
    pub principal: Option<&'a SpiffeId>,
    pub source: IpAddr,
    pub destination_port: u16,
}

/// A refusal: the matching `Deny` policy, or an empty `policy` when `Allow` policies exist and none matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub policy: String,
    pub reason: String,
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.policy.is_empty() {
            write!(f, "denied: {}", self.reason)
        } else {
            write!(f, "denied by policy {:?}: {}", self.policy, self.reason)
        }
    }
}

impl std::error::Error for Denied {}

#[derive(Debug, Default)]
struct Policies {
    deny: Vec<Arc<Policy>>,
    allow: Vec<Arc<Policy>>,
}

/// The policies that apply to one listener or workload; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Authorizer {
    policies: Arc<Policies>,
}

impl Authorizer {
    pub fn new(policies: Vec<Arc<Policy>>) -> Authorizer {
        let (deny, allow) = policies.into_iter().partition(|p| p.action == PolicyAction::Deny);
        Authorizer { policies: Arc::new(Policies { deny, allow }) }
    }

    /// True when no policy applies: everything is allowed.
    pub fn is_empty(&self) -> bool {
        self.policies.deny.is_empty() && self.policies.allow.is_empty()
    }

    /// L4 decision for opaque TCP connections: an `Allow` rule with L7 fields never matches; a `Deny` rule with
    /// L7 fields matches on its L4 fields alone.
    pub fn check_connection(&self, peer: &PeerInfo<'_>) -> Result<(), Denied> {
        self.decide(peer, |policy| policy.match_connection(peer))
    }

    /// L7 decision for one HTTP request.
    pub fn check_request(&self, peer: &PeerInfo<'_>, req: &http::request::Parts) -> Result<(), Denied> {
        self.decide(peer, |policy| policy.match_request(peer, req))
    }

    fn decide(&self, peer: &PeerInfo<'_>, matching_rule: impl Fn(&Policy) -> Option<usize>) -> Result<(), Denied> {
        for policy in &self.policies.deny {
            if let Some(rule) = matching_rule(policy) {
                let denied = Denied { policy: policy.id.clone(), reason: format!("matched DENY rule {rule}") };
                tracing::debug!(
                    principal = ?peer.principal.map(ToString::to_string),
                    source = %peer.source,
                    port = peer.destination_port,
                    policy = %policy.id,
                    rule,
                    "authorization denied"
                );
                return Err(denied);
            }
        }
        if self.policies.allow.is_empty() || self.policies.allow.iter().any(|policy| matching_rule(policy).is_some()) {
            return Ok(());
        }
        tracing::debug!(
            principal = ?peer.principal.map(ToString::to_string),
            source = %peer.source,
            port = peer.destination_port,
            "authorization denied: no ALLOW policy matched"
        );
        Err(Denied { policy: String::new(), reason: "no ALLOW policy matched".into() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{HeaderMatch, PolicyRule};

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    fn policy(name: &str, action: PolicyAction, rules: Vec<PolicyRule>) -> Arc<Policy> {
        Arc::new(Policy::compile(name, &PolicySpec { action, rules }).unwrap())
    }

    fn allow(rule: PolicyRule) -> Authorizer {
        Authorizer::new(vec![policy("allow", PolicyAction::Allow, vec![rule])])
    }

    fn peer<'a>(principal: Option<&'a SpiffeId>, source: &str, port: u16) -> PeerInfo<'a> {
        PeerInfo { principal, source: source.parse().unwrap(), destination_port: port }
    }

    fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut builder = http::Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn header(name: &str, value: StringMatch, invert: bool) -> HeaderMatch {
        HeaderMatch { name: name.into(), value, invert }
    }

    #[test]
    fn no_policies_allow_everything() {
        let authz = Authorizer::default();
        assert!(authz.is_empty());
        assert!(authz.check_connection(&peer(None, "10.0.0.1", 80)).is_ok());
        assert!(authz.check_request(&peer(None, "10.0.0.1", 80), &request("GET", "/", &[])).is_ok());
    }

    #[test]
    fn an_allow_policy_without_rules_denies_everything() {
        let authz = Authorizer::new(vec![policy("lockdown", PolicyAction::Allow, vec![])]);
        assert!(!authz.is_empty());
        let denied = authz.check_connection(&peer(None, "10.0.0.1", 80)).unwrap_err();
        assert_eq!(denied.policy, "");
        assert_eq!(denied.to_string(), "denied: no ALLOW policy matched");
    }

    #[test]
    fn principals_match_exact_any_prefix_and_suffix_in_both_spellings() {
        let web = id("spiffe://cluster.local/ns/shop/sa/web");
        let api = id("spiffe://cluster.local/ns/shop/sa/api");
        let other = id("spiffe://example.org/ns/bank/sa/teller");
        for (pattern, web_ok, api_ok, other_ok) in [
            ("spiffe://cluster.local/ns/shop/sa/web", true, false, false),
            ("cluster.local/ns/shop/sa/web", true, false, false),
            ("*", true, true, true),
            ("cluster.local/ns/shop/*", true, true, false),
            ("spiffe://cluster.local/*", true, true, false),
            ("*/sa/api", false, true, false),
        ] {
            let authz = allow(PolicyRule { principals: vec![pattern.into()], ..Default::default() });
            for (who, expected) in [(&web, web_ok), (&api, api_ok), (&other, other_ok)] {
                let got = authz.check_connection(&peer(Some(who), "10.0.0.1", 80)).is_ok();
                assert_eq!(got, expected, "{pattern} vs {who}");
            }
            // Even `*` needs an authenticated source.
            assert!(authz.check_connection(&peer(None, "10.0.0.1", 80)).is_err(), "{pattern}");
        }
    }

    #[test]
    fn namespaces_match_the_spiffe_namespace() {
        let shop = id("spiffe://cluster.local/ns/shop/sa/web");
        let bank = id("spiffe://cluster.local/ns/bank/sa/web");
        let authz = allow(PolicyRule { namespaces: vec!["shop".into()], ..Default::default() });
        assert!(authz.check_connection(&peer(Some(&shop), "10.0.0.1", 80)).is_ok());
        assert!(authz.check_connection(&peer(Some(&bank), "10.0.0.1", 80)).is_err());
        assert!(authz.check_connection(&peer(None, "10.0.0.1", 80)).is_err());
        let prefixed = allow(PolicyRule { namespaces: vec!["sh*".into()], ..Default::default() });
        assert!(prefixed.check_connection(&peer(Some(&shop), "10.0.0.1", 80)).is_ok());
        assert!(prefixed.check_connection(&peer(Some(&bank), "10.0.0.1", 80)).is_err());
    }

    #[test]
    fn source_prefixes_match_v4_v6_and_mapped_addresses() {
        let authz = allow(PolicyRule {
            source_prefixes: vec!["10.1.0.0/16".parse().unwrap(), "fd00::/8".parse().unwrap()],
            ..Default::default()
        });
        assert!(authz.check_connection(&peer(None, "10.1.2.3", 80)).is_ok());
        assert!(authz.check_connection(&peer(None, "::ffff:10.1.2.3", 80)).is_ok());
        assert!(authz.check_connection(&peer(None, "fd12::1", 80)).is_ok());
        assert!(authz.check_connection(&peer(None, "10.2.0.1", 80)).is_err());
        assert!(authz.check_connection(&peer(None, "2001:db8::1", 80)).is_err());
    }

    #[test]
    fn ports_match_the_destination_port() {
        let authz = allow(PolicyRule { ports: vec![8080, 9090], ..Default::default() });
        assert!(authz.check_connection(&peer(None, "10.0.0.1", 9090)).is_ok());
        assert!(authz.check_connection(&peer(None, "10.0.0.1", 80)).is_err());
    }

    #[test]
    fn methods_and_paths_match_requests() {
        let p = peer(None, "10.0.0.1", 80);
        let authz = allow(PolicyRule {
            methods: vec!["GET".into(), "HEAD".into()],
            paths: vec!["/healthz".into(), "/api/*".into(), "*.png".into()],
            ..Default::default()
        });
        assert!(authz.check_request(&p, &request("GET", "/healthz", &[])).is_ok());
        assert!(authz.check_request(&p, &request("HEAD", "/api/v1/items?x=1", &[])).is_ok());
        assert!(authz.check_request(&p, &request("GET", "/img/logo.png?v=2", &[])).is_ok());
        assert!(authz.check_request(&p, &request("POST", "/healthz", &[])).is_err());
        assert!(authz.check_request(&p, &request("GET", "/healthz/deep", &[])).is_err());
        assert!(authz.check_request(&p, &request("GET", "/apix", &[])).is_err());
    }

    #[test]
    fn header_matches_exact_prefix_anchored_regex_present_and_inverted() {
        let p = peer(None, "10.0.0.1", 80);
        let check = |m: HeaderMatch, headers: &[(&str, &str)]| {
            allow(PolicyRule { headers: vec![m], ..Default::default() })
                .check_request(&p, &request("GET", "/", headers))
                .is_ok()
        };
        let exact = || header("x-user", StringMatch::Exact("alice".into()), false);
        assert!(check(exact(), &[("x-user", "alice")]));
        assert!(!check(exact(), &[("x-user", "alice2")]));
        assert!(!check(exact(), &[]));

        let prefix = || header("x-user", StringMatch::Prefix("al".into()), false);
        assert!(check(prefix(), &[("x-user", "alice")]));
        assert!(!check(prefix(), &[("x-user", "bob")]));

        let regex = || header("x-version", StringMatch::Regex("v[0-9]+".into()), false);
        assert!(check(regex(), &[("x-version", "v12")]));
        assert!(!check(regex(), &[("x-version", "xv12")]), "regexes are anchored at the start");
        assert!(!check(regex(), &[("x-version", "v12-beta")]), "regexes are anchored at the end");

        let present = || header("x-debug", StringMatch::Present, false);
        assert!(check(present(), &[("x-debug", "")]));
        assert!(!check(present(), &[]));

        let absent = || header("x-debug", StringMatch::Present, true);
        assert!(check(absent(), &[]));
        assert!(!check(absent(), &[("x-debug", "1")]));

        let not_bob = || header("x-user", StringMatch::Exact("bob".into()), true);
        assert!(check(not_bob(), &[("x-user", "alice")]));
        assert!(check(not_bob(), &[]));
        assert!(!check(not_bob(), &[("x-user", "bob")]));

        // Repeated headers are matched as one comma-joined value.
        let joined = || header("x-tag", StringMatch::Exact("a,b".into()), false);
        assert!(check(joined(), &[("x-tag", "a"), ("x-tag", "b")]));
    }

    #[test]
    fn pseudo_headers_read_the_request_line() {
        // `PolicySpec::validate` accepts regular header names only; the compiled matcher also reads pseudo-headers.
        let rule = |name: &str, value: &str| HeaderRule {
            source: header_source("f", name).unwrap(),
            value: ValueMatch::Exact(value.into()),
            invert: false,
        };
        let origin_form = request("GET", "/a?b=1", &[("host", "shop.example")]);
        assert!(rule(":authority", "shop.example").matches(&origin_form), "from Host in origin form");
        assert!(!rule(":authority", "bank.example").matches(&origin_form));
        assert!(rule(":method", "GET").matches(&origin_form));
        assert!(rule(":path", "/a?b=1").matches(&origin_form));
        assert!(!rule(":scheme", "https").matches(&origin_form), "no scheme in origin form");
        let absolute = request("GET", "https://bank.example/", &[("host", "shop.example")]);
        assert!(rule(":authority", "bank.example").matches(&absolute), "the URI authority wins");
        assert!(rule(":scheme", "https").matches(&absolute));
    }

    #[test]
    fn every_non_empty_field_of_a_rule_must_match() {
        let web = id("spiffe://cluster.local/ns/shop/sa/web");
        let authz = allow(PolicyRule {
            principals: vec!["cluster.local/ns/shop/sa/web".into()],
            ports: vec![8080],
            methods: vec!["GET".into()],
            ..Default::default()
        });
        let get = request("GET", "/", &[]);
        assert!(authz.check_request(&peer(Some(&web), "10.0.0.1", 8080), &get).is_ok());
        assert!(authz.check_request(&peer(Some(&web), "10.0.0.1", 80), &get).is_err());
        assert!(authz.check_request(&peer(None, "10.0.0.1", 8080), &get).is_err());
        assert!(authz.check_request(&peer(Some(&web), "10.0.0.1", 8080), &request("PUT", "/", &[])).is_err());
    }

    #[test]
    fn any_rule_of_a_policy_and_any_allow_policy_suffices() {
        let authz = Authorizer::new(vec![
            policy(
                "a",
                PolicyAction::Allow,
                vec![
                    PolicyRule { ports: vec![1], ..Default::default() },
                    PolicyRule { ports: vec![2], ..Default::default() },
                ],
            ),
            policy("b", PolicyAction::Allow, vec![PolicyRule { ports: vec![3], ..Default::default() }]),
        ]);
        for port in [1, 2, 3] {
            assert!(authz.check_connection(&peer(None, "10.0.0.1", port)).is_ok(), "{port}");
        }
        assert!(authz.check_connection(&peer(None, "10.0.0.1", 4)).is_err());
    }

    #[test]
    fn deny_wins_over_allow() {
        let web = id("spiffe://cluster.local/ns/shop/sa/web");
        let authz = Authorizer::new(vec![
            policy(
                "allow-shop",
                PolicyAction::Allow,
                vec![PolicyRule { namespaces: vec!["shop".into()], ..Default::default() }],
            ),
            policy(
                "deny-admin",
                PolicyAction::Deny,
                vec![PolicyRule { paths: vec!["/admin/*".into()], ..Default::default() }],
            ),
        ]);
        let p = peer(Some(&web), "10.0.0.1", 80);
        assert!(authz.check_request(&p, &request("GET", "/shop", &[])).is_ok());
        let denied = authz.check_request(&p, &request("GET", "/admin/users", &[])).unwrap_err();
        assert_eq!(denied, Denied { policy: "deny-admin".into(), reason: "matched DENY rule 0".into() });
        assert_eq!(denied.to_string(), "denied by policy \"deny-admin\": matched DENY rule 0");
    }

    #[test]
    fn deny_policies_alone_allow_what_they_do_not_match() {
        let authz = Authorizer::new(vec![policy(
            "deny-net",
            PolicyAction::Deny,
            vec![PolicyRule { source_prefixes: vec!["192.0.2.0/24".parse().unwrap()], ..Default::default() }],
        )]);
        assert!(authz.check_connection(&peer(None, "192.0.2.7", 80)).is_err());
        assert!(authz.check_connection(&peer(None, "198.51.100.7", 80)).is_ok());
    }

    #[test]
    fn l4_decisions_ignore_allow_rules_with_l7_fields() {
        let authz = allow(PolicyRule { ports: vec![80], methods: vec!["GET".into()], ..Default::default() });
        let p = peer(None, "10.0.0.1", 80);
        assert!(authz.check_connection(&p).is_err(), "an ALLOW rule with L7 fields never matches TCP");
        assert!(authz.check_request(&p, &request("GET", "/", &[])).is_ok());
    }

    #[test]
    fn l4_decisions_apply_deny_rules_with_l7_fields_on_their_l4_fields() {
        let authz = Authorizer::new(vec![policy(
            "deny-post",
            PolicyAction::Deny,
            vec![PolicyRule {
                ports: vec![80],
                methods: vec!["POST".into()],
                headers: vec![header("x-danger", StringMatch::Present, false)],
                ..Default::default()
            }],
        )]);
        assert!(authz.check_connection(&peer(None, "10.0.0.1", 80)).is_err(), "conservative on TCP");
        assert!(authz.check_connection(&peer(None, "10.0.0.1", 81)).is_ok(), "L4 fields still apply");
        // Over HTTP the full rule decides.
        let p = peer(None, "10.0.0.1", 80);
        assert!(authz.check_request(&p, &request("GET", "/", &[("x-danger", "1")])).is_ok());
        assert!(authz.check_request(&p, &request("POST", "/", &[])).is_ok());
        assert!(authz.check_request(&p, &request("POST", "/", &[("x-danger", "1")])).is_err());
    }

    #[test]
    fn compile_names_the_offending_field() {
        let compile = |rule: PolicyRule| {
            Policy::compile("p", &PolicySpec { action: PolicyAction::Allow, rules: vec![PolicyRule::default(), rule] })
        };
        let err = compile(PolicyRule {
            headers: vec![header("x-a", StringMatch::Regex("(".into()), false)],
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(err.field, "policy.rules[1].headers[0].value");
        let err = compile(PolicyRule { namespaces: vec!["a*b".into()], ..Default::default() }).unwrap_err();
        assert_eq!(err.field, "policy.rules[1].namespaces[0]");
        let err = compile(PolicyRule { paths: vec!["/a*b".into()], ..Default::default() }).unwrap_err();
        assert_eq!(err.field, "policy.rules[1].paths[0]");
        let err = compile(PolicyRule { principals: vec!["".into()], ..Default::default() }).unwrap_err();
        assert_eq!(err.field, "policy.rules[1].principals[0]");
        let ok = compile(PolicyRule::default()).unwrap();
        assert_eq!((ok.id(), ok.action()), ("p", PolicyAction::Allow));
    }

    #[test]
    fn patterns_parse_every_shape() {
        assert_eq!(Pattern::parse("f", "*").unwrap(), Pattern::Any);
        assert_eq!(Pattern::parse("f", "a").unwrap(), Pattern::Exact("a".into()));
        assert_eq!(Pattern::parse("f", "a*").unwrap(), Pattern::Prefix("a".into()));
        assert_eq!(Pattern::parse("f", "*a").unwrap(), Pattern::Suffix("a".into()));
        for bad in ["", "**", "a*b", "*a*"] {
            assert!(Pattern::parse("f", bad).is_err(), "{bad}");
        }
    }
}
