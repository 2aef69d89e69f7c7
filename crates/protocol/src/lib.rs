//! Wire types only: the worker link (supervisor <-> worker) and, later, the control socket,
//! plus the frame codec both use. A frame is a 4-byte big-endian length and that many bytes of
//! JSON; a frame longer than the codec's maximum is refused before anything is allocated for it.

pub mod control;
pub mod exit;
mod finite;
pub mod frame;
pub mod worker;

#[cfg(feature = "tokio")]
pub use frame::tokio_io;
pub use frame::{FrameError, FrameReader, MAX_FRAME, decode, encode, write_frame};

/// Bumped on any incompatible change to a message. Exchanged in the handshake
/// (`Hello` / `Welcome`); a mismatch ends the connection with a clear error.
pub const PROTOCOL_VERSION: u32 = 3;

/// The most bytes of any text a worker supplies (a reason, an error, a token) that the
/// supervisor keeps or passes on; longer texts are cut by [`cut`]. A worker cannot make a
/// status reply outgrow the frame cap with a long reason.
pub const MAX_TEXT: usize = 1024;

/// Cuts `text` to at most `max` bytes on a character boundary, ending it with a marker that
/// says how many bytes were dropped. The marker fits in the `max` bytes when `max` is at least
/// 40.
pub fn cut(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    // The marker is never longer than this one, which counts the whole text as dropped.
    let longest = format!("… [{} bytes cut]", text.len());
    let mut end = max.saturating_sub(longest.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let dropped = text.len() - end;
    text.truncate(end);
    text.push_str(&format!("… [{dropped} bytes cut]"));
}

#[cfg(test)]
mod tests {
    use super::cut;

    #[test]
    fn cut_keeps_short_texts_and_bounds_long_ones_on_a_char_boundary() {
        let mut short = "fits".to_owned();
        cut(&mut short, 1024);
        assert_eq!(short, "fits");
        for len in [1025, 4096, 1 << 20] {
            let mut long = "é".repeat(len);
            cut(&mut long, 1024);
            assert!(long.len() <= 1024, "{} bytes", long.len());
            assert!(long.ends_with(" bytes cut]"), "{long}");
            assert!(long.starts_with("éé"));
        }
    }
}
