//! `GET /api/stream`: the live feed of server-sent events. Each
//! [`LiveEvent`] becomes one event whose `data:` line is its JSON
//! (`{"type":"message"|"status"|"command",...}`), with a keep-alive comment
//! every [`KEEP_ALIVE`] so proxies and phones keep the connection open.
//!
//! A client that falls more than the channel's capacity behind cannot be
//! given what it missed; it gets `{"type":"reload","missed":N}` instead, and
//! the dashboard re-reads everything through the REST API. Nothing is lost
//! silently. The stream ends when the hub shuts down.

use std::convert::Infallible;
use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use tokio::sync::{broadcast, watch};

use super::{AppState, StreamStop};
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
) -> impl Stream<Item = Result<Event, Infallible>> {
    futures_util::stream::unfold(Feed { rx, stop, first: true }, |mut feed| async move {
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
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    // Subscribed before the answer is sent, so nothing stored after the
    // request arrived is missed.
    let rx = st.live.subscribe();
    Sse::new(feed(rx, stop.map(|Extension(StreamStop(s))| s))).keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}
