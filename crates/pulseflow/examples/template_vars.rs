//! Collects template variables per subject and emits each subject once every required variable
//! arrived. Subjects that stop receiving variables expire after a TTL and are flushed
//! partially, naming the variables they miss.
//!
//! Run with `cargo run -p pulseflow --example template_vars`.

use std::time::Duration;

use futures::StreamExt;
use pulseflow::accumulate::{AccumulatorPolicy, TemplateResult, TemplateVar, TemplateVars};
use pulseflow::prelude::*;

#[tokio::main]
async fn main() {
    let early = vec![
        TemplateVar::new("alice", "name", "Alice"),
        TemplateVar::new("bob", "name", "Bob"),
        TemplateVar::new("alice", "email", "alice@example.org"),
        TemplateVar::new("bob", "plan", "pro"),
        TemplateVar::new("alice", "plan", "free"),
    ];
    let late = vec![
        TemplateVar::new("carol", "name", "Carol"),
        TemplateVar::new("carol", "email", "carol@example.org"),
        TemplateVar::new("carol", "plan", "team"),
    ];
    // Bob's email never comes: after the pause his TTL has run out.
    let pause = futures::stream::once(tokio::time::sleep(Duration::from_millis(300)))
        .filter_map(|()| async { None });
    let items = futures::stream::iter(early)
        .chain(pause)
        .chain(futures::stream::iter(late));

    let mut p = PipelineBuilder::new("template-vars");
    let (sink, collected) = sinks::collect::<TemplateResult>();
    p.source("vars", sources::stream(Box::pin(items)))
        .accumulate(
            "per-subject",
            TemplateVars::new(["name", "email", "plan"]),
            AccumulatorPolicy::default()
                .with_completeness_ttl(Duration::from_millis(100))
                .with_partial_flush(true),
        )
        .sink("out", sink);
    let result = ExecutionEngine::new()
        .run(
            p.build().expect("a valid pipeline"),
            ExecutionOptions::default(),
        )
        .await;
    assert!(result.success, "{:?}", result.error);
    assert!(result.accounting.reconciles());

    for env in collected.take() {
        let score = env.header("acc.completeness").unwrap_or("?").to_owned();
        let r = env.payload;
        if r.is_complete() {
            println!("{}: complete {:?}", r.subject, r.values);
        } else {
            println!(
                "{}: partial (completeness {score}), missing {:?}, have {:?}",
                r.subject, r.missing, r.values
            );
        }
    }
}
