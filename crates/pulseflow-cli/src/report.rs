//! The table of every stage printed at the end of a run on a terminal (and by `pulseflow
//! top`), and the JSON form of stage states served by `--admin` on `/stages`.

use pulseflow::metrics::StageRuntimeState;
use serde_json::{Value, json};

use crate::latency::Latencies;

/// One stage as JSON (what `/stages` serves and `pulseflow top` reads), with its batch
/// latency quantiles from `latencies`.
pub fn stage_json(s: &StageRuntimeState, latencies: &Latencies) -> Value {
    let quantiles = latencies.quantiles(&s.stage_id);
    let c = &s.counts;
    let input_dropped = s
        .input
        .as_ref()
        .map(|e| e.dropped.clone())
        .unwrap_or_default();
    let mut dropped = c.dropped.clone();
    for (reason, n) in input_dropped {
        *dropped.entry(reason).or_insert(0) += n;
    }
    json!({
        "stage": s.stage_id,
        "kind": s.kind.as_str(),
        "status": s.status.as_str(),
        "in": c.received + c.ingested,
        "out": c.emitted + c.delivered,
        "created": c.created,
        "filtered": c.filtered,
        "dropped": dropped,
        "dead_lettered": c.dead_lettered,
        "absorbed": c.absorbed,
        "errors": s.errors,
        "retries": c.retries,
        "last_error": s.last_error,
        "input_queue_depth": s.input_queue_depth,
        "output_queue_depth": s.output_queue_depth,
        "batches": s.metrics.get("batches").copied().unwrap_or(0.0),
        "avg_batch_micros": s.metrics.get("avg_batch_micros").copied().unwrap_or(0.0),
        "p50_batch_micros": quantiles.map(|q| q.p50),
        "p99_batch_micros": quantiles.map(|q| q.p99),
        "workers": s.metrics.get("workers").copied().unwrap_or(0.0),
        "tier": s.tier.map(|t| t.to_string()),
        "cpu_seconds": s.cpu_time.as_secs_f64(),
        "busy": s.load.map(|l| l.busy),
        "backpressured": s.load.map(|l| l.backpressured),
        "idle": s.load.map(|l| l.idle),
        "bottleneck": s.bottleneck,
        "metrics": s.metrics,
    })
}

fn cell(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

fn dropped_cell(v: &Value) -> String {
    match v.get("dropped").and_then(Value::as_object) {
        Some(m) if !m.is_empty() => m
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", "),
        _ => "0".into(),
    }
}

/// One line per stage that spilled state to disk (JSON form, as from [`stage_json`]): keys
/// spilled and reloaded, bytes written.
pub fn spill_lines(stages: &[Value]) -> Vec<String> {
    stages
        .iter()
        .filter_map(|s| {
            let metric = |name: &str| s["metrics"].get(name).and_then(Value::as_f64);
            let spills = metric("spill.spills").filter(|n| *n > 0.0)?;
            let mib = |bytes: Option<f64>| bytes.unwrap_or(0.0) / (1 << 20) as f64;
            Some(format!(
                "{}: {spills} keys spilled, {} reloaded, {:.1} MiB encoded, {:.1} MiB stored",
                cell(s, "stage"),
                metric("spill.reloads").unwrap_or(0.0),
                mib(metric("spill.raw_bytes")),
                mib(metric("spill.stored_bytes")),
            ))
        })
        .collect()
}

/// A share of time (`busy`, `backpressured`, `idle` of [`stage_json`]) as a percentage.
fn share_cell(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_f64)
        .map_or("-".to_owned(), |share| format!("{:.0}%", share * 100.0))
}

/// A table of stages (JSON form, as from [`stage_json`]), aligned in columns: counts, batch
/// times, tier, and the shares of the last few seconds spent busy, backpressured and idle,
/// the bottleneck marked.
pub fn table(stages: &[Value]) -> String {
    let header = [
        "stage",
        "kind",
        "status",
        "in",
        "out",
        "filtered",
        "dropped",
        "dead",
        "errors",
        "avg batch",
        "p50 batch",
        "p99 batch",
        "tier",
        "busy",
        "backpressured",
        "idle",
        "",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| (*s).to_owned()).collect()];
    for s in stages {
        let micros = |key: &str| {
            s.get(key)
                .and_then(Value::as_f64)
                .filter(|a| *a > 0.0)
                .map_or("-".to_owned(), |a| {
                    if a >= 1000.0 {
                        format!("{:.1} ms", a / 1000.0)
                    } else {
                        format!("{a:.0} µs")
                    }
                })
        };
        rows.push(vec![
            cell(s, "stage"),
            cell(s, "kind"),
            cell(s, "status"),
            cell(s, "in"),
            cell(s, "out"),
            cell(s, "filtered"),
            dropped_cell(s),
            cell(s, "dead_lettered"),
            cell(s, "errors"),
            micros("avg_batch_micros"),
            micros("p50_batch_micros"),
            micros("p99_batch_micros"),
            cell(s, "tier"),
            share_cell(s, "busy"),
            share_cell(s, "backpressured"),
            share_cell(s, "idle"),
            if s.get("bottleneck").and_then(Value::as_bool) == Some(true) {
                "<- bottleneck".to_owned()
            } else {
                String::new()
            },
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (n, r) in rows.iter().enumerate() {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i < 3 || i == header.len() - 1 {
                    format!("{c:<w$}", w = widths[i])
                } else {
                    format!("{c:>w$}", w = widths[i])
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
        if n == 0 {
            out.push_str(&"-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1)));
            out.push('\n');
        }
    }
    out
}
