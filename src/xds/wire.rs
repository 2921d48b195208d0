//! gRPC message framing and the early look at a response that decides whether it may be
//! relayed without being decoded. Pure functions over bytes; no I/O.
//!
//! A gRPC message on the wire is a 5-byte header (compressed flag, big-endian length) and the
//! protobuf bytes. A `DiscoveryResponse` / `DeltaDiscoveryResponse` puts its resources in
//! field 2 and its `type_url` in field 4, which encoders write *after* the resources; so the
//! kind of a large response is read from the type of its first resource (`Any.type_url`,
//! inside a Delta `Resource` envelope when Delta), once that resource is all there. Protobuf
//! keeps the *last* value of a field written twice, so nothing is decided from a value a later
//! one could override: a `type_url` ahead of the resources sends an ECDS response to be read
//! whole (any other still waits for its first resource), and a response read whole is judged by
//! its last `type_url`. Two shapes are judged
//! otherwise, both malformed or contrived: a `type_url` ECDS written after a first resource of
//! another type is relayed untouched, and Envoy rejects it for the type mismatch (each
//! resource's type must be the response's) as it would without the agent; and a first
//! resource larger than [`LOOK_LIMIT`] is judged by the `type_url` written ahead of its value
//! (where every encoder puts it), not by one repeated after it.

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

/// The fields at the front of `b` (a possibly truncated message), in order. The walk ends
/// after the first field that is not all there (a partial length-delimited one, an incomplete
/// or an invalid one), which is yielded last.
fn walk(b: &[u8]) -> impl Iterator<Item = Field<'_>> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at >= b.len() {
            return None;
        }
        let f = field(&b[at..]);
        match &f {
            Field::Len {
                complete: true,
                next,
                ..
            }
            | Field::Other { next } => at += next,
            _ => at = b.len(),
        }
        Some(f)
    })
}

/// The fields of a whole message, in order: each field's number and, when length-delimited,
/// its payload; an `Err` (and the end) where `msg` is truncated or malformed.
fn fields(msg: &[u8]) -> impl Iterator<Item = Result<(u64, Option<&[u8]>), ()>> {
    walk(msg).map(|f| match f {
        Field::Len {
            number,
            payload,
            complete: true,
            ..
        } => Ok((number, Some(payload))),
        Field::Other { .. } => Ok((0, None)),
        Field::Len { .. } | Field::Incomplete | Field::Invalid => Err(()),
    })
}

/// The last length-delimited field `number` of the whole message `msg`: what a protobuf
/// decoder keeps of a string field written more than once.
fn last_of(msg: &[u8], number: u64) -> Result<Option<&[u8]>, ()> {
    let mut last = None;
    for f in fields(msg) {
        if let (n, Some(p)) = f? {
            if n == number {
                last = Some(p);
            }
        }
    }
    Ok(last)
}

/// The top-level string field `number` of a whole message (a response's `type_url`, 4, or
/// nonce, 5), the last occurrence as decoders read it; `None` when absent, not UTF-8 or
/// `msg` is malformed.
pub fn string_of(msg: &[u8], number: u64) -> Option<&str> {
    last_of(msg, number)
        .ok()
        .flatten()
        .and_then(|b| std::str::from_utf8(b).ok())
}

/// The first length-delimited field `number` of a possibly truncated message: its bytes so
/// far and whether they are all there; `None` if it is not (yet) there or `b` is malformed.
fn first_of(b: &[u8], number: u64) -> Option<(&[u8], bool)> {
    for f in walk(b) {
        match f {
            Field::Len {
                number: n,
                payload,
                complete,
                ..
            } if n == number => return Some((payload, complete)),
            Field::Len { complete: true, .. } | Field::Other { .. } => {}
            Field::Len { .. } | Field::Incomplete | Field::Invalid => return None,
        }
    }
    None
}

/// The first `Any.type_url` of a resource that has not all arrived.
fn first_resource_type(resource: &[u8], shape: Shape) -> Option<&[u8]> {
    let any = match shape {
        Shape::Sotw => resource,
        Shape::Delta => first_of(resource, 2)?.0,
    };
    first_of(any, 1).and_then(|(t, complete)| complete.then_some(t))
}

/// The type of one whole resource (`Any.type_url`): in a Delta `Resource` envelope, its
/// field 2, which decoders merge when written more than once (the last type_url wins).
/// `Ok(None)`: no body (a TTL heartbeat).
fn resource_type(resource: &[u8], shape: Shape) -> Result<Option<&[u8]>, ()> {
    match shape {
        Shape::Sotw => last_of(resource, 1),
        Shape::Delta => {
            let mut t = None;
            for f in fields(resource) {
                if let (2, Some(any)) = f? {
                    t = last_of(any, 1)?.or(t);
                }
            }
            Ok(t)
        }
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
    for f in walk(prefix) {
        match f {
            Field::Len {
                number: 4,
                payload,
                complete,
                ..
            } => {
                // The response's own type_url ahead of its resources (not how encoders write
                // it): ECDS is read whole; anything else still waits for the first resource,
                // as a later type_url could say ECDS.
                if !complete {
                    return Kind::NeedMore;
                }
                if of_type(payload) == Kind::Whole {
                    return Kind::Whole;
                }
            }
            Field::Len {
                number: 2,
                payload,
                complete,
                ..
            } => {
                // The first resource, once it is all there (a later type_url inside it
                // would override an earlier one) ...
                if complete {
                    return match resource_type(payload, shape) {
                        Ok(Some(t)) => of_type(t),
                        // No body (a TTL heartbeat) or malformed: let the decoder judge it.
                        Ok(None) | Err(()) => Kind::Whole,
                    };
                }
                // ... or, if it is larger than the look, by the type_url encoders write
                // ahead of its value.
                if prefix.len() < LOOK_LIMIT {
                    return Kind::NeedMore;
                }
                return match first_resource_type(payload, shape) {
                    Some(t) => of_type(t),
                    None => Kind::Whole,
                };
            }
            Field::Len {
                complete: false, ..
            } => return Kind::NeedMore,
            Field::Len { .. } | Field::Other { .. } => {}
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
        // Decided as soon as the first resource is all there; then it never changes.
        let first = k.iter().position(|k| *k != Kind::NeedMore).unwrap();
        let resource = any(CDS, 3000).encoded_len();
        assert!(
            first > resource && first < resource + 40,
            "decided after {first} bytes"
        );
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
    fn a_type_url_ahead_of_the_resources_never_decides_a_relay_alone() {
        let ahead = |t: &str, first: &str| {
            let mut b = Vec::new();
            prost::encoding::string::encode(4, &t.to_string(), &mut b);
            prost::encoding::message::encode(2, &any(first, 100), &mut b);
            b
        };
        // ECDS ahead: read whole as soon as it is there, whatever follows.
        let b = ahead(ECDS, CDS);
        assert_eq!(
            kind(&b[..ECDS.len() + 2], false, Shape::Sotw, ECDS),
            Kind::Whole
        );
        // Another type ahead: the first resource still decides.
        let b = ahead(CDS, CDS);
        assert_eq!(
            kind(&b[..CDS.len() + 5], false, Shape::Sotw, ECDS),
            Kind::NeedMore
        );
        assert_eq!(kind(&b, false, Shape::Sotw, ECDS), Kind::Relay);
        assert_eq!(
            kind(&ahead(CDS, ECDS), false, Shape::Sotw, ECDS),
            Kind::Whole
        );
    }

    #[test]
    fn a_response_read_whole_is_judged_by_its_last_type_url() {
        // type_url CDS first, ECDS resources, then type_url ECDS: protobuf reads ECDS.
        let mut b = Vec::new();
        prost::encoding::string::encode(4, &CDS.to_string(), &mut b);
        prost::encoding::message::encode(2, &any(ECDS, 100), &mut b);
        prost::encoding::string::encode(5, &"n1".to_string(), &mut b);
        prost::encoding::string::encode(4, &ECDS.to_string(), &mut b);
        for n in 0..b.len() {
            assert_ne!(kind(&b[..n], false, Shape::Sotw, ECDS), Kind::Relay, "{n}");
        }
        assert_eq!(string_of(&b, 4), Some(ECDS));
        assert_eq!(DiscoveryResponse::decode(&b[..]).unwrap().type_url, ECDS);
        assert_eq!(string_of(&b, 5), Some("n1"));
        assert_eq!(string_of(&b, 1), None);
        // A truncated or malformed message has no answer.
        assert_eq!(string_of(&b[..b.len() - 1], 4), None);
        assert_eq!(string_of(&[0xff; 12], 4), None);
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
        assert!(first > 5000 && first < 5100, "decided after {first} bytes");
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
    fn a_type_url_written_twice_inside_the_first_resource_counts_last() {
        // SotW: an Any whose type_url is CDS, then ECDS.
        let mut a = Vec::new();
        prost::encoding::string::encode(1, &CDS.to_string(), &mut a);
        prost::encoding::bytes::encode(2, &vec![1u8; 100], &mut a);
        prost::encoding::string::encode(1, &ECDS.to_string(), &mut a);
        assert_eq!(Any::decode(&a[..]).unwrap().type_url, ECDS);
        let mut b = Vec::new();
        prost::encoding::bytes::encode(2, &a, &mut b);
        for n in 0..b.len() {
            assert_eq!(
                kind(&b[..n], false, Shape::Sotw, ECDS),
                Kind::NeedMore,
                "{n}"
            );
        }
        assert_eq!(kind(&b, false, Shape::Sotw, ECDS), Kind::Whole);
        // Delta: the envelope's body written twice merges; the second type_url wins.
        let mut env = Vec::new();
        prost::encoding::message::encode(2, &any(CDS, 50), &mut env);
        prost::encoding::message::encode(2, &any(ECDS, 0), &mut env);
        assert_eq!(
            Resource::decode(&env[..])
                .unwrap()
                .resource
                .unwrap()
                .type_url,
            ECDS
        );
        let mut b = Vec::new();
        prost::encoding::bytes::encode(2, &env, &mut b);
        assert_eq!(kind(&b, false, Shape::Delta, ECDS), Kind::Whole);
        // ... and a body without a type_url keeps the earlier one.
        let mut env = Vec::new();
        prost::encoding::message::encode(2, &any(CDS, 50), &mut env);
        prost::encoding::message::encode(2, &any("", 5), &mut env);
        let mut b = Vec::new();
        prost::encoding::bytes::encode(2, &env, &mut b);
        assert_eq!(kind(&b, false, Shape::Delta, ECDS), Kind::Relay);
    }

    #[test]
    fn a_first_resource_larger_than_the_look_is_judged_by_its_leading_type_url() {
        for (shape, t, want) in [
            (Shape::Sotw, CDS, Kind::Relay),
            (Shape::Sotw, ECDS, Kind::Whole),
            (Shape::Delta, CDS, Kind::Relay),
            (Shape::Delta, ECDS, Kind::Whole),
        ] {
            let big = any(t, 2 * LOOK_LIMIT);
            let resource = match shape {
                Shape::Sotw => big.encode_to_vec(),
                Shape::Delta => Resource {
                    name: "r".into(),
                    resource: Some(big),
                    ..Default::default()
                }
                .encode_to_vec(),
            };
            let mut b = Vec::new();
            prost::encoding::bytes::encode(2, &resource, &mut b);
            assert_eq!(
                kind(&b[..LOOK_LIMIT - 1], false, shape, ECDS),
                Kind::NeedMore
            );
            assert_eq!(kind(&b[..LOOK_LIMIT], false, shape, ECDS), want, "{t}");
        }
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
