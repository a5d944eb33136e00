//! HTTP/1.1 Upgrade (WebSocket and friends): the request goes to an endpoint on a dedicated connection; on `101`
//! both sides are upgraded and bytes are copied both ways until either side closes. The downstream transport
//! comes from the client's connection once the `101` has been written to it (see [`super::h1`]).

use std::sync::{Arc, PoisonError};

use http::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;

use http_body_util::BodyExt;

use super::HttpConn;
use crate::Body;
use crate::cluster::{Cluster, LbContext};

/// Sends an upgrade request on a fresh connection to one of `cluster`'s endpoints. Returns the upstream response
/// to relay and, on `101`, spawns the tunnel between the client's connection (handed over through `client`) and
/// the upgraded upstream connection.
pub(super) async fn forward(
    client: &HttpConn,
    cluster: &Arc<Cluster>,
    lb: &LbContext<'_>,
    req: Request<Body>,
) -> Result<Response<Body>, (StatusCode, &'static str, String, &'static str)> {
    let stream = cluster
        .connect(lb)
        .await
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, reason(&e), e.to_string(), e.response_flag()))?;
    let endpoint = stream.endpoint();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, "upstream_reset", e.to_string(), "UR"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, %endpoint, "upgrade connection ended with an error");
        }
    });
    let mut resp = sender
        .send_request(req)
        .await
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, "upstream_reset", e.to_string(), "UR"))?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream = hyper::upgrade::on(&mut resp);
        let (handover, downstream) = oneshot::channel();
        *client.upgrade.lock().unwrap_or_else(PoisonError::into_inner) = Some(handover);
        tokio::spawn(async move {
            let downstream =
                async { downstream.await.map_err(|_| "the client connection ended before the 101 was sent") };
            let upstream = async { upstream.await.map_err(|_| "the upstream connection did not upgrade") };
            match tokio::try_join!(downstream, upstream) {
                Ok((mut down, up)) => {
                    let mut up = TokioIo::new(up);
                    match tokio::io::copy_bidirectional(&mut down, &mut up).await {
                        Ok((to_up, to_down)) => {
                            tracing::debug!(to_up, to_down, %endpoint, "upgraded connection closed")
                        }
                        Err(e) => tracing::debug!(error = %e, %endpoint, "upgraded connection failed"),
                    }
                }
                Err(e) => tracing::debug!(error = %e, %endpoint, "upgrade did not complete"),
            }
        });
    }
    let (parts, body) = resp.into_parts();
    Ok(Response::from_parts(parts, body.map_err(crate::BoxError::from).boxed_unsync()))
}

fn reason(e: &crate::cluster::UpstreamError) -> &'static str {
    super::request::upstream_reason(e)
}
