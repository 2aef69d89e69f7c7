//! The GGUF header reader on any bytes: an error or a header, never a panic, and never more than
//! the heap limit (a hostile header must stay under 64 MiB). A header that reads must be
//! consistent with the bytes it came from, and its derived sizes must not panic.
#![no_main]

use belljar_fuzz::start_case;
use belljar_gguf::read_header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    start_case();
    let Ok(header) = read_header(data) else {
        return;
    };
    assert!(
        header.header_len <= data.len() as u64,
        "header_len {} is past the end of {} bytes",
        header.header_len,
        data.len()
    );
    assert!(header.data_offset() >= header.header_len);
    let _ = header.expected_file_size();
    for t in &header.tensors {
        assert!((1..=4).contains(&t.dims.len()));
        let _ = (t.elements(), t.bytes());
    }
    for key in [
        "general.alignment",
        "general.architecture",
        "llama.context_length",
    ] {
        let _ = (header.get_u64(key), header.get_str(key));
    }
    // The header is exactly its first header_len bytes. (The first reading is dropped before
    // the second, so one case holds one header: the heap limit is per reading.)
    let (len, tensors) = (header.header_len, header.tensors);
    drop(header.metadata);
    let again = read_header(&data[..len as usize]).expect("the header's own bytes");
    assert_eq!(again.header_len, len);
    assert_eq!(again.tensors, tensors);
});
