//! The rumqttc options the agent's Link and the hub's collector share: a
//! client that acknowledges incoming messages itself (manual acks), accepts
//! large packets, logs in, and speaks TLS from the configured files. Owns
//! turning those config values into `MqttOptions`; each caller adds its own
//! (the agent its last will and inflight window). It opens no connection.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rumqttc::{MqttOptions, Transport};

use crate::config::{BrokerUrl, Secret};

/// The largest packet a client accepts. Far above any valid command (1 KiB)
/// or device message, so that an oversized command reaches the agent and is
/// refused as `too_large` instead of breaking the connection (rumqttc's
/// default is 10 KiB, and a packet over the limit is a connection error the
/// broker would redeliver forever on a persistent session).
pub const MAX_PACKET: usize = 4 * 1024 * 1024;

/// What both clients take from their config section.
#[derive(Debug, Clone, Copy)]
pub struct Client<'a> {
    pub client_id: &'a str,
    pub url: &'a BrokerUrl,
    pub keep_alive: Duration,
    pub clean_session: bool,
    pub username: Option<&'a str>,
    pub password: Option<&'a Secret>,
    pub ca_file: Option<&'a PathBuf>,
    pub cert_file: Option<&'a PathBuf>,
    pub key_file: Option<&'a PathBuf>,
}

/// Options with manual acks, [`MAX_PACKET`], credentials and TLS. Errors are
/// one line naming the file that could not be read.
pub fn options(c: Client<'_>) -> Result<MqttOptions, String> {
    let mut o = MqttOptions::new(c.client_id, c.url.host.clone(), c.url.port);
    o.set_keep_alive(c.keep_alive)
        .set_clean_session(c.clean_session)
        .set_manual_acks(true)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET);
    if let Some(user) = c.username {
        o.set_credentials(user, c.password.map(|p| p.0.clone()).unwrap_or_default());
    }
    if c.url.tls {
        let read = |p: &Path| std::fs::read(p).map_err(|e| format!("cannot read '{}': {e}", p.display()));
        let ca = read(c.ca_file.ok_or("mqtts:// needs ca_file")?)?;
        let client_auth = match (c.cert_file, c.key_file) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            _ => None,
        };
        o.set_transport(Transport::tls(ca, client_auth, None));
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(tls: bool) -> BrokerUrl {
        BrokerUrl { tls, host: "127.0.0.1".into(), port: 1883 }
    }

    fn client(url: &BrokerUrl) -> Client<'_> {
        Client {
            client_id: "c",
            url,
            keep_alive: Duration::from_secs(30),
            clean_session: false,
            username: None,
            password: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }

    #[test]
    fn plain_options_keep_the_session_and_ack_manually() {
        let u = url(false);
        let o = options(client(&u)).expect("plain mqtt");
        assert!(!o.clean_session());
        assert!(o.manual_acks());
        assert_eq!(o.max_packet_size(), MAX_PACKET);
    }

    #[test]
    fn tls_without_a_ca_or_with_an_unreadable_one_is_a_clear_error() {
        let u = url(true);
        assert_eq!(options(client(&u)).err().as_deref(), Some("mqtts:// needs ca_file"));
        let missing = PathBuf::from("/nonexistent/ca.pem");
        let e = options(Client { ca_file: Some(&missing), ..client(&u) }).err().unwrap_or_default();
        assert!(e.starts_with("cannot read '/nonexistent/ca.pem'"), "{e}");
    }
}
