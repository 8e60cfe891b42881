//! Server-Sent Events from a streamed HTTP answer: the one reader used by the `openai` and the
//! `nebula` providers alike.
//!
//! It owns reading the byte stream with a per-chunk timeout (a stream may last as long as it
//! keeps coming, but a gap of `gap` between two chunks is an error), cutting it into lines however
//! the network split it (mid-line, mid-UTF-8-character: a line is decoded only once complete), and
//! picking out the `data:` payloads. It does not own what a payload means (each provider parses
//! its own JSON chunks) nor the wording of errors (each provider names its call).
//!
//! It lives under `openai` only because the crate root (`lib.rs`) is not this module's to edit;
//! it belongs at `crate::sse`.
//!
//! Each `data:` line is one message: both services put one JSON document on each line, and a
//! line-by-line reading also copes with servers that leave out the blank line ending an event.
//! Comments (`: keep-alive`), blank lines and other fields (`event:`, `id:`, `retry:`) are
//! skipped; `data: [DONE]` (OpenAI's end marker) is [`SseMessage::Done`].

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

/// Where the bytes of a streamed answer come from: a `reqwest::Response`, or a fake in tests.
pub(crate) trait ChunkSource: Send {
    /// Why the stream broke.
    type Error;

    /// The next piece of the body; `None` at its end.
    fn next_chunk(
        &mut self,
    ) -> impl Future<Output = Result<Option<impl AsRef<[u8]> + Send>, Self::Error>> + Send;
}

impl ChunkSource for reqwest::Response {
    type Error = reqwest::Error;

    fn next_chunk(
        &mut self,
    ) -> impl Future<Output = Result<Option<impl AsRef<[u8]> + Send>, Self::Error>> + Send {
        self.chunk()
    }
}

/// One message of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SseMessage {
    /// The payload of a `data:` line, trimmed; never empty.
    Data(String),
    /// `data: [DONE]`: the server says the answer is complete.
    Done,
}

/// Why the stream could not be read to its end.
#[derive(Debug)]
pub(crate) enum SseError<E> {
    /// Nothing arrived for the reader's `gap`.
    Stalled,
    /// The connection failed mid-stream.
    Broken(E),
}

/// Reads [`SseMessage`]s from a [`ChunkSource`].
#[derive(Debug)]
pub(crate) struct SseReader<S> {
    source: S,
    /// The longest wait allowed for the next chunk.
    gap: Duration,
    /// Bytes after the last newline seen: an unfinished line, possibly cut mid-character.
    pending: Vec<u8>,
    /// Complete lines not yet looked at.
    lines: VecDeque<String>,
    /// The source has said it has no more.
    ended: bool,
}

impl<S: ChunkSource> SseReader<S> {
    /// A reader of `source` that waits at most `gap` for each chunk.
    pub(crate) fn new(source: S, gap: Duration) -> Self {
        SseReader {
            source,
            gap,
            pending: Vec::new(),
            lines: VecDeque::new(),
            ended: false,
        }
    }

    /// The next message; `None` once the stream has ended (an unfinished last line, one the
    /// server sent without a newline, is still read).
    ///
    /// # Errors
    /// [`SseError::Stalled`] when no chunk comes within the gap, [`SseError::Broken`] when the
    /// source fails.
    pub(crate) async fn next(&mut self) -> Result<Option<SseMessage>, SseError<S::Error>> {
        loop {
            while let Some(line) = self.lines.pop_front() {
                if let Some(message) = parse_line(&line) {
                    return Ok(Some(message));
                }
            }
            if self.ended {
                return Ok(None);
            }
            match tokio::time::timeout(self.gap, self.source.next_chunk()).await {
                Err(_) => return Err(SseError::Stalled),
                Ok(Err(e)) => return Err(SseError::Broken(e)),
                // The chunk may borrow `source`; only the other fields are touched.
                Ok(Ok(Some(chunk))) => {
                    split_lines(&mut self.pending, &mut self.lines, chunk.as_ref())
                }
                Ok(Ok(None)) => {
                    self.ended = true;
                    let rest = std::mem::take(&mut self.pending);
                    if !rest.is_empty() {
                        self.lines
                            .push_back(String::from_utf8_lossy(&rest).into_owned());
                    }
                }
            }
        }
    }
}

/// Queues in `lines` the complete lines of `pending` + `chunk`; keeps the unfinished tail in
/// `pending`.
fn split_lines(pending: &mut Vec<u8>, lines: &mut VecDeque<String>, chunk: &[u8]) {
    pending.extend_from_slice(chunk);
    let Some(last_newline) = pending.iter().rposition(|b| *b == b'\n') else {
        return;
    };
    let complete: Vec<u8> = pending.drain(..=last_newline).collect();
    // `complete` ends with the `\n` found above; the lines are what it separates.
    let complete = complete.strip_suffix(b"\n").unwrap_or(&complete);
    lines.extend(
        complete
            .split(|b| *b == b'\n')
            .map(|l| String::from_utf8_lossy(l).into_owned()),
    );
}

/// What one line says: `Some` for a non-empty `data:` line (with or without the space after the
/// colon, `\r\n` endings tolerated), `None` for anything else.
fn parse_line(line: &str) -> Option<SseMessage> {
    let data = line.trim().strip_prefix("data:")?.trim();
    match data {
        "" => None,
        "[DONE]" => Some(SseMessage::Done),
        _ => Some(SseMessage::Data(data.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted byte stream.
    enum Step {
        Bytes(&'static [u8]),
        Fail,
        Stall,
    }

    struct Script(VecDeque<Step>);

    impl ChunkSource for Script {
        type Error = &'static str;

        fn next_chunk(
            &mut self,
        ) -> impl Future<Output = Result<Option<impl AsRef<[u8]> + Send>, Self::Error>> + Send
        {
            let step = self.0.pop_front();
            async move {
                match step {
                    None => Ok(None),
                    Some(Step::Bytes(b)) => Ok(Some(b)),
                    Some(Step::Fail) => Err("connection reset"),
                    Some(Step::Stall) => std::future::pending().await,
                }
            }
        }
    }

    fn reader(steps: impl IntoIterator<Item = Step>) -> SseReader<Script> {
        SseReader::new(
            Script(steps.into_iter().collect()),
            Duration::from_millis(200),
        )
    }

    /// Every message of a stream cut into `pieces`, checking it ends cleanly.
    async fn read_all(pieces: &[&'static [u8]]) -> Vec<SseMessage> {
        let mut r = reader(pieces.iter().map(|p| Step::Bytes(p)));
        let mut out = Vec::new();
        while let Some(m) = r.next().await.unwrap() {
            out.push(m);
        }
        out
    }

    fn data(s: &str) -> SseMessage {
        SseMessage::Data(s.to_owned())
    }

    #[tokio::test]
    async fn events_split_across_chunks_are_reassembled() {
        let got = read_all(&[
            b"data: {\"delta\": \"Off",
            b"er\"}\n",
            b"\ndata: {\"delta\"",
            b": \" the\"}\n\nda",
            b"ta: [DONE]\n\n",
        ])
        .await;
        assert_eq!(
            got,
            [
                data(r#"{"delta": "Offer"}"#),
                data(r#"{"delta": " the"}"#),
                SseMessage::Done
            ]
        );
    }

    #[tokio::test]
    async fn a_multibyte_character_split_across_chunks_arrives_intact() {
        let bytes = "data: {\"delta\": \"’é東\"}\r\n\r\n".as_bytes();
        // Cut inside `’` (3 bytes at 17..20), inside `é` (20..22) and inside `東` (22..25).
        let got = read_all(&[&bytes[..18], &bytes[18..21], &bytes[21..23], &bytes[23..]]).await;
        assert_eq!(got, [data(r#"{"delta": "’é東"}"#)]);
        // Byte by byte.
        let pieces: Vec<&'static [u8]> = bytes.chunks(1).collect();
        assert_eq!(read_all(&pieces).await, [data(r#"{"delta": "’é東"}"#)]);
    }

    #[tokio::test]
    async fn data_lines_with_and_without_the_space() {
        let got = read_all(&[b"data: {\"a\":1}\ndata:{\"a\":2}\n  data:   x  \r\n"]).await;
        assert_eq!(got, [data(r#"{"a":1}"#), data(r#"{"a":2}"#), data("x")]);
    }

    #[tokio::test]
    async fn comments_blank_lines_and_other_fields_are_skipped() {
        let got = read_all(&[
            b": keep-alive\n\n\r\nevent: ping\nid: 7\nretry: 100\ndata:\ndata: \r\n",
            b"data: kept\n\n: bye\n",
        ])
        .await;
        assert_eq!(got, [data("kept")]);
    }

    #[tokio::test]
    async fn done_is_its_own_message_and_an_unfinished_last_line_is_read() {
        assert_eq!(read_all(&[b"data: [DONE]\r\n"]).await, [SseMessage::Done]);
        assert_eq!(read_all(&[b"data:[DONE]"]).await, [SseMessage::Done]);
        assert_eq!(
            read_all(&[b"data: a\ndata: [DO", b"NE]"]).await,
            [data("a"), SseMessage::Done]
        );
        assert_eq!(read_all(&[]).await, []);
    }

    #[tokio::test]
    async fn a_stall_and_a_broken_stream_are_errors() {
        // Real time (this crate's tests run without tokio's `test-util`), so a short gap.
        let gap = Duration::from_millis(30);
        let started = std::time::Instant::now();
        let mut r = SseReader::new(
            Script(
                [Step::Bytes(b"data: a\n"), Step::Stall]
                    .into_iter()
                    .collect(),
            ),
            gap,
        );
        assert_eq!(r.next().await.unwrap(), Some(data("a")));
        assert!(matches!(r.next().await, Err(SseError::Stalled)));
        assert!(started.elapsed() >= gap);

        let mut r = reader([Step::Bytes(b"data: a\ndata: b"), Step::Fail]);
        assert_eq!(r.next().await.unwrap(), Some(data("a")));
        assert!(matches!(
            r.next().await,
            Err(SseError::Broken("connection reset"))
        ));
    }
}
