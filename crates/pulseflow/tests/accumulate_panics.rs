//! A panic in user accumulator code (key, create, update, check, flush, encode, decode) is an
//! error of the item being processed, handled by the stage's error policy: dead-lettered with
//! the panic message (and the payload when the stage still has it), ending the run under
//! `Fail`, counted under `Ignore`. Every item stays accounted for.

use pulseflow::accumulate::{
    Accumulator, AccumulatorPolicy, AccumulatorState, CompletenessResult, SpillError,
};
use pulseflow::engine::Supervision;
use pulseflow::memory::MemoryBudget;
use pulseflow::prelude::*;

/// Where [`Panicky`] panics.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Site {
    Key,
    Create,
    Update,
    /// `state_size` of the bad key's state after its first item, the second time it is
    /// asked: that is before the key's second update, which has not taken its item yet.
    StateSize,
    Check,
    Flush,
    Encode,
    Decode,
}

/// Count and sum per key (complete at 4 items) that panics at `site` for key `bad`. For
/// `Key`, `Update` and `Check` only on the item whose value is `at`.
#[derive(Clone)]
struct Panicky {
    site: Site,
    bad: u32,
    at: u64,
    /// Times `state_size` saw the bad key's state after its first item.
    sized: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

impl Default for Panicky {
    fn default() -> Self {
        Self {
            site: Site::Key,
            bad: u32::MAX,
            at: u64::MAX,
            sized: Default::default(),
        }
    }
}

impl Panicky {
    fn boom(&self, site: Site, key: u32) {
        if self.site == site && key == self.bad {
            panic!("{site:?} of key {key}");
        }
    }
}

impl Accumulator for Panicky {
    type In = (u32, u64);
    type Out = (u32, u64, u64);
    type Key = u32;
    type State = (u64, u64);

    fn key(&self, item: &Envelope<(u32, u64)>) -> u32 {
        if item.payload.1 == self.at {
            self.boom(Site::Key, item.payload.0);
        }
        item.payload.0
    }

    fn create(&mut self, key: &u32) -> (u64, u64) {
        self.boom(Site::Create, *key);
        (0, 0)
    }

    fn update(&mut self, state: &mut (u64, u64), item: Envelope<(u32, u64)>) {
        state.0 += 1;
        state.1 += item.payload.1;
        if item.payload.1 == self.at {
            self.boom(Site::Update, item.payload.0);
        }
    }

    fn state_size(&self, state: &(u64, u64)) -> usize {
        if self.site == Site::StateSize
            && *state == (1, u64::from(self.bad))
            && self
                .sized
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                == 1
        {
            panic!("StateSize of key {}", self.bad);
        }
        std::mem::size_of::<(u64, u64)>()
    }

    fn check(
        &mut self,
        e: &mut AccumulatorState<u32, (u64, u64)>,
    ) -> CompletenessResult<Self::Out> {
        if e.last_seq == self.at {
            self.boom(Site::Check, e.key);
        }
        if e.items >= 4 {
            CompletenessResult::Complete((e.key, e.state.0, e.state.1))
        } else {
            CompletenessResult::Incomplete
        }
    }

    fn flush(&mut self, e: AccumulatorState<u32, (u64, u64)>) -> Option<Self::Out> {
        self.boom(Site::Flush, e.key);
        Some((e.key, e.state.0, e.state.1))
    }

    fn encode(
        &self,
        entry: &AccumulatorState<u32, (u64, u64)>,
        out: &mut Vec<u8>,
    ) -> Result<(), SpillError> {
        self.boom(Site::Encode, entry.key);
        out.extend_from_slice(&entry.key.to_le_bytes());
        postcard::to_extend(entry, std::mem::take(out))
            .map(|bytes| *out = bytes)
            .map_err(|e| SpillError::Encode(e.to_string()))
    }

    fn decode(&self, bytes: &[u8]) -> Result<AccumulatorState<u32, (u64, u64)>, String> {
        let key = bytes
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .ok_or("short record")?;
        self.boom(Site::Decode, key);
        postcard::from_bytes(&bytes[4..]).map_err(|e| e.to_string())
    }
}

/// Keys 0..10, 4 items each (values are the item's sequence number): key `k` gets items
/// `k, k + 10, k + 20, k + 30`; then key 10 gets two items (40, 41) and is still incomplete
/// at the end of input.
fn items() -> Vec<(u32, u64)> {
    (0..40u64)
        .map(|i| ((i % 10) as u32, i))
        .chain([(10, 40), (10, 41)])
        .collect()
}

struct Outcome {
    out: Vec<(u32, u64, u64)>,
    result: PipelineResult,
}

fn run(acc: Panicky, policy: ErrorPolicy, budget: Option<u64>, workers: usize) -> Outcome {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut p = PipelineBuilder::new("panics");
        let (sink, got) = sinks::collect();
        let acc_policy = AccumulatorPolicy::default()
            .with_partial_flush(true)
            .with_spill(budget.is_some());
        let stream = p.source("in", sources::iter(items()));
        let stream = if workers > 1 {
            stream
                .accumulate_with("acc", move || acc.clone(), acc_policy)
                .parallelism(ParallelismHint::Fixed(workers))
        } else {
            stream.accumulate("acc", acc, acc_policy)
        };
        stream.error_policy(policy).sink("out", sink);
        let mut options = ExecutionOptions::default()
            .with_supervision(Supervision::Off)
            .with_batch_size(3);
        if let Some(b) = budget {
            options = options.with_memory_budget(MemoryBudget::new(b));
        }
        let result = ExecutionEngine::new()
            .run(p.build().expect("valid"), options)
            .await;
        let mut out = got.items();
        out.sort_unstable();
        Outcome { out, result }
    })
}

fn checked(r: &PipelineResult) {
    assert!(r.accounting.reconciles(), "{:?}", r.accounting);
    assert!(
        r.unbalanced_stages().is_empty(),
        "{:?}",
        r.unbalanced_stages()
    );
}

/// What every key but `bad` emits: keys 0..10 complete with their four items, key 10
/// flushed at the end with two.
fn all_but(bad: u32) -> Vec<(u32, u64, u64)> {
    (0..10u32)
        .map(|k| (k, 4, 4 * u64::from(k) + 60))
        .chain([(10, 2, 81)])
        .filter(|(k, _, _)| *k != bad)
        .collect()
}

#[test]
fn panic_in_update_is_dead_lettered_and_drops_the_key() {
    let o = run(
        Panicky {
            site: Site::Update,
            bad: 3,
            at: 13,
            ..Default::default()
        },
        ErrorPolicy::DeadLetter,
        None,
        1,
    );
    assert!(o.result.success, "{:?}", o.result.error);
    checked(&o.result);
    // Key 3 held item 3 when item 13 panicked: the key is dropped, its first item absorbed
    // into the failure; items 23 and 33 start a new state, flushed at the end.
    let mut expected = all_but(3);
    expected.push((3, 2, 23 + 33));
    expected.sort_unstable();
    assert_eq!(o.out, expected);
    let dl = &o.result.dead_letters;
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].stage, "acc");
    assert_eq!(dl[0].seq, 13);
    assert!(
        dl[0].error.contains("panicked: Update of key 3"),
        "{}",
        dl[0].error
    );
    assert!(dl[0].payload.is_none(), "update consumed the item");
}

/// Runs `acc` (failing on key `acc.bad`) under `DeadLetter` with one and two workers: every
/// other key emits as usual, the bad key emits `(items, sum)`, and exactly one item is
/// dead-lettered: it is returned, of each run.
fn one_dead_letter(acc: Panicky, bad_out: (u64, u64)) -> Vec<pulseflow::DeadLetter> {
    [1, 2]
        .into_iter()
        .map(|workers| {
            let bad = acc.bad;
            let acc = Panicky {
                sized: Default::default(),
                ..acc.clone()
            };
            let o = run(acc, ErrorPolicy::DeadLetter, None, workers);
            assert!(o.result.success, "{:?}", o.result.error);
            checked(&o.result);
            let mut expected = all_but(bad);
            expected.push((bad, bad_out.0, bad_out.1));
            expected.sort_unstable();
            assert_eq!(o.out, expected, "{workers} workers");
            let mut dl = o.result.dead_letters;
            assert_eq!(dl.len(), 1, "{workers} workers");
            dl.remove(0)
        })
        .collect()
}

#[test]
fn panic_in_state_size_before_update_fails_the_item_it_was_about_to_take() {
    // Sizing key 3's state before item 13 went in panicked: item 13 fails (once: the stage
    // goes on with item 14, not with 13 again), the key is dropped with item 3 absorbed, and
    // items 23 and 33 start a new state.
    let acc = Panicky {
        site: Site::StateSize,
        bad: 3,
        ..Default::default()
    };
    for dl in one_dead_letter(acc, (2, 23 + 33)) {
        assert_eq!(dl.seq, 13);
        assert!(dl.error.contains("StateSize of key 3"), "{}", dl.error);
    }
}

#[test]
fn panic_in_key_is_dead_lettered_with_its_payload() {
    let acc = Panicky {
        site: Site::Key,
        bad: 5,
        at: 25,
        ..Default::default()
    };
    for dl in one_dead_letter(acc, (3, 5 + 15 + 35)) {
        assert_eq!(dl.payload::<(u32, u64)>(), Some(&(5, 25)));
        assert!(dl.error.contains("Key of key 5"), "{}", dl.error);
    }
}

#[test]
fn panic_in_create_fails_the_item_only() {
    let o = run(
        Panicky {
            site: Site::Create,
            bad: 7,
            at: u64::MAX,
            ..Default::default()
        },
        ErrorPolicy::DeadLetter,
        None,
        1,
    );
    assert!(o.result.success, "{:?}", o.result.error);
    checked(&o.result);
    // Every item of key 7 finds no state and fails on its own.
    assert_eq!(o.out, all_but(7));
    let seqs: Vec<u64> = o.result.dead_letters.iter().map(|d| d.seq).collect();
    assert_eq!(seqs, vec![7, 17, 27, 37]);
    assert_eq!(
        o.result.dead_letters[0].payload::<(u32, u64)>(),
        Some(&(7, 7))
    );
}

#[test]
fn panic_in_check_under_fail_ends_the_run_with_the_stage() {
    let o = run(
        Panicky {
            site: Site::Check,
            bad: 2,
            at: 12,
            ..Default::default()
        },
        ErrorPolicy::Fail,
        None,
        1,
    );
    assert!(!o.result.success);
    checked(&o.result);
    match &o.result.error {
        Some(PipelineError::Item { stage, seq, source }) => {
            assert_eq!(stage, "acc");
            assert_eq!(*seq, 12);
            assert!(source.to_string().contains("Check of key 2"), "{source}");
        }
        other => panic!("expected an item error, got {other:?}"),
    }
    assert!(!o.out.iter().any(|(k, _, _)| *k == 2));
}

#[test]
fn panic_in_flush_under_ignore_is_counted() {
    let o = run(
        Panicky {
            site: Site::Flush,
            bad: 10,
            at: u64::MAX,
            ..Default::default()
        },
        ErrorPolicy::Ignore,
        None,
        1,
    );
    assert!(o.result.success, "{:?}", o.result.error);
    checked(&o.result);
    // Key 10 is flushed at the end of input; its flush panics: one item ignored, the other
    // absorbed into it.
    assert_eq!(o.out, all_but(10));
    let s = o.result.stage("acc").expect("stage");
    assert_eq!(s.counts.dropped.get("error_ignored"), Some(&1));
    assert_eq!(s.errors, 1);
    assert!(o.result.dead_letters.is_empty());
}

#[test]
fn panics_in_spill_encoding_and_decoding_lose_only_that_key() {
    for site in [Site::Encode, Site::Decode] {
        let o = run(
            Panicky {
                site,
                bad: 1,
                at: 0,
                ..Default::default()
            },
            ErrorPolicy::DeadLetter,
            Some(256),
            1,
        );
        assert!(o.result.success, "{site:?}: {:?}", o.result.error);
        checked(&o.result);
        let s = o.result.stage("acc").expect("stage");
        assert!(s.metrics["spill.spills"] > 0.0, "{:?}", s.metrics);
        // Key 1's state was lost (maybe more than once): never emitted whole; every other
        // key is.
        let others: Vec<_> = o.out.iter().filter(|(k, _, _)| *k != 1).copied().collect();
        assert_eq!(others, all_but(1), "{site:?}");
        assert!(o.out.iter().all(|(k, n, _)| *k != 1 || *n < 4), "{site:?}");
        let dl = &o.result.dead_letters;
        assert!(!dl.is_empty(), "{site:?}");
        let text = format!("panicked: {site:?} of key 1");
        assert!(dl.iter().all(|d| d.error.contains(&text)), "{dl:?}");
        assert!(dl.iter().all(|d| d.seq % 10 == 1), "{dl:?}");
    }
}
