//! Byte-capped pages. Every reply and stream item the coordinator sends that holds a list
//! (runs, log lines, metric summaries, agents) is filled by [`fill`]: at most
//! [`PAGE_BYTES`] of encoded items, so no reply comes near [`crate::MAX_MESSAGE_BYTES`]
//! however large the stored data grows. A page always holds at least one item, so a list
//! always makes progress; a single item is bounded by what the coordinator accepts at
//! submit (see the coordinator's `validate_sizes`) and the agent's line cap.

/// The most bytes of items one reply or stream item carries: a quarter of the message limit,
/// which leaves room for one oversized item and the reply's other fields.
pub const PAGE_BYTES: usize = 4 * 1024 * 1024;

/// The page size for a request's `max_page_bytes`: a client may ask for smaller pages (0:
/// the default), never for larger ones.
pub fn page_bytes(requested: u32) -> usize {
    match requested as usize {
        0 => PAGE_BYTES,
        requested => requested.min(PAGE_BYTES),
    }
}

/// The bytes `message` takes as one element of a repeated field: key, length, body. The
/// key is counted as 2 bytes, enough for any field number below 2048.
pub fn element_len(message: &impl prost::Message) -> usize {
    let body = message.encoded_len();
    2 + prost::encoding::length_delimiter_len(body) + body
}

/// One page of a list and whether items were left for the next one.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// An item followed the last one of this page (a continuation token should be sent).
    pub more: bool,
}

/// Takes items in order while their encoded size stays within `max_bytes` and their number
/// within `max_items`; the first item is always taken, whatever its size. Reads at most one
/// item past the page (to know whether more follow), so a caller that produces items lazily
/// (a database cursor) never holds more than a page and one item. The first error ends the
/// page and is returned.
pub fn fill<T: prost::Message, E>(
    items: impl IntoIterator<Item = Result<T, E>>,
    max_bytes: usize,
    max_items: usize,
) -> Result<Page<T>, E> {
    let mut page = Vec::new();
    let mut n_bytes = 0usize;
    for item in items {
        let item = item?;
        let len = element_len(&item);
        let fits = n_bytes.saturating_add(len) <= max_bytes && page.len() < max_items;
        if !page.is_empty() && !fits {
            return Ok(Page {
                items: page,
                more: true,
            });
        }
        n_bytes = n_bytes.saturating_add(len);
        page.push(item);
    }
    Ok(Page {
        items: page,
        more: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::LogLine;

    /// Lines whose texts have these lengths; each takes `text + 5` bytes as an element (key 2
    /// + length 1 + text key 1 + text length 1, for texts under 128 bytes).
    fn lines(text_lens: &[usize]) -> Vec<Result<LogLine, ()>> {
        text_lens
            .iter()
            .map(|&n| {
                Ok(LogLine {
                    text: "x".repeat(n),
                    ..Default::default()
                })
            })
            .collect()
    }

    /// Fills a page of lines with these text lengths; returns (items taken, more).
    fn check(text_lens: &[usize], max_bytes: usize, max_items: usize, expected: (usize, bool)) {
        let page = fill(lines(text_lens), max_bytes, max_items).unwrap();
        assert_eq!(
            (page.items.len(), page.more),
            expected,
            "lines {text_lens:?} into {max_bytes} bytes, {max_items} items"
        );
        let taken: Vec<usize> = page.items.iter().map(|l| l.text.len()).collect();
        assert_eq!(taken, text_lens[..expected.0], "items stay in order");
    }

    #[test]
    fn an_item_takes_its_encoded_size_plus_key_and_length() {
        assert_eq!(element_len(&LogLine::default()), 3);
        let line = LogLine {
            text: "x".repeat(10),
            ..Default::default()
        };
        assert_eq!(element_len(&line), 15);
        let big = LogLine {
            text: "x".repeat(200),
            ..Default::default()
        };
        // The body is 203 bytes (a 2-byte length for the text), so its own length takes 2.
        assert_eq!(element_len(&big), 2 + 2 + 203);
    }

    #[test]
    fn pages_are_capped_in_bytes_and_items_and_always_make_progress() {
        let no_cap = usize::MAX;
        // (text lengths, max bytes, max items, (taken, more))
        check(&[], 100, no_cap, (0, false));
        check(&[10, 10, 10], 100, no_cap, (3, false));
        // Exactly full: 3 × 15 = 45 bytes.
        check(&[10, 10, 10], 45, no_cap, (3, false));
        check(&[10, 10, 10], 44, no_cap, (2, true));
        check(&[10, 10, 10, 10], 30, no_cap, (2, true));
        // An item larger than the page still goes alone, so the list makes progress.
        check(&[100], 20, no_cap, (1, false));
        check(&[100, 1], 20, no_cap, (1, true));
        check(&[1, 100], 20, no_cap, (1, true));
        // The item cap.
        check(&[1, 1, 1], 100, 2, (2, true));
        check(&[1, 1], 100, 2, (2, false));
    }

    #[test]
    fn fill_reads_at_most_one_item_past_the_page() {
        let mut read = 0;
        let items = std::iter::repeat_with(|| {
            read += 1;
            Ok::<_, ()>(LogLine {
                text: "x".repeat(10),
                ..Default::default()
            })
        });
        let page = fill(items, 45, usize::MAX).unwrap();
        assert_eq!((page.items.len(), page.more), (3, true));
        assert_eq!(read, 4);
    }

    #[test]
    fn an_error_ends_the_page() {
        let items = vec![Ok(LogLine::default()), Err("disk"), Ok(LogLine::default())];
        assert_eq!(fill(items, 100, 100), Err("disk"));
    }

    #[test]
    fn clients_may_ask_for_smaller_pages_only() {
        assert_eq!(page_bytes(0), PAGE_BYTES);
        assert_eq!(page_bytes(1000), 1000);
        assert_eq!(page_bytes(u32::MAX), PAGE_BYTES);
    }
}
