//! The live page in a real browser: `pulseflow run --admin` serves `/`, headless Chromium
//! (Debian's `chromium`) loads it and runs its script, and the page must name every stage and
//! show a counter that moves between two looks. A screenshot is kept under the target
//! directory (`tmp/browser/page.png`).
//!
//! Without Chromium the test is skipped with a message, unless `CI` is set: then it fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const CONFIG: &str = r#"
[sources.ticks]
type = "generate"
count = 1000000
rate = 500.0
jq = '{n: ., user: (. % 7)}'

[transforms.odd_ones]
type = "filter"
inputs = ["ticks"]
condition = ".n % 2 == 1"

[transforms.by_user]
type = "route"
inputs = ["odd_ones"]
routes = { first = ".user == 1" }

[sinks.firsts]
type = "blackhole"
inputs = ["by_user.first"]

[sinks.others]
type = "blackhole"
inputs = ["by_user._unmatched"]
"#;

/// The browser, when it is installed.
fn chromium() -> Option<&'static str> {
    let works = |name: &str| {
        Command::new(name)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    ["chromium", "chromium-browser"]
        .into_iter()
        .find(|n| works(n))
}

/// Runs `command` for at most `limit`.
fn output_within(mut command: Command, limit: Duration) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromium starts");
    let started = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("chromium took more than {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

/// Headless Chromium on `url` with a profile of its own in `profile`, letting the page's
/// script run for 2.5 s of its time, with `extra` flags (what to produce).
fn browse(browser: &str, profile: &Path, url: &str, extra: &[String]) -> Output {
    let mut c = Command::new(browser);
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--virtual-time-budget=2500",
        "--window-size=1400,600",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(extra)
    .arg(url)
    .stdin(Stdio::null());
    output_within(c, Duration::from_secs(120))
}

/// The number after `out ` in the figures line of `stage`'s box.
fn out_count(dom: &str, stage: &str) -> Option<u64> {
    let start = dom.find(&format!("data-stage=\"{stage}\""))?;
    let rest = &dom[start..];
    let figures = &rest[rest.find("class=\"rate\"")?..];
    let after = &figures[figures.find("out ")? + 4..];
    after
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[test]
fn the_live_page_names_every_stage_and_its_counters_move() {
    let Some(browser) = chromium() else {
        if std::env::var_os("CI").is_some() {
            panic!(
                "CI is set but chromium is not installed (apt-get install chromium chromium-driver)"
            );
        }
        eprintln!(
            "skipped: the live page test needs Chromium (Debian: apt-get install chromium chromium-driver)"
        );
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(tmp.path().join("p.toml"), CONFIG).expect("write");
    let (mut child, addr) = common::run_with_admin(tmp.path(), "p.toml");
    let url = format!("http://{addr}/");
    let stages: Vec<String> = {
        let graph = Command::new(env!("CARGO_BIN_EXE_pulseflow"))
            .args(["graph", "p.toml", "--format", "mermaid"])
            .current_dir(tmp.path())
            .output()
            .expect("graph");
        // Lines like `n0["ticks<br/>source"]`: the stage names.
        String::from_utf8_lossy(&graph.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with('n') && l[1..].starts_with(|c: char| c.is_ascii_digit()))
            .filter_map(|l| l.split("[\"").nth(1)?.split("<br/>").next())
            .map(str::to_owned)
            .collect()
    };
    assert!(stages.len() >= 6, "{stages:?}");
    let look = |n: usize| {
        let profile = tmp.path().join(format!("profile-{n}"));
        let out = browse(browser, &profile, &url, &["--dump-dom".to_owned()]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let first = look(1);
    for stage in &stages {
        assert!(
            first.contains(&format!("data-stage=\"{stage}\""))
                && first.contains(&format!(">{stage}<")),
            "{stage} is not on the page:\n{first}"
        );
    }
    let before = out_count(&first, "ticks").unwrap_or_else(|| panic!("no counter:\n{first}"));
    std::thread::sleep(Duration::from_millis(1500));
    let second = look(2);
    let after = out_count(&second, "ticks").unwrap_or_else(|| panic!("no counter:\n{second}"));
    assert!(
        after > before,
        "the counter did not move: {before} then {after}"
    );

    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&shots).expect("artifact directory");
    let shot = shots.join("page.png");
    let _ = std::fs::remove_file(&shot);
    browse(
        browser,
        &tmp.path().join("profile-3"),
        &url,
        &[format!("--screenshot={}", shot.display())],
    );
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("{}: {e}", shot.display()));
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    eprintln!("screenshot: {}", shot.display());
    let _ = child.kill();
    let _ = child.wait();
}
