//! The package's man pages and shell completions, generated from the
//! binary's own clap [`Command`](clap::Command) (`vfio-intx generate-assets
//! --out DIR`, which `packaging/build-deb.sh` runs), so they describe exactly
//! the commands and options the binary parses.
//!
//! Written under `DIR`: `man/vfio-intx.8` and one `man/vfio-intx-SUB.8` per
//! subcommand (section 8, system administration: the unit's
//! `Documentation=man:vfio-intx(8)`; plain roff, the packager compresses
//! them), and `completions/bash/vfio-intx`, `completions/zsh/_vfio-intx`,
//! `completions/fish/vfio-intx.fish`, named as they are installed.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use clap_complete::Shell;
use clap_mangen::Man;

use crate::daemon::config::{DEFAULT_CONFIG, DEFAULT_SOCKET};
use crate::daemon::exit;

/// The manual section of every page.
pub const MAN_SECTION: &str = "8";

/// The manual the pages belong to (the centre of the page's header).
const MANUAL: &str = "System Administration";

/// A file could not be written.
#[derive(Debug, thiserror::Error)]
#[error("writing {}", path.display())]
pub struct AssetsError {
    /// The file (or the directory being created for it).
    pub path: PathBuf,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

/// Writes the man pages and completions of `cmd` (the binary's whole
/// command, as `Cli::command()` builds it) under `out`, creating the
/// directories; returns the files written. `date` (`YYYY-MM-DD`) is the
/// pages' date.
pub fn generate(cmd: clap::Command, out: &Path, date: &str) -> Result<Vec<PathBuf>, AssetsError> {
    let name = cmd.get_name().to_owned();
    let source = format!("{name} {}", cmd.get_version().unwrap_or_default());
    let section = |page: Man| {
        page.section(MAN_SECTION)
            .date(date)
            .source(source.as_str())
            .manual(MANUAL)
    };
    let mut written = Vec::new();

    // `help` is clap's own subcommand: no page of its own.
    let mut pages = cmd.clone().disable_help_subcommand(true);
    pages.build();
    let man = out.join("man");
    let page = section(Man::new(pages.clone()));
    let path = man.join(page.get_filename());
    let mut text = render(&page, &path)?;
    text.extend_from_slice(root_sections(&pages).as_bytes());
    write(&path, &text, &mut written)?;
    for sub in pages.get_subcommands().filter(|s| !s.is_hide_set()) {
        let page = section(Man::new(sub.clone()));
        let path = man.join(page.get_filename());
        let mut text = render(&page, &path)?;
        text.extend_from_slice(
            format!(".SH \"SEE ALSO\"\n.BR {name} ({MAN_SECTION})\n").as_bytes(),
        );
        write(&path, &text, &mut written)?;
    }

    let completions = out.join("completions");
    for (shell, dir, file) in [
        (Shell::Bash, "bash", name.clone()),
        (Shell::Zsh, "zsh", format!("_{name}")),
        (Shell::Fish, "fish", format!("{name}.fish")),
    ] {
        let mut text = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), &name, &mut text);
        write(&completions.join(dir).join(file), &text, &mut written)?;
    }
    Ok(written)
}

/// `page` in roff (`path` names a failure, which rendering into memory
/// cannot have).
fn render(page: &Man, path: &Path) -> Result<Vec<u8>, AssetsError> {
    let mut text = Vec::new();
    page.render(&mut text).map_err(|source| AssetsError {
        path: path.to_owned(),
        source,
    })?;
    Ok(text)
}

/// vfio-intx(8)'s sections beyond the command line: exit status, files,
/// see also.
fn root_sections(cmd: &clap::Command) -> String {
    let name = cmd.get_name();
    let mut s = String::from(".SH \"EXIT STATUS\"\n");
    for (code, meaning) in [
        (exit::OK, "success"),
        (exit::FAILED, "the operation failed"),
        (exit::USAGE, "bad command line"),
        (
            exit::RUNTIME,
            "runtime error: the command or the daemon could not run",
        ),
        (exit::CONFIG, "the configuration is invalid"),
        (
            exit::NOT_FOUND,
            "the device does not exist or is not the daemon's",
        ),
        (exit::PERMISSION, "permission denied"),
        (
            exit::UNREACHABLE,
            "the daemon is not running or not answering (commands that need it)",
        ),
        (
            exit::BUSY,
            "busy, retry later (also: another daemon holds the instance lock)",
        ),
    ] {
        let _ = write!(s, ".TP\n{code}\n{meaning}\n");
    }
    let _ = write!(
        s,
        ".SH FILES\n\
         .TP\n{DEFAULT_CONFIG}\n\
         The daemon's configuration (a commented example as installed: list the devices, \
         then enable the service); checked by\n.BR {name}-validate ({MAN_SECTION}).\n\
         .TP\n{DEFAULT_SOCKET}\n\
         The daemon's control socket.\n\
         .TP\n/usr/lib/systemd/system/{name}.service\n\
         The systemd unit, installed neither enabled nor started.\n\
         .SH \"SEE ALSO\"\n"
    );
    let mut refs: Vec<String> = cmd
        .get_subcommands()
        .filter(|c| !c.is_hide_set())
        .map(|c| format!(".BR {name}-{} ({MAN_SECTION})", c.get_name()))
        .collect();
    refs.push(".BR systemd.service (5)".to_owned());
    s.push_str(&refs.join(",\n"));
    s.push('\n');
    s
}

/// Writes `text` to `path`, creating its directory, and records it.
fn write(path: &Path, text: &[u8], written: &mut Vec<PathBuf>) -> Result<(), AssetsError> {
    let error = |source| AssetsError {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(error)?;
    }
    fs::write(path, text).map_err(error)?;
    written.push(path.to_owned());
    Ok(())
}
