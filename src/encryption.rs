//! Encryption at rest (feature `encryption`): the keys an engine seals
//! stored bodies with ([`EncryptionKeys`], set as `Options::encryption`),
//! and the key file the CLI reads. The AEAD itself is in `log/seal.rs`.

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// Bytes of a key.
pub(crate) const KEY_LEN: usize = 32;

/// The keys of an engine that seals stored bodies: one current key (its id
/// and 32 bytes), which seals every body written, and any number of older
/// ones, which only open the bodies they sealed. Set it as
/// `Options::encryption`.
///
/// Bodies are sealed with XChaCha20-Poly1305 (RustCrypto's
/// `chacha20poly1305`): constant-time in software on every CPU (no AES-NI
/// needed), and its 192-bit nonces can be drawn at random for every record
/// (from the operating system, through `getrandom`) with no practical
/// chance of a repeat, so no nonce counter has to survive restarts, crashes
/// or copies of a data directory. The record's header is the associated
/// data. Each record names the id of its key, so keys can be rotated: the
/// current key seals, older keys still open what they sealed, and
/// `Engine::compact` seals every record it keeps under the current key.
/// Only bodies are sealed: user ids, keys, fingerprints and statuses stay
/// in the clear. The layout is in `docs/FORMAT.md`, the rotation procedure
/// in `docs/OPERATIONS.md`.
///
/// Ids are the operator's names for keys (written in every sealed record);
/// a new key needs an id no earlier key had. `Debug` shows the ids only,
/// and the key bytes are zeroed when the value is dropped.
///
/// ```
/// use idemkv::{EncryptionKeys, Options};
///
/// # fn main() -> Result<(), idemkv::KeyError> {
/// // Key 2 seals from now on; key 1 still opens what it sealed.
/// let keys = EncryptionKeys::new(2, &[0x22; 32])?.with_old_key(1, &[0x11; 32])?;
/// assert_eq!(keys.current_id(), 2);
/// assert_eq!(format!("{keys:?}"), "EncryptionKeys { current: 2, old: [1] }");
/// let options = Options { encryption: Some(keys), ..Options::default() };
/// # let _ = options;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct EncryptionKeys {
    /// The current key first, then the older ones in the order added.
    keys: Vec<(u32, Zeroizing<[u8; KEY_LEN]>)>,
}

/// Why a set of keys or a key file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// A key is not 32 bytes long.
    #[error("key {id} is {len} bytes long; a key is 32 bytes")]
    WrongLength {
        /// The key's id.
        id: u32,
        /// Its length in bytes.
        len: usize,
    },
    /// Two keys have the same id.
    #[error("key id {id} is given twice")]
    DuplicateId {
        /// The id given twice.
        id: u32,
    },
    /// A line of a key file does not parse.
    #[error("line {line} of the key file: {problem}")]
    BadLine {
        /// The line number, from 1.
        line: usize,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The key file holds no key.
    #[error("the key file holds no key")]
    Empty,
    /// The key file cannot be read.
    #[error("cannot read the key file {}", path.display())]
    Io {
        /// The key file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl EncryptionKeys {
    /// Keys with `key` (32 bytes) as the current key, under `id`.
    ///
    /// # Errors
    /// [`KeyError::WrongLength`] unless `key` is 32 bytes.
    pub fn new(id: u32, key: &[u8]) -> Result<EncryptionKeys, KeyError> {
        Ok(EncryptionKeys {
            keys: vec![(id, key_bytes(id, key)?)],
        })
    }

    /// Adds an older key, which opens the bodies it sealed but seals
    /// nothing new.
    ///
    /// # Errors
    /// [`KeyError::WrongLength`] unless `key` is 32 bytes;
    /// [`KeyError::DuplicateId`] if a key with `id` is already there.
    pub fn with_old_key(mut self, id: u32, key: &[u8]) -> Result<EncryptionKeys, KeyError> {
        if self.keys.iter().any(|(have, _)| *have == id) {
            return Err(KeyError::DuplicateId { id });
        }
        self.keys.push((id, key_bytes(id, key)?));
        Ok(self)
    }

    /// The id of the current key (the one that seals).
    pub fn current_id(&self) -> u32 {
        self.keys.first().map_or(0, |(id, _)| *id)
    }

    /// Every key's id: the current one first, then the older ones.
    pub fn ids(&self) -> Vec<u32> {
        self.keys.iter().map(|(id, _)| *id).collect()
    }

    /// Parses a key file: one key a line, `ID HEX` (the id in decimal, up
    /// to 4294967295, then whitespace, then the key's 32 bytes as 64 hex
    /// digits); the first key line is the current key, the others are
    /// older keys. Blank lines and lines starting with `#` are ignored.
    ///
    /// ```text
    /// # idemkv keys: the first line seals, the others only open
    /// 2 5f0c...64 hex digits...
    /// 1 9a3e...64 hex digits...
    /// ```
    ///
    /// # Errors
    /// [`KeyError::BadLine`] naming the first line that does not parse;
    /// [`KeyError::WrongLength`], [`KeyError::DuplicateId`];
    /// [`KeyError::Empty`] if no line holds a key.
    pub fn parse(text: &str) -> Result<EncryptionKeys, KeyError> {
        let mut keys: Option<EncryptionKeys> = None;
        for (i, line) in text.lines().enumerate() {
            let line_no = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |problem| KeyError::BadLine {
                line: line_no,
                problem,
            };
            let mut words = line.split_whitespace();
            let (Some(id), Some(hex), None) = (words.next(), words.next(), words.next()) else {
                return Err(bad("expected `ID HEX`: a key id and the key in hex"));
            };
            let id: u32 = id
                .parse()
                .map_err(|_| bad("the key id is not a number from 0 to 4294967295"))?;
            let key = Zeroizing::new(
                decode_hex(hex)
                    .ok_or_else(|| bad("the key is not an even number of hex digits"))?,
            );
            keys = Some(match keys {
                None => EncryptionKeys::new(id, &key)?,
                Some(keys) => keys.with_old_key(id, &key)?,
            });
        }
        keys.ok_or(KeyError::Empty)
    }

    /// Reads and parses a key file (see [`EncryptionKeys::parse`]).
    ///
    /// # Errors
    /// [`KeyError::Io`] if the file cannot be read; as
    /// [`EncryptionKeys::parse`].
    pub fn from_file(path: impl AsRef<Path>) -> Result<EncryptionKeys, KeyError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        EncryptionKeys::parse(&Zeroizing::new(text))
    }

    /// Every key: the current one first.
    pub(crate) fn keys(&self) -> impl Iterator<Item = (u32, &[u8; KEY_LEN])> {
        self.keys.iter().map(|(id, key)| (*id, &**key))
    }
}

impl std::fmt::Debug for EncryptionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let old: Vec<u32> = self.keys.iter().skip(1).map(|(id, _)| *id).collect();
        f.debug_struct("EncryptionKeys")
            .field("current", &self.current_id())
            .field("old", &old)
            .finish()
    }
}

/// `key` as a key, if it is 32 bytes.
fn key_bytes(id: u32, key: &[u8]) -> Result<Zeroizing<[u8; KEY_LEN]>, KeyError> {
    let bytes: [u8; KEY_LEN] = key
        .try_into()
        .map_err(|_| KeyError::WrongLength { id, len: key.len() })?;
    Ok(Zeroizing::new(bytes))
}

/// Hex digits to bytes (either case), if they are an even number of hex
/// digits.
fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    let digits = hex.as_bytes();
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    let nibble = |d: u8| {
        char::from(d)
            .to_digit(16)
            .and_then(|n| u8::try_from(n).ok())
    };
    digits
        .chunks_exact(2)
        .map(|pair| match pair {
            [hi, lo] => Some(nibble(*hi)? << 4 | nibble(*lo)?),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX_A: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn constructors_refuse_wrong_lengths_and_duplicate_ids() {
        assert!(matches!(
            EncryptionKeys::new(1, &[0; 31]),
            Err(KeyError::WrongLength { id: 1, len: 31 })
        ));
        let keys = EncryptionKeys::new(1, &[0; 32]).unwrap();
        assert!(matches!(
            keys.clone().with_old_key(1, &[1; 32]),
            Err(KeyError::DuplicateId { id: 1 })
        ));
        assert!(matches!(
            keys.clone().with_old_key(2, &[1; 33]),
            Err(KeyError::WrongLength { id: 2, len: 33 })
        ));
        let keys = keys.with_old_key(7, &[1; 32]).unwrap();
        assert_eq!(keys.ids(), vec![1, 7]);
        assert_eq!(keys.current_id(), 1);
    }

    #[test]
    fn a_key_file_parses_with_the_first_key_current() {
        let text = format!("# keys\n\n 3 {HEX_A}\n1\t{}\n", HEX_A.to_uppercase());
        let keys = EncryptionKeys::parse(&text).unwrap();
        assert_eq!(keys.ids(), vec![3, 1]);
        let (id, key) = keys.keys().next().unwrap();
        assert_eq!((id, key[1], key[31]), (3, 1, 31));
        assert_eq!(
            format!("{keys:?}"),
            "EncryptionKeys { current: 3, old: [1] }"
        );
        assert!(!format!("{keys:?}").contains("0a0b"));
    }

    #[test]
    fn a_bad_key_file_names_its_line() {
        let cases: [(String, &str); 6] = [
            (String::new(), "Empty"),
            (format!("1 {HEX_A}\nx {HEX_A}"), "BadLine { line: 2"),
            (format!("1 {HEX_A} extra"), "BadLine { line: 1"),
            ("1 0g".to_owned(), "BadLine { line: 1"),
            ("1 abc".to_owned(), "BadLine { line: 1"),
            (
                format!("5 {}", &HEX_A[..62]),
                "WrongLength { id: 5, len: 31 }",
            ),
        ];
        for (text, want) in cases {
            let got = format!("{:?}", EncryptionKeys::parse(&text).unwrap_err());
            assert!(got.starts_with(want), "{text:?}: {got}");
        }
        let dup = format!("1 {HEX_A}\n1 {HEX_A}");
        assert!(matches!(
            EncryptionKeys::parse(&dup),
            Err(KeyError::DuplicateId { id: 1 })
        ));
    }
}
