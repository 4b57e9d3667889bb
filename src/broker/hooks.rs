//! The embedded broker's rmqtt hooks: authentication, the publish and
//! subscribe ACLs, per-user queue sizes, an in-memory retained-message store,
//! and a warning for every message rmqtt drops. Owns only the translation
//! between rmqtt's hook types and [`Policy`] and the log lines for refusals;
//! the decisions are in `policy.rs`. It must not block (rmqtt calls these on
//! its connection tasks) nor keep its own copy of the credentials.
//!
//! Paths below are relative to `rmqtt-0.24.0/` in the cargo registry.

use std::num::{NonZeroU16, NonZeroU32};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rmqtt::codec::types::Publish as CodecPublish;
use rmqtt::codec::v5::SubscribeAckReason;
use rmqtt::fitter::{DefaultFitterManager, Fitter, FitterManager};
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType};
use rmqtt::retain::{DefaultRetainStorage, RetainStorage};
use rmqtt::session::Session;
use rmqtt::types::{
    AuthResult, ConnectInfo, Disconnect, FitterType, Id, LastWill, ListenerConfig, PublishAclResult, Retain,
    SubscribeAclResult, TopicFilter, TopicName,
};

use super::policy::{Connect, Policy, Refusal, Role};

/// The credentials, swapped whole on reload.
pub type SharedPolicy = Arc<RwLock<Arc<Policy>>>;

fn current(policy: &SharedPolicy) -> Arc<Policy> {
    // A poisoned lock only means a panic while swapping an `Arc`; the value
    // inside is whole either way.
    match policy.read() {
        Ok(p) => Arc::clone(&p),
        Err(poisoned) => Arc::clone(&poisoned.into_inner()),
    }
}

fn role_of(policy: &Policy, session: &Session) -> Option<Role> {
    let user = session.id.username.as_deref()?;
    Some(if user == policy.hub_user() { Role::Hub } else { Role::Device(user.to_string()) })
}

/// Answers ClientAuthenticate, ClientSubscribeCheckAcl,
/// MessagePublishCheckAcl and MessageDropped.
#[derive(Clone)]
pub struct Hooks {
    pub policy: SharedPolicy,
    pub dropped: Arc<AtomicU64>,
}

#[async_trait::async_trait]
impl Handler for Hooks {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::ClientAuthenticate(info) => (false, Some(HookResult::AuthResult(self.authenticate(info)))),
            Parameter::ClientSubscribeCheckAcl(session, sub) => {
                let policy = current(&self.policy);
                let shared = sub.opts.shared_group().is_some() || sub.topic_filter.starts_with("$share/");
                let allowed = role_of(&policy, session)
                    .is_some_and(|role| policy.may_subscribe(&role, &sub.topic_filter, shared));
                if allowed {
                    (true, Some(HookResult::SubscribeAclResult(SubscribeAclResult::new_success(sub.opts.qos(), None))))
                } else {
                    tracing::warn!(
                        client = %session.id.client_id.escape_debug(),
                        filter = %sub.topic_filter.escape_debug(),
                        "mqtt subscribe refused: not this client's topics"
                    );
                    let refused = SubscribeAclResult::new_failure(SubscribeAckReason::NotAuthorized);
                    (false, Some(HookResult::SubscribeAclResult(refused)))
                }
            }
            Parameter::MessagePublishCheckAcl(session, publish) => {
                let policy = current(&self.policy);
                if role_of(&policy, session).is_some_and(|role| policy.may_publish(&role, &publish.topic)) {
                    // Proceed: a later handler (e.g. a commit before PUBACK)
                    // may still refuse.
                    (true, acc.or(Some(HookResult::PublishAclResult(PublishAclResult::allow()))))
                } else {
                    tracing::warn!(
                        client = %session.id.client_id.escape_debug(),
                        topic = %publish.topic.escape_debug(),
                        "mqtt publish refused: not this client's topic; disconnecting it"
                    );
                    // MQTT 3.1.1 has no negative PUBACK: disconnect, so the
                    // publisher keeps the message instead of taking a PUBACK
                    // for one that went nowhere.
                    let refused = PublishAclResult::rejected(true, Some("not your topic".into()));
                    (false, Some(HookResult::PublishAclResult(refused)))
                }
            }
            Parameter::MessageDropped(to, _from, publish, reason) => {
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                // The first few, then one line per thousand.
                if n <= 10 || n.is_multiple_of(1000) {
                    tracing::warn!(
                        to = ?to.as_ref().map(|t| t.client_id.to_string()),
                        topic = %publish.topic.escape_debug(),
                        reason = %reason,
                        dropped_so_far = n,
                        "mqtt message dropped by the embedded broker"
                    );
                }
                (true, acc)
            }
            _ => (true, acc),
        }
    }
}

impl Hooks {
    fn authenticate(&self, info: &ConnectInfo) -> AuthResult {
        let will_topic = info.last_will().map(|w| match w {
            LastWill::V3(w) => w.topic.clone(),
            LastWill::V5(w) => w.topic.clone(),
        });
        let connect = Connect {
            client_id: info.client_id(),
            username: info.username().map(|u| &**u),
            password: info.password().map(|p| &p[..]),
            will_topic: will_topic.as_deref(),
        };
        match current(&self.policy).authenticate(connect) {
            Ok(_) => AuthResult::Allow(false, None),
            Err(refusal) => {
                let id = info.id();
                tracing::warn!(
                    client = %truncated(info.client_id()),
                    user = %info.username().map_or_else(String::new, |u| truncated(u)),
                    from = ?id.remote_addr,
                    "mqtt connect refused: {refusal}"
                );
                match refusal {
                    Refusal::BadCredentials(_) => AuthResult::BadUsernameOrPassword,
                    Refusal::NotAuthorized(_) => AuthResult::NotAuthorized,
                }
            }
        }
    }
}

/// At most 64 characters of a client-chosen string, escaped, for a log line.
fn truncated(s: &str) -> String {
    let mut out: String = s.chars().take(64).collect::<String>().escape_debug().to_string();
    if s.chars().count() > 64 {
        out.push_str(&format!("...({} bytes)", s.len()));
    }
    out
}

/// Queue sizes per user: the hub's session holds what arrives while the
/// collector is busy or reconnecting, a device's only its commands.
pub struct Fitters {
    pub policy: SharedPolicy,
    pub hub_mqueue: usize,
}

impl FitterManager for Fitters {
    fn create(&self, conn_info: Arc<ConnectInfo>, id: Id, cfg: ListenerConfig) -> FitterType {
        let is_hub = id.username.as_deref() == Some(current(&self.policy).hub_user());
        let inner = DefaultFitterManager.create(conn_info, id, cfg);
        if is_hub { Arc::new(HubFitter { inner, mqueue: self.hub_mqueue }) } else { inner }
    }
}

/// rmqtt's default fitter (`src/fitter.rs`) with a bigger queue.
struct HubFitter {
    inner: FitterType,
    mqueue: usize,
}

impl Fitter for HubFitter {
    fn keep_alive(&self, keep_alive: &mut u16) -> rmqtt::Result<u16> {
        self.inner.keep_alive(keep_alive)
    }
    fn max_mqueue_len(&self) -> usize {
        self.mqueue
    }
    fn mqueue_rate_limit(&self) -> (NonZeroU32, Duration) {
        self.inner.mqueue_rate_limit()
    }
    fn max_inflight(&self) -> NonZeroU16 {
        self.inner.max_inflight()
    }
    fn session_expiry_interval(&self, d: Option<&Disconnect>) -> Duration {
        self.inner.session_expiry_interval(d)
    }
    fn message_expiry_interval(&self, publish: &CodecPublish) -> Duration {
        self.inner.message_expiry_interval(publish)
    }
    fn max_client_topic_aliases(&self) -> u16 {
        self.inner.max_client_topic_aliases()
    }
    fn max_server_topic_aliases(&self) -> u16 {
        self.inner.max_server_topic_aliases()
    }
}

/// Retained messages in memory. rmqtt 0.24's default store only logs "use
/// the rmqtt-retainer plugin" and keeps nothing (`src/retain.rs:304-320`);
/// its tree-backed helpers do the work here.
pub struct Retained(pub DefaultRetainStorage);

#[async_trait::async_trait]
impl RetainStorage for Retained {
    fn enable(&self) -> bool {
        true
    }

    async fn set(&self, topic: &TopicName, retain: Retain, expiry: Option<Duration>) -> rmqtt::Result<()> {
        self.0.set_with_timeout(topic, retain, expiry).await
    }

    async fn get(&self, filter: &TopicFilter) -> rmqtt::Result<Vec<(TopicName, Retain)>> {
        self.0.get_message(filter).await
    }

    async fn count(&self) -> isize {
        isize::try_from(self.0.messages.read().await.values_size()).unwrap_or(isize::MAX)
    }

    async fn max(&self) -> isize {
        self.count().await
    }
}
