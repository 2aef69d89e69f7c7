//! GGUF constants shared by the writer and the reader (GGUF v3, little-endian).

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const GGUF_VERSION: u32 = 3;
/// `general.alignment` default: tensor data starts on multiples of this.
pub const ALIGNMENT: u64 = 32;
pub const GGML_F32: u32 = 0;
pub const GGML_F16: u32 = 1;

/// Metadata value types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    pub fn from_u32(v: u32) -> Option<ValueType> {
        use ValueType::*;
        [
            U8, I8, U16, I16, U32, I32, F32, Bool, String, Array, U64, I64, F64,
        ]
        .get(v as usize)
        .copied()
    }
}
