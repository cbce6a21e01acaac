//! Property test of the conservation law: for random graphs of map / filter / try_map /
//! branch / merge with random buffers, drop policies, error policies, parallelism, failures
//! and panics, every run ends with `in = delivered + filtered + dropped + dead_lettered`,
//! every stage and edge balances on its own, and sinks received exactly what was counted.
//! Every item carries an ack: each resolves exactly once, and what the acks report matches
//! the accounting.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use proptest::prelude::*;
use pulseflow::ack::{Ack, AckReport};
use pulseflow::prelude::*;

/// Items `0..n`, each pushed with an ack whose report is collected.
struct Acked {
    items: std::ops::Range<u32>,
    reports: Arc<Mutex<Vec<AckReport>>>,
}

impl Source for Acked {
    type Item = u32;

    async fn produce(&mut self, out: &mut SourceOutput<u32>) -> Result<SourceStatus, StageError> {
        while !out.is_full() {
            let Some(n) = self.items.next() else {
                return Ok(SourceStatus::Done);
            };
            let reports = self.reports.clone();
            out.push_acked(n, Ack::on_resolved(move |r| reports.lock().push(r)));
        }
        Ok(SourceStatus::More)
    }
}

#[derive(Debug, Clone)]
enum Op {
    Map {
        add: u32,
        panic_on: Option<u32>,
    },
    Filter {
        modulo: u32,
    },
    TryMap {
        fail_modulo: u32,
        panic_on: Option<u32>,
    },
    Branch {
        modulo: u32,
        overlap: bool,
        unmatched: bool,
    },
    Merge,
}

#[derive(Debug, Clone)]
struct Settings {
    buffer: Option<(usize, DropPolicy)>,
    policy: ErrorPolicy,
    workers: usize,
    ordered: bool,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u32..5, prop::option::weighted(0.2, 1u32..60))
            .prop_map(|(add, panic_on)| Op::Map { add, panic_on }),
        (2u32..6).prop_map(|modulo| Op::Filter { modulo }),
        (3u32..9, prop::option::weighted(0.2, 1u32..60)).prop_map(|(fail_modulo, panic_on)| {
            Op::TryMap {
                fail_modulo,
                panic_on,
            }
        }),
        (2u32..4, any::<bool>(), any::<bool>()).prop_map(|(modulo, overlap, unmatched)| {
            Op::Branch {
                modulo,
                overlap,
                unmatched,
            }
        }),
        Just(Op::Merge),
    ]
}

fn settings() -> impl Strategy<Value = Settings> {
    let drop_policy = prop_oneof![
        Just(DropPolicy::Block),
        Just(DropPolicy::DropOldest),
        Just(DropPolicy::DropNewest)
    ];
    let policy = prop_oneof![
        4 => Just(ErrorPolicy::DeadLetter),
        2 => Just(ErrorPolicy::Ignore),
        2 => Just(ErrorPolicy::retry(2, Duration::from_millis(5))),
        1 => Just(ErrorPolicy::Fail),
    ];
    (
        prop::option::weighted(0.5, (1usize..40, drop_policy)),
        policy,
        1usize..4,
        any::<bool>(),
    )
        .prop_map(|(buffer, policy, workers, ordered)| Settings {
            buffer,
            policy,
            workers,
            ordered,
        })
}

fn configure(stream: Stream<u32>, s: &Settings, parallel_ok: bool) -> Stream<u32> {
    let mut stream = stream.error_policy(s.policy);
    if let Some((capacity, drop_policy)) = s.buffer {
        stream = stream.buffer(BufferPolicy::new(capacity, drop_policy));
    }
    if parallel_ok && s.workers > 1 {
        stream = stream.parallelism(ParallelismHint::Fixed(s.workers));
        if s.ordered {
            stream = stream.ordered();
        }
    }
    stream
}

/// Builds the pipeline; returns it with the handles of its sinks.
fn build(
    items: u32,
    ops: &[(Op, Settings, usize)],
    reports: &Arc<Mutex<Vec<AckReport>>>,
) -> (Pipeline, Vec<sinks::Collected<u32>>) {
    let mut p = PipelineBuilder::new("prop");
    let source = Acked {
        items: 0..items,
        reports: reports.clone(),
    };
    let mut streams = vec![p.source("src", source)];
    for (i, (op, s, pick)) in ops.iter().enumerate() {
        let at = pick % streams.len();
        let input = streams.swap_remove(at);
        let id = format!("s{i}");
        match op.clone() {
            Op::Map { add, panic_on } => {
                let m = input.map(id, move |x: u32| {
                    assert!(Some(x) != panic_on, "boom at {x}");
                    x.wrapping_add(add)
                });
                streams.push(configure(m, s, true));
            }
            Op::Filter { modulo } => {
                let f = input.filter(id, move |x: &u32| x % modulo != 0);
                streams.push(configure(f, s, true));
            }
            Op::TryMap {
                fail_modulo,
                panic_on,
            } => {
                let t = input.try_map(id, move |x: &u32| {
                    assert!(Some(*x) != panic_on, "boom at {x}");
                    if x % fail_modulo == 0 {
                        Err("unlucky")
                    } else {
                        Ok(x + 1)
                    }
                });
                streams.push(configure(t, s, true));
            }
            Op::Branch {
                modulo,
                overlap,
                unmatched,
            } => {
                let mut routes = Routes::new()
                    .route("a", move |x: &u32| x % modulo == 0)
                    .route(
                        "b",
                        move |x: &u32| if overlap { x % 2 == 0 } else { x % modulo == 1 },
                    );
                if unmatched {
                    routes = routes.unmatched("rest");
                }
                streams.extend(input.branch(id, routes).into_streams());
            }
            Op::Merge => {
                if streams.is_empty() {
                    streams.push(input);
                } else {
                    let other = streams.swap_remove(0);
                    streams.push(input.merge(id, [other]));
                }
            }
        }
    }
    let mut collected = Vec::new();
    for (i, stream) in streams.into_iter().enumerate() {
        let (sink, got) = sinks::collect();
        stream.sink(format!("sink{i}"), sink);
        collected.push(got);
    }
    (p.build().expect("generated graphs are valid"), collected)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn every_item_is_accounted_for(
        items in 0u32..600,
        batch in 1usize..100,
        ops in prop::collection::vec((op(), settings(), any::<usize>()), 0..8),
    ) {
        let reports = Arc::new(Mutex::new(Vec::new()));
        let (pipeline, collected) = build(items, &ops, &reports);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime");
        let result = runtime.block_on(
            ExecutionEngine::new().run(
                pipeline,
                ExecutionOptions::default()
                    .with_batch_size(batch)
                    .with_supervision(pulseflow::engine::Supervision::Off),
            ),
        );
        let a = result.accounting;
        prop_assert!(a.reconciles(), "{:?} error {:?}", a, result.error);
        prop_assert!(result.unbalanced_stages().is_empty(), "{:?}", result.unbalanced_stages());
        let received: usize = collected.iter().map(sinks::Collected::len).sum();
        prop_assert_eq!(received as u64, a.delivered);
        prop_assert_eq!(a.ingested, u64::from(items).min(a.ingested));
        // Every ack resolved, once; sinks' deliveries are exact, and so are drops and dead
        // letters unless an item was lost in a panic inside a batch (then every ack of its
        // batch learns of the failure: reported at least as bad as it was).
        // (The collecting sinks keep the envelopes, and with them the acks: let them go.)
        drop(collected);
        let reports = std::mem::take(&mut *reports.lock());
        prop_assert_eq!(reports.len() as u64, a.ingested);
        let sum = |f: fn(&AckReport) -> u64| reports.iter().map(f).sum::<u64>();
        prop_assert_eq!(sum(|r| r.delivered), a.delivered);
        let panics = ops.iter().any(|(op, _, _)| matches!(
            op,
            Op::Map { panic_on: Some(_), .. } | Op::TryMap { panic_on: Some(_), .. }
        ));
        if panics {
            prop_assert!(
                sum(|r| r.dead_lettered + r.dropped + r.failed) >= a.dead_lettered + a.dropped
            );
        } else {
            prop_assert_eq!(sum(|r| r.dead_lettered), a.dead_lettered);
            prop_assert_eq!(sum(|r| r.dropped + r.failed), a.dropped);
        }
        match &result.error {
            None => {
                prop_assert!(result.success);
                prop_assert_eq!(a.ingested, u64::from(items));
            }
            Some(PipelineError::Item { .. }) => {
                prop_assert!(ops.iter().any(|(_, s, _)| s.policy == ErrorPolicy::Fail));
            }
            Some(other) => prop_assert!(false, "unexpected error {other}"),
        }
    }
}
