//! Sealing stored bodies: the AEAD side of encryption at rest.
//!
//! With `Options::encryption` (feature `encryption`), the body of every
//! complete record the engine writes is sealed with XChaCha20-Poly1305
//! under the current key: a nonce drawn from the operating system's CSPRNG
//! (`getrandom`) for every record, and as associated data every byte of the
//! record's content before the sealed body (type, token, deadlines, time,
//! fingerprint, user id, key, status, key id, nonce and length; see
//! `record.rs`). So a sealed body cannot be moved to another record, or its
//! header changed, without failing authentication.
//!
//! Only bodies are sealed: recovery, `get`, `verify` and the rest of the
//! engine never need a key. A body is opened where it is handed out
//! ([`Log::outcome`]: replays, `outcome`, `wait`, `for_each_record`), and
//! resealed under the current key where compaction copies it
//! ([`Log::copy_frame`]).
//!
//! Without the feature the keyring is empty: sealed records still parse
//! and replay, and opening one answers [`Error::MissingKey`].

use super::record::{FRAME_HEADER, Record, SEAL_OVERHEAD};
use super::{Log, ReadRecord};
use crate::error::{CorruptKind, Error, Result};
use crate::options::Options;
use crate::outcome::Outcome;

/// Why a body could not be sealed or opened.
#[derive(Debug)]
#[cfg_attr(not(feature = "encryption"), allow(dead_code))]
pub(crate) enum SealError {
    /// No key with this id is configured.
    Missing(u32),
    /// The sealed body fails authentication under the key with this id:
    /// the record was altered, or the key's bytes are wrong.
    Unauthentic(u32),
    /// The operating system's random number generator failed.
    Random(std::io::Error),
}

#[cfg(feature = "encryption")]
mod keys {
    use chacha20poly1305::aead::array::Array;
    use chacha20poly1305::{AeadInOut, KeyInit, XChaCha20Poly1305};

    use super::super::record::{NONCE_LEN, Record, Seal, TAG_LEN};
    use super::SealError;
    use crate::encryption::EncryptionKeys;

    /// The ciphers of the configured keys, the current one first.
    pub(crate) struct Keyring {
        ciphers: Vec<(u32, XChaCha20Poly1305)>,
    }

    impl std::fmt::Debug for Keyring {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let ids: Vec<u32> = self.ciphers.iter().map(|(id, _)| *id).collect();
            f.debug_struct("Keyring").field("ids", &ids).finish()
        }
    }

    impl Keyring {
        pub fn new(keys: Option<&EncryptionKeys>) -> Keyring {
            let ciphers = keys
                .into_iter()
                .flat_map(EncryptionKeys::keys)
                .map(|(id, key)| (id, XChaCha20Poly1305::new(&Array::from(*key))))
                .collect();
            Keyring { ciphers }
        }

        /// The id of the key that seals, if any.
        pub fn current(&self) -> Option<u32> {
            self.ciphers.first().map(|(id, _)| *id)
        }

        fn cipher(&self, id: u32) -> Result<&XChaCha20Poly1305, SealError> {
            self.ciphers
                .iter()
                .find(|(have, _)| *have == id)
                .map(|(_, c)| c)
                .ok_or(SealError::Missing(id))
        }

        /// `rec` (a complete record with a plaintext body) sealed under the
        /// current key, its sealed body in `out`; `None` without a key.
        pub fn seal<'a>(
            &self,
            rec: &Record<'a>,
            out: &'a mut Vec<u8>,
        ) -> Result<Option<Record<'a>>, SealError> {
            let Some((key_id, cipher)) = self.ciphers.first() else {
                return Ok(None);
            };
            let mut nonce = [0u8; NONCE_LEN];
            getrandom::fill(&mut nonce).map_err(|e| SealError::Random(e.into()))?;
            let seal = Seal {
                key_id: *key_id,
                nonce,
            };
            let mut aad = Vec::with_capacity(96 + rec.user.len() + rec.key.len());
            Record {
                seal: Some(seal),
                ..*rec
            }
            .encode_fields(&mut aad, rec.body.len() + TAG_LEN);
            out.clear();
            out.reserve(rec.body.len() + TAG_LEN);
            out.extend_from_slice(rec.body);
            let tag = cipher
                .encrypt_inout_detached(&Array::from(nonce), &aad, out.as_mut_slice().into())
                // Only a body past 256 GiB fails; bodies are capped far below.
                .map_err(|_| SealError::Unauthentic(*key_id))?;
            out.extend_from_slice(&tag);
            let out: &'a Vec<u8> = out;
            Ok(Some(Record {
                seal: Some(seal),
                body: out,
                ..*rec
            }))
        }

        /// The body sealed as `sealed` (ciphertext, then tag) under `seal`,
        /// with `aad` as its associated data.
        pub fn open(&self, seal: Seal, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
            let cipher = self.cipher(seal.key_id)?;
            let unauthentic = || SealError::Unauthentic(seal.key_id);
            let split = sealed.len().checked_sub(TAG_LEN).ok_or_else(unauthentic)?;
            let (ciphertext, tag) = sealed.split_at(split);
            let tag = Array::try_from(tag).map_err(|_| unauthentic())?;
            let mut body = ciphertext.to_vec();
            cipher
                .decrypt_inout_detached(
                    &Array::from(seal.nonce),
                    aad,
                    body.as_mut_slice().into(),
                    &tag,
                )
                .map_err(|_| unauthentic())?;
            Ok(body)
        }
    }
}

#[cfg(not(feature = "encryption"))]
mod keys {
    use super::super::record::{Record, Seal};
    use super::SealError;

    /// Without the `encryption` feature: no key, ever.
    #[derive(Debug)]
    pub(crate) struct Keyring;

    impl Keyring {
        pub fn current(&self) -> Option<u32> {
            None
        }

        pub fn seal<'a>(
            &self,
            _rec: &Record<'a>,
            _out: &'a mut Vec<u8>,
        ) -> Result<Option<Record<'a>>, SealError> {
            Ok(None)
        }

        pub fn open(&self, seal: Seal, _aad: &[u8], _sealed: &[u8]) -> Result<Vec<u8>, SealError> {
            Err(SealError::Missing(seal.key_id))
        }
    }
}

pub(crate) use keys::Keyring;

/// The keyring `options` configure.
pub(crate) fn keyring(options: &Options) -> Keyring {
    #[cfg(feature = "encryption")]
    return Keyring::new(options.encryption.as_ref());
    #[cfg(not(feature = "encryption"))]
    {
        let _ = options;
        Keyring
    }
}

/// What [`Log::copy_frame`] did with a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Copied {
    /// Copied byte for byte: nothing to seal, or sealed under the current
    /// key already.
    AsIs,
    /// Sealed (again) under the current key.
    Resealed,
    /// Copied byte for byte although it is not sealed under the current key:
    /// sealing it would grow the file past what log positions can name.
    Unsealed,
}

impl Log {
    /// The record to append for `rec`: a complete record sealed under the
    /// current key (its sealed body in `buf`) if a key is configured; else
    /// `rec` itself.
    ///
    /// # Errors
    /// [`Error::Random`] if no nonce could be drawn.
    pub(crate) fn seal<'a>(&self, rec: Record<'a>, buf: &'a mut Vec<u8>) -> Result<Record<'a>> {
        if rec.kind != super::record::Kind::Complete || rec.seal.is_some() {
            return Ok(rec);
        }
        match self.keys.seal(&rec, buf) {
            Ok(sealed) => Ok(sealed.unwrap_or(rec)),
            Err(e) => Err(self.seal_error(e, 0)),
        }
    }

    /// The stored outcome of a complete record read from `at`, its body
    /// opened if it is sealed.
    ///
    /// # Errors
    /// [`Error::MissingKey`] if no configured key has the record's key id;
    /// [`Error::Corrupt`] with [`CorruptKind::Authentication`] if the body
    /// fails authentication (altered, or the key's bytes are wrong).
    pub(crate) fn outcome(&self, record: ReadRecord, at: u64) -> Result<Outcome> {
        record
            .into_outcome(&self.keys)
            .map_err(|e| self.seal_error(e, at))
    }

    /// Appends the frame of `rec` (`frame`, in the segment in `slot` at
    /// `offset`) to a compaction output `out`: resealed under the current
    /// key if a key is configured and it is a complete record that is not
    /// sealed under it yet, unless that would grow it by more than `room`
    /// bytes; else byte for byte.
    ///
    /// # Errors
    /// As [`Log::outcome`], for a body sealed under an older key;
    /// [`Error::Random`].
    pub(crate) fn copy_frame(
        &self,
        rec: &Record<'_>,
        frame: &[u8],
        at: u64,
        room: u64,
        out: &mut Vec<u8>,
    ) -> Result<Copied> {
        let Some(current) = self.keys.current() else {
            out.extend_from_slice(frame);
            return Ok(Copied::AsIs);
        };
        if rec.kind != super::record::Kind::Complete
            || rec.seal.is_some_and(|s| s.key_id == current)
        {
            out.extend_from_slice(frame);
            return Ok(Copied::AsIs);
        }
        let growth = if rec.seal.is_some() { 0 } else { SEAL_OVERHEAD };
        if growth as u64 > room {
            out.extend_from_slice(frame);
            return Ok(Copied::Unsealed);
        }
        let opened;
        let body = match rec.seal {
            Some(seal) => {
                // The content before the body is the associated data.
                let content = frame.get(FRAME_HEADER..).unwrap_or_default();
                let aad = content
                    .get(..content.len().saturating_sub(rec.body.len()))
                    .unwrap_or_default();
                opened = self
                    .keys
                    .open(seal, aad, rec.body)
                    .map_err(|e| self.seal_error(e, at))?;
                &opened[..]
            }
            None => rec.body,
        };
        let plain = Record {
            seal: None,
            body,
            ..*rec
        };
        let mut sealed = Vec::new();
        self.seal(plain, &mut sealed)?.encode(out);
        Ok(Copied::Resealed)
    }

    /// The error for `e` about the record at `at`.
    fn seal_error(&self, e: SealError, at: u64) -> Error {
        match e {
            SealError::Missing(key_id) => Error::MissingKey {
                key_id,
                file: self.path_of(at),
                offset: self.offset_of(at),
            },
            SealError::Unauthentic(key_id) => Error::Corrupt {
                file: self.path_of(at),
                offset: self.offset_of(at),
                kind: CorruptKind::Authentication { key_id },
            },
            SealError::Random(source) => Error::Random { source },
        }
    }
}

/// Whether `rec` is a complete record that a compaction under `current`
/// (the sealing key, if any) would seal again.
pub(crate) fn needs_seal(current: Option<u32>, rec: &Record<'_>) -> bool {
    current.is_some()
        && rec.kind == super::record::Kind::Complete
        && rec.seal.map(|s| s.key_id) != current
}
