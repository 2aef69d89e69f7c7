//! GGUF files: a deterministic generator of llama- and gemma3-architecture models (so nothing
//! is ever downloaded) and a bounded header reader. Pure: both work on `Write` / `Read` streams.

pub mod format;
pub mod reader;
pub mod writer;

pub use reader::{Header, ReadError, TensorInfo, Value, read_header, read_header_limited};
pub use writer::{Arch, ModelShape, ModelSpec, ShapeError, WeightType};

#[cfg(test)]
mod tests;
