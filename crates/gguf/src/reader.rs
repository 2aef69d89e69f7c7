//! A bounded reader of GGUF headers: metadata and tensor infos, never tensor data. Hostile
//! counts and lengths end in an error at EOF or at a limit, never in a huge allocation.
//!
//! Memory stays proportional to what is kept, not to the header's size: metadata arrays (the
//! vocabulary, its scores and merges: most of a header) are skipped as they are read and only
//! their element type and length are kept (a vocabulary's size is its length); no estimate
//! needs their elements. At most [`MAX_HEADER`] bytes are read.

use std::io::{self, Read};

use crate::format::{MAGIC, ValueType};

/// Longest string accepted (keys, token strings, names).
pub const MAX_STRING: u64 = 1 << 20;
/// Most elements accepted in one metadata array (a vocabulary is ~256k).
pub const MAX_ARRAY: u64 = 1 << 24;
/// Most tensors / metadata entries accepted: 65,536. Published models have a few thousand
/// tensors at most (mixtures of experts fuse their experts) and a few hundred keys; each entry
/// kept costs about 100 bytes beside its strings, so hostile counts stay within a few MiB.
pub const MAX_ENTRIES: u64 = 1 << 16;
/// Most bytes of a header read (metadata and tensor infos): 128 MiB. The largest headers of
/// published models (vocabularies of ~256k tokens with scores and merges) are a few tens of
/// MiB; a longer one is corrupt or crafted and ends in [`ReadError::TooLarge`].
pub const MAX_HEADER: u64 = 128 << 20;
/// Preallocation cap: larger counts grow as data actually arrives.
const PREALLOC: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("not a GGUF file: it starts with {0:?}, not \"GGUF\"")]
    Magic([u8; 4]),
    #[error("unsupported GGUF version {0}; versions 2 and 3 are supported")]
    Version(u32),
    #[error("truncated GGUF header: the file ends inside {0}")]
    Truncated(&'static str),
    #[error("malformed GGUF header: {0}")]
    Malformed(String),
    #[error(
        "the GGUF header is larger than {} MiB, the most belljar reads of a header (published models' headers are a few tens of MiB): the file is corrupt or not a model; copy or download it again",
        .limit >> 20
    )]
    TooLarge { limit: u64 },
    #[error("cannot read GGUF header: {0}")]
    Io(#[from] io::Error),
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i128),
    Float(f64),
    Bool(bool),
    Str(String),
    /// An array, skipped while reading: only its element type and length are kept.
    Array {
        elem: u32,
        len: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub offset: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    /// Bytes from the start of the file to the end of the tensor infos.
    pub header_len: u64,
}

impl TensorInfo {
    pub fn elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |a, d| a.saturating_mul(*d))
    }

    /// Bytes of this tensor's data, when its type's layout is known.
    pub fn bytes(&self) -> Option<u64> {
        let (block, size) = crate::format::type_block(self.ggml_type)?;
        Some((self.elements() / block).saturating_mul(size))
    }
}

impl Header {
    /// Where tensor data starts: the header, padded to `general.alignment`.
    pub fn data_offset(&self) -> u64 {
        let align = self
            .get_u64("general.alignment")
            .filter(|a| *a > 0)
            .unwrap_or(crate::format::ALIGNMENT);
        self.header_len.div_ceil(align).saturating_mul(align)
    }

    /// The file size the tensor infos claim, when every tensor type's layout is known. A file
    /// shorter than this is truncated.
    pub fn expected_file_size(&self) -> Option<u64> {
        let mut end = 0u64;
        for t in &self.tensors {
            end = end.max(t.offset.saturating_add(t.bytes()?));
        }
        Some(self.data_offset().saturating_add(end))
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn get_u64(&self, key: &str) -> Option<u64> {
        match self.get(key)? {
            Value::Int(i) => u64::try_from(*i).ok(),
            _ => None,
        }
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        match self.get(key)? {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The length of an array value (`tokenizer.ggml.tokens`: the vocabulary's size).
    pub fn array_len(&self, key: &str) -> Option<u64> {
        match self.get(key)? {
            Value::Array { len, .. } => Some(*len),
            _ => None,
        }
    }

    /// The least size of a file holding this header's tensors: where the last tensor's data
    /// ends (a tensor of a type whose layout is unknown counts from its offset only). A file
    /// shorter than this is truncated. Saturates: an extent past `u64::MAX` is longer than any
    /// file.
    pub fn min_file_size(&self) -> u64 {
        let end = self
            .tensors
            .iter()
            .map(|t| t.offset.saturating_add(t.bytes().unwrap_or(0)))
            .max()
            .unwrap_or(0);
        if self.tensors.is_empty() {
            return self.header_len;
        }
        self.data_offset().saturating_add(end)
    }
}

struct R<T> {
    inner: T,
    pos: u64,
    limit: u64,
}

impl<T: Read> R<T> {
    /// Refuses to go past the header cap before reading `n` more bytes.
    fn budget(&self, n: u64) -> Result<(), ReadError> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.limit => Ok(()),
            _ => Err(ReadError::TooLarge { limit: self.limit }),
        }
    }
    /// Reads and drops `n` bytes.
    fn skip(&mut self, n: u64, what: &'static str) -> Result<(), ReadError> {
        self.budget(n)?;
        let skipped =
            io::copy(&mut (&mut self.inner).take(n), &mut io::sink()).map_err(|e| eof(e, what))?;
        if skipped != n {
            return Err(ReadError::Truncated(what));
        }
        self.pos += n;
        Ok(())
    }
    fn bytes<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], ReadError> {
        self.budget(N as u64)?;
        let mut b = [0u8; N];
        self.inner.read_exact(&mut b).map_err(|e| eof(e, what))?;
        self.pos += N as u64;
        Ok(b)
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, ReadError> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, ReadError> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }
    fn count(&mut self, what: &'static str, max: u64) -> Result<u64, ReadError> {
        let n = self.u64(what)?;
        if n > max {
            return Err(ReadError::Malformed(format!(
                "{what} count {n} exceeds the limit {max}"
            )));
        }
        Ok(n)
    }
    fn string(&mut self, what: &'static str) -> Result<String, ReadError> {
        let len = self.count(what, MAX_STRING)?;
        self.budget(len)?;
        let mut buf = Vec::with_capacity(len.min(PREALLOC) as usize);
        (&mut self.inner)
            .take(len)
            .read_to_end(&mut buf)
            .map_err(|e| eof(e, what))?;
        if buf.len() as u64 != len {
            return Err(ReadError::Truncated(what));
        }
        self.pos += len;
        String::from_utf8(buf).map_err(|_| ReadError::Malformed(format!("{what} is not UTF-8")))
    }
    fn value(&mut self, ty: u32) -> Result<Value, ReadError> {
        let what = "a metadata value";
        let ty = ValueType::from_u32(ty)
            .ok_or_else(|| ReadError::Malformed(format!("unknown metadata value type {ty}")))?;
        Ok(match ty {
            ValueType::U8 => Value::Int(self.bytes::<1>(what)?[0].into()),
            ValueType::I8 => Value::Int((self.bytes::<1>(what)?[0] as i8).into()),
            ValueType::U16 => Value::Int(u16::from_le_bytes(self.bytes(what)?).into()),
            ValueType::I16 => Value::Int(i16::from_le_bytes(self.bytes(what)?).into()),
            ValueType::U32 => Value::Int(u32::from_le_bytes(self.bytes(what)?).into()),
            ValueType::I32 => Value::Int(i32::from_le_bytes(self.bytes(what)?).into()),
            ValueType::U64 => Value::Int(u64::from_le_bytes(self.bytes(what)?).into()),
            ValueType::I64 => Value::Int(i64::from_le_bytes(self.bytes(what)?).into()),
            ValueType::F32 => Value::Float(f32::from_le_bytes(self.bytes(what)?).into()),
            ValueType::F64 => Value::Float(f64::from_le_bytes(self.bytes(what)?)),
            ValueType::Bool => match self.bytes::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(ReadError::Malformed(format!("bool value {b}"))),
            },
            ValueType::String => Value::Str(self.string("a string value")?),
            ValueType::Array => {
                let elem = self.u32("an array type")?;
                let len = self.count("array element", MAX_ARRAY)?;
                self.skip_array(elem, len)?;
                Value::Array { elem, len }
            }
        })
    }
}

impl<T: Read> R<T> {
    /// Reads past an array's elements without keeping them.
    fn skip_array(&mut self, elem: u32, len: u64) -> Result<(), ReadError> {
        let what = "an array";
        let ty = ValueType::from_u32(elem)
            .ok_or_else(|| ReadError::Malformed(format!("unknown array element type {elem}")))?;
        let width: u64 = match ty {
            ValueType::U8 | ValueType::I8 | ValueType::Bool => 1,
            ValueType::U16 | ValueType::I16 => 2,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 4,
            ValueType::U64 | ValueType::I64 | ValueType::F64 => 8,
            ValueType::Array => {
                return Err(ReadError::Malformed(
                    "nested arrays are not supported".into(),
                ));
            }
            ValueType::String => {
                for _ in 0..len {
                    let n = self.count("a string in an array", MAX_STRING)?;
                    self.skip(n, "a string in an array")?;
                }
                return Ok(());
            }
        };
        let bytes = len
            .checked_mul(width)
            .ok_or(ReadError::TooLarge { limit: self.limit })?;
        self.skip(bytes, what)
    }
}

fn eof(e: io::Error, what: &'static str) -> ReadError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        ReadError::Truncated(what)
    } else {
        ReadError::Io(e)
    }
}

/// Reads the header (metadata and tensor infos) from the start of a GGUF stream, at most
/// [`MAX_HEADER`] bytes of it. Consumes exactly the header's bytes (`header_len`), so a
/// reader wrapped around the stream sees the header and nothing more.
pub fn read_header<T: Read>(input: T) -> Result<Header, ReadError> {
    read_header_limited(input, MAX_HEADER)
}

/// [`read_header`] with another cap on the header's bytes.
pub fn read_header_limited<T: Read>(input: T, limit: u64) -> Result<Header, ReadError> {
    let mut r = R {
        inner: input,
        pos: 0,
        limit,
    };
    let magic = r.bytes::<4>("the magic")?;
    if &magic != MAGIC {
        return Err(ReadError::Magic(magic));
    }
    let version = r.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(ReadError::Version(version));
    }
    let n_tensors = r.count("tensor", MAX_ENTRIES)?;
    let n_kv = r.count("metadata", MAX_ENTRIES)?;
    let mut metadata = Vec::with_capacity(n_kv.min(PREALLOC) as usize);
    for _ in 0..n_kv {
        let key = r.string("a metadata key")?;
        let ty = r.u32("a metadata type")?;
        metadata.push((key, r.value(ty)?));
    }
    if let Some((_, v)) = metadata.iter().find(|(k, _)| k == "general.alignment") {
        match v {
            Value::Int(a)
                if *a > 0 && (*a as u128).is_power_of_two() && *a <= i128::from(u32::MAX) => {}
            other => {
                return Err(ReadError::Malformed(format!(
                    "general.alignment is {other:?}: it must be a power of two that fits 32 bits, as llama.cpp requires"
                )));
            }
        }
    }
    let mut tensors = Vec::with_capacity(n_tensors.min(PREALLOC) as usize);
    for _ in 0..n_tensors {
        let name = r.string("a tensor name")?;
        let n_dims = r.u32("tensor dimensions")?;
        if !(1..=4).contains(&n_dims) {
            return Err(ReadError::Malformed(format!(
                "tensor {name} has {n_dims} dimensions (1 to 4 allowed)"
            )));
        }
        let dims = (0..n_dims)
            .map(|_| r.u64("tensor dimensions"))
            .collect::<Result<Vec<_>, _>>()?;
        let ggml_type = r.u32("a tensor type")?;
        let offset = r.u64("a tensor offset")?;
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        });
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        header_len: r.pos,
    })
}
