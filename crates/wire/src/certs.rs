//! Certificate tooling for a federation (rcgen, no openssl): a CA, the coordinator's server
//! certificate and one client certificate per agent, written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::tls::Error as TlsError;

/// Default lifetime of issued certificates.
pub const DEFAULT_DAYS: i64 = 365;

fn err(e: impl std::fmt::Display) -> TlsError {
    TlsError(e.to_string())
}

/// Writes a new file. A private key is created with mode 0600 from its first byte (never
/// written under the default umask and narrowed later). An existing file is refused unless
/// `force`, in which case it is removed first so the new one gets a fresh mode.
fn write(path: &Path, content: &str, private: bool, force: bool) -> Result<(), TlsError> {
    use std::io::Write;
    let fail = |e: std::io::Error| TlsError(format!("{}: {e}", path.display()));
    if force {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(fail(e)),
            _ => {}
        }
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    let _ = private;
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            TlsError(format!(
                "{} exists: refusing to overwrite it (use --force to replace it)",
                path.display()
            ))
        } else {
            fail(e)
        }
    })?;
    file.write_all(content.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(fail)
}

/// Refuses, before anything is written, when one of `paths` exists and `force` is not set.
fn refuse_existing(paths: &[&Path], force: bool) -> Result<(), TlsError> {
    if force {
        return Ok(());
    }
    match paths.iter().find(|p| p.exists()) {
        Some(p) => Err(TlsError(format!(
            "{} exists: refusing to overwrite it (use --force to replace it)",
            p.display()
        ))),
        None => Ok(()),
    }
}

fn random_serial() -> SerialNumber {
    use std::time::{SystemTime, UNIX_EPOCH};
    // 16 bytes: time in nanoseconds and a per-process counter, positive (top bit clear).
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let count = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&nanos.to_be_bytes());
    bytes[8..].copy_from_slice(&(count ^ std::process::id() as u64).to_be_bytes());
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

fn dates(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    // An hour of slack for clocks that run a little behind.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(days);
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "fedmicse federation");
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Paths `certs init` writes.
#[derive(Debug, Clone)]
pub struct InitOutput {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

/// Creates `DIR/ca.{pem,key}` and the coordinator's `DIR/coordinator.{pem,key}`, valid for
/// `hosts` (DNS names or IP addresses; `localhost` and `127.0.0.1` are always included).
/// Refuses to overwrite any of them (see [`init_with`]).
pub fn init(dir: &Path, hosts: &[String], days: i64) -> Result<InitOutput, TlsError> {
    init_with(dir, hosts, days, false)
}

/// As [`init`]; with `force`, replaces existing files (a new CA: every certificate issued
/// by the old one stops working).
pub fn init_with(
    dir: &Path,
    hosts: &[String],
    days: i64,
    force: bool,
) -> Result<InitOutput, TlsError> {
    std::fs::create_dir_all(dir).map_err(|e| TlsError(format!("{}: {e}", dir.display())))?;
    let out = InitOutput {
        ca_cert: dir.join("ca.pem"),
        ca_key: dir.join("ca.key"),
        server_cert: dir.join("coordinator.pem"),
        server_key: dir.join("coordinator.key"),
    };
    refuse_existing(
        &[&out.ca_key, &out.ca_cert, &out.server_key, &out.server_cert],
        force,
    )?;
    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = dn("fedmicse CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.serial_number = Some(random_serial());
    dates(&mut ca, days.max(1) * 5);
    let ca_cert = ca.self_signed(&ca_key).map_err(err)?;
    write(&out.ca_cert, &ca_cert.pem(), false, force)?;
    write(&out.ca_key, &ca_key.serialize_pem(), true, force)?;

    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "coordinator".into()];
    for h in hosts {
        if !names.contains(h) {
            names.push(h.clone());
        }
    }
    let issuer = Issuer::new(ca, ca_key);
    let now = OffsetDateTime::now_utc();
    let validity = (now - Duration::hours(1), now + Duration::days(days));
    let (cert, key) = leaf(
        &issuer,
        "coordinator",
        &names,
        ExtendedKeyUsagePurpose::ServerAuth,
        validity,
    )?;
    write(&out.server_cert, &cert, false, force)?;
    write(&out.server_key, &key, true, force)?;
    Ok(out)
}

fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    common_name: &str,
    names: &[String],
    usage: ExtendedKeyUsagePurpose,
    (not_before, not_after): (OffsetDateTime, OffsetDateTime),
) -> Result<(String, String), TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    for n in names {
        params
            .subject_alt_names
            .push(match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    n.clone()
                        .try_into()
                        .map_err(|e| TlsError(format!("{n:?} is not a valid DNS name: {e}")))?,
                ),
            });
    }
    params.distinguished_name = dn(common_name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    params.not_before = not_before;
    params.not_after = not_after;
    let key = KeyPair::generate().map_err(err)?;
    let cert = params.signed_by(&key, issuer).map_err(err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A valid agent id: letters, digits, '-', '_' and '.', 1 to 64 characters. The id is the
/// certificate's common name and the name of its files.
pub fn check_agent_id(id: &str) -> Result<(), TlsError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(TlsError(format!(
            "agent id {id:?}: use 1-64 letters, digits, '-', '_' or '.'"
        )))
    }
}

/// Issues an agent certificate `OUT/ID.{pem,key}` (and copies `ca.pem` beside it) signed by
/// the CA in `ca_dir`. Returns the certificate's serial (hex), for revocation lists.
/// Refuses to overwrite an existing key or certificate (see [`issue_with`]).
pub fn issue(ca_dir: &Path, id: &str, out: &Path, days: i64) -> Result<String, TlsError> {
    issue_with(ca_dir, id, out, days, false)
}

/// As [`issue`]; with `force`, replaces an existing `ID.pem`/`ID.key` (and a different
/// `ca.pem` in `out`).
pub fn issue_with(
    ca_dir: &Path,
    id: &str,
    out: &Path,
    days: i64,
    force: bool,
) -> Result<String, TlsError> {
    let now = OffsetDateTime::now_utc();
    issue_dates(
        ca_dir,
        id,
        out,
        (now - Duration::hours(1), now + Duration::days(days)),
        force,
    )
}

/// As [`issue`] with explicit validity dates (tests use it to make expired certificates).
pub fn issue_valid(
    ca_dir: &Path,
    id: &str,
    out: &Path,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<String, TlsError> {
    issue_dates(ca_dir, id, out, (not_before, not_after), false)
}

fn issue_dates(
    ca_dir: &Path,
    id: &str,
    out: &Path,
    (not_before, not_after): (OffsetDateTime, OffsetDateTime),
    force: bool,
) -> Result<String, TlsError> {
    check_agent_id(id)?;
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p).map_err(|e| TlsError(format!("{}: {e}", p.display())))
    };
    let ca_pem = read(ca_dir.join("ca.pem"))?;
    let ca_key = KeyPair::from_pem(&read(ca_dir.join("ca.key"))?)
        .map_err(|e| TlsError(format!("{}: {e}", ca_dir.join("ca.key").display())))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(err)?;
    std::fs::create_dir_all(out).map_err(|e| TlsError(format!("{}: {e}", out.display())))?;
    let (cert_path, key_path) = (out.join(format!("{id}.pem")), out.join(format!("{id}.key")));
    // The CA certificate is copied beside the agent's unless `out` is the CA's folder; an
    // identical copy already there is left alone (several agents issued into one folder).
    let ca_copy = out.join("ca.pem");
    let copy_ca = out.canonicalize().ok() != ca_dir.canonicalize().ok()
        && std::fs::read_to_string(&ca_copy).ok().as_deref() != Some(ca_pem.as_str());
    let mut targets = vec![cert_path.as_path(), key_path.as_path()];
    if copy_ca {
        targets.push(&ca_copy);
    }
    refuse_existing(&targets, force)?;
    let sans = if id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        vec![id.to_string()]
    } else {
        Vec::new()
    };
    let (cert, key) = leaf(
        &issuer,
        id,
        &sans,
        ExtendedKeyUsagePurpose::ClientAuth,
        (not_before, not_after),
    )?;
    write(&cert_path, &cert, false, force)?;
    write(&key_path, &key, true, force)?;
    if copy_ca {
        write(&ca_copy, &ca_pem, false, force)?;
    }
    let der = crate::tls::pem_to_der(cert.as_bytes()).expect("just written");
    Ok(crate::tls::peer_identity(&der)?.serial)
}

/// Appends a revocation to the list the coordinator reads (`tls.revocation_list`): the
/// certificate's serial when `cert` is given, else the client id (all its certificates).
pub fn revoke(list: &Path, id: Option<&str>, cert: Option<&Path>) -> Result<String, TlsError> {
    let entry = match (cert, id) {
        (Some(pem_path), _) => {
            let pem = std::fs::read(pem_path)
                .map_err(|e| TlsError(format!("{}: {e}", pem_path.display())))?;
            let der = crate::tls::pem_to_der(&pem)
                .ok_or_else(|| TlsError(format!("{}: no certificate", pem_path.display())))?;
            let p = crate::tls::peer_identity(&der)?;
            format!("serial:{}  # {}", p.serial, p.id)
        }
        (None, Some(id)) => {
            check_agent_id(id)?;
            id.to_string()
        }
        (None, None) => {
            return Err(TlsError(
                "give a client id or a certificate to revoke".into(),
            ));
        }
    };
    let line = format!("{entry}  # revoked {}\n", OffsetDateTime::now_utc().date());
    use std::io::Write;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(list)
        .and_then(|mut f| f.write_all(line.as_bytes()).and_then(|_| f.sync_all()))
        .map_err(|e| TlsError(format!("{}: {e}", list.display())))?;
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_and_issue() {
        let dir = tempfile::tempdir().unwrap();
        let out = init(dir.path(), &["fed.example.org".into()], 30).unwrap();
        assert!(out.ca_cert.is_file() && out.server_key.is_file());
        assert!(
            init(dir.path(), &[], 30)
                .unwrap_err()
                .0
                .contains("refusing")
        );
        let serial = issue(dir.path(), "silo-a", &dir.path().join("a"), 30).unwrap();
        assert!(!serial.is_empty());
        let pem = std::fs::read(dir.path().join("a/silo-a.pem")).unwrap();
        let id = crate::tls::peer_identity(&crate::tls::pem_to_der(&pem).unwrap()).unwrap();
        assert_eq!(id.id, "silo-a");
        assert_eq!(id.serial, serial);
        assert!(dir.path().join("a/ca.pem").is_file());
        assert!(issue(dir.path(), "bad id!", dir.path(), 30).is_err());
        assert!(issue(dir.path(), "", dir.path(), 30).is_err());
        // A second agent in the same folder shares the (identical) ca.pem copy.
        issue(dir.path(), "silo-b", &dir.path().join("a"), 30).unwrap();
    }

    #[cfg(unix)]
    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    /// Keys are 0600 whatever the umask; nothing is overwritten without `force`.
    #[cfg(unix)]
    #[test]
    fn keys_are_private_and_never_overwritten_silently() {
        let dir = tempfile::tempdir().unwrap();
        let out = init(dir.path(), &[], 30).unwrap();
        assert_eq!(mode(&out.ca_key), 0o600);
        assert_eq!(mode(&out.server_key), 0o600);
        let ca_key = std::fs::read(&out.ca_key).unwrap();

        // init refuses any existing file, not only the CA key.
        std::fs::remove_file(&out.ca_key).unwrap();
        std::fs::write(&out.ca_key, &ca_key).unwrap();
        std::fs::remove_file(&out.server_key).unwrap();
        let e = init(dir.path(), &[], 30).unwrap_err().0;
        assert!(e.contains("refusing") && e.contains("--force"), "{e}");
        assert!(!out.server_key.exists(), "a refused init wrote something");
        std::fs::write(&out.server_key, "x").unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            let open = std::fs::Permissions::from_mode(0o644);
            std::fs::set_permissions(&out.server_key, open).unwrap();
        }
        let again = init_with(dir.path(), &[], 30, true).unwrap();
        assert_ne!(std::fs::read(&again.ca_key).unwrap(), ca_key);
        // A replaced key is created afresh, with its own mode.
        assert_eq!(mode(&again.server_key), 0o600);
        assert_eq!(mode(&again.ca_key), 0o600);

        let agents = dir.path().join("agents");
        issue(dir.path(), "silo-a", &agents, 30).unwrap();
        let key = agents.join("silo-a.key");
        assert_eq!(mode(&key), 0o600);
        let first = std::fs::read(&key).unwrap();
        let e = issue(dir.path(), "silo-a", &agents, 30).unwrap_err().0;
        assert!(e.contains("refusing"), "{e}");
        assert_eq!(std::fs::read(&key).unwrap(), first);
        issue_with(dir.path(), "silo-a", &agents, 30, true).unwrap();
        assert_ne!(std::fs::read(&key).unwrap(), first);
        assert_eq!(mode(&key), 0o600);
        // A different ca.pem in the output folder is not replaced silently either.
        std::fs::write(agents.join("ca.pem"), "another CA").unwrap();
        assert!(issue(dir.path(), "silo-b", &agents, 30).is_err());
        assert!(!agents.join("silo-b.key").exists());
        issue_with(dir.path(), "silo-b", &agents, 30, true).unwrap();
        assert_eq!(
            std::fs::read(agents.join("ca.pem")).unwrap(),
            std::fs::read(&again.ca_cert).unwrap()
        );
    }
}
