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
    for env in collect_templates(sample_stream()).await {
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

/// Variables for three subjects: Alice's and Carol's all arrive; Bob's email never comes, and
/// a pause longer than the TTL follows his last variable.
fn sample_stream() -> impl futures::Stream<Item = TemplateVar> + Send + Unpin + 'static {
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
    let pause = futures::stream::once(tokio::time::sleep(Duration::from_millis(300)))
        .filter_map(|()| async { None });
    Box::pin(
        futures::stream::iter(early)
            .chain(pause)
            .chain(futures::stream::iter(late)),
    )
}

/// Runs the pipeline: per subject, collect `name`, `email` and `plan`; a subject silent for
/// 100 ms is flushed partially, naming what it misses.
async fn collect_templates(
    items: impl futures::Stream<Item = TemplateVar> + Send + Unpin + 'static,
) -> Vec<Envelope<TemplateResult>> {
    let mut p = PipelineBuilder::new("template-vars");
    let (sink, collected) = sinks::collect::<TemplateResult>();
    p.source("vars", sources::stream(items))
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
    collected.take()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Paused clock: the 300 ms pause and the 100 ms TTL pass at once, in order.
    #[tokio::test(start_paused = true)]
    async fn complete_and_partial_results() {
        let out = collect_templates(sample_stream()).await;
        let by_subject = |s: &str| {
            out.iter()
                .find(|e| e.payload.subject == s)
                .unwrap_or_else(|| panic!("no output for {s}: {out:?}"))
        };
        assert_eq!(out.len(), 3, "{out:?}");
        for subject in ["alice", "carol"] {
            let e = by_subject(subject);
            assert!(e.payload.is_complete(), "{:?}", e.payload);
            assert_eq!(e.payload.values.len(), 3);
            assert_eq!(e.header("acc.completeness"), Some("1.000"));
        }
        assert_eq!(
            by_subject("alice")
                .payload
                .values
                .get("email")
                .map(String::as_str),
            Some("alice@example.org")
        );
        let bob = by_subject("bob");
        assert_eq!(bob.payload.missing, vec!["email".to_owned()]);
        assert_eq!(
            bob.payload.values.get("plan").map(String::as_str),
            Some("pro")
        );
        assert_eq!(bob.header("acc.completeness"), Some("0.667"));
        // Bob's partial result comes out on his TTL, before Carol (who arrives after the
        // pause) completes.
        let pos = |s: &str| out.iter().position(|e| e.payload.subject == s);
        assert!(pos("bob") < pos("carol"), "{out:?}");
    }
}
