//! `pulseflow`: run pipelines described in configuration files.
//!
//! The configuration-driven commands (`run`, `validate`, `graph`, `top`) build on the engine in
//! the `pulseflow` crate; until they land this binary only reports its version.

fn main() {
    let version = env!("CARGO_PKG_VERSION");
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("--version" | "-V") => println!("pulseflow {version}"),
        _ => {
            eprintln!("pulseflow {version}: configuration-driven commands are not available yet");
            std::process::exit(2);
        }
    }
}
