//! Stop texts: generation stops before the first occurrence of any of them, and neither the stop
//! text nor anything after it is sent. While streaming, the tail of the reply that could still
//! be the start of a stop text is held back, and released once it cannot be (or at the end).
//!
//! Pure text in, text out: the engine feeds each token's decoded text and sends what comes out.

/// Scans a reply as it streams.
#[derive(Debug, Clone, Default)]
pub struct StopScan {
    stops: Vec<String>,
    /// Text not sent yet: it could still be the start of a stop text.
    held: String,
    stopped: bool,
}

/// What one piece of text gave.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Step {
    /// Text that can be sent now.
    pub emit: String,
    /// A stop text came: generation ends, and `emit` is the last of the reply.
    pub stopped: bool,
}

impl StopScan {
    /// Scans for `stops` (checked with [`check`]; empty texts are ignored).
    pub fn new(stops: impl IntoIterator<Item = String>) -> StopScan {
        StopScan {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Takes the next piece of the reply.
    pub fn push(&mut self, text: &str) -> Step {
        if self.stopped {
            return Step {
                emit: String::new(),
                stopped: true,
            };
        }
        if self.stops.is_empty() {
            return Step {
                emit: text.to_owned(),
                stopped: false,
            };
        }
        self.held.push_str(text);
        // The held text had no whole stop text before this piece, so the first occurrence in it
        // now is the reply's first.
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s)).min() {
            self.held.truncate(at);
            self.stopped = true;
            return Step {
                emit: std::mem::take(&mut self.held),
                stopped: true,
            };
        }
        let keep = self.longest_partial();
        let emit = self.held[..self.held.len() - keep].to_owned();
        self.held.drain(..self.held.len() - keep);
        Step {
            emit,
            stopped: false,
        }
    }

    /// The end of the reply: what was held back, as no stop text can come any more.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Bytes at the end of the held text that are the start of some stop text (the longest such
    /// tail; a whole stop text is never there).
    fn longest_partial(&self) -> usize {
        let held = self.held.as_bytes();
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let from = held.len().saturating_sub(longest.saturating_sub(1));
        (from..held.len())
            .filter(|&start| self.held.is_char_boundary(start))
            .find(|&start| {
                let tail = &held[start..];
                self.stops.iter().any(|s| s.as_bytes().starts_with(tail))
            })
            .map_or(0, |start| held.len() - start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces`; returns what was sent (one entry per piece, then the final release) and
    /// whether it stopped.
    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool) {
        let mut scan = StopScan::new(stops.iter().map(|s| (*s).to_owned()));
        let mut sent = Vec::new();
        for p in pieces {
            let step = scan.push(p);
            sent.push(step.emit);
            if step.stopped {
                return (sent, true);
            }
        }
        sent.push(scan.finish());
        (sent, false)
    }

    #[test]
    fn no_stop_texts_pass_everything_through() {
        let (sent, stopped) = run(&[], &["a", "b"]);
        assert_eq!(
            (sent, stopped),
            (vec!["a".into(), "b".into(), "".into()], false)
        );
    }

    #[test]
    fn a_stop_text_split_across_tokens() {
        let (sent, stopped) = run(&["END"], &["hello E", "N", "D and more"]);
        assert!(stopped);
        assert_eq!(sent, ["hello ", "", ""]);
        assert_eq!(sent.concat(), "hello ");
    }

    #[test]
    fn a_stop_text_inside_one_piece_cuts_the_rest() {
        let (sent, stopped) = run(&["\n\n"], &["one", " two\n\nthree"]);
        assert!(stopped);
        assert_eq!(sent.concat(), "one two");
    }

    #[test]
    fn a_near_miss_is_held_then_released() {
        let (sent, stopped) = run(&["END"], &["a E", "N", "d", " b"]);
        assert!(!stopped);
        assert_eq!(sent, ["a ", "", "ENd", " b", ""]);
        // Held to the end: released by finish.
        let (sent, stopped) = run(&["END"], &["a EN"]);
        assert!(!stopped);
        assert_eq!(sent, ["a ", "EN"]);
    }

    #[test]
    fn the_earliest_of_several_stop_texts_wins() {
        let (sent, stopped) = run(&["world", "lo w", "xyz"], &["hel", "lo world"]);
        assert!(stopped);
        assert_eq!(sent.concat(), "hel");
        // An overlapping longer stop text does not hold back text a shorter one already decides.
        let (sent, stopped) = run(&["abcd", "bc"], &["a", "b", "c", "d"]);
        assert!(stopped);
        assert_eq!(sent.concat(), "a");
    }

    #[test]
    fn multi_byte_utf8() {
        // A stop text of multi-byte characters, split between pieces at a character boundary.
        let (sent, stopped) = run(&["äöü"], &["x ä", "ö", "ü y"]);
        assert!(stopped);
        assert_eq!(sent.concat(), "x ");
        // A tail sharing a first byte with the stop text but not a whole character is sent:
        // "é" (c3 a9) and "ä" (c3 a4) share their first byte.
        let (sent, stopped) = run(&["ä"], &["é", "ä"]);
        assert!(stopped);
        assert_eq!(sent, ["é", ""]);
        let (sent, _) = run(&["€uro"], &["1 €", "u", "ros"]);
        assert_eq!(sent.concat(), "1 ");
    }

    #[test]
    fn nothing_is_sent_after_a_stop() {
        let mut scan = StopScan::new(["x".to_owned()]);
        assert!(scan.push("ax").stopped);
        assert_eq!(scan.push("more").emit, "");
        assert_eq!(scan.finish(), "");
    }
}
