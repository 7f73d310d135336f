//! `--key-file`: the keys that open (and, for `compact`, seal) stored
//! bodies. The file format is [`idemkv::EncryptionKeys::parse`]'s, told in
//! the `--help` text (KEY FILES).

use std::path::Path;

use idemkv::Options;

use super::Failure;

/// `options` with the keys of `key_file`, if one is given.
#[cfg(feature = "encryption")]
pub(crate) fn with_keys(options: Options, key_file: Option<&Path>) -> Result<Options, Failure> {
    let Some(path) = key_file else {
        return Ok(options);
    };
    let keys = idemkv::EncryptionKeys::from_file(path).map_err(|e| {
        let e: &dyn std::error::Error = &e;
        Failure::Error(super::with_sources(e))
    })?;
    Ok(Options {
        encryption: Some(keys),
        ..options
    })
}

/// Without the `encryption` feature a key file cannot be used.
#[cfg(not(feature = "encryption"))]
pub(crate) fn with_keys(options: Options, key_file: Option<&Path>) -> Result<Options, Failure> {
    match key_file {
        None => Ok(options),
        Some(path) => Err(Failure::Error(format!(
            "--key-file {}: this idemkv was built without the `encryption` feature \
             (build it with --features cli,encryption)",
            path.display()
        ))),
    }
}
