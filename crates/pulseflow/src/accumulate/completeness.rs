//! Completeness evaluators usable from any accumulator: a bitset over required variable names
//! ([`RequiredVars`]), an item count ([`CountThreshold`]), an input size ([`SizeThreshold`])
//! and [`Hybrid`], complete as soon as any of its parts is.
//!
//! ```
//! use pulseflow::accumulate::{
//!     CompletenessEvaluator, CountThreshold, Hybrid, Observed, RequiredVars, VarSet,
//! };
//!
//! let required = RequiredVars::new(["name", "email", "plan"]);
//! let mut seen = VarSet::default();
//! required.mark(&mut seen, "email");
//! required.mark(&mut seen, "unknown"); // not required: ignored
//! assert_eq!(required.missing(&seen), vec!["name", "plan"]);
//! let p = required.progress(&seen);
//! assert!(!p.complete && (p.score - 1.0 / 3.0).abs() < 1e-9);
//!
//! let either = Hybrid::new()
//!     .with(CountThreshold::new(10))
//!     .with(required.clone());
//! let observed = Observed { vars: Some(&seen), items: 10, bytes: 0 };
//! assert!(either.evaluate(&observed).complete); // ten items are enough
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// How far a key is from complete.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Completeness in `[0, 1]`.
    pub score: f64,
    /// Whether the key is complete.
    pub complete: bool,
}

impl Progress {
    fn of(have: u64, need: u64) -> Self {
        if need == 0 {
            return Self {
                score: 1.0,
                complete: true,
            };
        }
        Self {
            score: (have as f64 / need as f64).min(1.0),
            complete: have >= need,
        }
    }
}

/// What an evaluator looks at: the key's variables (if it tracks any), items and bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Observed<'a> {
    /// The variables seen, for [`RequiredVars`].
    pub vars: Option<&'a VarSet>,
    /// Items folded in.
    pub items: u64,
    /// Input bytes folded in.
    pub bytes: u64,
}

/// Decides completeness from what a key has seen.
pub trait CompletenessEvaluator: Send + Sync {
    /// Progress and whether the key is complete.
    fn evaluate(&self, observed: &Observed<'_>) -> Progress;
}

/// A set of variable indices (one bit each), as kept in a key's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VarSet {
    words: Vec<u64>,
}

impl VarSet {
    fn insert(&mut self, bit: usize) -> bool {
        let (w, b) = (bit / 64, bit % 64);
        if self.words.len() <= w {
            self.words.resize(w + 1, 0);
        }
        let fresh = self.words[w] & (1 << b) == 0;
        self.words[w] |= 1 << b;
        fresh
    }

    fn contains(&self, bit: usize) -> bool {
        self.words
            .get(bit / 64)
            .is_some_and(|w| w & (1 << (bit % 64)) != 0)
    }

    fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Heap bytes held.
    pub fn heap_size(&self) -> usize {
        self.words.capacity() * 8
    }
}

/// Complete when every required variable name was seen. Cheap to clone (shared names).
#[derive(Debug, Clone)]
pub struct RequiredVars {
    names: Arc<[String]>,
    index: Arc<HashMap<String, usize>>,
}

impl RequiredVars {
    /// The required names (duplicates count once).
    pub fn new<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut list: Vec<String> = Vec::new();
        let mut index = HashMap::new();
        for name in names {
            let name = name.into();
            if !index.contains_key(&name) {
                index.insert(name.clone(), list.len());
                list.push(name);
            }
        }
        Self {
            names: list.into(),
            index: Arc::new(index),
        }
    }

    /// The required names, in declaration order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Records that `name` was seen; `false` when it is not required or was already seen.
    pub fn mark(&self, set: &mut VarSet, name: &str) -> bool {
        match self.index.get(name) {
            Some(&bit) => set.insert(bit),
            None => false,
        }
    }

    /// The required names not seen yet, in declaration order.
    pub fn missing(&self, set: &VarSet) -> Vec<&str> {
        self.names
            .iter()
            .enumerate()
            .filter(|(i, _)| !set.contains(*i))
            .map(|(_, n)| n.as_str())
            .collect()
    }

    /// Share of required names seen, and whether all were.
    pub fn progress(&self, set: &VarSet) -> Progress {
        Progress::of(set.count(), self.names.len() as u64)
    }
}

impl CompletenessEvaluator for RequiredVars {
    fn evaluate(&self, observed: &Observed<'_>) -> Progress {
        match observed.vars {
            Some(set) => self.progress(set),
            None => Progress::of(0, self.names.len() as u64),
        }
    }
}

/// Complete after a number of items.
#[derive(Debug, Clone, Copy)]
pub struct CountThreshold {
    items: u64,
}

impl CountThreshold {
    /// Complete at `items` items.
    pub fn new(items: u64) -> Self {
        Self { items }
    }
}

impl CompletenessEvaluator for CountThreshold {
    fn evaluate(&self, observed: &Observed<'_>) -> Progress {
        Progress::of(observed.items, self.items)
    }
}

/// Complete after a number of input bytes.
#[derive(Debug, Clone, Copy)]
pub struct SizeThreshold {
    bytes: u64,
}

impl SizeThreshold {
    /// Complete at `bytes` input bytes.
    pub fn new(bytes: u64) -> Self {
        Self { bytes }
    }
}

impl CompletenessEvaluator for SizeThreshold {
    fn evaluate(&self, observed: &Observed<'_>) -> Progress {
        Progress::of(observed.bytes, self.bytes)
    }
}

/// Complete when any part is; the score is the best part's.
#[derive(Default, Clone)]
pub struct Hybrid {
    parts: Vec<Arc<dyn CompletenessEvaluator>>,
}

impl std::fmt::Debug for Hybrid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hybrid")
            .field("parts", &self.parts.len())
            .finish()
    }
}

impl Hybrid {
    /// No parts yet (never complete).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a part.
    pub fn with(mut self, part: impl CompletenessEvaluator + 'static) -> Self {
        self.parts.push(Arc::new(part));
        self
    }
}

impl CompletenessEvaluator for Hybrid {
    fn evaluate(&self, observed: &Observed<'_>) -> Progress {
        self.parts.iter().map(|p| p.evaluate(observed)).fold(
            Progress {
                score: 0.0,
                complete: false,
            },
            |a, b| Progress {
                score: a.score.max(b.score),
                complete: a.complete || b.complete,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_and_hybrid() {
        let o = Observed {
            vars: None,
            items: 3,
            bytes: 100,
        };
        assert!(!CountThreshold::new(4).evaluate(&o).complete);
        assert!(SizeThreshold::new(100).evaluate(&o).complete);
        let h = Hybrid::new()
            .with(CountThreshold::new(4))
            .with(SizeThreshold::new(400));
        let p = h.evaluate(&o);
        assert!(!p.complete);
        assert!((p.score - 0.75).abs() < 1e-9);
        assert!(!Hybrid::new().evaluate(&o).complete);
    }

    #[test]
    fn bitset_beyond_one_word() {
        let names: Vec<String> = (0..130).map(|i| format!("v{i}")).collect();
        let req = RequiredVars::new(names.clone());
        let mut set = VarSet::default();
        for n in &names[..129] {
            assert!(req.mark(&mut set, n));
        }
        assert!(!req.mark(&mut set, "v0"));
        assert_eq!(req.missing(&set), vec!["v129"]);
        assert!(req.mark(&mut set, "v129"));
        assert!(req.progress(&set).complete);
    }
}
