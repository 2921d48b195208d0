//! The gRPC bodies of a proxied ADS stream, below tonic's message codec, so that a large
//! non-ECDS response is relayed to Envoy frame by frame as it arrives (cut-through) instead of
//! being received whole, decoded, re-encoded and sent.
//!
//! * [`ResponseReader`] reads the control plane's response body: each message is either handed
//!   over whole (small ones, ECDS, anything undecidable — see [`super::wire::kind`]) or as a
//!   relay: its first bytes now and the rest in batches of what has already arrived.
//! * [`DownBody`] is the body Envoy reads: whole messages (encoded here, or as they came) and
//!   relays, in the order they were queued, then the stream's status as trailers.
//! * [`UpBody`] is the request body to the control plane: the stream's requests, encoded.
//!
//! This module owns framing and the status trailers. It does not decide what a stream does
//! with a message; `stream` does.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame};
use tokio::sync::mpsc;
use tonic::Status;

use super::wire::{self, Head, Kind, Shape, HEADER};

/// Messages shorter than this are always read whole: relaying pays off only for large ones.
pub const RELAY_MIN: usize = 64 << 10;

/// Batches of one relayed message that may wait for a slow Envoy.
pub const RELAY_CHUNKS: usize = 8;

/// The most a relay batch gathers of what has already arrived.
pub const RELAY_BATCH: usize = 256 << 10;

/// An undecided early look is tried again only once this much more has arrived (or the whole
/// message, or [`wire::LOOK_LIMIT`]), so a peer sending tiny frames cannot make it rescan the
/// prefix once per frame.
const LOOK_STEP: usize = 1 << 10;

/// Small messages that are ready together go out in one DATA frame up to this size (as
/// tonic's encoder does), so a burst of small updates is not a burst of tiny writes.
const BATCH: usize = 32 << 10;

/// What goes down to Envoy, in order.
pub enum Down<R> {
    /// A whole message, encoded when Envoy's side sends it.
    Message(R),
    /// A whole message as it came, gRPC header included.
    Raw(Bytes),
    /// A message relayed as it arrives.
    Relay(Relay),
    /// The stream's final status.
    End(Status),
}

/// A relayed message: the bytes so far (gRPC header included) and the rest as it comes.
pub struct Relay {
    pub head: Bytes,
    pub rest: mpsc::Receiver<Vec<Bytes>>,
    pub remaining: usize,
}

/// The relay being sent: chunks still to come, bytes still owed, chunks at hand.
struct Relaying {
    rest: mpsc::Receiver<Vec<Bytes>>,
    remaining: usize,
    queue: VecDeque<Bytes>,
}

/// The response body Envoy reads.
pub struct DownBody<R> {
    rx: mpsc::Receiver<Down<R>>,
    relay: Option<Relaying>,
    /// An item taken while batching that does not join the batch.
    pending: Option<Down<R>>,
    /// A relay ended early: the stream is broken; only its final status may still go out.
    broken: bool,
    done: bool,
}

impl<R> DownBody<R> {
    pub fn new(rx: mpsc::Receiver<Down<R>>) -> Self {
        Self {
            rx,
            relay: None,
            pending: None,
            broken: false,
            done: false,
        }
    }
}

/// `status` as gRPC trailers.
fn trailers(status: &Status) -> HeaderMap {
    let mut h = HeaderMap::new();
    if status.add_header(&mut h).is_err() {
        h.insert("grpc-status", http::HeaderValue::from_static("13"));
    }
    h
}

/// `first` plus the frames `next` has ready without waiting, up to [`BATCH`] bytes in one
/// buffer (`first` itself, uncopied, when nothing else is ready).
fn batch(first: Bytes, mut next: impl FnMut() -> Option<Bytes>) -> Bytes {
    let mut buf: Option<BytesMut> = None;
    while buf.as_ref().map_or(first.len(), |b| b.len()) < BATCH {
        let Some(more) = next() else { break };
        buf.get_or_insert_with(|| BytesMut::from(&first[..]))
            .extend_from_slice(&more);
    }
    buf.map_or(first, BytesMut::freeze)
}

impl<R: prost::Message> DownBody<R> {
    /// `first` plus the whole messages already queued behind it; anything else stays pending.
    fn batch(&mut self, first: Bytes) -> Bytes {
        let (rx, pending) = (&mut self.rx, &mut self.pending);
        batch(first, || match rx.try_recv() {
            Ok(Down::Message(m)) => Some(wire::frame(&m)),
            Ok(Down::Raw(b)) => Some(b),
            Ok(other) => {
                *pending = Some(other);
                None
            }
            Err(_) => None,
        })
    }
}

impl<R: prost::Message + Unpin> Body for DownBody<R> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if let Some(r) = &mut this.relay {
                if let Some(chunk) = r.queue.pop_front() {
                    r.remaining = r.remaining.saturating_sub(chunk.len());
                    if r.remaining == 0 {
                        this.relay = None;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                match ready!(r.rest.poll_recv(cx)) {
                    Some(chunks) => {
                        r.queue.extend(chunks);
                        continue;
                    }
                    None => {
                        // The upstream side stopped mid-message; the stream's status follows.
                        this.relay = None;
                        this.broken = true;
                        continue;
                    }
                }
            }
            let item = match this.pending.take() {
                Some(item) => Some(item),
                None => ready!(this.rx.poll_recv(cx)),
            };
            match item {
                Some(Down::Message(_) | Down::Raw(_) | Down::Relay(_)) if this.broken => continue,
                Some(Down::Message(m)) => {
                    return Poll::Ready(Some(Ok(Frame::data(this.batch(wire::frame(&m))))))
                }
                Some(Down::Raw(b)) => return Poll::Ready(Some(Ok(Frame::data(this.batch(b))))),
                Some(Down::Relay(r)) => {
                    if r.remaining > 0 {
                        this.relay = Some(Relaying {
                            rest: r.rest,
                            remaining: r.remaining,
                            queue: VecDeque::new(),
                        });
                    }
                    return Poll::Ready(Some(Ok(Frame::data(r.head))));
                }
                Some(Down::End(status)) => {
                    this.done = true;
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers(&status)))));
                }
                None => {
                    this.done = true;
                    let status = if this.broken {
                        Status::unavailable("ecds-agent: a response broke off mid-message")
                    } else {
                        Status::ok("")
                    };
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers(&status)))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// The request body to the control plane.
pub struct UpBody<Q> {
    rx: mpsc::UnboundedReceiver<Q>,
}

impl<Q> UpBody<Q> {
    pub fn new(rx: mpsc::UnboundedReceiver<Q>) -> Self {
        Self { rx }
    }
}

impl<Q: prost::Message + Unpin> Body for UpBody<Q> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let Some(first) = ready!(this.rx.poll_recv(cx)) else {
            return Poll::Ready(None);
        };
        let rx = &mut this.rx;
        let data = batch(wire::frame(&first), || {
            rx.try_recv().ok().map(|q| wire::frame(&q))
        });
        Poll::Ready(Some(Ok(Frame::data(data))))
    }
}

/// Why reading the control plane's responses stopped.
#[derive(Debug)]
pub enum ReadEnd {
    /// The stream ended with this status (OK: the control plane closed it).
    Status(Status),
    /// A message over the size limit (the text says how large).
    TooLarge(String),
    /// The body broke or is not valid gRPC: a transport error is the status's source.
    Broken(Status),
    /// The control plane went silent in the middle of a message for this long.
    Stalled(std::time::Duration),
}

/// One response from the control plane.
pub enum Next {
    /// The whole message, gRPC header included.
    Whole(Bytes),
    /// A message to relay: its first bytes (gRPC header included) and how many follow, to be
    /// read with [`ResponseReader::chunks`].
    Relay { head: Bytes, remaining: usize },
}

/// Reads gRPC messages from the control plane's response body.
pub struct ResponseReader {
    body: tonic::body::Body,
    buf: BytesMut,
    max: usize,
    shape: Shape,
    /// Longest silence in the middle of a message.
    stall: std::time::Duration,
    /// The type that must be read whole (ECDS), or `None` to relay every large message.
    intercepted: Option<&'static str>,
    /// The body is over: with the control plane's status (`true`: from its trailers) or one
    /// made here when it sent none.
    ended: Option<(Status, bool)>,
    /// An end met while batching, reported by the next read.
    deferred: Option<ReadEnd>,
}

/// What one read from the body gave.
enum Pulled {
    Data(Bytes),
    End,
}

impl ResponseReader {
    /// A reader of `body`: messages up to `max` bytes, silence in the middle of one up to
    /// `stall`, `intercepted` (ECDS) read whole.
    pub fn new(
        body: tonic::body::Body,
        max: usize,
        shape: Shape,
        stall: std::time::Duration,
        intercepted: Option<&'static str>,
    ) -> Self {
        Self {
            body,
            buf: BytesMut::new(),
            max,
            shape,
            stall,
            intercepted,
            ended: None,
            deferred: None,
        }
    }

    /// The next frame's data. `mid`: a message has begun, so silence is timed.
    async fn pull(&mut self, mid: bool) -> Result<Pulled, ReadEnd> {
        loop {
            if self.ended.is_some() {
                return Ok(Pulled::End);
            }
            let next = std::future::poll_fn(|cx| Pin::new(&mut self.body).poll_frame(cx));
            let frame = if mid {
                match tokio::time::timeout(self.stall, next).await {
                    Ok(f) => f,
                    Err(_) => return Err(ReadEnd::Stalled(self.stall)),
                }
            } else {
                next.await
            };
            match frame {
                None => {
                    self.ended = Some((
                        Status::unknown("the control plane ended the stream without a grpc-status"),
                        false,
                    ));
                }
                Some(Err(status)) => return Err(ReadEnd::Broken(status)),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if data.is_empty() => {}
                    Ok(data) => return Ok(Pulled::Data(data)),
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            self.ended = Some(match Status::from_header_map(&t) {
                                Some(s) => (s, true),
                                None => (
                                    Status::unknown(
                                        "the control plane's trailers have no grpc-status",
                                    ),
                                    false,
                                ),
                            });
                        }
                    }
                },
            }
        }
    }

    /// Reads until `buf` holds `n` bytes; `false` if the body ended first.
    async fn fill(&mut self, n: usize) -> Result<bool, ReadEnd> {
        while self.buf.len() < n {
            match self.pull(!self.buf.is_empty()).await? {
                Pulled::Data(d) => self.buf.extend_from_slice(&d),
                Pulled::End => return Ok(false),
            }
        }
        Ok(true)
    }

    /// The end of the stream, once the body is over. A control plane that ends with an error
    /// status in the middle of a message is reported with its own status.
    fn end(&mut self, mid_message: bool) -> ReadEnd {
        let ended = self.ended.take();
        if !mid_message {
            return ReadEnd::Status(ended.map_or_else(|| Status::ok(""), |(s, _)| s));
        }
        match ended {
            Some((s, true)) if s.code() != tonic::Code::Ok => ReadEnd::Status(Status::new(
                s.code(),
                format!("{} (in the middle of a message)", s.message()),
            )),
            _ => ReadEnd::Broken(Status::internal(
                "the control plane's stream ended in the middle of a message",
            )),
        }
    }

    /// The next message.
    pub async fn next(&mut self) -> Result<Next, ReadEnd> {
        if !self.fill(HEADER).await? {
            let mid = !self.buf.is_empty();
            return Err(self.end(mid));
        }
        let Some(Head { compressed, len }) = wire::head(&self.buf) else {
            return Err(self.end(true));
        };
        if compressed {
            return Err(ReadEnd::Broken(Status::internal(
                "the control plane sent a compressed message, and no compression was negotiated",
            )));
        }
        if len > self.max {
            return Err(ReadEnd::TooLarge(format!(
                "decoded message length too large: found {len} bytes, the limit is: {} bytes",
                self.max
            )));
        }
        let total = HEADER + len;
        if len >= RELAY_MIN {
            loop {
                let have = self.buf.len().min(total);
                let k = match self.intercepted {
                    None => Kind::Relay,
                    Some(t) => wire::kind(&self.buf[HEADER..have], have == total, self.shape, t),
                };
                match k {
                    Kind::Relay => {
                        let head = self.buf.split_to(have).freeze();
                        return Ok(Next::Relay {
                            head,
                            remaining: total - have,
                        });
                    }
                    Kind::Whole => break,
                    Kind::NeedMore => {
                        let want = (have + LOOK_STEP).min(total).min(HEADER + wire::LOOK_LIMIT);
                        if !self.fill(want.max(have + 1)).await? {
                            return Err(self.end(true));
                        }
                    }
                }
            }
        }
        if !self.fill(total).await? {
            return Err(self.end(true));
        }
        Ok(Next::Whole(self.buf.split_to(total).freeze()))
    }

    /// Up to `remaining` more bytes of the message being relayed: at least one chunk, and
    /// whatever else has already arrived (up to [`RELAY_BATCH`] bytes), so that a relay hands
    /// Envoy's side batches, not one wake-up per h2 frame.
    pub async fn chunks(&mut self, remaining: usize) -> Result<Vec<Bytes>, ReadEnd> {
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        let first = self.chunk(remaining).await?;
        let mut got = first.len();
        let mut out = vec![first];
        while got < remaining.min(RELAY_BATCH) {
            match futures::FutureExt::now_or_never(self.chunk(remaining - got)) {
                Some(Ok(c)) => {
                    got += c.len();
                    out.push(c);
                }
                Some(Err(e)) => {
                    self.deferred = Some(e);
                    break;
                }
                None => break,
            }
        }
        Ok(out)
    }

    async fn chunk(&mut self, remaining: usize) -> Result<Bytes, ReadEnd> {
        if !self.buf.is_empty() {
            let n = self.buf.len().min(remaining);
            return Ok(self.buf.split_to(n).freeze());
        }
        match self.pull(true).await? {
            Pulled::Data(mut d) => {
                if d.len() > remaining {
                    let rest = d.split_off(remaining);
                    self.buf.extend_from_slice(&rest);
                }
                Ok(d)
            }
            Pulled::End => Err(self.end(true)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
    use envoy_types::pb::google::protobuf::Any;
    use http_body_util::BodyExt;
    use prost::Message;

    /// A body that yields `chunks` and then `trailer`.
    fn body(chunks: Vec<Bytes>, status: Option<Status>) -> tonic::body::Body {
        let mut frames: Vec<Result<Frame<Bytes>, Status>> =
            chunks.into_iter().map(|c| Ok(Frame::data(c))).collect();
        if let Some(s) = status {
            frames.push(Ok(Frame::trailers(trailers(&s))));
        }
        tonic::body::Body::new(http_body_util::StreamBody::new(futures::stream::iter(
            frames,
        )))
    }

    fn response(t: &str, n: usize) -> DiscoveryResponse {
        DiscoveryResponse {
            version_info: "1".into(),
            resources: (0..n)
                .map(|i| Any {
                    type_url: t.into(),
                    value: vec![i as u8; 300],
                })
                .collect(),
            type_url: t.into(),
            nonce: "n1".into(),
            ..Default::default()
        }
    }

    /// Every message of `wire`, cut into `step`-byte chunks, read back as bytes.
    async fn read_all(wire: Bytes, step: usize, status: Status) -> (Vec<(bool, Bytes)>, ReadEnd) {
        let chunks = (0..wire.len())
            .step_by(step)
            .map(|i| wire.slice(i..(i + step).min(wire.len())))
            .collect();
        let mut r = ResponseReader::new(
            body(chunks, Some(status)),
            1 << 20,
            Shape::Sotw,
            std::time::Duration::from_secs(5),
            Some(crate::proto::type_url::ECDS),
        );
        let mut out = Vec::new();
        loop {
            match r.next().await {
                Ok(Next::Whole(b)) => out.push((false, b.slice(HEADER..))),
                Ok(Next::Relay {
                    head,
                    mut remaining,
                }) => {
                    let mut m = BytesMut::from(&head[HEADER..]);
                    while remaining > 0 {
                        let cs = match r.chunks(remaining).await {
                            Ok(c) => c,
                            Err(e) => return (out, e),
                        };
                        for c in cs {
                            remaining -= c.len();
                            m.extend_from_slice(&c);
                        }
                    }
                    out.push((true, m.freeze()));
                }
                Err(e) => return (out, e),
            }
        }
    }

    /// How reading the first message ends: `None` if it arrives whole (or its first relay
    /// batch does).
    async fn first_end(r: &mut ResponseReader) -> Option<ReadEnd> {
        match r.next().await {
            Ok(Next::Relay { remaining, .. }) => r.chunks(remaining).await.err(),
            Ok(Next::Whole(_)) => None,
            Err(e) => Some(e),
        }
    }

    #[tokio::test]
    async fn large_non_ecds_messages_are_relayed_and_the_rest_read_whole() {
        let msgs = [
            response(crate::proto::type_url::CLUSTER, 1000),
            response(crate::proto::type_url::ECDS, 1000),
            response(crate::proto::type_url::CLUSTER, 2),
        ];
        let mut wire = BytesMut::new();
        for m in &msgs {
            wire.extend_from_slice(&wire::frame(m));
        }
        for step in [1, 7, 16384, 1 << 20] {
            let (out, end) = read_all(wire.clone().freeze(), step, Status::ok("")).await;
            let relayed: Vec<bool> = out.iter().map(|(r, _)| *r).collect();
            assert_eq!(relayed, [true, false, false], "step {step}");
            for ((_, b), m) in out.iter().zip(&msgs) {
                assert_eq!(&DiscoveryResponse::decode(b.clone()).unwrap(), m);
            }
            assert!(matches!(end, ReadEnd::Status(s) if s.code() == tonic::Code::Ok));
        }
    }

    #[tokio::test]
    async fn oversized_truncated_and_compressed_messages_end_the_stream() {
        let big = wire::frame(&response(crate::proto::type_url::CLUSTER, 2000));
        let mut r = ResponseReader::new(
            body(vec![big.clone()], None),
            1000,
            Shape::Sotw,
            std::time::Duration::from_secs(5),
            None,
        );
        assert!(matches!(r.next().await, Err(ReadEnd::TooLarge(t)) if t.contains("too large")));
        let cut = big.slice(..big.len() / 2);
        let (out, end) = read_all(cut, 4096, Status::ok("")).await;
        assert!(out.is_empty());
        assert!(
            matches!(&end, ReadEnd::Broken(s) if s.message().contains("middle")),
            "{end:?}"
        );
        let mut z = BytesMut::from(&big[..]);
        z[0] = 1;
        let (_, end) = read_all(z.freeze(), 100, Status::ok("")).await;
        assert!(matches!(end, ReadEnd::Broken(s) if s.message().contains("compressed")));
        let (_, end) = read_all(Bytes::new(), 1, Status::permission_denied("no")).await;
        assert!(matches!(end, ReadEnd::Status(s) if s.code() == tonic::Code::PermissionDenied));
        // Trailers without a grpc-status mid-message: the break is reported, not a status the
        // control plane never sent.
        let cut = big.slice(..3000);
        let mut r = ResponseReader::new(
            tonic::body::Body::new(http_body_util::StreamBody::new(futures::stream::iter(
                vec![
                    Ok::<_, Status>(Frame::data(cut)),
                    Ok(Frame::trailers(HeaderMap::new())),
                ],
            ))),
            1 << 20,
            Shape::Sotw,
            std::time::Duration::from_secs(5),
            None,
        );
        let end = first_end(&mut r).await;
        assert!(
            matches!(&end, Some(ReadEnd::Broken(s)) if s.code() == tonic::Code::Internal),
            "{end:?}"
        );
        // An error status in the middle of a message is the control plane's, not ours.
        let (_, end) = read_all(big.slice(..3000), 1000, Status::resource_exhausted("quota")).await;
        assert!(
            matches!(&end, ReadEnd::Status(s) if s.code() == tonic::Code::ResourceExhausted
                && s.message() == "quota (in the middle of a message)"),
            "{end:?}"
        );
    }

    #[tokio::test]
    async fn silence_is_timed_only_in_the_middle_of_a_message() {
        let stall = std::time::Duration::from_millis(100);
        let reader = |chunks: Vec<Bytes>| {
            let frames = futures::stream::iter(
                chunks
                    .into_iter()
                    .map(|c| Ok::<_, Status>(Frame::data(c)))
                    .collect::<Vec<_>>(),
            )
            .chain(futures::stream::pending());
            ResponseReader::new(
                tonic::body::Body::new(http_body_util::StreamBody::new(frames)),
                1 << 20,
                Shape::Sotw,
                stall,
                Some(crate::proto::type_url::ECDS),
            )
        };
        use futures::StreamExt;
        // Between messages: an idle control plane is waited for, before the first message
        // and after a whole one.
        let mut r = reader(vec![]);
        assert!(tokio::time::timeout(stall * 3, r.next()).await.is_err());
        let one = wire::frame(&response(crate::proto::type_url::CLUSTER, 1));
        let mut r = reader(vec![one.clone()]);
        assert!(matches!(r.next().await, Ok(Next::Whole(b)) if b == one));
        assert!(tokio::time::timeout(stall * 3, r.next()).await.is_err());
        // A small message (read whole) and a large one (relayed) broken off: both stall.
        let small = wire::frame(&response(crate::proto::type_url::CLUSTER, 1));
        let large = wire::frame(&response(crate::proto::type_url::CLUSTER, 1000));
        for cut in [
            small.slice(..small.len() - 1),
            small.slice(..3),
            large.slice(..100_000),
        ] {
            let end = first_end(&mut reader(vec![cut])).await;
            assert!(
                matches!(end, Some(ReadEnd::Stalled(d)) if d == stall),
                "{end:?}"
            );
        }
    }

    #[tokio::test]
    async fn the_down_body_keeps_order_and_ends_with_the_status() {
        let (tx, rx) = mpsc::channel(8);
        let small = response(crate::proto::type_url::CLUSTER, 1);
        let (ctx, crx) = mpsc::channel(4);
        tx.send(Down::Message(small.clone())).await.unwrap();
        tx.send(Down::Relay(Relay {
            head: Bytes::from_static(b"ab"),
            rest: crx,
            remaining: 3,
        }))
        .await
        .unwrap();
        tx.send(Down::Message(small.clone())).await.unwrap();
        tx.send(Down::End(Status::unavailable("bye")))
            .await
            .unwrap();
        ctx.send(vec![Bytes::from_static(b"c"), Bytes::from_static(b"d")])
            .await
            .unwrap();
        ctx.send(vec![Bytes::from_static(b"e")]).await.unwrap();
        let got = DownBody::new(rx).collect().await.unwrap();
        let t = got.trailers().cloned().unwrap();
        let data = got.to_bytes();
        let f = wire::frame(&small);
        let mut want = BytesMut::new();
        want.extend_from_slice(&f);
        want.extend_from_slice(b"abcde");
        want.extend_from_slice(&f);
        assert_eq!(data, want.freeze());
        assert_eq!(t.get("grpc-status").unwrap(), "14");

        // A relay that breaks off: what follows it is dropped, the status still goes out.
        let (tx, rx) = mpsc::channel(8);
        let (ctx, crx) = mpsc::channel(4);
        tx.send(Down::Relay(Relay {
            head: Bytes::from_static(b"ab"),
            rest: crx,
            remaining: 10,
        }))
        .await
        .unwrap();
        tx.send(Down::Message(small)).await.unwrap();
        tx.send(Down::End(Status::internal("cut"))).await.unwrap();
        ctx.send(vec![Bytes::from_static(b"cd")]).await.unwrap();
        drop(ctx);
        let got = DownBody::new(rx).collect().await.unwrap();
        assert_eq!(got.trailers().unwrap().get("grpc-status").unwrap(), "13");
        assert_eq!(got.to_bytes(), Bytes::from_static(b"abcd"));
    }
}
