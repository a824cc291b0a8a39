//! Turns a script's output bytes into log records of whole lines.
//!
//! One record holds every complete line one read returned (lines joined by `\n`, no `\n` at
//! the end), up to [`MAX_CHUNK_BYTES`]: a script that prints a million short lines makes a
//! few hundred records, not a million, so the spool, the agent's batches, the coordinator's
//! rows and a follower's writes cost per chunk rather than per line. Nothing waits for a
//! chunk to fill: what a read returned is handed on at once, only an unfinished line is
//! held until its newline (or [`MAX_LINE_BYTES`], where it is cut, or the end).
//!
//! A record with one line is exactly the record of older agents, so readers need no
//! version: a record's lines are its text split at `\n`.

/// Longest line kept as one line; longer output is cut into lines of this size.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// Most bytes of lines in one record (a single line may take up to [`MAX_LINE_BYTES`]).
pub const MAX_CHUNK_BYTES: usize = 64 * 1024;

/// Splits a stream of bytes into records of whole lines (`\r\n` and `\n` endings removed).
#[derive(Default)]
pub struct LineChunker {
    /// The line not yet ended.
    partial: Vec<u8>,
    /// Complete lines of the record being built, joined by `\n`.
    chunk: Vec<u8>,
    /// Lines in `chunk` (an empty line makes `chunk` empty but still counts).
    lines: usize,
}

impl LineChunker {
    /// The records that `bytes` completed; an unfinished line is kept for the next call.
    pub fn push(&mut self, mut bytes: &[u8]) -> Vec<String> {
        let mut records = Vec::new();
        while !bytes.is_empty() {
            let room = MAX_LINE_BYTES - self.partial.len();
            let window = &bytes[..bytes.len().min(room)];
            match window.iter().position(|&b| b == b'\n') {
                Some(end) => {
                    self.partial.extend_from_slice(&window[..end]);
                    bytes = &bytes[end + 1..];
                    self.end_line(&mut records);
                }
                None => {
                    self.partial.extend_from_slice(window);
                    bytes = &bytes[window.len()..];
                    if self.partial.len() >= MAX_LINE_BYTES {
                        self.end_line(&mut records);
                    }
                }
            }
        }
        self.flush(&mut records);
        records
    }

    /// The last line, if the output ended without a newline.
    pub fn finish(&mut self) -> Option<String> {
        let mut records = Vec::new();
        if !self.partial.is_empty() {
            self.end_line(&mut records);
        }
        self.flush(&mut records);
        records.pop()
    }

    fn end_line(&mut self, records: &mut Vec<String>) {
        if self.partial.last() == Some(&b'\r') {
            self.partial.pop();
        }
        if self.lines > 0 && self.chunk.len() + 1 + self.partial.len() > MAX_CHUNK_BYTES {
            self.flush(records);
        }
        if self.lines > 0 {
            self.chunk.push(b'\n');
        }
        self.chunk.extend_from_slice(&self.partial);
        self.partial.clear();
        self.lines += 1;
    }

    fn flush(&mut self, records: &mut Vec<String>) {
        if self.lines > 0 {
            records.push(String::from_utf8_lossy(&self.chunk).into_owned());
            self.chunk.clear();
            self.lines = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every line of the records, as a reader of the stored log sees them.
    fn lines_of(records: &[String]) -> Vec<&str> {
        records.iter().flat_map(|r| r.split('\n')).collect()
    }

    #[test]
    fn whole_lines_of_one_read_make_one_record_and_unfinished_lines_wait() {
        let mut chunker = LineChunker::default();
        assert_eq!(chunker.push(b"one\r\ntw"), vec!["one"]);
        assert_eq!(chunker.push(b"o\n\nthree"), vec!["two\n"]);
        assert_eq!(lines_of(&chunker.push(b"\n")), vec!["three"]);
        assert_eq!(chunker.push(b"a\nb\r\nc\n"), vec!["a\nb\nc"]);
        assert_eq!(chunker.push(b"tail"), Vec::<String>::new());
        assert_eq!(chunker.finish().as_deref(), Some("tail"));
        assert_eq!(chunker.finish(), None);
    }

    #[test]
    fn long_lines_are_cut_and_records_stay_within_their_size() {
        let mut chunker = LineChunker::default();
        let long = vec![b'x'; MAX_LINE_BYTES + 10];
        let records = chunker.push(&long);
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].len(), MAX_LINE_BYTES);
        assert_eq!(chunker.finish().map(|l| l.len()), Some(10));

        // 100,000 lines of 9 bytes in one read: several records, none over the cap, and
        // every line once, in order.
        let text: String = (0..100_000).map(|i| format!("line{i:05}\n")).collect();
        let records = chunker.push(text.as_bytes());
        assert!(records.len() > 1);
        assert!(records.iter().all(|r| r.len() <= MAX_CHUNK_BYTES));
        let expected: Vec<String> = (0..100_000).map(|i| format!("line{i:05}")).collect();
        assert_eq!(lines_of(&records), expected);
        assert_eq!(chunker.finish(), None);
    }

    #[test]
    fn bytes_split_anywhere_give_the_same_lines() {
        let text = "héllo\r\nwörld\n\n日本語 line\nlast".as_bytes();
        for cut in 0..=text.len() {
            let mut chunker = LineChunker::default();
            let mut records = chunker.push(&text[..cut]);
            records.extend(chunker.push(&text[cut..]));
            records.extend(chunker.finish());
            assert_eq!(
                lines_of(&records),
                vec!["héllo", "wörld", "", "日本語 line", "last"],
                "cut at {cut}"
            );
        }
    }
}
