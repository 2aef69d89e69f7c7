use super::*;
use proptest::prelude::*;

fn bytes(shape: &ModelShape) -> Vec<u8> {
    let mut v = Vec::new();
    shape.write(&mut v).unwrap();
    v
}

fn small() -> ModelShape {
    ModelShape {
        layers: 1,
        width: 32,
        ff: 64,
        heads: 2,
        kv_heads: 1,
        vocab: 300,
        context_length: 128,
        f16: false,
        seed: 7,
    }
}

#[test]
fn deterministic_per_seed() {
    assert_eq!(bytes(&small()), bytes(&small()));
    let other = ModelShape { seed: 8, ..small() };
    let (a, b) = (bytes(&small()), bytes(&other));
    assert_eq!(a.len(), b.len());
    assert_ne!(a, b, "another seed gives other weights");
}

#[test]
fn header_describes_the_shape() {
    let shape = ModelShape {
        layers: 3,
        width: 64,
        ff: 96,
        heads: 4,
        kv_heads: 2,
        vocab: 400,
        context_length: 512,
        f16: false,
        seed: 1,
    };
    let data = bytes(&shape);
    let h = read_header(&data[..]).unwrap();
    assert_eq!(h.version, 3);
    assert_eq!(h.get_str("general.architecture"), Some("llama"));
    assert_eq!(h.get_u64("llama.block_count"), Some(3));
    assert_eq!(h.get_u64("llama.embedding_length"), Some(64));
    assert_eq!(h.get_u64("llama.feed_forward_length"), Some(96));
    assert_eq!(h.get_u64("llama.attention.head_count"), Some(4));
    assert_eq!(h.get_u64("llama.attention.head_count_kv"), Some(2));
    assert_eq!(h.get_u64("llama.context_length"), Some(512));
    assert_eq!(h.get_u64("llama.rope.dimension_count"), Some(16));
    assert_eq!(h.get_u64("llama.vocab_size"), Some(400));
    // The vocabulary's size is its array's length (the elements are skipped, not kept).
    assert_eq!(h.array_len("tokenizer.ggml.tokens"), Some(400));
    assert_eq!(
        h.get("tokenizer.ggml.tokens"),
        Some(&Value::Array {
            elem: format::ValueType::String as u32,
            len: 400
        })
    );
    assert_eq!(h.tensors.len(), 3 * 9 + 3);
    let k = h
        .tensors
        .iter()
        .find(|t| t.name == "blk.0.attn_k.weight")
        .unwrap();
    assert_eq!(k.dims, vec![64, 32], "GQA: kv width = kv_heads x head_dim");
    // Offsets are aligned and the file holds all the data.
    assert!(h.tensors.iter().all(|t| t.offset % format::ALIGNMENT == 0));
    assert!(data.len() as u64 >= shape.weight_bytes());
    assert!(data.len() as u64 <= shape.weight_bytes() + 64 * 1024);
    assert_eq!(
        h.expected_file_size(),
        Some(data.len() as u64),
        "the infos account for every byte"
    );
    assert_eq!(h.min_file_size(), data.len() as u64);
}

#[test]
fn f16_halves_the_matrices() {
    let f32 = bytes(&small()).len();
    let f16 = bytes(&ModelShape {
        f16: true,
        ..small()
    })
    .len();
    assert!(f16 < f32 * 6 / 10, "{f16} vs {f32}");
    let h = read_header(
        &bytes(&ModelShape {
            f16: true,
            ..small()
        })[..],
    )
    .unwrap();
    let types: Vec<u32> = h.tensors.iter().map(|t| t.ggml_type).collect();
    assert!(types.contains(&format::GGML_F16) && types.contains(&format::GGML_F32));
}

#[test]
fn bad_headers_are_errors() {
    assert!(matches!(
        read_header(&b"PK\x03\x04"[..]),
        Err(ReadError::Magic(_))
    ));
    assert!(matches!(
        read_header(&b"GGUF\x09\0\0\0"[..]),
        Err(ReadError::Version(9))
    ));
    let data = bytes(&small());
    for cut in [3, 10, 30, 100, 2000] {
        assert!(
            matches!(read_header(&data[..cut]), Err(ReadError::Truncated(_))),
            "cut at {cut}"
        );
    }
    // A hostile tensor count is refused before anything is allocated for it.
    let mut hostile = b"GGUF\x03\0\0\0".to_vec();
    hostile.extend(u64::MAX.to_le_bytes());
    hostile.extend(0u64.to_le_bytes());
    assert!(matches!(
        read_header(&hostile[..]),
        Err(ReadError::Malformed(_))
    ));
}

#[test]
fn a_length_past_the_end_is_truncated_not_allocated() {
    // One metadata pair whose key claims 1 GiB (under no limit but the file's end).
    let mut h = b"GGUF\x03\0\0\0".to_vec();
    h.extend(0u64.to_le_bytes()); // tensors
    h.extend(1u64.to_le_bytes()); // metadata pairs
    h.extend((1u64 << 30).to_le_bytes()); // key length
    h.extend(b"abc");
    assert!(read_header(&h[..]).is_err());
}

proptest! {
    /// A real header with a few bytes changed: every outcome is a value or an error.
    #[test]
    fn mutated_headers_never_panic(
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
    ) {
        let mut data = bytes(&small());
        data.truncate(4096);
        for (at, b) in flips {
            let i = at % data.len();
            data[i] = b;
        }
        let _ = read_header(&data[..]);
    }

    #[test]
    fn reader_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut with_magic = b"GGUF\x03\0\0\0".to_vec();
        with_magic.extend(&data);
        let _ = read_header(&data[..]);
        let _ = read_header(&with_magic[..]);
    }
}

/// A header of `pairs` string values of 1 MiB each, made as it is read (never held in memory).
struct Lazy {
    pairs: u64,
    next: u64,
    pending: std::collections::VecDeque<u8>,
    filler: u64,
}

impl Lazy {
    fn new(pairs: u64) -> Lazy {
        let mut start = b"GGUF\x03\0\0\0".to_vec();
        start.extend(0u64.to_le_bytes());
        start.extend(pairs.to_le_bytes());
        Lazy {
            pairs,
            next: 0,
            pending: start.into(),
            filler: 0,
        }
    }
}

impl std::io::Read for Lazy {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pending.is_empty() && self.filler == 0 && self.next < self.pairs {
            let key = format!("k{:07}", self.next);
            self.pending.extend((key.len() as u64).to_le_bytes());
            self.pending.extend(key.as_bytes());
            self.pending.extend(8u32.to_le_bytes());
            self.pending.extend((1u64 << 20).to_le_bytes());
            self.filler = 1 << 20;
            self.next += 1;
        }
        if !self.pending.is_empty() {
            let n = buf.len().min(self.pending.len());
            for b in buf.iter_mut().take(n) {
                *b = self.pending.pop_front().unwrap();
            }
            return Ok(n);
        }
        let n = buf.len().min(self.filler as usize);
        buf[..n].fill(b'a');
        self.filler -= n as u64;
        Ok(n)
    }
}

#[test]
fn a_header_past_the_cap_is_refused() {
    // 200 MiB of metadata: past the documented cap of the header reader.
    let err = read_header(std::io::BufReader::new(Lazy::new(200))).unwrap_err();
    let said = err.to_string();
    assert!(
        said.contains("larger than") && said.contains("128 MiB"),
        "{said}"
    );
    // Under the cap the same kind of header reads.
    let h = read_header(std::io::BufReader::new(Lazy::new(3))).unwrap();
    assert_eq!(h.metadata.len(), 3);
}

#[test]
fn the_cap_is_a_parameter_and_a_header_reads_exactly_its_bytes() {
    let data = bytes(&small());
    let h = read_header(&data[..]).unwrap();
    let len = h.header_len;
    assert!(
        read_header_limited(&data[..], len).is_ok(),
        "the cap is inclusive"
    );
    assert!(matches!(
        read_header_limited(&data[..], len - 1),
        Err(ReadError::TooLarge { .. })
    ));
    // The reader consumes the header and nothing after it (a checksum over what it read is a
    // checksum of the header).
    let mut cursor = std::io::Cursor::new(&data[..]);
    read_header(&mut cursor).unwrap();
    assert_eq!(cursor.position(), len);
}

/// The probe refuses only tensor types the pinned llama.cpp cannot load: IQ and ternary quants
/// and MXFP4 have known layouts (their sizes from ggml-common.h's static_asserts), newer types
/// without one here (NVFP4) still load, removed repacks and ids past GGML_TYPE_COUNT do not.
#[test]
fn tensor_types_the_pinned_llama_cpp_loads() {
    use crate::format::{type_block, type_loadable};
    for (ty, block) in [
        (16, (256, 66)),
        (20, (32, 18)),
        (23, (256, 136)),
        (29, (256, 56)),
        (39, (32, 17)),
    ] {
        assert_eq!(type_block(ty), Some(block), "type {ty}");
        assert!(type_loadable(ty));
    }
    assert!(type_loadable(40) && type_block(40).is_none());
    for ty in [4, 5, 31, 33, 36, 38, 43, 999] {
        assert!(!type_loadable(ty), "type {ty}");
    }
}

/// SHA-256 (FIPS 180-4), so a test can pin a generated model to the digest `sha256sum` prints
/// without a dependency.
fn sha256_hex(data: &[u8]) -> String {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend((data.len() as u64 * 8).to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, c) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    h.iter().map(|x| format!("{x:08x}")).collect()
}

#[test]
fn sha256_is_sha256() {
    assert_eq!(
        sha256_hex(b""),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(
        sha256_hex(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

/// The bytes of models made before the family options existed: the demo model, an f16 GQA
/// model and the small test shape, as `worker make-model` wrote them (`sha256sum` of
/// `worker make-model m.gguf`, `... --f16 --heads 8 --kv-heads 2 --seed 3`, and the small
/// shape's flags). Tests, benchmarks and budgets rely on these staying byte-for-byte the same.
#[test]
fn existing_shapes_keep_their_bytes() {
    for (shape, size, digest) in [
        (
            ModelShape::default(),
            8_940_832,
            "3fd0c6fe26b66902d36542e177c5a7e1768f1a161fd7bb4f78df1d1497262c51",
        ),
        (
            ModelShape {
                f16: true,
                heads: 8,
                kv_heads: 2,
                seed: 3,
                ..ModelShape::default()
            },
            4_091_168,
            "b9b76e9721f65143ddfda4c38de0a56a85cb8fdcbe1d627b21edfbbfd41d42f2",
        ),
        (
            small(),
            122_176,
            "ac51521f12b6227362026c97b319cb0bc20096c640c7de9a0843872bc562cb37",
        ),
    ] {
        let data = bytes(&shape);
        assert_eq!(data.len(), size, "{shape:?}");
        assert_eq!(sha256_hex(&data), digest, "{shape:?}");
    }
}
