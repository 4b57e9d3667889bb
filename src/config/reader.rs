//! The TOML walker both config files are read with (the agent's and the
//! hub's). Owns turning a [`toml::Table`] into typed values while collecting
//! every problem, and the wording of those problems: each names the key
//! (`mqtt.keep_alive: ...`, `button 'door': pin ...`), quotes the bad value
//! (cut short when long) and says what was expected.
//!
//! How it works: a config is parsed into a plain table ([`parse_with`]), then
//! walked section by section with a [`Reader`] per table that remembers which
//! keys it consumed; [`Reader::finish`] reports the rest as `unknown key`.
//! Every getter records its problem in [`Problems`] and returns
//! [`Reported`], so the walk carries on and one run reports every problem in
//! the file. It knows nothing about what the keys mean.

use std::collections::BTreeSet;
use std::io;
#[cfg(feature = "hub")]
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::{Table, Value};

use super::ConfigError;
use crate::proto::Qos;

/// The lower bound of durations that only have to be more than zero.
pub(super) const NONZERO: Duration = Duration::from_nanos(1);
pub(super) const DURATION_HINT: &str = "(e.g. 30s, 5m)";
pub(super) const NAME_HINT: &str = "[A-Za-z0-9_-]{1,64}";
const DAY_SECS: u64 = 86_400;

pub(super) const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

pub(super) const fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// Reads a config file, telling a missing file from an unreadable one.
pub(super) fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|error| {
        if error.kind() == io::ErrorKind::NotFound {
            ConfigError::Missing { path: path.to_path_buf() }
        } else {
            ConfigError::Unreadable { path: path.to_path_buf(), error }
        }
    })
}

/// Parses `text` as TOML and hands the table to `build`, which walks it.
/// A syntax error is the one problem; otherwise every problem `build`
/// recorded is returned, and a config only when there were none.
pub(super) fn parse_with<T>(
    text: &str,
    build: impl FnOnce(&Table, &mut Problems) -> Checked<T>,
) -> Result<T, ConfigError> {
    let table = match text.parse::<Table>() {
        Ok(table) => table,
        Err(error) => return Err(ConfigError::Invalid(vec![syntax_problem(text, &error)])),
    };
    let mut problems = Problems::default();
    let built = build(&table, &mut problems);
    match built {
        Ok(config) if problems.found.is_empty() => Ok(config),
        _ => {
            debug_assert!(!problems.found.is_empty(), "a Reported error always records a problem");
            Err(ConfigError::Invalid(problems.found))
        }
    }
}

fn syntax_problem(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
    let message = lowercase_first(&message);
    match error.span() {
        Some(span) => {
            let start = span.start.min(text.len());
            let line = text.as_bytes()[..start].iter().filter(|&&b| b == b'\n').count() + 1;
            format!("line {line}: invalid toml: {message}")
        }
        None => format!("invalid toml: {message}"),
    }
}

// ---------------------------------------------------------------------------
// Single values.

/// `[A-Za-z0-9_-]{1,64}`: device ids, button and relay names and shared
/// subscription groups, which all end up in topics.
pub(super) fn is_name(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Checks that a file can be opened for reading; the message on failure
/// quotes the path.
pub(super) fn check_readable(
    r: &mut Reader<'_>,
    key: &str,
    file: Option<PathBuf>,
    p: &mut Problems,
) -> Checked<Option<PathBuf>> {
    let Some(path) = file else { return Ok(None) };
    let problem = match std::fs::metadata(&path) {
        Ok(meta) if meta.is_dir() => Some("is a directory".to_string()),
        Ok(_) => std::fs::File::open(&path).err().map(|e| describe_io(&e)),
        Err(e) => Some(describe_io(&e)),
    };
    match problem {
        Some(why) => Err(r.problem(key, p, format!("cannot read '{}': {why}", path.display()))),
        None => Ok(Some(path)),
    }
}

/// An io error as a lowercase phrase without the os error number.
pub(crate) fn describe_io(error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::NotFound => "no such file".to_string(),
        io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        io::ErrorKind::IsADirectory => "is a directory".to_string(),
        io::ErrorKind::InvalidData => "not utf-8 text".to_string(),
        _ => {
            let text = error.to_string();
            let text = text.split(" (os error").next().unwrap_or(&text);
            lowercase_first(text)
        }
    }
}

fn lowercase_first(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// A string value quoted for a message: single quotes, escapes, and cut short
/// when long.
pub(super) fn quote(s: &str) -> String {
    const MAX: usize = 80;
    let escaped: String = s.escape_debug().collect();
    match escaped.char_indices().nth(MAX) {
        Some((cut, _)) => format!("'{}...'", &escaped[..cut]),
        None => format!("'{escaped}'"),
    }
}

/// `30s`, `100ms`, `30d`, or humantime's form for anything else.
pub(super) fn show_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        if d.as_secs() >= DAY_SECS && d.as_secs().is_multiple_of(DAY_SECS) {
            format!("{}d", d.as_secs() / DAY_SECS)
        } else {
            format!("{}s", d.as_secs())
        }
    } else if d.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{}ms", d.as_millis())
    } else {
        humantime::format_duration(d).to_string()
    }
}

// ---------------------------------------------------------------------------
// The key reader.

/// Marks a value that could not be read; its problem has been recorded in
/// [`Problems`] already.
#[derive(Debug, Clone, Copy)]
pub(super) struct Reported;

pub(super) type Checked<T> = Result<T, Reported>;

/// Every problem found so far, in the order found; and the warnings (a
/// config with only warnings is valid: they are shown by `check-config` and
/// logged by the process that loads it).
#[derive(Default)]
pub(super) struct Problems {
    found: Vec<String>,
    warnings: Vec<String>,
}

impl Problems {
    pub(super) fn report(&mut self, message: String) -> Reported {
        self.found.push(message);
        Reported
    }

    pub(super) fn warn(&mut self, message: String) {
        self.warnings.push(message);
    }

    /// The warnings so far, for the config being built.
    pub(super) fn warnings(&self) -> Vec<String> {
        self.warnings.clone()
    }
}

/// Where a table sits in the file, for messages.
pub(super) enum Place {
    Root,
    /// `[mqtt]`: messages read `mqtt.keep_alive: ...`.
    Section(&'static str),
    /// `[[button]]`: messages read `button 'door': debounce ...`; `label` is
    /// the quoted name, or `#2` until the name is known to be good.
    Entry {
        kind: &'static str,
        label: String,
    },
}

impl Place {
    pub(super) fn label(&self) -> String {
        match self {
            Place::Root => String::new(),
            Place::Section(name) => (*name).to_string(),
            Place::Entry { kind, label } => format!("{kind} {label}"),
        }
    }

    /// The dotted name of a key, as written in the file.
    pub(super) fn path(&self, key: &str) -> String {
        match self {
            Place::Root => key.to_string(),
            Place::Section(name) => format!("{name}.{key}"),
            Place::Entry { kind, .. } => format!("{kind}.{key}"),
        }
    }

    /// What a message about a key's value starts with.
    fn subject(&self, key: &str) -> String {
        match self {
            Place::Root | Place::Section(_) => format!("{}: ", self.path(key)),
            Place::Entry { .. } => format!("{}: {key} ", self.label()),
        }
    }
}

/// Reads keys of one table and remembers which it consumed; [`Reader::finish`]
/// reports the rest as unknown.
pub(super) struct Reader<'t> {
    table: &'t Table,
    pub(super) place: Place,
    used: BTreeSet<&'t str>,
}

impl<'t> Reader<'t> {
    pub(super) fn new(table: &'t Table, place: Place) -> Reader<'t> {
        Reader { table, place, used: BTreeSet::new() }
    }

    pub(super) fn has(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    /// The value of a key, if present, which counts as consumed from then on.
    pub(super) fn value(&mut self, key: &str) -> Option<&'t Value> {
        let (key, value) = self.table.get_key_value(key)?;
        self.used.insert(key.as_str());
        Some(value)
    }

    /// Reports a key that must not be set here (`why` says why), consuming
    /// it so that it is not also an unknown key.
    pub(super) fn refuse(&mut self, key: &str, why: &str, p: &mut Problems) {
        if self.value(key).is_some() {
            self.problem(key, p, why.to_string());
        }
    }

    pub(super) fn problem(&self, key: &str, p: &mut Problems, message: String) -> Reported {
        p.report(format!("{}{message}", self.place.subject(key)))
    }

    pub(super) fn missing(&self, key: &str, expected: &str, p: &mut Problems) -> Reported {
        p.report(match &self.place {
            Place::Entry { .. } => format!("{}: missing key '{key}' (expected {expected})", self.place.label()),
            _ => format!("missing key '{}' (expected {expected})", self.place.path(key)),
        })
    }

    pub(super) fn wrong_type(&self, key: &str, value: &Value, expected: &str, p: &mut Problems) -> Reported {
        let (shown, kind) = match value {
            Value::String(s) => (Some(quote(s)), "a string"),
            Value::Integer(i) => (Some(i.to_string()), "an integer"),
            Value::Float(f) => (Some(f.to_string()), "a float"),
            Value::Boolean(b) => (Some(b.to_string()), "a boolean"),
            Value::Datetime(d) => (Some(d.to_string()), "a date-time"),
            Value::Array(_) => (None, "an array"),
            Value::Table(_) => (None, "a table"),
        };
        let message = match (&self.place, shown) {
            (Place::Entry { .. }, Some(shown)) => {
                format!("{}: {key} {shown} is {kind}, expected {expected}", self.place.label())
            }
            (Place::Entry { .. }, None) => format!("{}: {key} is {kind}, expected {expected}", self.place.label()),
            (_, Some(shown)) => format!("{}: {shown} is {kind}, expected {expected}", self.place.path(key)),
            (_, None) => format!("{}: the value is {kind}, expected {expected}", self.place.path(key)),
        };
        p.report(message)
    }

    pub(super) fn str_opt(&mut self, key: &str, p: &mut Problems) -> Checked<Option<&'t str>> {
        match self.value(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(other) => Err(self.wrong_type(key, other, "a string", p)),
        }
    }

    /// A file path; the empty string means unset.
    pub(super) fn path_opt(&mut self, key: &str, p: &mut Problems) -> Checked<Option<PathBuf>> {
        Ok(self.str_opt(key, p)?.filter(|s| !s.is_empty()).map(PathBuf::from))
    }

    /// A path that must not be empty; `what` names it for the message
    /// (`a directory path`).
    pub(super) fn path_or(&mut self, key: &str, default: PathBuf, what: &str, p: &mut Problems) -> Checked<PathBuf> {
        match self.str_opt(key, p)? {
            None => Ok(default),
            Some("") => Err(self.problem(key, p, format!("'' is empty (expected {what})"))),
            Some(path) => Ok(PathBuf::from(path)),
        }
    }

    /// An `ip:port` address to listen on. Port 0 means any free port.
    /// Only the hub's config has listen keys.
    #[cfg(feature = "hub")]
    pub(super) fn socket_addr_or(&mut self, key: &str, default: SocketAddr, p: &mut Problems) -> Checked<SocketAddr> {
        const EXPECTED: &str = "expected ip:port, e.g. 127.0.0.1:8080 or [::]:8080; not a host name";
        let text = match self.value(key) {
            None => return Ok(default),
            Some(Value::String(s)) => s.as_str(),
            Some(other) => return Err(self.wrong_type(key, other, "an ip:port string", p)),
        };
        text.parse().map_err(|_| self.problem(key, p, format!("{} is not an address ({EXPECTED})", quote(text))))
    }

    pub(super) fn bool_or(&mut self, key: &str, default: bool, p: &mut Problems) -> Checked<bool> {
        match self.value(key) {
            None => Ok(default),
            Some(Value::Boolean(b)) => Ok(*b),
            Some(other) => Err(self.wrong_type(key, other, "true or false", p)),
        }
    }

    pub(super) fn int_opt(&mut self, key: &str, p: &mut Problems) -> Checked<Option<i64>> {
        match self.value(key) {
            None => Ok(None),
            Some(Value::Integer(i)) => Ok(Some(*i)),
            Some(other) => Err(self.wrong_type(key, other, "an integer", p)),
        }
    }

    pub(super) fn int_in<T: TryFrom<i64>>(
        &mut self,
        key: &str,
        default: T,
        range: RangeInclusive<i64>,
        p: &mut Problems,
    ) -> Checked<T> {
        let Some(n) = self.int_opt(key, p)? else {
            return Ok(default);
        };
        match T::try_from(n) {
            Ok(value) if range.contains(&n) => Ok(value),
            _ => {
                Err(self.problem(key, p, format!("{n} is out of range (expected {}..={})", range.start(), range.end())))
            }
        }
    }

    /// A finite number; an integer is taken as one too (`scale = 1`).
    pub(super) fn float_or(&mut self, key: &str, default: f64, p: &mut Problems) -> Checked<f64> {
        match self.value(key) {
            None => Ok(default),
            Some(Value::Integer(i)) => Ok(*i as f64),
            Some(Value::Float(f)) if f.is_finite() => Ok(*f),
            Some(Value::Float(f)) => Err(self.problem(key, p, format!("{f} is not a finite number"))),
            Some(other) => Err(self.wrong_type(key, other, "a number", p)),
        }
    }

    /// A non-empty array of strings (a command's argv).
    pub(super) fn str_list_opt(&mut self, key: &str, p: &mut Problems) -> Checked<Option<Vec<String>>> {
        const EXPECTED: &str = "a non-empty array of strings, e.g. [\"sh\", \"-c\", \"...\"]";
        match self.value(key) {
            None => Ok(None),
            Some(Value::Array(items)) if !items.is_empty() => items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .map(Some)
                .ok_or_else(|| self.problem(key, p, format!("holds a non-string (expected {EXPECTED})"))),
            Some(other) => Err(self.wrong_type(key, other, EXPECTED, p)),
        }
    }

    /// `qos`: 1 or 2, default 1.
    pub(super) fn qos(&mut self, p: &mut Problems) -> Checked<Qos> {
        let Some(level) = self.int_opt("qos", p)? else {
            return Ok(Qos::AtLeastOnce);
        };
        u8::try_from(level)
            .ok()
            .and_then(Qos::from_level)
            .ok_or_else(|| self.problem("qos", p, format!("{level} is not 1 or 2")))
    }

    pub(super) fn duration_in(
        &mut self,
        key: &str,
        default: Duration,
        range: RangeInclusive<Duration>,
        p: &mut Problems,
    ) -> Checked<Duration> {
        let text = match self.value(key) {
            None => return Ok(default),
            Some(Value::String(s)) => s.as_str(),
            Some(other) => {
                return Err(self.wrong_type(key, other, &format!("a duration string {DURATION_HINT}"), p));
            }
        };
        let Ok(d) = humantime::parse_duration(text) else {
            return Err(self.problem(key, p, format!("{} is not a duration {DURATION_HINT}", quote(text))));
        };
        if d < *range.start() {
            let why = if *range.start() == NONZERO {
                "must be more than 0".to_string()
            } else {
                format!("is less than {}", show_duration(*range.start()))
            };
            return Err(self.problem(key, p, format!("{} {why}", quote(text))));
        }
        if d > *range.end() {
            let max = show_duration(*range.end());
            return Err(self.problem(key, p, format!("{} is more than {max}", quote(text))));
        }
        Ok(d)
    }

    pub(super) fn choice<T: Copy>(
        &mut self,
        key: &str,
        default: T,
        options: &[(&str, T)],
        p: &mut Problems,
    ) -> Checked<T> {
        let Some(text) = self.str_opt(key, p)? else {
            return Ok(default);
        };
        if let Some((_, value)) = options.iter().find(|(name, _)| *name == text) {
            return Ok(*value);
        }
        let names: Vec<String> = options.iter().map(|(name, _)| format!("'{name}'")).collect();
        let expected = match names.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => String::new(),
        };
        Err(self.problem(key, p, format!("{} is not {expected}", quote(text))))
    }

    /// A `[section]`: an absent one is an empty table, so every key takes its
    /// default.
    pub(super) fn section(&mut self, key: &str, p: &mut Problems) -> Checked<Table> {
        match self.value(key) {
            None => Ok(Table::new()),
            Some(Value::Table(t)) => Ok(t.clone()),
            Some(other) => Err(self.wrong_type(key, other, &format!("a [{key}] table"), p)),
        }
    }

    /// `[[button]]` entries.
    pub(super) fn entries(&mut self, key: &str, p: &mut Problems) -> Checked<Vec<&'t Table>> {
        let expected = format!("[[{key}]] entries");
        match self.value(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => {
                let tables: Option<Vec<&'t Table>> = items.iter().map(Value::as_table).collect();
                match tables {
                    Some(tables) => Ok(tables),
                    None => Err(p.report(format!("{key}: the value is an array of non-tables, expected {expected}"))),
                }
            }
            Some(other) => Err(self.wrong_type(key, other, &expected, p)),
        }
    }

    pub(super) fn finish(self, p: &mut Problems) {
        for key in self.table.keys().filter(|k| !self.used.contains(k.as_str())) {
            let shown: String = key.escape_debug().collect();
            p.report(match &self.place {
                Place::Entry { .. } => format!("{}: unknown key '{shown}'", self.place.label()),
                _ => format!("unknown key '{}'", self.place.path(&shown)),
            });
        }
    }
}
