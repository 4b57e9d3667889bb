//! The embedded MQTT broker (`[broker] embedded = true`): rmqtt 0.24 run
//! in-process on the hub's tokio runtime, configured in code.
//!
//! This module owns starting rmqtt with fieldlink's limits, its listeners
//! (plain TCP and, when configured, TLS), and reloading the credentials
//! (which closes the connections of removed devices). Who may do what is in
//! [`policy`]; the rmqtt hook glue is in [`hooks`]. It does not own anything
//! MQTT clients do: the hub and the agents talk to it over TCP with rumqttc
//! like to any broker. It must not persist anything.
//!
//! # What it promises (each checked in `tests/broker.rs` against rumqttc and raw sockets)
//!
//! * MQTT 3.1.1 and 5 on a plain TCP listener and, with `tls_listen`, an
//!   `mqtts` listener (rustls, TLS 1.2/1.3, server certificate only).
//! * Nobody without credentials: every CONNECT needs a user name and
//!   password. Devices are the users of `<state_dir>/mosquitto.passwd`
//!   (written by `fieldlink hub device add`), their client id must equal
//!   their user name; the hub's own user has a password of its own (see
//!   `hub::broker_user`). A refusal is a CONNACK "bad user name or password"
//!   or "not authorized" and one warn line naming the reason.
//! * The ACL of [`policy`]: a device publishes only under `P/<id>/`,
//!   subscribes only to `P/<id>/relay/+/set`, `P/<id>/sync` and `P/<id>/ack`;
//!   its will must be on its own topics. A refused SUBSCRIBE gets a failure
//!   return code; a refused PUBLISH closes the connection (MQTT 3.1.1 has no
//!   negative PUBACK, and a PUBACK would make the device drop the message).
//! * [`EmbeddedBroker::reload`] rereads the password file and closes the
//!   connection (and discards the session) of every device whose line was
//!   removed or changed; `fieldlink hub device remove` triggers it with
//!   SIGHUP.
//! * Persistent sessions (`clean_session = false`): subscriptions and QoS 1/2
//!   messages queue while a client is away and are delivered in order when
//!   it returns; QoS 1 and 2; retained messages (in memory); last wills.
//! * Limits that refuse cleanly, all in [`Limits`]: packets over
//!   [`MAX_PACKET_BYTES`] close the connection (payloads up to
//!   [`MAX_PAYLOAD_BYTES`] always fit); at most `max_sessions` sessions
//!   (online or parked; a new one past it gets CONNACK "server
//!   unavailable"); a socket that has not sent its whole CONNECT within
//!   `handshake_timeout` is closed; client ids over 128 bytes are refused.
//!
//! # Queues, expiry and what a restart loses
//!
//! * A device's session queues at most [`Limits::device_queue`] messages, the
//!   hub's [`Limits::hub_queue`]; when full, the oldest QoS 1/2 message (or
//!   the new QoS 0 one) is dropped (`src/session.rs:1306-1313`), counted and
//!   logged at warn. Queued messages expire after
//!   [`Limits::message_expiry`], parked sessions after
//!   [`Limits::session_expiry`] (rmqtt's defaults, 5 min and 2 h, would
//!   silently drop commands to a device that is offline for an afternoon).
//! * Everything is in memory. A hub restart loses every session, queued
//!   message (e.g. commands to offline devices, which have expired at the
//!   hub by then anyway) and retained message; clients re-subscribe and
//!   republish on connect (the agent does both).
//!
//! # rmqtt pitfalls handled here
//!
//! Paths are relative to `rmqtt-0.24.0/` (or `rmqtt-net-0.5.0/`) in the
//! cargo registry.
//!
//! * A connection that never sends a CONNECT was held forever: the first
//!   read (`rmqtt-net` `src/stream.rs` `probe_version`) had no timeout. Our
//!   copy in `vendor/rmqtt-net` bounds it by `handshake_timeout`.
//! * A QoS 1/2 message whose write failed because its subscriber had just
//!   gone was lost: `src/session.rs:1580-1585` (`deliver`) wrote before
//!   caching it in the inflight window and returned on the error. And a
//!   returning client got its unacknowledged messages newest first
//!   (`src/session.rs:1501`, `pop()` off the back). Our copy in
//!   `vendor/rmqtt` caches first and resends oldest first (PATCHED.md).
//! * `allow_anonymous` defaults to true and skips the authenticate hook for
//!   a CONNECT without user name (`src/hook.rs:726-728`): set to false.
//! * A superuser skips the ACL hooks (`src/hook.rs:942-973`): nobody is one;
//!   the hub's user is allowed everything by [`policy`] instead.
//! * A last will is published without the publish ACL: checked at CONNECT.
//! * The busy check refuses CONNECTs when the machine's load is high
//!   (`src/v3.rs:117-121`, `src/node.rs` `sys_is_busy`): disabled.
//! * Without the shared-subscription feature, `$share/...` silently matches
//!   nothing; the ACL refuses it for devices, and the hub config refuses
//!   `shared_group` with the embedded broker.
//! * The default retained-message store keeps nothing (`src/retain.rs:304`):
//!   [`hooks::Retained`] keeps them in memory.
//! * The connection cap of rmqtt-net (`max_connections`) only sizes the
//!   handshake queue (`src/executor.rs:86-93`); sessions are capped with
//!   `mqtt_max_sessions` instead, checked before authentication
//!   (`src/v3.rs:224-230`).
//! * PUBLISH topic names with `+`, `#` or NUL are accepted by rmqtt; the ACL
//!   refuses them.
//! * Retained messages sent on SUBSCRIBE carry the retain flag
//!   (`src/session.rs:2033`); a message forwarded live has it clear
//!   (`src/shared.rs:888-901`, MQTT-3.3.1-9), also when it was published
//!   retained. A retained PUBLISH that reaches the broker after a SUBSCRIBE
//!   is therefore delivered live, flag clear: wait for its PUBACK first
//!   (`tests/broker.rs` does).

pub mod hooks;
pub mod policy;

use std::io;
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rmqtt::context::ServerContext;
use rmqtt::hook::Type;
use rmqtt::net::Builder;
use rmqtt::retain::DefaultRetainStorage;
use rmqtt::server::MqttServer;
use rmqtt::types::{ClientId, Id};

use crate::passwd::{Passwd, PasswdError};
use hooks::{Fitters, Hooks, Retained, SharedPolicy};
use policy::Policy;

/// The largest application payload every client may publish.
pub const MAX_PAYLOAD_BYTES: usize = 256 * 1024;

/// The largest packet: a payload of [`MAX_PAYLOAD_BYTES`] with the longest
/// topic (a u16 length and up to 65,535 bytes) and a packet id. rmqtt checks
/// the remaining length against it (rmqtt-codec `v3` decoder).
pub const MAX_PACKET_BYTES: usize = MAX_PAYLOAD_BYTES + 2 + 65_535 + 2;

/// Device ids are at most 64 bytes, the hub's client id at most 128.
const MAX_CLIENT_ID_BYTES: usize = 128;

/// Why the embedded broker did not start or reload.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(
        "broker listen address {addr} is in use (is another broker or fieldlink hub running? \
         set [broker] listen to a free address)"
    )]
    AddrInUse { addr: SocketAddr },
    #[error("broker cannot listen on {addr}: {reason}")]
    Listen { addr: SocketAddr, reason: String },
    #[error("broker TLS listener on {addr}: {reason}")]
    Tls { addr: SocketAddr, reason: String },
    #[error("broker credentials: {0}")]
    Passwd(#[from] PasswdError),
}

/// The `mqtts` listener.
#[derive(Debug, Clone)]
pub struct TlsListener {
    pub listen: SocketAddr,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// The limits, with the values the hub uses by default.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Sessions, connected or parked (devices, the hub, tools).
    pub max_sessions: usize,
    /// From TCP accept (after TLS, if any) to a whole CONNECT.
    pub handshake_timeout: Duration,
    /// Messages queued per device session.
    pub device_queue: usize,
    /// Messages queued for the hub's own sessions.
    pub hub_queue: usize,
    /// Unacknowledged QoS 1/2 messages in flight per connection, each way.
    /// rmqtt closes a connection that has more incoming QoS 2 (or QoS 1
    /// still in the ACL hook) than this (`src/session.rs:165-174`,
    /// `src/inflight.rs:396-400`): it is the agent's largest `max_inflight`.
    pub inflight: NonZeroU16,
    /// How long a queued message waits for its subscriber.
    pub message_expiry: Duration,
    /// How long a parked persistent session is kept.
    pub session_expiry: Duration,
}

const DAY: Duration = Duration::from_secs(86_400);

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_sessions: 10_000,
            handshake_timeout: Duration::from_secs(10),
            device_queue: 1_000,
            hub_queue: 200_000,
            inflight: NonZeroU16::new(1_000).unwrap_or(NonZeroU16::MIN),
            message_expiry: 7 * DAY,
            session_expiry: 7 * DAY,
        }
    }
}

/// What [`EmbeddedBroker::start`] needs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub tls: Option<TlsListener>,
    pub topic_prefix: String,
    /// The devices' credentials (mosquitto_passwd format).
    pub passwd_file: PathBuf,
    /// The hub's own user and password (not in `passwd_file`).
    pub hub_user: String,
    pub hub_password: String,
    pub limits: Limits,
}

/// A running rmqtt. Dropping it stops accepting; connections already
/// accepted end with their clients.
pub struct EmbeddedBroker {
    addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    scx: ServerContext,
    policy: SharedPolicy,
    settings: Settings,
    server: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker").field("addr", &self.addr).field("tls_addr", &self.tls_addr).finish()
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn load_policy(s: &Settings) -> Result<Policy, BrokerError> {
    let passwd = Passwd::load(&s.passwd_file)?;
    Ok(Policy::new(&s.topic_prefix, &s.hub_user, &s.hub_password, passwd.users))
}

impl EmbeddedBroker {
    /// Starts rmqtt on the current tokio runtime; returns once its listeners
    /// are bound (port 0 picks a free port; [`addr`](Self::addr) tells which).
    pub async fn start(settings: Settings) -> Result<EmbeddedBroker, BrokerError> {
        let policy: SharedPolicy = Arc::new(RwLock::new(Arc::new(load_policy(&settings)?)));
        let limits = &settings.limits;
        let scx = ServerContext::new()
            .busy_check_enable(false)
            .mqtt_max_sessions(isize::try_from(limits.max_sessions).unwrap_or(isize::MAX))
            .build()
            .await;

        let hooks = Hooks { policy: Arc::clone(&policy), dropped: Arc::new(AtomicU64::new(0)) };
        let register = scx.extends.hook_mgr().register();
        for typ in [
            Type::ClientAuthenticate,
            Type::ClientSubscribeCheckAcl,
            Type::MessagePublishCheckAcl,
            Type::MessageDropped,
        ] {
            // The highest priority: the policy decides before any other handler.
            register.add_priority(typ, u32::MAX, Box::new(hooks.clone())).await;
        }
        register.start().await;
        *scx.extends.fitter_mgr_mut().await =
            Box::new(Fitters { policy: Arc::clone(&policy), hub_mqueue: limits.hub_queue });
        *scx.extends.retain_mut().await = Box::new(Retained(DefaultRetainStorage::new()));

        let plain = builder(&settings, "fieldlink/tcp", settings.listen)
            .bind()
            .and_then(|l| l.tcp())
            .map_err(|e| bind_error(settings.listen, &e))?;
        let addr = plain.local_addr().map_err(|e| bind_error(settings.listen, &e))?;
        let mut server = MqttServer::new(scx.clone()).listener_by_id(plain, 1);
        let mut tls_addr = None;
        if let Some(tls) = &settings.tls {
            let listener = builder(&settings, "fieldlink/tls", tls.listen)
                .tls_cert(Some(tls.cert_file.to_string_lossy()))
                .tls_key(Some(tls.key_file.to_string_lossy()))
                .bind()
                .map_err(|e| bind_error(tls.listen, &e))?
                .tls()
                .map_err(|e| BrokerError::Tls { addr: tls.listen, reason: format!("{e:#}") })?;
            tls_addr = Some(listener.local_addr().map_err(|e| bind_error(tls.listen, &e))?);
            server = server.listener_by_id(listener, 2);
        }
        let server = server.build();
        let task = tokio::spawn(async move {
            // `run` only returns when every listener loop has ended, and
            // rmqtt's loops never end on their own (`src/server.rs:224-260`).
            if let Err(e) = server.run().await {
                tracing::error!("embedded broker stopped: {e:#}");
            }
        });
        if !addr.ip().is_loopback() && settings.tls.is_none() {
            tracing::warn!(%addr, "the embedded broker listens beyond loopback without TLS: passwords cross the network in clear (set [broker] tls_listen)");
        }
        tracing::info!(%addr, tls = ?tls_addr, "embedded MQTT broker listening");
        Ok(EmbeddedBroker { addr, tls_addr, scx, policy, settings, server: task })
    }

    /// The plain listener's address, with the real port.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The TLS listener's address, with the real port, when there is one.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// Rereads the password file, then closes the connection and discards
    /// the session of every device whose line was removed or changed.
    /// Returns those device ids. On an error the old credentials stay.
    pub async fn reload(&self) -> Result<Vec<String>, BrokerError> {
        let next = Arc::new(load_policy(&self.settings)?);
        let previous = {
            let mut guard = match self.policy.write() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            std::mem::replace(&mut *guard, Arc::clone(&next))
        };
        let revoked = previous.revoked_by(&next);
        for id in &revoked {
            self.kick(id).await;
        }
        tracing::info!(revoked = ?revoked, "embedded broker reloaded its credentials");
        Ok(revoked)
    }

    async fn kick(&self, client_id: &str) {
        let id = Id::from(self.scx.node.id(), ClientId::from(client_id));
        let entry = self.scx.extends.shared().await.entry(id);
        if !entry.exist() {
            return;
        }
        match entry.try_lock().await {
            // clean start and clear subscriptions: the session is gone too.
            Ok(mut locked) => match locked.kick(true, true, true).await {
                Ok(_) => tracing::warn!(device = client_id, "device credentials revoked: connection closed"),
                Err(e) => tracing::warn!(device = client_id, "could not close a revoked device's connection: {e:#}"),
            },
            Err(e) => tracing::warn!(device = client_id, "could not close a revoked device's connection: {e:#}"),
        }
    }
}

/// One listener's settings; see [`Limits`] and the module doc.
fn builder(s: &Settings, name: &str, laddr: SocketAddr) -> Builder {
    let l = &s.limits;
    Builder::new()
        .name(name)
        .laddr(laddr)
        .reuseaddr(Some(true))
        .allow_anonymous(false)
        .max_packet_size(u32::try_from(MAX_PACKET_BYTES).unwrap_or(u32::MAX))
        .max_clientid_len(MAX_CLIENT_ID_BYTES)
        .max_inflight(l.inflight)
        .handshake_timeout(l.handshake_timeout)
        .max_mqueue_len(l.device_queue)
        .message_expiry_interval(l.message_expiry)
        .session_expiry_interval(l.session_expiry)
}

fn bind_error(addr: SocketAddr, e: &rmqtt::Error) -> BrokerError {
    let in_use =
        e.chain().any(|c| c.downcast_ref::<io::Error>().is_some_and(|io| io.kind() == io::ErrorKind::AddrInUse));
    if in_use { BrokerError::AddrInUse { addr } } else { BrokerError::Listen { addr, reason: format!("{e:#}") } }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &std::path::Path, listen: SocketAddr) -> Settings {
        Settings {
            listen,
            tls: None,
            topic_prefix: "fl".into(),
            passwd_file: dir.join("passwd"),
            hub_user: "hub".into(),
            hub_password: "pw".into(),
            limits: Limits::default(),
        }
    }

    #[tokio::test]
    async fn an_address_already_listened_on_is_reported_as_in_use() {
        let dir = tempfile::tempdir().expect("tempdir");
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr");
        let err = EmbeddedBroker::start(settings(dir.path(), addr)).await.expect_err("must not start");
        assert!(matches!(err, BrokerError::AddrInUse { .. }), "{err:?}");
        assert!(err.to_string().starts_with(&format!("broker listen address {addr} is in use")), "{err}");
    }

    #[tokio::test]
    async fn port_zero_starts_on_a_real_port() {
        let dir = tempfile::tempdir().expect("tempdir");
        let broker =
            EmbeddedBroker::start(settings(dir.path(), "127.0.0.1:0".parse().expect("addr"))).await.expect("start");
        assert_ne!(broker.addr().port(), 0);
        tokio::net::TcpStream::connect(broker.addr()).await.expect("it accepts");
    }

    #[tokio::test]
    async fn a_corrupt_password_file_stops_the_start_and_names_the_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("passwd"), "nonsense\n").expect("write");
        let err = EmbeddedBroker::start(settings(dir.path(), "127.0.0.1:0".parse().expect("addr")))
            .await
            .expect_err("must not start");
        assert!(err.to_string().ends_with("line 1 is not 'user:$7$iterations$salt$hash'"), "{err}");
    }
}
