//! The components a config can name: sources, transforms and sinks, one file per concern.

pub mod accumulate;
pub mod csv;
pub mod dead_letter;
pub mod decode;
pub mod generate;
pub mod lines;
pub mod reader;
pub mod sinks;
pub mod transforms;
pub mod writer;
