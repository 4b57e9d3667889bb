//! The agent's `[homeassistant]` section (DESIGN: Home Assistant discovery):
//! whether the agent announces itself to Home Assistant, and under which
//! discovery prefix. Owns reading and checking those keys; it must not
//! build discovery messages (`agent::homeassistant` does).

use toml::Table;

use super::reader::{Checked, Place, Problems, Reader, quote};

/// `[homeassistant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HomeAssistantConfig {
    /// Publish retained discovery configs on every connect and whenever
    /// Home Assistant announces itself on `<prefix>/status`. When switched
    /// off, configs published before are removed.
    pub discovery: bool,
    /// Home Assistant's discovery prefix (`homeassistant` unless changed in
    /// Home Assistant's MQTT settings).
    pub prefix: String,
}

impl Default for HomeAssistantConfig {
    fn default() -> Self {
        HomeAssistantConfig { discovery: false, prefix: crate::agent::homeassistant::DEFAULT_PREFIX.to_string() }
    }
}

pub(super) fn homeassistant_config(t: &Table, p: &mut Problems) -> Checked<HomeAssistantConfig> {
    let mut r = Reader::new(t, Place::Section("homeassistant"));
    let default = HomeAssistantConfig::default();
    let discovery = r.bool_or("discovery", default.discovery, p);
    let prefix = match r.str_opt("prefix", p) {
        Ok(Some(prefix)) if valid_prefix(prefix) => Ok(prefix.to_string()),
        Ok(Some(prefix)) => Err(r.problem(
            "prefix",
            p,
            format!(
                "{} is not a topic prefix (expected non-empty, no '+', '#', NUL or leading/trailing '/')",
                quote(prefix)
            ),
        )),
        Ok(None) => Ok(default.prefix),
        Err(e) => Err(e),
    };
    r.finish(p);
    Ok(HomeAssistantConfig { discovery: discovery?, prefix: prefix? })
}

fn valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && !prefix.starts_with('/')
        && !prefix.ends_with('/')
        && !prefix.contains(['+', '#', '\0'])
        && prefix.len() <= 128
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AgentConfig;

    fn problems(section: &str) -> String {
        match AgentConfig::parse(&format!("device_id = \"d\"\n[homeassistant]\n{section}")) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{section} was accepted"),
        }
    }

    #[test]
    fn discovery_is_off_by_default_under_home_assistants_default_prefix() {
        let c = AgentConfig::parse("device_id = \"d\"").expect("valid");
        assert_eq!(c.homeassistant, HomeAssistantConfig { discovery: false, prefix: "homeassistant".into() });
    }

    #[test]
    fn discovery_and_prefix_can_be_set() {
        let c = AgentConfig::parse("device_id = \"d\"\n[homeassistant]\ndiscovery = true\nprefix = \"ha/disc\"")
            .expect("valid");
        assert_eq!(c.homeassistant, HomeAssistantConfig { discovery: true, prefix: "ha/disc".into() });
    }

    #[test]
    fn a_prefix_with_wildcards_or_slashes_at_the_ends_is_refused_naming_the_key() {
        for bad in ["\"ha/#\"", "\"+\"", "\"\"", "\"/ha\"", "\"ha/\""] {
            let text = problems(&format!("prefix = {bad}"));
            assert!(text.starts_with("homeassistant.prefix: "), "{bad}: {text}");
        }
        assert!(problems("discovery = \"yes\"").starts_with("homeassistant.discovery: "));
    }
}
