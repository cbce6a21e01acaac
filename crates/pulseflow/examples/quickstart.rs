//! Processes a generated stream of one million order lines and prints every stage's counts.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```
//!
//! The pipeline parses text lines (a few are malformed and go to the dead-letter report),
//! drops cancelled orders, routes large orders and small ones to different sinks, and shows
//! that every line is accounted for.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use pulseflow::prelude::*;

#[derive(Debug, Clone)]
struct Order {
    customer: u32,
    cents: u64,
    cancelled: bool,
}

fn parse(line: &String) -> Result<Order, String> {
    let mut fields = line.split(',');
    let mut next = |name: &str| {
        fields
            .next()
            .ok_or_else(|| format!("missing field `{name}` in {line:?}"))
    };
    let customer = next("customer")?
        .parse()
        .map_err(|e| format!("bad customer in {line:?}: {e}"))?;
    let cents = next("cents")?
        .parse()
        .map_err(|e| format!("bad amount in {line:?}: {e}"))?;
    let cancelled = next("status")? == "cancelled";
    Ok(Order {
        customer,
        cents,
        cancelled,
    })
}

fn generate(i: u64) -> String {
    if i % 10_007 == 0 {
        return format!("{i},not-a-number,open");
    }
    let status = if i % 9 == 0 { "cancelled" } else { "open" };
    format!("{},{},{}", i % 5_000, (i * 7_919) % 100_000, status)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let large_total = Arc::new(AtomicU64::new(0));
    let small_count = Arc::new(AtomicU64::new(0));
    let (large, small) = (large_total.clone(), small_count.clone());

    let mut p = PipelineBuilder::new("quickstart");
    let orders = p
        .source("lines", sources::iter((0..1_000_000u64).map(generate)))
        .try_map("parse", parse)
        .filter("open-only", |o: &Order| !o.cancelled);
    let mut by_size = orders.branch(
        "by-size",
        Routes::new()
            .route("large", |o: &Order| o.cents >= 50_000)
            .unmatched("small"),
    );
    by_size
        .take("large")
        .ok_or("route `large` missing")?
        .map("cents", |o: Order| o.cents)
        .sink(
            "large-total",
            sink_fn(move |cents: u64| {
                large.fetch_add(cents, Ordering::Relaxed);
            }),
        );
    by_size
        .take("small")
        .ok_or("route `small` missing")?
        .map("customer", |o: Order| o.customer)
        .sink(
            "small-count",
            sink_fn(move |_customer: u32| {
                small.fetch_add(1, Ordering::Relaxed);
            }),
        );

    let pipeline = p.build()?;
    let result = ExecutionEngine::new()
        .run(pipeline, ExecutionOptions::default())
        .await;

    println!(
        "{:<12} {:<10} {:>9} {:>9} {:>9} {:>8} {:>6} {:>9}",
        "stage", "kind", "in", "out", "filtered", "dropped", "dead", "status"
    );
    let mut stages: Vec<_> = result.stages.values().collect();
    stages.sort_by_key(|s| order_of(&s.stage_id));
    for s in stages {
        let c = &s.counts;
        println!(
            "{:<12} {:<10} {:>9} {:>9} {:>9} {:>8} {:>6} {:>9}",
            s.stage_id,
            s.kind.as_str(),
            c.received + c.ingested,
            c.emitted + c.delivered,
            c.filtered,
            c.dropped_total() + s.input.as_ref().map_or(0, |e| e.dropped_total()),
            c.dead_lettered,
            s.status.as_str(),
        );
    }
    let a = result.accounting;
    println!(
        "\nin {} = delivered {} + filtered {} + dropped {} + dead-lettered {}  ({})",
        a.items_in(),
        a.delivered,
        a.filtered,
        a.dropped,
        a.dead_lettered,
        if a.reconciles() {
            "reconciled"
        } else {
            "NOT reconciled"
        }
    );
    if let Some(first) = result.dead_letters.first() {
        println!(
            "first dead letter: stage `{}`, item {}: {}",
            first.stage, first.seq, first.error
        );
    }
    println!(
        "large orders total {} cents; {} small orders; {:.0} ms",
        large_total.load(Ordering::Relaxed),
        small_count.load(Ordering::Relaxed),
        result.duration.as_secs_f64() * 1000.0
    );
    match result.error {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

fn order_of(id: &str) -> usize {
    [
        "lines",
        "parse",
        "open-only",
        "by-size",
        "cents",
        "large-total",
        "customer",
        "small-count",
    ]
    .iter()
    .position(|s| *s == id)
    .unwrap_or(usize::MAX)
}
