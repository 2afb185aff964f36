//! Bodies on their way: a client's request body under the size limit and
//! the idle timeout, and response bodies that hold a backend's in-flight
//! count or count bytes out.

use super::*;

/// Keep `guard` (an outstanding-request count) until the body is done.
pub(super) fn hold(body: Body, guard: InFlight) -> Body {
    body.map_frame(move |f| {
        let _held = &guard;
        f
    })
    .boxed_unsync()
}

pub(super) fn count_bytes(body: Body, metrics: Arc<HostMetrics>) -> Body {
    use hyper::body::Body as _;
    if let Some(n) = body.size_hint().exact() {
        // A whole body (cache hits, pages): count it now, no wrapper.
        metrics.bytes_out.fetch_add(n, Ordering::Relaxed);
        return body;
    }
    body.map_frame(move |f| {
        if let Some(d) = f.data_ref() {
            metrics
                .bytes_out
                .fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        f
    })
    .boxed_unsync()
}

/// A client's request body with the size limit and an idle timeout; the
/// one that trips ends the stream with a [`ClientBodyError`], which the
/// upstream error carries back as its source (413 or 408, not 502).
pub(super) struct ClientBody {
    inner: Incoming,
    limit: u64,
    left: u64,
    idle: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl ClientBody {
    pub(super) fn new(inner: Incoming, limit: u64, idle: Duration) -> ClientBody {
        ClientBody {
            inner,
            limit,
            left: limit,
            idle,
            sleep: Box::pin(tokio::time::sleep(idle)),
        }
    }
}

impl hyper::body::Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    if d.len() as u64 > this.left {
                        let e = ClientBodyError::TooLarge(this.limit);
                        return Poll::Ready(Some(Err(Box::new(e))));
                    }
                    this.left -= d.len() as u64;
                }
                let deadline = tokio::time::Instant::now() + this.idle;
                this.sleep.as_mut().reset(deadline);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if std::future::Future::poll(this.sleep.as_mut(), cx).is_ready() {
                    let e = ClientBodyError::Stalled(this.idle);
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
