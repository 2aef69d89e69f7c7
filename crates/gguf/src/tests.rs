use super::*;
use proptest::prelude::*;

use crate::writer::MAX_VOCAB;

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

fn spec_bytes(spec: &ModelSpec) -> Vec<u8> {
    let mut v = Vec::new();
    spec.write(&mut v).unwrap();
    v
}

fn float(h: &Header, key: &str) -> Option<f64> {
    match h.get(key)? {
        Value::Float(f) => Some(*f),
        _ => None,
    }
}

/// The expected (name, dims, type) of every tensor, in file order, built here independently of
/// the writer's lists: llama.cpp's loader (src/models/llama.cpp, gemma3.cpp) asks for these.
fn expected_tensors(spec: &ModelSpec) -> Vec<(String, Vec<u64>, u32)> {
    let s = &spec.shape;
    let (w, ff, v) = (u64::from(s.width), u64::from(s.ff), u64::from(s.vocab));
    let hd = u64::from(spec.head_dim.unwrap_or(s.width / s.heads));
    let (q, kv) = (u64::from(s.heads) * hd, u64::from(s.kv_heads) * hd);
    let m = spec.weight_type().ggml_type();
    let f = format::GGML_F32;
    let mut out = vec![("token_embd.weight".to_owned(), vec![w, v], m)];
    for i in 0..s.layers {
        let b = |n: &str| format!("blk.{i}.{n}.weight");
        out.push((b("attn_norm"), vec![w], f));
        out.push((b("attn_q"), vec![w, q], m));
        out.push((b("attn_k"), vec![w, kv], m));
        out.push((b("attn_v"), vec![w, kv], m));
        out.push((b("attn_output"), vec![q, w], m));
        if spec.arch == Arch::Gemma3 {
            out.push((b("attn_q_norm"), vec![hd], f));
            out.push((b("attn_k_norm"), vec![hd], f));
            out.push((b("post_attention_norm"), vec![w], f));
        }
        out.push((b("ffn_norm"), vec![w], f));
        out.push((b("ffn_gate"), vec![w, ff], m));
        out.push((b("ffn_down"), vec![ff, w], m));
        out.push((b("ffn_up"), vec![w, ff], m));
        if spec.arch == Arch::Gemma3 {
            out.push((b("post_ffw_norm"), vec![w], f));
        }
    }
    out.push(("output_norm.weight".to_owned(), vec![w], f));
    if !spec.tied {
        out.push(("output.weight".to_owned(), vec![w, v], m));
    }
    out
}

/// Every tensor has the expected name, dims and type, its size is its type's blocks
/// ([`format::type_block`]), tensors follow each other at aligned offsets, and the file holds
/// exactly the data the infos describe.
fn assert_tensors(spec: &ModelSpec, h: &Header, file: &[u8]) {
    let expected = expected_tensors(spec);
    let got: Vec<(String, Vec<u64>, u32)> = h
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.dims.clone(), t.ggml_type))
        .collect();
    assert_eq!(got, expected);
    let mut offset = 0;
    for t in &h.tensors {
        let (block, size) = format::type_block(t.ggml_type).unwrap();
        assert_eq!(t.elements() % block, 0, "{}: whole blocks", t.name);
        assert_eq!(t.bytes(), Some(t.elements() / block * size), "{}", t.name);
        assert_eq!(t.offset, offset, "{}", t.name);
        offset = (offset + t.bytes().unwrap()).div_ceil(format::ALIGNMENT) * format::ALIGNMENT;
    }
    // The last tensor is padded too, as ggml's own writer does (gguf.cpp counts every tensor's
    // padded size): the file is the infos' extent, aligned.
    let end = h.expected_file_size().unwrap();
    assert!(end <= file.len() as u64 && file.len() as u64 - end < format::ALIGNMENT);
    assert_eq!(h.data_offset() + offset, file.len() as u64);
    let weights: u64 = h.tensors.iter().map(|t| t.bytes().unwrap()).sum();
    assert_eq!(spec.weight_bytes(), weights);
    let params: u64 = h.tensors.iter().map(TensorInfo::elements).sum();
    assert_eq!(spec.parameters(), params);
}

/// A Gemma-3-like spec: head dimension 64 at width 128 over 2 heads and 1 KV head.
fn gemma3() -> ModelSpec {
    ModelSpec {
        shape: ModelShape {
            layers: 2,
            width: 128,
            ff: 256,
            heads: 2,
            kv_heads: 1,
            vocab: 512,
            context_length: 2048,
            f16: false,
            seed: 5,
        },
        arch: Arch::Gemma3,
        head_dim: Some(64),
        sliding_window: Some(64),
        swa_pattern: Some(2),
        tied: true,
        weights: Some(WeightType::Q8_0),
    }
}

#[test]
fn gemma3_header_has_what_llama_cpps_gemma3_loader_reads() {
    let spec = gemma3();
    let file = spec_bytes(&spec);
    let h = read_header(&file[..]).unwrap();
    assert_eq!(h.get_str("general.architecture"), Some("gemma3"));
    assert_eq!(
        h.get_u64("general.file_type"),
        Some(7),
        "LLAMA_FTYPE_MOSTLY_Q8_0"
    );
    for (key, value) in [
        ("gemma3.context_length", 2048),
        ("gemma3.embedding_length", 128),
        ("gemma3.block_count", 2),
        ("gemma3.feed_forward_length", 256),
        ("gemma3.attention.head_count", 2),
        ("gemma3.attention.head_count_kv", 1),
        ("gemma3.attention.key_length", 64),
        ("gemma3.attention.value_length", 64),
        ("gemma3.attention.sliding_window", 64),
        ("gemma3.attention.sliding_window_pattern", 2),
    ] {
        assert_eq!(h.get_u64(key), Some(value), "{key}");
    }
    assert_eq!(
        float(&h, "gemma3.attention.layer_norm_rms_epsilon"),
        Some(f64::from(1e-6f32))
    );
    assert_eq!(float(&h, "gemma3.rope.freq_base"), Some(1e6));
    assert!(
        h.metadata.iter().all(|(k, _)| !k.starts_with("llama.")),
        "no llama keys"
    );
    assert_eq!(h.array_len("tokenizer.ggml.tokens"), Some(512));
    assert_tensors(&spec, &h, &file);
    assert!(h.tensors.iter().all(|t| t.name != "output.weight"), "tied");

    // Without the pattern, llama.cpp's default applies: no key.
    let default_pattern = ModelSpec {
        swa_pattern: None,
        ..gemma3()
    };
    let h = read_header(&spec_bytes(&default_pattern)[..]).unwrap();
    assert_eq!(h.get("gemma3.attention.sliding_window_pattern"), None);
    assert_eq!(h.get_u64("gemma3.attention.sliding_window"), Some(64));
    // Without a window, neither key; gemma3 still writes the head dimension.
    let global = ModelSpec {
        swa_pattern: None,
        sliding_window: None,
        head_dim: None,
        ..gemma3()
    };
    let file = spec_bytes(&global);
    let h = read_header(&file[..]).unwrap();
    assert!(
        h.metadata
            .iter()
            .all(|(k, _)| !k.contains("sliding_window"))
    );
    assert_eq!(h.get_u64("gemma3.attention.key_length"), Some(64));
    assert_tensors(&global, &h, &file);
}

#[test]
fn a_head_dimension_other_than_width_over_heads() {
    let spec = ModelSpec {
        shape: ModelShape {
            layers: 2,
            width: 64,
            ff: 96,
            heads: 4,
            kv_heads: 2,
            ..small()
        },
        head_dim: Some(24),
        ..ModelSpec::default()
    };
    let file = spec_bytes(&spec);
    let h = read_header(&file[..]).unwrap();
    assert_eq!(h.get_str("general.architecture"), Some("llama"));
    assert_eq!(h.get_u64("llama.attention.key_length"), Some(24));
    assert_eq!(h.get_u64("llama.attention.value_length"), Some(24));
    assert_eq!(
        h.get_u64("llama.rope.dimension_count"),
        Some(24),
        "llama.cpp's llama loader requires n_rot == key_length"
    );
    let dims = |name: &str| {
        h.tensors
            .iter()
            .find(|t| t.name == name)
            .unwrap()
            .dims
            .clone()
    };
    assert_eq!(dims("blk.1.attn_q.weight"), vec![64, 4 * 24]);
    assert_eq!(dims("blk.1.attn_k.weight"), vec![64, 2 * 24]);
    assert_eq!(dims("blk.1.attn_v.weight"), vec![64, 2 * 24]);
    assert_eq!(dims("blk.1.attn_output.weight"), vec![4 * 24, 64]);
    assert_tensors(&spec, &h, &file);

    // Without --head-dim no key_length keys are written, as before.
    let h = read_header(&bytes(&small())[..]).unwrap();
    assert!(h.metadata.iter().all(|(k, _)| !k.contains("_length.")));
    assert_eq!(h.get("llama.attention.key_length"), None);
    assert_eq!(h.get("llama.attention.value_length"), None);
}

#[test]
fn tied_llama_has_no_output_matrix() {
    let tied = ModelSpec {
        tied: true,
        ..ModelSpec::from(small())
    };
    let file = spec_bytes(&tied);
    let h = read_header(&file[..]).unwrap();
    assert!(h.tensors.iter().all(|t| t.name != "output.weight"));
    assert!(h.tensors.iter().any(|t| t.name == "token_embd.weight"));
    assert_tensors(&tied, &h, &file);
    let untied = read_header(&bytes(&small())[..]).unwrap();
    assert_eq!(untied.tensors.len(), h.tensors.len() + 1);
}

#[test]
fn every_type_reads_back_with_its_layout() {
    for (ty, ggml, file_type) in [
        (WeightType::F32, format::GGML_F32, 0),
        (WeightType::F16, format::GGML_F16, 1),
        (WeightType::Q8_0, format::GGML_Q8_0, 7),
        (WeightType::Q4_0, format::GGML_Q4_0, 2),
    ] {
        for arch in [Arch::Llama, Arch::Gemma3] {
            let spec = ModelSpec {
                arch,
                weights: Some(ty),
                ..ModelSpec::from(small())
            };
            let file = spec_bytes(&spec);
            let h = read_header(&file[..]).unwrap();
            assert_eq!(h.get_u64("general.file_type"), Some(file_type), "{ty:?}");
            let embd = &h.tensors[0];
            assert_eq!(
                (embd.name.as_str(), embd.ggml_type),
                ("token_embd.weight", ggml),
                "the token embeddings take the matrices' type"
            );
            assert_tensors(&spec, &h, &file);
        }
    }
    // --f16 is --type f16: the same bytes.
    let f16 = bytes(&ModelShape {
        f16: true,
        ..small()
    });
    let typed = spec_bytes(&ModelSpec {
        weights: Some(WeightType::F16),
        ..ModelSpec::from(small())
    });
    assert_eq!(f16, typed);
    let both = spec_bytes(&ModelSpec {
        weights: Some(WeightType::F16),
        ..ModelSpec::from(ModelShape {
            f16: true,
            ..small()
        })
    });
    assert_eq!(f16, both);
}

#[test]
fn a_262144_token_vocabulary() {
    let shape = ModelShape {
        vocab: 262_144,
        ..small()
    };
    let spec = ModelSpec {
        tied: true,
        weights: Some(WeightType::Q4_0),
        ..ModelSpec::from(shape.clone())
    };
    let started = std::time::Instant::now();
    let file = spec_bytes(&spec);
    let took = started.elapsed();
    let h = read_header(&file[..]).unwrap();
    assert_eq!(h.array_len("tokenizer.ggml.tokens"), Some(262_144));
    assert_eq!(h.array_len("tokenizer.ggml.scores"), Some(262_144));
    assert_eq!(h.array_len("tokenizer.ggml.token_type"), Some(262_144));
    assert_eq!(h.get_u64("llama.vocab_size"), Some(262_144));
    assert_tensors(&spec, &h, &file);
    let tokens = shape.tokens();
    let unique: std::collections::BTreeSet<&String> = tokens.iter().collect();
    assert_eq!(
        unique.len(),
        262_144,
        "duplicate tokens make llama.cpp abort"
    );
    eprintln!(
        "262144-token model: {} bytes ({} of header) in {took:?}",
        file.len(),
        h.header_len
    );
    assert!(
        took < std::time::Duration::from_secs(5),
        "{took:?} for a ~10 MB model"
    );
}

/// The data of tensor `name` in a whole file, with its info.
fn tensor_data<'a>(h: &'a Header, file: &'a [u8], name: &str) -> (&'a TensorInfo, &'a [u8]) {
    let t = h.tensors.iter().find(|t| t.name == name).unwrap();
    let start = (h.data_offset() + t.offset) as usize;
    (t, &file[start..start + t.bytes().unwrap() as usize])
}

fn f16_at(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// ggml's dequantize_row_q8_0: per block of 34 bytes, x = d * q.
fn dequantize_q8_0(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(34)
        .flat_map(|b| {
            let d = f16_at(b);
            b[2..].iter().map(move |q| d * f32::from(*q as i8))
        })
        .collect()
}

/// ggml's dequantize_row_q4_0: per block of 18 bytes, element j is byte j's low nibble and
/// element j + 16 its high nibble, each x = d * (q - 8).
fn dequantize_q4_0(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(18)
        .flat_map(|b| {
            let d = f16_at(b);
            let qs = &b[2..];
            let low = qs.iter().map(move |q| d * (i32::from(q & 0x0f) - 8) as f32);
            let high = qs.iter().map(move |q| d * (i32::from(q >> 4) - 8) as f32);
            low.chain(high).collect::<Vec<_>>()
        })
        .collect()
}

fn f32s(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Q8_0 and Q4_0 blocks hold the f32 model's values (the same seed gives the same random
/// values whatever the type): dequantized, each is within half a step (Q8_0) or one step
/// (Q4_0, whose top value clamps) of the f32 value, and each block's scale is ggml's.
#[test]
fn quantized_blocks_dequantize_to_the_f32_values() {
    let shape = ModelShape {
        layers: 2,
        width: 64,
        ff: 96,
        heads: 2,
        kv_heads: 1,
        vocab: 300,
        ..small()
    };
    let f32_file = bytes(&shape);
    let f32_h = read_header(&f32_file[..]).unwrap();
    for ty in [WeightType::Q8_0, WeightType::Q4_0] {
        let spec = ModelSpec {
            weights: Some(ty),
            ..ModelSpec::from(shape.clone())
        };
        let file = spec_bytes(&spec);
        let h = read_header(&file[..]).unwrap();
        let mut checked = 0;
        for t in h.tensors.iter().filter(|t| t.dims.len() == 2) {
            let (_, raw) = tensor_data(&f32_h, &f32_file, &t.name);
            let want = f32s(raw);
            let (_, q) = tensor_data(&h, &file, &t.name);
            let (got, block_bytes) = match ty {
                WeightType::Q8_0 => (dequantize_q8_0(q), 34),
                _ => (dequantize_q4_0(q), 18),
            };
            assert_eq!(got.len(), want.len(), "{}", t.name);
            for (i, (block, x)) in q.chunks_exact(block_bytes).zip(want.chunks(32)).enumerate() {
                let d = f16_at(block);
                let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let (scale, step) = match ty {
                    // d = amax / 127: every value within half a step.
                    WeightType::Q8_0 => (amax / 127.0, 0.5),
                    // d = -max / 8 for the value of largest magnitude: it is exactly -8 steps;
                    // +8 steps clamps to 7, so the far side is within a step.
                    _ => {
                        let max = x
                            .iter()
                            .copied()
                            .fold(0.0f32, |m, v| if v.abs() > m.abs() { v } else { m });
                        (max / -8.0, 1.0)
                    }
                };
                assert_eq!(
                    d,
                    half::f16::from_f32(scale).to_f32(),
                    "{} block {i}",
                    t.name
                );
                for (j, (g, w)) in got[i * 32..(i + 1) * 32].iter().zip(x).enumerate() {
                    // The f16 scale's rounding (2^-11 relative) over up to 8 or 127 steps.
                    let tol = d.abs() * step + w.abs() * 2e-3 + 1e-7;
                    assert!(
                        (g - w).abs() <= tol,
                        "{:?} {} [{}]: {g} vs {w} (d {d})",
                        ty,
                        t.name,
                        i * 32 + j
                    );
                }
                checked += 1;
            }
        }
        assert!(checked > 100, "{checked} blocks");
    }
}

#[test]
fn bad_specs_are_refused_with_the_fix() {
    let base = || ModelSpec::from(small());
    let g3 = gemma3;
    let q = |ty| ModelSpec {
        weights: Some(ty),
        ..base()
    };
    let cases: Vec<(ModelSpec, &[&str])> = vec![
        (
            ModelSpec {
                head_dim: Some(0),
                ..base()
            },
            &["head-dim must be at least 1"],
        ),
        (
            ModelSpec {
                head_dim: Some(7),
                ..base()
            },
            &["--head-dim 7 must be even"],
        ),
        (
            ModelSpec {
                shape: ModelShape {
                    layers: 513,
                    ..small()
                },
                ..base()
            },
            &["513", "--layers 512 or fewer"],
        ),
        (
            ModelSpec {
                shape: ModelShape {
                    vocab: MAX_VOCAB + 1,
                    ..small()
                },
                ..base()
            },
            &["smaller --vocab"],
        ),
        (
            ModelSpec {
                shape: ModelShape {
                    f16: true,
                    ..small()
                },
                weights: Some(WeightType::Q8_0),
                ..base()
            },
            &["--f16", "conflicts with --type q8_0"],
        ),
        (
            ModelSpec {
                sliding_window: Some(64),
                ..base()
            },
            &["--sliding-window needs --arch gemma3"],
        ),
        (
            ModelSpec {
                swa_pattern: Some(2),
                ..base()
            },
            &["--swa-pattern needs --sliding-window"],
        ),
        (
            ModelSpec {
                swa_pattern: Some(2),
                sliding_window: None,
                ..g3()
            },
            &["--swa-pattern needs --sliding-window"],
        ),
        (
            ModelSpec {
                sliding_window: Some(0),
                ..g3()
            },
            &["leave --sliding-window out"],
        ),
        (
            ModelSpec {
                sliding_window: Some(4096),
                ..g3()
            },
            &["--context-length 2048", "at most 2048"],
        ),
        (
            ModelSpec {
                swa_pattern: Some(0),
                ..g3()
            },
            &["larger than --layers (2)"],
        ),
        (
            ModelSpec {
                swa_pattern: Some(1),
                ..g3()
            },
            &["aborts", "2 or more"],
        ),
        (
            ModelSpec {
                shape: ModelShape {
                    width: 48,
                    heads: 2,
                    ..small()
                },
                ..q(WeightType::Q8_0)
            },
            &[
                "--type q8_0",
                "--width is 48",
                "multiple of 32",
                "--type f32 or f16",
            ],
        ),
        (
            ModelSpec {
                shape: ModelShape { ff: 100, ..small() },
                ..q(WeightType::Q4_0)
            },
            &["--type q4_0", "--ff is 100", "pick a --ff"],
        ),
        (
            ModelSpec {
                head_dim: Some(10),
                ..q(WeightType::Q4_0)
            },
            &["--heads x head dimension", "is 20", "--head-dim"],
        ),
        (
            ModelSpec {
                shape: ModelShape {
                    width: u32::MAX - 31,
                    heads: 1,
                    kv_heads: 1,
                    vocab: MAX_VOCAB,
                    ..small()
                },
                head_dim: Some(2),
                ..base()
            },
            &["1 TiB", "smaller"],
        ),
        (
            ModelSpec {
                shape: ModelShape {
                    heads: u32::MAX,
                    kv_heads: u32::MAX,
                    ..small()
                },
                head_dim: Some(u32::MAX - 1),
                ..base()
            },
            &["1 TiB"],
        ),
        (
            ModelSpec {
                shape: ModelShape {
                    heads: 3,
                    kv_heads: 2,
                    ..g3().shape
                },
                ..g3()
            },
            &["--kv-heads must divide"],
        ),
    ];
    for (spec, says) in cases {
        let err = spec
            .check()
            .expect_err(&format!("{spec:?} must be refused"))
            .to_string();
        for s in says {
            assert!(err.contains(s), "{spec:?}: {err:?} lacks {s:?}");
        }
        // write refuses it too, before writing anything.
        let mut out = Vec::new();
        assert!(spec.write(&mut out).is_err());
        assert!(out.is_empty());
    }
    // The same checks pass their good neighbours.
    for good in [
        g3(),
        ModelSpec {
            swa_pattern: Some(3),
            ..g3()
        },
        ModelSpec {
            sliding_window: Some(2048),
            ..g3()
        },
        ModelSpec {
            head_dim: Some(16),
            ..q(WeightType::Q4_0)
        },
    ] {
        good.check().unwrap();
    }
}

/// A dimension: mostly small and valid, sometimes 0, odd, or huge.
fn dim() -> impl Strategy<Value = u32> {
    prop_oneof![
        6 => (1u32..=4).prop_map(|x| x * 32),
        1 => 0u32..=70,
        1 => any::<u32>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// Any combination is a checked spec or a refusal, never a panic; a checked one (kept small
    /// to write here) writes a file whose header the reader reads and whose size its infos
    /// account for.
    #[test]
    fn any_spec_is_written_or_refused(
        layers in prop_oneof![8 => 1u32..=3, 1 => 0u32..=600, 1 => any::<u32>()],
        (width, ff) in (dim(), dim()),
        heads in prop_oneof![
            6 => proptest::sample::select(vec![1u32, 2, 4]),
            1 => 0u32..=9,
            1 => any::<u32>(),
        ],
        kv_heads in prop_oneof![6 => Just(1u32), 1 => 0u32..=9, 1 => any::<u32>()],
        vocab in prop_oneof![8 => 259u32..=600, 1 => 0u32..=300, 1 => any::<u32>()],
        context_length in prop_oneof![8 => 1u32..=4096, 1 => any::<u32>()],
        gemma in any::<bool>(),
        head_dim in proptest::option::of(prop_oneof![
            4 => (1u32..=4).prop_map(|x| x * 16),
            1 => 0u32..=80,
            1 => any::<u32>(),
        ]),
        sliding_window in prop_oneof![
            4 => Just(None),
            4 => (1u32..=600).prop_map(Some),
            1 => proptest::option::of(any::<u32>()),
        ],
        swa_pattern in prop_oneof![
            4 => Just(None),
            4 => (2u32..=8).prop_map(Some),
            1 => (0u32..=2).prop_map(Some),
        ],
        tied in any::<bool>(),
        f16 in proptest::bool::weighted(0.2),
        weights in proptest::option::of(0usize..4),
        seed in any::<u64>(),
    ) {
        let spec = ModelSpec {
            shape: ModelShape { layers, width, ff, heads, kv_heads, vocab, context_length, f16, seed },
            arch: if gemma { Arch::Gemma3 } else { Arch::Llama },
            head_dim,
            sliding_window,
            swa_pattern,
            tied,
            weights: weights.map(|i| {
                [WeightType::F32, WeightType::F16, WeightType::Q8_0, WeightType::Q4_0][i]
            }),
        };
        let _ = (spec.parameters(), spec.weight_bytes(), spec.head_dim());
        match spec.check() {
            Err(e) => prop_assert!(!e.to_string().is_empty()),
            Ok(()) => {
                if spec.weight_bytes() <= 4 << 20 && vocab <= 600 && layers <= 8 {
                    let file = spec_bytes(&spec);
                    let h = read_header(&file[..]).unwrap();
                    assert_tensors(&spec, &h, &file);
                }
            }
        }
    }
}
