//! A client of an agent's simulated GPIO socket (`<state_dir>/sim.sock`,
//! DESIGN: Simulated GPIO) that keeps one connection open, so a test can
//! drive hundreds of edges in the time `fieldlink sim` needs for a few. It
//! owns that connection only; it must not interpret what the agent does with
//! the edges (tests check that through MQTT and the status dump).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::DOOR_PIN;

/// How long one request may wait for its answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// One connection to `sim.sock`; one request line, one answer line.
pub struct SimSocket {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// The door's level as this client last set it (1 = released).
    door: u8,
}

impl SimSocket {
    /// Connects to `<state_dir>/sim.sock` of a running agent whose door is
    /// released (the harness's rest level).
    pub fn connect(state_dir: &Path) -> SimSocket {
        let path = state_dir.join("sim.sock");
        let stream = UnixStream::connect(&path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
        stream.set_read_timeout(Some(ANSWER_WITHIN)).expect("set a read timeout on the sim socket");
        let writer = stream.try_clone().expect("clone the sim socket");
        SimSocket { reader: BufReader::new(stream), writer, door: 1 }
    }

    /// Sends one request line and returns the answer, trimmed.
    pub fn request(&mut self, line: &str) -> String {
        writeln!(self.writer, "{line}").unwrap_or_else(|e| panic!("sim socket: send '{line}': {e}"));
        let mut answer = String::new();
        self.reader.read_line(&mut answer).unwrap_or_else(|e| panic!("sim socket: answer to '{line}': {e}"));
        assert!(!answer.is_empty(), "sim socket: the agent hung up on '{line}'");
        answer.trim().to_string()
    }

    /// `set <pin> <level>`, which must answer `ok`.
    pub fn set(&mut self, pin: &str, level: u8) {
        let line = format!("set {pin} {level}");
        let answer = self.request(&line);
        assert_eq!(answer, "ok", "sim socket: '{line}'");
    }

    /// `changes <pin>`: how often the pin's level changed (a relay's switches).
    pub fn changes(&mut self, pin: &str) -> u64 {
        let answer = self.request(&format!("changes {pin}"));
        answer.parse().unwrap_or_else(|_| panic!("sim socket: 'changes {pin}' answered '{answer}'"))
    }

    /// `get <pin>`: 0 or 1.
    pub fn get(&mut self, pin: &str) -> u8 {
        let answer = self.request(&format!("get {pin}"));
        answer.parse().unwrap_or_else(|_| panic!("sim socket: 'get {pin}' answered '{answer}'"))
    }

    /// One edge of the door: press if it is released, else release. Only for
    /// a door with `debounce = "0ms"`, where every level change is an edge.
    pub fn door_edge(&mut self) {
        self.door ^= 1;
        self.set(DOOR_PIN, self.door);
    }
}
