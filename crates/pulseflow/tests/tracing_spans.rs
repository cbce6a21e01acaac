//! Tracing spans per stage and per batch. In a test binary of its own: tracing caches
//! per-callsite interest process-wide, so tests running beside it without a subscriber could
//! make its callsites look disabled.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use pulseflow::prelude::*;

#[test]
fn stages_and_batches_get_tracing_spans() {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Metadata, Subscriber};

    /// Counts the spans created, by name.
    #[derive(Default)]
    struct SpanCounter {
        names: Mutex<BTreeMap<&'static str, usize>>,
        next: AtomicUsize,
    }
    impl Subscriber for SpanCounter {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, span: &Attributes<'_>) -> Id {
            *self
                .names
                .lock()
                .expect("lock")
                .entry(span.metadata().name())
                .or_default() += 1;
            Id::from_u64(self.next.fetch_add(1, Ordering::Relaxed) as u64 + 1)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, _: &Event<'_>) {}
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }

    let counter = Arc::new(SpanCounter::default());
    tracing::subscriber::with_default(counter.clone(), || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut p = PipelineBuilder::new("traced");
        p.source("src", sources::iter(0u32..100))
            .map("m", |x| x)
            .sink("out", sink_fn(|_x: u32| {}));
        let options = ExecutionOptions::default().with_batch_size(10);
        let r = runtime.block_on(ExecutionEngine::new().run(p.build().expect("valid"), options));
        assert!(r.success);
    });
    let names = counter.names.lock().expect("lock");
    assert_eq!(names.get("pipeline"), Some(&1));
    assert_eq!(names.get("stage"), Some(&3), "one span per stage");
    // Ten batches through the map and ten into the sink.
    assert_eq!(names.get("batch"), Some(&20), "{names:?}");
}
