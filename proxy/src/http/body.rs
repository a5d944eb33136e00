//! Per-request bookkeeping: a [`Record`] follows a request from arrival to the end of its response body and, when
//! dropped, writes the access log line and the Istio request metrics.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use crate::access_log::Entry;
use crate::listener::InFlight;
use crate::metrics::{Metrics, RequestLabels};
use crate::{Body, BoxError};

/// One request's log entry and metric labels, emitted on drop.
#[derive(Debug)]
pub struct Record {
    pub metrics: Arc<Metrics>,
    /// Held until the response ends.
    pub _in_flight: InFlight,
    pub started: Instant,
    pub entry: Entry,
    pub labels: RequestLabels,
    /// Request body bytes read from the client.
    pub received: Arc<AtomicU64>,
}

impl Record {
    pub fn set_status(&mut self, status: u16) {
        self.entry.status = status;
        self.labels.response_code = status;
    }

    pub fn set_flag(&mut self, flag: &str) {
        self.entry.response_flags = flag.to_string();
        self.labels.response_flags = flag.to_string();
    }

    pub fn set_grpc_status(&mut self, status: &str) {
        self.labels.grpc_response_status = status.to_string();
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        self.entry.duration_ms = elapsed.as_millis() as u64;
        self.entry.bytes_received = self.received.load(Ordering::Relaxed);
        if self.entry.response_flags.is_empty() {
            self.set_flag("-");
        }
        self.metrics.requests.get_or_create(&self.labels).inc();
        self.metrics.request_duration.get_or_create(&self.labels).observe(elapsed.as_secs_f64() * 1000.0);
        self.entry.emit();
    }
}

pin_project_lite::pin_project! {
    /// A response body that counts bytes and picks `grpc-status` out of trailers; the [`Record`] it carries is
    /// emitted when the body ends or is dropped (client gone).
    pub struct Recorded {
        #[pin]
        inner: Body,
        record: Option<Record>,
    }
}

impl Recorded {
    pub fn new(inner: Body, record: Record) -> Recorded {
        Recorded { inner, record: Some(record) }
    }
}

impl http_body::Body for Recorded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(record) = this.record.as_mut() {
                    if let Some(data) = f.data_ref() {
                        record.entry.bytes_sent += data.len() as u64;
                    } else if let Some(status) = f.trailers_ref().and_then(|t| t.get("grpc-status")) {
                        record.set_grpc_status(status.to_str().unwrap_or("unknown"));
                    }
                }
            }
            Some(Err(e)) => {
                if let Some(record) = this.record.as_mut() {
                    tracing::debug!(error = %e, "upstream response body failed");
                    record.set_flag("UPE");
                }
                this.record.take();
            }
            None => {
                this.record.take();
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// A request body that counts the bytes read from the client.
    pub struct Counted<B> {
        #[pin]
        inner: B,
        count: Arc<AtomicU64>,
    }
}

impl<B> Counted<B> {
    pub fn new(inner: B, count: Arc<AtomicU64>) -> Counted<B> {
        Counted { inner, count }
    }
}

impl<B: http_body::Body<Data = Bytes>> http_body::Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(Ok(Some(data))) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref)) {
            this.count.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What a [`Teed`] body kept of the request for a retry.
#[derive(Debug, Default)]
pub struct ReplayCopy {
    pub data: bytes::BytesMut,
    pub trailers: Option<http::HeaderMap>,
    /// The client's body ended.
    pub complete: bool,
    /// More than the limit went by; nothing is kept.
    pub overflow: bool,
}

pin_project_lite::pin_project! {
    /// A request body streamed to the first try while a copy of up to `limit` bytes is kept, so the request can be
    /// replayed once the client's body has ended within the limit.
    pub struct Teed<B> {
        #[pin]
        inner: B,
        copy: Arc<std::sync::Mutex<ReplayCopy>>,
        limit: usize,
    }
}

impl<B> Teed<B> {
    pub fn new(inner: B, copy: Arc<std::sync::Mutex<ReplayCopy>>, limit: usize) -> Teed<B> {
        Teed { inner, copy, limit }
    }
}

impl<B: http_body::Body<Data = Bytes>> http_body::Body for Teed<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        let mut copy = this.copy.lock().unwrap_or_else(|e| e.into_inner());
        match &frame {
            Some(Ok(f)) => {
                if let Some(data) = f.data_ref() {
                    if !copy.overflow && copy.data.len() + data.len() <= *this.limit {
                        copy.data.extend_from_slice(data);
                    } else {
                        copy.overflow = true;
                        copy.data = bytes::BytesMut::new();
                    }
                } else if let Some(t) = f.trailers_ref() {
                    copy.trailers = Some(t.clone());
                }
                if this.inner.is_end_stream() {
                    copy.complete = true;
                }
            }
            // A failed client body cannot be replayed.
            Some(Err(_)) => copy.overflow = true,
            None => copy.complete = true,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.copy.lock().unwrap_or_else(|e| e.into_inner()).complete = true;
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
