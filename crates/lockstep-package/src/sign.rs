//! Ed25519 keys and detached signatures.
//!
//! Keys are PEM: the private key as PKCS#8 (`-----BEGIN PRIVATE KEY-----`), the public key as
//! SubjectPublicKeyInfo (`-----BEGIN PUBLIC KEY-----`), RFC 8410. That is what OpenSSL,
//! Go's `crypto/x509`, Python's `cryptography` and every HSM export speak, so a key made by
//! `lockstep package keygen` works with `openssl pkey` and a key made by
//! `openssl genpkey -algorithm ed25519` works here.
//!
//! The signature is pure Ed25519 (RFC 8032) over the bytes of the `.tar.gz`, stored raw
//! (64 bytes) in `FILE.tar.gz.sig` — exactly what `openssl pkeyutl -sign -rawin` writes.
//! Verification streams the file through [`ed25519_dalek::VerifyingKey::verify_stream`], so
//! the agent never holds a package in memory.

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::spki::{DecodePublicKey, EncodePublicKey};
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use std::io::Read;
use std::path::Path;

use crate::PackageError;

/// Size of a raw Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// A fresh key pair from the operating system's random source.
pub fn generate() -> Result<SigningKey, PackageError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)
        .map_err(|e| PackageError::Invalid(format!("no random source: {e}")))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Writes `key` to `path` (PKCS#8 PEM, mode 0600) and its public key to `path.pub`
/// (SPKI PEM). Refuses to overwrite either.
pub fn write_keypair(key: &SigningKey, path: &Path) -> Result<std::path::PathBuf, PackageError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let private = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| PackageError::Invalid(format!("encoding the private key: {e}")))?;
    let public = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| PackageError::Invalid(format!("encoding the public key: {e}")))?;
    let pub_path = pub_path(path);
    for (p, text, mode) in [
        (path.to_path_buf(), private.as_bytes(), 0o600),
        (pub_path.clone(), public.as_bytes(), 0o644),
    ] {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&p)
            .map_err(|e| PackageError::io(&p, e))?;
        f.write_all(text)
            .and_then(|()| f.sync_all())
            .map_err(|e| PackageError::io(&p, e))?;
    }
    Ok(pub_path)
}

/// `KEY.pub` next to `KEY`.
pub fn pub_path(key: &Path) -> std::path::PathBuf {
    let mut s = key.as_os_str().to_owned();
    s.push(".pub");
    s.into()
}

/// `FILE.sig` next to `FILE`.
pub fn sig_path(package: &Path) -> std::path::PathBuf {
    let mut s = package.as_os_str().to_owned();
    s.push(".sig");
    s.into()
}

/// Reads a PKCS#8 PEM private key.
pub fn read_signing_key(path: &Path) -> Result<SigningKey, PackageError> {
    let text = std::fs::read_to_string(path).map_err(|e| PackageError::io(path, e))?;
    SigningKey::from_pkcs8_pem(&text).map_err(|e| PackageError::Key {
        path: path.into(),
        message: format!("not an Ed25519 PKCS#8 PEM private key ({e})"),
    })
}

/// Reads an SPKI PEM public key.
pub fn read_verifying_key(path: &Path) -> Result<VerifyingKey, PackageError> {
    let text = std::fs::read_to_string(path).map_err(|e| PackageError::io(path, e))?;
    parse_verifying_key(&text).map_err(|message| PackageError::Key {
        path: path.into(),
        message,
    })
}

/// Parses an SPKI PEM public key.
pub fn parse_verifying_key(text: &str) -> Result<VerifyingKey, String> {
    VerifyingKey::from_public_key_pem(text)
        .map_err(|e| format!("not an Ed25519 SPKI PEM public key ({e})"))
}

/// Signs the bytes of `package`. Signing happens on a build machine, so the file is read
/// whole; pure Ed25519 hashes the message twice.
pub fn sign_file(key: &SigningKey, package: &Path) -> Result<Signature, PackageError> {
    let bytes = std::fs::read(package).map_err(|e| PackageError::io(package, e))?;
    Ok(key.sign(&bytes))
}

/// Parses a detached signature: 64 raw bytes, or 128 hex digits (whitespace ignored).
pub fn parse_signature(bytes: &[u8]) -> Result<Signature, PackageError> {
    if bytes.len() == SIGNATURE_LEN {
        return Signature::from_slice(bytes).map_err(|e| PackageError::Signature(e.to_string()));
    }
    let text: Vec<u8> = bytes
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let raw = hex::decode(&text)
        .ok()
        .filter(|r| r.len() == SIGNATURE_LEN)
        .ok_or_else(|| {
            PackageError::Signature(format!(
                "expected 64 raw bytes or 128 hex digits, got {} bytes",
                bytes.len()
            ))
        })?;
    Signature::from_slice(&raw).map_err(|e| PackageError::Signature(e.to_string()))
}

/// Checks `signature` over everything `reader` yields against each trusted key, reading
/// the stream once. Returns the index of the key that signed it.
pub fn verify_reader(
    reader: &mut impl Read,
    signature: &Signature,
    trusted: &[VerifyingKey],
) -> Result<usize, PackageError> {
    if trusted.is_empty() {
        return Err(PackageError::Signature("no trusted key configured".into()));
    }
    let mut verifiers = trusted
        .iter()
        .map(|k| k.verify_stream(signature))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PackageError::Signature(format!("malformed signature ({e})")))?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = reader.read(&mut buf).map_err(PackageError::Archive)?;
        if n == 0 {
            break;
        }
        for v in &mut verifiers {
            v.update(&buf[..n]);
        }
    }
    verifiers
        .into_iter()
        .position(|v| v.finalize_and_verify().is_ok())
        .ok_or_else(|| PackageError::Signature("does not match any trusted key".into()))
}

/// Checks `package` against its detached signature file.
pub fn verify_file(
    package: &Path,
    signature: &Path,
    trusted: &[VerifyingKey],
) -> Result<usize, PackageError> {
    let sig = std::fs::read(signature).map_err(|e| PackageError::io(signature, e))?;
    let sig = parse_signature(&sig)?;
    let mut f = std::fs::File::open(package).map_err(|e| PackageError::io(package, e))?;
    verify_reader(&mut f, &sig, trusted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_pem_and_a_signature_verifies_only_for_its_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key_path = dir.path().join("key");
        let key = generate().expect("key");
        let pub_path = write_keypair(&key, &key_path).expect("write");
        let pem = std::fs::read_to_string(&key_path).expect("read");
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");
        let public = std::fs::read_to_string(&pub_path).expect("read");
        assert!(public.starts_with("-----BEGIN PUBLIC KEY-----"), "{public}");
        assert!(
            write_keypair(&key, &key_path).is_err(),
            "never overwrites a key"
        );
        let key = read_signing_key(&key_path).expect("private");
        let trusted = [read_verifying_key(&pub_path).expect("public")];
        let file = dir.path().join("p.tar.gz");
        std::fs::write(&file, b"package bytes").expect("write");
        let sig = sign_file(&key, &file).expect("sign");
        std::fs::write(sig_path(&file), sig.to_bytes()).expect("sig");
        assert_eq!(
            verify_file(&file, &sig_path(&file), &trusted).expect("ok"),
            0
        );
        std::fs::write(&file, b"package bytez").expect("tamper");
        assert!(verify_file(&file, &sig_path(&file), &trusted).is_err());
        let other = [generate().expect("key").verifying_key()];
        std::fs::write(&file, b"package bytes").expect("restore");
        assert!(verify_file(&file, &sig_path(&file), &other).is_err());
        let hexsig = hex::encode(sig.to_bytes());
        assert_eq!(parse_signature(hexsig.as_bytes()).expect("hex"), sig);
        assert!(parse_signature(b"short").is_err());
    }
}
