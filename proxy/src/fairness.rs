//! Per-workload admission: concurrent connections, new connections per second and requests per second. State is
//! kept per workload id and survives snapshots, so re-applying configuration neither resets buckets nor forgets
//! open connections; the limits themselves are read from the current spec on every decision.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::model::WorkloadLimits;

/// Why a workload's connection or request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    MaxConnections,
    ConnectionRate,
    RequestRate,
}

impl Rejection {
    /// Metric label and `x-dpu-proxy-error` value.
    pub fn reason(self) -> &'static str {
        match self {
            Rejection::MaxConnections => "max_connections",
            Rejection::ConnectionRate => "connection_rate",
            Rejection::RequestRate => "request_rate",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

/// Admission state of every workload seen so far, keyed by `source/id`.
#[derive(Debug, Default)]
pub struct Fairness {
    workloads: Mutex<HashMap<String, Arc<WorkloadGate>>>,
}

#[derive(Debug, Default)]
struct WorkloadGate {
    active: AtomicU32,
    connections: Mutex<TokenBucket>,
    requests: Mutex<TokenBucket>,
}

/// Holds one of a workload's concurrent connection slots until dropped.
#[derive(Debug)]
pub struct ConnectionPermit {
    gate: Arc<WorkloadGate>,
}

#[derive(Debug, Default)]
struct TokenBucket {
    tokens: f64,
    last: Option<Instant>,
}

impl Fairness {
    /// Admits a new connection of `workload` under `limits`.
    pub fn admit_connection(&self, workload: &str, limits: &WorkloadLimits) -> Result<ConnectionPermit, Rejection> {
        let gate = self.gate(workload);
        if limits.max_connections > 0 {
            let admitted = gate
                .active
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limits.max_connections).then_some(n + 1))
                .is_ok();
            if !admitted {
                return Err(Rejection::MaxConnections);
            }
        } else {
            gate.active.fetch_add(1, Ordering::AcqRel);
        }
        let permit = ConnectionPermit { gate: gate.clone() };
        if limits.connections_per_second > 0 && !take(&gate.connections, limits.connections_per_second) {
            return Err(Rejection::ConnectionRate);
        }
        Ok(permit)
    }

    /// Admits one HTTP request of `workload` under `limits`.
    pub fn admit_request(&self, workload: &str, limits: &WorkloadLimits) -> Result<(), Rejection> {
        if limits.requests_per_second == 0 {
            return Ok(());
        }
        let gate = self.gate(workload);
        if take(&gate.requests, limits.requests_per_second) { Ok(()) } else { Err(Rejection::RequestRate) }
    }

    /// Concurrent downstream connections of `workload`.
    pub fn active_connections(&self, workload: &str) -> u32 {
        let map = self.workloads.lock().unwrap_or_else(|e| e.into_inner());
        map.get(workload).map_or(0, |g| g.active.load(Ordering::Acquire))
    }

    /// Forgets workloads that are gone from configuration and have no open connection.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut map = self.workloads.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|id, gate| keep(id) || gate.active.load(Ordering::Acquire) > 0);
    }

    fn gate(&self, workload: &str) -> Arc<WorkloadGate> {
        let mut map = self.workloads.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(workload.to_string()).or_default().clone()
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.gate.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Token bucket refilled at `rate` per second with a burst of one second's worth.
fn take(bucket: &Mutex<TokenBucket>, rate: u32) -> bool {
    let mut b = bucket.lock().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    let capacity = f64::from(rate);
    b.tokens = match b.last {
        None => capacity,
        Some(last) => (b.tokens + now.duration_since(last).as_secs_f64() * capacity).min(capacity),
    };
    b.last = Some(now);
    if b.tokens >= 1.0 {
        b.tokens -= 1.0;
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_connections_are_bounded_and_released() {
        let f = Fairness::default();
        let limits = WorkloadLimits { max_connections: 2, ..Default::default() };
        let a = f.admit_connection("w", &limits).unwrap();
        let _b = f.admit_connection("w", &limits).unwrap();
        assert_eq!(f.admit_connection("w", &limits).unwrap_err(), Rejection::MaxConnections);
        assert!(f.admit_connection("other", &limits).is_ok());
        drop(a);
        assert!(f.admit_connection("w", &limits).is_ok());
        assert_eq!(f.active_connections("w"), 1);
    }

    #[test]
    fn request_rate_has_one_second_burst() {
        let f = Fairness::default();
        let limits = WorkloadLimits { requests_per_second: 5, ..Default::default() };
        let admitted = (0..20).filter(|_| f.admit_request("w", &limits).is_ok()).count();
        assert_eq!(admitted, 5);
        assert!(f.admit_request("other", &limits).is_ok());
    }

    #[test]
    fn connection_rate_refusal_releases_the_slot() {
        let f = Fairness::default();
        let limits = WorkloadLimits { connections_per_second: 1, ..Default::default() };
        let _first = f.admit_connection("w", &limits).unwrap();
        assert_eq!(f.admit_connection("w", &limits).unwrap_err(), Rejection::ConnectionRate);
        assert_eq!(f.active_connections("w"), 1);
    }
}
