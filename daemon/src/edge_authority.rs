//! Repairs the HTTP/2 `:authority` that gRPC clients send over unix sockets.
//!
//! Stock Python `grpcio` clients (gRPC core) that dial `unix:/path/halod.sock`
//! send the percent-encoded socket path (`%2Fpath%2Fhalod.sock`) as the
//! `:authority` pseudo-header. The `h2` crate under tonic parses `:authority`
//! as a URI authority, rejects that value as malformed and resets every stream
//! with `RST_STREAM(PROTOCOL_ERROR)`, so each call fails with
//! `INTERNAL: Stream removed`. h2 has no option to relax the check, and halod
//! ignores the authority anyway: a unix socket only reaches the local host.
//!
//! So the fix sits below h2. [`AuthorityFix`] wraps an accepted connection and
//! rewrites the client-to-server bytes. The connection preface and all frames
//! other than header blocks pass through unchanged. A header block (HEADERS
//! plus any CONTINUATION frames) is decoded with an HPACK decoder (RFC 7541)
//! that mirrors the client's dynamic table. An `:authority` that is not a plain
//! `host[:port]` becomes `localhost`. Then the block is re-encoded with literal
//! fields that never touch the dynamic table, so the server's HPACK table stays
//! empty and cannot drift from ours. For that reason every block is re-encoded,
//! whether it changed or not. Server-to-client bytes are not touched.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame payload every HTTP/2 peer must accept.
const MAX_FRAME: usize = 16_384;
/// Cap on a header block (encoded, and decoded) and on the HPACK table size.
const MAX_BLOCK: usize = 1 << 20;
/// Dynamic table size both ends start with (SETTINGS_HEADER_TABLE_SIZE default).
const INITIAL_TABLE: usize = 4096;

/// A connection whose client-to-server header blocks are rewritten so that h2
/// only ever sees a valid `:authority`. Writes pass straight through.
///
/// Wrap each accepted unix stream before tonic sees it, e.g.
/// `UnixListenerStream::new(l).map(|r| r.map(AuthorityFix::new))` with
/// `tokio_stream::StreamExt`. A malformed client stream (bad HPACK, misplaced
/// CONTINUATION, a header block over 1 MiB) makes `poll_read` fail with
/// `InvalidData`, which closes the connection.
pub struct AuthorityFix<S> {
    inner: S,
    rewriter: Rewriter,
    out: Vec<u8>,
    out_pos: usize,
    eof: bool,
    failed: bool,
}

impl<S> AuthorityFix<S> {
    /// Wraps a freshly accepted connection (nothing read from it yet).
    pub fn new(inner: S) -> Self {
        AuthorityFix {
            inner,
            rewriter: Rewriter::new(),
            out: Vec::new(),
            out_pos: 0,
            eof: false,
            failed: false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.out_pos < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_pos);
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.failed {
                return Poll::Ready(Err(bad("connection closed after a bad header block")));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if read.filled().is_empty() => this.eof = true,
                Poll::Ready(Ok(())) => {
                    if let Err(e) = this.rewriter.feed(read.filled(), &mut this.out) {
                        this.failed = true;
                        this.out.clear();
                        this.out_pos = 0;
                        return Poll::Ready(Err(e));
                    }
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Connected for AuthorityFix<tokio::net::UnixStream> {
    type ConnectInfo = <tokio::net::UnixStream as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

fn bad(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Where the rewriter is in the client's byte stream.
#[derive(Clone, Copy)]
enum State {
    /// This many preface bytes matched so far.
    Preface(usize),
    /// Not HTTP/2 with prior knowledge: pass everything through.
    Raw,
    /// Reading a 9-byte frame header.
    Header,
    /// Passing this many more payload bytes of a frame we do not touch.
    Pass(usize),
    /// Buffering this many more payload bytes of a HEADERS/CONTINUATION frame.
    Collect(Frame, usize),
}

#[derive(Clone, Copy)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
}

/// A header block under assembly: HEADERS seen, waiting for END_HEADERS.
struct Block {
    stream: u32,
    end_stream: bool,
    data: Vec<u8>,
}

/// The pure byte-stream rewriter: client bytes in, bytes for h2 out.
struct Rewriter {
    state: State,
    head: Vec<u8>,
    payload: Vec<u8>,
    block: Option<Block>,
    hpack: Hpack,
}

/// Takes up to `n` bytes off the front of `input`.
fn take<'a>(input: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (front, rest) = input.split_at(n.min(input.len()));
    *input = rest;
    front
}

impl Rewriter {
    fn new() -> Self {
        Rewriter {
            state: State::Preface(0),
            head: Vec::with_capacity(9),
            payload: Vec::new(),
            block: None,
            hpack: Hpack::new(),
        }
    }

    /// Consumes `input` (any split of the stream), appending output to `out`.
    fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        while !input.is_empty() {
            match self.state {
                State::Preface(seen) => {
                    let want = &PREFACE[seen..];
                    let got = take(&mut input, want.len());
                    out.extend_from_slice(got);
                    self.state = match seen + got.len() {
                        _ if !want.starts_with(got) => State::Raw,
                        24 => State::Header,
                        seen => State::Preface(seen),
                    };
                }
                State::Raw => out.extend_from_slice(take(&mut input, usize::MAX)),
                State::Header => {
                    let got = take(&mut input, 9 - self.head.len());
                    self.head.extend_from_slice(got);
                    if self.head.len() == 9 {
                        self.start_frame(out)?;
                    }
                }
                State::Pass(left) => {
                    let got = take(&mut input, left);
                    out.extend_from_slice(got);
                    self.state = match left - got.len() {
                        0 => State::Header,
                        left => State::Pass(left),
                    };
                }
                State::Collect(frame, left) => {
                    let got = take(&mut input, left);
                    self.payload.extend_from_slice(got);
                    match left - got.len() {
                        0 => self.end_frame(frame, out)?,
                        left => self.state = State::Collect(frame, left),
                    }
                }
            }
        }
        Ok(())
    }

    fn start_frame(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        let h = &self.head;
        let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        let (kind, flags) = (h[3], h[4]);
        match (kind, self.block.as_ref().map(|b| b.stream)) {
            (HEADERS, None) => {}
            (CONTINUATION, Some(s)) if s == stream => {}
            (CONTINUATION, _) => return Err(bad("CONTINUATION frame out of place")),
            (_, Some(_)) => return Err(bad("frame inside a header block")),
            _ => {
                out.extend_from_slice(&self.head);
                self.head.clear();
                self.state = if len == 0 {
                    State::Header
                } else {
                    State::Pass(len)
                };
                return Ok(());
            }
        }
        let held = self.block.as_ref().map_or(0, |b| b.data.len());
        if held + len > MAX_BLOCK {
            return Err(bad("header block over 1 MiB"));
        }
        self.head.clear();
        self.payload.clear();
        let frame = Frame {
            kind,
            flags,
            stream,
        };
        self.state = State::Collect(frame, len);
        if len == 0 {
            self.end_frame(frame, out)?;
        }
        Ok(())
    }

    fn end_frame(&mut self, f: Frame, out: &mut Vec<u8>) -> io::Result<()> {
        self.state = State::Header;
        if f.kind == HEADERS {
            let mut p = &self.payload[..];
            if f.flags & PADDED != 0 {
                let (&pad, rest) = p
                    .split_first()
                    .ok_or_else(|| bad("HEADERS without pad length"))?;
                let keep = rest.len().checked_sub(usize::from(pad));
                p = &rest[..keep.ok_or_else(|| bad("HEADERS padding too long"))?];
            }
            if f.flags & PRIORITY != 0 {
                p = p
                    .get(5..)
                    .ok_or_else(|| bad("HEADERS priority truncated"))?;
            }
            let end_stream = f.flags & END_STREAM != 0;
            self.block = Some(Block {
                stream: f.stream,
                end_stream,
                data: p.to_vec(),
            });
        } else if let Some(b) = self.block.as_mut() {
            b.data.extend_from_slice(&self.payload);
        }
        if f.flags & END_HEADERS != 0 {
            if let Some(b) = self.block.take() {
                let fields = self.hpack.decode(&b.data)?;
                emit(b.stream, b.end_stream, &encode(&fields), out);
            }
        }
        Ok(())
    }
}

/// `host[:port]` (IPv6 in brackets): nonempty, no `%`, `/`, `@` or spaces.
fn valid_authority(v: &[u8]) -> bool {
    let ok = |c: &u8| c.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:[]".contains(c);
    !v.is_empty() && v.iter().all(ok)
}

/// Re-encodes fields as literals that never add to the server's table.
fn encode(fields: &[Field]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in fields {
        let value: &[u8] = match f.name.as_slice() {
            b":authority" if !valid_authority(&f.value) => b"localhost",
            _ => &f.value,
        };
        let flag = if f.never { 0x10 } else { 0x00 };
        match STATIC.iter().position(|(n, _)| *n == f.name.as_slice()) {
            Some(i) => put_int(&mut out, flag, 4, i + 1),
            None => {
                put_int(&mut out, flag, 4, 0);
                put_str(&mut out, &f.name);
            }
        }
        put_str(&mut out, value);
    }
    out
}

/// Writes a header block as HEADERS + CONTINUATION frames of at most 16 KiB.
fn emit(stream: u32, end_stream: bool, mut block: &[u8], out: &mut Vec<u8>) {
    let mut kind = HEADERS;
    loop {
        let (chunk, rest) = block.split_at(block.len().min(MAX_FRAME));
        let mut flags = if kind == HEADERS && end_stream {
            END_STREAM
        } else {
            0
        };
        if rest.is_empty() {
            flags |= END_HEADERS;
        }
        out.extend_from_slice(&(chunk.len() as u32).to_be_bytes()[1..]);
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(chunk);
        if rest.is_empty() {
            return;
        }
        block = rest;
        kind = CONTINUATION;
    }
}

fn put_int(out: &mut Vec<u8>, flags: u8, prefix: u32, v: usize) {
    let max = (1usize << prefix) - 1;
    if v < max {
        out.push(flags | v as u8);
        return;
    }
    out.push(flags | max as u8);
    let mut v = v - max;
    while v >= 0x80 {
        out.push(0x80 | (v & 0x7f) as u8);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    put_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Field {
    name: Vec<u8>,
    value: Vec<u8>,
    /// Sent as "never indexed": keep it that way.
    never: bool,
}

/// HPACK decoder state mirroring the client's encoder.
struct Hpack {
    /// Newest first, so dynamic index 62 is `table[0]`.
    table: VecDeque<(Vec<u8>, Vec<u8>)>,
    size: usize,
    max: usize,
}

impl Hpack {
    fn new() -> Self {
        Hpack {
            table: VecDeque::new(),
            size: 0,
            max: INITIAL_TABLE,
        }
    }

    fn decode(&mut self, block: &[u8]) -> io::Result<Vec<Field>> {
        let (mut fields, mut pos, mut total) = (Vec::new(), 0, 0);
        while let Some(&b) = block.get(pos) {
            let field = if b & 0x80 != 0 {
                let (name, value) = self.entry(int(block, &mut pos, 7)?)?;
                Field {
                    name: name.to_vec(),
                    value: value.to_vec(),
                    never: false,
                }
            } else if b & 0xe0 == 0x20 {
                let max = int(block, &mut pos, 5)?;
                if !fields.is_empty() || max > MAX_BLOCK {
                    return Err(bad("bad HPACK table size update"));
                }
                self.max = max;
                self.evict(max);
                continue;
            } else {
                let (prefix, add, never) = match b & 0x40 {
                    0 => (4, false, b & 0x10 != 0),
                    _ => (6, true, false),
                };
                let name = match int(block, &mut pos, prefix)? {
                    0 => string(block, &mut pos)?,
                    i => self.entry(i)?.0.to_vec(),
                };
                let value = string(block, &mut pos)?;
                if add {
                    self.insert(name.clone(), value.clone());
                }
                Field { name, value, never }
            };
            total += field.name.len() + field.value.len() + 32;
            if total > MAX_BLOCK {
                return Err(bad("header list over 1 MiB"));
            }
            fields.push(field);
        }
        Ok(fields)
    }

    fn entry(&self, index: usize) -> io::Result<(&[u8], &[u8])> {
        if let Some(&(n, v)) = index.checked_sub(1).and_then(|i| STATIC.get(i)) {
            return Ok((n, v));
        }
        let dynamic = index
            .checked_sub(STATIC.len() + 1)
            .and_then(|i| self.table.get(i));
        let (n, v) = dynamic.ok_or_else(|| bad("HPACK index out of range"))?;
        Ok((n, v))
    }

    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let size = name.len() + value.len() + 32;
        if size > self.max {
            self.evict(0);
            return;
        }
        self.evict(self.max - size);
        self.table.push_front((name, value));
        self.size += size;
    }

    fn evict(&mut self, limit: usize) {
        while self.size > limit {
            match self.table.pop_back() {
                Some((n, v)) => self.size -= n.len() + v.len() + 32,
                None => self.size = 0,
            }
        }
    }
}

fn next(buf: &[u8], pos: &mut usize) -> io::Result<u8> {
    let b = *buf.get(*pos).ok_or_else(|| bad("truncated header block"))?;
    *pos += 1;
    Ok(b)
}

/// HPACK integer with an N-bit prefix (RFC 7541 5.1), at most about 2^28.
fn int(buf: &[u8], pos: &mut usize, prefix: u32) -> io::Result<usize> {
    let max = (1usize << prefix) - 1;
    let v = usize::from(next(buf, pos)?) & max;
    if v < max {
        return Ok(v);
    }
    let mut v = v;
    for shift in [0, 7, 14, 21] {
        let b = next(buf, pos)?;
        v += usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(bad("HPACK integer too large"))
}

/// HPACK string literal (RFC 7541 5.2), plain or Huffman-coded.
fn string(buf: &[u8], pos: &mut usize) -> io::Result<Vec<u8>> {
    let huffman = buf.get(*pos).is_some_and(|b| b & 0x80 != 0);
    let len = int(buf, pos, 7)?;
    let raw = pos.checked_add(len).and_then(|end| buf.get(*pos..end));
    let raw = raw.ok_or_else(|| bad("truncated header string"))?;
    *pos += len;
    if huffman {
        huffman_decode(raw)
    } else {
        Ok(raw.to_vec())
    }
}

/// Marks a child in the Huffman tree as a leaf holding a symbol.
const LEAF: u16 = 0x8000;

/// Huffman decoding tree, built once: `tree[node][bit]` is 0 (no such code;
/// the root is nobody's child), the index of an inner node, or `LEAF | symbol`.
fn huffman_tree() -> &'static [[u16; 2]] {
    static TREE: OnceLock<Vec<[u16; 2]>> = OnceLock::new();
    TREE.get_or_init(|| {
        let mut tree = vec![[0u16; 2]];
        for (sym, &(code, len)) in HUFFMAN.iter().enumerate() {
            let mut node = 0;
            for i in (0..u32::from(len)).rev() {
                let bit = ((code >> i) & 1) as usize;
                if i == 0 {
                    tree[node][bit] = LEAF | sym as u16;
                } else {
                    if tree[node][bit] == 0 {
                        tree.push([0; 2]);
                        tree[node][bit] = (tree.len() - 1) as u16;
                    }
                    node = usize::from(tree[node][bit]);
                }
            }
        }
        tree
    })
}

fn huffman_decode(data: &[u8]) -> io::Result<Vec<u8>> {
    let tree = huffman_tree();
    let mut out = Vec::with_capacity(data.len() * 8 / 5);
    let (mut node, mut pending, mut all_ones) = (0usize, 0, true);
    for &byte in data {
        for i in (0..8).rev() {
            let bit = (byte >> i) & 1;
            let child = tree.get(node).map_or(0, |n| n[usize::from(bit)]);
            if child == LEAF | 256 {
                return Err(bad("EOS inside a Huffman string"));
            } else if child & LEAF != 0 {
                out.push(child as u8);
                (node, pending, all_ones) = (0, 0, true);
            } else if child == 0 {
                return Err(bad("invalid Huffman code"));
            } else {
                node = usize::from(child);
                pending += 1;
                all_ones &= bit == 1;
            }
        }
    }
    if pending > 7 || !all_ones {
        return Err(bad("invalid Huffman padding"));
    }
    Ok(out)
}

/// The HPACK static table (RFC 7541 Appendix A); index `i + 1` is `STATIC[i]`.
#[rustfmt::skip]
const STATIC: [(&[u8], &[u8]); 61] = [
    (b":authority", b""), (b":method", b"GET"), (b":method", b"POST"), (b":path", b"/"),
    (b":path", b"/index.html"), (b":scheme", b"http"), (b":scheme", b"https"),
    (b":status", b"200"), (b":status", b"204"), (b":status", b"206"), (b":status", b"304"),
    (b":status", b"400"), (b":status", b"404"), (b":status", b"500"), (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"), (b"accept-language", b""), (b"accept-ranges", b""),
    (b"accept", b""), (b"access-control-allow-origin", b""), (b"age", b""), (b"allow", b""),
    (b"authorization", b""), (b"cache-control", b""), (b"content-disposition", b""),
    (b"content-encoding", b""), (b"content-language", b""), (b"content-length", b""),
    (b"content-location", b""), (b"content-range", b""), (b"content-type", b""), (b"cookie", b""),
    (b"date", b""), (b"etag", b""), (b"expect", b""), (b"expires", b""), (b"from", b""),
    (b"host", b""), (b"if-match", b""), (b"if-modified-since", b""), (b"if-none-match", b""),
    (b"if-range", b""), (b"if-unmodified-since", b""), (b"last-modified", b""), (b"link", b""),
    (b"location", b""), (b"max-forwards", b""), (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""), (b"range", b""), (b"referer", b""), (b"refresh", b""),
    (b"retry-after", b""), (b"server", b""), (b"set-cookie", b""),
    (b"strict-transport-security", b""), (b"transfer-encoding", b""), (b"user-agent", b""),
    (b"vary", b""), (b"via", b""), (b"www-authenticate", b""),
];

/// The HPACK Huffman code (RFC 7541 Appendix B): `(code, bit length)` for
/// symbols 0..=255 and EOS (256), codes right-aligned.
#[rustfmt::skip]
const HUFFMAN: [(u32, u8); 257] = [
    (0x1ff8, 13), (0x7fffd8, 23), (0xfffffe2, 28), (0xfffffe3, 28), (0xfffffe4, 28),
    (0xfffffe5, 28), (0xfffffe6, 28), (0xfffffe7, 28), (0xfffffe8, 28), (0xffffea, 24),
    (0x3ffffffc, 30), (0xfffffe9, 28), (0xfffffea, 28), (0x3ffffffd, 30), (0xfffffeb, 28),
    (0xfffffec, 28), (0xfffffed, 28), (0xfffffee, 28), (0xfffffef, 28), (0xffffff0, 28),
    (0xffffff1, 28), (0xffffff2, 28), (0x3ffffffe, 30), (0xffffff3, 28), (0xffffff4, 28),
    (0xffffff5, 28), (0xffffff6, 28), (0xffffff7, 28), (0xffffff8, 28), (0xffffff9, 28),
    (0xffffffa, 28), (0xffffffb, 28), (0x14, 6), (0x3f8, 10), (0x3f9, 10), (0xffa, 12),
    (0x1ff9, 13), (0x15, 6), (0xf8, 8), (0x7fa, 11), (0x3fa, 10), (0x3fb, 10), (0xf9, 8),
    (0x7fb, 11), (0xfa, 8), (0x16, 6), (0x17, 6), (0x18, 6), (0x0, 5), (0x1, 5), (0x2, 5),
    (0x19, 6), (0x1a, 6), (0x1b, 6), (0x1c, 6), (0x1d, 6), (0x1e, 6), (0x1f, 6), (0x5c, 7),
    (0xfb, 8), (0x7ffc, 15), (0x20, 6), (0xffb, 12), (0x3fc, 10), (0x1ffa, 13), (0x21, 6),
    (0x5d, 7), (0x5e, 7), (0x5f, 7), (0x60, 7), (0x61, 7), (0x62, 7), (0x63, 7), (0x64, 7),
    (0x65, 7), (0x66, 7), (0x67, 7), (0x68, 7), (0x69, 7), (0x6a, 7), (0x6b, 7), (0x6c, 7),
    (0x6d, 7), (0x6e, 7), (0x6f, 7), (0x70, 7), (0x71, 7), (0x72, 7), (0xfc, 8), (0x73, 7),
    (0xfd, 8), (0x1ffb, 13), (0x7fff0, 19), (0x1ffc, 13), (0x3ffc, 14), (0x22, 6), (0x7ffd, 15),
    (0x3, 5), (0x23, 6), (0x4, 5), (0x24, 6), (0x5, 5), (0x25, 6), (0x26, 6), (0x27, 6), (0x6, 5),
    (0x74, 7), (0x75, 7), (0x28, 6), (0x29, 6), (0x2a, 6), (0x7, 5), (0x2b, 6), (0x76, 7),
    (0x2c, 6), (0x8, 5), (0x9, 5), (0x2d, 6), (0x77, 7), (0x78, 7), (0x79, 7), (0x7a, 7),
    (0x7b, 7), (0x7ffe, 15), (0x7fc, 11), (0x3ffd, 14), (0x1ffd, 13), (0xffffffc, 28),
    (0xfffe6, 20), (0x3fffd2, 22), (0xfffe7, 20), (0xfffe8, 20), (0x3fffd3, 22), (0x3fffd4, 22),
    (0x3fffd5, 22), (0x7fffd9, 23), (0x3fffd6, 22), (0x7fffda, 23), (0x7fffdb, 23), (0x7fffdc, 23),
    (0x7fffdd, 23), (0x7fffde, 23), (0xffffeb, 24), (0x7fffdf, 23), (0xffffec, 24), (0xffffed, 24),
    (0x3fffd7, 22), (0x7fffe0, 23), (0xffffee, 24), (0x7fffe1, 23), (0x7fffe2, 23), (0x7fffe3, 23),
    (0x7fffe4, 23), (0x1fffdc, 21), (0x3fffd8, 22), (0x7fffe5, 23), (0x3fffd9, 22), (0x7fffe6, 23),
    (0x7fffe7, 23), (0xffffef, 24), (0x3fffda, 22), (0x1fffdd, 21), (0xfffe9, 20), (0x3fffdb, 22),
    (0x3fffdc, 22), (0x7fffe8, 23), (0x7fffe9, 23), (0x1fffde, 21), (0x7fffea, 23), (0x3fffdd, 22),
    (0x3fffde, 22), (0xfffff0, 24), (0x1fffdf, 21), (0x3fffdf, 22), (0x7fffeb, 23), (0x7fffec, 23),
    (0x1fffe0, 21), (0x1fffe1, 21), (0x3fffe0, 22), (0x1fffe2, 21), (0x7fffed, 23), (0x3fffe1, 22),
    (0x7fffee, 23), (0x7fffef, 23), (0xfffea, 20), (0x3fffe2, 22), (0x3fffe3, 22), (0x3fffe4, 22),
    (0x7ffff0, 23), (0x3fffe5, 22), (0x3fffe6, 22), (0x7ffff1, 23), (0x3ffffe0, 26),
    (0x3ffffe1, 26), (0xfffeb, 20), (0x7fff1, 19), (0x3fffe7, 22), (0x7ffff2, 23), (0x3fffe8, 22),
    (0x1ffffec, 25), (0x3ffffe2, 26), (0x3ffffe3, 26), (0x3ffffe4, 26), (0x7ffffde, 27),
    (0x7ffffdf, 27), (0x3ffffe5, 26), (0xfffff1, 24), (0x1ffffed, 25), (0x7fff2, 19),
    (0x1fffe3, 21), (0x3ffffe6, 26), (0x7ffffe0, 27), (0x7ffffe1, 27), (0x3ffffe7, 26),
    (0x7ffffe2, 27), (0xfffff2, 24), (0x1fffe4, 21), (0x1fffe5, 21), (0x3ffffe8, 26),
    (0x3ffffe9, 26), (0xffffffd, 28), (0x7ffffe3, 27), (0x7ffffe4, 27), (0x7ffffe5, 27),
    (0xfffec, 20), (0xfffff3, 24), (0xfffed, 20), (0x1fffe6, 21), (0x3fffe9, 22), (0x1fffe7, 21),
    (0x1fffe8, 21), (0x7ffff3, 23), (0x3fffea, 22), (0x3fffeb, 22), (0x1ffffee, 25),
    (0x1ffffef, 25), (0xfffff4, 24), (0xfffff5, 24), (0x3ffffea, 26), (0x7ffff4, 23),
    (0x3ffffeb, 26), (0x7ffffe6, 27), (0x3ffffec, 26), (0x3ffffed, 26), (0x7ffffe7, 27),
    (0x7ffffe8, 27), (0x7ffffe9, 27), (0x7ffffea, 27), (0x7ffffeb, 27), (0xffffffe, 28),
    (0x7ffffec, 27), (0x7ffffed, 27), (0x7ffffee, 27), (0x7ffffef, 27), (0x7fffff0, 27),
    (0x3ffffee, 26), (0x3fffffff, 30),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
        let digit = |c: u8| (c as char).to_digit(16).unwrap() as u8;
        s.chunks(2)
            .map(|p| digit(p[0]) << 4 | digit(p[1]))
            .collect()
    }

    fn fields(list: &[(&str, &str)]) -> Vec<Field> {
        let f = |&(n, v): &(&str, &str)| Field {
            name: n.into(),
            value: v.into(),
            never: false,
        };
        list.iter().map(f).collect()
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    fn with_preface(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut v = PREFACE.to_vec();
        frames.iter().for_each(|f| v.extend(f));
        v
    }

    fn rewrite(input: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        Rewriter::new().feed(input, &mut out)?;
        Ok(out)
    }

    /// Splits rewritten output into frames `(kind, flags, stream, payload)`.
    fn frames(out: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert_eq!(&out[..24], PREFACE);
        let (mut rest, mut v) = (&out[24..], Vec::new());
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            v.push((rest[3], rest[4], stream, rest[9..9 + len].to_vec()));
            rest = &rest[9 + len..];
        }
        v
    }

    /// Decodes the header blocks as the server would: `(stream, flags, fields)`.
    /// The server's table must stay empty and at its initial size.
    fn server_view(out: &[u8]) -> Vec<(u32, u8, Vec<Field>)> {
        let mut server = Hpack::new();
        let (mut result, mut block, mut first) = (Vec::new(), Vec::new(), (0, 0));
        for (kind, flags, stream, payload) in frames(out) {
            assert!(payload.len() <= MAX_FRAME);
            match kind {
                HEADERS => (block, first) = (payload, (stream, flags)),
                CONTINUATION => block.extend(payload),
                _ => continue,
            }
            if flags & END_HEADERS != 0 {
                result.push((first.0, first.1, server.decode(&block).unwrap()));
                assert_eq!((server.size, server.max), (0, INITIAL_TABLE));
            }
        }
        result
    }

    #[test]
    fn huffman_table_is_a_complete_prefix_code() {
        let kraft: u64 = HUFFMAN.iter().map(|&(_, len)| 1u64 << (30 - len)).sum();
        assert_eq!(kraft, 1 << 30);
        assert!(HUFFMAN
            .iter()
            .all(|&(code, len)| (5..=30).contains(&len) && code >> len == 0));
        // Every byte round-trips through the decoder, padded with ones.
        let (mut bits, mut n, mut packed) = (0u64, 0, Vec::new());
        for &(code, len) in &HUFFMAN[..256] {
            (bits, n) = (bits << len | u64::from(code), n + u32::from(len));
            while n >= 8 {
                packed.push((bits >> (n - 8)) as u8);
                n -= 8;
            }
        }
        if n > 0 {
            packed.push((bits << (8 - n)) as u8 | (0xff >> n));
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(huffman_decode(&packed).unwrap(), all);
    }

    fn rfc_requests(blocks: [&str; 3]) {
        let mut d = Hpack::new();
        let first = [(":method", "GET"), (":scheme", "http"), (":path", "/")];
        let mut want = vec![fields(&first)];
        want[0].extend(fields(&[(":authority", "www.example.com")]));
        want.push(want[0].clone());
        want[1].extend(fields(&[("cache-control", "no-cache")]));
        want.push(fields(&[
            (":method", "GET"),
            (":scheme", "https"),
            (":path", "/index.html"),
        ]));
        want[2].extend(fields(&[(":authority", "www.example.com")]));
        want[2].extend(fields(&[("custom-key", "custom-value")]));
        for ((block, want), size) in blocks.iter().zip(want).zip([57, 110, 164]) {
            assert_eq!(d.decode(&hex(block)).unwrap(), want);
            assert_eq!(d.size, size);
        }
        let names: Vec<&[u8]> = d.table.iter().map(|(n, _)| n.as_slice()).collect();
        assert_eq!(names, [&b"custom-key"[..], b"cache-control", b":authority"]);
    }

    #[test]
    fn rfc7541_c3_requests_without_huffman() {
        rfc_requests([
            "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
            "8286 84be 5808 6e6f 2d63 6163 6865",
            "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
        ]);
    }

    #[test]
    fn rfc7541_c4_requests_with_huffman() {
        rfc_requests([
            "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
            "8286 84be 5886 a8eb 1064 9cbf",
            "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
        ]);
    }

    #[test]
    fn eviction_and_size_update() {
        let mut d = Hpack::new();
        // Table size 60, then two 40+ byte entries: the first is evicted.
        let mut block = vec![0x3f, 0x1d, 0x40, 0x01, b'a', 0x07];
        block.extend(b"1234567");
        d.decode(&block).unwrap();
        assert_eq!((d.max, d.size), (60, 40));
        d.decode(&[0x40, 0x01, b'b', 0x00]).unwrap();
        assert_eq!((d.table.len(), d.size), (1, 33));
        assert_eq!(d.decode(&[0xbe]).unwrap(), fields(&[("b", "")]));
        assert!(d.decode(&[0xbf]).is_err());
    }

    fn bad_authority_input() -> Vec<u8> {
        // Request 1 adds `:authority: %2Ftmp%2Fx.sock` to the client's table and
        // sends a never-indexed `x-secret`; request 2 refers to the table entry.
        let block = b"\x83\x86\x44\x02/x\x41\x0f%2Ftmp%2Fx.sock\x10\x08x-secret\x01s";
        with_preface(&[
            frame(0x4, 0, 0, &[0, 4, 0, 0, 0xff, 0xff]),
            frame(HEADERS, END_HEADERS, 1, block),
            frame(HEADERS, END_HEADERS | END_STREAM, 3, b"\x83\x86\xbf\xbe"),
        ])
    }

    #[test]
    fn bad_authority_becomes_localhost() {
        let out = rewrite(&bad_authority_input()).unwrap();
        let mut want = fields(&[(":method", "POST"), (":scheme", "http"), (":path", "/x")]);
        want.extend(fields(&[(":authority", "localhost")]));
        want.push(Field {
            name: b"x-secret".to_vec(),
            value: b"s".to_vec(),
            never: true,
        });
        let second = want[..4].to_vec();
        let view = server_view(&out);
        assert_eq!(
            view,
            [
                (1, END_HEADERS, want),
                (3, END_HEADERS | END_STREAM, second)
            ]
        );
        // The SETTINGS frame in front is untouched.
        assert_eq!(out[..39], bad_authority_input()[..39]);
    }

    #[test]
    fn valid_authorities_are_kept() {
        for ok in "localhost|localhost:50051|[::1]:8080|example.com|a-b_c~".split('|') {
            assert!(valid_authority(ok.as_bytes()), "{ok}");
        }
        for no in "|%2Ftmp%2Fx.sock|/tmp/x|user@host|a b|a\tb|é".split('|') {
            assert!(!valid_authority(no.as_bytes()), "{no}");
        }
        let block = hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff");
        let input = with_preface(&[frame(HEADERS, END_HEADERS, 1, &block)]);
        let view = server_view(&rewrite(&input).unwrap());
        assert_eq!(
            view[0].2[3],
            fields(&[(":authority", "www.example.com")])[0]
        );
    }

    fn big_input() -> Vec<u8> {
        // Padded, prioritised HEADERS with a 20000-byte value, split by the
        // client into HEADERS + CONTINUATION.
        let mut block = vec![0x00, 0x05];
        block.extend(b"x-big");
        put_str(&mut block, &[b'a'; 20_000]);
        let mut first = vec![3, 0, 0, 0, 0, 16];
        first.extend(&block[..100]);
        first.extend([0; 3]);
        with_preface(&[
            frame(HEADERS, PADDED | PRIORITY | END_STREAM, 5, &first),
            frame(CONTINUATION, END_HEADERS, 5, &block[100..]),
        ])
    }

    #[test]
    fn large_block_is_split() {
        let out = rewrite(&big_input()).unwrap();
        let f = frames(&out);
        let kinds: Vec<_> = f
            .iter()
            .map(|(k, fl, s, p)| (*k, *fl, *s, p.len()))
            .collect();
        let total = 2 + 5 + 4 + 20_000;
        let want = [
            (HEADERS, END_STREAM, 5, MAX_FRAME),
            (CONTINUATION, END_HEADERS, 5, total - MAX_FRAME),
        ];
        assert_eq!(kinds, want);
        let want = Field {
            name: b"x-big".to_vec(),
            value: vec![b'a'; 20_000],
            never: false,
        };
        assert_eq!(server_view(&out), [(5, END_STREAM, vec![want])]);
    }

    fn other_frames() -> Vec<u8> {
        with_preface(&[
            frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]),
            frame(0x4, 0x1, 0, &[]),
            frame(0x8, 0, 0, &[0, 1, 0, 0]),
            frame(0x6, 0, 0, b"pingpong"),
            frame(0x0, 0x1, 1, b"hello"),
            frame(0x7, 0, 0, &[0; 8]),
        ])
    }

    #[test]
    fn other_frames_pass_through() {
        assert_eq!(rewrite(&other_frames()).unwrap(), other_frames());
        let http1 = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(rewrite(http1).unwrap(), http1);
        let mut almost = PREFACE[..20].to_vec();
        almost.extend(b"XXXX\0\0\x05\x09");
        assert_eq!(rewrite(&almost).unwrap(), almost);
    }

    #[test]
    fn byte_at_a_time_matches_whole() {
        let mut input = bad_authority_input();
        input.extend(&big_input()[24..]);
        input.extend(&other_frames()[24..]);
        let whole = rewrite(&input).unwrap();
        let (mut r, mut out) = (Rewriter::new(), Vec::new());
        for b in &input {
            r.feed(std::slice::from_ref(b), &mut out).unwrap();
        }
        assert_eq!(out, whole);
    }

    #[test]
    fn bad_input_is_an_error() {
        let hf = |block: &[u8]| vec![frame(HEADERS, END_HEADERS, 1, block)];
        let open = || frame(HEADERS, 0, 1, &[0x82]);
        let mut huge = vec![frame(HEADERS, 0, 1, &[])];
        huge.extend((0..65).map(|_| frame(CONTINUATION, 0, 1, &[0x82; MAX_FRAME])));
        // A small block that decodes to more than 1 MiB through the dynamic table.
        let mut bomb = vec![0x40, 0x01, b'x'];
        put_str(&mut bomb, &[b'v'; 4000]);
        bomb.extend([0xbe; 300]);
        let cases = [
            (hf(&[0x82, 0x41, 0x81, 0x00]), "Huffman padding"), // '0', zero padding
            (hf(&[0x41, 0x84, 0xff, 0xff, 0xff, 0xff]), "EOS inside"),
            (hf(&[0x41, 0x81, 0xfe]), "Huffman padding"), // 8 bits of a longer code
            (hf(&[0xbe]), "index out of range"),          // empty dynamic table
            (hf(&[0x80]), "index out of range"),
            (hf(&[0x41, 0x05, b'a']), "truncated header string"),
            (
                hf(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]),
                "integer too large",
            ),
            (hf(&[0x82, 0x20]), "table size update"), // after a field
            (hf(&bomb), "header list over 1 MiB"),
            (
                vec![frame(CONTINUATION, END_HEADERS, 1, &[])],
                "CONTINUATION frame out",
            ),
            (
                vec![open(), frame(CONTINUATION, END_HEADERS, 3, &[])],
                "CONTINUATION frame out",
            ),
            (
                vec![open(), frame(0x0, 0, 1, b"x")],
                "inside a header block",
            ),
            (
                vec![frame(HEADERS, PADDED | END_HEADERS, 1, &[4, 0x82])],
                "padding too long",
            ),
            (
                vec![frame(HEADERS, PRIORITY | END_HEADERS, 1, &[0; 4])],
                "priority truncated",
            ),
            (huge, "header block over 1 MiB"),
        ];
        for (frames, msg) in cases {
            let err = rewrite(&with_preface(&frames)).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            assert!(err.to_string().contains(msg), "{err} is not {msg}");
        }
    }

    /// An in-memory connection that hands out `input` a few bytes at a time.
    struct Mock {
        input: Vec<u8>,
        pos: usize,
        written: Vec<u8>,
    }

    impl AsyncRead for Mock {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let end = (self.pos + 7)
                .min(self.input.len())
                .min(self.pos + buf.remaining());
            buf.put_slice(&self.input[self.pos..end]);
            self.pos = end;
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Mock {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.written.extend(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn read_all(fix: &mut AuthorityFix<Mock>) -> io::Result<Vec<u8>> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut out = Vec::new();
        loop {
            let mut chunk = [0u8; 5];
            let mut buf = ReadBuf::new(&mut chunk);
            match Pin::new(&mut *fix).poll_read(&mut cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Ok(out),
                Poll::Ready(Ok(())) => out.extend(buf.filled()),
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => unreachable!("mock is always ready"),
            }
        }
    }

    #[test]
    fn stream_wrapper_reads_rewritten_and_writes_through() {
        let input = bad_authority_input();
        let mock = Mock {
            input: input.clone(),
            pos: 0,
            written: Vec::new(),
        };
        let mut fix = AuthorityFix::new(mock);
        assert_eq!(read_all(&mut fix).unwrap(), rewrite(&input).unwrap());
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let wrote = Pin::new(&mut fix).poll_write(&mut cx, b"server bytes");
        assert!(matches!(wrote, Poll::Ready(Ok(12))));
        assert_eq!(fix.inner.written, b"server bytes");

        let input = with_preface(&[frame(CONTINUATION, END_HEADERS, 1, &[])]);
        let mut fix = AuthorityFix::new(Mock {
            input,
            pos: 0,
            written: Vec::new(),
        });
        assert_eq!(
            read_all(&mut fix).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        assert!(read_all(&mut fix).is_err());
    }
}
