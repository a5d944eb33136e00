//! Outlier detection (passive health): consecutive failures per endpoint eject it for
//! `base_ejection_ms × multiplier`, capped at [`MAX_EJECTION`]; the multiplier counts recent ejections (see
//! [`OutlierState`]). At most `max_ejection_percent` of a cluster's endpoints are ejected at once.
//!
//! Like Envoy without `split_external_local_origin_errors`, locally originated failures (connect failures,
//! timeouts, resets) count as both a 5xx and a gateway error. Un-ejection needs no timer: an endpoint whose
//! ejection instant has passed is simply eligible again at the next pick.

use std::time::Duration;

use crate::model::OutlierDetection;

/// The longest single ejection.
pub(crate) const MAX_EJECTION: Duration = Duration::from_secs(300);

/// What one request (or connection attempt) on an endpoint came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// An L4 connection was established.
    Success,
    /// A response with this status.
    Status(u16),
    /// Connect failure, connect timeout, TLS failure, or reset before the response headers.
    LocalFailure,
}

impl Outcome {
    pub(crate) fn is_failure(self) -> bool {
        match self {
            Outcome::Success => false,
            Outcome::Status(status) => status >= 500,
            Outcome::LocalFailure => true,
        }
    }
}

/// Per-endpoint consecutive-failure counters and ejection multiplier.
///
/// The multiplier grows by one per ejection and, as in Envoy, shrinks again while the endpoint behaves: by one for
/// every `base_ejection_ms` spent in rotation since its last ejection ended, so an endpoint that failed once long
/// ago is not punished like one that keeps flapping.
#[derive(Debug, Default)]
pub(crate) struct OutlierState {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    multiplier: u32,
    /// When the last ejection ended (or ends), on the cluster clock in milliseconds.
    last_ejection_end_ms: u64,
}

impl OutlierState {
    /// Records an outcome; returns whether a consecutive-failure threshold is now reached.
    pub(crate) fn record(&mut self, outcome: Outcome, od: &OutlierDetection) -> bool {
        let (is_5xx, is_gateway) = match outcome {
            Outcome::Success => (false, false),
            Outcome::Status(status) => (status >= 500, matches!(status, 502..=504)),
            Outcome::LocalFailure => (true, true),
        };
        self.consecutive_5xx = if is_5xx { self.consecutive_5xx.saturating_add(1) } else { 0 };
        self.consecutive_gateway = if is_gateway { self.consecutive_gateway.saturating_add(1) } else { 0 };
        (od.consecutive_5xx != 0 && self.consecutive_5xx >= od.consecutive_5xx)
            || (od.consecutive_gateway_errors != 0 && self.consecutive_gateway >= od.consecutive_gateway_errors)
    }

    /// Ejects at `now_ms`: resets the counters and returns how long the ejection lasts.
    pub(crate) fn eject(&mut self, od: &OutlierDetection, now_ms: u64) -> Duration {
        self.consecutive_5xx = 0;
        self.consecutive_gateway = 0;
        let base_ms = u64::from(od.base_ejection_ms.max(1));
        let healthy_steps = now_ms.saturating_sub(self.last_ejection_end_ms) / base_ms;
        self.multiplier = self.multiplier.saturating_sub(u32::try_from(healthy_steps).unwrap_or(u32::MAX));
        self.multiplier = self.multiplier.saturating_add(1);
        let base = Duration::from_millis(base_ms);
        let duration = base.saturating_mul(self.multiplier).min(MAX_EJECTION.max(base));
        self.last_ejection_end_ms = now_ms.saturating_add(duration.as_millis() as u64);
        duration
    }
}

/// How many of `total` endpoints may be ejected at once: `max_ejection_percent` of them, rounded down, but at least
/// one when the percentage is positive and there are two endpoints or more.
pub(crate) fn max_ejected(total: usize, percent: u32) -> usize {
    if percent == 0 || total == 0 {
        return 0;
    }
    let share = total * percent.min(100) as usize / 100;
    if share == 0 && total >= 2 { 1 } else { share }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn od(consecutive_5xx: u32, consecutive_gateway_errors: u32) -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx,
            consecutive_gateway_errors,
            base_ejection_ms: 1000,
            max_ejection_percent: 50,
        }
    }

    #[test]
    fn consecutive_5xx_trips_and_success_resets() {
        let od = od(3, 0);
        let mut s = OutlierState::default();
        assert!(!s.record(Outcome::Status(500), &od));
        assert!(!s.record(Outcome::Status(503), &od));
        assert!(!s.record(Outcome::Status(200), &od));
        assert!(!s.record(Outcome::Status(500), &od));
        assert!(!s.record(Outcome::Status(501), &od));
        assert!(s.record(Outcome::LocalFailure, &od));
        // 4xx is a success for outlier purposes.
        let mut s = OutlierState::default();
        for _ in 0..10 {
            assert!(!s.record(Outcome::Status(404), &od));
        }
    }

    #[test]
    fn gateway_errors_count_502_to_504_and_local_failures() {
        let od = od(0, 2);
        let mut s = OutlierState::default();
        assert!(!s.record(Outcome::Status(500), &od));
        assert!(!s.record(Outcome::Status(502), &od));
        assert!(!s.record(Outcome::Status(500), &od), "500 is not a gateway error and resets the streak");
        assert!(!s.record(Outcome::LocalFailure, &od));
        assert!(s.record(Outcome::Status(504), &od));
    }

    #[test]
    fn ejection_time_grows_is_capped_and_decays() {
        let od = od(1, 0);
        let mut s = OutlierState::default();
        // Ejected again as soon as each ejection ends: 1 s, 2 s, 3 s, ...
        let mut now = 1_000_000;
        for expected in 1..=3 {
            let d = s.eject(&od, now);
            assert_eq!(d, Duration::from_secs(expected));
            now += d.as_millis() as u64;
        }
        for _ in 0..1000 {
            now += s.eject(&od, now).as_millis() as u64;
        }
        assert_eq!(s.eject(&od, now), MAX_EJECTION);
        // The counters restart after an ejection.
        assert!(s.record(Outcome::Status(500), &od));

        // Well-behaved for 2.5 base periods after an ejection that ended: the multiplier drops by two.
        let mut s = OutlierState::default();
        let mut now = 0;
        for _ in 0..3 {
            now += s.eject(&od, now).as_millis() as u64;
        }
        assert_eq!(s.eject(&od, now + 2_500), Duration::from_secs(2));
        // A long quiet time resets it entirely.
        assert_eq!(s.eject(&od, now + 10_000_000), Duration::from_secs(1));
    }

    #[test]
    fn ejection_share() {
        assert_eq!(max_ejected(10, 10), 1);
        assert_eq!(max_ejected(10, 50), 5);
        assert_eq!(max_ejected(3, 10), 1, "at least one of two or more");
        assert_eq!(max_ejected(2, 1), 1);
        assert_eq!(max_ejected(1, 50), 0);
        assert_eq!(max_ejected(1, 100), 1);
        assert_eq!(max_ejected(10, 0), 0);
        assert_eq!(max_ejected(0, 100), 0);
    }
}
