//! What several end-to-end test files share: starting the built binary with `--admin`.

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Starts `pulseflow run --quiet --admin 0` on `config` (in `dir`) and returns the child and
/// the address its admin server reports on its first line of stderr.
pub fn run_with_admin(dir: &Path, config: &str) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pulseflow"))
        .env("NO_COLOR", "1")
        .args(["run", "--quiet", "--admin", "0", config])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut lines = std::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
    let first = lines.next().expect("a line").expect("utf-8");
    let addr = first
        .strip_prefix("admin: http://")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected: {first}"))
        .to_owned();
    // Keep reading stderr, so the child never writes to a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (child, addr)
}
