//! GGUF constants shared by the writer and the reader (GGUF v3, little-endian).

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const GGUF_VERSION: u32 = 3;
/// `general.alignment` default: tensor data starts on multiples of this.
pub const ALIGNMENT: u64 = 32;
pub const GGML_F32: u32 = 0;
pub const GGML_F16: u32 = 1;
pub const GGML_Q4_0: u32 = 2;
pub const GGML_Q8_0: u32 = 8;

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

/// `(elements per block, bytes per block)` of the ggml tensor types whose layout is fixed and
/// known here; `None` for others (their size is then not checked).
pub fn type_block(ggml_type: u32) -> Option<(u64, u64)> {
    Some(match ggml_type {
        0 => (1, 4),      // F32
        1 => (1, 2),      // F16
        2 => (32, 18),    // Q4_0
        3 => (32, 20),    // Q4_1
        6 => (32, 22),    // Q5_0
        7 => (32, 24),    // Q5_1
        8 => (32, 34),    // Q8_0
        9 => (32, 36),    // Q8_1
        10 => (256, 84),  // Q2_K
        11 => (256, 110), // Q3_K
        12 => (256, 144), // Q4_K
        13 => (256, 176), // Q5_K
        14 => (256, 210), // Q6_K
        15 => (256, 292), // Q8_K
        16 => (256, 66),  // IQ2_XXS
        17 => (256, 74),  // IQ2_XS
        18 => (256, 98),  // IQ3_XXS
        19 => (256, 50),  // IQ1_S
        20 => (32, 18),   // IQ4_NL
        21 => (256, 110), // IQ3_S
        22 => (256, 82),  // IQ2_S
        23 => (256, 136), // IQ4_XS
        24 => (1, 1),     // I8
        25 => (1, 2),     // I16
        26 => (1, 4),     // I32
        27 => (1, 8),     // I64
        28 => (1, 8),     // F64
        29 => (256, 56),  // IQ1_M
        30 => (1, 2),     // BF16
        34 => (256, 54),  // TQ1_0
        35 => (256, 66),  // TQ2_0
        39 => (32, 17),   // MXFP4
        _ => return None,
    })
}

/// `GGML_TYPE_COUNT` of the llama.cpp belljar is built with (llama-cpp-sys-2 0.1.160): a tensor
/// type at or past it cannot be loaded.
pub const GGML_TYPE_COUNT: u32 = 43;

/// Whether the pinned llama.cpp can load a tensor of this type at all: not one of the types
/// whose support was removed (Q4_2, Q4_3, the Q4_0_N_M and IQ4_NL_N_M repacks), and below
/// [`GGML_TYPE_COUNT`]. Types it knows whose layout [`type_block`] lacks are loadable; only
/// their size is not checked.
pub fn type_loadable(ggml_type: u32) -> bool {
    ggml_type < GGML_TYPE_COUNT && !matches!(ggml_type, 4 | 5 | 31..=33 | 36..=38)
}
