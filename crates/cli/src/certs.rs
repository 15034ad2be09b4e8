//! `fedmicse certs init|issue|revoke`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use fedmicse_wire::certs;

#[derive(Subcommand, Debug)]
pub enum CertsCmd {
    /// Create the federation's CA and the coordinator's certificate in DIR
    /// (ca.pem, ca.key, coordinator.pem, coordinator.key). Keep ca.key offline.
    Init {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Extra DNS names or IP addresses of the coordinator (localhost and 127.0.0.1 are
        /// always included). Repeat for several.
        #[arg(long = "host", value_name = "NAME")]
        hosts: Vec<String>,
        /// Validity of the coordinator certificate in days (the CA gets five times that).
        #[arg(long, default_value_t = certs::DEFAULT_DAYS)]
        days: i64,
        /// Replace existing files in DIR. A new CA invalidates every certificate issued by
        /// the old one. Without it, init refuses to overwrite any key or certificate.
        #[arg(long)]
        force: bool,
    },
    /// Issue an agent certificate: OUT/ID.pem, OUT/ID.key and a copy of ca.pem. The id is
    /// the certificate's common name; put it on the coordinator's allowlist.
    Issue {
        /// Directory with ca.pem and ca.key.
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// Client id (letters, digits, '-', '_', '.').
        #[arg(long, value_name = "ID")]
        name: String,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[arg(long, default_value_t = certs::DEFAULT_DAYS)]
        days: i64,
        /// Replace an existing OUT/ID.pem and OUT/ID.key (and a different OUT/ca.pem).
        /// Without it, issue refuses to overwrite any key or certificate.
        #[arg(long)]
        force: bool,
    },
    /// Revoke a certificate (by its serial, with --cert) or every certificate of a client id
    /// (--name): appends to the revocation list the coordinator re-reads while running.
    Revoke {
        /// The coordinator's revocation list (tls.revocation_list).
        #[arg(long, value_name = "FILE")]
        list: PathBuf,
        #[arg(long, value_name = "ID", required_unless_present = "cert")]
        name: Option<String>,
        #[arg(long, value_name = "PEM")]
        cert: Option<PathBuf>,
    },
}

pub fn run_certs(cmd: CertsCmd) -> Result<()> {
    match cmd {
        CertsCmd::Init {
            out,
            hosts,
            days,
            force,
        } => {
            let o = certs::init_with(&out, &hosts, days, force)?;
            println!(
                "CA:          {} (key {}: keep it offline)",
                o.ca_cert.display(),
                o.ca_key.display()
            );
            println!(
                "coordinator: {} (key {})",
                o.server_cert.display(),
                o.server_key.display()
            );
        }
        CertsCmd::Issue {
            ca,
            name,
            out,
            days,
            force,
        } => {
            let serial = certs::issue_with(&ca, &name, &out, days, force)?;
            println!(
                "agent {name}: {}/{name}.pem (key {}/{name}.key), serial {serial}",
                out.display(),
                out.display()
            );
            println!("add \"{name}\" to federation.allowlist in the coordinator's configuration");
        }
        CertsCmd::Revoke { list, name, cert } => {
            let entry = certs::revoke(&list, name.as_deref(), cert.as_deref())?;
            println!("revoked {entry} in {}", list.display());
        }
    }
    Ok(())
}
