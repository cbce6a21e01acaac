//! Sinks that confirm deliveries later ([`Confirmations`]): a deferred item counts as delivered,
//! and its ack resolves, only once the sink confirmed it; the run waits for every confirmation
//! before it ends; a failed confirmation goes to the stage's error policy, retries included,
//! with its attempts counted across confirmations; an item dropped unconfirmed is a failure.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use pulseflow::ack::{Ack, AckOutcome, AckReport};
use pulseflow::engine::Supervision;
use pulseflow::prelude::*;
use pulseflow::stage::{Confirmations, Unconfirmed, WriteProgress};
use tokio::sync::mpsc;

type Reports = Arc<Mutex<BTreeMap<u32, AckReport>>>;

/// A source of `0..n`, each item with its own ack, reported in `reports`.
struct Acked {
    next: u32,
    n: u32,
    reports: Reports,
}

impl Source for Acked {
    type Item = u32;

    async fn produce(&mut self, out: &mut SourceOutput<u32>) -> Result<SourceStatus, StageError> {
        while !out.is_full() {
            if self.next == self.n {
                return Ok(SourceStatus::Done);
            }
            let (n, reports) = (self.next, self.reports.clone());
            self.next += 1;
            out.push_acked(
                n,
                Ack::on_resolved(move |r| {
                    reports.lock().insert(n, r);
                }),
            );
        }
        Ok(SourceStatus::More)
    }
}

/// Hands every item it writes, unconfirmed, to the test (`peer`).
struct Deferring {
    confirmations: Option<Confirmations<u32>>,
    peer: mpsc::UnboundedSender<(u32, Unconfirmed<u32>)>,
}

impl Sink for Deferring {
    type Item = u32;

    fn confirm_later(&mut self, confirmations: Confirmations<u32>) {
        self.confirmations = Some(confirmations);
    }

    async fn write(&mut self, item: Envelope<u32>) -> Result<(), ItemFailure<u32>> {
        Err(ItemFailure::new(
            item,
            StageError::msg("writes are deferred"),
        ))
    }

    async fn write_batch(
        &mut self,
        items: &mut std::vec::IntoIter<Envelope<u32>>,
        failed: &mut Vec<ItemFailure<u32>>,
        progress: &mut WriteProgress,
    ) {
        let Some(confirmations) = &self.confirmations else {
            failed.extend(items.map(|i| ItemFailure::new(i, StageError::msg("no confirmations"))));
            return;
        };
        for item in items {
            progress.current_seq = item.seq;
            let n = item.payload;
            let _ = self.peer.send((n, confirmations.defer(item, progress)));
        }
    }
}

type Peer = mpsc::UnboundedReceiver<(u32, Unconfirmed<u32>)>;

/// Starts a run of `0..n` into a [`Deferring`] sink with `policy`: its handle, the sink's
/// peer end and the acks' reports.
fn start(n: u32, policy: ErrorPolicy) -> (tokio::task::JoinHandle<PipelineResult>, Peer, Reports) {
    let reports = Reports::default();
    let (peer, sent) = mpsc::unbounded_channel();
    let mut p = PipelineBuilder::new("deferred");
    p.source(
        "src",
        Acked {
            next: 0,
            n,
            reports: reports.clone(),
        },
    )
    .sink(
        "out",
        Deferring {
            confirmations: None,
            peer,
        },
    )
    .error_policy(policy);
    let pipeline = p.build().expect("valid pipeline");
    let options = ExecutionOptions::default()
        .with_supervision(Supervision::Off)
        .with_batch_size(16);
    let run = tokio::spawn(async move { ExecutionEngine::new().run(pipeline, options).await });
    (run, sent, reports)
}

fn outcomes(reports: &Reports) -> BTreeMap<u32, AckOutcome> {
    reports
        .lock()
        .iter()
        .map(|(n, r)| (*n, r.outcome()))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_deferred_item_is_delivered_and_acknowledged_only_once_confirmed() {
    let (run, mut sent, reports) = start(40, ErrorPolicy::DeadLetter);
    let mut waiting = Vec::new();
    while waiting.len() < 40 {
        waiting.push(sent.recv().await.expect("every item is written"));
    }
    // Written, none confirmed: no ack resolved, and the run does not end (the paused clock
    // moves on while every task waits).
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(reports.lock().is_empty(), "{:?}", outcomes(&reports));
    assert!(!run.is_finished(), "the run ended with items in flight");

    for (n, unconfirmed) in waiting {
        if n % 4 == 3 {
            unconfirmed.failed(StageError::msg("not stored"));
        } else {
            unconfirmed.delivered();
        }
    }
    let result = run.await.expect("run");
    assert!(result.success, "{:?}", result.error);
    assert!(result.accounting.reconciles(), "{:?}", result.accounting);
    let out = &result.stages["out"];
    assert_eq!(
        (
            out.counts.received,
            out.counts.delivered,
            out.counts.dead_lettered
        ),
        (40, 30, 10)
    );
    let got = outcomes(&reports);
    assert_eq!(got.len(), 40);
    for (n, outcome) in got {
        let expected = if n % 4 == 3 {
            AckOutcome::DeadLettered
        } else {
            AckOutcome::Delivered
        };
        assert_eq!(outcome, expected, "item {n}");
    }
}

#[tokio::test(start_paused = true)]
async fn failed_confirmations_are_retried_through_the_sink_up_to_the_policy() {
    let (run, mut sent, reports) = start(10, ErrorPolicy::retry(2, Duration::from_millis(10)));
    // Item 0 always fails, item 1 fails once, the others are delivered at once.
    let mut writes: BTreeMap<u32, u32> = BTreeMap::new();
    let peer = async {
        while let Some((n, unconfirmed)) = sent.recv().await {
            let w = writes.entry(n).or_default();
            *w += 1;
            match (n, *w) {
                (0, _) | (1, 1) => unconfirmed.failed(StageError::msg("not stored")),
                _ => unconfirmed.delivered(),
            }
        }
    };
    let (result, ()) = tokio::join!(run, peer);
    let result = result.expect("run");
    assert!(result.accounting.reconciles(), "{:?}", result.accounting);
    // One write and two retries for item 0, then the dead letter; item 1 delivered on retry.
    assert_eq!(writes[&0], 3);
    assert_eq!(writes[&1], 2);
    assert!((2..10).all(|n| writes[&n] == 1), "{writes:?}");
    let out = &result.stages["out"];
    assert_eq!(
        (
            out.counts.delivered,
            out.counts.dead_lettered,
            out.counts.retries
        ),
        (9, 1, 3)
    );
    let got = outcomes(&reports);
    assert_eq!(got[&0], AckOutcome::DeadLettered);
    assert!((1..10).all(|n| got[&n] == AckOutcome::Delivered), "{got:?}");
}

#[tokio::test(start_paused = true)]
async fn an_item_dropped_unconfirmed_is_a_failure() {
    let (run, mut sent, reports) = start(5, ErrorPolicy::DeadLetter);
    let peer = async {
        while let Some((n, unconfirmed)) = sent.recv().await {
            if n == 2 {
                drop(unconfirmed);
            } else {
                unconfirmed.delivered();
            }
        }
    };
    let (result, ()) = tokio::join!(run, peer);
    let result = result.expect("run");
    assert!(result.accounting.reconciles(), "{:?}", result.accounting);
    let out = &result.stages["out"];
    assert_eq!((out.counts.delivered, out.counts.dead_lettered), (4, 1));
    assert!(
        out.last_error
            .as_deref()
            .is_some_and(|e| e.contains("before confirming")),
        "{:?}",
        out.last_error
    );
    assert_eq!(outcomes(&reports)[&2], AckOutcome::DeadLettered);
}
