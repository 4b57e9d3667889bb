//! Who may connect to the embedded broker and what each client may publish
//! and subscribe to (sans-IO). Owns the decisions and their one-line
//! reasons; it must not read files, log, or know rmqtt's types (the hooks in
//! `broker::hooks` translate).
//!
//! * A device is a user of the password file (`passwd`): its client id must
//!   equal its user name, it may publish only under `P/<id>/` and subscribe
//!   only to `P/<id>/relay/+/set`, `P/<id>/sync` and `P/<id>/ack` (exact
//!   filters: no other wildcard, no `$share`, no `$SYS`). Its last will must
//!   be a topic it could publish (a will bypasses rmqtt's publish ACL, so it
//!   is checked here, at CONNECT). For Home Assistant discovery it may also
//!   publish `homeassistant/<component>/<id>/<object>/config` and subscribe
//!   to `homeassistant/status` (DESIGN: Home Assistant discovery; a refused
//!   publish would cost the agent its connection on every connect).
//! * The hub's own user (not in the password file) may publish and subscribe
//!   to anything, with any client id that is not a device's id.
//! * Everyone else is refused: no user name, an unknown user, a wrong
//!   password.

use std::collections::HashMap;

use crate::agent::homeassistant;
use crate::passwd;

/// Who a connected client is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// The hub's own user: everything is allowed.
    Hub,
    /// A provisioned device, by id (= user name = client id).
    Device(String),
}

/// Why a CONNECT is refused, with the CONNACK code family it maps to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// CONNACK "bad user name or password".
    #[error("bad user name or password: {0}")]
    BadCredentials(&'static str),
    /// CONNACK "not authorized".
    #[error("not authorized: {0}")]
    NotAuthorized(String),
}

/// What a CONNECT asks for.
#[derive(Debug, Clone, Copy)]
pub struct Connect<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    pub will_topic: Option<&'a str>,
}

/// The credentials and the topic prefix the decisions are made from.
#[derive(Debug, Clone)]
pub struct Policy {
    prefix: String,
    hub_user: String,
    hub_password: String,
    /// Device id → `$7$` hash (mosquitto_passwd format).
    devices: HashMap<String, String>,
}

impl Policy {
    /// `devices` are the password file's users (the hub's user, should it
    /// appear there, is ignored: its password is `hub_password`).
    pub fn new(prefix: &str, hub_user: &str, hub_password: &str, devices: Vec<(String, String)>) -> Policy {
        let devices = devices.into_iter().filter(|(u, _)| u != hub_user).collect();
        Policy {
            prefix: prefix.to_string(),
            hub_user: hub_user.to_string(),
            hub_password: hub_password.to_string(),
            devices,
        }
    }

    pub fn hub_user(&self) -> &str {
        &self.hub_user
    }

    /// The device ids whose credentials `next` removes or changes: their
    /// live connections must be closed.
    pub fn revoked_by(&self, next: &Policy) -> Vec<String> {
        let mut gone: Vec<String> = self
            .devices
            .iter()
            .filter(|(id, hash)| next.devices.get(*id) != Some(*hash))
            .map(|(id, _)| id.clone())
            .collect();
        gone.sort();
        gone
    }

    /// Whether this CONNECT may proceed, and as whom.
    pub fn authenticate(&self, c: Connect<'_>) -> Result<Role, Refusal> {
        let Some(user) = c.username else {
            return Err(Refusal::NotAuthorized("no user name (anonymous clients are refused)".into()));
        };
        let password = c.password.unwrap_or_default();
        let role = if user == self.hub_user {
            if !constant_time_eq(password, self.hub_password.as_bytes()) {
                return Err(Refusal::BadCredentials("wrong password for the hub's user"));
            }
            if self.devices.contains_key(c.client_id) {
                return Err(Refusal::NotAuthorized(format!(
                    "the hub's user may not take device '{}''s client id",
                    c.client_id.escape_debug()
                )));
            }
            Role::Hub
        } else {
            let Some(hash) = self.devices.get(user) else {
                return Err(Refusal::BadCredentials("unknown user"));
            };
            if !passwd::verify(hash, password) {
                return Err(Refusal::BadCredentials("wrong password"));
            }
            if c.client_id != user {
                return Err(Refusal::NotAuthorized(format!(
                    "client id '{}' is not the user name '{user}'",
                    c.client_id.escape_debug()
                )));
            }
            Role::Device(user.to_string())
        };
        if let Some(topic) = c.will_topic
            && !self.may_publish(&role, topic)
        {
            return Err(Refusal::NotAuthorized(format!(
                "last will on '{}' is not its own topic",
                topic.escape_debug()
            )));
        }
        Ok(role)
    }

    /// Whether `role` may publish to `topic`. Topic names with wildcards or
    /// NUL are refused for everyone (rmqtt accepts them, issue #7).
    pub fn may_publish(&self, role: &Role, topic: &str) -> bool {
        if topic.is_empty() || topic.contains(['+', '#', '\0']) {
            return false;
        }
        match role {
            Role::Hub => true,
            Role::Device(id) => {
                let own = topic
                    .strip_prefix(self.prefix.as_str())
                    .and_then(|t| t.strip_prefix('/'))
                    .and_then(|t| t.strip_prefix(id.as_str()))
                    .and_then(|t| t.strip_prefix('/'))
                    .is_some_and(|rest| !rest.is_empty());
                own || is_own_discovery_config(id, topic)
            }
        }
    }

    /// Whether `role` may subscribe to `filter` (`shared` for a
    /// `$share/<group>/` subscription).
    pub fn may_subscribe(&self, role: &Role, filter: &str, shared: bool) -> bool {
        match role {
            Role::Hub => true,
            Role::Device(id) => {
                !shared
                    && (["relay/+/set", "sync", "ack"]
                        .iter()
                        .any(|leaf| filter == format!("{}/{id}/{leaf}", self.prefix))
                        || filter == homeassistant::birth_topic(homeassistant::DEFAULT_PREFIX))
            }
        }
    }
}

/// `homeassistant/<component>/<id>/<object>/config`: a discovery config of
/// device `id` itself.
fn is_own_discovery_config(id: &str, topic: &str) -> bool {
    let levels: Vec<&str> = topic.split('/').collect();
    matches!(levels.as_slice(),
        [prefix, component, node, object, "config"]
            if *prefix == homeassistant::DEFAULT_PREFIX && !component.is_empty() && *node == id && !object.is_empty())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        let a = passwd::hash("pw-a", b"saltsaltsalt", 101);
        let b = passwd::hash("pw-b", b"saltsaltsal2", 101);
        let hub_line = passwd::hash("not-the-hub-password", b"saltsaltsal3", 101);
        Policy::new("fl/site", "hub", "hub-pw", vec![("a".into(), a), ("b".into(), b), ("hub".into(), hub_line)])
    }

    fn connect<'a>(client_id: &'a str, user: Option<&'a str>, password: &'a str) -> Connect<'a> {
        Connect { client_id, username: user, password: Some(password.as_bytes()), will_topic: None }
    }

    #[test]
    fn a_device_connects_with_its_own_password_and_client_id_only() {
        let p = policy();
        assert_eq!(p.authenticate(connect("a", Some("a"), "pw-a")), Ok(Role::Device("a".into())));
        assert!(matches!(p.authenticate(connect("a", Some("a"), "pw-b")), Err(Refusal::BadCredentials(_))));
        assert!(matches!(p.authenticate(connect("b", Some("a"), "pw-a")), Err(Refusal::NotAuthorized(_))));
        assert!(matches!(p.authenticate(connect("a", Some("zz"), "pw-a")), Err(Refusal::BadCredentials(_))));
        assert!(matches!(p.authenticate(connect("a", None, "pw-a")), Err(Refusal::NotAuthorized(_))));
        let no_password = Connect { client_id: "a", username: Some("a"), password: None, will_topic: None };
        assert!(matches!(p.authenticate(no_password), Err(Refusal::BadCredentials(_))));
    }

    #[test]
    fn the_hub_user_has_its_own_password_and_any_client_id_but_a_devices() {
        let p = policy();
        assert_eq!(p.authenticate(connect("fieldlink-hub", Some("hub"), "hub-pw")), Ok(Role::Hub));
        assert_eq!(p.authenticate(connect("hub-watch/1", Some("hub"), "hub-pw")), Ok(Role::Hub));
        // The password file's line for "hub" does not count.
        assert!(p.authenticate(connect("x", Some("hub"), "not-the-hub-password")).is_err());
        assert!(matches!(p.authenticate(connect("a", Some("hub"), "hub-pw")), Err(Refusal::NotAuthorized(_))));
    }

    #[test]
    fn odd_client_ids_are_refused_without_trouble() {
        let p = policy();
        let long = "x".repeat(65_535);
        for id in ["", "/", "a/b", "+", "#", "$SYS", "a\0", long.as_str()] {
            assert!(p.authenticate(connect(id, Some("a"), "pw-a")).is_err(), "{id:?}");
        }
    }

    #[test]
    fn a_will_must_be_on_the_devices_own_topics() {
        let p = policy();
        let with_will = |topic| Connect { will_topic: Some(topic), ..connect("a", Some("a"), "pw-a") };
        assert!(p.authenticate(with_will("fl/site/a/status")).is_ok());
        for topic in
            ["fl/site/b/status", "fl/site/a", "fl/site/a/", "other/a/status", "fl/site/a/#", "fl/site/+/status"]
        {
            assert!(matches!(p.authenticate(with_will(topic)), Err(Refusal::NotAuthorized(_))), "{topic}");
        }
    }

    #[test]
    fn a_device_publishes_under_its_own_prefix_only() {
        let p = policy();
        let a = Role::Device("a".into());
        for ok in [
            "fl/site/a/status",
            "fl/site/a/relay/pump/state",
            "fl/site/a/sync",
            "homeassistant/switch/a/relay_pump/config",
        ] {
            assert!(p.may_publish(&a, ok), "{ok}");
        }
        for bad in [
            "fl/site/b/status",
            "fl/site/ab/status",
            "fl/site/a",
            "fl/site/a/",
            "fl/site/a/x\0",
            "fl/site/a/+",
            "fl/site/a/#",
            "fl/sitea/status",
            "$SYS/x",
            "",
            "homeassistant/switch/b/relay_pump/config",
            "homeassistant/switch/a/relay_pump",
            "homeassistant/switch/a/x/y/config",
            "homeassistant/status",
        ] {
            assert!(!p.may_publish(&a, bad), "{bad:?}");
        }
        assert!(p.may_publish(&Role::Hub, "fl/site/b/relay/pump/set"));
        assert!(!p.may_publish(&Role::Hub, "fl/site/b/+"));
    }

    #[test]
    fn a_device_subscribes_to_its_commands_sync_and_acks_only() {
        let p = policy();
        let a = Role::Device("a".into());
        for ok in ["fl/site/a/relay/+/set", "fl/site/a/sync", "fl/site/a/ack", "homeassistant/status"] {
            assert!(p.may_subscribe(&a, ok, false), "{ok}");
            assert!(!p.may_subscribe(&a, ok, true), "$share {ok}");
        }
        for bad in [
            "#",
            "fl/#",
            "fl/site/+/relay/+/set",
            "fl/site/b/relay/+/set",
            "fl/site/a/#",
            "fl/site/a/relay/#",
            "$SYS/#",
            "$share/g/fl/site/a/sync",
            "fl/site/a/relay/pump/state",
            "homeassistant/#",
            "homeassistant/+/b/+/config",
        ] {
            assert!(!p.may_subscribe(&a, bad, false), "{bad}");
        }
        assert!(p.may_subscribe(&Role::Hub, "fl/site/#", false));
    }

    #[test]
    fn removing_or_reissuing_a_device_revokes_it() {
        let before = policy();
        let a2 = passwd::hash("pw-a2", b"saltsaltsal4", 101);
        let c = passwd::hash("pw-c", b"saltsaltsal5", 101);
        let after = Policy::new("fl/site", "hub", "hub-pw", vec![("a".into(), a2), ("c".into(), c)]);
        assert_eq!(before.revoked_by(&after), ["a", "b"]);
        assert!(after.revoked_by(&after).is_empty());
    }
}
