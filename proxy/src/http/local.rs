//! Replies the proxy makes itself: errors (with `x-dpu-proxy-error`), direct responses and redirects. gRPC
//! requests get trailers-only responses (HTTP 200 with `grpc-status` / `grpc-message` in the headers).

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};

use crate::Body;

/// Header naming why the proxy answered instead of the upstream.
pub const ERROR_HEADER: &str = "x-dpu-proxy-error";

/// gRPC status codes the proxy produces.
pub mod grpc {
    pub const PERMISSION_DENIED: u32 = 7;
    pub const DEADLINE_EXCEEDED: u32 = 4;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const UNIMPLEMENTED: u32 = 12;
    pub const INTERNAL: u32 = 13;
    pub const UNAVAILABLE: u32 = 14;
}

/// `content-type: application/grpc*`.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// The gRPC status matching an HTTP status, for a local reply to a gRPC request.
pub fn grpc_status_for(status: StatusCode) -> u32 {
    match status.as_u16() {
        403 => grpc::PERMISSION_DENIED,
        404 => grpc::UNIMPLEMENTED,
        429 => grpc::RESOURCE_EXHAUSTED,
        504 => grpc::DEADLINE_EXCEEDED,
        502 | 503 => grpc::UNAVAILABLE,
        _ => grpc::INTERNAL,
    }
}

pub fn empty() -> Body {
    Empty::<Bytes>::new().map_err(|never| match never {}).boxed_unsync()
}

pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into()).map_err(|never| match never {}).boxed_unsync()
}

/// An error reply: plain text with `x-dpu-proxy-error: reason`, or trailers-only gRPC.
pub fn error(grpc_request: bool, status: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let mut resp = if grpc_request {
        grpc_trailers_only(grpc_status_for(status), message)
    } else {
        let mut r = Response::new(full(format!("{message}\n")));
        *r.status_mut() = status;
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        r
    };
    if let Ok(v) = HeaderValue::from_str(reason) {
        resp.headers_mut().insert(ERROR_HEADER, v);
    }
    resp
}

/// HTTP 200, `content-type: application/grpc`, status and message in the headers, no body.
pub fn grpc_trailers_only(code: u32, message: &str) -> Response<Body> {
    let mut r = Response::new(empty());
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(code));
    if let Ok(v) = HeaderValue::from_str(&percent_encode(message)) {
        h.insert("grpc-message", v);
    }
    r
}

/// gRPC `grpc-message` encoding: bytes outside printable ASCII, and `%`, as `%XX`.
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_errors_are_trailers_only() {
        let r = error(true, StatusCode::SERVICE_UNAVAILABLE, "no_healthy_endpoint", "no healthy endpoint, 100%");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()["grpc-message"], "no healthy endpoint, 100%25");
        assert_eq!(r.headers()[ERROR_HEADER], "no_healthy_endpoint");
        let r = error(false, StatusCode::GATEWAY_TIMEOUT, "upstream_timeout", "timed out");
        assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(grpc_status_for(StatusCode::GATEWAY_TIMEOUT), grpc::DEADLINE_EXCEEDED);
    }
}
