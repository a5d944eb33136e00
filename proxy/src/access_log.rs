//! Access log: one JSON line per HTTP request and per TCP connection, emitted as a `tracing` event with target
//! `dpu_proxy::access` so the agent's subscriber decides where it goes (and whether it is on at all).

use std::net::SocketAddr;
use std::time::SystemTime;

use serde::Serialize;

/// Target of access log events.
pub const TARGET: &str = "dpu_proxy::access";

/// One access log entry. Fields that do not apply (no upstream, no route) are empty strings.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Entry {
    /// RFC 3339 UTC, millisecond precision.
    pub start_time: String,
    /// `HTTP/1.1`, `HTTP/2`, `TCP`.
    pub protocol: &'static str,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub response_flags: String,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration_ms: u64,
    pub upstream_endpoint: String,
    pub cluster: String,
    pub route: String,
    pub listener: String,
    pub downstream_remote: String,
    pub downstream_local: String,
    pub source_workload: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_principal: String,
    pub request_id: String,
}

impl Entry {
    pub fn new(protocol: &'static str, start: SystemTime, remote: SocketAddr, local: SocketAddr) -> Entry {
        Entry {
            start_time: rfc3339(start),
            protocol,
            downstream_remote: remote.to_string(),
            downstream_local: local.to_string(),
            ..Entry::default()
        }
    }

    /// Whether access log lines are written at all (the subscriber's filter enables the target).
    pub fn enabled() -> bool {
        tracing::enabled!(target: TARGET, tracing::Level::INFO)
    }

    /// Writes the entry (encoded only when the access log is on).
    pub fn emit(&self) {
        if !Self::enabled() {
            return;
        }
        match serde_json::to_string(self) {
            Ok(line) => tracing::info!(target: TARGET, "{line}"),
            Err(e) => tracing::warn!(error = %e, "access log entry could not be encoded"),
        }
    }
}

/// `SystemTime` → `2026-01-02T03:04:05.678Z` (civil-from-days, proleptic Gregorian).
pub fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let millis = since.subsec_millis();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{millis:03}Z")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_rfc3339() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00.000Z");
    }
}
