//! Batch latency quantiles per stage.
//!
//! The engine records every batch's processing time in the `metrics` histogram
//! `pulseflow_batch_duration_seconds` (label `stage`) but keeps only the count and the sum
//! itself. [`Recorder`] is the process's `metrics` recorder: it keeps those histograms per
//! stage in a DDSketch (quantiles within 1 % of the true value) and hands every metric on to
//! the Prometheus recorder when `--admin` serves one.

use std::collections::HashMap;
use std::sync::Arc;

use metrics::{Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, SharedString, Unit};
use metrics_exporter_prometheus::PrometheusRecorder;
use parking_lot::Mutex;
use sketches_ddsketch::{Config, DDSketch};

/// The engine's batch-time histogram.
const BATCH_SECONDS: &str = "pulseflow_batch_duration_seconds";

/// One stage's batch times.
struct StageSketch(Mutex<DDSketch>);

/// A stage's batch latency quantiles, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quantiles {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
}

/// Batch times of every stage, by stage id.
#[derive(Default)]
pub struct Latencies {
    stages: Mutex<HashMap<String, Arc<StageSketch>>>,
}

impl Latencies {
    fn sketch(&self, stage: &str) -> Arc<StageSketch> {
        self.stages
            .lock()
            .entry(stage.to_owned())
            .or_insert_with(|| Arc::new(StageSketch(Mutex::new(DDSketch::new(Config::defaults())))))
            .clone()
    }

    /// The quantiles of `stage`'s batch times, when it ran any batch.
    pub fn quantiles(&self, stage: &str) -> Option<Quantiles> {
        let sketch = self.stages.lock().get(stage)?.clone();
        let s = sketch.0.lock();
        let q = |q: f64| s.quantile(q).ok().flatten().map(|v| v * 1e6);
        Some(Quantiles {
            p50: q(0.5)?,
            p99: q(0.99)?,
        })
    }
}

impl HistogramFn for StageSketch {
    fn record(&self, seconds: f64) {
        if seconds.is_finite() && seconds >= 0.0 {
            self.0.lock().add(seconds);
        }
    }
}

/// A stage's sketch and the Prometheus histogram, fed together.
struct Both {
    sketch: Arc<StageSketch>,
    inner: Histogram,
}

impl HistogramFn for Both {
    fn record(&self, seconds: f64) {
        self.sketch.record(seconds);
        self.inner.record(seconds);
    }
}

/// The process's `metrics` recorder: batch latencies kept per stage, everything handed on to
/// Prometheus when there is one.
pub struct Recorder {
    latencies: Arc<Latencies>,
    prometheus: Option<PrometheusRecorder>,
}

impl Recorder {
    /// Keeps batch latencies in `latencies`, and hands every metric on to `prometheus`.
    pub fn new(latencies: Arc<Latencies>, prometheus: Option<PrometheusRecorder>) -> Self {
        Self {
            latencies,
            prometheus,
        }
    }
}

impl metrics::Recorder for Recorder {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        if let Some(p) = &self.prometheus {
            p.describe_counter(key, unit, description);
        }
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        if let Some(p) = &self.prometheus {
            p.describe_gauge(key, unit, description);
        }
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        if let Some(p) = &self.prometheus {
            p.describe_histogram(key, unit, description);
        }
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        self.prometheus
            .as_ref()
            .map_or(Counter::noop(), |p| p.register_counter(key, metadata))
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        self.prometheus
            .as_ref()
            .map_or(Gauge::noop(), |p| p.register_gauge(key, metadata))
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        let inner = self
            .prometheus
            .as_ref()
            .map_or(Histogram::noop(), |p| p.register_histogram(key, metadata));
        if key.name() != BATCH_SECONDS {
            return inner;
        }
        let Some(stage) = key.labels().find(|l| l.key() == "stage") else {
            return inner;
        };
        Histogram::from_arc(Arc::new(Both {
            sketch: self.latencies.sketch(stage.value()),
            inner,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics::Recorder as _;

    #[test]
    fn quantiles_of_the_batch_histogram_by_stage() {
        let latencies = Arc::new(Latencies::default());
        let recorder = Recorder::new(latencies.clone(), None);
        let meta = Metadata::new("t", metrics::Level::INFO, None);
        let key = |stage: &str| {
            Key::from_parts(
                BATCH_SECONDS,
                vec![
                    metrics::Label::new("pipeline", "p"),
                    metrics::Label::new("stage", stage.to_owned()),
                ],
            )
        };
        let a = recorder.register_histogram(&key("a"), &meta);
        // 1..=100 µs: the median is about 50 µs, the 99th percentile about 99 µs.
        for us in 1..=100 {
            a.record(us as f64 * 1e-6);
        }
        let other = recorder.register_histogram(&Key::from_name("something_else"), &meta);
        other.record(1.0);
        let q = latencies.quantiles("a").expect("recorded");
        assert!((q.p50 - 50.0).abs() <= 1.5, "{q:?}");
        assert!((q.p99 - 99.0).abs() <= 2.0, "{q:?}");
        assert!(latencies.quantiles("b").is_none());
        assert!(latencies.quantiles("something_else").is_none());
    }
}
