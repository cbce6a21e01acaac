//! Named policies that stages refer to.

use std::collections::BTreeMap;

use super::{BackpressureStrategy, BufferPolicy, CircuitBreakerPolicy, ErrorPolicy};

/// A policy given inline or by its name in a [`PolicyRegistry`].
#[derive(Debug, Clone, PartialEq)]
pub enum PolicyRef<P> {
    /// The policy itself.
    Inline(P),
    /// The name of a registered policy; an unknown name is a validation error.
    Named(String),
}

impl<P> From<P> for PolicyRef<P> {
    fn from(policy: P) -> Self {
        PolicyRef::Inline(policy)
    }
}

impl<P: Clone> PolicyRef<P> {
    /// Resolves the reference, looking names up with `lookup`.
    pub fn resolve<'a>(&'a self, lookup: impl FnOnce(&str) -> Option<&'a P>) -> Option<P> {
        match self {
            PolicyRef::Inline(p) => Some(p.clone()),
            PolicyRef::Named(name) => lookup(name).cloned(),
        }
    }
}

/// Error, backpressure, circuit-breaker and buffer policies by name.
#[derive(Debug, Clone, Default)]
pub struct PolicyRegistry {
    error: BTreeMap<String, ErrorPolicy>,
    backpressure: BTreeMap<String, BackpressureStrategy>,
    circuit_breaker: BTreeMap<String, CircuitBreakerPolicy>,
    buffer: BTreeMap<String, BufferPolicy>,
}

impl PolicyRegistry {
    /// Registers an error policy.
    pub fn add_error_policy(&mut self, name: impl Into<String>, p: ErrorPolicy) -> &mut Self {
        self.error.insert(name.into(), p);
        self
    }

    /// Registers a backpressure strategy.
    pub fn add_backpressure(
        &mut self,
        name: impl Into<String>,
        p: BackpressureStrategy,
    ) -> &mut Self {
        self.backpressure.insert(name.into(), p);
        self
    }

    /// Registers a circuit-breaker policy.
    pub fn add_circuit_breaker(
        &mut self,
        name: impl Into<String>,
        p: CircuitBreakerPolicy,
    ) -> &mut Self {
        self.circuit_breaker.insert(name.into(), p);
        self
    }

    /// Registers a buffer policy.
    pub fn add_buffer(&mut self, name: impl Into<String>, p: BufferPolicy) -> &mut Self {
        self.buffer.insert(name.into(), p);
        self
    }

    /// A registered error policy.
    pub fn error_policy(&self, name: &str) -> Option<&ErrorPolicy> {
        self.error.get(name)
    }

    /// A registered backpressure strategy.
    pub fn backpressure(&self, name: &str) -> Option<&BackpressureStrategy> {
        self.backpressure.get(name)
    }

    /// A registered circuit-breaker policy.
    pub fn circuit_breaker(&self, name: &str) -> Option<&CircuitBreakerPolicy> {
        self.circuit_breaker.get(name)
    }

    /// A registered buffer policy.
    pub fn buffer(&self, name: &str) -> Option<&BufferPolicy> {
        self.buffer.get(name)
    }

    /// Adds every policy of `other`, replacing same-named ones.
    pub fn extend(&mut self, other: &PolicyRegistry) {
        self.error.extend(other.error.clone());
        self.backpressure.extend(other.backpressure.clone());
        self.circuit_breaker.extend(other.circuit_breaker.clone());
        self.buffer.extend(other.buffer.clone());
    }
}
