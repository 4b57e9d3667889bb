//! `GET /api/stream`: the live feed of server-sent events. Each
//! [`LiveEvent`] becomes one event whose `data:` line is its JSON
//! (`{"type":"message"|"status"|"command",...}`), with a keep-alive comment
//! every [`KEEP_ALIVE`] so proxies and phones keep the connection open.
//!
//! A client that falls more than the channel's capacity behind cannot be
//! given what it missed; it gets `{"type":"reload","missed":N}` instead, and
//! the dashboard re-reads everything through the REST API. Nothing is lost
//! silently. The stream ends when the hub shuts down.
//!
//! At most `Limits::max_streams` streams are open at once (each holds a
//! slot until its connection closes); one more is a 503 JSON error, so
//! thousands of idle dashboards cannot use up the hub's memory.

use std::convert::Infallible;
use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use tokio::sync::{OwnedSemaphorePermit, broadcast, watch};

use super::{ApiError, AppState, StreamStop};
use crate::hub::model::LiveEvent;

/// How often an idle stream sends a comment.
pub(super) const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// How long a browser waits before reconnecting a dropped stream.
const RETRY: Duration = Duration::from_secs(3);

/// The SSE event for a live event, or the reload notice after a lag.
pub(super) fn event_for(next: Result<LiveEvent, u64>) -> Event {
    let json = match next {
        Ok(ev) => serde_json::to_string(&ev),
        Err(missed) => serde_json::to_string(&serde_json::json!({ "type": "reload", "missed": missed })),
    };
    match json {
        Ok(json) => Event::default().data(json),
        // A LiveEvent is plain data, so this is not expected; if it happens
        // the page is told to re-read rather than left with a gap.
        Err(e) => {
            tracing::warn!("live stream: cannot encode an event: {e}");
            Event::default().data(r#"{"type":"reload","missed":1}"#)
        }
    }
}

struct Feed {
    rx: broadcast::Receiver<LiveEvent>,
    stop: Option<watch::Receiver<bool>>,
    first: bool,
    /// The stream's slot, given back when the stream is dropped.
    _slot: OwnedSemaphorePermit,
}

impl Feed {
    /// The next item to send: `Err(missed)` after a lag; `None` when the hub
    /// stops or the channel closes.
    async fn next(&mut self) -> Option<Result<LiveEvent, u64>> {
        let received = match &mut self.stop {
            Some(stop) => tokio::select! {
                r = self.rx.recv() => r,
                // Stop asked, or the server is gone: either way, end.
                _ = stop.wait_for(|stopped| *stopped) => return None,
            },
            None => self.rx.recv().await,
        };
        match received {
            Ok(ev) => Some(Ok(ev)),
            Err(broadcast::error::RecvError::Lagged(missed)) => Some(Err(missed)),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

fn feed(
    rx: broadcast::Receiver<LiveEvent>,
    stop: Option<watch::Receiver<bool>>,
    slot: OwnedSemaphorePermit,
) -> impl Stream<Item = Result<Event, Infallible>> {
    futures_util::stream::unfold(Feed { rx, stop, first: true, _slot: slot }, |mut feed| async move {
        if std::mem::take(&mut feed.first) {
            // Tells the browser how soon to reconnect; carries no data, so
            // the page sees no message.
            return Some((Ok(Event::default().retry(RETRY).comment("fieldlink live")), feed));
        }
        let next = feed.next().await?;
        Some((Ok(event_for(next)), feed))
    })
}

/// `GET /api/stream`
pub(super) async fn stream(
    State(st): State<AppState>,
    stop: Option<Extension<StreamStop>>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let Ok(slot) = st.access.streams.clone().try_acquire_owned() else {
        let max = st.limits.max_streams;
        tracing::warn!("web: {max} live streams open (the cap); refusing one more with 503");
        return Err(ApiError::Busy(format!("too many live streams open ({max}); try again in a while")));
    };
    // Subscribed before the answer is sent, so nothing stored after the
    // request arrived is missed.
    let rx = st.live.subscribe();
    let feed = feed(rx, stop.map(|Extension(StreamStop(s))| s), slot);
    Ok(Sse::new(feed).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}
