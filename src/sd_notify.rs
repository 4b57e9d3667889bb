//! The systemd notification protocol (`sd_notify(3)`), spoken directly over
//! a Unix datagram socket: no libsystemd. Owns reading `NOTIFY_SOCKET`,
//! `WATCHDOG_USEC` and `WATCHDOG_PID` and sending `KEY=VALUE` datagrams. It
//! decides nothing about *when* to send (that is `agent::systemd` and
//! `hub::run`), and it never fails the caller's work: without `NOTIFY_SOCKET`
//! (not started by systemd, or `Type=` other than `notify`) every send is a
//! no-op.
//!
//! The protocol, from `sd_notify(3)` and systemd's `src/libsystemd/sd-daemon/
//! sd-daemon.c` (`sd_pid_notify_with_fds`):
//!
//! * `NOTIFY_SOCKET` is a filesystem path (`/run/systemd/notify`) or, when it
//!   starts with `@`, a Linux abstract socket name (the `@` stands for the
//!   leading NUL byte);
//! * each notification is one datagram of newline-separated `KEY=VALUE`
//!   lines (`READY=1`, `STATUS=...`, `WATCHDOG=1`, `STOPPING=1`);
//! * `WATCHDOG_USEC` is the watchdog timeout in microseconds; the service
//!   must send `WATCHDOG=1` more often than that (systemd advises every half
//!   of it). When `WATCHDOG_PID` is set and is not our pid, the watchdog is
//!   meant for another process and is ignored (`sd_watchdog_enabled`).

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Why a notification could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET '{socket}': {source}")]
    Send { socket: String, source: io::Error },
    #[error("NOTIFY_SOCKET '{0}' is not an absolute path or an @abstract name")]
    BadAddress(String),
}

/// Where notifications go.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Address {
    Path(PathBuf),
    /// The name without the leading `@`.
    Abstract(Vec<u8>),
}

impl Address {
    fn parse(value: &str) -> Result<Address, NotifyError> {
        if let Some(name) = value.strip_prefix('@') {
            Ok(Address::Abstract(name.as_bytes().to_vec()))
        } else if value.starts_with('/') {
            Ok(Address::Path(PathBuf::from(value)))
        } else {
            // systemd also accepts `vsock:`; nothing here needs it.
            Err(NotifyError::BadAddress(value.to_string()))
        }
    }
}

/// A handle to the service manager; cheap to clone. [`Notifier::disabled`]
/// (or a missing `NOTIFY_SOCKET`) makes every method a no-op.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    inner: Option<Arc<Inner>>,
    watchdog: Option<Duration>,
}

#[derive(Debug)]
struct Inner {
    display: String,
    address: Address,
    socket: UnixDatagram,
}

impl Notifier {
    /// Sends nothing.
    pub fn disabled() -> Notifier {
        Notifier::default()
    }

    /// From the environment: `NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID`.
    /// A bad `NOTIFY_SOCKET` is logged and notifications are off: systemd
    /// then kills a `Type=notify` service at `TimeoutStartSec`, and the log
    /// says why.
    pub fn from_env() -> Notifier {
        let socket = std::env::var("NOTIFY_SOCKET").ok();
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        match Notifier::new(socket.as_deref(), usec.as_deref(), pid.as_deref(), std::process::id()) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!("systemd notifications are off: {e}");
                Notifier::disabled()
            }
        }
    }

    /// [`Notifier::from_env`] with the values passed in (tests).
    pub fn new(
        socket: Option<&str>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
        own_pid: u32,
    ) -> Result<Notifier, NotifyError> {
        let Some(value) = socket.filter(|s| !s.is_empty()) else { return Ok(Notifier::disabled()) };
        let address = Address::parse(value)?;
        let socket = UnixDatagram::unbound().map_err(|source| NotifyError::Send { socket: value.into(), source })?;
        let watchdog = watchdog_interval(watchdog_usec, watchdog_pid, own_pid);
        Ok(Notifier { inner: Some(Arc::new(Inner { display: value.to_string(), address, socket })), watchdog })
    }

    /// Whether a service manager listens.
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// The watchdog timeout systemd enforces (`WatchdogSec=`), if any and if
    /// notifications are on. `WATCHDOG=1` must come more often than this.
    pub fn watchdog_timeout(&self) -> Option<Duration> {
        self.inner.as_ref().and(self.watchdog)
    }

    /// Sends `state` (newline-separated `KEY=VALUE` lines) as one datagram.
    pub fn notify(&self, state: &str) -> Result<(), NotifyError> {
        let Some(inner) = &self.inner else { return Ok(()) };
        let sent = match &inner.address {
            Address::Path(path) => inner.socket.send_to(state.as_bytes(), path),
            Address::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name)
                    .and_then(|addr| inner.socket.send_to_addr(state.as_bytes(), &addr))
            }
        };
        match sent {
            Ok(_) => Ok(()),
            Err(source) => Err(NotifyError::Send { socket: inner.display.clone(), source }),
        }
    }

    /// [`Notifier::notify`], logging a failure instead of returning it: a
    /// service manager that stopped listening is no reason to stop working.
    pub fn send(&self, state: &str) {
        if let Err(e) = self.notify(state) {
            tracing::warn!("systemd notification {:?} not sent: {e}", state.lines().next().unwrap_or_default());
        }
    }
}

/// `WATCHDOG_USEC` as a duration, unless it is absent, zero, not a number,
/// or `WATCHDOG_PID` names another process.
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(own_pid)
    {
        return None;
    }
    let usec = usec?.trim().parse::<u64>().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec))
}

/// A `STATUS=` line's value with no newline in it (a newline would start
/// another `KEY=VALUE` line).
pub fn status_line(text: &str) -> String {
    format!("STATUS={}", text.replace(['\n', '\r'], " "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receive(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        socket.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let n = socket.recv(&mut buf).expect("a datagram arrives");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn a_notification_arrives_as_one_datagram_on_a_path_socket() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).expect("bind");
        let n = Notifier::new(path.to_str(), None, None, 1).expect("valid");
        assert!(n.enabled());
        n.notify("READY=1\nSTATUS=up").expect("sent");
        assert_eq!(receive(&listener), "READY=1\nSTATUS=up");
    }

    #[test]
    fn an_at_sign_names_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("fieldlink-test-{}-{}", std::process::id(), fastrand::u64(..));
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("name");
        let listener = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        let n = Notifier::new(Some(&format!("@{name}")), None, None, 1).expect("valid");
        n.notify("WATCHDOG=1").expect("sent");
        assert_eq!(receive(&listener), "WATCHDOG=1");
    }

    #[test]
    fn without_notify_socket_nothing_is_sent_and_there_is_no_watchdog() {
        let n = Notifier::new(None, Some("2000000"), None, 1).expect("valid");
        assert!(!n.enabled());
        assert_eq!(n.watchdog_timeout(), None);
        n.notify("READY=1").expect("a no-op");
        assert!(!Notifier::new(Some(""), None, None, 1).expect("valid").enabled());
    }

    #[test]
    fn a_relative_notify_socket_is_refused() {
        let e = Notifier::new(Some("run/notify"), None, None, 1).expect_err("relative");
        assert_eq!(e.to_string(), "NOTIFY_SOCKET 'run/notify' is not an absolute path or an @abstract name");
    }

    #[test]
    fn a_socket_nobody_listens_on_is_an_error_naming_it() {
        let n = Notifier::new(Some("/nonexistent/notify.sock"), None, None, 1).expect("valid");
        let e = n.notify("READY=1").expect_err("nobody listens");
        assert!(e.to_string().starts_with("NOTIFY_SOCKET '/nonexistent/notify.sock': "), "{e}");
    }

    #[test]
    fn the_watchdog_follows_watchdog_usec_and_watchdog_pid() {
        let on = |usec, pid| Notifier::new(Some("@x"), usec, pid, 42).expect("valid").watchdog_timeout();
        assert_eq!(on(Some("3000000"), None), Some(Duration::from_secs(3)));
        assert_eq!(on(Some("3000000"), Some("42")), Some(Duration::from_secs(3)));
        assert_eq!(on(Some("3000000"), Some("41")), None, "meant for another process");
        assert_eq!(on(Some("0"), None), None);
        assert_eq!(on(Some("soon"), None), None);
        assert_eq!(on(None, None), None);
    }

    #[test]
    fn a_status_line_stays_one_line() {
        assert_eq!(status_line("link up\noutbox 3"), "STATUS=link up outbox 3");
    }
}
