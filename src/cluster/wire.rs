//! The bytes of a forwarded call and its answer (NATS request/reply
//! between nodes).
//!
//! Little-endian integers; byte strings are a `u32` length then the bytes;
//! an option is a `0`/`1` byte then the value. A call starts with a version
//! byte ([`VERSION`]) and a tag; so does an answer. Decoding never panics:
//! anything malformed is `None`, which the receiver answers (or treats) as
//! a failed call.

use std::time::Duration;

use bytes::Bytes;

use crate::error::{Error, KeyPart, KeyProblem, LostReason, Unavailable};
use crate::outcome::{Begin, Fingerprint, Lease, Outcome, RecordState, RecordView};

/// The wire version this build speaks.
const VERSION: u8 = 1;

/// A call forwarded to the partition's owner.
#[derive(Clone, Debug)]
pub(crate) enum Call {
    Begin {
        user: Bytes,
        key: Bytes,
        fingerprint: Fingerprint,
    },
    BeginWait {
        user: Bytes,
        key: Bytes,
        fingerprint: Fingerprint,
        timeout: Duration,
    },
    Wait {
        user: Bytes,
        key: Bytes,
        fingerprint: Fingerprint,
        timeout: Duration,
    },
    Complete {
        lease: Lease,
        outcome: Outcome,
        ttl: Option<Duration>,
    },
    Release {
        lease: Lease,
    },
    Extend {
        lease: Lease,
        by: Duration,
    },
    Outcome {
        user: Bytes,
        key: Bytes,
    },
    Get {
        user: Bytes,
        key: Bytes,
    },
}

/// The owner's answer.
#[derive(Debug)]
pub(crate) enum Reply {
    /// This node does not serve the partition (any more): ask again.
    NotOwner,
    Begin(Begin),
    Done,
    Lease(Lease),
    Outcome(Option<Outcome>),
    View(Option<RecordView>),
    Failed(Error),
}

#[derive(Default)]
struct Out(Vec<u8>);

impl Out {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        self.0.extend_from_slice(v);
        self
    }
    fn millis(&mut self, d: Duration) -> &mut Self {
        self.u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
    fn opt_u64(&mut self, v: Option<u64>) -> &mut Self {
        match v {
            Some(v) => self.u8(1).u64(v),
            None => self.u8(0),
        }
    }
    fn lease(&mut self, l: &Lease) -> &mut Self {
        self.u64(l.engine)
            .bytes(&l.user)
            .bytes(&l.key)
            .fingerprint(l.fingerprint)
            .u64(l.token)
            .u64(l.expires_at_ms)
    }
    fn fingerprint(&mut self, f: Fingerprint) -> &mut Self {
        self.0.extend_from_slice(&f.0.to_le_bytes());
        self
    }
    fn outcome(&mut self, o: &Outcome) -> &mut Self {
        self.u16(o.status).bytes(&o.body)
    }
}

struct In<'a>(&'a [u8]);

impl<'a> In<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn usize(&mut self) -> Option<usize> {
        usize::try_from(self.u64()?).ok()
    }
    fn bytes(&mut self) -> Option<Bytes> {
        let len = usize::try_from(self.u32()?).ok()?;
        Some(Bytes::copy_from_slice(self.take(len)?))
    }
    fn millis(&mut self) -> Option<Duration> {
        Some(Duration::from_millis(self.u64()?))
    }
    fn opt_u64(&mut self) -> Option<Option<u64>> {
        match self.u8()? {
            0 => Some(None),
            1 => Some(Some(self.u64()?)),
            _ => None,
        }
    }
    fn fingerprint(&mut self) -> Option<Fingerprint> {
        Some(Fingerprint(u128::from_le_bytes(
            self.take(16)?.try_into().ok()?,
        )))
    }
    fn lease(&mut self) -> Option<Lease> {
        Some(Lease {
            engine: self.u64()?,
            user: self.bytes()?,
            key: self.bytes()?,
            fingerprint: self.fingerprint()?,
            token: self.u64()?,
            expires_at_ms: self.u64()?,
        })
    }
    fn outcome(&mut self) -> Option<Outcome> {
        Some(Outcome {
            status: self.u16()?,
            body: self.bytes()?,
        })
    }
    /// The value, if nothing follows it.
    fn end<T>(&self, value: T) -> Option<T> {
        self.0.is_empty().then_some(value)
    }
}

impl Call {
    /// Whether the call may be sent again when its first sending got no
    /// answer (the owner may have run it): reads, and `begin`s (the first
    /// request stays out: a lease granted to the one whose answer came
    /// second is released, `forward.rs`). Not `complete`,
    /// `release` or `extend`: their second run could answer an error for
    /// what the first did.
    pub fn safe_to_resend(&self) -> bool {
        matches!(
            self,
            Call::Begin { .. }
                | Call::BeginWait { .. }
                | Call::Wait { .. }
                | Call::Outcome { .. }
                | Call::Get { .. }
        )
    }

    /// The user id the call is for (it picks the partition).
    pub fn user(&self) -> &[u8] {
        match self {
            Call::Begin { user, .. }
            | Call::BeginWait { user, .. }
            | Call::Wait { user, .. }
            | Call::Outcome { user, .. }
            | Call::Get { user, .. } => user,
            Call::Complete { lease, .. } | Call::Release { lease } | Call::Extend { lease, .. } => {
                &lease.user
            }
        }
    }

    pub fn encode(&self) -> Bytes {
        let mut o = Out::default();
        o.u8(VERSION);
        match self {
            Call::Begin {
                user,
                key,
                fingerprint,
            } => o.u8(1).bytes(user).bytes(key).fingerprint(*fingerprint),
            Call::BeginWait {
                user,
                key,
                fingerprint,
                timeout,
            } => o
                .u8(2)
                .bytes(user)
                .bytes(key)
                .fingerprint(*fingerprint)
                .millis(*timeout),
            Call::Wait {
                user,
                key,
                fingerprint,
                timeout,
            } => o
                .u8(3)
                .bytes(user)
                .bytes(key)
                .fingerprint(*fingerprint)
                .millis(*timeout),
            Call::Complete {
                lease,
                outcome,
                ttl,
            } => o
                .u8(4)
                .lease(lease)
                .outcome(outcome)
                .opt_u64(ttl.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX))),
            Call::Release { lease } => o.u8(5).lease(lease),
            Call::Extend { lease, by } => o.u8(6).lease(lease).millis(*by),
            Call::Outcome { user, key } => o.u8(7).bytes(user).bytes(key),
            Call::Get { user, key } => o.u8(8).bytes(user).bytes(key),
        };
        Bytes::from(o.0)
    }

    pub fn decode(buf: &[u8]) -> Option<Call> {
        let mut i = In(buf);
        if i.u8()? != VERSION {
            return None;
        }
        let call = match i.u8()? {
            1 => Call::Begin {
                user: i.bytes()?,
                key: i.bytes()?,
                fingerprint: i.fingerprint()?,
            },
            2 => Call::BeginWait {
                user: i.bytes()?,
                key: i.bytes()?,
                fingerprint: i.fingerprint()?,
                timeout: i.millis()?,
            },
            3 => Call::Wait {
                user: i.bytes()?,
                key: i.bytes()?,
                fingerprint: i.fingerprint()?,
                timeout: i.millis()?,
            },
            4 => Call::Complete {
                lease: i.lease()?,
                outcome: i.outcome()?,
                ttl: i.opt_u64()?.map(Duration::from_millis),
            },
            5 => Call::Release { lease: i.lease()? },
            6 => Call::Extend {
                lease: i.lease()?,
                by: i.millis()?,
            },
            7 => Call::Outcome {
                user: i.bytes()?,
                key: i.bytes()?,
            },
            8 => Call::Get {
                user: i.bytes()?,
                key: i.bytes()?,
            },
            _ => return None,
        };
        i.end(call)
    }
}

impl Reply {
    pub fn encode(&self) -> Bytes {
        let mut o = Out::default();
        o.u8(VERSION);
        match self {
            Reply::NotOwner => o.u8(0),
            Reply::Begin(b) => {
                o.u8(1);
                match b {
                    Begin::Started(lease) => o.u8(1).lease(lease),
                    Begin::Replay(outcome) => o.u8(2).outcome(outcome),
                    Begin::InFlight { retry_after } => o.u8(3).millis(*retry_after),
                    Begin::Mismatch => o.u8(4),
                }
            }
            Reply::Done => o.u8(2),
            Reply::Lease(lease) => o.u8(3).lease(lease),
            Reply::Outcome(None) => o.u8(4).u8(0),
            Reply::Outcome(Some(outcome)) => o.u8(4).u8(1).outcome(outcome),
            Reply::View(None) => o.u8(5).u8(0),
            Reply::View(Some(v)) => o
                .u8(5)
                .u8(1)
                .u8(match v.state {
                    RecordState::InProgress => 0,
                    RecordState::Completed => 1,
                })
                .u64(v.token)
                .opt_u64(v.lease_expires_at_ms)
                .opt_u64(v.expires_at_ms)
                .opt_u64(v.status.map(u64::from)),
            Reply::Failed(e) => encode_error(o.u8(6), e),
        };
        Bytes::from(o.0)
    }

    pub fn decode(buf: &[u8]) -> Option<Reply> {
        let mut i = In(buf);
        if i.u8()? != VERSION {
            return None;
        }
        let reply = match i.u8()? {
            0 => Reply::NotOwner,
            1 => Reply::Begin(match i.u8()? {
                1 => Begin::Started(i.lease()?),
                2 => Begin::Replay(i.outcome()?),
                3 => Begin::InFlight {
                    retry_after: i.millis()?,
                },
                4 => Begin::Mismatch,
                _ => return None,
            }),
            2 => Reply::Done,
            3 => Reply::Lease(i.lease()?),
            4 => Reply::Outcome(match i.u8()? {
                0 => None,
                1 => Some(i.outcome()?),
                _ => return None,
            }),
            5 => Reply::View(match i.u8()? {
                0 => None,
                1 => Some(RecordView {
                    state: match i.u8()? {
                        0 => RecordState::InProgress,
                        1 => RecordState::Completed,
                        _ => return None,
                    },
                    token: i.u64()?,
                    lease_expires_at_ms: i.opt_u64()?,
                    expires_at_ms: i.opt_u64()?,
                    status: match i.opt_u64()? {
                        Some(s) => Some(u16::try_from(s).ok()?),
                        None => None,
                    },
                }),
                _ => return None,
            }),
            6 => Reply::Failed(decode_error(&mut i)?),
            _ => return None,
        };
        i.end(reply)
    }
}

/// Errors that cross the wire as themselves; every other error of the
/// owner (its disk, its changelog) crosses as
/// [`Unavailable::CopyFailed`] (the call was not acknowledged).
fn encode_error<'o>(o: &'o mut Out, e: &Error) -> &'o mut Out {
    match e {
        Error::InvalidKey { part, problem } => {
            o.u8(1).u8(match part {
                KeyPart::User => 0,
                KeyPart::Key => 1,
            });
            match problem {
                KeyProblem::Empty => o.u8(0),
                KeyProblem::TooLong { len, max } => o.u8(1).u64(*len as u64).u64(*max as u64),
                KeyProblem::BadByte { index, byte } => o.u8(2).u64(*index as u64).u8(*byte),
            }
        }
        Error::ResponseTooLarge { len, max } => o.u8(2).u64(*len as u64).u64(*max as u64),
        Error::LeaseLost { token, reason } => {
            o.u8(3).u64(*token);
            match reason {
                LostReason::Expired => o.u8(0),
                LostReason::Superseded { current } => o.u8(1).u64(*current),
                LostReason::Completed => o.u8(2),
                LostReason::Gone => o.u8(3),
            }
        }
        Error::Closed => o.u8(4),
        Error::ForeignLease { token } => o.u8(5).u64(*token),
        Error::Unavailable { partition, reason } => {
            o.u8(6).opt_u64(partition.map(u64::from)).u8(match reason {
                Unavailable::NoOwner => 0,
                Unavailable::NoAnswer => 1,
                Unavailable::Nats => 3,
                _ => 2,
            })
        }
        _ => o.u8(0),
    }
}

fn decode_error(i: &mut In<'_>) -> Option<Error> {
    Some(match i.u8()? {
        // The partition is filled in by the receiver.
        0 => Error::Unavailable {
            partition: None,
            reason: Unavailable::CopyFailed,
        },
        1 => Error::InvalidKey {
            part: match i.u8()? {
                0 => KeyPart::User,
                1 => KeyPart::Key,
                _ => return None,
            },
            problem: match i.u8()? {
                0 => KeyProblem::Empty,
                1 => KeyProblem::TooLong {
                    len: i.usize()?,
                    max: i.usize()?,
                },
                2 => KeyProblem::BadByte {
                    index: i.usize()?,
                    byte: i.u8()?,
                },
                _ => return None,
            },
        },
        2 => Error::ResponseTooLarge {
            len: i.usize()?,
            max: i.usize()?,
        },
        3 => Error::LeaseLost {
            token: i.u64()?,
            reason: match i.u8()? {
                0 => LostReason::Expired,
                1 => LostReason::Superseded { current: i.u64()? },
                2 => LostReason::Completed,
                3 => LostReason::Gone,
                _ => return None,
            },
        },
        4 => Error::Closed,
        5 => Error::ForeignLease { token: i.u64()? },
        6 => Error::Unavailable {
            partition: match i.opt_u64()? {
                Some(p) => Some(u32::try_from(p).ok()?),
                None => None,
            },
            reason: match i.u8()? {
                0 => Unavailable::NoOwner,
                1 => Unavailable::NoAnswer,
                2 => Unavailable::CopyFailed,
                3 => Unavailable::Nats,
                _ => return None,
            },
        },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lease(token: u64) -> Lease {
        Lease {
            engine: 42,
            user: Bytes::from_static(b"user-1"),
            key: Bytes::from_static(b"order 7"),
            fingerprint: Fingerprint(0x0123_4567_89ab_cdef_0011_2233_4455_6677),
            token,
            expires_at_ms: 1_700_000_000_000,
        }
    }

    fn calls() -> Vec<Call> {
        let (user, key) = (Bytes::from_static(b"u"), Bytes::from_static(b"k"));
        let fingerprint = Fingerprint(7);
        vec![
            Call::Begin {
                user: user.clone(),
                key: key.clone(),
                fingerprint,
            },
            Call::BeginWait {
                user: user.clone(),
                key: key.clone(),
                fingerprint,
                timeout: Duration::from_millis(1500),
            },
            Call::Wait {
                user: user.clone(),
                key: key.clone(),
                fingerprint,
                timeout: Duration::from_secs(3),
            },
            Call::Complete {
                lease: lease(9),
                outcome: Outcome {
                    status: 201,
                    body: Bytes::from_static(b"charged"),
                },
                ttl: Some(Duration::from_secs(60)),
            },
            Call::Complete {
                lease: lease(9),
                outcome: Outcome {
                    status: 200,
                    body: Bytes::new(),
                },
                ttl: None,
            },
            Call::Release { lease: lease(3) },
            Call::Extend {
                lease: lease(4),
                by: Duration::from_millis(250),
            },
            Call::Outcome {
                user: user.clone(),
                key: key.clone(),
            },
            Call::Get { user, key },
        ]
    }

    #[test]
    fn every_call_round_trips_and_every_cut_of_it_is_refused() {
        for call in calls() {
            let bytes = call.encode();
            let back = Call::decode(&bytes).expect("decodes");
            // Leases compare by their fields, which Debug shows.
            assert_eq!(format!("{back:?}"), format!("{call:?}"));
            for cut in 0..bytes.len() {
                assert!(
                    Call::decode(&bytes[..cut]).is_none(),
                    "{call:?} cut at {cut}"
                );
            }
            let mut longer = bytes.to_vec();
            longer.push(0);
            assert!(Call::decode(&longer).is_none());
        }
    }

    #[test]
    fn replies_round_trip_with_their_errors() {
        let replies = vec![
            Reply::NotOwner,
            Reply::Begin(Begin::Started(lease(5))),
            Reply::Begin(Begin::Replay(Outcome {
                status: 402,
                body: Bytes::from_static(b"declined"),
            })),
            Reply::Begin(Begin::InFlight {
                retry_after: Duration::from_millis(700),
            }),
            Reply::Begin(Begin::Mismatch),
            Reply::Done,
            Reply::Lease(lease(6)),
            Reply::Outcome(None),
            Reply::View(Some(RecordView {
                state: RecordState::Completed,
                token: 8,
                lease_expires_at_ms: None,
                expires_at_ms: Some(99),
                status: Some(201),
            })),
            Reply::Failed(Error::LeaseLost {
                token: 3,
                reason: LostReason::Superseded { current: 4 },
            }),
            Reply::Failed(Error::InvalidKey {
                part: KeyPart::Key,
                problem: KeyProblem::BadByte { index: 2, byte: 7 },
            }),
            Reply::Failed(Error::ResponseTooLarge { len: 10, max: 5 }),
            Reply::Failed(Error::Closed),
            Reply::Failed(Error::Unavailable {
                partition: Some(3),
                reason: Unavailable::NoOwner,
            }),
        ];
        for reply in replies {
            let bytes = reply.encode();
            let back = Reply::decode(&bytes).expect("decodes");
            // Errors compare by their text (Error is not PartialEq).
            assert_eq!(format!("{back:?}"), format!("{reply:?}"));
            for cut in 0..bytes.len() {
                assert!(
                    Reply::decode(&bytes[..cut]).is_none(),
                    "{reply:?} cut at {cut}"
                );
            }
        }
        // An error that has no wire form arrives as a failed copy.
        let io = Error::Poisoned {
            kind: std::io::ErrorKind::Other,
        };
        let back = Reply::decode(&Reply::Failed(io).encode()).unwrap();
        assert!(matches!(
            back,
            Reply::Failed(Error::Unavailable {
                reason: Unavailable::CopyFailed,
                ..
            })
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Call::decode(&bytes);
            let _ = Reply::decode(&bytes);
        }
    }
}
