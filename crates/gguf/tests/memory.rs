//! The header reader's memory stays bounded whatever the arrays hold: a header made mostly of
//! a large vocabulary-like array must not cost a multiple of its size in memory (it once cost
//! ~32x). Its own test binary, so the counting allocator sees this test only.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on unchanged.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn kv_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// A header of one u8 array of `bytes` elements, one string array of `strings` tokens and the
/// architecture key.
fn big_array_header(bytes: u64, strings: u64) -> Vec<u8> {
    let mut h = b"GGUF\x03\0\0\0".to_vec();
    h.extend(0u64.to_le_bytes()); // tensors
    h.extend(3u64.to_le_bytes()); // metadata pairs
    kv_string(&mut h, "general.architecture");
    h.extend(8u32.to_le_bytes());
    kv_string(&mut h, "llama");
    kv_string(&mut h, "big.u8s");
    h.extend(9u32.to_le_bytes()); // array
    h.extend(0u32.to_le_bytes()); // of u8
    h.extend(bytes.to_le_bytes());
    h.resize(h.len() + bytes as usize, 7);
    kv_string(&mut h, "tokenizer.ggml.tokens");
    h.extend(9u32.to_le_bytes());
    h.extend(8u32.to_le_bytes()); // of strings
    h.extend(strings.to_le_bytes());
    for i in 0..strings {
        kv_string(&mut h, &format!("tok{i:05}"));
    }
    h
}

#[test]
fn a_big_array_header_is_read_in_bounded_memory() {
    let data = big_array_header(2 << 20, 200_000);
    assert!(data.len() > 4 << 20);
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let header = belljar_gguf::read_header(&data[..]).unwrap();
    let peak = PEAK.load(Ordering::Relaxed) - before;
    assert_eq!(header.get_str("general.architecture"), Some("llama"));
    assert!(
        peak < 256 << 10,
        "reading a {} byte header allocated up to {peak} bytes at once",
        data.len()
    );
    drop(header);
}
