//! `lockstep package create|sign|verify|keygen`: update packages for the agent. The format
//! and every rule are `lockstep_package`'s; this file parses arguments and prints.

use anyhow::Context;
use clap::{Args, Subcommand};
use lockstep_package::{CreateOptions, Limits, PackageError, sign};
use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::Output;
use crate::exit::{self, fail};

/// `lockstep package`.
#[derive(Subcommand)]
pub enum PackageCommand {
    /// Write a new Ed25519 key pair: KEY (PKCS#8 PEM, mode 0600) and KEY.pub (SPKI PEM).
    Keygen(KeygenArgs),
    /// Package a release tree as a reproducible tar.gz with lockstep-manifest.json first.
    Create(CreateArgs),
    /// Write the detached signature FILE.tar.gz.sig.
    Sign(SignArgs),
    /// Check signature, manifest and every file; exit 0 when all hold, 1 otherwise.
    Verify(VerifyArgs),
}

/// `lockstep package keygen`.
#[derive(Args)]
#[command(after_help = "\
The private key is PKCS#8 PEM and the public key SubjectPublicKeyInfo PEM (RFC 8410), the format
OpenSSL and most libraries read: `openssl pkey -in KEY -noout -text` shows it, and a key from
`openssl genpkey -algorithm ed25519 -out KEY` works with `package sign`. Existing files are never
overwritten.

Examples:
  lockstep package keygen --out /secure/release-key
  scp /secure/release-key.pub node1:/etc/lockstep/trusted.pub")]
pub struct KeygenArgs {
    /// Where to write the private key; the public key goes to the same path plus `.pub`.
    #[arg(long, value_name = "KEY")]
    out: PathBuf,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t)]
    output: Output,
}

/// `lockstep package create`.
#[derive(Args)]
#[command(after_help = "\
Excluded by default: .git/ .hg/ .svn/ build/ node_modules/ target/ __pycache__/ .cache/
.pytest_cache/ .mypy_cache/ .npm/ *.pyc .DS_Store. A glob without `/` matches a name at any
depth, `**` spans directories, a trailing `/` matches directories only.

The same tree gives the same bytes: entries sorted, owners 0/0, modes 0644/0755, every mtime and
the manifest's created_at set to the newest mtime in the tree (or --created-at, or
SOURCE_DATE_EPOCH).

Examples:
  lockstep package create --service api --version v1.4.0 --out api-v1.4.0.tar.gz ./dist
  lockstep package create --service api --version v1.4.0 --version-id \"$(uuidgen)\" \\
      --component translator=2.1.0 --exclude '*.log' --out api.tar.gz .")]
pub struct CreateArgs {
    /// The service.
    #[arg(long, env = "LOCKSTEP_SERVICE")]
    service: String,
    /// The human label (`v1.4.0`).
    #[arg(long)]
    version: String,
    /// The release identity; names the release directory on each node [default: the version].
    #[arg(long)]
    version_id: Option<String>,
    /// The commit it was built from [default: unknown].
    #[arg(long)]
    git_sha: Option<String>,
    /// A component version, NAME=VERSION; repeat for several.
    #[arg(long = "component", value_name = "NAME=VERSION", value_parser = parse_component)]
    components: Vec<(String, String)>,
    /// A glob to leave out, in addition to the defaults; repeat for several.
    #[arg(long = "exclude", value_name = "GLOB")]
    excludes: Vec<String>,
    /// Do not apply the default excludes.
    #[arg(long)]
    no_default_excludes: bool,
    /// The creation time recorded (RFC 3339) [default: newest mtime in the tree].
    #[arg(long, value_name = "TIME")]
    created_at: Option<String>,
    /// The archive to write [default: <service>-<version>-<timestamp>.tar.gz here].
    #[arg(long, value_name = "FILE.tar.gz")]
    out: Option<PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t)]
    output: Output,
    /// The release tree.
    #[arg(value_name = "DIR")]
    dir: PathBuf,
}

/// `lockstep package sign`.
#[derive(Args)]
#[command(after_help = "\
The signature is pure Ed25519 (RFC 8032) over the archive's bytes, stored as 64 raw bytes — the
same as `openssl pkeyutl -sign -rawin -inkey KEY -in FILE.tar.gz -out FILE.tar.gz.sig`.

Examples:
  lockstep package sign --key /secure/release-key api-v1.4.0.tar.gz   # writes api-v1.4.0.tar.gz.sig")]
pub struct SignArgs {
    /// The private key (PKCS#8 PEM).
    #[arg(long, value_name = "KEY")]
    key: PathBuf,
    /// Where to write the signature [default: FILE.sig].
    #[arg(long, value_name = "SIG")]
    out: Option<PathBuf>,
    /// The package.
    #[arg(value_name = "FILE.tar.gz")]
    file: PathBuf,
}

/// `lockstep package verify`.
#[derive(Args)]
#[command(after_help = "\
Exit codes: 0 the signature matches a given key and every file matches the manifest; 1 it does
not (the reason is printed); 2 a key or file cannot be read.

Examples:
  lockstep package verify --pubkey release-key.pub api-v1.4.0.tar.gz
  lockstep package verify --pubkey old.pub --pubkey new.pub --signature api.sig api.tar.gz -o json")]
pub struct VerifyArgs {
    /// A trusted public key (SPKI PEM); repeat for several.
    #[arg(long = "pubkey", value_name = "KEY.pub", required = true)]
    pubkeys: Vec<PathBuf>,
    /// The detached signature [default: FILE.sig].
    #[arg(long, value_name = "SIG")]
    signature: Option<PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t)]
    output: Output,
    /// The package.
    #[arg(value_name = "FILE.tar.gz")]
    file: PathBuf,
}

/// `NAME=VERSION`.
pub fn parse_component(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(a, b)| (a.trim().to_string(), b.trim().to_string()))
        .filter(|(a, b)| !a.is_empty() && !b.is_empty())
        .ok_or_else(|| format!("{s:?}: use NAME=VERSION"))
}

fn usage(e: PackageError) -> anyhow::Error {
    match e {
        PackageError::Io { .. } | PackageError::Key { .. } | PackageError::Invalid(_) => {
            fail(exit::USAGE, e.to_string())
        }
        e => fail(exit::FAILED, e.to_string()),
    }
}

/// Runs a `lockstep package` subcommand.
pub fn run(cmd: PackageCommand) -> anyhow::Result<u8> {
    match cmd {
        PackageCommand::Keygen(a) => {
            let key = sign::generate().map_err(usage)?;
            let public = sign::write_keypair(&key, &a.out).map_err(usage)?;
            match a.output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"private_key": a.out, "public_key": public})
                ),
                Output::Text => {
                    eprintln!("private key (keep it secret): {}", a.out.display());
                    println!("{}", public.display());
                }
            }
            Ok(exit::OK)
        }
        PackageCommand::Create(a) => {
            if !a.dir.is_dir() {
                return Err(fail(
                    exit::USAGE,
                    format!("{}: not a directory", a.dir.display()),
                ));
            }
            let created_at = a
                .created_at
                .as_deref()
                .map(|s| {
                    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                        .map_err(|e| fail(exit::USAGE, format!("--created-at {s:?}: {e}")))
                })
                .transpose()?;
            let opts = CreateOptions {
                service: a.service,
                version: a.version,
                version_id: a.version_id,
                git_sha: a.git_sha,
                components: a.components.into_iter().collect::<BTreeMap<_, _>>(),
                excludes: a.excludes,
                no_default_excludes: a.no_default_excludes,
                created_at,
            };
            let tmp_out = a
                .out
                .clone()
                .unwrap_or_else(|| PathBuf::from(".lockstep-package.tmp.tar.gz"));
            let manifest = lockstep_package::create(&a.dir, &opts, &tmp_out).map_err(usage)?;
            let out = match a.out {
                Some(o) => o,
                None => {
                    let name = PathBuf::from(lockstep_package::default_file_name(&manifest));
                    std::fs::rename(&tmp_out, &name).context("naming the package")?;
                    name
                }
            };
            match a.output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({
                        "file": out,
                        "service": manifest.service,
                        "version": manifest.version,
                        "version_id": manifest.version_id,
                        "git_sha": manifest.git_sha,
                        "created_at": manifest.created_at,
                        "components": manifest.components,
                        "files": manifest.files.len(),
                        "bytes": manifest.total_size(),
                    })
                ),
                Output::Text => {
                    eprintln!(
                        "packaged {} files ({} bytes) as {} {}",
                        manifest.files.len(),
                        manifest.total_size(),
                        manifest.service,
                        manifest.version
                    );
                    println!("{}", out.display());
                }
            }
            Ok(exit::OK)
        }
        PackageCommand::Sign(a) => {
            let key = sign::read_signing_key(&a.key).map_err(usage)?;
            let sig = sign::sign_file(&key, &a.file).map_err(usage)?;
            let out = a.out.unwrap_or_else(|| sign::sig_path(&a.file));
            std::fs::write(&out, sig.to_bytes())
                .map_err(|e| fail(exit::USAGE, format!("{}: {e}", out.display())))?;
            println!("{}", out.display());
            Ok(exit::OK)
        }
        PackageCommand::Verify(a) => {
            let keys = a
                .pubkeys
                .iter()
                .map(|p| sign::read_verifying_key(p))
                .collect::<Result<Vec<_>, _>>()
                .map_err(usage)?;
            let sig = a.signature.unwrap_or_else(|| sign::sig_path(&a.file));
            if !a.file.is_file() {
                return Err(fail(
                    exit::USAGE,
                    format!("{}: no such file", a.file.display()),
                ));
            }
            let result = lockstep_package::verify(&a.file, &sig, &keys, &Limits::default());
            match (&result, a.output) {
                (Ok(m), Output::Json) => println!(
                    "{}",
                    serde_json::json!({"ok": true, "service": m.service, "version": m.version,
                        "version_id": m.version_id, "files": m.files.len()})
                ),
                (Ok(m), Output::Text) => println!(
                    "[OK] {} {} ({}): signature and {} files verified",
                    m.service,
                    m.version,
                    m.version_id,
                    m.files.len()
                ),
                (Err(e), Output::Json) => {
                    println!(
                        "{}",
                        serde_json::json!({"ok": false, "error": e.to_string()})
                    )
                }
                (Err(e), Output::Text) => println!("[FAIL] {}: {e}", a.file.display()),
            }
            Ok(if result.is_ok() {
                exit::OK
            } else {
                exit::FAILED
            })
        }
    }
}
