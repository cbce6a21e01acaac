//! A `nats-server -js` of the test's own: on a free loopback port, with its store in a
//! temporary directory, stopped when dropped. Without `nats-server` on PATH the test is
//! skipped with a message, unless `CI` is set: CI must run it.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running (or stopped, to be restarted) JetStream server.
pub struct NatsServer {
    binary: PathBuf,
    child: Option<Child>,
    store: tempfile::TempDir,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

/// `nats-server` on PATH (or where Debian installs it).
fn find_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
}

/// A free port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl NatsServer {
    /// A server, not started yet; `None` (with a message) when the test is to be skipped.
    pub fn new(test: &str) -> Option<Self> {
        let Some(binary) = find_binary() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "{test}: nats-server not found on PATH, and CI must run the NATS tests"
            );
            // Straight to stderr, past the test harness's capture: a skip must be seen.
            let _ = writeln!(
                std::io::stderr(),
                "{test}: skipped: nats-server not found (install the nats-server package)"
            );
            return None;
        };
        Some(Self {
            binary,
            child: None,
            store: tempfile::tempdir().expect("tempdir"),
            port: free_port(),
        })
    }

    /// A started server; `None` when the test is to be skipped.
    pub fn start(test: &str) -> Option<Self> {
        let mut server = Self::new(test)?;
        server.up();
        Some(server)
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts it (again, with the same store) and waits until it accepts connections.
    pub fn up(&mut self) {
        let child = Command::new(&self.binary)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.store.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen in time"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it (SIGKILL) and waits until it is gone.
    pub fn down(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.down();
    }
}
