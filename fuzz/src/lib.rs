//! Shared by the fuzz targets: a counting global allocator that bounds the heap one case may
//! hold, and the round-trip check every wire message gets.
//!
//! libFuzzer's `-malloc_limit_mb` needs a sanitizer's malloc hooks, and the targets are built
//! without a sanitizer (the code under test is safe Rust; ASan's shadow memory and quarantine
//! alone would break a 64 MiB `-rss_limit_mb`). So the limit is enforced here, exactly and on
//! every allocation: more than [`HEAP_LIMIT`] bytes live at once aborts the case with a message,
//! which libFuzzer reports as a crash and saves. libFuzzer's own memory is C++ `malloc`, not
//! this allocator, so what is counted is the code under test (and a few bytes of std statics).

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Debug;
use std::io::Write;
use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};

use belljar_protocol::{FrameReader, MAX_FRAME, decode, encode};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Most heap one case may hold at once: the bound on what a hostile input may cost.
pub const HEAP_LIMIT: usize = 64 << 20;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static ABORTING: AtomicBool = AtomicBool::new(false);

/// The global allocator of every target: [`System`] plus a count of live bytes.
#[derive(Debug)]
pub struct Counting;

#[global_allocator]
static ALLOC: Counting = Counting;

impl Counting {
    fn grew(&self, by: usize) {
        let live = LIVE.fetch_add(by, Relaxed) + by;
        PEAK.fetch_max(live, Relaxed);
        if live > HEAP_LIMIT && !ABORTING.swap(true, Relaxed) {
            // Formatting integers into a locked stderr does not allocate.
            let _ = writeln!(
                std::io::stderr().lock(),
                "==belljar-fuzz== out of memory: {live} bytes live after an allocation of {by} \
                 (limit {HEAP_LIMIT}, 64 MiB)"
            );
            std::process::abort();
        }
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the counter
// updates have no effect on the memory returned.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.grew(layout.size());
        // SAFETY: forwarded with the caller's layout, which meets `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.grew(layout.size());
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Relaxed);
        // SAFETY: `ptr` was allocated by `System` (through this allocator) with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // The net change is counted (glibc moves large blocks with mremap, without a copy).
        if new_size > layout.size() {
            self.grew(new_size - layout.size());
        }
        // SAFETY: forwarded unchanged; the caller meets `realloc`'s contract.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if new.is_null() {
            if new_size > layout.size() {
                LIVE.fetch_sub(new_size - layout.size(), Relaxed);
            }
        } else if new_size < layout.size() {
            LIVE.fetch_sub(layout.size() - new_size, Relaxed);
        }
        new
    }
}

/// Call at the start of every case: on the first, registers the exit report of the largest heap
/// any case held (scripts/fuzz reads the line).
pub fn start_case() {
    static REPORT: Once = Once::new();
    REPORT.call_once(|| {
        unsafe extern "C" {
            fn atexit(f: extern "C" fn()) -> i32;
        }
        extern "C" fn report() {
            eprintln!(
                "==belljar-fuzz== peak heap: {} bytes (limit {HEAP_LIMIT})",
                PEAK.load(Relaxed)
            );
        }
        // SAFETY: `report` is a plain `extern "C" fn()` that lives as long as the program.
        unsafe {
            atexit(report);
        }
    });
}

/// The wire messages' property: whatever `payload` decodes to as `T` re-encodes into one frame
/// within [`MAX_FRAME`], the frame reads back through [`FrameReader`], decodes to an equal
/// message, and encodes again to the same bytes.
pub fn round_trip<T>(payload: &[u8]) -> Option<T>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let msg: T = decode(payload).ok()?;
    let frame = match encode(&msg, MAX_FRAME) {
        Ok(frame) => frame,
        Err(e) => panic!("{msg:?} decoded but does not encode: {e}"),
    };
    let len = u32::from_be_bytes(frame[..4].try_into().expect("4 bytes")) as usize;
    assert_eq!(len, frame.len() - 4, "the length prefix is the payload's");
    assert!(len <= MAX_FRAME, "an encoded frame exceeds the cap");
    let mut reader = FrameReader::new(&frame[..], MAX_FRAME);
    let back = reader
        .read_frame()
        .expect("the frame reads back")
        .expect("one frame");
    assert!(reader.read_frame().expect("clean end").is_none());
    let again: T = match decode(&back) {
        Ok(m) => m,
        Err(e) => panic!(
            "{msg:?} encodes to {} which does not decode: {e}",
            String::from_utf8_lossy(&back)
        ),
    };
    assert_eq!(msg, again, "the message changed in a round trip");
    let frame2 = encode(&again, MAX_FRAME).expect("encodes again");
    assert_eq!(frame, frame2, "the encoding is not stable");
    Some(again)
}
