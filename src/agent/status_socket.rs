//! The status socket `<state_dir>/status.sock`, server and client: how
//! `fieldlink status` gets a dump even when `status.json` cannot be written
//! (a full or read-only disk). Bound when the agent starts, while there is
//! room for its inode, it needs no disk space to answer. It owns the socket
//! file and the protocol; what a dump holds and how it is taken belong to
//! `status` and `status_dump`. It must not answer with anything but a dump.
//!
//! # Protocol
//!
//! ```text
//! client connects and sends nothing
//! agent takes a dump (which writes status.json and logs the summary), then
//! answers and closes the connection:
//!   written\n<dump>                 status.json holds the same bytes
//!   unwritten <why>\n<dump>         status.json could not be written: <why>
//!   failed <why>\n                  no dump could be rendered
//! ```
//!
//! `<dump>` is the pretty JSON of `status.json`; `<why>` is one line.
//!
//! The socket is bound before the pid file is written (a client that finds
//! the pid file finds the socket, and a connection made before the server
//! thread runs waits in the backlog) and is mode 0600: like SIGUSR1, only
//! the agent's user and root can ask. SIGUSR1 keeps working as before.
//!
//! # Threads
//!
//! One tokio task on the agent's runtime accepts one connection at a time;
//! each dump is taken and answered on tokio's blocking pool (it reads the
//! outbox and fsyncs), and the task waits for it before it accepts the next
//! connection. So dumps never run on the actors' thread, a client that
//! floods the socket gets one dump at a time, and no thread exists for the
//! socket while nobody asks. Dropping [`StatusSocket`] stops the task and
//! removes the socket file.

use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::AbortHandle;

use super::status_dump::{DumpError, Dumped};

/// How long the server waits for a slow client to take its answer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("cannot bind the status socket '{}': {source}", path.display())]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot serve the status socket: {0}")]
    Serve(io::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the agent answered on the status socket with '{0}', not a dump")]
    Garbled(String),
    #[error("the agent could not render a status dump: {0}")]
    Failed(String),
}

/// A dump as a client receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub dump: String,
    /// Why `status.json` does not hold this dump, if it does not.
    pub unwritten: Option<String>,
}

/// The bound socket; serves once [`StatusSocket::serve`] is called.
pub struct StatusSocket {
    path: PathBuf,
    listener: Option<UnixListener>,
    task: Option<AbortHandle>,
}

impl StatusSocket {
    /// Binds `path`, replacing a socket file left by an agent that died.
    pub fn bind(path: &Path) -> Result<StatusSocket, SocketError> {
        let bind_error = |source| SocketError::Bind { path: path.to_path_buf(), source };
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_error(e)),
        }
        let listener = UnixListener::bind(path).map_err(bind_error)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_error)?;
        Ok(StatusSocket { path: path.to_path_buf(), listener: Some(listener), task: None })
    }

    /// Starts answering each connection with `dump()`, on the tokio runtime
    /// this is called in (it must be called inside one).
    pub fn serve<F>(&mut self, dump: F) -> Result<(), SocketError>
    where
        F: Fn() -> Result<Dumped, DumpError> + Send + Sync + 'static,
    {
        let Some(listener) = self.listener.take() else { return Ok(()) };
        listener.set_nonblocking(true).map_err(SocketError::Serve)?;
        let listener = tokio::net::UnixListener::from_std(listener).map_err(SocketError::Serve)?;
        self.task = Some(tokio::spawn(accept(listener, Arc::new(dump))).abort_handle());
        Ok(())
    }
}

impl Drop for StatusSocket {
    fn drop(&mut self) {
        // The listener closes with the task, the next time the runtime
        // turns or when it is dropped; nobody finds the path meanwhile.
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::debug!(error = %e, "status socket: cannot remove '{}'", self.path.display());
        }
    }
}

async fn accept<F>(listener: tokio::net::UnixListener, dump: Arc<F>)
where
    F: Fn() -> Result<Dumped, DumpError> + Send + Sync + 'static,
{
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("status socket: accept failed: {e}");
                // accept() fails at once on e.g. EMFILE: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let dump = dump.clone();
        // The dump and the (blocking, bounded) write of the answer.
        let answered = tokio::task::spawn_blocking(move || {
            let stream = stream.into_std()?;
            stream.set_nonblocking(false)?;
            answer(stream, dump())
        })
        .await;
        match answered {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!("status socket: the client did not take its answer: {e}"),
            // A panic ends the process (the agent's hook); a runtime
            // shutting down ends this task too.
            Err(e) => tracing::debug!("status socket: the dump did not finish: {e}"),
        }
    }
}

fn answer(mut stream: UnixStream, dumped: Result<Dumped, DumpError>) -> io::Result<()> {
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let one_line = |e: &dyn std::fmt::Display| e.to_string().replace('\n', " ");
    match dumped {
        Ok(Dumped { json, unwritten: None }) => {
            stream.write_all(b"written\n")?;
            stream.write_all(&json)
        }
        Ok(Dumped { json, unwritten: Some(e) }) => {
            stream.write_all(format!("unwritten {}\n", one_line(&e)).as_bytes())?;
            stream.write_all(&json)
        }
        Err(e) => stream.write_all(format!("failed {}\n", one_line(&e)).as_bytes()),
    }
}

/// Asks the agent listening on `path` for a dump, waiting at most `timeout`
/// for each read. `NotFound` and `ConnectionRefused` mean no agent listens.
pub fn request(path: &Path, timeout: Duration) -> Result<Answer, SocketError> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    parse(&text)
}

fn parse(text: &str) -> Result<Answer, SocketError> {
    let (head, dump) = text.split_once('\n').unwrap_or((text, ""));
    let garbled = || SocketError::Garbled(head.chars().take(80).collect());
    let (word, why) = head.split_once(' ').unwrap_or((head, ""));
    match word {
        "written" if !dump.is_empty() => Ok(Answer { dump: dump.to_string(), unwritten: None }),
        "unwritten" if !dump.is_empty() => Ok(Answer { dump: dump.to_string(), unwritten: Some(why.to_string()) }),
        "failed" => Err(SocketError::Failed(why.to_string())),
        _ => Err(garbled()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A runtime whose worker serves the socket while the test's thread
    /// plays the (blocking) client.
    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime")
    }

    fn dumped(unwritten: Option<DumpError>) -> Result<Dumped, DumpError> {
        Ok(Dumped { json: b"{\n  \"device\": \"pi\"\n}".to_vec(), unwritten })
    }

    #[test]
    fn a_client_gets_the_dump_and_hears_when_status_json_could_not_be_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("status.sock");
        let rt = runtime();
        let _in_rt = rt.enter();
        let mut sock = StatusSocket::bind(&path).expect("bind");
        let full = || io::Error::from_raw_os_error(28);
        sock.serve(move || dumped(Some(DumpError::Write { path: "state/status.json".into(), source: full() })))
            .expect("serve");
        let a = request(&path, Duration::from_secs(30)).expect("an answer");
        assert_eq!(a.dump, "{\n  \"device\": \"pi\"\n}");
        let why = a.unwritten.expect("the failed write is reported");
        assert!(why.contains("state/status.json") && why.contains("os error 28"), "{why}");
        // Every connection gets its own dump.
        assert!(request(&path, Duration::from_secs(30)).is_ok());
    }

    #[test]
    fn a_written_dump_is_answered_without_a_warning() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("status.sock");
        let rt = runtime();
        let _in_rt = rt.enter();
        let mut sock = StatusSocket::bind(&path).expect("bind");
        sock.serve(|| dumped(None)).expect("serve");
        assert_eq!(request(&path, Duration::from_secs(30)).expect("an answer").unwritten, None);
    }

    #[test]
    fn the_socket_replaces_a_stale_file_is_private_and_is_removed_when_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("status.sock");
        drop(UnixListener::bind(&path).expect("a stale socket"));
        let rt = runtime();
        let _in_rt = rt.enter();
        let mut sock = StatusSocket::bind(&path).expect("bind over a stale socket file");
        sock.serve(|| dumped(None)).expect("serve");
        let mode = std::fs::metadata(&path).expect("socket file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(sock);
        assert!(!path.exists(), "the socket file is removed");
        let e = request(&path, Duration::from_secs(1)).expect_err("nobody listens");
        assert!(matches!(&e, SocketError::Io(io) if io.kind() == io::ErrorKind::NotFound), "{e}");
    }

    #[test]
    fn anything_but_a_dump_is_an_error_quoting_what_came() {
        assert!(matches!(parse("failed serde broke\n"), Err(SocketError::Failed(w)) if w == "serde broke"));
        let e = parse("hello there\n{}").expect_err("not a dump");
        assert!(e.to_string().contains("'hello there'"), "{e}");
        assert!(parse("written\n").is_err(), "a header without a dump is not an answer");
    }
}
