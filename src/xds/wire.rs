//! gRPC message framing and the early look at a response that decides whether it may be
//! relayed without being decoded. Pure functions over bytes; no I/O.
//!
//! A gRPC message on the wire is a 5-byte header (compressed flag, big-endian length) and the
//! protobuf bytes. A `DiscoveryResponse` / `DeltaDiscoveryResponse` puts its resources in
//! field 2 and its `type_url` in field 4, which encoders write *after* the resources; so the
//! kind of a large response is read from whichever comes first: the `type_url` field, or the
//! type of the first resource (`Any.type_url`, inside a Delta `Resource` envelope when Delta).
//! A response read whole is judged by its own `type_url` instead. The one case the early look
//! gets "wrong" is a malformed response: `type_url` ECDS written after a first resource of
//! another type. It is relayed untouched, and Envoy rejects it for the type mismatch as it
//! would without the agent.

use bytes::{BufMut, Bytes, BytesMut};

/// Length of the gRPC message header.
pub const HEADER: usize = 5;

/// How far into a response the agent looks for its kind before buffering it whole.
pub const LOOK_LIMIT: usize = 64 << 10;

/// The header of one gRPC message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub compressed: bool,
    pub len: usize,
}

/// Reads a message header from the first [`HEADER`] bytes.
pub fn head(b: &[u8]) -> Option<Head> {
    let h: &[u8; HEADER] = b.get(..HEADER)?.try_into().ok()?;
    Some(Head {
        compressed: h[0] != 0,
        len: u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize,
    })
}

/// One protobuf message as a gRPC message (header + bytes).
pub fn frame(msg: &impl prost::Message) -> Bytes {
    let len = msg.encoded_len();
    let mut b = BytesMut::with_capacity(HEADER + len);
    b.put_u8(0);
    b.put_u32(len as u32);
    // Cannot fail: the buffer has room for `encoded_len` bytes.
    let _ = msg.encode(&mut b);
    b.freeze()
}

/// What the first bytes of a response say about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Not ECDS: it may go to Envoy as it arrives, untouched.
    Relay,
    /// ECDS, a `Resource` wrapper (SotW TTL) or undecidable: decode it whole.
    Whole,
    /// The bytes so far do not tell yet.
    NeedMore,
}

/// Which ADS response shape is being looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Sotw,
    Delta,
}

const WIRE_VARINT: u64 = 0;
const WIRE_I64: u64 = 1;
const WIRE_LEN: u64 = 2;
const WIRE_I32: u64 = 5;

/// A varint at the start of `b`: its value and its length; `None` if incomplete or invalid.
fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, byte) in b.iter().take(10).enumerate() {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// One field read from the front of `b`.
enum Field<'a> {
    /// Field number, and for length-delimited fields the bytes available of its payload
    /// plus whether they are all there.
    Len {
        number: u64,
        payload: &'a [u8],
        complete: bool,
        next: usize,
    },
    Other {
        next: usize,
    },
    Incomplete,
    Invalid,
}

fn field(b: &[u8]) -> Field<'_> {
    let Some((tag, n)) = varint(b) else {
        return if b.len() >= 10 {
            Field::Invalid
        } else {
            Field::Incomplete
        };
    };
    let rest = &b[n..];
    match tag & 7 {
        WIRE_VARINT => match varint(rest) {
            Some((_, m)) => Field::Other { next: n + m },
            None if rest.len() >= 10 => Field::Invalid,
            None => Field::Incomplete,
        },
        WIRE_I64 if rest.len() >= 8 => Field::Other { next: n + 8 },
        WIRE_I32 if rest.len() >= 4 => Field::Other { next: n + 4 },
        WIRE_I64 | WIRE_I32 => Field::Incomplete,
        WIRE_LEN => {
            let Some((len, m)) = varint(rest) else {
                return if rest.len() >= 10 {
                    Field::Invalid
                } else {
                    Field::Incomplete
                };
            };
            let body = &rest[m..];
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            let complete = body.len() >= len;
            Field::Len {
                number: tag >> 3,
                payload: &body[..len.min(body.len())],
                complete,
                next: (n + m).saturating_add(len),
            }
        }
        _ => Field::Invalid,
    }
}

/// The string in field `number` of the (possibly truncated) message `b`, if it is there whole.
/// `Err(())` when the field is absent from a complete message or `b` is malformed.
fn string_field(b: &[u8], number: u64, whole: bool) -> Result<Option<&[u8]>, ()> {
    Ok(message_field(b, number, whole)?.and_then(|(p, complete)| complete.then_some(p)))
}

/// The top-level string field `number` of a whole message (e.g. a response's nonce, 5), for
/// logs; `None` when absent or not UTF-8.
pub fn string_of(msg: &[u8], number: u64) -> Option<&str> {
    string_field(msg, number, true)
        .ok()
        .flatten()
        .and_then(|b| std::str::from_utf8(b).ok())
}

/// The message-typed field `number` of `b` (a possibly truncated message): its available
/// bytes and whether they are all there.
fn message_field(b: &[u8], number: u64, whole: bool) -> Result<Option<(&[u8], bool)>, ()> {
    let mut at = 0;
    while at < b.len() {
        match field(&b[at..]) {
            Field::Len {
                number: n,
                payload,
                complete,
                next,
            } => {
                if n == number {
                    return Ok(Some((payload, complete)));
                }
                if !complete {
                    return Ok(None);
                }
                at += next;
            }
            Field::Other { next } => at += next,
            Field::Incomplete => return if whole { Err(()) } else { Ok(None) },
            Field::Invalid => return Err(()),
        }
    }
    if whole {
        Err(())
    } else {
        Ok(None)
    }
}

/// Decides from the first bytes of a response body (`prefix`, without the gRPC header) whether
/// it may be relayed untouched. `complete` says `prefix` is the whole message. `intercepted`
/// is the type the agent converts (ECDS).
pub fn kind(prefix: &[u8], complete: bool, shape: Shape, intercepted: &str) -> Kind {
    match look(prefix, shape, intercepted) {
        Kind::NeedMore if complete || prefix.len() >= LOOK_LIMIT => Kind::Whole,
        k => k,
    }
}

fn look(prefix: &[u8], shape: Shape, intercepted: &str) -> Kind {
    let of_type = |t: &[u8]| {
        if t == intercepted.as_bytes() || t == crate::proto::type_url::RESOURCE.as_bytes() {
            Kind::Whole
        } else {
            Kind::Relay
        }
    };
    let mut at = 0;
    while at < prefix.len() {
        match field(&prefix[at..]) {
            Field::Len {
                number: 4,
                payload,
                complete: whole,
                ..
            } => {
                // The response's own type_url.
                return if whole {
                    of_type(payload)
                } else {
                    Kind::NeedMore
                };
            }
            Field::Len {
                number: 2,
                payload,
                complete: whole,
                ..
            } => {
                // The first resource.
                let any = match shape {
                    Shape::Sotw => Ok(Some((payload, whole))),
                    // A Delta `Resource` envelope; the body is its field 2.
                    Shape::Delta => message_field(payload, 2, whole),
                };
                return match any {
                    Ok(Some((any, any_whole))) => match string_field(any, 1, any_whole) {
                        Ok(Some(t)) => of_type(t),
                        Ok(None) => Kind::NeedMore,
                        Err(()) => Kind::Whole,
                    },
                    Ok(None) => Kind::NeedMore,
                    // No body (a TTL heartbeat) or malformed: let the decoder judge it.
                    Err(()) => Kind::Whole,
                };
            }
            Field::Len {
                complete: false, ..
            } => return Kind::NeedMore,
            Field::Len { next, .. } | Field::Other { next } => at += next,
            Field::Incomplete => break,
            Field::Invalid => return Kind::Whole,
        }
    }
    Kind::NeedMore
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::discovery::v3::{
        DeltaDiscoveryResponse, DiscoveryResponse, Resource,
    };
    use envoy_types::pb::google::protobuf::Any;
    use prost::Message;

    const ECDS: &str = crate::proto::type_url::ECDS;
    const CDS: &str = crate::proto::type_url::CLUSTER;

    fn any(t: &str, n: usize) -> Any {
        Any {
            type_url: t.into(),
            value: vec![7; n],
        }
    }

    fn sotw(t: &str, first: &str) -> Vec<u8> {
        DiscoveryResponse {
            version_info: "v1".into(),
            resources: vec![any(first, 3000), any(first, 10)],
            type_url: t.into(),
            nonce: "n".into(),
            ..Default::default()
        }
        .encode_to_vec()
    }

    /// The kind decided from every prefix of `msg`, as the bytes arrive.
    fn decided(msg: &[u8], shape: Shape) -> Vec<Kind> {
        (0..=msg.len())
            .map(|n| kind(&msg[..n], n == msg.len(), shape, ECDS))
            .collect()
    }

    #[test]
    fn sotw_kinds_are_decided_from_the_first_resource() {
        let cds = sotw(CDS, CDS);
        let k = decided(&cds, Shape::Sotw);
        // Once decided, the answer never changes and is right.
        let first = k.iter().position(|k| *k != Kind::NeedMore).unwrap();
        assert!(first < 80, "decided after {first} bytes");
        assert!(k[first..].iter().all(|k| *k == Kind::Relay));
        let ecds = sotw(ECDS, ECDS);
        assert!(decided(&ecds, Shape::Sotw)
            .iter()
            .all(|k| matches!(k, Kind::NeedMore | Kind::Whole)));
        assert_eq!(kind(&ecds, true, Shape::Sotw, ECDS), Kind::Whole);
        // A TTL wrapper is decoded whole.
        let wrapped = sotw(CDS, crate::proto::type_url::RESOURCE);
        assert_eq!(kind(&wrapped, true, Shape::Sotw, ECDS), Kind::Whole);
    }

    #[test]
    fn a_type_url_before_the_resources_decides() {
        // Encoders may write fields in any order: type_url first.
        let mut b = Vec::new();
        prost::encoding::string::encode(4, &ECDS.to_string(), &mut b);
        prost::encoding::message::encode(2, &any(CDS, 100), &mut b);
        assert_eq!(kind(&b, true, Shape::Sotw, ECDS), Kind::Whole);
        let mut b = Vec::new();
        prost::encoding::string::encode(4, &CDS.to_string(), &mut b);
        assert_eq!(kind(&b, false, Shape::Sotw, ECDS), Kind::Relay);
    }

    #[test]
    fn delta_kinds_look_inside_the_envelope() {
        let resp = |t: &str| {
            DeltaDiscoveryResponse {
                system_version_info: "s".into(),
                resources: vec![Resource {
                    version: "1".into(),
                    name: "c0".into(),
                    resource: Some(any(t, 5000)),
                    ..Default::default()
                }],
                type_url: t.into(),
                nonce: "n".into(),
                ..Default::default()
            }
            .encode_to_vec()
        };
        let cds = resp(CDS);
        let k = decided(&cds, Shape::Delta);
        let first = k.iter().position(|k| *k != Kind::NeedMore).unwrap();
        assert!(first < 100);
        assert!(k[first..].iter().all(|k| *k == Kind::Relay));
        assert!(decided(&resp(ECDS), Shape::Delta)
            .iter()
            .all(|k| matches!(k, Kind::NeedMore | Kind::Whole)));
        // A heartbeat (envelope without a body) first: decoded whole.
        let hb = DeltaDiscoveryResponse {
            resources: vec![Resource {
                name: "x".into(),
                ..Default::default()
            }],
            type_url: CDS.into(),
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(kind(&hb, true, Shape::Delta, ECDS), Kind::Whole);
    }

    #[test]
    fn garbage_and_empty_responses_are_decoded_whole() {
        assert_eq!(kind(&[], true, Shape::Sotw, ECDS), Kind::Whole);
        assert_eq!(kind(&[0xff; 20], false, Shape::Sotw, ECDS), Kind::Whole);
        assert_eq!(kind(&[0x07], false, Shape::Sotw, ECDS), Kind::Whole);
        // An absurd length in the first resource: never decided from it, bounded look.
        let mut b = vec![0x12, 0xff, 0xff, 0xff, 0xff, 0x0f];
        b.resize(LOOK_LIMIT + 10, 0);
        assert_eq!(kind(&b, false, Shape::Sotw, ECDS), Kind::Whole);
        // Only version_info, then more to come.
        let mut v = Vec::new();
        prost::encoding::string::encode(1, &"v".repeat(100), &mut v);
        assert_eq!(kind(&v, false, Shape::Sotw, ECDS), Kind::NeedMore);
        let big = vec![0u8; LOOK_LIMIT];
        assert_eq!(kind(&big, false, Shape::Sotw, ECDS), Kind::Whole);
    }

    #[test]
    fn frames_round_trip() {
        let r = DiscoveryResponse {
            nonce: "abc".into(),
            ..Default::default()
        };
        let f = frame(&r);
        let h = head(&f).unwrap();
        assert!(!h.compressed);
        assert_eq!(h.len, f.len() - HEADER);
        assert_eq!(DiscoveryResponse::decode(&f[HEADER..]).unwrap(), r);
        assert_eq!(head(&f[..4]), None);
    }
}
