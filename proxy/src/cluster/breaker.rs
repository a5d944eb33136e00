//! Circuit breaking and the retry budget: per-cluster gauges checked against the limits of
//! [`CircuitBreaker`](crate::model::CircuitBreaker), with RAII slots so a gauge can never leak.
//!
//! A request that would exceed a limit fails at once with [`UpstreamError::Overflow`] — nothing queues beyond the
//! configured bounds.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::model::{CircuitBreaker, RetryPolicy};

use super::UpstreamError;

/// The gauges a circuit breaker limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resource {
    /// Open upstream connections (pooled or handed out by `connect`).
    Connections,
    /// Requests waiting for a connection to be established.
    Pending,
    /// Requests sent and not yet finished (until the response body ends or is dropped).
    Requests,
}

impl Resource {
    fn limit_name(self) -> &'static str {
        match self {
            Resource::Connections => "max_connections",
            Resource::Pending => "max_pending_requests",
            Resource::Requests => "max_requests",
        }
    }
}

/// One cluster's circuit breaker state. Limits are replaced in place when the cluster is updated; gauges carry on.
#[derive(Debug, Default)]
pub(crate) struct Breaker {
    max_connections: AtomicU32,
    max_pending: AtomicU32,
    max_requests: AtomicU32,
    max_retries: AtomicU32,
    connections: AtomicU64,
    pending: AtomicU64,
    requests: AtomicU64,
    active_retries: AtomicU64,
    /// Requests and connections refused by a limit.
    pub(crate) overflows: AtomicU64,
    /// Retries admitted.
    pub(crate) retries: AtomicU64,
    /// Retries refused by the budget or `max_retries`.
    pub(crate) retry_overflows: AtomicU64,
}

impl Breaker {
    pub(crate) fn new(limits: &CircuitBreaker) -> Arc<Breaker> {
        let breaker = Breaker::default();
        breaker.set_limits(limits);
        Arc::new(breaker)
    }

    pub(crate) fn set_limits(&self, limits: &CircuitBreaker) {
        self.max_connections.store(limits.max_connections, Ordering::Relaxed);
        self.max_pending.store(limits.max_pending_requests, Ordering::Relaxed);
        self.max_requests.store(limits.max_requests, Ordering::Relaxed);
        self.max_retries.store(limits.max_retries, Ordering::Relaxed);
    }

    fn gauge(&self, resource: Resource) -> (&AtomicU64, u32) {
        match resource {
            Resource::Connections => (&self.connections, self.max_connections.load(Ordering::Relaxed)),
            Resource::Pending => (&self.pending, self.max_pending.load(Ordering::Relaxed)),
            Resource::Requests => (&self.requests, self.max_requests.load(Ordering::Relaxed)),
        }
    }

    /// Current value of a gauge.
    pub(crate) fn active(&self, resource: Resource) -> u64 {
        self.gauge(resource).0.load(Ordering::Relaxed)
    }

    /// Takes one unit of `resource`, or fails with `Overflow` (counted) when its limit is reached.
    pub(crate) fn acquire(self: &Arc<Self>, resource: Resource) -> Result<Slot, UpstreamError> {
        let (gauge, limit) = self.gauge(resource);
        let before = gauge.fetch_add(1, Ordering::AcqRel);
        if limit != 0 && before >= u64::from(limit) {
            gauge.fetch_sub(1, Ordering::AcqRel);
            self.overflows.fetch_add(1, Ordering::Relaxed);
            return Err(UpstreamError::Overflow { limit: resource.limit_name() });
        }
        Ok(Slot { breaker: Arc::clone(self), resource })
    }

    /// Admits a retry when the active retries stay below both the budget — `budget_percent` of the active requests,
    /// but at least `min_retry_concurrency` — and `max_retries` (when set).
    pub(crate) fn admit_retry(self: &Arc<Self>, policy: &RetryPolicy) -> Option<RetryPermit> {
        let requests = self.requests.load(Ordering::Relaxed);
        let budget = (requests.saturating_mul(u64::from(policy.budget_percent)) / 100)
            .max(u64::from(policy.min_retry_concurrency));
        let max = self.max_retries.load(Ordering::Relaxed);
        let before = self.active_retries.fetch_add(1, Ordering::AcqRel);
        if before >= budget || (max != 0 && before >= u64::from(max)) {
            self.active_retries.fetch_sub(1, Ordering::AcqRel);
            self.retry_overflows.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.retries.fetch_add(1, Ordering::Relaxed);
        Some(RetryPermit { breaker: Arc::clone(self) })
    }
}

/// One unit of a circuit-breaker gauge, given back on drop.
#[derive(Debug)]
pub(crate) struct Slot {
    breaker: Arc<Breaker>,
    resource: Resource,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.breaker.gauge(self.resource).0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An admitted retry; it counts against the retry budget and `max_retries` until dropped.
#[derive(Debug)]
pub struct RetryPermit {
    breaker: Arc<Breaker>,
}

impl Drop for RetryPermit {
    fn drop(&mut self) {
        self.breaker.active_retries.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn policy(budget_percent: u32, min_retry_concurrency: u32) -> RetryPolicy {
        RetryPolicy {
            attempts: 3,
            per_try_timeout_ms: 0,
            retry_on: BTreeSet::new(),
            budget_percent,
            min_retry_concurrency,
        }
    }

    #[test]
    fn limits_overflow_and_slots_give_back() {
        let breaker = Breaker::new(&CircuitBreaker { max_requests: 2, ..Default::default() });
        let a = breaker.acquire(Resource::Requests).unwrap();
        let _b = breaker.acquire(Resource::Requests).unwrap();
        let err = breaker.acquire(Resource::Requests).unwrap_err();
        assert!(matches!(err, UpstreamError::Overflow { limit: "max_requests" }), "{err:?}");
        assert_eq!(breaker.overflows.load(Ordering::Relaxed), 1);
        assert_eq!(breaker.active(Resource::Requests), 2);
        drop(a);
        assert_eq!(breaker.active(Resource::Requests), 1);
        let _c = breaker.acquire(Resource::Requests).unwrap();
        // Zero means unlimited.
        let many: Vec<_> = (0..1000).map(|_| breaker.acquire(Resource::Pending).unwrap()).collect();
        assert_eq!(breaker.active(Resource::Pending), 1000);
        drop(many);
        assert_eq!(breaker.active(Resource::Pending), 0);
    }

    #[test]
    fn limits_change_in_place() {
        let breaker = Breaker::new(&CircuitBreaker { max_connections: 1, ..Default::default() });
        let _a = breaker.acquire(Resource::Connections).unwrap();
        assert!(breaker.acquire(Resource::Connections).is_err());
        breaker.set_limits(&CircuitBreaker { max_connections: 2, ..Default::default() });
        let _b = breaker.acquire(Resource::Connections).unwrap();
        assert!(matches!(
            breaker.acquire(Resource::Connections),
            Err(UpstreamError::Overflow { limit: "max_connections" })
        ));
    }

    #[test]
    fn retry_budget_scales_with_active_requests() {
        let breaker = Breaker::new(&CircuitBreaker::default());
        // Quiet cluster: the minimum concurrency applies.
        let p = policy(20, 2);
        let r1 = breaker.admit_retry(&p).unwrap();
        let _r2 = breaker.admit_retry(&p).unwrap();
        assert!(breaker.admit_retry(&p).is_none());
        assert_eq!(breaker.retry_overflows.load(Ordering::Relaxed), 1);
        drop(r1);
        let _r3 = breaker.admit_retry(&p).unwrap();
        // 50 active requests at 20%: 10 retries may be outstanding.
        let _requests: Vec<_> = (0..50).map(|_| breaker.acquire(Resource::Requests).unwrap()).collect();
        let more: Vec<_> = std::iter::from_fn(|| breaker.admit_retry(&p)).take(100).collect();
        assert_eq!(more.len() + 2, 10);
        assert_eq!(breaker.retries.load(Ordering::Relaxed), 11);
    }

    #[test]
    fn max_retries_caps_the_budget() {
        let breaker = Breaker::new(&CircuitBreaker { max_retries: 1, ..Default::default() });
        let p = policy(100, 10);
        let _r = breaker.admit_retry(&p).unwrap();
        assert!(breaker.admit_retry(&p).is_none());
        // Without a budget nor a minimum, nothing is admitted.
        let strict = Breaker::new(&CircuitBreaker::default());
        assert!(strict.admit_retry(&policy(0, 0)).is_none());
    }
}
