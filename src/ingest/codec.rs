//! NDJSON framing with the size limit enforced while reading.
//!
//! A line longer than `max_frame_bytes` is reported as soon as the buffer passes the
//! limit, and the rest of it is dropped as it arrives, so a huge line is never
//! buffered whole; the stream resynchronises at the next newline.

use bytes::{Bytes, BytesMut};

#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// One line without its `\n` (and without a trailing `\r`).
    Line(Bytes),
    /// A line over the limit; it is being (or has been) skipped.
    TooLarge,
}

#[derive(Debug)]
pub struct LineDecoder {
    max: usize,
    /// Dropping the rest of an over-long line until its newline.
    discarding: bool,
    /// Bytes of the buffer already searched for a newline.
    scanned: usize,
}

impl LineDecoder {
    pub fn new(max_frame_bytes: usize) -> LineDecoder {
        LineDecoder { max: max_frame_bytes, discarding: false, scanned: 0 }
    }

    /// Changes the longest line accepted from now on.
    pub fn set_max(&mut self, max_frame_bytes: usize) {
        self.max = max_frame_bytes;
    }

    /// The next complete frame in `buf`, consuming it; `None` when more bytes are needed.
    /// Blank lines are skipped.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Option<Frame> {
        loop {
            if self.discarding {
                match memchr(buf) {
                    Some(i) => {
                        let _ = buf.split_to(i + 1);
                        self.discarding = false;
                        self.scanned = 0;
                        continue;
                    }
                    None => {
                        buf.clear();
                        return None;
                    }
                }
            }
            let found = memchr(&buf[self.scanned..]).map(|i| i + self.scanned);
            match found {
                Some(i) => {
                    self.scanned = 0;
                    let mut line = buf.split_to(i + 1);
                    line.truncate(i);
                    if line.last() == Some(&b'\r') {
                        line.truncate(i - 1);
                    }
                    if line.len() > self.max {
                        return Some(Frame::TooLarge);
                    }
                    if line.iter().all(|b| b.is_ascii_whitespace()) {
                        continue;
                    }
                    return Some(Frame::Line(line.freeze()));
                }
                None if buf.len() > self.max => {
                    buf.clear();
                    self.scanned = 0;
                    self.discarding = true;
                    return Some(Frame::TooLarge);
                }
                None => {
                    self.scanned = buf.len();
                    return None;
                }
            }
        }
    }

    /// Bytes of an unfinished line left when the peer closed (0: the stream ended cleanly).
    pub fn leftover(&self, buf: &BytesMut) -> usize {
        if self.discarding {
            1
        } else {
            buf.iter().filter(|b| !b.is_ascii_whitespace()).count()
        }
    }
}

fn memchr(haystack: &[u8]) -> Option<usize> {
    memchr::memchr(b'\n', haystack)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(decoder: &mut LineDecoder, buf: &mut BytesMut) -> Vec<Frame> {
        std::iter::from_fn(|| decoder.decode(buf)).collect()
    }

    #[test]
    fn splits_lines_across_reads() {
        let mut d = LineDecoder::new(100);
        let mut buf = BytesMut::from(&b"{\"a\":1}\n{\"b\""[..]);
        assert_eq!(frames(&mut d, &mut buf), vec![Frame::Line(Bytes::from_static(b"{\"a\":1}"))]);
        buf.extend_from_slice(b":2}\r\n\n  \n{\"c\":3}\n");
        assert_eq!(
            frames(&mut d, &mut buf),
            vec![Frame::Line(Bytes::from_static(b"{\"b\":2}")), Frame::Line(Bytes::from_static(b"{\"c\":3}"))]
        );
        assert!(buf.is_empty());
        assert_eq!(d.leftover(&buf), 0);
    }

    #[test]
    fn an_oversized_line_is_dropped_without_being_buffered_and_the_stream_resumes() {
        let mut d = LineDecoder::new(10);
        let mut buf = BytesMut::from(&b"0123456789ABCDEF"[..]);
        assert_eq!(frames(&mut d, &mut buf), vec![Frame::TooLarge]);
        assert!(buf.is_empty(), "the over-long prefix must not be kept");
        buf.extend_from_slice(&[b'x'; 1000]);
        assert_eq!(frames(&mut d, &mut buf), vec![]);
        assert!(buf.is_empty());
        buf.extend_from_slice(b"tail\n{\"ok\":1}\n");
        assert_eq!(frames(&mut d, &mut buf), vec![Frame::Line(Bytes::from_static(b"{\"ok\":1}"))]);
    }

    #[test]
    fn a_complete_oversized_line_in_one_read() {
        let mut d = LineDecoder::new(4);
        let mut buf = BytesMut::from(&b"123456\n1234\n"[..]);
        assert_eq!(frames(&mut d, &mut buf), vec![Frame::TooLarge, Frame::Line(Bytes::from_static(b"1234"))]);
    }

    #[test]
    fn leftover_reports_a_line_cut_by_the_peer() {
        let mut d = LineDecoder::new(100);
        let mut buf = BytesMut::from(&b"{\"op\":\"pi"[..]);
        assert_eq!(frames(&mut d, &mut buf), vec![]);
        assert!(d.leftover(&buf) > 0);
    }
}
